//! Choice of the VMM driver for `hearth serve` and template builds.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use hearth_vmm::{Accel, FirecrackerConfig, FirecrackerDriver, QemuDriver, VmmDriver};

/// VMM to run sandboxes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VmmChoice {
    /// Firecracker where KVM can boot guests and a `firecracker` binary is installed,
    /// QEMU otherwise.
    Auto,
    /// QEMU `microvm`, with KVM or TCG.
    Qemu,
    /// Firecracker; fails when no binary is found.
    Firecracker,
}

/// Options that choose the VMM.
#[derive(Debug, clap::Args)]
pub struct VmmArgs {
    /// VMM that runs sandboxes. Snapshots are specific to a VMM: templates built with one
    /// are rebuilt for the other.
    #[arg(long, env = "HEARTH_VMM", value_enum, default_value = "auto")]
    pub vmm: VmmChoice,

    /// Firecracker binary; defaults to /usr/local/lib/hearth/firecracker, then `firecracker` in PATH.
    #[arg(long, env = "HEARTH_FIRECRACKER_BIN")]
    pub firecracker_bin: Option<PathBuf>,
}

impl VmmArgs {
    /// Builds the chosen driver and logs the choice with its reason.
    pub fn driver(&self) -> anyhow::Result<Arc<dyn VmmDriver>> {
        let firecracker = self.firecracker_bin.clone().or_else(hearth_vmm::firecracker::firecracker_binary_from_env);
        let (driver, reason): (Arc<dyn VmmDriver>, String) = match self.vmm {
            VmmChoice::Qemu => (Arc::new(QemuDriver::from_env()), "--vmm qemu".into()),
            VmmChoice::Firecracker => {
                let binary = firecracker.context(
                    "--vmm firecracker needs a firecracker binary: run scripts/install-firecracker.sh or pass --firecracker-bin",
                )?;
                (firecracker_driver(binary), "--vmm firecracker".into())
            }
            VmmChoice::Auto => {
                let qemu = QemuDriver::from_env();
                match (qemu.accel().accel, firecracker) {
                    (Accel::Kvm, Some(binary)) => {
                        (firecracker_driver(binary), "KVM can boot guests and a firecracker binary is installed".into())
                    }
                    (Accel::Kvm, None) => (Arc::new(qemu), "no firecracker binary is installed".into()),
                    (Accel::Tcg, _) => {
                        let reason = format!("KVM cannot boot guests here ({})", qemu.accel().reason);
                        (Arc::new(qemu), reason)
                    }
                }
            }
        };
        tracing::info!(vmm = %driver.kind(), reason = %reason, "chose the VMM");
        Ok(driver)
    }
}

fn firecracker_driver(binary: PathBuf) -> Arc<dyn VmmDriver> {
    Arc::new(FirecrackerDriver::new(FirecrackerConfig { binary, ..FirecrackerConfig::default() }))
}
