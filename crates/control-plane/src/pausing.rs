//! Pause, resume, fork and named snapshots of sandboxes.
//!
//! A sandbox's state in the database follows what the node agent reports: a pause that
//! fails leaves it `running` (the node agent ran the guest again) or `killed` with the
//! reason (the node agent could not keep it). No path records a frozen VM as running.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use chrono::Utc;
use hearth_types::{SandboxId, TemplateId};

use crate::error::ApiError;
use crate::runtime::{PausedSandbox, RuntimeError, SandboxSpec, SnapshotSpec, StartedSandbox};
use crate::sandboxes::{sandbox_not_found, ServerTiming, CONNECT_DEFAULT_TIMEOUT_SECS};
use crate::store::{NewSandboxRecord, SandboxRecord, SandboxState, TemplateBuildRecord};
use crate::{new_build_id, validate, ControlPlane};

/// Default timeout of `POST /sandboxes/{id}/resume` and of forks, from the SDK's models.
pub(crate) const RESUME_DEFAULT_TIMEOUT_SECS: i64 = 15;
/// Most forks one request may ask for, as the SDK checks.
pub(crate) const MAX_FORKS: i64 = 20;

impl ControlPlane {
    /// Returns a per-sandbox lock that serialises pause, resume, fork, snapshot and kill.
    pub(crate) async fn lock_sandbox(
        &self,
        sandbox_id: &SandboxId,
    ) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self
                .inner
                .sandbox_locks
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            locks.retain(|_, lock| std::sync::Arc::strong_count(lock) > 1);
            locks.entry(sandbox_id.clone()).or_default().clone()
        };
        lock.lock_owned().await
    }

    /// Pauses a running sandbox. Returns `None` when it was already paused, else what the
    /// pause wrote and the time it took.
    pub(crate) async fn pause_sandbox(
        &self,
        sandbox_id: &SandboxId,
        reason: &str,
    ) -> Result<Option<(PausedSandbox, ServerTiming)>, ApiError> {
        let _guard = self.lock_sandbox(sandbox_id).await;
        let record = self.live_sandbox(sandbox_id).await?;
        if record.state == SandboxState::Paused {
            return Ok(None);
        }
        let started = Instant::now();
        match self.runtime().pause(sandbox_id).await {
            Ok(paused) => {
                self.store()
                    .mark_sandbox_paused(sandbox_id, Utc::now())
                    .await?;
                tracing::info!(sandbox_id = %sandbox_id, reason, bytes_written = paused.bytes_written, "sandbox paused");
                let timing = ServerTiming {
                    phases: paused.timings.clone(),
                    total: started.elapsed(),
                };
                Ok(Some((paused, timing)))
            }
            Err(err) => Err(self.snapshot_failure(sandbox_id, "pause", err).await),
        }
    }

    /// Maps a failed pause, snapshot or fork checkpoint to an error, recording a sandbox
    /// the node agent had to stop as killed with the reason.
    async fn snapshot_failure(
        &self,
        sandbox_id: &SandboxId,
        what: &str,
        err: RuntimeError,
    ) -> ApiError {
        match err {
            RuntimeError::PauseFailedRunning(_) => {
                tracing::warn!(sandbox_id = %sandbox_id, error = %err, "{what} failed; the sandbox runs on");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("{what} of sandbox {sandbox_id} failed: {err}"),
                )
            }
            RuntimeError::PauseFailedKilled(_) | RuntimeError::NotFound(_) => {
                let reason = format!("{what} failed: {err}");
                if let Err(store_err) = self
                    .store()
                    .mark_sandbox_ended(sandbox_id, Utc::now(), &reason)
                    .await
                {
                    tracing::error!(sandbox_id = %sandbox_id, error = %store_err, "failed to record a sandbox ended by a failed {what}");
                }
                tracing::error!(sandbox_id = %sandbox_id, reason = %reason, "sandbox ended by a failed {what}");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "{what} of sandbox {sandbox_id} failed and the sandbox was killed: {err}"
                    ),
                )
            }
            other => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{what} of sandbox {sandbox_id} failed: {other}"),
            ),
        }
    }

    /// Resumes a paused sandbox for `timeout_secs` and returns it with the resume's
    /// timing. A running sandbox gets 409 when `conflict_if_running`, else its timeout is
    /// extended (the connect routes) and no timing is returned.
    pub(crate) async fn resume_sandbox(
        &self,
        sandbox_id: &SandboxId,
        timeout_secs: i64,
        auto_pause: Option<bool>,
        conflict_if_running: bool,
    ) -> Result<(SandboxRecord, Option<ServerTiming>), ApiError> {
        let timeout = validate::timeout_secs("timeout", timeout_secs, self.config().max_timeout)?;
        let _guard = self.lock_sandbox(sandbox_id).await;
        let record = self.live_sandbox(sandbox_id).await?;
        if record.state == SandboxState::Running {
            if conflict_if_running {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("sandbox {sandbox_id} is already running"),
                ));
            }
            return Ok((
                self.extend_sandbox_timeout(sandbox_id, "timeout", timeout_secs)
                    .await?,
                None,
            ));
        }
        let spec = SandboxSpec {
            sandbox_id: sandbox_id.clone(),
            template_id: record.template_id.clone(),
            build_id: record.build_id.clone(),
            vcpus: record.vcpus,
            memory_mib: record.memory_mib,
            // envd keeps the variables from the create in its restored memory.
            env_vars: HashMap::new(),
            envd_access_token: record.envd_access_token.clone(),
            previous_access_token: None,
            egress: record.network.egress_policy(record.allow_internet_access)?,
            traffic_access_token: record.traffic_access_token.clone(),
        };
        let started = Instant::now();
        let resumed = match self.runtime().resume(spec).await {
            Ok(resumed) => resumed,
            Err(err @ RuntimeError::PausedStateUnusable { .. }) => {
                let reason = err.to_string();
                self.store()
                    .mark_sandbox_ended(sandbox_id, Utc::now(), &reason)
                    .await?;
                tracing::error!(sandbox_id = %sandbox_id, reason = %reason, "paused sandbox lost");
                return Err(ApiError::not_found(reason));
            }
            Err(RuntimeError::Capacity(message)) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("failed to resume sandbox {sandbox_id}: {message}"),
                ))
            }
            Err(err) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("failed to resume sandbox {sandbox_id}: {err}; it stays paused"),
                ))
            }
        };
        let end_at = Utc::now() + timeout;
        self.store()
            .mark_sandbox_resumed(sandbox_id, end_at)
            .await?;
        if let Some(auto_pause) = auto_pause {
            self.store()
                .set_sandbox_auto_pause(sandbox_id, auto_pause)
                .await?;
        }
        tracing::info!(sandbox_id = %sandbox_id, end_at = %end_at, "sandbox resumed");
        let timing = ServerTiming {
            phases: resumed.timings,
            total: started.elapsed(),
        };
        Ok((self.live_sandbox(sandbox_id).await?, Some(timing)))
    }

    /// Forks a running sandbox `count` times. The outer error fails the request; each
    /// fork's own failure is in its entry.
    pub(crate) async fn fork_sandbox(
        &self,
        sandbox_id: &SandboxId,
        timeout_secs: i64,
        count: i64,
    ) -> Result<Vec<Result<SandboxRecord, ApiError>>, ApiError> {
        if !(1..=MAX_FORKS).contains(&count) {
            return Err(ApiError::bad_request(format!(
                "invalid count {count}: must be between 1 and {MAX_FORKS}"
            )));
        }
        let timeout = validate::timeout_secs("timeout", timeout_secs, self.config().max_timeout)?;
        let _guard = self.lock_sandbox(sandbox_id).await;
        let parent = self.live_sandbox(sandbox_id).await?;
        if parent.state != SandboxState::Running {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("sandbox {sandbox_id} is paused; resume it to fork it"),
            ));
        }
        let egress = parent.network.egress_policy(parent.allow_internet_access)?;
        let specs: Vec<SandboxSpec> = (0..count)
            .map(|_| SandboxSpec {
                sandbox_id: SandboxId::generate(),
                template_id: parent.template_id.clone(),
                build_id: parent.build_id.clone(),
                vcpus: parent.vcpus,
                memory_mib: parent.memory_mib,
                env_vars: HashMap::new(),
                envd_access_token: parent.envd_access_token.clone(),
                previous_access_token: None,
                egress: egress.clone(),
                traffic_access_token: parent
                    .network
                    .requires_traffic_token()
                    .then(crate::sandboxes::generate_access_token),
            })
            .collect();
        let results = match self.runtime().fork(sandbox_id, specs.clone()).await {
            Ok(results) => results,
            Err(err) => return Err(self.snapshot_failure(sandbox_id, "fork", err).await),
        };
        let mut forks = Vec::with_capacity(results.len());
        for (spec, result) in specs.into_iter().zip(results) {
            forks.push(match result {
                Ok(started) => self.record_started(&parent, &spec, &started, timeout).await,
                Err(err) => Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("fork failed to start: {err}"),
                )),
            });
        }
        Ok(forks)
    }

    /// Records a sandbox started from `parent`'s checkpoint.
    async fn record_started(
        &self,
        parent: &SandboxRecord,
        spec: &SandboxSpec,
        started: &StartedSandbox,
        timeout: Duration,
    ) -> Result<SandboxRecord, ApiError> {
        let now = Utc::now();
        let record = NewSandboxRecord {
            sandbox_id: spec.sandbox_id.clone(),
            template_id: parent.template_id.clone(),
            build_id: parent.build_id.clone(),
            alias: parent.alias.clone(),
            metadata: parent.metadata.clone(),
            env_var_names: parent.env_var_names.clone(),
            envd_access_token: parent.envd_access_token.clone(),
            envd_version: started.envd_version.clone(),
            allow_internet_access: parent.allow_internet_access,
            network: parent.network.clone(),
            traffic_access_token: spec.traffic_access_token.clone(),
            auto_pause: parent.auto_pause,
            vcpus: parent.vcpus,
            memory_mib: parent.memory_mib,
            disk_mb: parent.disk_mb,
            started_at: now,
            end_at: now + timeout,
        };
        if let Err(err) = self.store().insert_sandbox(&record).await {
            if let Err(stop_err) = self.runtime().stop(&spec.sandbox_id).await {
                tracing::error!(sandbox_id = %spec.sandbox_id, error = %stop_err, "failed to stop a fork that could not be recorded");
            }
            return Err(err.into());
        }
        self.live_sandbox(&spec.sandbox_id).await
    }

    /// Writes a named snapshot of a running sandbox, which keeps running, and registers it
    /// as a template. Returns the snapshot's template ID and names.
    pub(crate) async fn snapshot_sandbox(
        &self,
        sandbox_id: &SandboxId,
        name: Option<String>,
    ) -> Result<(TemplateId, Vec<String>), ApiError> {
        let name = match name
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
        {
            Some(name) => {
                TemplateId::parse(&name).map_err(|_| {
                    ApiError::bad_request(format!(
                        "invalid name {name:?}: use letters, digits, '-' and '_' (at most 63 characters)"
                    ))
                })?;
                Some(name)
            }
            None => None,
        };
        let _guard = self.lock_sandbox(sandbox_id).await;
        let record = self.live_sandbox(sandbox_id).await?;
        if record.state != SandboxState::Running {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("sandbox {sandbox_id} is paused; resume it to snapshot it"),
            ));
        }
        let snapshot_id = TemplateId::parse(&format!("snap-{}", SandboxId::generate()))
            .expect("a generated sandbox ID makes a valid template ID");
        let build_id = new_build_id();
        let target = SnapshotSpec {
            template_id: snapshot_id.clone(),
            build_id: build_id.clone(),
        };
        if let Err(err) = self.runtime().snapshot(sandbox_id, target).await {
            return Err(self.snapshot_failure(sandbox_id, "snapshot", err).await);
        }
        let aliases: Vec<String> = name.iter().cloned().collect();
        self.store()
            .register_template_build(&TemplateBuildRecord {
                template_id: snapshot_id.clone(),
                build_id,
                vcpus: record.vcpus,
                memory_mib: record.memory_mib,
                disk_mb: record.disk_mb,
                envd_version: record.envd_version.clone(),
                aliases: aliases.clone(),
            })
            .await?;
        self.store()
            .insert_snapshot(&snapshot_id, sandbox_id, name.as_deref(), Utc::now())
            .await?;
        tracing::info!(sandbox_id = %sandbox_id, snapshot_id = %snapshot_id, name = ?name, "snapshot created");
        Ok((snapshot_id, aliases))
    }

    /// Resumes a paused sandbox created with `autoResume` when traffic for it reaches the
    /// proxy, for the connect routes' default timeout. Returns whether the sandbox runs
    /// now; a sandbox that is not paused, or did not ask for this, stays as it is.
    pub async fn wake_sandbox(&self, sandbox_id: &SandboxId) -> bool {
        match self.store().get_live_sandbox(sandbox_id).await {
            Ok(Some(record)) if record.state == SandboxState::Paused && record.auto_resume => {}
            Ok(Some(record)) => return record.state == SandboxState::Running,
            Ok(None) => return false,
            Err(err) => {
                tracing::error!(sandbox_id = %sandbox_id, error = %err, "failed to read a sandbox to wake it");
                return false;
            }
        }
        match self.resume_sandbox(sandbox_id, CONNECT_DEFAULT_TIMEOUT_SECS, None, false).await {
            Ok(_) => {
                tracing::info!(sandbox_id = %sandbox_id, "paused sandbox resumed by proxy traffic");
                true
            }
            Err(err) => {
                tracing::error!(sandbox_id = %sandbox_id, error = ?err, "failed to resume a sandbox for proxy traffic");
                false
            }
        }
    }

    /// Deletes a snapshot (by ID or name) and its files, unless a live sandbox or another
    /// snapshot still reads them. Other templates cannot be deleted yet.
    pub(crate) async fn delete_snapshot(&self, id_or_name: &str) -> Result<(), ApiError> {
        let template = self.store().find_template(id_or_name).await?.ok_or_else(|| {
            ApiError::not_found(format!("template or snapshot {id_or_name:?} not found"))
        })?;
        let template_id = template.template_id;
        if !self.store().is_snapshot(&template_id).await? {
            return Err(ApiError::not_implemented("deleting templates other than snapshots"));
        }
        let (sandboxes, snapshots) = self.store().template_dependents(&template_id).await?;
        if sandboxes > 0 || snapshots > 0 {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "snapshot {template_id} is in use by {sandboxes} running or paused sandboxes and \
                     {snapshots} snapshots taken from them; kill those sandboxes and delete those \
                     snapshots first"
                ),
            ));
        }
        // The rows go first: a failure after them leaves unused files, never a listed
        // snapshot without its files.
        self.store().delete_template(&template_id).await?;
        if let Err(err) = self.runtime().delete_template(&template_id).await {
            tracing::error!(template_id = %template_id, error = %err, "snapshot deleted from the database but its files remain");
        }
        tracing::info!(template_id = %template_id, "snapshot deleted");
        Ok(())
    }

    /// Returns the running or paused sandbox with this ID, or a 404 with the reason it ended.
    pub(crate) async fn live_sandbox(
        &self,
        sandbox_id: &SandboxId,
    ) -> Result<SandboxRecord, ApiError> {
        if let Some(record) = self.store().get_live_sandbox(sandbox_id).await? {
            return Ok(record);
        }
        match self.store().sandbox_end_reason(sandbox_id).await? {
            Some(reason) => Err(ApiError::not_found(format!(
                "sandbox {sandbox_id} was killed: {reason}"
            ))),
            None => Err(sandbox_not_found(sandbox_id)),
        }
    }
}
