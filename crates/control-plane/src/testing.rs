//! An in-process [`SandboxRuntime`] that records calls, for tests of the control plane and
//! of code built on it. It starts nothing: sandboxes exist only in its table. Also a
//! [`RecordingBuilder`], a [`crate::builds::TemplateBuilder`] that records build specs.

use std::collections::BTreeSet;
use std::sync::Mutex;

use async_trait::async_trait;
use hearth_types::SandboxId;

use crate::runtime::{PausedSandbox, RuntimeError, SandboxRuntime, SandboxSpec, SnapshotSpec, StartedSandbox};

/// One call the control plane made.
#[derive(Clone, Debug)]
pub enum RuntimeCall {
    Start(SandboxSpec),
    Stop(SandboxId),
    Pause(SandboxId),
    Resume(SandboxSpec),
    Snapshot(SandboxId, SnapshotSpec),
    Fork(SandboxId, Vec<SandboxSpec>),
    UpdateNetwork(SandboxId, hearth_network::egress::EgressPolicy),
}

/// Failure mode of the next pauses of a [`RecordingRuntime`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseFailure {
    /// The pause fails and the sandbox keeps running.
    KeepsRunning,
    /// The pause fails and the sandbox is stopped.
    Killed,
}

/// Records calls and keeps the set of "running" sandbox IDs.
#[derive(Debug, Default)]
pub struct RecordingRuntime {
    calls: Mutex<Vec<RuntimeCall>>,
    running: Mutex<BTreeSet<SandboxId>>,
    paused: Mutex<BTreeSet<SandboxId>>,
    /// When set, `start` fails with this error message.
    fail_starts_with: Mutex<Option<String>>,
    /// When set, `pause` fails this way.
    fail_pauses: Mutex<Option<PauseFailure>>,
}

impl RecordingRuntime {
    /// Creates a runtime with no sandboxes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates a runtime that reports `ids` as running, as after a restart of the server.
    pub fn with_running(ids: impl IntoIterator<Item = SandboxId>) -> Self {
        let runtime = Self::default();
        runtime.running.lock().unwrap().extend(ids);
        runtime
    }

    /// Makes every later `start` fail with `RuntimeError::Failed(message)`, or succeed again with `None`.
    pub fn fail_starts(&self, message: Option<&str>) {
        *self.fail_starts_with.lock().unwrap() = message.map(str::to_owned);
    }

    /// Makes every later `pause` fail as given, or succeed again with `None`.
    pub fn fail_pauses(&self, failure: Option<PauseFailure>) {
        *self.fail_pauses.lock().unwrap() = failure;
    }

    /// Makes the runtime hold `ids` paused, as a node finds them on disk after a restart.
    pub fn set_paused(&self, ids: impl IntoIterator<Item = SandboxId>) {
        self.paused.lock().unwrap().extend(ids);
    }

    /// Returns whether the runtime keeps `sandbox_id` paused.
    pub fn is_paused(&self, sandbox_id: &SandboxId) -> bool {
        self.paused.lock().unwrap().contains(sandbox_id)
    }

    /// Calls made so far, in order.
    pub fn calls(&self) -> Vec<RuntimeCall> {
        self.calls.lock().unwrap().clone()
    }

    /// Specs of the `start` calls made so far.
    pub fn started(&self) -> Vec<SandboxSpec> {
        self.calls()
            .into_iter()
            .filter_map(|call| match call {
                RuntimeCall::Start(spec) => Some(spec),
                _ => None,
            })
            .collect()
    }

    /// IDs of the `stop` calls made so far.
    pub fn stopped(&self) -> Vec<SandboxId> {
        self.calls()
            .into_iter()
            .filter_map(|call| match call {
                RuntimeCall::Stop(id) => Some(id),
                _ => None,
            })
            .collect()
    }

    /// Whether the runtime considers `sandbox_id` running.
    pub fn is_running(&self, sandbox_id: &SandboxId) -> bool {
        self.running.lock().unwrap().contains(sandbox_id)
    }
}

#[async_trait]
impl SandboxRuntime for RecordingRuntime {
    async fn start(&self, spec: SandboxSpec) -> Result<StartedSandbox, RuntimeError> {
        self.calls
            .lock()
            .unwrap()
            .push(RuntimeCall::Start(spec.clone()));
        if let Some(message) = self.fail_starts_with.lock().unwrap().clone() {
            return Err(RuntimeError::Failed(message));
        }
        self.running.lock().unwrap().insert(spec.sandbox_id);
        Ok(StartedSandbox {
            envd_version: hearth_types::ENVD_VERSION.to_owned(),
            timings: Vec::new(),
        })
    }

    async fn stop(&self, sandbox_id: &SandboxId) -> Result<(), RuntimeError> {
        self.calls
            .lock()
            .unwrap()
            .push(RuntimeCall::Stop(sandbox_id.clone()));
        if self.running.lock().unwrap().remove(sandbox_id) {
            Ok(())
        } else {
            Err(RuntimeError::NotFound(sandbox_id.clone()))
        }
    }

    async fn running(&self) -> Vec<SandboxId> {
        self.running.lock().unwrap().iter().cloned().collect()
    }

    async fn pause(&self, sandbox_id: &SandboxId) -> Result<PausedSandbox, RuntimeError> {
        self.calls.lock().unwrap().push(RuntimeCall::Pause(sandbox_id.clone()));
        if !self.running.lock().unwrap().contains(sandbox_id) {
            return Err(RuntimeError::NotFound(sandbox_id.clone()));
        }
        match *self.fail_pauses.lock().unwrap() {
            Some(PauseFailure::KeepsRunning) => {
                return Err(RuntimeError::PauseFailedRunning("injected pause failure".into()))
            }
            Some(PauseFailure::Killed) => {
                self.running.lock().unwrap().remove(sandbox_id);
                return Err(RuntimeError::PauseFailedKilled("injected pause failure".into()));
            }
            None => {}
        }
        self.running.lock().unwrap().remove(sandbox_id);
        self.paused.lock().unwrap().insert(sandbox_id.clone());
        Ok(PausedSandbox { bytes_written: 0, timings: Vec::new() })
    }

    async fn resume(&self, spec: SandboxSpec) -> Result<StartedSandbox, RuntimeError> {
        self.calls.lock().unwrap().push(RuntimeCall::Resume(spec.clone()));
        if !self.paused.lock().unwrap().remove(&spec.sandbox_id) {
            return Err(RuntimeError::PausedStateUnusable {
                sandbox_id: spec.sandbox_id,
                reason: "not paused in this runtime".into(),
            });
        }
        self.running.lock().unwrap().insert(spec.sandbox_id);
        Ok(StartedSandbox { envd_version: hearth_types::ENVD_VERSION.to_owned(), timings: Vec::new() })
    }

    async fn update_network(
        &self,
        sandbox_id: &SandboxId,
        egress: hearth_network::egress::EgressPolicy,
    ) -> Result<(), RuntimeError> {
        self.calls
            .lock()
            .unwrap()
            .push(RuntimeCall::UpdateNetwork(sandbox_id.clone(), egress));
        if self.running.lock().unwrap().contains(sandbox_id) {
            Ok(())
        } else {
            Err(RuntimeError::NotFound(sandbox_id.clone()))
        }
    }

    async fn discard_paused(&self, sandbox_id: &SandboxId) -> Result<(), RuntimeError> {
        self.paused.lock().unwrap().remove(sandbox_id);
        Ok(())
    }

    async fn paused(&self) -> Vec<SandboxId> {
        self.paused.lock().unwrap().iter().cloned().collect()
    }

    async fn snapshot(&self, sandbox_id: &SandboxId, target: SnapshotSpec) -> Result<(), RuntimeError> {
        self.calls.lock().unwrap().push(RuntimeCall::Snapshot(sandbox_id.clone(), target));
        if !self.running.lock().unwrap().contains(sandbox_id) {
            return Err(RuntimeError::NotFound(sandbox_id.clone()));
        }
        Ok(())
    }

    async fn delete_template(&self, _template_id: &hearth_types::TemplateId) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn fork(
        &self,
        sandbox_id: &SandboxId,
        forks: Vec<SandboxSpec>,
    ) -> Result<Vec<Result<StartedSandbox, RuntimeError>>, RuntimeError> {
        self.calls.lock().unwrap().push(RuntimeCall::Fork(sandbox_id.clone(), forks.clone()));
        if !self.running.lock().unwrap().contains(sandbox_id) {
            return Err(RuntimeError::NotFound(sandbox_id.clone()));
        }
        let mut running = self.running.lock().unwrap();
        Ok(forks
            .into_iter()
            .map(|spec| {
                running.insert(spec.sandbox_id);
                Ok(StartedSandbox { envd_version: hearth_types::ENVD_VERSION.to_owned(), timings: Vec::new() })
            })
            .collect())
    }
}

/// A template builder that records every spec, writes a configurable number of log lines
/// and then succeeds or fails as configured. It builds nothing.
pub struct RecordingBuilder {
    specs: Mutex<Vec<crate::builds::BuildSpec>>,
    failure: Mutex<Option<crate::builds::BuildFailure>>,
    log_lines: Mutex<usize>,
    /// While true, builds wait before they finish.
    held: tokio::sync::watch::Sender<bool>,
}

impl Default for RecordingBuilder {
    fn default() -> Self {
        Self {
            specs: Mutex::new(Vec::new()),
            failure: Mutex::new(None),
            log_lines: Mutex::new(3),
            held: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl RecordingBuilder {
    /// Creates a builder whose builds succeed after three log lines.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes later builds fail with `message` at `step`, or succeed again with `None`.
    pub fn fail_builds(&self, failure: Option<(&str, Option<&str>)>) {
        *self.failure.lock().unwrap() = failure.map(|(message, step)| crate::builds::BuildFailure {
            message: message.to_owned(),
            step: step.map(str::to_owned),
        });
    }

    /// Sets how many log lines each build writes: `line 0`, `line 1`, ... at level info.
    pub fn set_log_lines(&self, count: usize) {
        *self.log_lines.lock().unwrap() = count;
    }

    /// Holds builds (true) before they finish, or releases them (false).
    pub fn hold_builds(&self, held: bool) {
        self.held.send_replace(held);
    }

    /// Specs of the builds started so far, in order.
    pub fn specs(&self) -> Vec<crate::builds::BuildSpec> {
        self.specs.lock().unwrap().clone()
    }
}

#[async_trait]
impl crate::builds::TemplateBuilder for RecordingBuilder {
    async fn build(
        &self,
        spec: crate::builds::BuildSpec,
        log: std::sync::Arc<dyn crate::builds::BuildLog>,
    ) -> Result<crate::builds::BuildOutput, crate::builds::BuildFailure> {
        let output = crate::builds::BuildOutput {
            envd_version: hearth_types::ENVD_VERSION.to_owned(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk_mb: 1024,
        };
        self.specs.lock().unwrap().push(spec);
        let lines = *self.log_lines.lock().unwrap();
        for index in 0..lines {
            log.append(crate::builds::LogLevel::Info, Some("1"), &format!("line {index}"));
        }
        let mut held = self.held.subscribe();
        let _ = held.wait_for(|held| !*held).await;
        match self.failure.lock().unwrap().clone() {
            Some(failure) => Err(failure),
            None => Ok(output),
        }
    }
}
