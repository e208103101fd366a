//! Hearth's control plane: the E2B-compatible REST API, its state and sandbox timeouts.
//!
//! `hearth serve` calls [`build`] with a [`ControlPlaneConfig`] and the node agent behind
//! [`runtime::SandboxRuntime`], serves the returned router, runs
//! [`ControlPlane::spawn_reaper`] and calls [`ControlPlane::shutdown`] before it exits.

pub mod api;
pub mod auth;
pub mod builds;
pub mod error;
mod lifecycle;
pub mod models;
pub mod network;
mod pausing;
pub mod runtime;
mod sandboxes;
pub mod store;
mod template_builds;
pub mod template_files;
pub mod template_models;
pub mod template_names;
mod template_tags;
pub mod testing;
mod validate;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hearth_types::BuildId;
use tokio::sync::watch;

use crate::builds::TemplateBuilder;
use crate::runtime::SandboxRuntime;
use crate::store::{CreatedApiKey, Store, StoreError};
use crate::template_files::{FileStore, FileStoreError};

pub use crate::lifecycle::ReconcileReport;
pub use crate::template_builds::{BASE_TEMPLATE_ALIAS, INTERRUPTED_BUILD_REASON};

/// Default maximum sandbox timeout: 24 hours, the limit the e2b 2.63.0 SDK documents for
/// E2B's Pro tier (`Sandbox.create`'s `timeout` parameter).
pub const DEFAULT_MAX_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// Default period of the timeout reaper.
pub const DEFAULT_REAPER_INTERVAL: Duration = Duration::from_secs(1);

/// `clientID` reported for every sandbox. E2B reports a node-related ID there; the SDK
/// only requires a string.
pub const CLIENT_ID: &str = "hearth";

/// Settings of the control plane, filled in by the caller (`hearth serve`, tests).
#[derive(Clone, Debug)]
pub struct ControlPlaneConfig {
    /// Directory holding the SQLite database; created if missing.
    pub data_dir: PathBuf,
    /// API keys accepted besides those stored in the database, such as the value of
    /// `HEARTH_API_KEY`. Each must be `e2b_` followed by 40 hexadecimal digits.
    pub api_keys_from_env: Vec<String>,
    /// Domain returned to the SDK in `domain`; the SDK then reaches envd at
    /// `https://49983-<sandboxID>.<domain>` unless `E2B_SANDBOX_URL` is set, in which case
    /// it ignores the domain. `None` returns null, which makes the SDK use its own
    /// `E2B_DOMAIN` setting.
    pub domain: Option<String>,
    /// Maximum timeout a request may set.
    pub max_timeout: Duration,
    /// How often the reaper looks for sandboxes whose end time has passed.
    pub reaper_interval: Duration,
}

impl ControlPlaneConfig {
    /// Creates a configuration with the defaults: no extra keys, no domain, 24-hour maximum
    /// timeout and a one-second reaper period.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            api_keys_from_env: Vec::new(),
            domain: None,
            max_timeout: DEFAULT_MAX_TIMEOUT,
            reaper_interval: DEFAULT_REAPER_INTERVAL,
        }
    }
}

/// Errors of [`build`].
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The database could not be opened or migrated.
    #[error("failed to open the control-plane store")]
    Store(#[from] StoreError),
    /// A configured API key does not have the form the SDK accepts.
    #[error("invalid API key #{index} in the configuration: expected \"e2b_\" followed by 40 hexadecimal digits")]
    InvalidApiKey { index: usize },
    /// The configured maximum timeout is zero.
    #[error("invalid max_timeout {0:?}: must be at least one second")]
    InvalidMaxTimeout(Duration),
    /// The directory of uploaded template files or its token secret could not be set up.
    #[error("failed to open the template file store")]
    Files(#[from] FileStoreError),
}

/// Shared state of the control plane. Cloning is cheap and shares everything.
#[derive(Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    runtime: Arc<dyn SandboxRuntime>,
    /// Builds templates; without one the build routes return 501.
    template_builder: Option<Arc<dyn TemplateBuilder>>,
    /// Files uploaded for template builds.
    files: FileStore,
    config: ControlPlaneConfig,
    /// SHA-256 hashes of `config.api_keys_from_env`.
    env_key_hashes: Vec<String>,
    /// Becomes true when [`ControlPlane::shutdown`] starts.
    shutting_down: watch::Sender<bool>,
    /// Per-sandbox locks of [`ControlPlane::lock_sandbox`].
    sandbox_locks: std::sync::Mutex<
        std::collections::HashMap<hearth_types::SandboxId, Arc<tokio::sync::Mutex<()>>>,
    >,
}

/// Opens the store, reconciles it with the runtime and returns the API router and the
/// control plane, without a template builder: the build routes return 501. See
/// [`build_with_template_builder`].
pub async fn build(
    config: ControlPlaneConfig,
    runtime: Arc<dyn SandboxRuntime>,
) -> Result<(axum::Router, ControlPlane), BuildError> {
    build_with_template_builder(config, runtime, None).await
}

/// Opens the store, reconciles it with the runtime, marks builds that a previous run left
/// unfinished as failed, and returns the API router and the control plane. The router
/// serves `/openapi.json`, `/health` and the signed file upload route without a key and
/// every other route behind `X-API-Key`.
pub async fn build_with_template_builder(
    config: ControlPlaneConfig,
    runtime: Arc<dyn SandboxRuntime>,
    template_builder: Option<Arc<dyn TemplateBuilder>>,
) -> Result<(axum::Router, ControlPlane), BuildError> {
    for (index, key) in config.api_keys_from_env.iter().enumerate() {
        if !auth::is_valid_api_key_format(key) {
            return Err(BuildError::InvalidApiKey { index });
        }
    }
    if config.max_timeout < Duration::from_secs(1) {
        return Err(BuildError::InvalidMaxTimeout(config.max_timeout));
    }

    let store = Store::open(&config.data_dir).await?;
    let files = FileStore::open(&config.data_dir)?;
    let env_key_hashes = config
        .api_keys_from_env
        .iter()
        .map(|key| auth::hash_api_key(key))
        .collect();
    let control_plane = ControlPlane {
        inner: Arc::new(Inner {
            store,
            runtime,
            template_builder,
            files,
            config,
            env_key_hashes,
            shutting_down: watch::Sender::new(false),
            sandbox_locks: Default::default(),
        }),
    };

    control_plane.reconcile().await?;
    control_plane.recover_builds().await?;
    let router = api::router(control_plane.clone());
    Ok((router, control_plane))
}

impl ControlPlane {
    /// Returns the state store, for the template builder and the CLI.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Returns the configuration the control plane was built with.
    pub fn config(&self) -> &ControlPlaneConfig {
        &self.inner.config
    }

    /// Returns the store of files uploaded for template builds.
    pub fn files(&self) -> &FileStore {
        &self.inner.files
    }

    pub(crate) fn runtime(&self) -> &dyn SandboxRuntime {
        self.inner.runtime.as_ref()
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        *self.inner.shutting_down.borrow()
    }

    /// Checks a well-formed key against the configured keys and the stored hashes.
    pub(crate) async fn is_known_api_key(&self, key: &str) -> Result<bool, StoreError> {
        let hash = auth::hash_api_key(key);
        if self.inner.env_key_hashes.contains(&hash) {
            return Ok(true);
        }
        self.inner.store.api_key_hash_exists(&hash).await
    }
}

/// Generates a build ID in UUID form. The SDK parses `buildID` in template build listings
/// as a UUID, so template builds should use IDs from this function.
pub fn new_build_id() -> BuildId {
    BuildId::parse(&uuid::Uuid::new_v4().to_string()).expect("a UUID is a valid build ID")
}

/// Opens the store in `data_dir` and creates an API key in it, for CLI commands that run
/// beside or without a server. The returned key is shown once and only its hash is stored.
pub async fn create_api_key(data_dir: &Path, name: &str) -> Result<CreatedApiKey, StoreError> {
    let store = Store::open(data_dir).await?;
    let created = store.create_api_key(name).await;
    store.close().await;
    created
}
