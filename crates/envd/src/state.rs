//! State shared by every request: what `/init` configured, and the request's user.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use base64::Engine;
use http::HeaderMap;

use crate::filesystem::watch::WatcherRegistry;
use crate::process::ProcessTable;
use crate::users::{lookup_user, User, UserError};

/// Configuration that `/init` sets, and the services' registries.
pub struct AppState {
    config: RwLock<InitConfig>,
    pub processes: Arc<ProcessTable>,
    pub watchers: WatcherRegistry,
}

/// Values from `/init`, with defaults from the command line.
#[derive(Debug, Clone)]
pub struct InitConfig {
    pub env_vars: HashMap<String, String>,
    pub access_token: Option<String>,
    pub default_user: String,
    pub default_workdir: Option<PathBuf>,
}

impl AppState {
    pub fn new(default_user: String) -> Arc<Self> {
        Arc::new(Self {
            config: RwLock::new(InitConfig {
                env_vars: HashMap::new(),
                access_token: None,
                default_user,
                default_workdir: None,
            }),
            processes: Arc::new(ProcessTable::default()),
            watchers: WatcherRegistry::default(),
        })
    }

    /// Returns a copy of the current configuration.
    pub fn config(&self) -> InitConfig {
        self.config.read().unwrap_or_else(|poison| poison.into_inner()).clone()
    }

    /// Applies `update` to the configuration.
    pub fn update_config(&self, update: impl FnOnce(&mut InitConfig)) {
        let mut config = self.config.write().unwrap_or_else(|poison| poison.into_inner());
        update(&mut config);
    }

    /// Resolves the user of a request: the name in `Authorization: Basic base64("name:")`,
    /// as E2B SDKs send it, or the default user when the header is absent or empty.
    pub fn request_user(&self, headers: &HeaderMap) -> Result<User, UserError> {
        let name = username_from_headers(headers).unwrap_or_else(|| self.config().default_user);
        lookup_user(&name)
    }

    /// Returns the user named `name`, or the default user when `name` is empty.
    pub fn named_user(&self, name: Option<&str>) -> Result<User, UserError> {
        match name.filter(|name| !name.is_empty()) {
            Some(name) => lookup_user(name),
            None => lookup_user(&self.config().default_user),
        }
    }

    /// Returns the directory where a user's commands start by default: the workdir from
    /// `/init` when set, otherwise the user's home, or `/` when the home does not exist
    /// (as for `nobody`, whose home is `/nonexistent`).
    pub fn default_cwd(&self, user: &User) -> PathBuf {
        let cwd = self
            .config()
            .default_workdir
            .unwrap_or_else(|| user.home.clone());
        if cwd.is_dir() {
            cwd
        } else {
            PathBuf::from("/")
        }
    }
}

fn username_from_headers(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?.trim();
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let name = text.split(':').next().unwrap_or_default();
    (!name.is_empty()).then(|| name.to_string())
}

/// Resolves a request path: `~` and `~/…` expand to the home directory, relative paths
/// are relative to it, and `.` and `..` components are removed lexically.
pub fn resolve_path(path: &str, home: &Path) -> PathBuf {
    let joined = if path == "~" {
        home.to_path_buf()
    } else if let Some(rest) = path.strip_prefix("~/") {
        home.join(rest)
    } else if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        home.join(path)
    };
    normalize(&joined)
}

fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut normalized = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::Normal(part) => normalized.push(part),
            Component::ParentDir => {
                normalized.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    normalized
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_path_relative_to_home() {
        let home = Path::new("/home/user");
        assert_eq!(resolve_path("a/b", home), PathBuf::from("/home/user/a/b"));
        assert_eq!(resolve_path("~/x", home), PathBuf::from("/home/user/x"));
        assert_eq!(resolve_path("/tmp/../etc", home), PathBuf::from("/etc"));
        assert_eq!(resolve_path("", home), PathBuf::from("/home/user"));
    }

    #[test]
    fn username_from_basic_header() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Basic cm9vdDo=".parse().unwrap());
        assert_eq!(username_from_headers(&headers).as_deref(), Some("root"));
        headers.insert("authorization", "Basic Og==".parse().unwrap());
        assert_eq!(username_from_headers(&headers), None);
    }
}
