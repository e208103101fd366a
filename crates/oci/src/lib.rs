//! Hearth's OCI image support for template builds. It parses image references and pulls images
//! from a registry over the distribution API (anonymous, Basic or Bearer token auth). It also reads
//! local OCI image layouts and `docker save` archives, and unpacks layers into a root filesystem.
//!
//! Pulled blobs land in a content-addressed directory (`<blob_dir>/sha256/<hex>`), are verified
//! against their sha256 digest before use, and are reused by later pulls.

mod archive;
mod auth;
mod config;
mod digest;
mod error;
mod layout;
mod reference;
mod registry;
pub mod spec;
mod unpack;

use std::path::PathBuf;

pub use archive::read_docker_archive;
pub use auth::RegistryAuth;
pub use config::ImageConfig;
pub use digest::{sha256_file, sha256_hex};
pub use error::OciError;
pub use layout::{read_layout, write_layout, write_layout_layers};
pub use reference::ImageReference;
pub use registry::RegistryClient;
pub use unpack::unpack_layers;

/// An image ready to unpack: its manifest digest, runtime config and layer files in apply order.
#[derive(Debug, Clone)]
pub struct Image {
    /// Digest of the image manifest. For an index, the digest of the linux/amd64 manifest chosen
    /// from it. For a `docker save` archive without an OCI index, the config digest (Docker's
    /// image ID), because such archives contain no manifest blob.
    pub manifest_digest: String,
    pub config: ImageConfig,
    /// Layers from the base up.
    pub layers: Vec<Layer>,
}

/// One layer file on disk.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Path of the (possibly compressed) tar file.
    pub path: PathBuf,
    /// `sha256:<hex>` digest of the file as stored.
    pub digest: String,
    /// Media type from the manifest; `unpack_layers` detects the compression from the content.
    pub media_type: String,
}
