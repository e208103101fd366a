//! The boundary between the control plane and whatever turns a build request into a
//! template: the template API records builds and their logs, a [`TemplateBuilder`] does the
//! work.
//!
//! `hearth serve` wires the node agent's builder in process.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use hearth_types::{BuildId, TemplateId};

/// Prefix of a `fromImage` that names an image archive uploaded through the files route
/// (`hearth-archive:<hash>`): a `docker save` archive or an OCI image layout packed as a
/// tar. Hearth's own extension; `hearth template build --image-archive` sends it.
pub const ARCHIVE_IMAGE_PREFIX: &str = "hearth-archive:";

/// Source of a build's root filesystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BuildSource {
    /// An image in an OCI registry (`fromImage`), with optional registry credentials
    /// (`fromImageRegistry` of type `registry`), or an uploaded image archive named with
    /// [`ARCHIVE_IMAGE_PREFIX`].
    Image {
        reference: String,
        credentials: Option<RegistryCredentials>,
    },
    /// A ready build of another template (`fromTemplate`, or `fromImage: "e2bdev/base"`,
    /// which resolves to Hearth's base template).
    Template {
        template_id: TemplateId,
        build_id: BuildId,
    },
    /// A whole Dockerfile (the older flow). `context_hash` names an uploaded build context
    /// (a tar archive stored under [`BuildSpec::files_dir`]), if any.
    Dockerfile {
        text: String,
        context_hash: Option<String>,
    },
}

/// User name and password of a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// One step as the SDK's template builder sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildStepSpec {
    /// `RUN`, `COPY`, `ENV`, `WORKDIR` or `USER`.
    pub kind: String,
    /// The step's arguments, as the SDK sends them.
    pub args: Vec<String>,
    /// For `COPY`: hash of the uploaded archive under [`BuildSpec::files_dir`].
    pub files_hash: Option<String>,
    /// Run this step (and the ones after it) even when a cached result exists.
    pub force: bool,
}

/// Everything a builder needs for one build.
#[derive(Clone, Debug)]
pub struct BuildSpec {
    pub template_id: TemplateId,
    pub build_id: BuildId,
    pub source: BuildSource,
    pub steps: Vec<BuildStepSpec>,
    /// Command started in the template VM before the snapshot; it keeps running in every
    /// sandbox.
    pub start_cmd: Option<String>,
    /// Command that must exit 0 before the snapshot is taken.
    pub ready_cmd: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Ignore every cached step result.
    pub force: bool,
    /// Directory of uploaded files: `<files_dir>/<hash>` is the archive a `COPY` step or a
    /// Dockerfile context names by hash.
    pub files_dir: PathBuf,
    /// The ready build of Hearth's base template: the build VM boots its kernel and
    /// initramfs, and a Dockerfile's `FROM e2bdev/base` starts from it.
    pub base_template: Option<(TemplateId, BuildId)>,
}

/// Level of a build log line, as the SDK's `LogEntry.level` expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// Receives a build's log lines as they happen. The control plane stores them so that
/// the status and logs endpoints can page through them.
pub trait BuildLog: Send + Sync {
    /// Appends one line. `step` names the step it belongs to (`"base"`, a step number
    /// counted from 1, or `"finalize"`), when known.
    fn append(&self, level: LogLevel, step: Option<&str>, message: &str);
}

/// What a finished build produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildOutput {
    pub envd_version: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mb: u64,
}

/// Reason a build failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BuildFailure {
    /// What failed, for the user: the step, its command and the end of its output.
    pub message: String,
    /// The failed step: `"base"`, a step number counted from 1, or `"finalize"`.
    pub step: Option<String>,
}

/// Builds templates. A build either writes a complete, verified template build directory
/// and returns [`BuildOutput`], or leaves nothing behind and returns a [`BuildFailure`].
#[async_trait]
pub trait TemplateBuilder: Send + Sync {
    async fn build(&self, spec: BuildSpec, log: Arc<dyn BuildLog>) -> Result<BuildOutput, BuildFailure>;
}
