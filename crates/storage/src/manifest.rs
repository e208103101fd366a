//! The manifest of a template build: what a restore needs to rebuild the same virtual
//! machine, and the size of every artifact so a truncated copy is detected.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Version of the manifest format written by this source tree.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;

/// Errors reading or writing a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("failed to read template manifest {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid template manifest {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("template manifest {path} has format version {found}, expected {MANIFEST_FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("failed to write template manifest {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("template artifact {path} has {found} bytes, the manifest records {expected}")]
    SizeMismatch { path: PathBuf, expected: u64, found: u64 },
}

/// One artifact of a template build.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    /// File name inside the build directory.
    pub name: String,
    /// Apparent size in bytes.
    pub size_bytes: u64,
    /// SHA-256 of the content, hex; recorded for the small artifacts only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Description of a complete template build.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateManifest {
    /// Format of this document ([`MANIFEST_FORMAT_VERSION`]).
    pub format_version: u32,
    /// Template the build belongs to.
    pub template_id: String,
    /// Build ID.
    pub build_id: String,
    /// Virtual CPUs of the snapshot; a restore must use the same number.
    pub vcpus: u32,
    /// Guest RAM of the snapshot in MiB; a restore must use the same size.
    pub memory_mib: u32,
    /// Release of the guest kernel (`uname -r` in the guest).
    pub kernel_release: String,
    /// Kernel command line the build VM booted with.
    pub kernel_cmdline: String,
    /// Version of envd installed at `/usr/bin/envd`.
    pub envd_version: String,
    /// Apparent size of the root filesystem image in bytes.
    pub disk_size_bytes: u64,
    /// Artifacts in the build directory.
    pub files: Vec<ManifestFile>,
    /// Build completion time, seconds since the Unix epoch.
    pub created_at_unix_secs: u64,
    /// VMM that wrote the snapshot (`qemu`, `firecracker`); only it can restore it.
    #[serde(default = "default_vmm")]
    pub vmm: String,
    /// Set when the build is a snapshot of a sandbox rather than a boot of a root
    /// filesystem: where its memory and disk are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotOrigin>,
    /// What a template build set up for the guest: its envd already holds these defaults
    /// in the snapshot. Absent for the base template built before template builds existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestConfig>,
}

/// The guest defaults of a built template, from its image and build steps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    /// User commands run as unless a request names one.
    pub user: String,
    /// Working directory of commands unless a request names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Environment every command inherits.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Command started before the snapshot, still running in every sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_cmd: Option<String>,
    /// Check that passed before the snapshot was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_check: Option<String>,
    /// Ports the image declares (`EXPOSE`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed_ports: Vec<String>,
    /// Image labels.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

fn default_vmm() -> String {
    "qemu".into()
}

/// Location of the memory and disk of a snapshot build.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotOrigin {
    /// Sandbox the snapshot was taken from.
    pub sandbox_id: String,
    /// Memory file a restore maps copy-on-write: the base template's when the device
    /// state carries every page (QEMU), or the build's own `memory` file.
    pub memory_file: PathBuf,
    /// Disk file name inside the build directory.
    pub disk_file: String,
    /// `qcow2` (an overlay whose backing chain ends in a template's root filesystem) or `raw`.
    pub disk_format: String,
}

impl TemplateManifest {
    /// Reads and checks the manifest at `path`.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read(path).map_err(|source| ManifestError::Read {
            path: path.to_owned(),
            source,
        })?;
        let manifest: Self = serde_json::from_slice(&text).map_err(|source| ManifestError::Parse {
            path: path.to_owned(),
            source,
        })?;
        if manifest.format_version != MANIFEST_FORMAT_VERSION {
            return Err(ManifestError::Version {
                path: path.to_owned(),
                found: manifest.format_version,
            });
        }
        Ok(manifest)
    }

    /// Writes the manifest to `path` through a temporary file and a rename, so readers
    /// never see a partial document.
    pub fn store(&self, path: &Path) -> Result<(), ManifestError> {
        let write_err = |source| ManifestError::Write { path: path.to_owned(), source };
        let text = serde_json::to_vec_pretty(self).map_err(|err| write_err(err.into()))?;
        crate::durable::write_atomic(path, &text).map_err(write_err)
    }

    /// Checks that every listed artifact in `dir` exists with its recorded size.
    pub fn verify_sizes(&self, dir: &Path) -> Result<(), ManifestError> {
        for file in &self.files {
            let path = dir.join(&file.name);
            let found = std::fs::metadata(&path)
                .map_err(|source| ManifestError::Read { path: path.clone(), source })?
                .len();
            if found != file.size_bytes {
                return Err(ManifestError::SizeMismatch { path, expected: file.size_bytes, found });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TemplateManifest {
        TemplateManifest {
            format_version: MANIFEST_FORMAT_VERSION,
            template_id: "base".into(),
            build_id: "b1".into(),
            vcpus: 2,
            memory_mib: 512,
            kernel_release: "6.1.0-57-amd64".into(),
            kernel_cmdline: "console=ttyS0".into(),
            envd_version: "0.6.4".into(),
            disk_size_bytes: 8 << 30,
            files: vec![ManifestFile { name: "vmstate".into(), size_bytes: 3, sha256: None }],
            created_at_unix_secs: 0,
            vmm: "qemu".into(),
            snapshot: None,
            guest: None,
        }
    }

    #[test]
    fn manifest_store_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");

        sample().store(&path).unwrap();

        assert_eq!(TemplateManifest::load(&path).unwrap(), sample());
    }

    #[test]
    fn verify_sizes_rejects_truncated_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmstate"), b"ab").unwrap();

        let err = sample().verify_sizes(dir.path()).unwrap_err();

        assert!(matches!(err, ManifestError::SizeMismatch { expected: 3, found: 2, .. }));
    }
}
