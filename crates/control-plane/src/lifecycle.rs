//! Background work: the timeout reaper, start-up reconciliation and shutdown.

use std::collections::HashSet;

use chrono::Utc;
use hearth_types::SandboxId;
use tokio::task::{JoinHandle, JoinSet};

use crate::runtime::RuntimeError;
use crate::store::StoreError;
use crate::ControlPlane;

/// Changes made by [`ControlPlane::reconcile`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Sandboxes the database listed as running that the runtime did not report; now killed.
    pub marked_killed: Vec<SandboxId>,
    /// Sandboxes the runtime reported that the database did not list as running; now stopped.
    pub stopped_unknown: Vec<SandboxId>,
    /// Sandboxes the database listed as running that the node keeps paused; now paused.
    pub marked_paused: Vec<SandboxId>,
}

impl ControlPlane {
    /// Spawns the task that kills sandboxes whose end time has passed, every
    /// `config.reaper_interval`, until [`ControlPlane::shutdown`] is called.
    pub fn spawn_reaper(&self) -> JoinHandle<()> {
        let control_plane = self.clone();
        let mut shutting_down = self.inner.shutting_down.subscribe();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(control_plane.config().reaper_interval);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = interval.tick() => {}
                    _ = shutting_down.wait_for(|stop| *stop) => break,
                }
                if let Err(err) = control_plane.reap_expired().await {
                    tracing::error!(error = %crate::error::error_chain(&err), "timeout reaper pass failed");
                }
                if let Err(err) = control_plane.reap_lost().await {
                    tracing::error!(error = %crate::error::error_chain(&err), "lost sandbox pass failed");
                }
            }
            tracing::debug!("timeout reaper stopped");
        })
    }

    /// Stops every running sandbox whose end time has passed and marks it killed. Returns
    /// how many were killed. A sandbox whose stop fails is marked killed all the same, with
    /// the error logged, so one broken VM cannot make every pass retry it forever.
    pub async fn reap_expired(&self) -> Result<usize, StoreError> {
        let expired = self.store().list_expired_sandboxes(Utc::now()).await?;
        let mut killed = 0;
        for sandbox in expired {
            if sandbox.auto_pause {
                match self
                    .pause_sandbox(&sandbox.sandbox_id, "timeout with autoPause")
                    .await
                {
                    Ok(_) => continue,
                    Err(err) => {
                        tracing::error!(sandbox_id = %sandbox.sandbox_id, error = ?err, "pause at the timeout failed; killing the sandbox");
                    }
                }
            }
            self.stop_quietly(&sandbox.sandbox_id, "timeout").await;
            if self
                .store()
                .mark_sandbox_ended(&sandbox.sandbox_id, Utc::now(), "its timeout passed")
                .await?
            {
                tracing::info!(sandbox_id = %sandbox.sandbox_id, end_at = %sandbox.end_at, "sandbox killed at its timeout");
                killed += 1;
            }
        }
        Ok(killed)
    }

    /// Marks killed every sandbox recorded as running that the runtime no longer runs (its
    /// VM exited on its own). Returns how many were marked.
    pub async fn reap_lost(&self) -> Result<usize, StoreError> {
        let recorded = self.store().list_running_sandbox_ids().await?;
        if recorded.is_empty() {
            return Ok(0);
        }
        let running: HashSet<SandboxId> = self.runtime().running().await.into_iter().collect();
        let mut marked = 0;
        for sandbox_id in recorded.into_iter().filter(|id| !running.contains(id)) {
            // A pause, resume or kill holds this lock and changes the record before it
            // lets go; check again under it.
            let _guard = self.lock_sandbox(&sandbox_id).await;
            let still_running = self
                .store()
                .get_live_sandbox(&sandbox_id)
                .await?
                .is_some_and(|record| record.state == crate::store::SandboxState::Running);
            if !still_running || self.runtime().running().await.contains(&sandbox_id) {
                continue;
            }
            let reason = "its VM exited unexpectedly";
            if self
                .store()
                .mark_sandbox_ended(&sandbox_id, Utc::now(), reason)
                .await?
            {
                tracing::warn!(sandbox_id = %sandbox_id, reason, "sandbox lost; marked killed");
                marked += 1;
            }
        }
        Ok(marked)
    }

    /// Aligns the database with the runtime after a start: sandboxes recorded as running
    /// that the runtime does not run are marked killed, and sandboxes the runtime runs
    /// without a running record are stopped. [`crate::build`] calls it once.
    pub async fn reconcile(&self) -> Result<ReconcileReport, StoreError> {
        let recorded: HashSet<SandboxId> = self
            .store()
            .list_running_sandbox_ids()
            .await?
            .into_iter()
            .collect();
        let recorded_paused: HashSet<SandboxId> = self
            .store()
            .list_paused_sandbox_ids()
            .await?
            .into_iter()
            .collect();
        let running: HashSet<SandboxId> = self.runtime().running().await.into_iter().collect();
        let paused: HashSet<SandboxId> = self.runtime().paused().await.into_iter().collect();

        let mut report = ReconcileReport::default();
        for sandbox_id in recorded.difference(&running) {
            if paused.contains(sandbox_id) {
                // The pause finished on the node just before the server stopped.
                self.store()
                    .mark_sandbox_paused(sandbox_id, Utc::now())
                    .await?;
                tracing::warn!(sandbox_id = %sandbox_id, "sandbox recorded as running was paused on the node; marked paused");
                report.marked_paused.push(sandbox_id.clone());
                continue;
            }
            let reason = "the server restarted and a running sandbox's VM does not survive that";
            if self
                .store()
                .mark_sandbox_ended(sandbox_id, Utc::now(), reason)
                .await?
            {
                tracing::warn!(sandbox_id = %sandbox_id, reason, "sandbox recorded as running is not running on the node; marked killed");
                report.marked_killed.push(sandbox_id.clone());
            }
        }
        for sandbox_id in recorded_paused.difference(&paused) {
            let reason = "its paused state is missing or incomplete on this node";
            if self
                .store()
                .mark_sandbox_ended(sandbox_id, Utc::now(), reason)
                .await?
            {
                tracing::error!(sandbox_id = %sandbox_id, reason, "paused sandbox cannot be resumed; marked killed");
                report.marked_killed.push(sandbox_id.clone());
            }
        }
        for sandbox_id in running.difference(&recorded) {
            tracing::warn!(sandbox_id = %sandbox_id, "node runs a sandbox the control plane has no running record of; stopping it");
            self.stop_quietly(sandbox_id, "reconcile").await;
            report.stopped_unknown.push(sandbox_id.clone());
        }
        for sandbox_id in paused.difference(&recorded_paused) {
            if recorded.contains(sandbox_id) {
                continue;
            }
            tracing::warn!(sandbox_id = %sandbox_id, "node has a paused sandbox the control plane has no record of; deleting it");
            if let Err(err) = self.runtime().discard_paused(sandbox_id).await {
                tracing::error!(sandbox_id = %sandbox_id, error = %err, "failed to delete an unknown paused sandbox");
            }
            report.stopped_unknown.push(sandbox_id.clone());
        }
        report.marked_killed.sort();
        report.marked_paused.sort();
        report.stopped_unknown.sort();
        Ok(report)
    }

    /// Stops the reaper and refuses new sandboxes. Then, in parallel, pauses every running
    /// sandbox created with `autoPause` (so it survives the restart) and kills the others.
    /// A sandbox whose pause fails is killed. Call it once before the process exits.
    pub async fn shutdown(&self) -> Result<(), StoreError> {
        self.inner.shutting_down.send_replace(true);
        let running = self.store().list_running_sandbox_ids().await?;
        tracing::info!(
            count = running.len(),
            "shutting down: pausing autoPause sandboxes, killing the other running sandboxes"
        );

        let mut stops = JoinSet::new();
        for sandbox_id in running {
            let control_plane = self.clone();
            stops.spawn(async move {
                let auto_pause = matches!(control_plane.store().get_live_sandbox(&sandbox_id).await, Ok(Some(record)) if record.auto_pause);
                if auto_pause {
                    match control_plane.pause_sandbox(&sandbox_id, "server shutdown with autoPause").await {
                        Ok(_) => return Ok(false),
                        Err(err) => tracing::error!(sandbox_id = %sandbox_id, error = ?err, "pause at shutdown failed; killing the sandbox"),
                    }
                }
                control_plane.stop_quietly(&sandbox_id, "shutdown").await;
                control_plane
                    .store()
                    .mark_sandbox_ended(&sandbox_id, Utc::now(), "the server stopped while the sandbox was running")
                    .await
            });
        }
        while let Some(result) = stops.join_next().await {
            match result {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => return Err(err),
                Err(err) => {
                    tracing::error!(error = %err, "sandbox stop task failed during shutdown")
                }
            }
        }
        Ok(())
    }

    /// Stops a sandbox, logging a failure instead of returning it. A sandbox the runtime
    /// does not know is already stopped.
    async fn stop_quietly(&self, sandbox_id: &SandboxId, reason: &str) {
        match self.runtime().stop(sandbox_id).await {
            Ok(()) | Err(RuntimeError::NotFound(_)) => {}
            Err(err) => {
                tracing::error!(sandbox_id = %sandbox_id, reason, error = %err, "sandbox stop failed")
            }
        }
    }
}
