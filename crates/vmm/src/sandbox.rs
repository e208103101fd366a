//! Starting a sandbox from a template build: a fresh copy-on-write disk and a restore of the
//! build's snapshot in the sandbox's network slot.

use std::path::{Path, PathBuf};

use hearth_network::Slot;
use hearth_storage::{
    clone_sparse, create_overlay_over, BackingFormat, ManifestError, Qcow2Error, SandboxPaths,
    TemplateBuildPaths, TemplateManifest,
};

use crate::{
    DiskFormat, DiskSpec, MachineSize, QemuDriver, QemuVm, RestoreSpec, VmPlacement, VmmError,
    VmmKind,
};

/// Errors starting a sandbox from a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SandboxRestoreError {
    #[error("template build {0} is not ready: its manifest is missing")]
    NotReady(PathBuf),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("failed to create sandbox run directory {path}")]
    RunDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Disk(#[from] Qcow2Error),
    #[error("disk {0} is a qcow2 overlay; this VMM needs a raw image")]
    DiskFormat(PathBuf),
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

/// A ready template build, loaded once and restored many times.
#[derive(Clone, Debug)]
pub struct SnapshotTemplate {
    /// Paths of the build's artifacts.
    pub paths: TemplateBuildPaths,
    /// The build's manifest.
    pub manifest: TemplateManifest,
}

impl SnapshotTemplate {
    /// Loads the manifest of the build in `dir` and checks the artifacts' sizes.
    pub fn load(dir: &Path) -> Result<Self, SandboxRestoreError> {
        let paths = TemplateBuildPaths::new(dir);
        if !paths.is_ready() {
            return Err(SandboxRestoreError::NotReady(dir.to_owned()));
        }
        let manifest = TemplateManifest::load(&paths.manifest())?;
        manifest.verify_sizes(dir)?;
        Ok(Self { paths, manifest })
    }
}

impl SnapshotTemplate {
    /// VMM that wrote this build's snapshot.
    pub fn vmm(&self) -> Option<VmmKind> {
        match self.manifest.vmm.as_str() {
            "qemu" => Some(VmmKind::Qemu),
            "firecracker" => Some(VmmKind::Firecracker),
            _ => None,
        }
    }

    /// Memory file a restore maps copy-on-write.
    pub fn memory_file(&self) -> PathBuf {
        match &self.manifest.snapshot {
            Some(origin) => origin.memory_file.clone(),
            None => self.paths.memory(),
        }
    }

    /// Returns the build's disk: the root filesystem of a booted template, or a snapshot's disk.
    pub fn disk(&self) -> DiskSpec {
        match &self.manifest.snapshot {
            Some(origin) => DiskSpec {
                path: self.paths.dir().join(&origin.disk_file),
                format: if origin.disk_format == "qcow2" {
                    DiskFormat::Qcow2
                } else {
                    DiskFormat::Raw
                },
            },
            None => DiskSpec {
                path: self.paths.rootfs(),
                format: DiskFormat::Raw,
            },
        }
    }

    /// Creates the sandbox's disk in `run_dir` and returns it. For QEMU it is `disk.qcow2`,
    /// a new overlay over the build's disk that costs the same whatever the image size.
    /// Firecracker reads raw images only, so it gets `disk.raw`, a reflink or sparse copy.
    pub fn create_disk(
        &self,
        run_dir: &Path,
        vmm: VmmKind,
    ) -> Result<DiskSpec, SandboxRestoreError> {
        let base = self.disk();
        let paths = SandboxPaths::new(run_dir);
        match vmm.sandbox_disk_format() {
            DiskFormat::Qcow2 => {
                let disk = paths.disk();
                let format = match base.format {
                    DiskFormat::Raw => BackingFormat::Raw,
                    DiskFormat::Qcow2 => BackingFormat::Qcow2,
                };
                create_overlay_over(&disk, &base.path, format, self.manifest.disk_size_bytes)?;
                Ok(DiskSpec {
                    path: disk,
                    format: DiskFormat::Qcow2,
                })
            }
            DiskFormat::Raw => {
                if base.format != DiskFormat::Raw {
                    return Err(SandboxRestoreError::DiskFormat(base.path));
                }
                let disk = paths.raw_disk();
                clone_sparse(&base.path, &disk).map_err(|source| SandboxRestoreError::RunDir {
                    path: disk.clone(),
                    source,
                })?;
                Ok(DiskSpec {
                    path: disk,
                    format: DiskFormat::Raw,
                })
            }
        }
    }

    /// Returns the restore of this snapshot with `disk`, in `slot`, writing its files to
    /// `run_dir`.
    pub fn restore_spec(&self, disk: DiskSpec, slot: &Slot, run_dir: &Path) -> RestoreSpec {
        RestoreSpec {
            machine: MachineSize {
                vcpus: self.manifest.vcpus,
                memory_mib: self.manifest.memory_mib,
            },
            memory_file: self.memory_file(),
            vmstate: self.paths.vmstate(),
            vmstate_has_memory: self.memory_file() != self.paths.memory(),
            memory_shared: false,
            disk,
            placement: VmPlacement {
                netns: Some(slot.netns.clone()),
                run_dir: run_dir.to_owned(),
            },
        }
    }
}

/// Restores `template`'s snapshot into a new sandbox whose files go to `run_dir` (created
/// if missing), attached to `slot`'s tap device, and returns the running VM.
///
/// The sandbox's disk is `run_dir/disk.qcow2`, a new overlay over the template's root
/// filesystem. The guest's clock still shows the snapshot time when this returns.
pub async fn restore_sandbox(
    driver: &QemuDriver,
    template: &SnapshotTemplate,
    run_dir: &Path,
    slot: &Slot,
) -> Result<QemuVm, SandboxRestoreError> {
    std::fs::create_dir_all(run_dir).map_err(|source| SandboxRestoreError::RunDir {
        path: run_dir.to_owned(),
        source,
    })?;

    let disk = template.create_disk(run_dir, VmmKind::Qemu)?;
    let spec = template.restore_spec(disk, slot, run_dir);
    Ok(driver.restore_vm(&spec).await?)
}
