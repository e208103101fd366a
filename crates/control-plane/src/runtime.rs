//! The boundary between the control plane and the node agent that runs sandboxes.
//!
//! `hearth serve` wires the node agent in process; a cluster puts an RPC client behind
//! the same trait.

use std::collections::HashMap;

use async_trait::async_trait;
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
    /// False when the request set `allow_internet_access: false`: the sandbox must not reach
    /// the internet. True when the request allowed it or left it unset.
    pub allow_internet_access: bool,
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
}
