//! Sandbox operations behind the REST handlers: create, kill, timeouts.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use chrono::Utc;
use hearth_types::SandboxId;
use rand::RngCore;
use serde_json::Value;

use crate::error::ApiError;
use hearth_network::egress::EgressPolicy;

use crate::models::NewSandbox;
use crate::network::{parse_create_network, NetworkSettings};
use crate::runtime::{RuntimeError, SandboxSpec};
use crate::store::{BuildStatus, NewSandboxRecord, SandboxRecord};
use crate::{validate, ControlPlane};

/// Create route a request came through. The two routes differ in their defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CreateApi {
    /// `POST /sandboxes`: default timeout 15 s, envd token only with `secure: true`.
    V1,
    /// `POST /v2/sandboxes`: default timeout 300 s, envd token always.
    V2,
}

/// Default timeout of `POST /sandboxes`, from the SDK's `NewSandbox` model.
const V1_DEFAULT_TIMEOUT_SECS: i64 = 15;
/// Default timeout of `POST /v2/sandboxes`, from the SDK's `NewSandboxV2` model.
const V2_DEFAULT_TIMEOUT_SECS: i64 = 300;
/// Default timeout of the connect routes, from the SDK's `ConnectSandboxV2` model.
pub(crate) const CONNECT_DEFAULT_TIMEOUT_SECS: i64 = 300;
/// Default `duration` of `POST /sandboxes/{id}/refreshes`.
pub(crate) const REFRESH_DEFAULT_SECS: i64 = 15;

/// Time spent in each phase of one create request, for the `Server-Timing` response header.
pub(crate) struct ServerTiming {
    /// Phases the runtime reported, in order.
    pub phases: Vec<(&'static str, Duration)>,
    /// Time from the runtime call to the stored record.
    pub total: Duration,
}

impl ServerTiming {
    /// Formats the header value: each phase and `total`, as `name;dur=<milliseconds>`.
    pub fn header_value(&self) -> String {
        let mut entries: Vec<String> = self
            .phases
            .iter()
            .map(|(name, duration)| format!("{name};dur={:.3}", duration.as_secs_f64() * 1000.0))
            .collect();
        entries.push(format!(
            "total;dur={:.3}",
            self.total.as_secs_f64() * 1000.0
        ));
        entries.join(", ")
    }
}

/// A validated create request.
struct CreateRequest {
    template: String,
    timeout: Duration,
    metadata: BTreeMap<String, String>,
    env_vars: BTreeMap<String, String>,
    secure: bool,
    allow_internet_access: Option<bool>,
    network: NetworkSettings,
    egress: EgressPolicy,
    auto_pause: bool,
    auto_resume: bool,
}

impl ControlPlane {
    /// Validates a create request, starts the sandbox through the runtime and records it.
    pub(crate) async fn create_sandbox(
        &self,
        api: CreateApi,
        body: NewSandbox,
    ) -> Result<(SandboxRecord, ServerTiming), ApiError> {
        let request = self.validate_create(api, body)?;
        if self.is_shutting_down() {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down and starts no new sandboxes",
            ));
        }

        let template = self
            .store()
            .find_template(&request.template)
            .await?
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "template {:?} not found: no template has this ID or alias",
                    request.template
                ))
            })?;
        if template.status != BuildStatus::Ready {
            return Err(ApiError::bad_request(format!(
                "template {:?} has no ready build (status {})",
                request.template, template.status
            )));
        }
        let alias =
            (request.template != template.template_id.as_str()).then(|| request.template.clone());

        let sandbox_id = SandboxId::generate();
        let envd_access_token = request.secure.then(generate_access_token);
        let traffic_access_token = request
            .network
            .requires_traffic_token()
            .then(generate_access_token);
        // A snapshot of a secured sandbox restores an envd that requires that sandbox's token.
        let previous_access_token = self.store().snapshot_source_token(&template.template_id).await?;
        let spec = SandboxSpec {
            sandbox_id: sandbox_id.clone(),
            template_id: template.template_id.clone(),
            build_id: template.build_id.clone(),
            vcpus: template.vcpus,
            memory_mib: template.memory_mib,
            env_vars: request
                .env_vars
                .clone()
                .into_iter()
                .collect::<HashMap<_, _>>(),
            envd_access_token: envd_access_token.clone(),
            previous_access_token,
            egress: request.egress.clone(),
            traffic_access_token: traffic_access_token.clone(),
        };

        let started = Instant::now();
        let started_sandbox = self.runtime().start(spec).await.map_err(|err| {
            tracing::error!(sandbox_id = %sandbox_id, template_id = %template.template_id, error = %err, "sandbox start failed");
            start_error(&err)
        })?;

        let now = Utc::now();
        let record = NewSandboxRecord {
            sandbox_id: sandbox_id.clone(),
            template_id: template.template_id.clone(),
            build_id: template.build_id.clone(),
            alias,
            metadata: request.metadata,
            env_var_names: request.env_vars.into_keys().collect(),
            envd_access_token,
            envd_version: started_sandbox.envd_version.clone(),
            allow_internet_access: request.allow_internet_access,
            network: request.network.clone(),
            traffic_access_token,
            auto_pause: request.auto_pause,
            vcpus: template.vcpus,
            memory_mib: template.memory_mib,
            disk_mb: template.disk_mb,
            started_at: now,
            end_at: now + request.timeout,
        };
        if let Err(err) = self.store().insert_sandbox(&record).await {
            // The row is what lets the reaper find the sandbox, so one that cannot be
            // recorded must not keep running.
            if let Err(stop_err) = self.runtime().stop(&sandbox_id).await {
                tracing::error!(sandbox_id = %sandbox_id, error = %stop_err, "failed to stop a sandbox that could not be recorded");
            }
            return Err(err.into());
        }
        if request.auto_resume {
            self.store().set_sandbox_auto_resume(&sandbox_id, true).await?;
        }
        if let Err(err) = self
            .store()
            .record_template_spawn(&template.template_id, now)
            .await
        {
            tracing::warn!(template_id = %template.template_id, error = %err, "failed to count a template spawn");
        }

        tracing::info!(
            sandbox_id = %sandbox_id,
            template_id = %template.template_id,
            build_id = %template.build_id,
            timeout_secs = request.timeout.as_secs(),
            start_ms = started.elapsed().as_millis() as u64,
            "sandbox created"
        );
        let record = self
            .store()
            .get_live_sandbox(&sandbox_id)
            .await?
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "sandbox {sandbox_id} was killed while it was being created"
                ))
            })?;
        let timing = ServerTiming {
            phases: started_sandbox.timings,
            total: started.elapsed(),
        };
        Ok((record, timing))
    }

    fn validate_create(&self, api: CreateApi, body: NewSandbox) -> Result<CreateRequest, ApiError> {
        let template = body.template_id.trim().to_owned();
        if template.is_empty() {
            return Err(ApiError::bad_request(
                "invalid templateID \"\": expected a template ID or alias",
            ));
        }

        let default_timeout = match api {
            CreateApi::V1 => V1_DEFAULT_TIMEOUT_SECS,
            CreateApi::V2 => V2_DEFAULT_TIMEOUT_SECS,
        };
        let timeout = validate::timeout_secs(
            "timeout",
            body.timeout.unwrap_or(default_timeout),
            self.config().max_timeout,
        )?;

        reject_unsupported_options(&body)?;
        let auto_pause = body.auto_pause.unwrap_or(false);
        let auto_resume = parse_auto_resume(body.auto_resume.as_ref())?;
        if auto_resume && !auto_pause {
            return Err(ApiError::bad_request(
                "invalid autoResume: resuming on traffic needs autoPause (lifecycle on_timeout \"pause\")",
            ));
        }
        if body.auto_pause_memory == Some(false) {
            return Err(ApiError::bad_request(
                "invalid autoPauseMemory false: Hearth pauses with memory only",
            ));
        }

        let network = parse_create_network(body.network.as_ref())?;
        let egress = network.egress_policy(body.allow_internet_access)?;
        Ok(CreateRequest {
            template,
            timeout,
            metadata: validate::metadata(body.metadata)?,
            env_vars: validate::env_vars(body.env_vars)?,
            secure: api == CreateApi::V2 || body.secure.unwrap_or(false),
            allow_internet_access: body.allow_internet_access,
            network,
            egress,
            auto_pause,
            auto_resume,
        })
    }

    /// Stops a sandbox and marks it killed. Returns false when no live sandbox has the ID.
    pub(crate) async fn kill_sandbox(
        &self,
        sandbox_id: &SandboxId,
        reason: &str,
    ) -> Result<bool, ApiError> {
        let _guard = self.lock_sandbox(sandbox_id).await;
        let Some(record) = self.store().get_live_sandbox(sandbox_id).await? else {
            return Ok(false);
        };
        let stopped = if record.state == crate::store::SandboxState::Paused {
            self.runtime().discard_paused(sandbox_id).await
        } else {
            self.runtime().stop(sandbox_id).await
        };
        match stopped {
            Ok(()) | Err(RuntimeError::NotFound(_)) => {}
            Err(err) => {
                tracing::error!(sandbox_id = %sandbox_id, reason, error = %err, "sandbox stop failed");
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("failed to stop sandbox {sandbox_id}: {err}"),
                ));
            }
        }
        let marked = self
            .store()
            .mark_sandbox_killed(sandbox_id, Utc::now())
            .await?;
        if marked {
            tracing::info!(sandbox_id = %sandbox_id, reason, "sandbox killed");
        }
        Ok(true)
    }

    /// Sets a running sandbox's end time to now plus `timeout_secs`, shorter or longer.
    pub(crate) async fn set_sandbox_timeout(
        &self,
        sandbox_id: &SandboxId,
        timeout_secs: i64,
    ) -> Result<(), ApiError> {
        let timeout = validate::timeout_secs("timeout", timeout_secs, self.config().max_timeout)?;
        let end_at = Utc::now() + timeout;
        if !self.store().set_sandbox_end(sandbox_id, end_at).await? {
            return Err(sandbox_not_found(sandbox_id));
        }
        tracing::info!(sandbox_id = %sandbox_id, end_at = %end_at, "sandbox timeout set");
        Ok(())
    }

    /// Moves a running sandbox's end time to at least now plus `secs`; never shortens it.
    pub(crate) async fn extend_sandbox_timeout(
        &self,
        sandbox_id: &SandboxId,
        field: &str,
        secs: i64,
    ) -> Result<SandboxRecord, ApiError> {
        let duration = validate::timeout_secs(field, secs, self.config().max_timeout)?;
        let end_at = Utc::now() + duration;
        if !self.store().extend_sandbox_end(sandbox_id, end_at).await? {
            return Err(sandbox_not_found(sandbox_id));
        }
        self.store()
            .get_live_sandbox(sandbox_id)
            .await?
            .ok_or_else(|| sandbox_not_found(sandbox_id))
    }
}

/// 404 for a sandbox ID with no running or paused sandbox.
pub(crate) fn sandbox_not_found(sandbox_id: &SandboxId) -> ApiError {
    ApiError::not_found(format!(
        "sandbox {sandbox_id} not found: it does not exist or was killed"
    ))
}

fn reject_unsupported_options(body: &NewSandbox) -> Result<(), ApiError> {
    if body.mcp.as_ref().is_some_and(|mcp| !mcp.is_null()) {
        return Err(ApiError::bad_request(
            "invalid mcp: MCP gateways are not supported by this Hearth server",
        ));
    }
    if body
        .iam
        .as_ref()
        .is_some_and(|iam| !is_empty_json(iam, "tokens"))
    {
        return Err(ApiError::bad_request(
            "invalid iam: workload identity is not supported by this Hearth server",
        ));
    }
    if body
        .volume_mounts
        .as_ref()
        .is_some_and(|mounts| !mounts.is_empty())
    {
        return Err(ApiError::bad_request(
            "invalid volumeMounts: volumes are not supported by this Hearth server",
        ));
    }
    Ok(())
}

/// Reads `autoResume` (`{"enabled": bool}` or null) as a flag.
fn parse_auto_resume(value: Option<&Value>) -> Result<bool, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Object(fields)) => match fields.get("enabled") {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(enabled)) => Ok(*enabled),
            Some(other) => Err(ApiError::bad_request(format!(
                "invalid autoResume.enabled {other}: expected true or false"
            ))),
        },
        Some(other) => Err(ApiError::bad_request(format!(
            "invalid autoResume {other}: expected an object such as {{\"enabled\": true}}"
        ))),
    }
}

fn is_empty_json(value: &Value, field: &str) -> bool {
    match value {
        Value::Null => true,
        Value::Object(object) => {
            object.get(field).is_none_or(|inner| match inner {
                Value::Null => true,
                Value::Object(map) => map.is_empty(),
                _ => false,
            }) && object.keys().all(|key| key == field)
        }
        _ => false,
    }
}

/// Maps a runtime failure to the status the SDK reports best: 503 (retry) for capacity,
/// 500 otherwise.
fn start_error(err: &RuntimeError) -> ApiError {
    match err {
        RuntimeError::Capacity(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("failed to start sandbox: {err}"),
        )
        .with_error_code("sandbox_capacity_unavailable"),
        RuntimeError::TemplateUnavailable { .. } => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("failed to start sandbox: {err}"),
        )
        .with_error_code("sandbox_create_refused"),
        _ => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("failed to start sandbox: {err}"),
        )
        .with_error_code("sandbox_create_failed"),
    }
}

/// Generates the token envd requires when a sandbox is secured: 32 random bytes as hex.
pub(crate) fn generate_access_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}
