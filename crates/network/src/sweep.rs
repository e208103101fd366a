//! Removing what an earlier run of the same server instance left behind: its network
//! namespaces, host veth ends and nftables table. Objects of other instances, whose names
//! carry another instance ID, are never touched.

use crate::command::CommandError;
use crate::instance::InstanceId;
use crate::setup;

/// Counts of the objects a sweep removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Network namespaces deleted.
    pub namespaces: usize,
    /// Host interfaces deleted.
    pub interfaces: usize,
    /// Whether the instance's nftables table existed and was deleted.
    pub nft_table: bool,
}

/// Removes every namespace, host interface and nftables table of `instance`. Blocking.
pub fn sweep_instance(instance: &InstanceId) -> Result<SweepReport, CommandError> {
    let mut report = SweepReport::default();

    // Host veth ends first: deleting one removes its peer at once.
    let veth_prefix = instance.host_veth_prefix();
    for name in list_dir_names("/sys/class/net") {
        if name.starts_with(&veth_prefix) {
            setup::delete_link(&name)?;
            report.interfaces += 1;
        }
    }

    let netns_prefix = instance.netns_prefix();
    for name in list_dir_names("/run/netns") {
        if name.starts_with(&netns_prefix) {
            setup::delete_netns(&name)?;
            report.namespaces += 1;
        }
    }

    report.nft_table = setup::remove_host_rules(instance)?;
    Ok(report)
}

fn list_dir_names(path: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(path) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect()
}
