//! Choice of the VMM driver for `hearth serve` and template builds.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use hearth_vmm::accel::AccelChoice;
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
                match auto_choice(qemu.accel(), firecracker) {
                    (AutoVmm::Firecracker(binary), reason) => (firecracker_driver(binary), reason),
                    (AutoVmm::Qemu, reason) => (Arc::new(qemu), reason),
                }
            }
        };
        tracing::info!(vmm = %driver.kind(), reason = %reason, "chose the VMM");
        Ok(driver)
    }
}

/// VMM that `--vmm auto` picks.
pub enum AutoVmm {
    /// Firecracker, with this binary.
    Firecracker(PathBuf),
    /// QEMU, with the accelerator it chose.
    Qemu,
}

/// Returns the VMM that `--vmm auto` picks on a host with this accelerator and Firecracker
/// binary, and the reason.
pub fn auto_choice(accel: &AccelChoice, firecracker: Option<PathBuf>) -> (AutoVmm, String) {
    match (accel.accel, firecracker) {
        (Accel::Kvm, Some(binary)) => {
            (AutoVmm::Firecracker(binary), "KVM can boot guests and a firecracker binary is installed".into())
        }
        (Accel::Kvm, None) => (AutoVmm::Qemu, "no firecracker binary is installed".into()),
        (Accel::Tcg, _) => (AutoVmm::Qemu, format!("KVM cannot boot guests here ({})", accel.reason)),
    }
}

fn firecracker_driver(binary: PathBuf) -> Arc<dyn VmmDriver> {
    Arc::new(FirecrackerDriver::new(FirecrackerConfig { binary, ..FirecrackerConfig::default() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accel(accel: Accel) -> AccelChoice {
        AccelChoice { accel, reason: "probe".into() }
    }

    #[test]
    fn auto_firecracker_needs_kvm_and_binary() {
        let binary = PathBuf::from("/usr/local/lib/hearth/firecracker");

        assert!(matches!(auto_choice(&accel(Accel::Kvm), Some(binary.clone())).0, AutoVmm::Firecracker(path) if path == binary));
        assert!(matches!(auto_choice(&accel(Accel::Kvm), None).0, AutoVmm::Qemu));
        assert!(matches!(auto_choice(&accel(Accel::Tcg), Some(binary)).0, AutoVmm::Qemu));
    }

    #[test]
    fn tcg_reason_names_accel_probe() {
        let (_, reason) = auto_choice(&accel(Accel::Tcg), None);

        assert_eq!(reason, "KVM cannot boot guests here (probe)");
    }
}
