//! Packs a directory tree as a one-layer OCI image and pushes it to a registry. Test scripts use it
//! to put images into a local registry.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use hearth_oci::{write_layout, ImageConfig, ImageReference, RegistryAuth, RegistryClient};

#[derive(Parser, Debug)]
#[command(
    name = "hearth-oci-push",
    about = "Pack a directory as a one-layer OCI image and push it to a registry"
)]
struct Args {
    /// Directory tree that becomes the image's root filesystem (ownership and modes are kept).
    #[arg(long)]
    rootfs: PathBuf,
    /// Destination reference, e.g. `127.0.0.1:5000/hearth/base:latest`; with
    /// `--out-layout`, only its tag is used.
    #[arg(long)]
    to: String,
    /// Write the OCI image layout into this directory instead of pushing it.
    #[arg(long, value_name = "DIR")]
    out_layout: Option<PathBuf>,
    /// Registry username.
    #[arg(long, env = "HEARTH_OCI_USERNAME")]
    username: Option<String>,
    /// Registry password; prefer the environment variable over the command line.
    #[arg(long, env = "HEARTH_OCI_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Environment variable for the image config as `KEY=VALUE`; repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// User the image runs as (`name`, `uid` or `uid:gid`).
    #[arg(long)]
    user: Option<String>,
    /// Working directory of the image.
    #[arg(long)]
    workdir: Option<String>,
    /// Command as a JSON array of strings, e.g. `["/bin/sh","-c","sleep infinity"]`.
    #[arg(long, value_name = "JSON")]
    cmd: Option<String>,
    /// Entrypoint as a JSON array of strings.
    #[arg(long, value_name = "JSON")]
    entrypoint: Option<String>,
    /// Registry (`host:port`) to reach over plain http; loopback registries always use http.
    #[arg(long = "plain-http", value_name = "REGISTRY")]
    plain_http: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    let reference = ImageReference::parse(&args.to)?;
    let auth = match (args.username, args.password) {
        (Some(username), Some(password)) => RegistryAuth::Basic { username, password },
        (None, None) => RegistryAuth::Anonymous,
        _ => anyhow::bail!("--username and --password must be given together"),
    };
    for entry in &args.env {
        if !entry.contains('=') {
            anyhow::bail!("invalid --env {entry:?}: expected KEY=VALUE");
        }
    }
    let config = ImageConfig {
        env: args.env,
        user: args.user,
        working_dir: args.workdir,
        cmd: parse_json_array("--cmd", args.cmd.as_deref())?,
        entrypoint: parse_json_array("--entrypoint", args.entrypoint.as_deref())?,
        ..ImageConfig::default()
    };

    if let Some(out) = &args.out_layout {
        write_layout(&args.rootfs, &config, out, reference.tag_or_latest())
            .with_context(|| format!("failed to pack {} into {}", args.rootfs.display(), out.display()))?;
        return Ok(());
    }
    let layout = tempfile::tempdir()
        .context("failed to create a temporary directory for the image layout")?;
    write_layout(
        &args.rootfs,
        &config,
        layout.path(),
        reference.tag_or_latest(),
    )
    .with_context(|| format!("failed to pack {}", args.rootfs.display()))?;
    let digest = RegistryClient::new(args.plain_http)
        .push_layout(layout.path(), &reference, &auth)
        .await
        .with_context(|| format!("failed to push {reference}"))?;
    println!("{digest}");
    Ok(())
}

fn parse_json_array(option: &str, value: Option<&str>) -> anyhow::Result<Option<Vec<String>>> {
    value
        .map(|json| {
            serde_json::from_str::<Vec<String>>(json).with_context(|| {
                format!("invalid {option} {json:?}: expected a JSON array of strings")
            })
        })
        .transpose()
}
