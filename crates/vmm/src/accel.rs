//! Choice of QEMU's accelerator: KVM where it can run a standard guest kernel, TCG
//! (software emulation) otherwise.
//!
//! The probe opens `/dev/kvm`, checks `KVM_GET_API_VERSION` and then rejects the paravirtual
//! KVM (`kvm_pvm` module): it exposes a working `/dev/kvm`, but a standard guest kernel
//! fails in its instruction emulator (`lock cmpxchg16b`, then `xrstor`; seen with Debian's
//! 6.1 kernel under QEMU 7.2). The probe does not boot a guest, so a KVM that fails
//! in some other way is still chosen; set `HEARTH_QEMU_ACCEL=tcg` to override.

use std::fmt;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Environment variable that overrides the probe: `kvm`, `tcg` or `auto`.
pub const ACCEL_ENV: &str = "HEARTH_QEMU_ACCEL";

/// `KVM_GET_API_VERSION`, `_IO(0xAE, 0x00)`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
/// The only KVM API version Linux has ever reported.
const KVM_API_VERSION: libc::c_int = 12;

/// Accelerator QEMU runs the guest with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl Accel {
    /// Value of QEMU's `-accel` option.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.qemu_name())
    }
}

/// The chosen accelerator and the reason, for logs and `hearth doctor`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccelChoice {
    /// Accelerator to use.
    pub accel: Accel,
    /// Reason for the choice.
    pub reason: String,
}

/// Chooses the accelerator: `HEARTH_QEMU_ACCEL` if set to `kvm` or `tcg`, else the probe.
pub fn choose_accel() -> AccelChoice {
    match std::env::var(ACCEL_ENV).ok().as_deref() {
        Some("kvm") => AccelChoice { accel: Accel::Kvm, reason: format!("{ACCEL_ENV}=kvm") },
        Some("tcg") => AccelChoice { accel: Accel::Tcg, reason: format!("{ACCEL_ENV}=tcg") },
        Some(other) if other != "auto" && !other.is_empty() => {
            tracing::warn!(value = other, "ignoring invalid {ACCEL_ENV}: expected kvm, tcg or auto");
            probe_accel()
        }
        _ => probe_accel(),
    }
}

/// Probes `/dev/kvm` as described in the module documentation.
pub fn probe_accel() -> AccelChoice {
    let tcg = |reason: String| AccelChoice { accel: Accel::Tcg, reason };

    let kvm = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(file) => file,
        Err(err) => return tcg(format!("/dev/kvm cannot be opened ({err})")),
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only reads the open descriptor.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version != KVM_API_VERSION {
        return tcg(format!("/dev/kvm reports API version {version}, expected {KVM_API_VERSION}"));
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return tcg("/dev/kvm is the paravirtual KVM (kvm_pvm), which cannot run a standard guest kernel".into());
    }
    AccelChoice { accel: Accel::Kvm, reason: "/dev/kvm is usable".into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_qemu_names() {
        assert_eq!(Accel::Kvm.qemu_name(), "kvm");
        assert_eq!(Accel::Tcg.qemu_name(), "tcg");
    }

    #[test]
    fn probe_accel_gives_a_reason() {
        assert!(!probe_accel().reason.is_empty());
    }
}
