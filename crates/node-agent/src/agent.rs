//! [`NodeAgent`]: sandbox start and stop on this host.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hearth_control_plane::runtime::{
    PausedSandbox, RuntimeError, SandboxRuntime, SandboxSpec, SnapshotSpec, StartedSandbox,
};
use hearth_network::domain_proxy::DomainProxy;
use hearth_network::egress::{self, EgressPolicy};
use hearth_network::{PoolError, Slot, SlotPool};
use hearth_proxy::{Route, RouteTable};
use hearth_storage::{
    DataDir, PauseRecord, SandboxPaths, SnapshotOrigin, TemplateManifest, PAUSE_FORMAT_VERSION,
};
use hearth_types::{BuildId, SandboxId, TemplateId};
use hearth_vmm::{
    DiskFormat, DiskSpec, MachineSize, RestoreSpec, SnapshotMemory, SnapshotTarget,
    SnapshotTemplate, Vm, VmPlacement, VmmDriver, VmmKind,
};

use crate::envd_client::{EnvdClient, InitRequest};
use crate::routes::Routes;

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
    /// The template build it started from (through any number of pauses).
    template: Arc<SnapshotTemplate>,
    template_id: TemplateId,
    build_id: BuildId,
    /// The sandbox's own disk.
    disk: DiskSpec,
    /// Memory file the VM maps copy-on-write. A diff snapshot is possible only when it
    /// is the sandbox's own paused memory file.
    memory_file: PathBuf,
    /// Pauses so far.
    generation: u32,
    envd_version: String,
    /// Egress policy in force.
    egress: EgressPolicy,
    /// Proxy for the policy's allowed domain names, while it has any.
    domain_proxy: Option<DomainProxy>,
    /// Token the proxy requires on the sandbox's ports, if any.
    traffic_access_token: Option<String>,
}

/// A sandbox's entry: `None` once a pause or stop has ended it, so a request that waited
/// for the lock finds that it is gone.
type SandboxCell = Arc<tokio::sync::Mutex<Option<RunningSandbox>>>;

/// Runs sandboxes on this host: implements the control plane's [`SandboxRuntime`] and the
/// proxy's [`RouteTable`].
pub struct NodeAgent {
    config: NodeConfig,
    driver: Arc<dyn VmmDriver>,
    slots: SlotPool,
    envd: EnvdClient,
    routes: Routes,
    sandboxes: Mutex<HashMap<SandboxId, SandboxCell>>,
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
            sandboxes: Mutex::new(HashMap::new()),
            snapshots: Mutex::new(HashMap::new()),
        }
    }

    /// Removes deleted template builds that the last sandbox using them no longer needs.
    fn sweep_deleted_templates(&self) {
        let removed = crate::template_files::sweep_deleted(&self.config.data_dir);
        if removed > 0 {
            tracing::info!(removed, "removed deleted template builds");
        }
    }

    /// The node's settings.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The VMM driver sandboxes and build VMs run with.
    pub fn driver(&self) -> &dyn VmmDriver {
        &*self.driver
    }

    /// Cleans the sandbox directories an earlier run of this server left behind and
    /// returns the paused sandboxes among them. A running sandbox does not survive a
    /// restart (its VMM dies with the server), so the run directory of every sandbox
    /// without a complete pause record is removed. Call it before the first start.
    pub fn recover(&self) -> Vec<SandboxId> {
        let dir = self.config.data_dir.sandboxes_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(err) => {
                tracing::error!(path = %dir.display(), error = %err, "failed to list sandbox directories");
                return Vec::new();
            }
        };
        let mut paused = Vec::new();
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let paths = SandboxPaths::new(entry.path());
            let record = SandboxId::parse(&name).ok().and_then(|id| match PauseRecord::load(&paths.pause_record()) {
                Ok(record) if record.sandbox_id == id.as_str() => Some(id),
                Ok(_) => None,
                Err(err) => {
                    if paths.paused_dir().exists() {
                        tracing::error!(sandbox_id = %name, error = %err, "paused state is incomplete; removing it");
                    }
                    None
                }
            });
            match record {
                Some(id) => paused.push(id),
                None => match std::fs::remove_dir_all(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(err) => {
                        tracing::error!(path = %entry.path().display(), error = %err, "failed to remove a stale sandbox directory")
                    }
                },
            }
        }
        if removed > 0 || !paused.is_empty() {
            tracing::info!(
                removed,
                paused = paused.len(),
                "cleaned sandbox directories of an earlier run"
            );
        }
        self.sweep_deleted_templates();
        paused.sort();
        paused
    }

    /// Finds sandboxes whose VMM process has exited on its own (killed, crashed), removes
    /// them and releases their slots and files. Returns their IDs; the control plane
    /// learns of them through [`SandboxRuntime::running`]. A sandbox busy with another
    /// operation is checked at the next call.
    pub async fn reap_dead_vms(&self) -> Vec<SandboxId> {
        let cells: Vec<(SandboxId, SandboxCell)> = self
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, cell)| (id.clone(), cell.clone()))
            .collect();
        let mut reaped = Vec::new();
        for (sandbox_id, cell) in cells {
            let Ok(mut guard) = cell.try_lock() else {
                continue;
            };
            let exited = guard.as_mut().is_some_and(|sandbox| !sandbox.vm.is_running());
            if !exited {
                continue;
            }
            let sandbox = guard.take().expect("checked above");
            tracing::warn!(sandbox_id = %sandbox_id, vmm_pid = sandbox.vm.pid(), "the sandbox's VMM exited on its own; removing the sandbox");
            self.forget(&sandbox_id);
            self.destroy(&sandbox_id, sandbox).await;
            reaped.push(sandbox_id);
        }
        reaped
    }

    /// Starts a task that calls [`NodeAgent::reap_dead_vms`] every `interval` for as long
    /// as the node agent exists.
    pub fn spawn_watchdog(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let node = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(node) = node.upgrade() else {
                    return;
                };
                node.reap_dead_vms().await;
            }
        })
    }

    /// Returns the slot pool, for metrics and template builds.
    pub fn slots(&self) -> &SlotPool {
        &self.slots
    }

    /// Stops every running sandbox and deletes every network slot of this instance.
    /// Paused sandboxes keep their files. Called when the server stops, after the control
    /// plane has stopped accepting creates.
    pub async fn shutdown(&self) -> Result<(), NodeError> {
        for sandbox_id in self.running().await {
            if let Err(err) = self.stop(&sandbox_id).await {
                tracing::error!(sandbox_id = %sandbox_id, error = %err, "failed to stop a sandbox during shutdown");
            }
        }
        let report = self.slots.shutdown().await.map_err(NodeError::Slots)?;
        tracing::info!(
            processes = report.processes,
            namespaces = report.namespaces,
            interfaces = report.interfaces,
            nft_table = report.nft_table,
            "network slots removed"
        );
        Ok(())
    }

    /// Returns the template build's snapshot, loading and checking it on first use only.
    fn snapshot_template(
        &self,
        template_id: &TemplateId,
        build_id: &BuildId,
    ) -> Result<Arc<SnapshotTemplate>, RuntimeError> {
        let key = (template_id.clone(), build_id.clone());
        if let Some(snapshot) = self
            .snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(snapshot.clone());
        }

        let unavailable = || RuntimeError::TemplateUnavailable {
            template_id: template_id.clone(),
            build_id: build_id.clone(),
        };
        let dir = self.config.data_dir.template_build(template_id, build_id);
        let snapshot = SnapshotTemplate::load(dir.dir()).map_err(|err| {
            tracing::error!(template_id = %template_id, build_id = %build_id, error = %err, "template build is not usable");
            unavailable()
        })?;
        if snapshot.vmm() != Some(self.driver.kind()) {
            tracing::error!(
                template_id = %template_id, build_id = %build_id,
                snapshot_vmm = %snapshot.manifest.vmm, driver = %self.driver.kind(),
                "template build was snapshotted by another VMM"
            );
            return Err(unavailable());
        }
        let snapshot = Arc::new(snapshot);
        self.snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, snapshot.clone());
        Ok(snapshot)
    }

    fn cell(&self, sandbox_id: &SandboxId) -> Option<SandboxCell> {
        self.sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sandbox_id)
            .cloned()
    }

    fn insert_running(&self, sandbox_id: &SandboxId, sandbox: RunningSandbox) {
        self.routes.insert(
            sandbox_id.as_str(),
            Route {
                address: sandbox.slot.guest_route_ip,
                traffic_access_token: sandbox.traffic_access_token.clone(),
            },
        );
        let cell = Arc::new(tokio::sync::Mutex::new(Some(sandbox)));
        self.sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sandbox_id.clone(), cell);
    }

    fn forget(&self, sandbox_id: &SandboxId) {
        self.routes.remove(sandbox_id.as_str());
        self.sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(sandbox_id);
    }

    /// Acquires a slot, restores `restore` (with its placement set to the slot and
    /// `run_dir`) and initialises envd. On error everything it took is released and the
    /// VM stopped; files are left to the caller.
    async fn restore_in_new_slot(
        &self,
        spec: &SandboxSpec,
        mut restore: RestoreSpec,
        run_dir: &Path,
        timings: &mut StartTimings,
        started: Instant,
    ) -> Result<Placed, RestoreFailure> {
        let before_run = |error| RestoreFailure { error, guest_ran: false };
        let slot = self
            .slots
            .acquire()
            .await
            .map_err(|err| before_run(RuntimeError::Capacity(err.to_string())))?;
        let mut mark = timings.record("slot", started);
        // The rules are loaded before the guest runs, so the guest never runs without them.
        let mut domain_proxy = None;
        if !spec.egress.is_open() {
            match apply_egress(&slot, &spec.egress, &mut domain_proxy, false).await {
                Ok(()) => {}
                Err(err) => {
                    self.release_slot(&spec.sandbox_id, slot).await;
                    return Err(before_run(err));
                }
            }
            mark = timings.record("egress_rule", mark);
        }
        restore.placement = VmPlacement {
            netns: Some(slot.netns.clone()),
            run_dir: run_dir.to_owned(),
        };
        let mut vm = match self.driver.restore(&restore).await {
            Ok(vm) => vm,
            Err(err) => {
                self.release_slot(&spec.sandbox_id, slot).await;
                return Err(before_run(RuntimeError::Failed(format!(
                    "failed to restore the snapshot: {err}"
                ))));
            }
        };
        let mark = timings.record("vmm_restore", mark);
        if let Err(err) = self.init_guest(spec, &slot, timings, mark).await {
            if let Err(stop_err) = vm.stop().await {
                tracing::error!(sandbox_id = %spec.sandbox_id, error = %stop_err, "failed to stop the VM of a failed start");
            }
            self.release_slot(&spec.sandbox_id, slot).await;
            // The restore had resumed the guest, so it may have written to its disk.
            return Err(RestoreFailure { error: err, guest_ran: true });
        }
        Ok(Placed { vm, slot, domain_proxy })
    }

    /// Like [`NodeAgent::restore_in_new_slot`] for a sandbox that did not exist before
    /// (a create or a fork): on error its run directory is removed too.
    async fn restore_new_sandbox(
        &self,
        spec: &SandboxSpec,
        restore: RestoreSpec,
        run_dir: &Path,
        timings: &mut StartTimings,
        mark: Instant,
    ) -> Result<Placed, RuntimeError> {
        let restored = self.restore_in_new_slot(spec, restore, run_dir, timings, mark).await;
        restored.map_err(|failure| {
            remove_dir(&spec.sandbox_id, run_dir);
            failure.error
        })
    }

    /// Initialises envd once it accepts connections. The init sets the guest's wall clock
    /// to the host's.
    async fn init_guest(
        &self,
        spec: &SandboxSpec,
        slot: &Slot,
        timings: &mut StartTimings,
        mark: Instant,
    ) -> Result<(), RuntimeError> {
        let request = InitRequest {
            env_vars: &spec.env_vars,
            access_token: spec.envd_access_token.as_deref(),
            previous_access_token: spec.previous_access_token.as_deref(),
            timestamp: String::new(),
            // The snapshot's envd already has the template's user and working directory
            // (`user` and its home for the base template); a resume must not reset them.
            default_user: None,
            default_workdir: None,
        };
        self.envd
            .init_when_ready(
                slot.guest_route_ip,
                &request,
                self.config.envd_ready_timeout,
            )
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

    /// Stops a sandbox whose VM cannot be kept and removes everything it used.
    async fn destroy(&self, sandbox_id: &SandboxId, mut sandbox: RunningSandbox) {
        if let Err(err) = sandbox.vm.stop().await {
            tracing::error!(sandbox_id = %sandbox_id, error = %err, "failed to stop the VMM");
        }
        self.release_slot(sandbox_id, sandbox.slot).await;
        remove_dir(sandbox_id, &sandbox.run_dir);
    }

    /// After a failed snapshot: runs the guest again and checks that envd responds. On
    /// success the sandbox is put back; otherwise it is destroyed. Returns the error to report.
    async fn recover_from_failed_snapshot(
        &self,
        sandbox_id: &SandboxId,
        mut sandbox: RunningSandbox,
        slot_guard: &mut Option<RunningSandbox>,
        reason: String,
    ) -> RuntimeError {
        let resumed = match sandbox.vm.resume().await {
            Ok(()) => self
                .envd
                .health(sandbox.slot.guest_route_ip, Duration::from_secs(10))
                .await
                .map_err(|err| err.to_string()),
            Err(err) => Err(err.to_string()),
        };
        match resumed {
            Ok(()) => {
                tracing::warn!(sandbox_id = %sandbox_id, reason = %reason, "snapshot failed; the sandbox runs on");
                *slot_guard = Some(sandbox);
                RuntimeError::PauseFailedRunning(reason)
            }
            Err(resume_err) => {
                tracing::error!(sandbox_id = %sandbox_id, reason = %reason, resume_error = %resume_err, "snapshot failed and the guest cannot run again; stopping it");
                self.forget(sandbox_id);
                self.destroy(sandbox_id, sandbox).await;
                RuntimeError::PauseFailedKilled(format!(
                    "{reason}; running the guest again failed: {resume_err}"
                ))
            }
        }
    }

    /// Checkpoints a running sandbox into `dir`: memory and device state through the VMM,
    /// and a copy of its disk as `disk_name`. The guest is paused while this runs and
    /// runs again afterwards unless `keep_paused`. Returns what was written, or the
    /// error (the sandbox is then running, or destroyed).
    async fn checkpoint(
        &self,
        sandbox_id: &SandboxId,
        guard: &mut Option<RunningSandbox>,
        dir: &Path,
        copy_disk_as: Option<&str>,
        diff: bool,
        keep_paused: bool,
    ) -> Result<Checkpoint, RuntimeError> {
        let mut sandbox = guard
            .take()
            .ok_or_else(|| RuntimeError::NotFound(sandbox_id.clone()))?;
        let target = SnapshotTarget {
            vmstate: dir.join("vmstate"),
            memory: if diff {
                sandbox.memory_file.clone()
            } else {
                dir.join("memory")
            },
            diff,
        };
        let written = async {
            std::fs::create_dir_all(dir)
                .map_err(|err| format!("failed to create {}: {err}", dir.display()))?;
            let report = sandbox
                .vm
                .snapshot(&target)
                .await
                .map_err(|err| format!("snapshot failed: {err}"))?;
            let disk_copy = match copy_disk_as {
                Some(name) => {
                    let to = dir.join(name);
                    let from = sandbox.disk.path.clone();
                    let copied = to.clone();
                    tokio::task::spawn_blocking(move || {
                        let _ = std::fs::remove_file(&copied);
                        hearth_storage::clone_sparse(&from, &copied).and_then(|bytes| {
                            hearth_storage::durable::sync_file(&copied)?;
                            Ok(bytes)
                        })
                    })
                    .await
                    .map_err(|err| format!("disk copy task failed: {err}"))?
                    .map_err(|err| format!("failed to copy the disk to {}: {err}", to.display()))?;
                    Some(to)
                }
                None => None,
            };
            Ok::<_, String>((report, disk_copy))
        }
        .await;
        let (report, disk_copy) = match written {
            Ok(written) => written,
            Err(reason) => {
                // Partial files are useless; a diff target is the VM's own memory, which stays.
                let _ = std::fs::remove_file(&target.vmstate);
                if !diff {
                    let _ = std::fs::remove_file(&target.memory);
                }
                return Err(self
                    .recover_from_failed_snapshot(sandbox_id, sandbox, guard, reason)
                    .await);
            }
        };
        let memory_file = match report.memory {
            SnapshotMemory::InVmstate => sandbox.template.memory_file(),
            SnapshotMemory::InMemoryFile => target.memory.clone(),
        };
        let checkpoint = Checkpoint {
            vmstate: target.vmstate.clone(),
            memory_file,
            own_memory: report.memory == SnapshotMemory::InMemoryFile,
            disk_copy,
            bytes_written: report.bytes_written,
        };
        if !keep_paused {
            if let Err(err) = sandbox.vm.resume().await {
                let reason = format!("the guest did not run again after the checkpoint: {err}");
                return Err(self
                    .recover_from_failed_snapshot(sandbox_id, sandbox, guard, reason)
                    .await);
            }
        }
        *guard = Some(sandbox);
        Ok(checkpoint)
    }

    /// Creates a sandbox from a checkpoint: its own disk copied from `disk`, a restore of
    /// `vmstate` over `memory_file`.
    async fn start_from_checkpoint(
        &self,
        spec: SandboxSpec,
        template: Arc<SnapshotTemplate>,
        checkpoint: &Checkpoint,
    ) -> Result<StartedSandbox, RuntimeError> {
        let started = Instant::now();
        let mut timings = StartTimings::default();
        let run_dir = self
            .config
            .data_dir
            .sandbox(&spec.sandbox_id)
            .dir()
            .to_path_buf();
        let disk_from = checkpoint
            .disk_copy
            .clone()
            .ok_or_else(|| RuntimeError::Failed("checkpoint has no disk".into()))?;
        let disk_format = self.driver.kind().sandbox_disk_format();
        let disk = DiskSpec {
            path: run_dir.join(match disk_format {
                DiskFormat::Qcow2 => "disk.qcow2",
                DiskFormat::Raw => "disk.raw",
            }),
            format: disk_format,
        };
        let disk_to = disk.path.clone();
        let dir = run_dir.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            hearth_storage::clone_sparse(&disk_from, &disk_to)
        })
        .await
        .map_err(|err| RuntimeError::Failed(format!("disk copy task failed: {err}")))?
        .map_err(|err| {
            remove_dir(&spec.sandbox_id, &run_dir);
            RuntimeError::Failed(format!("failed to copy the parent's disk: {err}"))
        })?;
        let mark = timings.record("disk", started);
        let restore = RestoreSpec {
            machine: MachineSize {
                vcpus: template.manifest.vcpus,
                memory_mib: template.manifest.memory_mib,
            },
            memory_file: checkpoint.memory_file.clone(),
            vmstate: checkpoint.vmstate.clone(),
            vmstate_has_memory: !checkpoint.own_memory,
            memory_shared: false,
            disk: disk.clone(),
            placement: VmPlacement {
                netns: None,
                run_dir: run_dir.clone(),
            },
        };
        let Placed { vm, slot, domain_proxy } = self
            .restore_new_sandbox(&spec, restore, &run_dir, &mut timings, mark)
            .await?;
        let envd_version = template.manifest.envd_version.clone();
        tracing::info!(sandbox_id = %spec.sandbox_id, vmm_pid = vm.pid(), start_ms = started.elapsed().as_secs_f64() * 1000.0, "sandbox started from a checkpoint");
        self.insert_running(
            &spec.sandbox_id,
            RunningSandbox {
                vm,
                slot,
                run_dir,
                template,
                template_id: spec.template_id.clone(),
                build_id: spec.build_id.clone(),
                disk,
                memory_file: checkpoint.memory_file.clone(),
                generation: 0,
                envd_version: envd_version.clone(),
                egress: spec.egress.clone(),
                domain_proxy,
                traffic_access_token: spec.traffic_access_token.clone(),
            },
        );
        Ok(StartedSandbox {
            envd_version,
            timings: timings.phases,
        })
    }
}

/// A restored VM in its slot.
struct Placed {
    vm: Box<dyn Vm>,
    slot: Slot,
    domain_proxy: Option<DomainProxy>,
}

/// Installs `policy` in `slot` and keeps `proxy` as the policy needs it: given the new
/// names, started when the policy has names and there is none, stopped once the rules no
/// longer send connections to it. The proxy is listening before the rules send
/// connections to it. `reset_connections` makes open connections follow the new rules too.
async fn apply_egress(
    slot: &Slot,
    policy: &EgressPolicy,
    proxy: &mut Option<DomainProxy>,
    reset_connections: bool,
) -> Result<(), RuntimeError> {
    if !policy.allow_domains.is_empty() {
        match proxy {
            Some(running) => running.set_domains(policy.allow_domains.clone()),
            None => {
                let started = DomainProxy::start(&slot.netns, policy.allow_domains.clone())
                    .await
                    .map_err(|err| RuntimeError::Failed(format!("failed to start the domain proxy: {err}")))?;
                *proxy = Some(started);
            }
        }
    }
    let slot = slot.clone();
    let policy_copy = policy.clone();
    tokio::task::spawn_blocking(move || egress::apply(&slot, &policy_copy, reset_connections))
        .await
        .map_err(|err| RuntimeError::Failed(format!("egress rule task failed: {err}")))?
        .map_err(|err| RuntimeError::Failed(format!("failed to install the egress rules: {err}")))?;
    if policy.allow_domains.is_empty() {
        *proxy = None;
    }
    Ok(())
}

/// A failed [`NodeAgent::restore_in_new_slot`].
struct RestoreFailure {
    error: RuntimeError,
    /// Whether the guest ran before the failure (envd or the egress rule failed after the
    /// restore), so that its disk may no longer match the snapshot.
    guest_ran: bool,
}

/// Files a checkpoint wrote.
struct Checkpoint {
    vmstate: PathBuf,
    /// Memory file a restore maps.
    memory_file: PathBuf,
    /// Whether `memory_file` is the checkpoint's own file (not the template's).
    own_memory: bool,
    disk_copy: Option<PathBuf>,
    bytes_written: u64,
}

fn disk_format_name(format: DiskFormat) -> &'static str {
    match format {
        DiskFormat::Qcow2 => "qcow2",
        DiskFormat::Raw => "raw",
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[async_trait]
impl SandboxRuntime for NodeAgent {
    async fn start(&self, spec: SandboxSpec) -> Result<StartedSandbox, RuntimeError> {
        let started = Instant::now();
        let mut timings = StartTimings::default();
        let template = self.snapshot_template(&spec.template_id, &spec.build_id)?;
        let manifest = &template.manifest;
        if manifest.vcpus != spec.vcpus || manifest.memory_mib != spec.memory_mib {
            tracing::warn!(
                sandbox_id = %spec.sandbox_id,
                requested_vcpus = spec.vcpus, requested_memory_mib = spec.memory_mib,
                snapshot_vcpus = manifest.vcpus, snapshot_memory_mib = manifest.memory_mib,
                "a snapshot restores with its own size; using the template's"
            );
        }

        let run_dir = self
            .config
            .data_dir
            .sandbox(&spec.sandbox_id)
            .dir()
            .to_path_buf();
        if let Err(err) = std::fs::create_dir_all(&run_dir) {
            return Err(RuntimeError::Failed(format!(
                "failed to create run directory {}: {err}",
                run_dir.display()
            )));
        }
        let disk = match template.create_disk(&run_dir, self.driver.kind()) {
            Ok(disk) => disk,
            Err(err) => {
                remove_dir(&spec.sandbox_id, &run_dir);
                return Err(RuntimeError::Failed(format!(
                    "failed to create the sandbox disk: {err}"
                )));
            }
        };
        let mark = timings.record("disk", started);
        // A placeholder slot: restore_in_new_slot sets the real placement.
        let restore = RestoreSpec {
            machine: MachineSize {
                vcpus: manifest.vcpus,
                memory_mib: manifest.memory_mib,
            },
            memory_file: template.memory_file(),
            vmstate: template.paths.vmstate(),
            vmstate_has_memory: template
                .manifest
                .snapshot
                .as_ref()
                .is_some_and(|origin| origin.memory_file != template.paths.memory()),
            memory_shared: false,
            disk: disk.clone(),
            placement: VmPlacement {
                netns: None,
                run_dir: run_dir.clone(),
            },
        };
        let Placed { vm, slot, domain_proxy } = self
            .restore_new_sandbox(&spec, restore, &run_dir, &mut timings, mark)
            .await?;

        tracing::info!(
            sandbox_id = %spec.sandbox_id,
            template_id = %spec.template_id,
            vmm_pid = vm.pid(),
            netns = %slot.netns,
            start_ms = started.elapsed().as_secs_f64() * 1000.0,
            "sandbox started"
        );
        let envd_version = template.manifest.envd_version.clone();
        let memory_file = template.memory_file();
        self.insert_running(
            &spec.sandbox_id,
            RunningSandbox {
                vm,
                slot,
                run_dir,
                template,
                template_id: spec.template_id.clone(),
                build_id: spec.build_id.clone(),
                disk,
                memory_file,
                generation: 0,
                envd_version: envd_version.clone(),
                egress: spec.egress.clone(),
                domain_proxy,
                traffic_access_token: spec.traffic_access_token.clone(),
            },
        );
        Ok(StartedSandbox {
            envd_version,
            timings: timings.phases,
        })
    }

    async fn stop(&self, sandbox_id: &SandboxId) -> Result<(), RuntimeError> {
        let Some(cell) = self.cell(sandbox_id) else {
            return Err(RuntimeError::NotFound(sandbox_id.clone()));
        };
        let mut guard = cell.lock().await;
        let Some(mut sandbox) = guard.take() else {
            return Err(RuntimeError::NotFound(sandbox_id.clone()));
        };
        self.forget(sandbox_id);

        let stopped = sandbox.vm.stop().await;
        if let Err(err) = &stopped {
            tracing::error!(sandbox_id = %sandbox_id, error = %err, "failed to stop the VMM");
        }
        self.release_slot(sandbox_id, sandbox.slot).await;
        remove_dir(sandbox_id, &sandbox.run_dir);
        self.sweep_deleted_templates();
        tracing::info!(sandbox_id = %sandbox_id, "sandbox stopped");
        stopped.map_err(|err| RuntimeError::Failed(format!("failed to stop the VMM: {err}")))
    }

    async fn running(&self) -> Vec<SandboxId> {
        let mut ids: Vec<SandboxId> = self
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        ids.sort();
        ids
    }

    async fn pause(&self, sandbox_id: &SandboxId) -> Result<PausedSandbox, RuntimeError> {
        let started = Instant::now();
        let Some(cell) = self.cell(sandbox_id) else {
            return Err(RuntimeError::NotFound(sandbox_id.clone()));
        };
        let mut guard = cell.lock().await;
        let Some(current) = guard.as_ref() else {
            return Err(RuntimeError::NotFound(sandbox_id.clone()));
        };
        let paths = SandboxPaths::new(&current.run_dir);
        let paused_dir = paths.paused_dir();
        let diff = current.memory_file == paused_dir.join("memory");
        let mut timings = StartTimings::default();

        let checkpoint = self
            .checkpoint(sandbox_id, &mut guard, &paused_dir, None, diff, true)
            .await?;
        let mark = timings.record("snapshot", started);
        let mut sandbox = guard
            .take()
            .expect("checkpoint puts the sandbox back on success");

        // The record goes last: the sandbox is paused on disk once it exists.
        let mut files = vec![checkpoint.vmstate.clone()];
        if checkpoint.own_memory {
            files.push(checkpoint.memory_file.clone());
        }
        let record = async {
            let sizes = files
                .iter()
                .map(|file| std::fs::metadata(file).map(|meta| (file.clone(), meta.len())))
                .collect::<Result<Vec<_>, _>>()?;
            let record = PauseRecord {
                format_version: PAUSE_FORMAT_VERSION,
                sandbox_id: sandbox_id.to_string(),
                template_id: sandbox.template_id.to_string(),
                build_id: sandbox.build_id.to_string(),
                vmm: self.driver.kind().as_str().into(),
                vcpus: sandbox.template.manifest.vcpus,
                memory_mib: sandbox.template.manifest.memory_mib,
                memory_file: checkpoint.memory_file.clone(),
                vmstate_file: checkpoint.vmstate.clone(),
                memory_in_vmstate: !checkpoint.own_memory,
                disk_file: sandbox.disk.path.clone(),
                disk_format: disk_format_name(sandbox.disk.format).into(),
                files: sizes,
                bytes_written: checkpoint.bytes_written,
                generation: sandbox.generation + 1,
                paused_at_unix_ms: unix_ms(),
                envd_version: sandbox.envd_version.clone(),
            };
            record
                .store(&paths.pause_record())
                .map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>(record)
        }
        .await;
        let record = match record {
            Ok(record) => record,
            Err(err) => {
                let _ = std::fs::remove_file(&checkpoint.vmstate);
                let reason = format!("failed to record the paused state: {err}");
                return Err(self
                    .recover_from_failed_snapshot(sandbox_id, sandbox, &mut guard, reason)
                    .await);
            }
        };
        let mark = timings.record("record", mark);

        self.forget(sandbox_id);
        if let Err(err) = sandbox.vm.stop().await {
            tracing::error!(sandbox_id = %sandbox_id, error = %err, "failed to stop the VMM of a paused sandbox");
        }
        // The VMM flushed the disk before the snapshot; make that durable too.
        if let Err(err) = hearth_storage::durable::sync_file(&sandbox.disk.path) {
            tracing::warn!(sandbox_id = %sandbox_id, error = %err, "failed to flush the paused sandbox's disk");
        }
        self.release_slot(sandbox_id, sandbox.slot).await;
        timings.record("stop", mark);
        tracing::info!(
            sandbox_id = %sandbox_id,
            generation = record.generation,
            bytes_written = record.bytes_written,
            diff,
            pause_ms = started.elapsed().as_secs_f64() * 1000.0,
            "sandbox paused"
        );
        Ok(PausedSandbox {
            bytes_written: record.bytes_written,
            timings: timings.phases,
        })
    }

    async fn resume(&self, spec: SandboxSpec) -> Result<StartedSandbox, RuntimeError> {
        let started = Instant::now();
        let sandbox_id = spec.sandbox_id.clone();
        if self.cell(&sandbox_id).is_some() {
            return Err(RuntimeError::Failed(format!(
                "sandbox {sandbox_id} is already running"
            )));
        }
        let unusable = |reason: String| RuntimeError::PausedStateUnusable {
            sandbox_id: sandbox_id.clone(),
            reason,
        };
        let paths = self.config.data_dir.sandbox(&sandbox_id);
        let record =
            PauseRecord::load(&paths.pause_record()).map_err(|err| unusable(err.to_string()))?;
        if record.vmm != self.driver.kind().as_str() {
            return Err(unusable(format!(
                "it was paused by {}, this node runs {}",
                record.vmm,
                self.driver.kind()
            )));
        }
        let template_id =
            TemplateId::parse(&record.template_id).map_err(|err| unusable(err.to_string()))?;
        let build_id = BuildId::parse(&record.build_id).map_err(|err| unusable(err.to_string()))?;
        let template = self.snapshot_template(&template_id, &build_id)?;
        let disk = DiskSpec {
            path: record.disk_file.clone(),
            format: if record.disk_format == "qcow2" {
                DiskFormat::Qcow2
            } else {
                DiskFormat::Raw
            },
        };
        let run_dir = paths.dir().to_path_buf();

        // While the guest runs, the paused state goes stale; mark it so that a crash in
        // between is not mistaken for a complete pause.
        let resuming = paths.paused_dir().join("pause.resuming.json");
        std::fs::rename(paths.pause_record(), &resuming).map_err(|err| {
            RuntimeError::Failed(format!(
                "failed to mark the paused state as resuming: {err}"
            ))
        })?;

        let mut timings = StartTimings::default();
        let mark = timings.record("load", started);
        // QEMU resumes with its RAM in the sandbox's own memory file, mapped shared: the
        // first resume fills it from the device state stream, and every later pause
        // flushes only the pages the guest changed. Firecracker maps its memory file
        // copy-on-write and writes diff snapshots into it instead.
        let in_place = self.driver.kind() == VmmKind::Qemu;
        let memory_file = if in_place {
            paths.paused_dir().join("memory")
        } else {
            record.memory_file.clone()
        };
        let restore = RestoreSpec {
            machine: MachineSize {
                vcpus: record.vcpus,
                memory_mib: record.memory_mib,
            },
            memory_file: memory_file.clone(),
            vmstate: record.vmstate_file.clone(),
            vmstate_has_memory: record.memory_in_vmstate,
            memory_shared: in_place,
            disk: disk.clone(),
            placement: VmPlacement {
                netns: None,
                run_dir: run_dir.clone(),
            },
        };
        let Placed { vm, slot, domain_proxy } = match self
            .restore_in_new_slot(&spec, restore, &run_dir, &mut timings, mark)
            .await
        {
            Ok(started) => started,
            Err(RestoreFailure { error, guest_ran: false }) => {
                // The guest never ran, so the saved state still matches the disk and a
                // later resume can try again.
                if let Err(rename_err) = std::fs::rename(&resuming, paths.pause_record()) {
                    tracing::error!(sandbox_id = %sandbox_id, error = %rename_err, "failed to restore the pause record after a failed resume");
                }
                return Err(error);
            }
            Err(RestoreFailure { error, guest_ran: true }) => {
                // The guest ran and may have changed its disk (and, for QEMU, its memory
                // file) after the saved device state: resuming that state again could
                // corrupt it. The record stays renamed, so the state counts as lost.
                tracing::error!(sandbox_id = %sandbox_id, error = %error, "resumed guest failed after it ran; its paused state is no longer usable");
                return Err(unusable(format!("the resumed guest failed after it ran ({error}), so its saved state no longer matches its disk")));
            }
        };
        // The device state is consumed. The memory file stays: the VM maps it, and the
        // next pause writes only the changes into it.
        let _ = std::fs::remove_file(&resuming);
        if in_place && record.memory_in_vmstate {
            // The restore has just written every page into the memory file's page cache.
            // Flushing it now, while the guest runs, keeps that write out of the next pause.
            let memory_file = memory_file.clone();
            let id = sandbox_id.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(err) = hearth_storage::durable::sync_file(&memory_file) {
                    tracing::warn!(sandbox_id = %id, error = %err, "failed to flush the memory file after the first resume");
                }
            });
        }
        // Unlinking a stream of every RAM page takes tens of milliseconds; the resumed
        // sandbox does not wait for it.
        let vmstate_file = record.vmstate_file.clone();
        tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_file(&vmstate_file);
        });
        let envd_version = record.envd_version.clone();
        tracing::info!(
            sandbox_id = %sandbox_id,
            generation = record.generation,
            vmm_pid = vm.pid(),
            paused_for_secs = unix_ms().saturating_sub(record.paused_at_unix_ms) / 1000,
            resume_ms = started.elapsed().as_secs_f64() * 1000.0,
            "sandbox resumed"
        );
        self.insert_running(
            &sandbox_id,
            RunningSandbox {
                vm,
                slot,
                run_dir,
                template,
                template_id,
                build_id,
                disk,
                memory_file,
                generation: record.generation,
                envd_version: envd_version.clone(),
                egress: spec.egress.clone(),
                domain_proxy,
                traffic_access_token: spec.traffic_access_token.clone(),
            },
        );
        Ok(StartedSandbox {
            envd_version,
            timings: timings.phases,
        })
    }

    async fn update_network(&self, sandbox_id: &SandboxId, policy: EgressPolicy) -> Result<(), RuntimeError> {
        let Some(cell) = self.cell(sandbox_id) else {
            return Err(RuntimeError::NotFound(sandbox_id.clone()));
        };
        let mut guard = cell.lock().await;
        let Some(sandbox) = guard.as_mut() else {
            return Err(RuntimeError::NotFound(sandbox_id.clone()));
        };
        let started = Instant::now();
        // On failure nft has kept the old rules, and the proxy they may use is kept too.
        apply_egress(&sandbox.slot, &policy, &mut sandbox.domain_proxy, true).await?;
        sandbox.egress = policy;
        tracing::info!(
            sandbox_id = %sandbox_id,
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "egress rules replaced"
        );
        Ok(())
    }

    async fn discard_paused(&self, sandbox_id: &SandboxId) -> Result<(), RuntimeError> {
        if self.cell(sandbox_id).is_some() {
            return Err(RuntimeError::Failed(format!(
                "sandbox {sandbox_id} is running, not paused"
            )));
        }
        let dir = self.config.data_dir.sandbox(sandbox_id).dir().to_path_buf();
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                tracing::info!(sandbox_id = %sandbox_id, "paused sandbox deleted");
                self.sweep_deleted_templates();
                Ok(())
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(RuntimeError::Failed(format!(
                "failed to delete {}: {err}",
                dir.display()
            ))),
        }
    }

    async fn paused(&self) -> Vec<SandboxId> {
        let dir = self.config.data_dir.sandboxes_dir();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut ids: Vec<SandboxId> = entries
            .flatten()
            .filter_map(|entry| SandboxId::parse(&entry.file_name().to_string_lossy()).ok())
            .filter(|id| self.config.data_dir.sandbox(id).pause_record().is_file())
            .collect();
        ids.sort();
        ids
    }

    async fn delete_template(&self, template_id: &TemplateId) -> Result<(), RuntimeError> {
        self.snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(id, _), _| id != template_id);
        let data_dir = self.config.data_dir.clone();
        let id = template_id.clone();
        let outcome = tokio::task::spawn_blocking(move || crate::template_files::delete_template(&data_dir, &id))
            .await
            .map_err(|err| RuntimeError::Failed(format!("template deletion task failed: {err}")))?
            .map_err(|err| RuntimeError::Failed(format!("failed to delete the files of template {template_id}: {err}")))?;
        tracing::info!(
            template_id = %template_id,
            removed = outcome.removed,
            kept_for_sandboxes = outcome.kept,
            "template files deleted"
        );
        Ok(())
    }

    async fn snapshot(
        &self,
        sandbox_id: &SandboxId,
        target: SnapshotSpec,
    ) -> Result<(), RuntimeError> {
        let started = Instant::now();
        let Some(cell) = self.cell(sandbox_id) else {
            return Err(RuntimeError::NotFound(sandbox_id.clone()));
        };
        let mut guard = cell.lock().await;
        let Some(current) = guard.as_ref() else {
            return Err(RuntimeError::NotFound(sandbox_id.clone()));
        };
        let base_manifest = current.template.manifest.clone();
        let disk_format = current.disk.format;
        let disk_name = format!("disk.{}", disk_format_name(disk_format));
        let staging = self
            .config
            .data_dir
            .template_build_staging(&target.template_id, &target.build_id);
        let _ = std::fs::remove_dir_all(&staging);

        let checkpoint = match self
            .checkpoint(
                sandbox_id,
                &mut guard,
                &staging,
                Some(&disk_name),
                false,
                false,
            )
            .await
        {
            Ok(checkpoint) => checkpoint,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(err);
            }
        };
        drop(guard);

        let final_dir = self
            .config
            .data_dir
            .template_build(&target.template_id, &target.build_id);
        let written = (|| {
            let mut names = vec!["vmstate".to_owned(), disk_name.clone()];
            if checkpoint.own_memory {
                names.push("memory".to_owned());
            }
            let files = names
                .into_iter()
                .map(|name| {
                    let size_bytes = std::fs::metadata(staging.join(&name))?.len();
                    Ok(hearth_storage::ManifestFile {
                        name,
                        size_bytes,
                        sha256: None,
                    })
                })
                .collect::<std::io::Result<Vec<_>>>()?;
            let memory_file = if checkpoint.own_memory {
                final_dir.memory()
            } else {
                checkpoint.memory_file.clone()
            };
            let manifest = TemplateManifest {
                template_id: target.template_id.to_string(),
                build_id: target.build_id.to_string(),
                files,
                created_at_unix_secs: unix_ms() / 1000,
                vmm: self.driver.kind().as_str().into(),
                snapshot: Some(SnapshotOrigin {
                    sandbox_id: sandbox_id.to_string(),
                    memory_file,
                    disk_file: disk_name.clone(),
                    disk_format: disk_format_name(disk_format).into(),
                }),
                ..base_manifest
            };
            hearth_storage::durable::sync_file(&checkpoint.vmstate)?;
            manifest
                .store(&staging.join("manifest.json"))
                .map_err(std::io::Error::other)?;
            if let Some(parent) = final_dir.dir().parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::rename(&staging, final_dir.dir())?;
            if let Some(parent) = final_dir.dir().parent() {
                hearth_storage::durable::sync_dir(parent)?;
            }
            Ok::<_, std::io::Error>(())
        })();
        if let Err(err) = written {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(RuntimeError::Failed(format!(
                "failed to write snapshot {}: {err}",
                target.template_id
            )));
        }
        tracing::info!(
            sandbox_id = %sandbox_id,
            template_id = %target.template_id,
            build_id = %target.build_id,
            bytes_written = checkpoint.bytes_written,
            snapshot_ms = started.elapsed().as_secs_f64() * 1000.0,
            "snapshot written"
        );
        Ok(())
    }

    async fn fork(
        &self,
        sandbox_id: &SandboxId,
        forks: Vec<SandboxSpec>,
    ) -> Result<Vec<Result<StartedSandbox, RuntimeError>>, RuntimeError> {
        let started = Instant::now();
        let Some(cell) = self.cell(sandbox_id) else {
            return Err(RuntimeError::NotFound(sandbox_id.clone()));
        };
        let mut guard = cell.lock().await;
        let Some(current) = guard.as_ref() else {
            return Err(RuntimeError::NotFound(sandbox_id.clone()));
        };
        let template = current.template.clone();
        let disk_name = format!("disk.{}", disk_format_name(current.disk.format));
        let dir = current.run_dir.join(format!("fork-{}", unix_ms()));
        let checkpoint = self
            .checkpoint(sandbox_id, &mut guard, &dir, Some(&disk_name), false, false)
            .await;
        drop(guard);
        let checkpoint = match checkpoint {
            Ok(checkpoint) => checkpoint,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(err);
            }
        };
        let checkpoint_ms = started.elapsed().as_secs_f64() * 1000.0;

        let mut results = Vec::with_capacity(forks.len());
        for spec in forks {
            results.push(
                self.start_from_checkpoint(spec, template.clone(), &checkpoint)
                    .await,
            );
        }
        // Every fork has read the device state and copied the disk; a memory file of its
        // own stays mapped by the forks after this unlink.
        let _ = std::fs::remove_dir_all(&dir);
        tracing::info!(
            sandbox_id = %sandbox_id,
            forks = results.len(),
            failed = results.iter().filter(|result| result.is_err()).count(),
            checkpoint_ms,
            fork_ms = started.elapsed().as_secs_f64() * 1000.0,
            "sandbox forked"
        );
        Ok(results)
    }
}

impl RouteTable for NodeAgent {
    fn lookup(&self, sandbox_id: &str) -> Option<Route> {
        self.routes.lookup(sandbox_id)
    }
}

fn remove_dir(sandbox_id: &SandboxId, dir: &Path) {
    if let Err(err) = std::fs::remove_dir_all(dir) {
        if err.kind() != std::io::ErrorKind::NotFound {
            tracing::error!(sandbox_id = %sandbox_id, path = %dir.display(), error = %err, "failed to remove the sandbox directory");
        }
    }
}
