//! `hearth api-key`: API keys for the E2B SDK's `E2B_API_KEY`.

use anyhow::Context;
use clap::Subcommand;

use super::DataDirArgs;

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create an API key and print it. Only its hash is stored, so it is shown once.
    Create {
        #[command(flatten)]
        data: DataDirArgs,
        /// Name that identifies the key in listings.
        #[arg(long, default_value = "default")]
        name: String,
    },
}

pub async fn run(command: ApiKeyCommand) -> anyhow::Result<()> {
    match command {
        ApiKeyCommand::Create { data, name } => {
            std::fs::create_dir_all(&data.data_dir)
                .with_context(|| format!("failed to create data dir {}", data.data_dir.display()))?;
            let created = hearth_control_plane::create_api_key(&data.data_dir, &name)
                .await
                .context("failed to create the API key")?;
            println!("{}", created.key);
            Ok(())
        }
    }
}
