//! Errors returned by every part of the crate.

use std::path::PathBuf;

/// Errors from parsing references, talking to registries, reading image files and unpacking layers.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },

    #[error("invalid digest {digest:?}: expected sha256:<64 lowercase hex digits>")]
    InvalidDigest { digest: String },

    #[error(
        "authentication required for {registry}/{repository} (HTTP {status}): {detail}; \
         check the registry username and password"
    )]
    AuthenticationRequired {
        registry: String,
        repository: String,
        status: u16,
        detail: String,
    },

    #[error("not found: {what} in {registry}/{repository} (HTTP {status}): {detail}")]
    NotFound {
        registry: String,
        repository: String,
        what: String,
        status: u16,
        detail: String,
    },

    #[error("registry {registry} returned HTTP {status} for {what} of {repository}: {detail}")]
    RegistryStatus {
        registry: String,
        repository: String,
        what: String,
        status: u16,
        detail: String,
    },

    #[error("request to registry {registry} for {what} failed")]
    Request {
        registry: String,
        what: String,
        #[source]
        source: reqwest::Error,
    },

    #[error("token request to {realm} for registry {registry} failed: {detail}")]
    Token {
        registry: String,
        realm: String,
        detail: String,
    },

    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },

    #[error("size mismatch for {what}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },

    #[error("unsupported media type {media_type:?} for {what}")]
    UnsupportedMediaType { what: String, media_type: String },

    #[error("no linux/amd64 image in the index for {reference}; platforms present: {platforms}")]
    NoMatchingPlatform {
        reference: String,
        platforms: String,
    },

    #[error("invalid JSON in {what}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid image layout or archive {path}: {reason}")]
    InvalidLayout { path: PathBuf, reason: String },

    #[error("unsafe path {entry:?} in layer {layer}: {reason}")]
    UnsafePath {
        layer: PathBuf,
        entry: String,
        reason: String,
    },

    #[error("unpack destination {path} is not empty")]
    DestinationNotEmpty { path: PathBuf },
}

impl OciError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        OciError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn json(what: impl Into<String>, source: serde_json::Error) -> Self {
        OciError::Json {
            what: what.into(),
            source,
        }
    }
}
