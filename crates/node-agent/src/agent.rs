//! [`NodeAgent`]: sandbox start and stop on this host.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hearth_control_plane::runtime::{RuntimeError, SandboxRuntime, SandboxSpec, StartedSandbox};
use hearth_network::{PoolError, Slot, SlotPool};
use hearth_proxy::{Route, RouteTable};
use hearth_storage::DataDir;
use hearth_types::{BuildId, SandboxId, TemplateId};
use hearth_vmm::{SnapshotTemplate, Vm, VmmDriver};

use crate::envd_client::{EnvdClient, InitRequest};
use crate::routes::Routes;

/// User that commands run as unless a request names one, as in E2B's base image.
const DEFAULT_USER: &str = "user";

/// Working directory of commands unless a request names one.
const DEFAULT_WORKDIR: &str = "/home/user";

/// Settings of a [`NodeAgent`].
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Data directory holding template builds and sandbox run directories.
    pub data_dir: DataDir,
    /// Time a restored guest's envd gets to accept `/init` before the start fails.
    pub envd_ready_timeout: Duration,
}

/// Errors of the node agent outside the runtime interface.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("failed to release the network slots")]
    Slots(#[source] PoolError),
}

/// One sandbox running on this node.
struct RunningSandbox {
    vm: Box<dyn Vm>,
    slot: Slot,
    run_dir: PathBuf,
}

/// Runs sandboxes on this host: implements the control plane's [`SandboxRuntime`] and the
/// proxy's [`RouteTable`].
pub struct NodeAgent {
    config: NodeConfig,
    driver: Arc<dyn VmmDriver>,
    slots: SlotPool,
    envd: EnvdClient,
    routes: Routes,
    sandboxes: tokio::sync::Mutex<HashMap<SandboxId, RunningSandbox>>,
    /// Template builds already loaded, so a start reads no file for them.
    snapshots: Mutex<HashMap<(TemplateId, BuildId), Arc<SnapshotTemplate>>>,
}

/// Phase timings of one start, reported in the create response's `Server-Timing` header.
#[derive(Default)]
struct StartTimings {
    phases: Vec<(&'static str, Duration)>,
}

impl StartTimings {
    fn record(&mut self, name: &'static str, since: Instant) -> Instant {
        let now = Instant::now();
        self.phases.push((name, now - since));
        now
    }
}

impl NodeAgent {
    /// Creates a node agent that runs VMs with `driver` in slots from `slots`.
    pub fn new(config: NodeConfig, driver: Arc<dyn VmmDriver>, slots: SlotPool) -> Self {
        Self {
            config,
            driver,
            slots,
            envd: EnvdClient::new(),
            routes: Routes::default(),
            sandboxes: tokio::sync::Mutex::new(HashMap::new()),
            snapshots: Mutex::new(HashMap::new()),
        }
    }

    /// Removes the run directories that an earlier run of this server left behind. No
    /// sandbox survives a restart (its VMM dies with the server), so at start-up every run
    /// directory is stale. Call it before the first start.
    pub fn sweep_run_dirs(&self) {
        let dir = self.config.data_dir.sandboxes_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return,
            Err(err) => {
                tracing::error!(path = %dir.display(), error = %err, "failed to list sandbox run directories");
                return;
            }
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => removed += 1,
                Err(err) => tracing::error!(path = %entry.path().display(), error = %err, "failed to remove a stale sandbox run directory"),
            }
        }
        if removed > 0 {
            tracing::info!(removed, "removed run directories of sandboxes from an earlier run");
        }
    }

    /// Returns the slot pool, for metrics and template builds.
    pub fn slots(&self) -> &SlotPool {
        &self.slots
    }

    /// Stops every sandbox and deletes every network slot of this instance. Called when
    /// the server stops, after the control plane has stopped accepting creates.
    pub async fn shutdown(&self) -> Result<(), NodeError> {
        let ids: Vec<SandboxId> = self.sandboxes.lock().await.keys().cloned().collect();
        for sandbox_id in ids {
            if let Err(err) = self.stop(&sandbox_id).await {
                tracing::error!(sandbox_id = %sandbox_id, error = %err, "failed to stop a sandbox during shutdown");
            }
        }
        let report = self.slots.shutdown().await.map_err(NodeError::Slots)?;
        tracing::info!(
            namespaces = report.namespaces,
            interfaces = report.interfaces,
            nft_table = report.nft_table,
            "network slots removed"
        );
        Ok(())
    }

    /// Returns the template build's snapshot, loading and checking it on first use only.
    fn snapshot(&self, template_id: &TemplateId, build_id: &BuildId) -> Result<Arc<SnapshotTemplate>, RuntimeError> {
        let key = (template_id.clone(), build_id.clone());
        if let Some(snapshot) = self.snapshots.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(snapshot.clone());
        }

        let dir = self.config.data_dir.template_build(template_id, build_id);
        let snapshot = SnapshotTemplate::load(dir.dir()).map_err(|err| {
            tracing::error!(template_id = %template_id, build_id = %build_id, error = %err, "template build is not usable");
            RuntimeError::TemplateUnavailable { template_id: template_id.clone(), build_id: build_id.clone() }
        })?;
        let snapshot = Arc::new(snapshot);
        self.snapshots.lock().unwrap_or_else(|p| p.into_inner()).insert(key, snapshot.clone());
        Ok(snapshot)
    }

    /// Restores the VM and initialises envd in an acquired slot. On error the caller
    /// releases the slot; this function stops the VM it started.
    async fn start_in_slot(
        &self,
        spec: &SandboxSpec,
        snapshot: &SnapshotTemplate,
        slot: &Slot,
        run_dir: &std::path::Path,
        timings: &mut StartTimings,
        mut mark: Instant,
    ) -> Result<Box<dyn Vm>, RuntimeError> {
        let disk = snapshot
            .create_disk(run_dir)
            .map_err(|err| RuntimeError::Failed(format!("failed to create the sandbox disk: {err}")))?;
        mark = timings.record("disk", mark);

        let restore = snapshot.restore_spec(disk, slot, run_dir);
        let mut vm = self
            .driver
            .restore(&restore)
            .await
            .map_err(|err| RuntimeError::Failed(format!("failed to restore the template snapshot: {err}")))?;
        mark = timings.record("vmm_restore", mark);

        if let Err(err) = self.init_guest(spec, slot, timings, mark).await {
            if let Err(stop_err) = vm.stop().await {
                tracing::error!(sandbox_id = %spec.sandbox_id, error = %stop_err, "failed to stop the VM of a failed start");
            }
            return Err(err);
        }
        Ok(vm)
    }

    /// Applies the egress rule and initialises envd once it accepts connections.
    async fn init_guest(
        &self,
        spec: &SandboxSpec,
        slot: &Slot,
        timings: &mut StartTimings,
        mark: Instant,
    ) -> Result<(), RuntimeError> {
        let mut mark = mark;
        if !spec.allow_internet_access {
            let slot = slot.clone();
            tokio::task::spawn_blocking(move || hearth_network::egress::set_internet_access(&slot, false))
                .await
                .map_err(|err| RuntimeError::Failed(format!("egress rule task failed: {err}")))?
                .map_err(|err| RuntimeError::Failed(format!("failed to block internet access: {err}")))?;
            mark = timings.record("egress_rule", mark);
        }

        let request = InitRequest {
            env_vars: &spec.env_vars,
            access_token: spec.envd_access_token.as_deref(),
            timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            default_user: DEFAULT_USER,
            default_workdir: DEFAULT_WORKDIR,
        };
        self.envd
            .init_when_ready(slot.guest_route_ip, &request, self.config.envd_ready_timeout)
            .await
            .map_err(|err| RuntimeError::Failed(err.to_string()))?;
        timings.record("envd_init", mark);
        Ok(())
    }

    async fn release_slot(&self, sandbox_id: &SandboxId, slot: Slot) {
        if let Err(err) = self.slots.release(slot).await {
            tracing::error!(sandbox_id = %sandbox_id, error = %err, "failed to release a network slot");
        }
    }
}

#[async_trait]
impl SandboxRuntime for NodeAgent {
    async fn start(&self, spec: SandboxSpec) -> Result<StartedSandbox, RuntimeError> {
        let started = Instant::now();
        let mut timings = StartTimings::default();
        let snapshot = self.snapshot(&spec.template_id, &spec.build_id)?;
        let manifest = &snapshot.manifest;
        if manifest.vcpus != spec.vcpus || manifest.memory_mib != spec.memory_mib {
            tracing::warn!(
                sandbox_id = %spec.sandbox_id,
                requested_vcpus = spec.vcpus, requested_memory_mib = spec.memory_mib,
                snapshot_vcpus = manifest.vcpus, snapshot_memory_mib = manifest.memory_mib,
                "a snapshot restores with its own size; using the template's"
            );
        }

        let slot = self.slots.acquire().await.map_err(|err| RuntimeError::Capacity(err.to_string()))?;
        let mark = timings.record("slot", started);

        let run_dir = self.config.data_dir.sandbox(&spec.sandbox_id).dir().to_path_buf();
        if let Err(err) = std::fs::create_dir_all(&run_dir) {
            self.release_slot(&spec.sandbox_id, slot).await;
            return Err(RuntimeError::Failed(format!("failed to create run directory {}: {err}", run_dir.display())));
        }

        let vm = match self.start_in_slot(&spec, &snapshot, &slot, &run_dir, &mut timings, mark).await {
            Ok(vm) => vm,
            Err(err) => {
                self.release_slot(&spec.sandbox_id, slot).await;
                remove_run_dir(&spec.sandbox_id, &run_dir);
                return Err(err);
            }
        };

        self.routes.insert(
            spec.sandbox_id.as_str(),
            Route { address: slot.guest_route_ip, traffic_access_token: None },
        );
        tracing::info!(
            sandbox_id = %spec.sandbox_id,
            template_id = %spec.template_id,
            vmm_pid = vm.pid(),
            netns = %slot.netns,
            start_ms = started.elapsed().as_secs_f64() * 1000.0,
            "sandbox started"
        );
        self.sandboxes.lock().await.insert(spec.sandbox_id.clone(), RunningSandbox { vm, slot, run_dir });

        Ok(StartedSandbox { envd_version: snapshot.manifest.envd_version.clone(), timings: timings.phases })
    }

    async fn stop(&self, sandbox_id: &SandboxId) -> Result<(), RuntimeError> {
        let Some(mut sandbox) = self.sandboxes.lock().await.remove(sandbox_id) else {
            return Err(RuntimeError::NotFound(sandbox_id.clone()));
        };
        self.routes.remove(sandbox_id.as_str());

        let stopped = sandbox.vm.stop().await;
        if let Err(err) = &stopped {
            tracing::error!(sandbox_id = %sandbox_id, error = %err, "failed to stop the VMM");
        }
        self.release_slot(sandbox_id, sandbox.slot).await;
        remove_run_dir(sandbox_id, &sandbox.run_dir);
        tracing::info!(sandbox_id = %sandbox_id, "sandbox stopped");
        stopped.map_err(|err| RuntimeError::Failed(format!("failed to stop the VMM: {err}")))
    }

    async fn running(&self) -> Vec<SandboxId> {
        self.sandboxes.lock().await.keys().cloned().collect()
    }
}

impl RouteTable for NodeAgent {
    fn lookup(&self, sandbox_id: &str) -> Option<Route> {
        self.routes.lookup(sandbox_id)
    }
}

fn remove_run_dir(sandbox_id: &SandboxId, run_dir: &std::path::Path) {
    if let Err(err) = std::fs::remove_dir_all(run_dir) {
        if err.kind() != std::io::ErrorKind::NotFound {
            tracing::error!(sandbox_id = %sandbox_id, path = %run_dir.display(), error = %err, "failed to remove the sandbox run directory");
        }
    }
}
