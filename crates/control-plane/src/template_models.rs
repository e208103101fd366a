//! REST bodies and query strings of the template build, file upload and tag routes, with
//! the JSON names of the e2b 2.63.0 Python SDK (`e2b/api/client/models`), and the bodies of
//! Hearth's own Dockerfile build routes.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

/// Body of `POST /v3/templates`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateBuildRequestV3 {
    /// Template name, optionally with a tag: `name` or `name:tag`.
    pub name: Option<String>,
    /// Tags the build gets when it is ready. Without these and a tag in the name, it gets `default`.
    pub tags: Option<Vec<String>>,
    /// Deprecated spelling of `name`.
    pub alias: Option<String>,
    /// Accepted and ignored: a Hearth server has a single team.
    #[serde(rename = "teamID")]
    pub team_id: Option<String>,
    /// Virtual CPUs of the template's sandboxes.
    #[serde(rename = "cpuCount")]
    pub cpu_count: Option<i64>,
    /// Guest memory of the template's sandboxes, in MiB.
    #[serde(rename = "memoryMB")]
    pub memory_mb: Option<i64>,
    /// Free disk space requested after the build steps, in MiB.
    #[serde(rename = "minFreeDiskMb")]
    pub min_free_disk_mb: Option<i64>,
}

/// Response of `POST /v3/templates` and of Hearth's `POST /templates`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateRequestResponseV3 {
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Build to upload files for and start, a UUID.
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub public: bool,
    pub names: Vec<String>,
    /// Tags the build gets when it is ready.
    pub tags: Vec<String>,
    pub aliases: Vec<String>,
}

/// Body of `POST /v2/templates/{templateID}/builds/{buildID}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateBuildStartV2 {
    /// OCI image to start from; `e2bdev/base` (any tag) means Hearth's `base` template.
    #[serde(rename = "fromImage")]
    pub from_image: Option<String>,
    /// Template to start from: an ID, an alias or `name:tag`.
    #[serde(rename = "fromTemplate")]
    pub from_template: Option<String>,
    /// Registry credentials of `fromImage`; only `type: registry` is supported.
    #[serde(rename = "fromImageRegistry")]
    #[schema(value_type = Option<Object>)]
    pub from_image_registry: Option<Value>,
    /// Ignore every cached step result.
    pub force: Option<bool>,
    pub steps: Option<Vec<TemplateStep>>,
    /// Command started before the snapshot; it keeps running in every sandbox.
    #[serde(rename = "startCmd")]
    pub start_cmd: Option<String>,
    /// Command that must exit 0 before the snapshot is taken.
    #[serde(rename = "readyCmd")]
    pub ready_cmd: Option<String>,
}

/// One build step.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateStep {
    /// `RUN`, `COPY`, `ENV`, `WORKDIR` or `USER`.
    #[serde(rename = "type")]
    pub kind: String,
    pub args: Option<Vec<String>>,
    /// For `COPY`: hash of the uploaded archive, as in `GET /templates/{templateID}/files/{hash}`.
    #[serde(rename = "filesHash")]
    pub files_hash: Option<String>,
    /// Run this step and the ones after it even when a cached result exists.
    pub force: Option<bool>,
    /// Sent by the SDK for `COPY` steps; the upload already happened, so it is ignored here.
    #[serde(rename = "forceUpload")]
    pub force_upload: Option<bool>,
}

/// Response of `GET /templates/{templateID}/files/{hash}` (status 201).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateBuildFileUpload {
    /// Whether a file with this hash was uploaded already.
    pub present: bool,
    /// Where to `PUT` the archive; no API key needed, the URL carries a token.
    pub url: Option<String>,
}

/// A build log line.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BuildLogEntry {
    pub timestamp: DateTime<Utc>,
    pub message: String,
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    /// Step the line belongs to: `base`, a step number counted from 1, or `finalize`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// Why a build failed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BuildStatusReason {
    pub message: String,
    /// The failed step: `base`, a step number counted from 1, or `finalize`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The last log lines of the build.
    #[serde(rename = "logEntries")]
    pub log_entries: Vec<BuildLogEntry>,
}

/// Response of `GET /templates/{templateID}/builds/{buildID}/status`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateBuildInfo {
    /// Always empty; the lines are in `logEntries`.
    pub logs: Vec<String>,
    /// At most 100 lines, from `logsOffset` on.
    #[serde(rename = "logEntries")]
    pub log_entries: Vec<BuildLogEntry>,
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// `waiting`, `building`, `ready` or `error`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<BuildStatusReason>,
}

/// Query of `GET /templates/{templateID}/builds/{buildID}/status`.
#[derive(Debug, Deserialize, IntoParams)]
pub struct BuildStatusQuery {
    /// Number of log lines (at `level` or above) to skip.
    #[serde(rename = "logsOffset")]
    pub logs_offset: Option<i64>,
    /// Maximum number of log lines, at most 100.
    pub limit: Option<i64>,
    /// Lowest level of the returned lines: `debug`, `info`, `warn` or `error`.
    pub level: Option<String>,
}

/// Response of `GET /templates/{templateID}/builds/{buildID}/logs`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateBuildLogsResponse {
    pub logs: Vec<BuildLogEntry>,
}

/// Query of `GET /templates/{templateID}/builds/{buildID}/logs`.
#[derive(Debug, Deserialize, IntoParams)]
pub struct BuildLogsQuery {
    /// Time in milliseconds since the Unix epoch to start from.
    pub cursor: Option<i64>,
    /// Maximum number of lines, at most 100.
    pub limit: Option<i64>,
    /// `forward` (oldest first, from `cursor`) or `backward` (newest first, up to `cursor`).
    pub direction: Option<String>,
    /// Lowest level of the returned lines.
    pub level: Option<String>,
    /// `persistent` or `temporary`; Hearth stores every line, so both return the same.
    pub source: Option<String>,
}

/// Body of Hearth's `POST /templates` and `POST /templates/{templateID}`: a build from a
/// whole Dockerfile.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DockerfileBuildRequest {
    /// Template name; required by `POST /templates` unless `name` is set.
    pub alias: Option<String>,
    /// Template name, optionally `name:tag`.
    pub name: Option<String>,
    /// The Dockerfile text.
    pub dockerfile: String,
    #[serde(rename = "startCmd")]
    pub start_cmd: Option<String>,
    #[serde(rename = "readyCmd")]
    pub ready_cmd: Option<String>,
    #[serde(rename = "cpuCount")]
    pub cpu_count: Option<i64>,
    /// Guest memory in MiB.
    #[serde(rename = "memoryMB")]
    pub memory_mb: Option<i64>,
}

/// Optional body of Hearth's `POST /templates/{templateID}/builds/{buildID}`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DockerfileBuildStart {
    /// Hash of an uploaded tar archive of the build context.
    #[serde(rename = "contextHash")]
    pub context_hash: Option<String>,
    /// Run every step again instead of using cached results.
    pub force: Option<bool>,
}

/// Body of `PATCH /templates/{templateID}` and `PATCH /v2/templates/{templateID}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateUpdateRequest {
    pub public: Option<bool>,
}

/// Response of the template update routes.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateUpdateResponse {
    pub names: Vec<String>,
}

/// Body of `POST /templates/tags`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignTemplateTagsRequest {
    /// Build to tag, as `name:tag` (or `name` for the current build).
    pub target: String,
    pub tags: Vec<String>,
}

/// Response of `POST /templates/tags` (status 201).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AssignedTemplateTags {
    pub tags: Vec<String>,
    #[serde(rename = "buildID")]
    pub build_id: String,
}

/// Body of `DELETE /templates/tags`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteTemplateTagsRequest {
    /// Template ID or name.
    pub name: String,
    pub tags: Vec<String>,
}

/// One tag of a template.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateTag {
    pub tag: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// When the tag was last assigned.
    #[serde(rename = "createdAt")]
    pub created_at: DateTime<Utc>,
}

/// Response of `GET /templates/{templateID}/tags/count`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateTagsCountResponse {
    pub total: i64,
}

/// Query of `GET /templates/{templateID}/tags/exists`.
#[derive(Debug, Deserialize, IntoParams)]
pub struct TagExistsQuery {
    pub tag: String,
}

/// Response of `GET /templates/{templateID}/tags/exists`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateTagExistsResponse {
    pub exists: bool,
    /// The tag as stored: trimmed and in lowercase.
    #[serde(rename = "normalizedTag")]
    pub normalized_tag: String,
}

/// One assignment of a tag to a build.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateTagAssignment {
    #[serde(rename = "assignmentId")]
    pub assignment_id: String,
    #[serde(rename = "buildId")]
    pub build_id: String,
    #[serde(rename = "assignedAt")]
    pub assigned_at: DateTime<Utc>,
    #[serde(rename = "buildCreatedAt")]
    pub build_created_at: DateTime<Utc>,
    #[serde(rename = "buildFinishedAt")]
    pub build_finished_at: Option<DateTime<Utc>>,
}

/// Response of `GET /templates/{templateID}/tags/{tag}/assignments`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateTagAssignmentsResponse {
    pub data: Vec<TemplateTagAssignment>,
    /// Cursor of the next page, or null on the last page.
    #[serde(rename = "nextCursor")]
    pub next_cursor: Option<String>,
}

/// Query of `GET /templates/{templateID}/tags/{tag}/assignments`.
#[derive(Debug, Deserialize, IntoParams)]
pub struct AssignmentsQuery {
    pub cursor: Option<String>,
    pub limit: Option<i64>,
}

/// A tag with its latest assignments.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateTagGroup {
    pub tag: String,
    /// Newest first.
    pub assignments: Vec<TemplateTagAssignment>,
    /// Whether the tag has more assignments than listed.
    #[serde(rename = "hasMore")]
    pub has_more: bool,
}

/// Response of `GET /templates/{templateID}/tags/groups`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TemplateTagGroupsResponse {
    pub tags: Vec<TemplateTagGroup>,
    #[serde(rename = "nextCursor")]
    pub next_cursor: Option<String>,
}

/// Query of `GET /templates/{templateID}/tags/groups`.
#[derive(Debug, Deserialize, IntoParams)]
pub struct TagGroupsQuery {
    /// Assignments listed per tag (default 6).
    #[serde(rename = "assignmentLimit")]
    pub assignment_limit: Option<i64>,
    /// Tags per page (default 25).
    #[serde(rename = "tagsLimit")]
    pub tags_limit: Option<i64>,
    #[serde(rename = "tagsCursor")]
    pub tags_cursor: Option<String>,
    /// Substring the tag must contain.
    pub search: Option<String>,
    /// `latest_desc` (default), `latest_asc`, `name_asc` or `name_desc`.
    pub sort: Option<String>,
}

/// Query of the paged template routes (`GET /v2/templates`, `GET /templates/{templateID}`).
#[derive(Debug, Deserialize, IntoParams)]
pub struct PageQuery {
    #[serde(rename = "nextToken")]
    pub next_token: Option<String>,
    pub limit: Option<i64>,
}

/// Query of the file upload route.
#[derive(Debug, Deserialize, IntoParams)]
pub struct UploadQuery {
    /// Token from the URL that `GET /templates/{templateID}/files/{hash}` returned.
    pub token: String,
}
