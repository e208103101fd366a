//! On-disk state of a Hearth node: the data directory layout, template manifests and
//! copy-on-write sandbox disks.
//!
//! A template build directory is written once by the template builder and then only read:
//! sandboxes map its memory file privately and write their disk changes into their own
//! qcow2 overlay, so any number of sandboxes share one template without changing it.

pub mod layout;
pub mod manifest;
pub mod qcow2;

pub use layout::{DataDir, SandboxPaths, TemplateBuildPaths};
pub use manifest::{ManifestError, ManifestFile, TemplateManifest, MANIFEST_FORMAT_VERSION};
pub use qcow2::{create_overlay, Qcow2Error};
