//! REST request and response bodies, with the JSON field names of the E2B API as the
//! e2b 2.63.0 Python SDK sends and parses them (`e2b/api/client/models`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

/// Body of `POST /sandboxes` and `POST /v2/sandboxes`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSandbox {
    /// Template ID or alias, such as `base`.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Seconds until the sandbox is killed; defaults to 15 on `/sandboxes` and 300 on `/v2/sandboxes`.
    pub timeout: Option<i64>,
    /// Accepted for compatibility. Hearth cannot pause yet, so a timeout always kills.
    #[serde(rename = "autoPause")]
    pub auto_pause: Option<bool>,
    /// Snapshot kind of an automatic pause; only meaningful with `autoPause`.
    #[serde(rename = "autoPauseMemory")]
    pub auto_pause_memory: Option<bool>,
    /// Auto-resume configuration; `enabled: true` is rejected because pausing is not implemented.
    #[serde(rename = "autoResume")]
    #[schema(value_type = Option<Object>)]
    pub auto_resume: Option<Value>,
    /// Ignored by `/v2/sandboxes`, which always issues an envd access token.
    pub secure: Option<bool>,
    /// False denies all outbound traffic from the sandbox.
    pub allow_internet_access: Option<bool>,
    /// Network settings: `allowOut`, `denyOut`, `dnsServers` and `allowPublicTraffic`.
    #[schema(value_type = Option<Object>)]
    pub network: Option<Value>,
    /// String key/value pairs to tag the sandbox with, for filtering lists.
    #[schema(value_type = Option<BTreeMap<String, String>>)]
    pub metadata: Option<Value>,
    /// Environment variables for every process in the sandbox.
    #[serde(rename = "envVars")]
    #[schema(value_type = Option<BTreeMap<String, String>>)]
    pub env_vars: Option<Value>,
    /// MCP gateway configuration; must be null or absent (not supported).
    #[schema(value_type = Option<Object>)]
    pub mcp: Option<Value>,
    /// Workload identity configuration; must be empty or absent (not supported).
    #[schema(value_type = Option<Object>)]
    pub iam: Option<Value>,
    /// Volume mounts; must be empty or absent (not supported).
    #[serde(rename = "volumeMounts")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub volume_mounts: Option<Vec<Value>>,
}

/// A created or connected sandbox (the SDK's `Sandbox` model).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// Template alias the request named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(rename = "clientID")]
    pub client_id: String,
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    /// Token envd requires in `X-Access-Token`.
    #[serde(rename = "envdAccessToken", skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    /// Token the proxy requires on the sandbox's ports when `allowPublicTraffic` is false.
    #[serde(rename = "trafficAccessToken")]
    pub traffic_access_token: Option<String>,
    /// Domain under which `<port>-<sandboxID>.<domain>` reaches the sandbox; null lets the
    /// SDK use its own `E2B_DOMAIN`.
    pub domain: Option<String>,
}

/// Lifecycle policy of a sandbox.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SandboxLifecycle {
    #[serde(rename = "autoResume")]
    pub auto_resume: bool,
    /// `kill` or `pause`; Hearth always kills.
    #[serde(rename = "onTimeout")]
    pub on_timeout: String,
}

/// Full description of one sandbox (`GET /sandboxes/{sandboxID}`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SandboxDetail {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    #[serde(rename = "startedAt")]
    pub started_at: DateTime<Utc>,
    #[serde(rename = "endAt")]
    pub end_at: DateTime<Utc>,
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    #[serde(rename = "envdAccessToken", skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    #[serde(rename = "allowInternetAccess")]
    pub allow_internet_access: Option<bool>,
    /// Network settings in force: `allowOut`, `denyOut`, `dnsServers`, `allowPublicTraffic`.
    #[schema(value_type = Object)]
    pub network: crate::network::NetworkSettings,
    pub domain: Option<String>,
    #[serde(rename = "cpuCount")]
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u32,
    pub metadata: BTreeMap<String, String>,
    /// `running` or `paused`.
    pub state: String,
    pub lifecycle: SandboxLifecycle,
}

/// One entry of a sandbox list.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ListedSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    #[serde(rename = "startedAt")]
    pub started_at: DateTime<Utc>,
    #[serde(rename = "endAt")]
    pub end_at: DateTime<Utc>,
    #[serde(rename = "cpuCount")]
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u32,
    pub metadata: BTreeMap<String, String>,
    /// `running` or `paused`.
    pub state: String,
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
}

/// Query of `GET /sandboxes`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListSandboxesQuery {
    /// Metadata filter: URL-encoded `key=value` pairs joined by `&`, each key and value
    /// percent-encoded once more (as the SDK sends it).
    pub metadata: Option<String>,
}

/// Query of `GET /v2/sandboxes`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListSandboxesV2Query {
    /// Metadata filter, encoded as for `GET /sandboxes`.
    pub metadata: Option<String>,
    /// Comma-separated states: `running`, `paused`. Defaults to both.
    pub state: Option<String>,
    /// `asc` or `desc` by start time; defaults to `desc` (newest first).
    pub order: Option<String>,
    /// RFC 3339 time; only sandboxes started at or after it.
    #[serde(rename = "startedAfter")]
    pub started_after: Option<String>,
    /// Template ID or alias.
    pub template: Option<String>,
    /// Token from the previous page's `x-next-token` header.
    #[serde(rename = "nextToken")]
    pub next_token: Option<String>,
    /// Page size, 1 to 100; defaults to 100.
    pub limit: Option<String>,
}

/// Body of `POST /sandboxes/{sandboxID}/timeout`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxTimeoutRequest {
    /// Seconds from now after which the sandbox is killed.
    pub timeout: i64,
}

/// Body of `POST /sandboxes/{sandboxID}/refreshes`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxRefreshRequest {
    /// Seconds to keep the sandbox alive from now; defaults to 15. Never shortens the timeout.
    pub duration: Option<i64>,
}

/// Body of `POST /sandboxes/{sandboxID}/connect` and `POST /v2/sandboxes/{sandboxID}/connect`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectSandbox {
    /// Seconds from now the sandbox must stay alive at least; defaults to 300.
    /// Connecting never shortens a longer timeout.
    pub timeout: Option<i64>,
    /// Resume with memory (only meaningful for a paused sandbox).
    pub memory: Option<bool>,
}

/// A template (`GET /templates`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Template {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    #[serde(rename = "cpuCount")]
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u32,
    pub public: bool,
    pub aliases: Vec<String>,
    pub names: Vec<String>,
    #[serde(rename = "createdAt")]
    pub created_at: DateTime<Utc>,
    #[serde(rename = "updatedAt")]
    pub updated_at: DateTime<Utc>,
    /// Always null: Hearth has no user accounts.
    #[serde(rename = "createdBy")]
    #[schema(value_type = Option<Object>)]
    pub created_by: Option<Value>,
    #[serde(rename = "lastSpawnedAt")]
    pub last_spawned_at: Option<DateTime<Utc>>,
    #[serde(rename = "spawnCount")]
    pub spawn_count: i64,
    #[serde(rename = "buildCount")]
    pub build_count: i64,
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    /// `waiting`, `building`, `ready` or `error`.
    #[serde(rename = "buildStatus")]
    pub build_status: String,
}

/// One build of a template.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateBuild {
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub status: String,
    #[serde(rename = "createdAt")]
    pub created_at: DateTime<Utc>,
    #[serde(rename = "updatedAt")]
    pub updated_at: DateTime<Utc>,
    #[serde(rename = "finishedAt", skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(rename = "cpuCount")]
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u32,
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
}

/// A template with its builds (`GET /templates/{templateID}`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateWithBuilds {
    #[serde(flatten)]
    pub template: Template,
    pub builds: Vec<TemplateBuild>,
}

/// Response of `GET /templates/aliases/{alias}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateAliasResponse {
    #[serde(rename = "templateID")]
    pub template_id: String,
    pub public: bool,
}

/// Body of `POST /sandboxes/{sandboxID}/pause`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxPauseRequest {
    /// Keep the memory (true, the default); false would keep the filesystem only, which
    /// Hearth does not offer.
    pub memory: Option<bool>,
    /// Reject the pause when envd does not respond.
    #[serde(rename = "requireHealthyGuest")]
    pub require_healthy_guest: Option<bool>,
}

/// Body of `POST /sandboxes/{sandboxID}/resume`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumedSandbox {
    /// Seconds the resumed sandbox lives; defaults to 15.
    pub timeout: Option<i64>,
    /// Pause instead of kill at the timeout.
    #[serde(rename = "autoPause")]
    pub auto_pause: Option<bool>,
    /// Resume with memory (true, the default).
    pub memory: Option<bool>,
}

/// Body of `POST /sandboxes/{sandboxID}/fork`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxForkRequest {
    /// Seconds each fork lives; defaults to 15.
    pub timeout: Option<i64>,
    /// Number of forks, 1 to 20; defaults to 1.
    pub count: Option<i64>,
}

/// One fork's outcome: a sandbox or an error.
#[derive(Debug, Serialize, ToSchema)]
pub struct SandboxForkResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<CreatedSandbox>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<crate::error::ErrorBody>,
}

/// Body of `POST /sandboxes/{sandboxID}/snapshots`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxSnapshotRequest {
    /// Name of the snapshot, usable as a template alias.
    pub name: Option<String>,
    /// Keep the memory (true, the default).
    pub memory: Option<bool>,
}

/// A snapshot (`POST /sandboxes/{sandboxID}/snapshots`, `GET /snapshots`).
#[derive(Debug, Serialize, ToSchema)]
pub struct SnapshotInfo {
    /// Template ID to pass as `templateID` when creating a sandbox from the snapshot.
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    /// Names of the snapshot (its aliases).
    pub names: Vec<String>,
}

/// Query of `GET /snapshots`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct ListSnapshotsQuery {
    #[serde(rename = "sandboxID")]
    pub sandbox_id: Option<String>,
    pub name: Option<String>,
    pub limit: Option<String>,
    #[serde(rename = "nextToken")]
    pub next_token: Option<String>,
}
