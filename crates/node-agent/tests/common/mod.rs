//! Helpers of the node agent's VM tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use hearth_network::InstanceId;
use hearth_types::{BuildId, TemplateId};

/// Splits the build directory in `HEARTH_TEST_TEMPLATE_DIR`
/// (`<data-dir>/templates/<template>/<build>`) into its data dir, template ID and build ID.
pub fn template_from_env() -> Option<(PathBuf, TemplateId, BuildId)> {
    let dir = PathBuf::from(std::env::var_os("HEARTH_TEST_TEMPLATE_DIR")?);
    let build = dir.file_name()?.to_str()?.to_owned();
    let template = dir.parent()?.file_name()?.to_str()?.to_owned();
    let data_dir = dir.parent()?.parent()?.parent()?.to_path_buf();
    Some((data_dir, TemplateId::parse(&template).ok()?, BuildId::parse(&build).ok()?))
}

/// Removes the instance's namespaces, host interfaces and nftables table when dropped, so a
/// failing assertion leaves nothing behind either.
pub struct SweepOnDrop(pub InstanceId);

impl Drop for SweepOnDrop {
    fn drop(&mut self) {
        if let Err(err) = hearth_network::sweep::sweep_instance(&self.0) {
            eprintln!("failed to sweep instance {}: {err}", self.0.as_str());
        }
    }
}

/// Returns the PIDs of the processes whose command line names `run_dir`: the VMM of the
/// sandbox that runs there.
pub fn vmm_pids(run_dir: &Path) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmdline| String::from_utf8_lossy(&cmdline).contains(run_dir.to_str().unwrap()))
                .unwrap_or(false)
        })
        .collect()
}

/// Starts a node agent with the QEMU driver over `data_root`, keeping `ready_slots` network
/// slots prepared. Bind the result as `let (_sweep, node) = ...` so that the node drops
/// before its slots are swept.
pub async fn start_node(
    data_root: &Path,
    ready_slots: usize,
) -> (SweepOnDrop, std::sync::Arc<hearth_node_agent::NodeAgent>) {
    let instance = InstanceId::from_data_dir(data_root).unwrap();
    let sweep = SweepOnDrop(instance.clone());
    let mut pool_config = hearth_network::SlotPoolConfig::new(instance);
    pool_config.ready_target = ready_slots;
    let slots = hearth_network::SlotPool::start(pool_config).await.unwrap();
    let node = hearth_node_agent::NodeAgent::new(
        hearth_node_agent::NodeConfig {
            data_dir: hearth_storage::DataDir::new(data_root),
            envd_ready_timeout: std::time::Duration::from_secs(60),
        },
        std::sync::Arc::new(hearth_vmm::QemuDriver::from_env()),
        slots,
    );
    (sweep, std::sync::Arc::new(node))
}
