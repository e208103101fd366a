//! The record of a paused sandbox: which files hold its memory, device state and disk,
//! and what a resume needs to rebuild the same virtual machine.
//!
//! A pause writes its files into `sandboxes/<id>/paused/`, flushes them, and writes
//! `pause.json` last. A sandbox is paused on disk exactly when that file exists and every
//! file it lists has its recorded size.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::durable::write_atomic;

/// Version of the pause record format written by this source tree.
pub const PAUSE_FORMAT_VERSION: u32 = 1;

/// Errors reading or writing a pause record.
#[derive(Debug, thiserror::Error)]
pub enum PauseRecordError {
    #[error("failed to read pause record {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid pause record {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("pause record {path} has format version {found}, expected {PAUSE_FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("failed to write pause record {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("paused sandbox file {path} has {found} bytes, the pause record says {expected}")]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
}

/// Description of a paused sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PauseRecord {
    /// Format of this document ([`PAUSE_FORMAT_VERSION`]).
    pub format_version: u32,
    /// The paused sandbox.
    pub sandbox_id: String,
    /// Template and build the sandbox started from.
    pub template_id: String,
    pub build_id: String,
    /// VMM that wrote the snapshot (`qemu`, `firecracker`); only it can resume it.
    pub vmm: String,
    /// Virtual CPUs and memory of the VM.
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Memory file that contains the RAM when `memory_in_vmstate` is false; otherwise the
    /// template's memory file.
    pub memory_file: PathBuf,
    /// Device state file.
    pub vmstate_file: PathBuf,
    /// Whether the device state file carries every page of RAM (QEMU after a first
    /// pause); false when the memory file contains it.
    pub memory_in_vmstate: bool,
    /// The sandbox's disk, which contains every write since the sandbox started.
    pub disk_file: PathBuf,
    /// `qcow2` or `raw`.
    pub disk_format: String,
    /// Sizes of the files the pause wrote, checked before a resume.
    pub files: Vec<(PathBuf, u64)>,
    /// Bytes this pause wrote (memory and device state).
    pub bytes_written: u64,
    /// How many times the sandbox has been paused, this pause included.
    pub generation: u32,
    /// Pause time, milliseconds since the Unix epoch.
    pub paused_at_unix_ms: u64,
    /// envd version in the guest.
    pub envd_version: String,
}

impl PauseRecord {
    /// Reads the record at `path` and checks that the files it lists are complete.
    pub fn load(path: &Path) -> Result<Self, PauseRecordError> {
        let text = std::fs::read(path).map_err(|source| PauseRecordError::Read {
            path: path.to_owned(),
            source,
        })?;
        let record: Self =
            serde_json::from_slice(&text).map_err(|source| PauseRecordError::Parse {
                path: path.to_owned(),
                source,
            })?;
        if record.format_version != PAUSE_FORMAT_VERSION {
            return Err(PauseRecordError::Version {
                path: path.to_owned(),
                found: record.format_version,
            });
        }
        for (file, expected) in &record.files {
            let found = std::fs::metadata(file)
                .map_err(|source| PauseRecordError::Read {
                    path: file.clone(),
                    source,
                })?
                .len();
            if found != *expected {
                return Err(PauseRecordError::SizeMismatch {
                    path: file.clone(),
                    expected: *expected,
                    found,
                });
            }
        }
        Ok(record)
    }

    /// Writes the record durably (temporary file, fsync, rename, fsync of the directory).
    pub fn store(&self, path: &Path) -> Result<(), PauseRecordError> {
        let write_err = |source| PauseRecordError::Write {
            path: path.to_owned(),
            source,
        };
        let text = serde_json::to_vec_pretty(self).map_err(|err| write_err(err.into()))?;
        write_atomic(path, &text).map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(dir: &Path) -> PauseRecord {
        PauseRecord {
            format_version: PAUSE_FORMAT_VERSION,
            sandbox_id: "s1".into(),
            template_id: "base".into(),
            build_id: "b1".into(),
            vmm: "qemu".into(),
            vcpus: 2,
            memory_mib: 256,
            memory_file: "/data/templates/base/b1/memory".into(),
            vmstate_file: dir.join("vmstate"),
            memory_in_vmstate: true,
            disk_file: dir.join("disk.qcow2"),
            disk_format: "qcow2".into(),
            files: vec![(dir.join("vmstate"), 3)],
            bytes_written: 3,
            generation: 1,
            paused_at_unix_ms: 0,
            envd_version: "0.6.4".into(),
        }
    }

    #[test]
    fn store_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmstate"), b"abc").unwrap();
        let path = dir.path().join("pause.json");

        record(dir.path()).store(&path).unwrap();

        assert_eq!(PauseRecord::load(&path).unwrap(), record(dir.path()));
    }

    #[test]
    fn load_rejects_a_truncated_state_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmstate"), b"ab").unwrap();
        let path = dir.path().join("pause.json");
        record(dir.path()).store(&path).unwrap();

        let err = PauseRecord::load(&path).unwrap_err();

        assert!(matches!(
            err,
            PauseRecordError::SizeMismatch {
                expected: 3,
                found: 2,
                ..
            }
        ));
    }
}
