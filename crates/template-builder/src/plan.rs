//! Build plans from what users send: the SDK's typed steps, or a whole Dockerfile with its
//! build context. Both end as a [`BuildPlan`] for [`crate::custom`].
//!
//! COPY sources become a plain tar per step, laid out for `envd build-copy` in the guest:
//! entry names are guest paths relative to `/`, or one file written at its destination.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use hearth_dockerfile::{
    Command, Compression, CopyEntry, CopyFrom, CopyPlan, Dockerfile, EntryKind, IgnoreMatcher, InstructionKind, StageBase,
};
use hearth_network::Slot;
use hearth_oci::{ImageConfig, RegistryAuth};
use hearth_storage::GuestConfig;
use hearth_vmm::VmmDriver;
use sha2::{Digest, Sha256};

use crate::base_disk::{self, BaseDiskSettings};
use crate::custom::{
    build_stage_disk, plan_key, BaseDisk, BuildLogFn, BuildPlan, CustomBuildError, CustomBuildOptions, LogKind,
    PlanStep, ReadyCheck, StartSpec, StepRef,
};

/// Image names that mean Hearth's own base template (E2B's base image).
const BASE_IMAGE_NAMES: &[&str] = &["e2bdev/base", "docker.io/e2bdev/base"];

/// One step as the SDK sends it.
#[derive(Clone, Debug)]
pub struct SdkStep {
    pub kind: String,
    pub args: Vec<String>,
    pub files_hash: Option<String>,
    pub force: bool,
}

/// Whether `image` names E2B's base image, which Hearth serves with its `base` template.
pub fn is_base_image(image: &str) -> bool {
    let name = image.split('@').next().unwrap_or(image);
    let name = match name.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => name,
    };
    BASE_IMAGE_NAMES.contains(&name)
}

fn step_error(index: usize, message: impl Into<String>) -> CustomBuildError {
    CustomBuildError::new(StepRef::Number(index + 1), message)
}

/// Turns the SDK's steps into plan steps. COPY archives are read from `files_dir` and
/// rewritten into `work_dir`.
pub fn sdk_steps(
    steps: &[SdkStep],
    defaults: &GuestConfig,
    files_dir: &Path,
    work_dir: &Path,
) -> Result<Vec<PlanStep>, CustomBuildError> {
    let mut workdir = defaults.workdir.clone().unwrap_or_else(|| "/".into());
    let mut plan = Vec::with_capacity(steps.len());
    for (index, step) in steps.iter().enumerate() {
        let args = &step.args;
        let planned = match step.kind.as_str() {
            "RUN" => {
                let command = args.first().ok_or_else(|| step_error(index, "RUN needs a command"))?;
                let user = args.get(1).filter(|user| !user.is_empty()).cloned();
                PlanStep::Run {
                    argv: vec!["/bin/sh".into(), "-c".into(), command.clone()],
                    user,
                    extra_env: Vec::new(),
                    force: step.force,
                }
            }
            "ENV" => {
                if args.len() % 2 != 0 {
                    return Err(step_error(index, "ENV needs key and value pairs"));
                }
                PlanStep::Env(args.chunks(2).map(|pair| (pair[0].clone(), pair[1].clone())).collect())
            }
            "WORKDIR" => {
                let dir = args.first().ok_or_else(|| step_error(index, "WORKDIR needs a path"))?;
                workdir = resolve(&workdir, dir);
                PlanStep::Workdir(workdir.clone())
            }
            "USER" => {
                let user = args.first().filter(|user| !user.is_empty()).ok_or_else(|| step_error(index, "USER needs a name"))?;
                PlanStep::User(user.clone())
            }
            "COPY" => {
                let (Some(src), Some(dest)) = (args.first(), args.get(1)) else {
                    return Err(step_error(index, "COPY needs a source and a destination"));
                };
                let owner = args.get(2).filter(|owner| !owner.is_empty()).cloned();
                let mode = match args.get(3).filter(|mode| !mode.is_empty()) {
                    Some(mode) => Some(
                        u32::from_str_radix(mode, 8)
                            .map_err(|_| step_error(index, format!("COPY mode {mode:?} is not an octal number")))?,
                    ),
                    None => None,
                };
                let hash = step
                    .files_hash
                    .as_ref()
                    .ok_or_else(|| step_error(index, "COPY has no uploaded files (filesHash)"))?;
                let uploaded = files_dir.join(hash);
                let context = work_dir.join(format!("copy-context-{}", index + 1));
                extract_upload(&uploaded, &context).map_err(|err| step_error(index, err))?;
                let copy_plan = hearth_dockerfile::plan_copy(&context, std::slice::from_ref(src), dest, &workdir, &IgnoreMatcher::parse(""))
                    .map_err(|err| step_error(index, format!("COPY {src} {dest}: {err}")))?;
                let archive = work_dir.join(format!("copy-{}.tar", index + 1));
                let written = write_copy_archive(&copy_plan, &archive).map_err(|err| step_error(index, err))?;
                let _ = std::fs::remove_dir_all(&context);
                PlanStep::Copy {
                    archive,
                    content_hash: written.content_hash,
                    dest: written.dest,
                    owner,
                    mode,
                    single_file: written.single_file,
                    force: step.force,
                    shown_dest: dest.clone(),
                }
            }
            other => return Err(step_error(index, format!("unknown step type {other:?}"))),
        };
        plan.push(planned);
    }
    Ok(plan)
}

fn resolve(workdir: &str, path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("{}/{path}", workdir.trim_end_matches('/'))
    }
}

/// Extracts an uploaded archive (tar, gzip-compressed or not) into `dest`. Entries that
/// would land outside `dest` are refused by the tar reader.
fn extract_upload(archive: &Path, dest: &Path) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(dest);
    std::fs::create_dir_all(dest).map_err(|err| format!("failed to create {}: {err}", dest.display()))?;
    let file = std::fs::File::open(archive).map_err(|err| format!("uploaded files {}: {err}", archive.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let gzip = {
        use std::io::BufRead;
        let head = reader.fill_buf().map_err(|err| format!("failed to read {}: {err}", archive.display()))?;
        head.starts_with(&[0x1f, 0x8b])
    };
    let input: Box<dyn Read> = if gzip { Box::new(flate2::read::GzDecoder::new(reader)) } else { Box::new(reader) };
    let mut tar = tar::Archive::new(input);
    tar.set_preserve_permissions(true);
    tar.set_preserve_ownerships(false);
    tar.set_overwrite(true);
    tar.unpack(dest).map_err(|err| format!("the uploaded archive {} is not a valid tar: {err}", archive.display()))
}

/// A copy archive as written for the guest.
pub struct CopyArchive {
    /// Destination that `envd build-copy` extracts it to.
    pub dest: String,
    /// The archive contains one file, written at `dest` unless that is a directory.
    pub single_file: bool,
    /// SHA-256 of the archive.
    pub content_hash: String,
}

/// Writes the entries of `plan` into a plain tar at `out`.
pub fn write_copy_archive(plan: &CopyPlan, out: &Path) -> Result<CopyArchive, String> {
    let file = std::fs::File::create(out).map_err(|err| format!("failed to create {}: {err}", out.display()))?;
    let mut builder = tar::Builder::new(file);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    let single = match plan.entries.as_slice() {
        [entry] if entry.kind == EntryKind::File && entry.into_existing_dir => Some(entry),
        _ => None,
    };
    let dest = match single {
        Some(entry) => {
            append_entry(&mut builder, entry, &entry.file_name)?;
            entry.guest_path.clone()
        }
        None => {
            for entry in &plan.entries {
                let relative = entry.guest_path.trim_start_matches('/');
                append_entry(&mut builder, entry, relative)?;
            }
            "/".to_owned()
        }
    };
    builder
        .into_inner()
        .and_then(|file| file.sync_all())
        .map_err(|err| format!("failed to write {}: {err}", out.display()))?;
    let content_hash = archive_content_hash(out).map_err(|err| format!("failed to read {}: {err}", out.display()))?;
    Ok(CopyArchive { dest, single_file: single.is_some(), content_hash })
}

/// SHA-256 over what a copy puts in the guest: each entry's name, type, mode, link target
/// and data, in order. Times are left out, so the same files give the same cache key
/// whenever they were unpacked.
fn archive_content_hash(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut archive = tar::Archive::new(std::io::BufReader::new(std::fs::File::open(path)?));
    for entry in archive.entries()? {
        let mut entry = entry?;
        let header = entry.header();
        let name = entry.path_bytes().into_owned();
        let link = entry.link_name_bytes().map(|link| link.into_owned()).unwrap_or_default();
        let facts = [
            name.as_slice(),
            &[header.entry_type().as_byte()],
            &header.mode()?.to_le_bytes(),
            link.as_slice(),
            &entry.size().to_le_bytes(),
        ];
        for fact in facts {
            hasher.update((fact.len() as u64).to_le_bytes());
            hasher.update(fact);
        }
        std::io::copy(&mut entry, &mut hasher)?;
    }
    Ok(hex::encode(hasher.finalize()))
}

fn append_entry(builder: &mut tar::Builder<std::fs::File>, entry: &CopyEntry, name: &str) -> Result<(), String> {
    let fail = |err: std::io::Error| format!("failed to add {} to the copy archive: {err}", entry.host_path.display());
    match &entry.kind {
        EntryKind::File | EntryKind::Dir | EntryKind::Symlink => {
            if name.is_empty() {
                // The destination root itself: a directory that already exists.
                return Ok(());
            }
            builder.append_path_with_name(&entry.host_path, name).map_err(fail)
        }
        EntryKind::ExtractArchive(compression) => {
            let file = std::io::BufReader::new(std::fs::File::open(&entry.host_path).map_err(fail)?);
            let reader: Box<dyn Read> = match compression {
                Compression::None => Box::new(file),
                Compression::Gzip => Box::new(flate2::read::GzDecoder::new(file)),
                Compression::Xz => Box::new(liblzma::read::XzDecoder::new(file)),
                #[allow(unreachable_patterns)]
                other => {
                    return Err(format!("ADD cannot extract {} ({other:?} compression)", entry.host_path.display()))
                }
            };
            let mut archive = tar::Archive::new(reader);
            for item in archive.entries().map_err(fail)? {
                let mut item = item.map_err(fail)?;
                let path = item.path().map_err(fail)?.into_owned();
                if path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                    return Err(format!("{} holds an entry outside its root: {}", entry.host_path.display(), path.display()));
                }
                let relative = path.to_string_lossy().trim_start_matches("./").trim_start_matches('/').to_owned();
                if relative.is_empty() {
                    continue;
                }
                let joined = if name.is_empty() { relative } else { format!("{}/{relative}", name.trim_end_matches('/')) };
                let mut header = item.header().clone();
                builder.append_data(&mut header, &joined, &mut item).map_err(fail)?;
            }
            Ok(())
        }
    }
}

/// A Dockerfile build's inputs.
pub struct DockerfileRequest<'a> {
    pub text: &'a str,
    /// Uploaded build context (a tar, gzip-compressed or not).
    pub context_archive: Option<&'a Path>,
    /// Scratch directory of this build.
    pub work_dir: &'a Path,
    /// Start command that overrides the Dockerfile's CMD/ENTRYPOINT.
    pub start_cmd: Option<&'a str>,
    /// Ready command; without one, the exposed TCP ports must accept connections.
    pub ready_cmd: Option<&'a str>,
    /// Build directory of Hearth's base template, which `FROM e2bdev/base` means.
    pub base_build_dir: &'a Path,
}

/// An image a Dockerfile refers to, ready to build on.
struct ResolvedImage {
    disk: BaseDisk,
    config: ImageConfig,
}

fn base_error(message: impl Into<String>) -> CustomBuildError {
    CustomBuildError::new(StepRef::Base, message)
}

/// Parses a Dockerfile, builds its intermediate stages and returns the plan of its final
/// stage.
pub async fn dockerfile_plan(
    request: &DockerfileRequest<'_>,
    settings: &BaseDiskSettings,
    options: &CustomBuildOptions,
    driver: &dyn VmmDriver,
    slot: &Slot,
    log: &BuildLogFn,
) -> Result<BuildPlan, CustomBuildError> {
    let progress = |line: &str| log(&StepRef::Base, LogKind::Info, line);
    let context = request.work_dir.join("context");
    match request.context_archive {
        Some(archive) => extract_upload(archive, &context).map_err(base_error)?,
        None => std::fs::create_dir_all(&context).map_err(|err| base_error(format!("{}: {err}", context.display())))?,
    }
    let ignore = match std::fs::read_to_string(context.join(".dockerignore")) {
        Ok(text) => IgnoreMatcher::parse(&text),
        Err(_) => IgnoreMatcher::parse(""),
    };
    let build_args = BTreeMap::new();
    let first = hearth_dockerfile::parse(request.text, &build_args).map_err(|err| base_error(format!("Dockerfile {err}")))?;

    // Every image the Dockerfile names, pulled once.
    let mut images: BTreeMap<String, ResolvedImage> = BTreeMap::new();
    for image in referenced_images(&first) {
        let resolved = if is_base_image(&image) {
            progress(&format!("{image} is Hearth's base template"));
            let disk = base_disk::from_template(settings, request.base_build_dir).await.map_err(|err| base_error(err.to_string()))?;
            let config = config_from_defaults(disk.defaults());
            ResolvedImage { disk, config }
        } else {
            let (disk, config) = base_disk::from_registry(settings, &image, &RegistryAuth::Anonymous, &progress)
                .await
                .map_err(|err| base_error(err.to_string()))?;
            ResolvedImage { disk, config }
        };
        images.insert(image, resolved);
    }
    let mut base_config = |image: &str| -> Result<hearth_dockerfile::BaseImageConfig, String> {
        let resolved = images.get(image).ok_or_else(|| format!("image {image} was not pulled"))?;
        let env = resolved
            .config
            .env
            .iter()
            .map(|entry| match entry.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (entry.clone(), String::new()),
            })
            .collect();
        Ok(hearth_dockerfile::BaseImageConfig { env, working_dir: resolved.config.working_dir.clone().unwrap_or_default() })
    };
    let dockerfile = hearth_dockerfile::parse_with_base_images(request.text, &build_args, &mut base_config)
        .map_err(|err| base_error(format!("Dockerfile {err}")))?;

    let last = dockerfile.stages.len() - 1;
    let needed = needed_stages(&dockerfile, last);
    let mut stage_disks: BTreeMap<usize, BaseDisk> = BTreeMap::new();
    for index in 0..=last {
        if !needed.contains(&index) {
            continue;
        }
        let stage = &dockerfile.stages[index];
        let base = match &stage.base {
            StageBase::Image(image) => images.get(image).map(|image| image.disk.clone()).ok_or_else(|| base_error(format!("image {image} was not pulled")))?,
            StageBase::Scratch => base_disk::from_scratch(settings).await.map_err(|err| base_error(err.to_string()))?,
            StageBase::Stage(from) => stage_disks.get(from).cloned().ok_or_else(|| base_error(format!("stage {from} was not built")))?,
        };
        let stage_work = request.work_dir.join(format!("stage-{index}"));
        std::fs::create_dir_all(&stage_work).map_err(|err| base_error(format!("{}: {err}", stage_work.display())))?;
        let converted = stage_steps(&dockerfile, index, &base, &context, &ignore, &stage_disks, &images, &stage_work)?;
        if index == last {
            return Ok(final_plan(base, converted, request));
        }
        let key = plan_key(base_key(&base), &converted.steps);
        let output = settings.data_dir.cache_dir().join("base-disks").join(format!("stage-{key}.ext4"));
        let defaults_file = output.with_extension("json");
        let defaults = match (output.is_file(), std::fs::read(&defaults_file).ok().and_then(|d| serde_json::from_slice::<GuestConfig>(&d).ok())) {
            (true, Some(defaults)) => {
                progress(&format!("stage {} ({}) is cached", index, stage.name.as_deref().unwrap_or("unnamed")));
                defaults
            }
            _ => {
                progress(&format!("building stage {} ({})", index, stage.name.as_deref().unwrap_or("unnamed")));
                let plan = BuildPlan {
                    base: base.clone(),
                    steps: converted.steps,
                    start: None,
                    ready_only: None,
                    exposed_ports: Vec::new(),
                    labels: BTreeMap::new(),
                };
                let partial = output.with_extension("ext4.partial");
                let _ = std::fs::remove_file(&partial);
                let defaults = build_stage_disk(options, &plan, driver, slot, log, &stage_work.join("vm"), &partial).await?;
                std::fs::rename(&partial, &output).map_err(|err| base_error(format!("{}: {err}", output.display())))?;
                let _ = hearth_storage::durable::write_atomic(&defaults_file, &serde_json::to_vec(&defaults).unwrap_or_default());
                defaults
            }
        };
        stage_disks.insert(index, BaseDisk::Prepared { path: output, key, defaults });
    }
    unreachable!("the last stage is always needed")
}

fn base_key(base: &BaseDisk) -> &str {
    match base {
        BaseDisk::Prepared { key, .. } => key,
    }
}

fn config_from_defaults(defaults: &GuestConfig) -> ImageConfig {
    ImageConfig {
        env: defaults.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        user: Some(defaults.user.clone()),
        working_dir: defaults.workdir.clone(),
        ..ImageConfig::default()
    }
}

fn referenced_images(dockerfile: &Dockerfile) -> BTreeSet<String> {
    let mut images = BTreeSet::new();
    for stage in &dockerfile.stages {
        if let StageBase::Image(image) = &stage.base {
            images.insert(image.clone());
        }
        for instruction in &stage.instructions {
            if let InstructionKind::Copy { from: Some(CopyFrom::Image(image)), .. } = &instruction.kind {
                images.insert(image.clone());
            }
        }
    }
    images
}

/// The stages the final stage depends on, itself included.
fn needed_stages(dockerfile: &Dockerfile, last: usize) -> BTreeSet<usize> {
    let mut needed = BTreeSet::new();
    let mut pending = vec![last];
    while let Some(index) = pending.pop() {
        if !needed.insert(index) {
            continue;
        }
        let stage = &dockerfile.stages[index];
        if let StageBase::Stage(from) = stage.base {
            pending.push(from);
        }
        for instruction in &stage.instructions {
            if let InstructionKind::Copy { from: Some(CopyFrom::Stage(from)), .. } = instruction.kind {
                pending.push(from);
            }
        }
    }
    needed
}

/// A stage's steps and what its last CMD, ENTRYPOINT, EXPOSE and LABEL say.
struct StageSteps {
    steps: Vec<PlanStep>,
    cmd: Option<Command>,
    entrypoint: Option<Command>,
    shell: Vec<String>,
    exposed: Vec<String>,
    labels: BTreeMap<String, String>,
}

#[allow(clippy::too_many_arguments)]
fn stage_steps(
    dockerfile: &Dockerfile,
    index: usize,
    base: &BaseDisk,
    context: &Path,
    ignore: &IgnoreMatcher,
    stage_disks: &BTreeMap<usize, BaseDisk>,
    images: &BTreeMap<String, ResolvedImage>,
    work_dir: &Path,
) -> Result<StageSteps, CustomBuildError> {
    let stage = &dockerfile.stages[index];
    let mut out = StageSteps {
        steps: Vec::new(),
        cmd: None,
        entrypoint: None,
        shell: vec!["/bin/sh".into(), "-c".into()],
        exposed: base.defaults().exposed_ports.clone(),
        labels: base.defaults().labels.clone(),
    };
    let no_ignore = IgnoreMatcher::parse("");
    for (number, instruction) in stage.instructions.iter().enumerate() {
        let line_error = |message: String| {
            CustomBuildError::new(StepRef::Number(out.steps.len() + 1), format!("Dockerfile line {}: {message}", instruction.line))
        };
        match &instruction.kind {
            InstructionKind::Run { command, env } => {
                let argv = match command {
                    Command::Shell(text) => {
                        let mut argv = out.shell.clone();
                        argv.push(text.clone());
                        argv
                    }
                    Command::Exec(argv) => argv.clone(),
                };
                out.steps.push(PlanStep::Run { argv, user: None, extra_env: env.clone(), force: false });
            }
            InstructionKind::Copy { sources, dest, from, chown, chmod, add, workdir } => {
                let archive = work_dir.join(format!("copy-{number}.tar"));
                let plan = match from {
                    None if *add => hearth_dockerfile::plan_add(context, sources, dest, workdir, ignore),
                    None => hearth_dockerfile::plan_copy(context, sources, dest, workdir, ignore),
                    Some(CopyFrom::Stage(from)) => {
                        let disk = stage_disks.get(from).ok_or_else(|| line_error(format!("stage {from} was not built")))?;
                        let mount = work_dir.join(format!("mnt-{number}"));
                        let planned = with_mounted(&disk_path(disk), &mount, |root| {
                            let plan = hearth_dockerfile::plan_copy(root, sources, dest, workdir, &no_ignore).map_err(|err| err.to_string())?;
                            write_copy_archive(&plan, &archive).map(|written| (plan, written))
                        })
                        .map_err(line_error)?;
                        out.steps.push(copy_step(planned.1, archive.clone(), dest, chown, chmod));
                        continue;
                    }
                    Some(CopyFrom::Image(image)) => {
                        let disk = images.get(image).map(|image| &image.disk).ok_or_else(|| line_error(format!("image {image} was not pulled")))?;
                        let mount = work_dir.join(format!("mnt-{number}"));
                        let planned = with_mounted(&disk_path(disk), &mount, |root| {
                            let plan = hearth_dockerfile::plan_copy(root, sources, dest, workdir, &no_ignore).map_err(|err| err.to_string())?;
                            write_copy_archive(&plan, &archive).map(|written| (plan, written))
                        })
                        .map_err(line_error)?;
                        out.steps.push(copy_step(planned.1, archive.clone(), dest, chown, chmod));
                        continue;
                    }
                };
                let plan = plan.map_err(|err| line_error(err.to_string()))?;
                let written = write_copy_archive(&plan, &archive).map_err(line_error)?;
                out.steps.push(copy_step(written, archive, dest, chown, chmod));
            }
            InstructionKind::Env(vars) => out.steps.push(PlanStep::Env(vars.clone())),
            InstructionKind::Workdir(dir) => out.steps.push(PlanStep::Workdir(dir.clone())),
            InstructionKind::User(user) => out.steps.push(PlanStep::User(user.clone())),
            InstructionKind::Cmd(command) => out.cmd = Some(command.clone()),
            InstructionKind::Entrypoint(command) => {
                out.entrypoint = Some(command.clone());
                // Docker: a new ENTRYPOINT resets a CMD inherited from before it.
                out.cmd = None;
            }
            InstructionKind::Expose(ports) => out.exposed.extend(ports.iter().cloned()),
            InstructionKind::Label(labels) => out.labels.extend(labels.iter().cloned()),
            InstructionKind::Shell(shell) => out.shell = shell.clone(),
        }
    }
    Ok(out)
}

fn disk_path(disk: &BaseDisk) -> PathBuf {
    match disk {
        BaseDisk::Prepared { path, .. } => path.clone(),
    }
}

fn copy_step(written: CopyArchive, archive: PathBuf, dest: &str, chown: &Option<String>, chmod: &Option<u32>) -> PlanStep {
    PlanStep::Copy {
        archive,
        content_hash: written.content_hash,
        dest: written.dest,
        owner: chown.clone(),
        mode: *chmod,
        single_file: written.single_file,
        force: false,
        shown_dest: dest.to_owned(),
    }
}

/// Mounts a raw ext4 image read-only at `mount`, runs `with` on it and unmounts it,
/// also when `with` fails.
fn with_mounted<T>(image: &Path, mount: &Path, with: impl FnOnce(&Path) -> Result<T, String>) -> Result<T, String> {
    std::fs::create_dir_all(mount).map_err(|err| format!("{}: {err}", mount.display()))?;
    let status = std::process::Command::new("mount")
        .args(["-o", "loop,ro,noload"])
        .arg(image)
        .arg(mount)
        .status()
        .map_err(|err| format!("failed to run mount: {err}"))?;
    if !status.success() {
        let _ = std::fs::remove_dir(mount);
        return Err(format!("failed to mount {} ({status})", image.display()));
    }
    let result = with(mount);
    let unmounted = std::process::Command::new("umount").arg(mount).status();
    if !matches!(unmounted, Ok(status) if status.success()) {
        tracing::error!(mount = %mount.display(), "failed to unmount a stage image");
    }
    let _ = std::fs::remove_dir(mount);
    result
}

/// Docker's start command: ENTRYPOINT (exec form) followed by CMD, or the shell form of
/// either; as one shell command line.
fn start_command(entrypoint: &Option<Command>, cmd: &Option<Command>, shell: &[String]) -> Option<String> {
    let shell_words = |command: &Command| -> Vec<String> {
        match command {
            Command::Shell(text) => {
                let mut argv = shell.to_vec();
                argv.push(text.clone());
                argv
            }
            Command::Exec(argv) => argv.clone(),
        }
    };
    let argv = match (entrypoint, cmd) {
        (Some(Command::Shell(_)), _) => shell_words(entrypoint.as_ref().expect("matched Some")),
        (Some(entry @ Command::Exec(_)), Some(cmd)) => {
            let mut argv = shell_words(entry);
            argv.extend(shell_words(cmd));
            argv
        }
        (Some(entry), None) => shell_words(entry),
        (None, Some(cmd)) => shell_words(cmd),
        (None, None) => return None,
    };
    if argv.is_empty() {
        return None;
    }
    Some(argv.iter().map(|word| shell_quote(word)).collect::<Vec<_>>().join(" "))
}

/// Quotes a word for `/bin/sh` with single quotes.
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b)) {
        return word.to_owned();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn final_plan(base: BaseDisk, stage: StageSteps, request: &DockerfileRequest<'_>) -> BuildPlan {
    let command = request
        .start_cmd
        .filter(|cmd| !cmd.trim().is_empty())
        .map(str::to_owned)
        .or_else(|| start_command(&stage.entrypoint, &stage.cmd, &stage.shell));
    let tcp_ports: Vec<u16> = stage
        .exposed
        .iter()
        .filter(|port| !port.ends_with("/udp"))
        .filter_map(|port| port.trim_end_matches("/tcp").parse().ok())
        .collect();
    let ready = match request.ready_cmd.filter(|cmd| !cmd.trim().is_empty()) {
        Some(cmd) => Some(ReadyCheck::Command(cmd.to_owned())),
        None if !tcp_ports.is_empty() && command.is_some() => Some(ReadyCheck::Ports(tcp_ports)),
        None => None,
    };
    let (start, ready_only) = match command {
        Some(command) => (Some(StartSpec { command, ready }), None),
        None => (None, ready),
    };
    BuildPlan { base, steps: stage.steps, start, ready_only, exposed_ports: stage.exposed, labels: stage.labels }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_image_names() {
        assert!(is_base_image("e2bdev/base"));
        assert!(is_base_image("e2bdev/base:latest"));
        assert!(is_base_image("docker.io/e2bdev/base:1"));
        assert!(!is_base_image("e2bdev/base-other"));
        assert!(!is_base_image("localhost:5000/e2bdev/base"));
    }

    #[test]
    fn start_command_follows_docker() {
        let shell = vec!["/bin/sh".to_owned(), "-c".to_owned()];
        let exec = |words: &[&str]| Some(Command::Exec(words.iter().map(|w| w.to_string()).collect()));
        assert_eq!(start_command(&exec(&["srv", "--port"]), &exec(&["80"]), &shell).as_deref(), Some("srv --port 80"));
        assert_eq!(
            start_command(&None, &Some(Command::Shell("echo $HOME".into())), &shell).as_deref(),
            Some("/bin/sh -c 'echo $HOME'")
        );
        assert_eq!(start_command(&Some(Command::Shell("a".into())), &exec(&["b"]), &shell).as_deref(), Some("/bin/sh -c a"));
        assert_eq!(start_command(&None, &None, &shell), None);
    }

    #[test]
    fn copy_cache_key_ignores_times_but_not_content() {
        let dir = tempfile::tempdir().unwrap();
        let context = dir.path().join("context");
        std::fs::create_dir_all(context.join("site")).unwrap();
        std::fs::write(context.join("site/index.html"), "one").unwrap();
        let ignore = IgnoreMatcher::parse("");
        let plan = || hearth_dockerfile::plan_copy(&context, &["site/".to_owned()], "/srv/", "/", &ignore).unwrap();
        let first = write_copy_archive(&plan(), &dir.path().join("a.tar")).unwrap();
        let file = std::fs::File::options().write(true).open(context.join("site/index.html")).unwrap();
        file.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000)).unwrap();
        let touched = write_copy_archive(&plan(), &dir.path().join("b.tar")).unwrap();
        assert_eq!(first.content_hash, touched.content_hash);
        assert_eq!(first.dest, "/");
        std::fs::write(context.join("site/index.html"), "two").unwrap();
        let changed = write_copy_archive(&plan(), &dir.path().join("c.tar")).unwrap();
        assert_ne!(first.content_hash, changed.content_hash);
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("plain"), "plain");
    }
}
