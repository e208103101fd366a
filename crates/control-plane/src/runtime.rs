//! The boundary between the control plane and the node agent that runs sandboxes.
//!
//! `hearth serve` wires the node agent in process; a cluster puts an RPC client behind
//! the same trait.

use std::collections::HashMap;

use async_trait::async_trait;
use hearth_network::egress::EgressPolicy;
use hearth_types::{BuildId, SandboxId, TemplateId};

/// Request to the node agent to start one sandbox.
#[derive(Clone, Debug)]
pub struct SandboxSpec {
    /// ID the control plane chose for the sandbox.
    pub sandbox_id: SandboxId,
    /// Template the sandbox starts from.
    pub template_id: TemplateId,
    /// Build of that template whose snapshot is restored.
    pub build_id: BuildId,
    /// Virtual CPUs; must match the template's snapshot.
    pub vcpus: u32,
    /// Guest memory in MiB; must match the template's snapshot.
    pub memory_mib: u32,
    /// Environment variables every process in the sandbox inherits.
    pub env_vars: HashMap<String, String>,
    /// Token envd requires in `X-Access-Token` when the sandbox was created with `secure`.
    pub envd_access_token: Option<String>,
    /// Token the restored guest's envd already requires, when the snapshot came from a
    /// secured sandbox. `/init` sends it so that envd accepts the new token.
    pub previous_access_token: Option<String>,
    /// Destinations the sandbox may and may not open connections to.
    pub egress: EgressPolicy,
    /// Token the proxy requires on the sandbox's ports (other than envd's), if any.
    pub traffic_access_token: Option<String>,
}

/// A sandbox the node agent has started, with envd initialised.
#[derive(Clone, Debug)]
pub struct StartedSandbox {
    /// Version of envd running in the guest.
    pub envd_version: String,
    /// Durations of the start's phases, in order, as `(name, duration)`. The create
    /// response reports them in a `Server-Timing` header beside the whole request's time.
    pub timings: Vec<(&'static str, std::time::Duration)>,
}

/// Outcome of a pause.
#[derive(Clone, Debug)]
pub struct PausedSandbox {
    /// Bytes the pause wrote (memory and device state).
    pub bytes_written: u64,
    /// Durations of the pause's phases, in order.
    pub timings: Vec<(&'static str, std::time::Duration)>,
}

/// A named snapshot to write from a running sandbox: a new template build.
#[derive(Clone, Debug)]
pub struct SnapshotSpec {
    /// Template ID of the snapshot.
    pub template_id: TemplateId,
    /// Build ID of the snapshot.
    pub build_id: BuildId,
}

/// Errors a node agent reports to the control plane.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The template build has no artifacts on this node.
    #[error("template {template_id} build {build_id} is not available on this node")]
    TemplateUnavailable { template_id: TemplateId, build_id: BuildId },
    /// The node has no room for another sandbox (slots, memory).
    #[error("node is out of capacity: {0}")]
    Capacity(String),
    /// The sandbox is not running on this node.
    #[error("sandbox {0} is not running on this node")]
    NotFound(SandboxId),
    /// Starting or stopping failed. The message names the failed step.
    #[error("{0}")]
    Failed(String),
    /// A pause (or a snapshot) failed and the sandbox still runs and responds.
    #[error("{0}; the sandbox is still running")]
    PauseFailedRunning(String),
    /// A pause (or a snapshot) failed and the sandbox could not be kept running: it was
    /// stopped and its files removed.
    #[error("{0}; the sandbox was stopped")]
    PauseFailedKilled(String),
    /// The paused sandbox has no usable paused state on this node.
    #[error("paused sandbox {sandbox_id} cannot be resumed: {reason}")]
    PausedStateUnusable { sandbox_id: SandboxId, reason: String },
}

/// Runs sandboxes on a node.
#[async_trait]
pub trait SandboxRuntime: Send + Sync + 'static {
    /// Starts a sandbox and returns once its envd has accepted `/init`.
    async fn start(&self, spec: SandboxSpec) -> Result<StartedSandbox, RuntimeError>;

    /// Stops a sandbox and removes everything it used on the node.
    async fn stop(&self, sandbox_id: &SandboxId) -> Result<(), RuntimeError>;

    /// IDs of the sandboxes running on this node, for reconciliation after a restart.
    async fn running(&self) -> Vec<SandboxId>;

    /// Writes the sandbox's memory, device state and disk next to the template's and stops
    /// its VM. On error the sandbox either still runs ([`RuntimeError::PauseFailedRunning`])
    /// or was stopped ([`RuntimeError::PauseFailedKilled`]); it is never left frozen.
    async fn pause(&self, sandbox_id: &SandboxId) -> Result<PausedSandbox, RuntimeError>;

    /// Restores a paused sandbox and initialises envd again (clock, env vars, token).
    /// On error the sandbox stays paused with its files untouched.
    async fn resume(&self, spec: SandboxSpec) -> Result<StartedSandbox, RuntimeError>;

    /// Replaces a running sandbox's egress policy. New connections follow it at once; open
    /// ones are judged again at their next packet.
    async fn update_network(&self, sandbox_id: &SandboxId, egress: EgressPolicy) -> Result<(), RuntimeError>;

    /// Deletes a paused sandbox's files.
    async fn discard_paused(&self, sandbox_id: &SandboxId) -> Result<(), RuntimeError>;

    /// IDs of the paused sandboxes whose state is complete on this node.
    async fn paused(&self) -> Vec<SandboxId>;

    /// Checkpoints a running sandbox (it keeps running) into a new template build.
    async fn snapshot(&self, sandbox_id: &SandboxId, target: SnapshotSpec) -> Result<(), RuntimeError>;

    /// Deletes a template's files from this node. The caller has checked that no sandbox
    /// or other template needs them.
    async fn delete_template(&self, template_id: &TemplateId) -> Result<(), RuntimeError>;

    /// Checkpoints a running sandbox once (it keeps running) and starts one sandbox per
    /// entry of `forks` from that checkpoint. The outer error fails all forks; each fork
    /// succeeds or fails on its own.
    async fn fork(
        &self,
        sandbox_id: &SandboxId,
        forks: Vec<SandboxSpec>,
    ) -> Result<Vec<Result<StartedSandbox, RuntimeError>>, RuntimeError>;
}
