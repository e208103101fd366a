//! On-disk state of a Hearth node: the data directory layout, template manifests and
//! copy-on-write sandbox disks.
//!
//! A template build directory is written once by the template builder and then only read:
//! sandboxes map its memory file privately and write their disk changes into their own
//! qcow2 overlay, so any number of sandboxes share one template without changing it.

pub mod clone;
pub mod durable;
pub mod layout;
pub mod manifest;
pub mod pause;
pub mod qcow2;

pub use clone::clone_sparse;
pub use layout::{DataDir, SandboxPaths, TemplateBuildPaths};
pub use manifest::{
    GuestConfig,
    ManifestError, ManifestFile, SnapshotOrigin, TemplateManifest, MANIFEST_FORMAT_VERSION,
};
pub use pause::{PauseRecord, PauseRecordError, PAUSE_FORMAT_VERSION};
pub use qcow2::{create_overlay, create_overlay_over, BackingFormat, Qcow2Error};
