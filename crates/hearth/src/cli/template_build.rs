//! `hearth template build`: builds a template from a Dockerfile through a Hearth server's
//! API. The CLI only talks HTTP; the server runs the build VM.
//!
//! Steps: `POST /templates` with the Dockerfile text, then the build context as a tar
//! (skipping what `.dockerignore` excludes) uploaded under its SHA-256 unless the server
//! has it, then `POST /templates/{id}/builds/{buildID}` with the context hash, then polling
//! `GET /templates/{id}/builds/{buildID}/status` and printing the build log.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use hearth_dockerfile::IgnoreMatcher;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// API URL when neither `--api-url`, `HEARTH_API_URL` nor `E2B_API_URL` is set.
const DEFAULT_API_URL: &str = "http://127.0.0.1:3000";

/// Interval between build status requests.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Time limit of one API request other than the context upload.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Time limit of the context upload.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(3600);

/// Options of `hearth template build`.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Base URL of the Hearth API. Default: HEARTH_API_URL, then E2B_API_URL, then http://127.0.0.1:3000.
    #[arg(long)]
    api_url: Option<String>,
    /// API key, sent as X-API-Key.
    #[arg(long, env = "E2B_API_KEY", hide_env_values = true)]
    api_key: String,
    /// Template name, `name` or `name:tag`; building an existing name makes a new build of it.
    #[arg(long)]
    name: String,
    /// Dockerfile to build. Default: ./Dockerfile, then ./e2b.Dockerfile.
    #[arg(long)]
    dockerfile: Option<PathBuf>,
    /// Build context directory that COPY and ADD read from. Default: the Dockerfile's directory.
    #[arg(long)]
    context: Option<PathBuf>,
    /// Command the template starts before its snapshot, run with `sh -c`.
    #[arg(long)]
    start_cmd: Option<String>,
    /// Command that exits 0 once the started template is ready, run with `sh -c`.
    #[arg(long)]
    ready_cmd: Option<String>,
    /// Virtual CPUs of sandboxes created from the template.
    #[arg(long)]
    cpu_count: Option<u32>,
    /// Memory of sandboxes created from the template, in MiB.
    #[arg(long = "memory-mb")]
    memory_mb: Option<u32>,
    /// Run every step again instead of reusing cached layers of earlier builds.
    #[arg(long)]
    no_cache: bool,
    /// Build from an image archive instead of a Dockerfile: a `docker save` tar or an OCI
    /// image layout packed as a tar. Its config's Env, User and WorkingDir become the
    /// template's defaults.
    #[arg(long, value_name = "TAR", conflicts_with_all = ["dockerfile", "context"])]
    image_archive: Option<PathBuf>,
}

/// Body of `POST /templates`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct CreateTemplateRequest<'a> {
    name: &'a str,
    dockerfile: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    start_cmd: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ready_cmd: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_count: Option<u32>,
    #[serde(rename = "memoryMB", skip_serializing_if = "Option::is_none")]
    memory_mb: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct CreateTemplateResponse {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "buildID")]
    build_id: String,
}

/// Response of `GET /templates/{id}/files/{hash}`.
#[derive(Debug, Deserialize)]
struct FileUploadResponse {
    present: bool,
    url: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StartBuildRequest<'a> {
    context_hash: &'a str,
    /// Sent only with `--no-cache`: run every step again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    force: bool,
}

/// Response of `GET /templates/{id}/builds/{buildID}/status`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BuildStatusResponse {
    status: String,
    #[serde(default)]
    log_entries: Vec<LogEntry>,
    reason: Option<BuildFailure>,
}

#[derive(Debug, Deserialize)]
struct LogEntry {
    timestamp: String,
    level: String,
    message: String,
    step: Option<String>,
}

#[derive(Debug, Deserialize)]
struct BuildFailure {
    message: String,
    step: Option<String>,
}

/// Runs `hearth template build`.
pub async fn run(args: BuildArgs) -> anyhow::Result<()> {
    if let Some(archive) = &args.image_archive {
        return build_from_archive(&args, archive).await;
    }
    let dockerfile_path = resolve_dockerfile(args.dockerfile.as_deref())?;
    let dockerfile = fs::read_to_string(&dockerfile_path)
        .with_context(|| format!("failed to read Dockerfile {}", dockerfile_path.display()))?;
    let context_dir = match &args.context {
        Some(dir) => dir.clone(),
        None => dockerfile_path
            .parent()
            .map(Path::to_path_buf)
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    anyhow::ensure!(context_dir.is_dir(), "build context {} is not a directory", context_dir.display());

    let api = ApiClient::new(resolve_api_url(args.api_url.as_deref()), &args.api_key)?;
    let created: CreateTemplateResponse = api
        .send_json(
            reqwest::Method::POST,
            "/templates",
            Some(&CreateTemplateRequest {
                name: &args.name,
                dockerfile: &dockerfile,
                start_cmd: args.start_cmd.as_deref(),
                ready_cmd: args.ready_cmd.as_deref(),
                cpu_count: args.cpu_count,
                memory_mb: args.memory_mb,
            }),
        )
        .await
        .context("failed to create the template build")?;
    eprintln!("template {} (ID {}), build {}", args.name, created.template_id, created.build_id);

    let archive = ContextArchive::create(&context_dir)?;
    eprintln!(
        "build context {}: {} entries, {} bytes, sha256 {}",
        context_dir.display(),
        archive.entries,
        archive.size,
        archive.hash
    );
    upload_tar(&api, &created.template_id, archive.file.path(), &archive.hash, archive.size, "build context").await?;

    let start_path = format!("/templates/{}/builds/{}", created.template_id, created.build_id);
    api.send_json::<serde_json::Value>(
        reqwest::Method::POST,
        &start_path,
        Some(&StartBuildRequest {
            context_hash: &archive.hash,
            force: args.no_cache,
        }),
    )
    .await
    .context("failed to start the build")?;

    follow_build(&api, &created).await?;
    print_ready(&args.name, &created);
    Ok(())
}

/// Body of `POST /v3/templates`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RequestBuildV3<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_count: Option<u32>,
    #[serde(rename = "memoryMB", skip_serializing_if = "Option::is_none")]
    memory_mb: Option<u32>,
}

/// Body of `POST /v2/templates/{id}/builds/{buildID}` for an uploaded image archive.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StartArchiveBuild<'a> {
    from_image: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    start_cmd: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ready_cmd: Option<&'a str>,
    force: bool,
    steps: Vec<()>,
}

/// `hearth template build --image-archive`: uploads the archive and builds from it with
/// the SDK's build routes.
async fn build_from_archive(args: &BuildArgs, archive: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(archive.is_file(), "image archive {} not found", archive.display());
    let (hash, size) = {
        use sha2::Digest;
        let mut file = fs::File::open(archive).with_context(|| format!("failed to open {}", archive.display()))?;
        let mut hasher = sha2::Sha256::new();
        let size = std::io::copy(&mut file, &mut hasher).with_context(|| format!("failed to read {}", archive.display()))?;
        (hex::encode(hasher.finalize()), size)
    };
    let api = ApiClient::new(resolve_api_url(args.api_url.as_deref()), &args.api_key)?;
    let created: CreateTemplateResponse = api
        .send_json(
            reqwest::Method::POST,
            "/v3/templates",
            Some(&RequestBuildV3 { name: &args.name, cpu_count: args.cpu_count, memory_mb: args.memory_mb }),
        )
        .await
        .context("failed to create the template build")?;
    eprintln!("template {} (ID {}), build {}", args.name, created.template_id, created.build_id);
    upload_tar(&api, &created.template_id, archive, &hash, size, "image archive").await?;
    let start_path = format!("/v2/templates/{}/builds/{}", created.template_id, created.build_id);
    api.send_json::<serde_json::Value>(
        reqwest::Method::POST,
        &start_path,
        Some(&StartArchiveBuild {
            from_image: format!("{}{hash}", hearth_control_plane::builds::ARCHIVE_IMAGE_PREFIX),
            start_cmd: args.start_cmd.as_deref(),
            ready_cmd: args.ready_cmd.as_deref(),
            force: args.no_cache,
            steps: Vec::new(),
        }),
    )
    .await
    .context("failed to start the build")?;
    follow_build(&api, &created).await?;
    print_ready(&args.name, &created);
    Ok(())
}

/// Returns `--dockerfile`, or the first of ./Dockerfile and ./e2b.Dockerfile that exists.
fn resolve_dockerfile(path: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = path {
        anyhow::ensure!(path.is_file(), "Dockerfile {} not found", path.display());
        return Ok(path.to_path_buf());
    }
    ["Dockerfile", "e2b.Dockerfile"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
        .context("no Dockerfile or e2b.Dockerfile in the current directory; pass --dockerfile")
}

fn resolve_api_url(flag: Option<&str>) -> String {
    let from_env = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    flag.map(str::to_string)
        .or_else(|| from_env("HEARTH_API_URL"))
        .or_else(|| from_env("E2B_API_URL"))
        .unwrap_or_else(|| DEFAULT_API_URL.to_string())
        .trim_end_matches('/')
        .to_string()
}

/// Client of the Hearth REST API with the API key.
struct ApiClient {
    client: reqwest::Client,
    base_url: String,
    api_key: String,
}

impl ApiClient {
    fn new(base_url: String, api_key: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(!api_key.is_empty(), "the API key is empty; pass --api-key or set E2B_API_KEY");
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("failed to create the HTTP client")?;
        Ok(Self {
            client,
            base_url,
            api_key: api_key.to_string(),
        })
    }

    /// Sends a request with an optional JSON body and parses the JSON response. An error
    /// status becomes an error with the response's `message` and the status.
    async fn send_json<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base_url);
        let mut request = self
            .client
            .request(method.clone(), &url)
            .header("X-API-Key", &self.api_key)
            .timeout(REQUEST_TIMEOUT);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("request {method} {url} failed; is the Hearth server running?"))?;
        let response = check_response(response, &method, &url).await?;
        let text = response.text().await.with_context(|| format!("failed to read the response of {method} {url}"))?;
        let text = if text.trim().is_empty() { "null" } else { text.as_str() };
        serde_json::from_str(text).with_context(|| format!("invalid JSON response from {method} {url}: {text}"))
    }
}

/// Returns the response when its status is a success, else an error with the JSON body's
/// `message` (or the raw body) and the HTTP status.
async fn check_response(response: reqwest::Response, method: &reqwest::Method, url: &str) -> anyhow::Result<reqwest::Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|value| value.get("message").and_then(|message| message.as_str()).map(str::to_string))
        .unwrap_or(body);
    anyhow::bail!("{method} {url} failed with HTTP {}: {message}", status.as_u16())
}

/// Uploads the tar at `path` (`what` names it in messages) under its SHA-256 `hash`,
/// unless the server has it already.
async fn upload_tar(api: &ApiClient, template_id: &str, path: &Path, hash: &str, size: u64, what: &str) -> anyhow::Result<()> {
    let link = format!("/templates/{template_id}/files/{hash}");
    let upload: FileUploadResponse = api
        .send_json(reqwest::Method::GET, &link, None::<&()>)
        .await
        .with_context(|| format!("failed to ask the server for the upload link of the {what}"))?;
    if upload.present {
        eprintln!("the server already has this {what}");
        return Ok(());
    }
    let url = upload.url.with_context(|| format!("the server has no copy of the {what} but sent no upload URL"))?;

    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("failed to reopen the {what} {}", path.display()))?;
    let mut request = api.client.put(&url).timeout(UPLOAD_TIMEOUT);
    for (name, value) in upload.headers.iter().filter(|(name, _)| !name.eq_ignore_ascii_case("content-length")) {
        request = request.header(name, value);
    }
    let response = request
        .header("content-type", "application/x-tar")
        .header("content-length", size)
        .body(reqwest::Body::from(file))
        .send()
        .await
        .with_context(|| format!("failed to upload the {what} to {url}"))?;
    check_response(response, &reqwest::Method::PUT, &url).await?;
    eprintln!("uploaded the {what} ({size} bytes)");
    Ok(())
}

/// Polls the build status, printing new log entries, until the build is ready or failed.
async fn follow_build(api: &ApiClient, created: &CreateTemplateResponse) -> anyhow::Result<()> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}").expect("the progress template is valid"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar.set_message("waiting for the build to start");

    let mut offset = 0usize;
    let mut current_step: Option<String> = None;
    loop {
        let path = format!(
            "/templates/{}/builds/{}/status?logsOffset={offset}",
            created.template_id, created.build_id
        );
        let status: BuildStatusResponse = match api.send_json(reqwest::Method::GET, &path, None::<&()>).await {
            Ok(status) => status,
            Err(err) => {
                bar.abandon();
                return Err(err.context("failed to get the build status"));
            }
        };
        offset += status.log_entries.len();
        for entry in &status.log_entries {
            // `suspend` prints also when the bar is hidden because stderr is not a terminal.
            bar.suspend(|| println!("{} {:<5} {}", entry.timestamp, entry.level, entry.message));
            if let Some(step) = &entry.step {
                current_step = Some(step.clone());
            }
        }
        match status.status.as_str() {
            "ready" => {
                bar.finish_with_message("build finished");
                return Ok(());
            }
            "error" => {
                bar.abandon_with_message("build failed");
                let (message, step) = match status.reason {
                    Some(reason) => (reason.message, reason.step),
                    None => ("the server gave no reason".to_string(), None),
                };
                match step {
                    Some(step) => anyhow::bail!("build {} failed at step {step}: {message}", created.build_id),
                    None => anyhow::bail!("build {} failed: {message}", created.build_id),
                }
            }
            other => bar.set_message(match &current_step {
                Some(step) => format!("{other}, step {step}"),
                None => other.to_string(),
            }),
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn print_ready(name: &str, created: &CreateTemplateResponse) {
    println!("Template {name} is ready.");
    println!("  template ID: {}", created.template_id);
    println!("  build ID:    {}", created.build_id);
    println!("  name:        {name}");
    println!("Create a sandbox from it with the E2B SDK pointed at this server (E2B_API_URL, E2B_API_KEY):");
    println!("  Python:     Sandbox.create(\"{name}\")");
    println!("  JavaScript: await Sandbox.create('{name}')");
}

/// The build context as a tar in a temporary file, with its SHA-256.
struct ContextArchive {
    file: tempfile::NamedTempFile,
    /// Lowercase hex SHA-256 of the archive.
    hash: String,
    size: u64,
    entries: usize,
}

/// A file system entry of the context, by its path relative to the context root.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ContextEntry {
    Dir(PathBuf),
    File(PathBuf),
    Symlink(PathBuf),
}

impl ContextArchive {
    /// Writes the context directory `dir` into a temporary tar, skipping what its
    /// `.dockerignore` excludes.
    fn create(dir: &Path) -> anyhow::Result<Self> {
        let ignore_path = dir.join(".dockerignore");
        let ignore_text = match fs::read_to_string(&ignore_path) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => String::new(),
            Err(err) => return Err(err).with_context(|| format!("failed to read {}", ignore_path.display())),
        };
        let entries = context_entries(dir, &ignore_text)?;
        let file = tempfile::NamedTempFile::new().context("failed to create a temporary file for the build context")?;
        let writer = HashingWriter::new(io::BufWriter::new(file.reopen().context("failed to open the temporary archive")?));
        let (hash, size) = write_archive(dir, &entries, writer)?;
        Ok(Self {
            file,
            hash,
            size,
            entries: entries.len(),
        })
    }
}

/// Lists the context's entries that `.dockerignore` keeps, sorted by path, with the
/// directories that contain kept entries. An ignored directory is not read unless the
/// ignore file has `!` exceptions that may keep something inside it.
fn context_entries(dir: &Path, ignore_text: &str) -> anyhow::Result<Vec<ContextEntry>> {
    let matcher = IgnoreMatcher::parse(ignore_text);
    let has_exceptions = ignore_text.lines().any(|line| line.trim_start().starts_with('!'));
    let mut entries = Vec::new();
    collect_entries(dir, Path::new(""), &matcher, has_exceptions, &mut entries)?;
    Ok(entries)
}

fn collect_entries(
    root: &Path,
    relative: &Path,
    matcher: &IgnoreMatcher,
    has_exceptions: bool,
    entries: &mut Vec<ContextEntry>,
) -> anyhow::Result<bool> {
    let dir = root.join(relative);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .with_context(|| format!("failed to list {}", dir.display()))?
        .map(|entry| entry.map(|entry| entry.file_name()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("failed to list {}", dir.display()))?;
    names.sort();

    let mut kept_any = false;
    for name in names {
        let child = relative.join(&name);
        let path = root.join(&child);
        let metadata = fs::symlink_metadata(&path).with_context(|| format!("failed to stat {}", path.display()))?;
        let ignored = matcher.is_ignored(&child);
        let file_type = metadata.file_type();
        if file_type.is_dir() {
            if ignored && !has_exceptions {
                continue;
            }
            let position = entries.len();
            entries.push(ContextEntry::Dir(child.clone()));
            let kept_inside = collect_entries(root, &child, matcher, has_exceptions, entries)?;
            if ignored && !kept_inside {
                entries.truncate(position);
                continue;
            }
            kept_any = true;
        } else if ignored {
            continue;
        } else if file_type.is_file() {
            entries.push(ContextEntry::File(child));
            kept_any = true;
        } else if file_type.is_symlink() {
            entries.push(ContextEntry::Symlink(child));
            kept_any = true;
        } else {
            eprintln!("skipping {}: not a file, directory or symlink", path.display());
        }
    }
    Ok(kept_any)
}

/// Writes `entries` as a tar and returns its SHA-256 hex and size. The archive depends
/// only on names, contents, modes and symlink targets: owners are 0:0 and times are 0,
/// so an unchanged context hashes the same after a checkout or `touch`.
// NOTE: copied files therefore get a modification time of 1970-01-01 in the template,
// where Docker keeps the context's times.
fn write_archive<W: Write>(root: &Path, entries: &[ContextEntry], writer: HashingWriter<W>) -> anyhow::Result<(String, u64)> {
    let mut builder = tar::Builder::new(writer);
    builder.follow_symlinks(false);
    for entry in entries {
        let (relative, kind) = match entry {
            ContextEntry::Dir(path) => (path, tar::EntryType::Directory),
            ContextEntry::File(path) => (path, tar::EntryType::Regular),
            ContextEntry::Symlink(path) => (path, tar::EntryType::Symlink),
        };
        let path = root.join(relative);
        let metadata = fs::symlink_metadata(&path).with_context(|| format!("failed to stat {}", path.display()))?;
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(std::os::unix::fs::PermissionsExt::mode(&metadata.permissions()) & 0o7777);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        let added = match kind {
            tar::EntryType::Regular => {
                let file = fs::File::open(&path).with_context(|| format!("failed to open {}", path.display()))?;
                header.set_size(metadata.len());
                builder.append_data(&mut header, relative, file)
            }
            tar::EntryType::Symlink => {
                let target = fs::read_link(&path).with_context(|| format!("failed to read symlink {}", path.display()))?;
                header.set_size(0);
                builder.append_link(&mut header, relative, target)
            }
            _ => {
                header.set_size(0);
                builder.append_data(&mut header, relative, io::empty())
            }
        };
        added.with_context(|| format!("failed to add {} to the build context archive", path.display()))?;
    }
    let mut writer = builder.into_inner().context("failed to finish the build context archive")?;
    writer.flush().context("failed to write the build context archive")?;
    Ok(writer.finish())
}

/// Writer that hashes everything written through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }

    /// Returns the hex SHA-256 and the byte count of what was written.
    fn finish(self) -> (String, u64) {
        (hex::encode(self.hasher.finalize()), self.size)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(data)?;
        self.hasher.update(&data[..written]);
        self.size += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// Creates a context directory with source files, a `.git` directory, build output
    /// and a symlink.
    fn sample_context() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("src/nested")).unwrap();
        fs::create_dir_all(root.join(".git/objects")).unwrap();
        fs::create_dir_all(root.join("build/keep")).unwrap();
        fs::write(root.join("Dockerfile"), "FROM base\n").unwrap();
        fs::write(root.join("src/main.py"), "print('hi')\n").unwrap();
        fs::write(root.join("src/nested/data.bin"), [0u8, 1, 2]).unwrap();
        fs::write(root.join("src/debug.log"), "noise").unwrap();
        fs::write(root.join(".git/objects/abc"), "object").unwrap();
        fs::write(root.join("build/out.o"), "obj").unwrap();
        fs::write(root.join("build/keep/important.txt"), "keep me").unwrap();
        fs::set_permissions(root.join("src/main.py"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("src/main.py", root.join("entry")).unwrap();
        dir
    }

    fn names(entries: &[ContextEntry]) -> Vec<String> {
        entries
            .iter()
            .map(|entry| match entry {
                ContextEntry::Dir(path) => format!("{}/", path.display()),
                ContextEntry::File(path) => path.display().to_string(),
                ContextEntry::Symlink(path) => format!("{} ->", path.display()),
            })
            .collect()
    }

    /// Reads an archive into (name, type, mode, content or link target).
    fn read_archive(path: &Path) -> Vec<(String, tar::EntryType, u32, String)> {
        let mut archive = tar::Archive::new(fs::File::open(path).unwrap());
        archive
            .entries()
            .unwrap()
            .map(|entry| {
                let mut entry = entry.unwrap();
                let name = entry.path().unwrap().display().to_string();
                let kind = entry.header().entry_type();
                let mode = entry.header().mode().unwrap();
                let mut content = String::new();
                if kind == tar::EntryType::Symlink {
                    content = entry.link_name().unwrap().unwrap().display().to_string();
                } else {
                    io::Read::read_to_string(&mut entry, &mut content).unwrap();
                }
                (name, kind, mode, content)
            })
            .collect()
    }

    #[test]
    fn context_without_ignore_file_keeps_everything() {
        let context = sample_context();
        let entries = context_entries(context.path(), "").unwrap();
        assert_eq!(
            names(&entries),
            [
                ".git/",
                ".git/objects/",
                ".git/objects/abc",
                "Dockerfile",
                "build/",
                "build/keep/",
                "build/keep/important.txt",
                "build/out.o",
                "entry ->",
                "src/",
                "src/debug.log",
                "src/main.py",
                "src/nested/",
                "src/nested/data.bin",
            ]
        );
    }

    #[test]
    fn context_skips_ignored_paths() {
        let context = sample_context();
        let ignore = "# comment\n.git\n**/*.log\nbuild\n";
        let entries = context_entries(context.path(), ignore).unwrap();
        assert_eq!(
            names(&entries),
            ["Dockerfile", "entry ->", "src/", "src/main.py", "src/nested/", "src/nested/data.bin"]
        );
    }

    #[test]
    fn context_exception_keeps_file_in_ignored_dir() {
        let context = sample_context();
        let ignore = ".git\nbuild\n!build/keep/important.txt\n";
        let entries = context_entries(context.path(), ignore).unwrap();
        let names = names(&entries);
        assert!(names.contains(&"build/".to_string()), "{names:?}");
        assert!(names.contains(&"build/keep/".to_string()), "{names:?}");
        assert!(names.contains(&"build/keep/important.txt".to_string()), "{names:?}");
        assert!(!names.contains(&"build/out.o".to_string()), "{names:?}");
        assert!(!names.iter().any(|name| name.starts_with(".git")), "{names:?}");
    }

    #[test]
    fn archive_holds_contents_modes_and_links() {
        let context = sample_context();
        fs::write(context.path().join(".dockerignore"), ".git\nbuild\n*.log\nsrc/*.log\n").unwrap();
        let archive = ContextArchive::create(context.path()).unwrap();
        let entries = read_archive(archive.file.path());

        let main = entries.iter().find(|entry| entry.0 == "src/main.py").unwrap();
        assert_eq!(main.1, tar::EntryType::Regular);
        assert_eq!(main.2, 0o755);
        assert_eq!(main.3, "print('hi')\n");
        let link = entries.iter().find(|entry| entry.0 == "entry").unwrap();
        assert_eq!(link.1, tar::EntryType::Symlink);
        assert_eq!(link.3, "src/main.py");
        assert!(entries.iter().any(|entry| entry.0 == ".dockerignore"));
        assert!(!entries.iter().any(|entry| entry.0.contains("debug.log")));
        assert_eq!(archive.size, fs::metadata(archive.file.path()).unwrap().len());
        assert_eq!(archive.entries, entries.len());
    }

    #[test]
    fn archive_hash_matches_file_and_ignores_times() {
        let context = sample_context();
        let first = ContextArchive::create(context.path()).unwrap();
        let bytes = fs::read(first.file.path()).unwrap();
        assert_eq!(first.hash, hex::encode(Sha256::digest(&bytes)));
        assert_eq!(first.hash.len(), 64);

        let later = std::time::SystemTime::now() + Duration::from_secs(3600);
        fs::File::options()
            .write(true)
            .open(context.path().join("src/main.py"))
            .unwrap()
            .set_modified(later)
            .unwrap();
        let touched = ContextArchive::create(context.path()).unwrap();
        assert_eq!(touched.hash, first.hash, "a new modification time keeps the hash");

        fs::write(context.path().join("src/main.py"), "print('changed')\n").unwrap();
        let changed = ContextArchive::create(context.path()).unwrap();
        assert_ne!(changed.hash, first.hash, "new content changes the hash");
    }

    #[test]
    fn api_url_prefers_flag() {
        assert_eq!(resolve_api_url(Some("http://example.test:3000/")), "http://example.test:3000");
    }

    #[test]
    fn create_request_json_fields() {
        let request = CreateTemplateRequest {
            name: "app:v1",
            dockerfile: "FROM base\n",
            start_cmd: Some("python -m http.server"),
            ready_cmd: None,
            cpu_count: Some(2),
            memory_mb: Some(1024),
        };
        let json = serde_json::to_value(&request).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "name": "app:v1",
                "dockerfile": "FROM base\n",
                "startCmd": "python -m http.server",
                "cpuCount": 2,
                "memoryMB": 1024,
            })
        );
    }
}
