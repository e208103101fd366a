//! `hearth template`: building the base template and finding template builds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use hearth_control_plane::store::{BuildStatus, Store, TemplateBuildRecord};
use hearth_network::{InstanceId, SlotPool, SlotPoolConfig};
use hearth_storage::DataDir;
use hearth_template_builder::{BaseTemplateOptions, BuildProgress};
use hearth_types::TemplateId;
use hearth_vmm::QemuDriver;
use indicatif::{ProgressBar, ProgressStyle};

use super::DataDirArgs;

#[path = "template_build.rs"]
mod template_build;

/// Alias of the template that `hearth serve` builds on first start.
pub const BASE_ALIAS: &str = "base";

/// Location of the static envd binary that templates get.
#[derive(Debug, clap::Args)]
pub struct EnvdArgs {
    /// Static envd binary installed into templates. Default: `envd` beside the `hearth`
    /// executable, then /usr/local/lib/hearth/envd.
    #[arg(long, env = "HEARTH_ENVD_PATH")]
    pub envd_path: Option<PathBuf>,
}

impl EnvdArgs {
    pub(crate) fn resolve(&self) -> anyhow::Result<PathBuf> {
        if let Some(path) = &self.envd_path {
            anyhow::ensure!(path.is_file(), "envd binary {} not found", path.display());
            return Ok(path.clone());
        }
        let beside_exe = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join("envd")));
        let candidates = beside_exe
            .into_iter()
            .chain([PathBuf::from("/usr/local/lib/hearth/envd")]);
        for candidate in candidates {
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
        anyhow::bail!(
            "no envd binary found beside hearth or at /usr/local/lib/hearth/envd; \
             run scripts/build.sh or pass --envd-path"
        )
    }
}

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Build the base template (Debian bookworm, envd, Debian's kernel) and snapshot it.
    BuildBase {
        #[command(flatten)]
        data: DataDirArgs,
        #[command(flatten)]
        envd: EnvdArgs,
        /// Build again even when a ready base template exists.
        #[arg(long)]
        force: bool,
        /// Guest memory of the template in MiB; every sandbox from it gets the same.
        #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(128..=65536))]
        memory_mib: u32,
        /// Virtual CPUs of the template; every sandbox from it gets the same.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=32))]
        vcpus: u32,
    },
    /// Build a template from a Dockerfile on a Hearth server, through its API.
    Build(template_build::BuildArgs),
    /// Print the directory of a template's ready build.
    Path {
        /// Template ID or alias.
        template: String,
        #[command(flatten)]
        data: DataDirArgs,
    },
}

pub async fn run(command: TemplateCommand) -> anyhow::Result<()> {
    match command {
        TemplateCommand::BuildBase {
            data,
            envd,
            force,
            memory_mib,
            vcpus,
        } => {
            let machine = hearth_vmm::MachineSize { vcpus, memory_mib };
            build_base_command(&data.data_dir, &envd, force, machine).await
        }
        TemplateCommand::Build(args) => template_build::run(args).await,
        TemplateCommand::Path { template, data } => {
            let store = Store::open(&data.data_dir)
                .await
                .context("failed to open the database")?;
            let dir = ready_build_dir(&DataDir::new(&data.data_dir), &store, &template).await;
            store.close().await;
            match dir? {
                Some(dir) => {
                    println!("{}", dir.display());
                    Ok(())
                }
                None => anyhow::bail!(
                    "template {template:?} has no ready build in {}",
                    data.data_dir.display()
                ),
            }
        }
    }
}

/// Directory of the ready build of `template`, if it has one whose files are complete.
async fn ready_build_dir(
    data_dir: &DataDir,
    store: &Store,
    template: &str,
) -> anyhow::Result<Option<PathBuf>> {
    let Some(record) = store
        .find_template(template)
        .await
        .context("failed to look up the template")?
    else {
        return Ok(None);
    };
    if record.status != BuildStatus::Ready {
        return Ok(None);
    }
    let paths = data_dir.template_build(&record.template_id, &record.build_id);
    Ok(paths.is_ready().then(|| paths.dir().to_path_buf()))
}

async fn build_base_command(
    data_root: &Path,
    envd: &EnvdArgs,
    force: bool,
    machine: hearth_vmm::MachineSize,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::Uid::effective().is_root(),
        "building a template must run as root: it runs debootstrap and boots a VM in a network namespace"
    );
    std::fs::create_dir_all(data_root)
        .with_context(|| format!("failed to create data dir {}", data_root.display()))?;
    let data_root = std::fs::canonicalize(data_root)?;
    let data_dir = DataDir::new(&data_root);
    let store = Store::open(&data_root)
        .await
        .context("failed to open the database")?;

    if !force {
        if let Some(dir) = ready_build_dir(&data_dir, &store, BASE_ALIAS).await? {
            println!("base template is ready: {}", dir.display());
            store.close().await;
            return Ok(());
        }
    }

    let driver = QemuDriver::from_env();
    let instance = InstanceId::from_data_dir(&data_root)?;
    let mut pool_config = SlotPoolConfig::new(instance);
    pool_config.ready_target = 1;
    let slots = SlotPool::start(pool_config)
        .await
        .context("failed to prepare a network slot for the build VM (is `hearth serve` running on this data dir?)")?;

    let built = build_and_register(&data_dir, &store, &slots, &driver, envd, Some(machine)).await;
    if let Err(err) = slots.shutdown().await {
        tracing::error!(error = %err, "failed to remove the build's network slot");
    }
    store.close().await;
    let dir = built?;
    println!("base template is ready: {}", dir.display());
    Ok(())
}

/// Builds the base template unless a ready one exists; used by `hearth serve` on start.
pub async fn ensure_base_template(
    data_dir: &DataDir,
    store: &Store,
    slots: &SlotPool,
    driver: &dyn hearth_vmm::VmmDriver,
    envd: &EnvdArgs,
) -> anyhow::Result<()> {
    if let Some(dir) = ready_build_dir(data_dir, store, BASE_ALIAS).await? {
        let built_by = hearth_storage::TemplateManifest::load(&dir.join("manifest.json"))
            .map(|manifest| manifest.vmm);
        match built_by {
            Ok(vmm) if vmm == driver.kind().as_str() => {
                tracing::info!(path = %dir.display(), "base template is ready");
                return Ok(());
            }
            Ok(vmm) => {
                tracing::warn!(path = %dir.display(), built_by = %vmm, driver = %driver.kind(), "base template was snapshotted by another VMM; building it again")
            }
            Err(err) => {
                tracing::warn!(path = %dir.display(), error = %err, "base template manifest is unreadable; building it again")
            }
        }
    }
    tracing::info!("base template missing: building it now (debootstrap, kernel, first boot; about a minute under TCG, longer while packages download)");
    build_and_register(data_dir, store, slots, driver, envd, None).await?;
    Ok(())
}

async fn build_and_register(
    data_dir: &DataDir,
    store: &Store,
    slots: &SlotPool,
    driver: &dyn hearth_vmm::VmmDriver,
    envd: &EnvdArgs,
    machine: Option<hearth_vmm::MachineSize>,
) -> anyhow::Result<PathBuf> {
    let envd_binary = envd.resolve()?;
    let mut options = BaseTemplateOptions::new(data_dir.clone(), &envd_binary);
    if let Some(machine) = machine {
        options.machine = machine;
    }
    options.template_id = TemplateId::generate();
    options.build_id = hearth_control_plane::new_build_id();

    let bar = progress_bar();
    let show = {
        let bar = bar.clone();
        move |event: BuildProgress| bar.set_message(format!("{:?}: {}", event.step, event.message))
    };

    let slot = slots
        .acquire()
        .await
        .context("failed to get a network slot for the build VM")?;
    let built = hearth_template_builder::build_base_template(&options, driver, &slot, &show).await;
    if let Err(err) = slots.release(slot).await {
        tracing::error!(error = %err, "failed to release the build VM's network slot");
    }
    let built = match built {
        Ok(built) => built,
        Err(err) => {
            bar.abandon_with_message("base template build failed");
            return Err(anyhow::Error::new(err).context("base template build failed"));
        }
    };
    bar.finish_with_message(format!(
        "base template built in {:.1} s",
        built.total.as_secs_f64()
    ));

    let record = TemplateBuildRecord {
        template_id: options.template_id.clone(),
        build_id: options.build_id.clone(),
        vcpus: built.manifest.vcpus,
        memory_mib: built.manifest.memory_mib,
        disk_mb: u32::try_from(built.manifest.disk_size_bytes / 1_000_000).unwrap_or(u32::MAX),
        envd_version: built.manifest.envd_version.clone(),
        aliases: vec![BASE_ALIAS.to_owned()],
    };
    store
        .register_template_build(&record)
        .await
        .context("failed to record the template build")?;
    Ok(built.paths.dir().to_path_buf())
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .expect("the progress template is valid"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
