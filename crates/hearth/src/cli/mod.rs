//! Command-line interface: argument types and dispatch to one module per command.

mod doctor;
mod keys;
mod metrics;
mod serve;
mod template;
mod vmm;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Hearth: self-hosted microVM sandboxes that speak the E2B protocol.
#[derive(Debug, Parser)]
#[command(name = "hearth", version)]
pub struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true, env = "HEARTH_LOG_JSON")]
    pub log_json: bool,

    #[command(subcommand)]
    pub command: Command,
}

/// Options every command that touches server state shares.
#[derive(Debug, clap::Args)]
pub struct DataDirArgs {
    /// Directory for the database, templates and sandbox files.
    #[arg(long, env = "HEARTH_DATA_DIR", default_value = "/var/lib/hearth")]
    pub data_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control plane, node agent and proxy in one process.
    Serve(serve::ServeArgs),
    /// Build and inspect templates.
    #[command(subcommand)]
    Template(template::TemplateCommand),
    /// Create API keys.
    #[command(subcommand, name = "api-key")]
    ApiKey(keys::ApiKeyCommand),
    /// Check whether this host can run Hearth, and which VMM it would use.
    Doctor(doctor::DoctorArgs),
}

pub fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;

    let filter = EnvFilter::try_from_env("HEARTH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;

    // Colour codes only when a person watches; a log file gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Template(command) => template::run(command).await,
        Command::ApiKey(command) => keys::run(command).await,
        Command::Doctor(args) => doctor::run(args).await,
    }
}
