//! VMM drivers: the narrow interface the node agent and the template builder use to run a
//! guest (boot, restore from a snapshot, snapshot, stop), and its QEMU implementation.
//!
//! A snapshot is two files: the guest RAM, which lives in a file for the whole life of the
//! VM that is snapshotted, and the device state. Restores map the RAM file copy-on-write, so
//! they cost the same whatever the guest's memory size and never change the file.

pub mod accel;
pub mod firecracker;
mod log_tail;
pub mod qemu;
pub mod qmp;
pub mod sandbox;
pub mod tsc;

use std::path::{Path, PathBuf};

use async_trait::async_trait;

pub use accel::{Accel, AccelChoice};
pub use firecracker::{FirecrackerConfig, FirecrackerDriver, FirecrackerVm};
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
    /// The snapshot's RAM file (see `memory_shared`).
    pub memory_file: PathBuf,
    /// The snapshot's device state.
    pub vmstate: PathBuf,
    /// Whether `vmstate` carries every page of guest RAM ([`SnapshotMemory::InVmstate`]).
    pub vmstate_has_memory: bool,
    /// QEMU only: map `memory_file` shared, so the guest's RAM lives in that file from
    /// here on and a later snapshot writes only the pages it changed. The file is
    /// created at the memory size when missing. False maps it copy-on-write and never
    /// changes it. Firecracker always maps its memory file copy-on-write.
    pub memory_shared: bool,
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
    Vmm {
        pid: u32,
        message: String,
        log_tail: String,
    },
    #[error("VMM control channel of pid {pid} failed")]
    Qmp {
        pid: u32,
        #[source]
        source: qmp::QmpError,
    },
    #[error("{what} of VMM pid {pid} timed out after {timeout_ms} ms")]
    Timeout {
        pid: u32,
        what: &'static str,
        timeout_ms: u64,
    },
    #[error("{vmm} does not support {operation}")]
    Unsupported { vmm: &'static str, operation: &'static str },
    #[error("failed to stop VMM pid {pid}")]
    Stop {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// Kind of VMM a driver runs. Snapshots are specific to the VMM that wrote them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmmKind {
    /// QEMU `microvm`, with KVM or TCG.
    Qemu,
    /// Firecracker, which needs KVM.
    Firecracker,
}

impl VmmKind {
    /// Lower-case name, as in manifests and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qemu => "qemu",
            Self::Firecracker => "firecracker",
        }
    }

    /// Format of the sandbox disks this VMM opens: QEMU reads qcow2 overlays over the
    /// template's image; Firecracker opens raw images only.
    pub fn sandbox_disk_format(self) -> DiskFormat {
        match self {
            Self::Qemu => DiskFormat::Qcow2,
            Self::Firecracker => DiskFormat::Raw,
        }
    }
}

impl std::fmt::Display for VmmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Destination of [`Vm::snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotTarget {
    /// Device state. QEMU also writes the RAM of a restored VM into this file.
    pub vmstate: PathBuf,
    /// Guest memory, for VMMs that write it to a file of its own (Firecracker, and a
    /// booted QEMU VM whose shared RAM file is this path).
    pub memory: PathBuf,
    /// Write only the memory changed since the VM was restored from `memory`, and merge
    /// it into `memory`, where the VMM can. False writes all of the memory.
    pub diff: bool,
}

/// Location of a snapshot's guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMemory {
    /// Inside the device state file; a restore maps the template's memory file
    /// copy-on-write and the state stream overwrites every page (QEMU, restored VM).
    InVmstate,
    /// In [`SnapshotTarget::memory`], which a restore maps copy-on-write.
    InMemoryFile,
}

/// Outcome of a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotReport {
    /// Location of the memory.
    pub memory: SnapshotMemory,
    /// Bytes the snapshot wrote to files, memory and device state together.
    pub bytes_written: u64,
}

/// A VMM driver: starts virtual machines.
#[async_trait]
pub trait VmmDriver: Send + Sync {
    /// Returns the VMM this driver runs.
    fn kind(&self) -> VmmKind;

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

    /// Returns whether the VMM process is still alive.
    fn is_running(&mut self) -> bool;

    /// File holding the guest's serial console output.
    fn console_log(&self) -> PathBuf;

    /// Pauses the guest, flushes its disk and writes a snapshot to `target`, leaving the
    /// guest paused: [`Vm::resume`] continues it, [`Vm::stop`] ends it. On error the guest
    /// may be paused or running; call [`Vm::resume`] to keep it.
    async fn snapshot(&mut self, target: &SnapshotTarget) -> Result<SnapshotReport, VmmError>;

    /// Runs a guest that [`Vm::snapshot`] paused (or that a failed snapshot left paused).
    /// Does nothing when the guest is already running.
    async fn resume(&mut self) -> Result<(), VmmError>;

    /// Kills the VMM process and waits for it to exit. Calling it
    /// again after success does nothing.
    async fn stop(&mut self) -> Result<(), VmmError>;

    /// Creates `overlay`, a qcow2 file backed by the disk's current writable layer, and
    /// makes it the writable layer while the guest runs. Everything written before the
    /// call stays in the old layer, which nothing writes again. Template builds use it to
    /// keep each step's changes in a file of its own.
    async fn push_disk_layer(&mut self, overlay: &Path) -> Result<(), VmmError> {
        let _ = overlay;
        Err(VmmError::Unsupported { vmm: "this VMM", operation: "adding a disk layer to a running guest" })
    }
}
