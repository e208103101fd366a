//! VMM drivers: the narrow interface the node agent and the template builder use to run a
//! guest (boot, restore from a snapshot, snapshot, stop), and its QEMU implementation.
//!
//! A snapshot is two files: the guest RAM, which lives in a file for the whole life of the
//! VM that is snapshotted, and the device state. Restores map the RAM file copy-on-write, so
//! they cost the same whatever the guest's memory size and never change the file.

pub mod accel;
pub mod qemu;
pub mod qmp;
pub mod sandbox;

use std::path::PathBuf;

use async_trait::async_trait;

pub use accel::{Accel, AccelChoice};
pub use qemu::{QemuDriver, QemuVm};
pub use sandbox::{restore_sandbox, SandboxRestoreError, SnapshotTemplate};

/// Guest disk image and its format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// Image file.
    pub path: PathBuf,
    /// Format of `path`.
    pub format: DiskFormat,
}

/// Format of a disk image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    /// Raw image, written in place.
    Raw,
    /// qcow2, typically an overlay whose header names a raw backing file.
    Qcow2,
}

/// Placement of a VM: its network namespace and the directory for its VMM's files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmPlacement {
    /// Network namespace (name under `/run/netns`) holding the tap device
    /// [`hearth_types::guest::TAP_NAME`]. `None` runs the VM without a network device.
    pub netns: Option<String>,
    /// Directory for the serial console log and the VMM's own log.
    /// Must exist; the driver removes only the files it created there.
    pub run_dir: PathBuf,
}

/// Size of the virtual machine; a restore must use the snapshot's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MachineSize {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
}

/// A cold boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootSpec {
    /// CPUs and memory.
    pub machine: MachineSize,
    /// File holding guest RAM, created or truncated to the memory size and mapped shared,
    /// so that after [`Vm::snapshot`] and [`Vm::stop`] it contains the snapshot's memory.
    pub memory_file: PathBuf,
    /// Uncompressed kernel (ELF with a PVH note).
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Root disk, attached as the first virtio-blk device (`/dev/vda`).
    pub disk: DiskSpec,
    /// Namespace and run directory.
    pub placement: VmPlacement,
}

/// A restore from a snapshot written by [`Vm::snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreSpec {
    /// CPUs and memory; must match the snapshotted VM.
    pub machine: MachineSize,
    /// The snapshot's RAM file, mapped copy-on-write and never written.
    pub memory_file: PathBuf,
    /// The snapshot's device state.
    pub vmstate: PathBuf,
    /// Root disk; its content must equal the snapshotted VM's disk at snapshot time.
    pub disk: DiskSpec,
    /// Namespace and run directory.
    pub placement: VmPlacement,
}

/// Errors of VMM drivers.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("failed to prepare {what} {path}")]
    Prepare {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VMM (pid {pid}) failed: {message}; its log ends with: {log_tail}")]
    Vmm { pid: u32, message: String, log_tail: String },
    #[error("VMM control channel of pid {pid} failed")]
    Qmp {
        pid: u32,
        #[source]
        source: qmp::QmpError,
    },
    #[error("{what} of VMM pid {pid} timed out after {timeout_ms} ms")]
    Timeout { pid: u32, what: &'static str, timeout_ms: u64 },
    #[error("failed to stop VMM pid {pid}")]
    Stop {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// A VMM driver: starts virtual machines.
#[async_trait]
pub trait VmmDriver: Send + Sync {
    /// Boots a guest from its kernel and returns once the VMM runs it.
    async fn boot(&self, spec: &BootSpec) -> Result<Box<dyn Vm>, VmmError>;

    /// Restores a snapshot and returns once the guest is running again.
    async fn restore(&self, spec: &RestoreSpec) -> Result<Box<dyn Vm>, VmmError>;
}

/// A running virtual machine.
#[async_trait]
pub trait Vm: Send + Sync {
    /// Process ID of the VMM.
    fn pid(&self) -> u32;

    /// Pauses the guest and writes its device state to `vmstate`, leaving the guest
    /// paused. Guest RAM that lives in a shared memory file (a booted VM) is not copied:
    /// the memory file contains it once the VM is stopped. A restored VM's private RAM is
    /// written into `vmstate`.
    async fn snapshot(&mut self, vmstate: &std::path::Path) -> Result<(), VmmError>;

    /// Kills the VMM process and waits for it to exit. Calling it
    /// again after success does nothing.
    async fn stop(&mut self) -> Result<(), VmmError>;
}
