//! Template builds through the API: requests, validation of the start request, the
//! background task that runs the [`TemplateBuilder`], and the build log it writes.
//!
//! A build request (`POST /v3/templates`, or `POST /templates` with a Dockerfile) records
//! the build as `waiting`. The client then uploads files and starts it, which marks it
//! `building` and spawns the builder. It becomes `ready` only after the builder returned
//! `Ok`, and only then does the template's current build move to it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use hearth_types::{BuildId, TemplateId};
use tokio::sync::{mpsc, oneshot};

use crate::builds::{
    BuildFailure, BuildLog, BuildSource, BuildSpec, BuildStepSpec, LogLevel, RegistryCredentials, TemplateBuilder,
};
use crate::error::ApiError;
use crate::store::{
    BuildLogLine, BuildRequestRecord, BuildStartRecord, BuildStatus, NewBuild, Store, StoreError, TemplateRecord,
    DEFAULT_TAG,
};
use crate::template_models::{
    BuildLogEntry, BuildLogsQuery, BuildStatusQuery, BuildStatusReason, DockerfileBuildRequest, DockerfileBuildStart,
    TemplateBuildInfo, TemplateBuildLogsResponse, TemplateBuildRequestV3, TemplateBuildStartV2,
    TemplateRequestResponseV3, TemplateStep,
};
use crate::template_names::{self, NameAndTag};
use crate::ControlPlane;

/// Reason given to builds that were running when the server stopped.
pub const INTERRUPTED_BUILD_REASON: &str = "the server stopped during the build";

/// Alias of the template that `fromImage: "e2bdev/base"` resolves to.
pub const BASE_TEMPLATE_ALIAS: &str = "base";

/// Image name the SDK's `from_base_image()` sends.
const E2B_BASE_IMAGE: &str = "e2bdev/base";

/// Maximum number of log lines per status response, as the SDK expects.
const MAX_LOG_PAGE: i64 = 100;

/// Maximum log lines stored per build. Later lines are counted and dropped.
const MAX_LOG_LINES: u64 = 100_000;

/// Longest stored log line in bytes. Longer lines are cut.
const MAX_LOG_LINE_BYTES: usize = 16 * 1024;

/// Log lines included in the reason of a failed build.
const REASON_LOG_LINES: u32 = 20;

/// Longest accepted Dockerfile, start command or ready command, in bytes.
const MAX_TEXT_BYTES: usize = 1024 * 1024;

/// Longest accepted image reference, in bytes.
const MAX_IMAGE_REF_BYTES: usize = 1024;

/// Target template of a requested build.
enum BuildTarget {
    /// A template by name: a new template unless one has this name.
    Name(NameAndTag),
    /// An existing template, by ID or alias.
    Existing(String),
}

/// A validated build request.
struct BuildRequest {
    target: BuildTarget,
    tags: Vec<String>,
    vcpus: u32,
    memory_mib: u32,
    min_free_disk_mb: Option<u64>,
    dockerfile: Option<String>,
    start_cmd: Option<String>,
    ready_cmd: Option<String>,
}

impl ControlPlane {
    /// Returns the template builder, or a 501 when this server has none.
    fn require_builder(&self) -> Result<Arc<dyn TemplateBuilder>, ApiError> {
        self.inner
            .template_builder
            .clone()
            .ok_or_else(|| ApiError::not_implemented("building templates"))
    }

    /// Records a build requested by `POST /v3/templates`.
    pub(crate) async fn request_v3_build(
        &self,
        body: TemplateBuildRequestV3,
    ) -> Result<TemplateRequestResponseV3, ApiError> {
        self.require_builder()?;
        let (field, value) = match (body.name, body.alias) {
            (Some(name), _) => ("name", name),
            (None, Some(alias)) => ("alias", alias),
            (None, None) => return Err(ApiError::bad_request("missing name: the request must name the template")),
        };
        let name = template_names::parse_name_and_tag(field, &value)?;
        let tags = build_tags(name.tag.as_deref(), body.tags.unwrap_or_default())?;
        let min_free_disk_mb = body
            .min_free_disk_mb
            .map(|mb| {
                template_names::size_in_range("minFreeDiskMb", Some(mb), template_names::MIN_FREE_DISK_MB_RANGE, 0)
            })
            .transpose()?
            .map(u64::from);
        let request = BuildRequest {
            target: BuildTarget::Name(name),
            tags,
            vcpus: cpu_count(body.cpu_count)?,
            memory_mib: memory_mib(body.memory_mb)?,
            min_free_disk_mb,
            dockerfile: None,
            start_cmd: None,
            ready_cmd: None,
        };
        self.request_build(request).await
    }

    /// Records a Dockerfile build: of a new or named template (`POST /templates`, with
    /// `existing` unset) or of an existing one (`POST /templates/{templateID}`).
    pub(crate) async fn request_dockerfile_build(
        &self,
        existing: Option<&str>,
        body: DockerfileBuildRequest,
    ) -> Result<TemplateRequestResponseV3, ApiError> {
        self.require_builder()?;
        let name = match (body.name, body.alias) {
            (Some(name), _) => Some(template_names::parse_name_and_tag("name", &name)?),
            (None, Some(alias)) => Some(template_names::parse_name_and_tag("alias", &alias)?),
            (None, None) => None,
        };
        let tags = build_tags(name.as_ref().and_then(|n| n.tag.as_deref()), Vec::new())?;
        let target = match (existing, name) {
            (Some(reference), _) => BuildTarget::Existing(reference.to_owned()),
            (None, Some(name)) => BuildTarget::Name(name),
            (None, None) => {
                return Err(ApiError::bad_request("missing alias: the request must name the template (alias or name)"))
            }
        };
        if body.dockerfile.trim().is_empty() {
            return Err(ApiError::bad_request("invalid dockerfile: it is empty"));
        }
        check_text("dockerfile", &body.dockerfile)?;
        let request = BuildRequest {
            target,
            tags,
            vcpus: cpu_count(body.cpu_count)?,
            memory_mib: memory_mib(body.memory_mb)?,
            min_free_disk_mb: None,
            dockerfile: Some(body.dockerfile),
            start_cmd: checked_command("startCmd", body.start_cmd)?,
            ready_cmd: checked_command("readyCmd", body.ready_cmd)?,
        };
        self.request_build(request).await
    }

    async fn request_build(&self, request: BuildRequest) -> Result<TemplateRequestResponseV3, ApiError> {
        let (template_id, new_alias) = match &request.target {
            BuildTarget::Name(name) => match self.store().find_template(&name.name).await? {
                Some(template) => {
                    self.reject_snapshot(&template, &name.name).await?;
                    (template.template_id, None)
                }
                None => (TemplateId::generate(), Some(name.name.clone())),
            },
            BuildTarget::Existing(reference) => {
                let template = self.find_template_or_404(reference).await?;
                self.reject_snapshot(&template, reference).await?;
                (template.template_id, None)
            }
        };

        let build = NewBuild {
            template_id: template_id.clone(),
            build_id: crate::new_build_id(),
            tags: request.tags.clone(),
            vcpus: request.vcpus,
            memory_mib: request.memory_mib,
            min_free_disk_mb: request.min_free_disk_mb,
            dockerfile: request.dockerfile,
            start_cmd: request.start_cmd,
            ready_cmd: request.ready_cmd,
        };
        // NOTE: two concurrent requests for the same new name race on the alias; the
        // loser fails with a database error (500) and can retry.
        self.store().insert_build(&build, new_alias.as_deref()).await?;
        tracing::info!(
            template_id = %template_id,
            build_id = %build.build_id,
            new_template = new_alias.is_some(),
            tags = ?build.tags,
            "template build requested"
        );

        let template = self.find_template_or_404(template_id.as_str()).await?;
        Ok(TemplateRequestResponseV3 {
            template_id: template_id.to_string(),
            build_id: build.build_id.to_string(),
            public: template.public,
            names: template.aliases.clone(),
            tags: build.tags,
            aliases: template.aliases,
        })
    }

    /// Starts a build requested by `POST /v3/templates` with the SDK's steps.
    pub(crate) async fn start_v2_build(
        &self,
        template: &str,
        build_id: &str,
        body: TemplateBuildStartV2,
    ) -> Result<(), ApiError> {
        let builder = self.require_builder()?;
        let build = self.waiting_build(template, build_id).await?;
        if build.dockerfile.is_some() {
            return Err(ApiError::bad_request(format!(
                "build {build_id} was requested with a Dockerfile: start it with POST /templates/{}/builds/{build_id}",
                build.template_id
            )));
        }

        let source = match (body.from_image, body.from_template) {
            (Some(image), None) => self.image_source(&image, body.from_image_registry.as_ref()).await?,
            (None, Some(template)) => {
                if body.from_image_registry.is_some() {
                    return Err(ApiError::bad_request(
                        "invalid fromImageRegistry: registry credentials apply only to fromImage",
                    ));
                }
                self.template_source("fromTemplate", &template).await?
            }
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request("set either fromImage or fromTemplate, not both"));
            }
            (None, None) => {
                return Err(ApiError::bad_request("missing fromImage or fromTemplate: a build needs a base"));
            }
        };
        let steps = self.checked_steps(body.steps.unwrap_or_default())?;
        let start = BuildStartRecord {
            start_cmd: checked_command("startCmd", body.start_cmd)?,
            ready_cmd: checked_command("readyCmd", body.ready_cmd)?,
        };
        self.launch_build(builder, build, source, steps, start, body.force.unwrap_or(false))
            .await
    }

    /// Starts a build requested with a Dockerfile, with an optional uploaded context.
    pub(crate) async fn start_dockerfile_build(
        &self,
        template: &str,
        build_id: &str,
        body: DockerfileBuildStart,
    ) -> Result<(), ApiError> {
        let builder = self.require_builder()?;
        let build = self.waiting_build(template, build_id).await?;
        let Some(dockerfile) = build.dockerfile.clone() else {
            return Err(ApiError::bad_request(format!(
                "build {build_id} was requested without a Dockerfile: start it with POST /v2/templates/{}/builds/{build_id}",
                build.template_id
            )));
        };
        if let Some(hash) = &body.context_hash {
            template_names::check_hash("contextHash", hash)?;
            if !self.files().is_present(hash) {
                return Err(ApiError::bad_request(format!(
                    "invalid contextHash {hash:?}: no file with this hash was uploaded; upload it through \
                     GET /templates/{}/files/{hash} first",
                    build.template_id
                )));
            }
        }
        let force = body.force.unwrap_or(false);
        let source = BuildSource::Dockerfile { text: dockerfile, context_hash: body.context_hash };
        let start = BuildStartRecord { start_cmd: build.start_cmd.clone(), ready_cmd: build.ready_cmd.clone() };
        self.launch_build(builder, build, source, Vec::new(), start, force).await
    }

    /// Returns the build, which must be `waiting`: 404 when it does not exist, 409 when it
    /// was started already.
    async fn waiting_build(&self, template: &str, build_id: &str) -> Result<BuildRequestRecord, ApiError> {
        let build = self.find_build(template, build_id).await?;
        if build.status != BuildStatus::Waiting {
            return Err(build_already_started(&build));
        }
        Ok(build)
    }

    /// Returns a build of a template: 404 when either does not exist.
    pub(crate) async fn find_build(&self, template: &str, build_id: &str) -> Result<BuildRequestRecord, ApiError> {
        let record = self.find_template_or_404(template).await?;
        self.store()
            .get_build(&record.template_id, build_id)
            .await?
            .ok_or_else(|| {
                ApiError::not_found(format!("build {build_id:?} of template {template:?} not found"))
            })
    }

    /// Returns a template by ID, alias or `name:tag`, or a 404.
    pub(crate) async fn find_template_or_404(&self, reference: &str) -> Result<TemplateRecord, ApiError> {
        self.store().find_template(reference).await?.ok_or_else(|| {
            ApiError::not_found(format!("template {reference:?} not found: no template has this ID or name"))
        })
    }

    async fn reject_snapshot(&self, template: &TemplateRecord, name: &str) -> Result<(), ApiError> {
        if self.store().is_snapshot(&template.template_id).await? {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("the name {name:?} belongs to snapshot {}; choose another template name", template.template_id),
            ));
        }
        Ok(())
    }

    /// Resolves `fromImage`: `e2bdev/base` means Hearth's base template, anything else is
    /// pulled from its registry.
    async fn image_source(
        &self,
        image: &str,
        registry: Option<&serde_json::Value>,
    ) -> Result<BuildSource, ApiError> {
        let image = image.trim();
        if image.is_empty() || image.len() > MAX_IMAGE_REF_BYTES || image.chars().any(char::is_whitespace) {
            return Err(ApiError::bad_request(format!(
                "invalid fromImage {image:?}: expected an image reference such as \"python:3.12\""
            )));
        }
        if is_e2b_base_image(image) {
            return self.template_source("fromImage", BASE_TEMPLATE_ALIAS).await;
        }
        if let Some(hash) = image.strip_prefix(crate::builds::ARCHIVE_IMAGE_PREFIX) {
            template_names::check_hash("fromImage", hash)?;
            if !self.files().is_present(hash) {
                return Err(ApiError::bad_request(format!(
                    "invalid fromImage {image:?}: no image archive with this hash was uploaded; upload it through \
                     GET /templates/{{templateID}}/files/{hash} first"
                )));
            }
            return Ok(BuildSource::Image { reference: image.to_owned(), credentials: None });
        }
        let credentials = registry.map(registry_credentials).transpose()?.flatten();
        Ok(BuildSource::Image { reference: image.to_owned(), credentials })
    }

    /// Resolves a template reference to its ready build.
    async fn template_source(&self, field: &str, reference: &str) -> Result<BuildSource, ApiError> {
        let template = self.store().find_template(reference).await?.ok_or_else(|| {
            ApiError::bad_request(format!("invalid {field} {reference:?}: no template has this ID, name or tag"))
        })?;
        if template.status != BuildStatus::Ready {
            return Err(ApiError::bad_request(format!(
                "invalid {field} {reference:?}: the template has no ready build (status {})",
                template.status
            )));
        }
        Ok(BuildSource::Template { template_id: template.template_id, build_id: template.build_id })
    }

    /// Checks the steps' kinds, argument counts and uploaded files.
    fn checked_steps(&self, steps: Vec<TemplateStep>) -> Result<Vec<BuildStepSpec>, ApiError> {
        steps
            .into_iter()
            .enumerate()
            .map(|(index, step)| self.checked_step(index + 1, step))
            .collect()
    }

    fn checked_step(&self, number: usize, step: TemplateStep) -> Result<BuildStepSpec, ApiError> {
        let kind = step.kind.to_ascii_uppercase();
        let args = step.args.unwrap_or_default();
        let invalid = |what: String| ApiError::bad_request(format!("invalid step {number} ({kind}): {what}"));
        let count = args.len();
        let count_ok = match kind.as_str() {
            "RUN" => (1..=2).contains(&count),
            "COPY" => (2..=4).contains(&count),
            "ENV" => count >= 2 && count.is_multiple_of(2),
            "WORKDIR" | "USER" => count == 1,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "invalid step {number}: unknown type {:?}; expected RUN, COPY, ENV, WORKDIR or USER",
                    step.kind
                )))
            }
        };
        if !count_ok {
            let expected = match kind.as_str() {
                "RUN" => "a command and an optional user",
                "COPY" => "source, destination and optional user and mode",
                "ENV" => "key/value pairs",
                _ => "exactly one argument",
            };
            return Err(invalid(format!("{count} arguments, expected {expected}")));
        }
        if args.iter().any(|arg| arg.contains('\0')) {
            return Err(invalid("an argument contains a NUL byte".to_owned()));
        }
        if kind == "RUN" && args[0].trim().is_empty() {
            return Err(invalid("the command is empty".to_owned()));
        }
        if kind == "COPY" {
            let Some(hash) = &step.files_hash else {
                return Err(invalid("missing filesHash: a COPY step needs its uploaded files".to_owned()));
            };
            template_names::check_hash("filesHash", hash).map_err(|_| invalid(format!("invalid filesHash {hash:?}")))?;
            if !self.files().is_present(hash) {
                return Err(invalid(format!(
                    "the files with hash {hash} were not uploaded; upload them through GET /templates/{{templateID}}/files/{hash}"
                )));
            }
        }
        Ok(BuildStepSpec { kind, args, files_hash: step.files_hash, force: step.force.unwrap_or(false) })
    }

    /// Marks the build `building` and runs the builder in a background task.
    async fn launch_build(
        &self,
        builder: Arc<dyn TemplateBuilder>,
        build: BuildRequestRecord,
        source: BuildSource,
        steps: Vec<BuildStepSpec>,
        start: BuildStartRecord,
        force: bool,
    ) -> Result<(), ApiError> {
        // NOTE: minFreeDiskMb is stored but BuildSpec has no field for it yet, so the
        // builder does not grow the disk for it.
        let base_template = match self.store().find_template(BASE_TEMPLATE_ALIAS).await? {
            Some(base) if base.status == BuildStatus::Ready => Some((base.template_id, base.build_id)),
            _ => None,
        };
        let spec = BuildSpec {
            template_id: build.template_id.clone(),
            build_id: build.build_id.clone(),
            source,
            steps,
            start_cmd: start.start_cmd.clone(),
            ready_cmd: start.ready_cmd.clone(),
            vcpus: build.vcpus,
            memory_mib: build.memory_mib,
            force,
            files_dir: self.files().dir().to_owned(),
            base_template,
        };
        if !self.store().mark_build_started(&build.build_id, &start).await? {
            return Err(build_already_started(&build));
        }
        tracing::info!(
            template_id = %build.template_id,
            build_id = %build.build_id,
            steps = spec.steps.len(),
            "template build started"
        );
        tokio::spawn(self.clone().run_build(builder, spec));
        Ok(())
    }

    /// Runs the builder and records the outcome once every log line is stored.
    async fn run_build(self, builder: Arc<dyn TemplateBuilder>, spec: BuildSpec) {
        let template_id = spec.template_id.clone();
        let build_id = spec.build_id.clone();
        let log = StoredBuildLog::start(self.store().clone(), build_id.clone());
        let started = Instant::now();

        let builder_log: Arc<dyn BuildLog> = log.clone();
        // The builder runs in its own task so that a panic in it becomes a failed build.
        let outcome = match tokio::spawn(async move { builder.build(spec, builder_log).await }).await {
            Ok(outcome) => outcome,
            Err(err) => Err(BuildFailure {
                message: format!("the template builder stopped unexpectedly: {err}"),
                step: None,
            }),
        };

        let elapsed_ms = started.elapsed().as_millis() as u64;
        let recorded = match &outcome {
            Ok(output) => {
                log.append(LogLevel::Info, None, &format!("Build finished in {:.1} s", elapsed_ms as f64 / 1000.0));
                log.flush().await;
                self.store().finish_build_ready(&template_id, &build_id, output).await
            }
            Err(failure) => {
                log.append(LogLevel::Error, failure.step.as_deref(), &format!("Build failed: {}", failure.message));
                log.flush().await;
                self.store()
                    .finish_build_error(&build_id, &failure.message, failure.step.as_deref())
                    .await
            }
        };

        match (&outcome, recorded) {
            (_, Err(err)) => tracing::error!(
                template_id = %template_id,
                build_id = %build_id,
                error = %crate::error::error_chain(&err),
                "failed to record the end of a template build"
            ),
            (Ok(output), Ok(())) => tracing::info!(
                template_id = %template_id,
                build_id = %build_id,
                elapsed_ms,
                disk_mb = output.disk_mb,
                "template build ready"
            ),
            (Err(failure), Ok(())) => tracing::warn!(
                template_id = %template_id,
                build_id = %build_id,
                elapsed_ms,
                step = ?failure.step,
                reason = %failure.message,
                "template build failed"
            ),
        }
    }

    /// Marks builds that a previous run of the server left `waiting` or `building` as
    /// failed. [`crate::build`] calls it once at start-up.
    pub(crate) async fn recover_builds(&self) -> Result<Vec<BuildId>, StoreError> {
        let failed = self.store().fail_unfinished_builds(INTERRUPTED_BUILD_REASON).await?;
        for build_id in &failed {
            tracing::warn!(build_id = %build_id, reason = INTERRUPTED_BUILD_REASON, "unfinished template build marked failed");
        }
        Ok(failed)
    }

    /// Returns a build's status with a page of its log lines.
    pub(crate) async fn build_status(
        &self,
        template: &str,
        build_id: &str,
        query: BuildStatusQuery,
    ) -> Result<TemplateBuildInfo, ApiError> {
        let offset = match query.logs_offset {
            None => 0,
            Some(offset) if offset >= 0 => offset as u64,
            Some(offset) => {
                return Err(ApiError::bad_request(format!("invalid logsOffset {offset}: must be 0 or more")))
            }
        };
        let limit = page_limit(query.limit)?;
        let level = parse_level(query.level.as_deref())?;
        let build = self.find_build(template, build_id).await?;

        let lines = self
            .store()
            .build_logs_from_offset(&build.build_id, offset, limit, level)
            .await?;
        let reason = if build.status == BuildStatus::Error {
            let last = self.store().last_build_logs(&build.build_id, REASON_LOG_LINES).await?;
            Some(BuildStatusReason {
                message: build.reason.clone().unwrap_or_else(|| "the build failed".to_owned()),
                step: build.reason_step.clone(),
                log_entries: last.into_iter().map(log_entry).collect(),
            })
        } else {
            None
        };
        Ok(TemplateBuildInfo {
            logs: Vec::new(),
            log_entries: lines.into_iter().map(log_entry).collect(),
            template_id: build.template_id.to_string(),
            build_id: build.build_id.to_string(),
            status: build.status.as_str().to_owned(),
            reason,
        })
    }

    /// Returns log lines of a build from a point in time.
    pub(crate) async fn build_logs(
        &self,
        template: &str,
        build_id: &str,
        query: BuildLogsQuery,
    ) -> Result<TemplateBuildLogsResponse, ApiError> {
        let limit = page_limit(query.limit)?;
        let level = parse_level(query.level.as_deref())?;
        let forward = match query.direction.as_deref() {
            None | Some("forward") => true,
            Some("backward") => false,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "invalid direction {other:?}: expected forward or backward"
                )))
            }
        };
        match query.source.as_deref() {
            None | Some("persistent") | Some("temporary") => {}
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "invalid source {other:?}: expected persistent or temporary"
                )))
            }
        }
        let cursor = match query.cursor {
            None if forward => DateTime::<Utc>::UNIX_EPOCH,
            None => Utc::now(),
            Some(ms) => DateTime::<Utc>::from_timestamp_millis(ms).filter(|_| ms >= 0).ok_or_else(|| {
                ApiError::bad_request(format!("invalid cursor {ms}: expected milliseconds since the Unix epoch"))
            })?,
        };
        let build = self.find_build(template, build_id).await?;
        let lines = self
            .store()
            .build_logs_by_time(&build.build_id, cursor, limit, forward, level)
            .await?;
        Ok(TemplateBuildLogsResponse { logs: lines.into_iter().map(log_entry).collect() })
    }
}

impl ControlPlane {
    /// Deletes a template or a snapshot. A built template's files stay while running
    /// sandboxes use them (the runtime keeps them); the `base` template, a template with a
    /// running build and one whose sandboxes' snapshots need it cannot be deleted.
    pub(crate) async fn delete_template(&self, reference: &str) -> Result<(), ApiError> {
        let template = self.find_template_or_404(reference).await?;
        let template_id = template.template_id.clone();
        if self.store().is_snapshot(&template_id).await? {
            return self.delete_snapshot(template_id.as_str()).await;
        }
        if template.aliases.iter().any(|alias| alias == BASE_TEMPLATE_ALIAS) {
            return Err(ApiError::bad_request(format!(
                "template {template_id} ({BASE_TEMPLATE_ALIAS}) cannot be deleted: Hearth starts sandboxes and \
                 builds other templates from it"
            )));
        }
        let running = self.store().running_build_count(&template_id).await?;
        if running > 0 {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("template {template_id} has a build in progress; wait until it finishes, then delete it"),
            ));
        }
        let (_, snapshots) = self.store().template_dependents(&template_id).await?;
        if snapshots > 0 {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "template {template_id} is needed by {snapshots} snapshots of its sandboxes; delete those \
                     snapshots first"
                ),
            ));
        }

        // The rows go first: a failure after them leaves unused files, never a listed
        // template without its files.
        self.store().delete_template(&template_id).await?;
        if let Err(err) = self.runtime().delete_template(&template_id).await {
            tracing::error!(template_id = %template_id, error = %err, "template deleted from the database but its files remain");
        }
        tracing::info!(template_id = %template_id, aliases = ?template.aliases, "template deleted");
        Ok(())
    }
}

fn build_already_started(build: &BuildRequestRecord) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        format!(
            "build {} of template {} was already started (status {}); request a new build to build again",
            build.build_id, build.template_id, build.status
        ),
    )
}

/// Combines the tag of the name with the requested tags; `default` when there are none.
fn build_tags(name_tag: Option<&str>, requested: Vec<String>) -> Result<Vec<String>, ApiError> {
    let mut tags: Vec<String> = Vec::new();
    for tag in name_tag.map(str::to_owned).into_iter().chain(requested) {
        template_names::check_tag("tags", &tag)?;
        if !tags.contains(&tag) {
            tags.push(tag);
        }
    }
    if tags.is_empty() {
        tags.push(DEFAULT_TAG.to_owned());
    }
    Ok(tags)
}

fn cpu_count(value: Option<i64>) -> Result<u32, ApiError> {
    template_names::size_in_range("cpuCount", value, template_names::VCPU_RANGE, template_names::DEFAULT_VCPUS)
}

fn memory_mib(value: Option<i64>) -> Result<u32, ApiError> {
    template_names::size_in_range(
        "memoryMB",
        value,
        template_names::MEMORY_MIB_RANGE,
        template_names::DEFAULT_MEMORY_MIB,
    )
}

fn check_text(field: &str, text: &str) -> Result<(), ApiError> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(ApiError::bad_request(format!(
            "invalid {field}: {} bytes is more than the maximum of {MAX_TEXT_BYTES}",
            text.len()
        )));
    }
    if text.contains('\0') {
        return Err(ApiError::bad_request(format!("invalid {field}: it contains a NUL byte")));
    }
    Ok(())
}

/// Checks an optional command; an empty one counts as unset.
fn checked_command(field: &str, command: Option<String>) -> Result<Option<String>, ApiError> {
    match command {
        Some(command) if command.trim().is_empty() => Ok(None),
        Some(command) => {
            check_text(field, &command)?;
            Ok(Some(command))
        }
        None => Ok(None),
    }
}

/// Returns whether `image` names E2B's base image, with any tag or digest.
fn is_e2b_base_image(image: &str) -> bool {
    let name = image
        .strip_prefix("docker.io/")
        .or_else(|| image.strip_prefix("index.docker.io/"))
        .unwrap_or(image);
    let name = name.split('@').next().unwrap_or(name);
    let name = name.split(':').next().unwrap_or(name);
    name == E2B_BASE_IMAGE
}

/// Reads `fromImageRegistry`. Only `type: registry` (user name and password) is supported.
fn registry_credentials(value: &serde_json::Value) -> Result<Option<RegistryCredentials>, ApiError> {
    if value.is_null() {
        return Ok(None);
    }
    let kind = value.get("type").and_then(serde_json::Value::as_str).unwrap_or("");
    match kind {
        "registry" => {
            let field = |name: &str| value.get(name).and_then(serde_json::Value::as_str).map(str::to_owned);
            match (field("username"), field("password")) {
                (Some(username), Some(password)) => Ok(Some(RegistryCredentials { username, password })),
                _ => Err(ApiError::bad_request(
                    "invalid fromImageRegistry: type registry needs a username and a password",
                )),
            }
        }
        "aws" | "gcp" => Err(ApiError::bad_request(format!(
            "invalid fromImageRegistry: {kind} registries are not supported by Hearth; use type registry with a \
             username and password"
        ))),
        other => Err(ApiError::bad_request(format!(
            "invalid fromImageRegistry type {other:?}: expected registry"
        ))),
    }
}

fn page_limit(limit: Option<i64>) -> Result<u32, ApiError> {
    match limit {
        None => Ok(MAX_LOG_PAGE as u32),
        Some(limit) if (0..=MAX_LOG_PAGE).contains(&limit) => Ok(limit as u32),
        Some(limit) => Err(ApiError::bad_request(format!(
            "invalid limit {limit}: expected 0 to {MAX_LOG_PAGE}"
        ))),
    }
}

fn parse_level(level: Option<&str>) -> Result<LogLevel, ApiError> {
    match level {
        None | Some("debug") => Ok(LogLevel::Debug),
        Some("info") => Ok(LogLevel::Info),
        Some("warn") => Ok(LogLevel::Warn),
        Some("error") => Ok(LogLevel::Error),
        Some(other) => Err(ApiError::bad_request(format!(
            "invalid level {other:?}: expected debug, info, warn or error"
        ))),
    }
}

fn log_entry(line: BuildLogLine) -> BuildLogEntry {
    BuildLogEntry {
        timestamp: line.at,
        message: line.message,
        level: line.level.as_str().to_owned(),
        step: line.step,
    }
}

/// Messages to the task that stores a build's log.
enum LogMessage {
    Line(BuildLogLine),
    /// Sent back once every line before it is stored.
    Flush(oneshot::Sender<()>),
}

/// The [`BuildLog`] given to builders: `append` numbers the line and hands it to a task
/// that stores lines in batches, so the builder never waits for the database.
pub(crate) struct StoredBuildLog {
    sender: mpsc::UnboundedSender<LogMessage>,
    next_seq: AtomicU64,
    dropped: AtomicU64,
}

impl StoredBuildLog {
    /// Spawns the task that stores the build's lines.
    pub(crate) fn start(store: Store, build_id: BuildId) -> Arc<Self> {
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(store_log_lines(store, build_id, receiver));
        Arc::new(Self { sender, next_seq: AtomicU64::new(0), dropped: AtomicU64::new(0) })
    }

    /// Returns once every line appended so far is stored (or failed to store, which is logged).
    pub(crate) async fn flush(&self) {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            self.push(
                LogLevel::Warn,
                None,
                format!("{dropped} log lines were dropped: a build keeps at most {MAX_LOG_LINES} lines"),
            );
        }
        let (done, wait) = oneshot::channel();
        if self.sender.send(LogMessage::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }

    fn push(&self, level: LogLevel, step: Option<&str>, mut message: String) {
        if message.len() > MAX_LOG_LINE_BYTES {
            let mut cut = MAX_LOG_LINE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" [line cut]");
        }
        let line = BuildLogLine {
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            at: Utc::now(),
            level,
            step: step.map(str::to_owned),
            message,
        };
        // The receiver lives until every sender is gone, so sending cannot fail here.
        let _ = self.sender.send(LogMessage::Line(line));
    }
}

impl BuildLog for StoredBuildLog {
    fn append(&self, level: LogLevel, step: Option<&str>, message: &str) {
        if self.next_seq.load(Ordering::Relaxed) >= MAX_LOG_LINES {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.push(level, step, message.to_owned());
    }
}

/// Stores log lines in batches of what arrived since the previous write.
async fn store_log_lines(store: Store, build_id: BuildId, mut receiver: mpsc::UnboundedReceiver<LogMessage>) {
    const MAX_BATCH: usize = 512;
    while let Some(first) = receiver.recv().await {
        let mut lines = Vec::new();
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                LogMessage::Line(line) => lines.push(line),
                LogMessage::Flush(done) => flushes.push(done),
            }
            if lines.len() < MAX_BATCH {
                next = receiver.try_recv().ok();
            }
        }
        if !lines.is_empty() {
            if let Err(err) = store.append_build_logs(&build_id, &lines).await {
                tracing::error!(
                    build_id = %build_id,
                    lines = lines.len(),
                    error = %crate::error::error_chain(&err),
                    "failed to store template build log lines"
                );
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_image_names_resolve() {
        for image in ["e2bdev/base", "e2bdev/base:latest", "docker.io/e2bdev/base:1.2", "e2bdev/base@sha256:ab"] {
            assert!(is_e2b_base_image(image), "{image} was not recognised");
        }
        for image in ["e2bdev/base-python", "python:3.12", "other/e2bdev/base"] {
            assert!(!is_e2b_base_image(image), "{image} was recognised");
        }
    }

    #[test]
    fn tags_default_and_deduplicate() {
        assert_eq!(build_tags(None, Vec::new()).unwrap(), vec!["default"]);
        assert_eq!(
            build_tags(Some("v1"), vec!["v1".into(), "stable".into()]).unwrap(),
            vec!["v1", "stable"]
        );
        assert!(build_tags(None, vec!["Bad".into()]).is_err());
    }

    #[test]
    fn registry_types() {
        let registry = serde_json::json!({"type": "registry", "username": "u", "password": "p"});
        assert!(registry_credentials(&registry).unwrap().is_some());
        let aws = serde_json::json!({"type": "aws", "awsAccessKeyId": "a"});
        assert!(registry_credentials(&aws).is_err());
        let partial = serde_json::json!({"type": "registry", "username": "u"});
        assert!(registry_credentials(&partial).is_err());
    }
}
