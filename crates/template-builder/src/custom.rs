//! Builds of user templates: a root filesystem from an image (or another template), build
//! steps run inside a build VM of that filesystem, a start command awaited until ready,
//! then the snapshot every sandbox of the template restores.
//!
//! The build VM boots Hearth's kernel and initramfs with the image as its root disk and
//! envd as PID 1. Each step that changes files runs on a qcow2 layer of its own, added to
//! the running VM with [`Vm::push_disk_layer`]. A finished step's layer is kept in the
//! layer cache under a key that hashes the base, every step before it and the step itself,
//! so a rebuild boots on the longest run of cached layers and reruns only the steps after
//! the first change.
//!
//! The result is published like the base template: the build directory is written under
//! a staging name and renamed into place after its manifest, written last, checks out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hearth_network::Slot;
use hearth_storage::qcow2::{create_overlay_over, BackingFormat};
use hearth_storage::{DataDir, GuestConfig, TemplateBuildPaths, TemplateManifest, MANIFEST_FORMAT_VERSION};
use hearth_types::guest::ENVD_PORT;
use hearth_types::{BuildId, TemplateId};
use hearth_vmm::{BootSpec, DiskFormat, DiskSpec, MachineSize, SnapshotTarget, Vm, VmPlacement, VmmDriver};
use sha2::{Digest, Sha256};

use crate::command::run;
use crate::guest::{BackgroundStatus, GuestAgent, OutputStream, RunSpec};

/// Version of the layer cache's key scheme; changing how a step runs changes it.
const LAYER_KEY_VERSION: &str = "hearth-layer-v1";

/// Path of envd in every template's root filesystem.
pub const GUEST_ENVD: &str = "/usr/bin/envd";

/// Directory in the build VM where copy archives are staged (a tmpfs).
const GUEST_STAGING: &str = "/tmp/.hearth-build";

/// Lines of a failed command's output quoted in the build error.
const FAILURE_TAIL_LINES: usize = 20;

/// Boots of the build VM tried before the build fails; each gets an equal share of
/// [`CustomBuildOptions::boot_timeout`].
const BOOT_ATTEMPTS: u32 = 3;

/// Interval between two runs of the ready check.
const READY_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The root filesystem a build starts from.
#[derive(Clone, Debug)]
pub enum BaseDisk {
    /// A raw ext4 image prepared by [`crate::base_disk`], identified by `key`, with the
    /// defaults of the image it came from.
    Prepared { path: PathBuf, key: String, defaults: GuestConfig },
}

impl BaseDisk {
    fn path(&self) -> &Path {
        match self {
            BaseDisk::Prepared { path, .. } => path,
        }
    }

    fn key(&self) -> &str {
        match self {
            BaseDisk::Prepared { key, .. } => key,
        }
    }

    /// User, working directory and environment the base starts with.
    pub fn defaults(&self) -> &GuestConfig {
        match self {
            BaseDisk::Prepared { defaults, .. } => defaults,
        }
    }
}

/// One step of a build plan.
#[derive(Clone, Debug)]
pub enum PlanStep {
    /// Runs `argv` as `user` (the current user when `None`) in the current working
    /// directory, with the current environment plus `extra_env`.
    Run { argv: Vec<String>, user: Option<String>, extra_env: Vec<(String, String)>, force: bool },
    /// Extracts `archive` (a plain tar) at `dest` with `envd build-copy`. `single_file`
    /// means the archive contains one file written at `dest` itself, unless `dest` is an
    /// existing directory. `content_hash` identifies the archive's content for the cache.
    Copy {
        archive: PathBuf,
        content_hash: String,
        dest: String,
        owner: Option<String>,
        mode: Option<u32>,
        single_file: bool,
        force: bool,
        /// The destination as the user wrote it, for the build log.
        shown_dest: String,
    },
    /// Adds environment variables for later steps and for the sandbox.
    Env(Vec<(String, String)>),
    /// Changes the working directory (created if missing).
    Workdir(String),
    /// Changes the user of later steps and of the sandbox.
    User(String),
}

impl PlanStep {
    fn changes_files(&self) -> bool {
        matches!(self, PlanStep::Run { .. } | PlanStep::Copy { .. } | PlanStep::Workdir(_))
    }

    fn forced(&self) -> bool {
        match self {
            PlanStep::Run { force, .. } | PlanStep::Copy { force, .. } => *force,
            _ => false,
        }
    }

    /// Text that identifies what the step does, for its cache key.
    fn identity(&self) -> String {
        match self {
            PlanStep::Run { argv, user, extra_env, .. } => {
                serde_json::json!({"run": argv, "user": user, "env": extra_env}).to_string()
            }
            PlanStep::Copy { content_hash, dest, owner, mode, single_file, .. } => serde_json::json!({
                "copy": content_hash, "dest": dest, "owner": owner, "mode": mode, "file": single_file
            })
            .to_string(),
            PlanStep::Env(vars) => serde_json::json!({ "env": vars }).to_string(),
            PlanStep::Workdir(dir) => serde_json::json!({ "workdir": dir }).to_string(),
            PlanStep::User(user) => serde_json::json!({ "user": user }).to_string(),
        }
    }

    /// Short description for the build log.
    pub fn describe(&self) -> String {
        match self {
            PlanStep::Run { argv, user, .. } => {
                let shown = argv.last().cloned().unwrap_or_default();
                match user {
                    Some(user) => format!("RUN (as {user}) {shown}"),
                    None => format!("RUN {shown}"),
                }
            }
            PlanStep::Copy { shown_dest, .. } => format!("COPY to {shown_dest}"),
            PlanStep::Env(vars) => {
                let names: Vec<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
                format!("ENV {}", names.join(" "))
            }
            PlanStep::Workdir(dir) => format!("WORKDIR {dir}"),
            PlanStep::User(user) => format!("USER {user}"),
        }
    }
}

/// How the build decides that the start command's service is ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadyCheck {
    /// A shell command that must exit 0.
    Command(String),
    /// TCP ports in the guest that must accept connections on the guest's address.
    Ports(Vec<u16>),
}

/// Command started before the snapshot, and its ready check.
#[derive(Clone, Debug)]
pub struct StartSpec {
    /// Shell command (run with `/bin/sh -c`).
    pub command: String,
    /// Check that must pass before the snapshot; `None` waits only for the command to
    /// survive [`CustomBuildOptions::start_settle`].
    pub ready: Option<ReadyCheck>,
}

/// The whole plan of one build (the final stage of a Dockerfile).
#[derive(Clone, Debug)]
pub struct BuildPlan {
    pub base: BaseDisk,
    pub steps: Vec<PlanStep>,
    pub start: Option<StartSpec>,
    /// A ready check without a start command (the SDK allows one alone).
    pub ready_only: Option<ReadyCheck>,
    pub exposed_ports: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// Kernel and initramfs the build VM boots, taken from the base template.
#[derive(Clone, Debug)]
pub struct BootArtifacts {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_release: String,
    pub cmdline: String,
}

/// Settings of a custom template build.
#[derive(Clone, Debug)]
pub struct CustomBuildOptions {
    pub data_dir: DataDir,
    pub template_id: TemplateId,
    pub build_id: BuildId,
    pub machine: MachineSize,
    pub envd_version: String,
    pub boot: BootArtifacts,
    /// Ignore every cached layer.
    pub force: bool,
    /// Maximum time a single step may run.
    pub step_timeout: Duration,
    /// Maximum time the ready check may take to pass.
    pub ready_timeout: Duration,
    /// How long a start command without a ready check must keep running.
    pub start_settle: Duration,
    /// Longest the build VM may take to answer `/health`.
    pub boot_timeout: Duration,
}

/// Which step of the build failed, as the SDK names steps: `base`, a number counted from
/// 1, or `finalize`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepRef {
    Base,
    Number(usize),
    Finalize,
}

impl std::fmt::Display for StepRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepRef::Base => f.write_str("base"),
            StepRef::Number(n) => write!(f, "{n}"),
            StepRef::Finalize => f.write_str("finalize"),
        }
    }
}

/// A failed custom build: the step and what went wrong, with the output's end.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CustomBuildError {
    pub step: StepRef,
    pub message: String,
}

impl CustomBuildError {
    pub fn new(step: StepRef, message: impl Into<String>) -> Self {
        Self { step, message: message.into() }
    }
}

/// Severity of a build log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogKind {
    Info,
    Output,
    Warn,
    Error,
}

/// Receives the build log: the step a line belongs to, its kind and its text.
pub type BuildLogFn = dyn Fn(&StepRef, LogKind, &str) + Send + Sync;

/// The end of a build run.
#[derive(Clone, Debug)]
enum Mode {
    /// Start command, ready check, snapshot and a published template build.
    Template,
    /// An intermediate Dockerfile stage: its root filesystem written to `output`.
    Stage { output: PathBuf },
}

/// The result of a finished build.
#[derive(Clone, Debug)]
pub struct CustomBuilt {
    pub paths: TemplateBuildPaths,
    pub manifest: TemplateManifest,
    /// Steps whose cached layer was used.
    pub cached_steps: usize,
    pub total: Duration,
}

/// The layer cache: `<cache>/layers/<key>.qcow2`, complete when `<key>.done` exists.
#[derive(Clone, Debug)]
pub struct LayerCache {
    dir: PathBuf,
}

impl LayerCache {
    pub fn new(data_dir: &DataDir) -> Self {
        Self { dir: data_dir.cache_dir().join("layers") }
    }

    pub fn layer(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.qcow2"))
    }

    fn done_marker(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.done"))
    }

    fn is_done(&self, key: &str) -> bool {
        self.done_marker(key).is_file() && self.layer(key).is_file()
    }

    fn mark_done(&self, key: &str) -> std::io::Result<()> {
        hearth_storage::durable::sync_file(&self.layer(key))?;
        hearth_storage::durable::write_atomic(&self.done_marker(key), b"ok\n")
    }

    fn discard(&self, key: &str) {
        let _ = std::fs::remove_file(self.done_marker(key));
        let _ = std::fs::remove_file(self.layer(key));
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            let prefix = format!("{key}.vm-");
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }

    /// Directory of the build VM's saved state right after the step `key`, for a VM of
    /// the shape `machine` (its CPUs, memory, kernel and command line).
    fn vm_state(&self, key: &str, machine: &str) -> PathBuf {
        self.dir.join(format!("{key}.vm-{machine}"))
    }

    fn vm_state_ready(&self, key: &str, machine: &str) -> bool {
        let dir = self.vm_state(key, machine);
        self.is_done(key) && dir.join("done").is_file() && dir.join("vmstate").is_file() && dir.join("memory").is_file()
    }
}

/// Identifies the build VM's shape, which a saved VM state must match to be restored.
fn machine_tag(options: &CustomBuildOptions) -> String {
    let shape = format!(
        "{}|{}|{}|{}",
        options.machine.vcpus, options.machine.memory_mib, options.boot.kernel_release, options.boot.cmdline
    );
    hash_hex(&[LAYER_KEY_VERSION, &shape])[..16].to_owned()
}

fn hash_hex(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// Computes the cache key of every step: each hashes the one before it and the step.
fn step_keys(base_key: &str, steps: &[PlanStep]) -> Vec<String> {
    let mut previous = hash_hex(&[LAYER_KEY_VERSION, "base", base_key]);
    steps
        .iter()
        .map(|step| {
            previous = hash_hex(&[LAYER_KEY_VERSION, &previous, &step.identity()]);
            previous.clone()
        })
        .collect()
}

/// Returns the key of a whole plan's result: the key of its last step, or of its base
/// when it has no steps.
pub fn plan_key(base_key: &str, steps: &[PlanStep]) -> String {
    step_keys(base_key, steps)
        .pop()
        .unwrap_or_else(|| hash_hex(&[LAYER_KEY_VERSION, "base", base_key]))
}

/// The environment, user and working directory as the steps change them.
#[derive(Clone, Debug)]
struct StepState {
    env: BTreeMap<String, String>,
    user: String,
    workdir: String,
}

impl StepState {
    fn from_defaults(defaults: &GuestConfig) -> Self {
        Self {
            env: defaults.env.clone(),
            user: if defaults.user.is_empty() { "root".into() } else { defaults.user.clone() },
            workdir: defaults.workdir.clone().unwrap_or_else(|| "/".into()),
        }
    }

    fn resolve(&self, path: &str) -> String {
        if path.starts_with('/') {
            path.to_owned()
        } else {
            let base = self.workdir.trim_end_matches('/');
            format!("{base}/{path}")
        }
    }
}

/// Builds a template from `plan` into `options.data_dir`, with a build VM from `driver`
/// in `slot`. On failure nothing is published and the staging directory is removed;
/// layers of the steps that succeeded stay cached.
pub async fn build_custom_template(
    options: &CustomBuildOptions,
    plan: &BuildPlan,
    driver: &dyn VmmDriver,
    slot: &Slot,
    log: &BuildLogFn,
) -> Result<CustomBuilt, CustomBuildError> {
    let started = Instant::now();
    let final_paths = options.data_dir.template_build(&options.template_id, &options.build_id);
    if final_paths.dir().exists() {
        return Err(CustomBuildError::new(
            StepRef::Base,
            format!("build directory {} already exists", final_paths.dir().display()),
        ));
    }
    let staging = options.data_dir.template_build_staging(&options.template_id, &options.build_id);
    let _ = tokio::fs::remove_dir_all(&staging).await;
    tokio::fs::create_dir_all(&staging)
        .await
        .map_err(|err| CustomBuildError::new(StepRef::Base, format!("failed to create {}: {err}", staging.display())))?;

    let result = build_in(options, plan, driver, slot, log, &staging, &Mode::Template).await;
    let (manifest, cached_steps) = match result {
        Ok((Some(manifest), cached, _)) => (manifest, cached),
        Ok((None, _, _)) => unreachable!("a template build always writes a manifest"),
        Err(err) => {
            let _ = tokio::fs::remove_dir_all(&staging).await;
            tracing::warn!(template_id = %options.template_id, build_id = %options.build_id, step = %err.step, error = %err.message, "template build failed");
            return Err(err);
        }
    };
    let publish = async {
        hearth_storage::durable::sync_dir(&staging)?;
        tokio::fs::rename(&staging, final_paths.dir()).await?;
        if let Some(parent) = final_paths.dir().parent() {
            hearth_storage::durable::sync_dir(parent)?;
        }
        std::io::Result::Ok(())
    };
    if let Err(err) = publish.await {
        let _ = tokio::fs::remove_dir_all(&staging).await;
        return Err(CustomBuildError::new(StepRef::Finalize, format!("failed to publish the build: {err}")));
    }
    let total = started.elapsed();
    log(&StepRef::Finalize, LogKind::Info, &format!("template ready after {:.1} s", total.as_secs_f64()));
    Ok(CustomBuilt { paths: final_paths, manifest, cached_steps, total })
}

/// Runs the steps of an intermediate Dockerfile stage in a build VM and writes the
/// resulting root filesystem to `output` (a raw image). Returns the stage's guest
/// defaults after its steps, which a later `FROM <stage>` starts with.
pub async fn build_stage_disk(
    options: &CustomBuildOptions,
    plan: &BuildPlan,
    driver: &dyn VmmDriver,
    slot: &Slot,
    log: &BuildLogFn,
    work_dir: &Path,
    output: &Path,
) -> Result<GuestConfig, CustomBuildError> {
    let _ = tokio::fs::remove_dir_all(work_dir).await;
    tokio::fs::create_dir_all(work_dir)
        .await
        .map_err(|err| CustomBuildError::new(StepRef::Base, format!("failed to create {}: {err}", work_dir.display())))?;
    let result = build_in(options, plan, driver, slot, log, work_dir, &Mode::Stage { output: output.to_owned() }).await;
    let _ = tokio::fs::remove_dir_all(work_dir).await;
    result.map(|(_, _, guest)| guest)
}

async fn build_in(
    options: &CustomBuildOptions,
    plan: &BuildPlan,
    driver: &dyn VmmDriver,
    slot: &Slot,
    log: &BuildLogFn,
    staging: &Path,
    mode: &Mode,
) -> Result<(Option<TemplateManifest>, usize, GuestConfig), CustomBuildError> {
    let paths = TemplateBuildPaths::new(staging);
    let cache = LayerCache::new(&options.data_dir);
    std::fs::create_dir_all(&cache.dir)
        .map_err(|err| CustomBuildError::new(StepRef::Base, format!("failed to create {}: {err}", cache.dir.display())))?;
    let base_err = |what: &str, err: std::io::Error| CustomBuildError::new(StepRef::Base, format!("{what}: {err}"));
    for (from, to) in [(&options.boot.kernel, paths.kernel()), (&options.boot.initrd, paths.initrd())] {
        link_or_copy(from, &to).map_err(|err| base_err(&format!("failed to copy {}", from.display()), err))?;
    }

    let keys = step_keys(plan.base.key(), &plan.steps);
    // The longest run of cached steps from the start; metadata steps have no layer.
    let mut top = (plan.base.path().to_owned(), BackingFormat::Raw);
    let mut first_uncached = plan.steps.len();
    for (index, step) in plan.steps.iter().enumerate() {
        if options.force || step.forced() {
            first_uncached = index;
            break;
        }
        if step.changes_files() {
            if !cache.is_done(&keys[index]) {
                first_uncached = index;
                break;
            }
            top = (cache.layer(&keys[index]), BackingFormat::Qcow2);
        }
    }
    let disk_size = std::fs::metadata(plan.base.path())
        .map_err(|err| base_err(&format!("base disk {}", plan.base.path().display()), err))?
        .len();

    let mut state = StepState::from_defaults(plan.base.defaults());
    for (index, step) in plan.steps.iter().enumerate().take(first_uncached) {
        apply_metadata(&mut state, step);
        log(&StepRef::Number(index + 1), LogKind::Info, &format!("CACHED {}", step.describe()));
    }

    // The layer the VM boots on: the first step that runs, or the final layer.
    let first_disk_step = (first_uncached..plan.steps.len()).find(|&i| plan.steps[i].changes_files());
    let final_layer = staging.join("final.qcow2");
    let boot_layer = match first_disk_step {
        Some(index) => {
            cache.discard(&keys[index]);
            cache.layer(&keys[index])
        }
        None => final_layer.clone(),
    };
    let mut active_layer: Option<String> = first_disk_step.map(|index| keys[index].clone());
    let spec = BootSpec {
        machine: options.machine,
        memory_file: paths.memory(),
        kernel: paths.kernel(),
        initrd: Some(paths.initrd()),
        // Without `quiet`, a boot that stalls leaves the kernel's messages in the console
        // log, which the build error quotes.
        cmdline: options.boot.cmdline.split_whitespace().filter(|word| *word != "quiet").collect::<Vec<_>>().join(" "),
        disk: DiskSpec { path: boot_layer.clone(), format: DiskFormat::Qcow2 },
        placement: VmPlacement { netns: Some(slot.netns.clone()), run_dir: staging.to_owned() },
    };
    let agent = GuestAgent::new(format!("http://{}:{ENVD_PORT}", slot.guest_route_ip));
    let machine = machine_tag(options);
    // The last cached step that changed files: its saved VM state, when there is one,
    // replaces the cold boot.
    let last_cached_disk_step = (0..first_uncached).rev().find(|&i| plan.steps[i].changes_files());
    let saved_state = last_cached_disk_step
        .map(|index| keys[index].clone())
        .filter(|key| cache.vm_state_ready(key, &machine));
    let mut restored = None;
    if let Some(key) = &saved_state {
        match restore_saved_vm(options, driver, &cache.vm_state(key, &machine), &spec, &boot_layer, &top, disk_size, &agent).await {
            Ok(vm) => {
                log(&StepRef::Base, LogKind::Info, "restored the build VM saved after the last cached step");
                restored = Some(vm);
            }
            Err(err) => {
                log(&StepRef::Base, LogKind::Warn, &format!("could not restore the saved build VM ({err}); booting instead"));
            }
        }
    }
    let attempt_timeout = options.boot_timeout / BOOT_ATTEMPTS;
    let mut attempt = 1;
    let mut vm = loop {
        if let Some(vm) = restored.take() {
            break vm;
        }
        // Every attempt boots on a fresh layer and memory file: a failed boot or restore
        // may have written to them.
        let _ = std::fs::remove_file(&boot_layer);
        let _ = std::fs::remove_file(&spec.memory_file);
        create_overlay_over(&boot_layer, &top.0, top.1, disk_size)
            .map_err(|err| CustomBuildError::new(StepRef::Base, format!("failed to create layer: {err}")))?;
        log(&StepRef::Base, LogKind::Info, &format!("booting the build VM ({})", driver.kind()));
        let booted = Instant::now();
        let mut vm = driver
            .boot(&spec)
            .await
            .map_err(|err| CustomBuildError::new(StepRef::Base, format!("build VM failed to start: {err}")))?;
        match agent.wait_healthy(attempt_timeout).await {
            Ok(()) => {
                log(&StepRef::Base, LogKind::Info, &format!("build VM up after {:.1} s", booted.elapsed().as_secs_f64()));
                break vm;
            }
            Err(err) => {
                let tail = console_tail(&*vm);
                let _ = vm.stop().await;
                if attempt < BOOT_ATTEMPTS {
                    // Under TCG on a loaded host a guest kernel can stall in its timer
                    // calibration before userspace; a fresh boot usually gets through.
                    log(&StepRef::Base, LogKind::Warn, &format!("the build VM did not respond ({err}); booting it again"));
                    tracing::warn!(attempt, error = %err, console_tail = %tail, "build VM did not respond; booting it again");
                    attempt += 1;
                    continue;
                }
                let _ = std::fs::remove_file(&boot_layer);
                return Err(CustomBuildError::new(
                    StepRef::Base,
                    format!("envd in the build VM did not answer after {BOOT_ATTEMPTS} boots: {err}; console ends with: {tail}"),
                ));
            }
        }
    };
    let outcome = run_in_vm(options, plan, &mut *vm, slot, log, &paths, &cache, &keys, first_uncached, &mut state, &mut active_layer, &final_layer, mode).await;
    let stopped = vm.stop().await;
    for (from, to) in [("console.log", paths.build_console_log()), ("vmm.log", staging.join("build-vmm.log"))] {
        let _ = tokio::fs::rename(staging.join(from), &to).await;
    }
    if let Err(err) = outcome {
        if let Some(key) = active_layer {
            cache.discard(&key);
        }
        return Err(err);
    }
    stopped.map_err(|err| CustomBuildError::new(StepRef::Finalize, format!("failed to stop the build VM: {err}")))?;

    let rootfs = match mode {
        Mode::Template => paths.rootfs(),
        Mode::Stage { output } => output.clone(),
    };
    log(&StepRef::Finalize, LogKind::Info, "writing the root filesystem image");
    let flatten = run(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", &final_layer.to_string_lossy(), &rootfs.to_string_lossy()],
        None,
    )
    .await;
    flatten.map_err(|err| CustomBuildError::new(StepRef::Finalize, format!("failed to write the root filesystem: {err}")))?;
    let _ = tokio::fs::remove_file(&final_layer).await;

    let guest = GuestConfig {
        user: state.user.clone(),
        workdir: Some(state.workdir.clone()),
        env: state.env.clone(),
        start_cmd: plan.start.as_ref().map(|start| start.command.clone()),
        ready_check: plan
            .start
            .as_ref()
            .and_then(|start| start.ready.as_ref())
            .or(plan.ready_only.as_ref())
            .map(describe_ready),
        exposed_ports: plan.exposed_ports.clone(),
        labels: plan.labels.clone(),
    };
    if let Mode::Stage { .. } = mode {
        return Ok((None, first_uncached, guest));
    }
    let manifest = write_manifest(options, &paths, disk_size, guest.clone())
        .await
        .map_err(|err| CustomBuildError::new(StepRef::Finalize, format!("failed to write the manifest: {err}")))?;
    verify_build(&paths, &manifest)
        .map_err(|err| CustomBuildError::new(StepRef::Finalize, format!("the build's files do not check out: {err}")))?;
    Ok((Some(manifest), first_uncached, guest))
}

fn describe_ready(check: &ReadyCheck) -> String {
    match check {
        ReadyCheck::Command(command) => command.clone(),
        ReadyCheck::Ports(ports) => {
            let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
            format!("tcp ports {}", ports.join(", "))
        }
    }
}

fn apply_metadata(state: &mut StepState, step: &PlanStep) {
    match step {
        PlanStep::Env(vars) => {
            for (key, value) in vars {
                state.env.insert(key.clone(), value.clone());
            }
        }
        PlanStep::Workdir(dir) => state.workdir = state.resolve(dir),
        PlanStep::User(user) => state.user = user.clone(),
        PlanStep::Run { .. } | PlanStep::Copy { .. } => {}
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_in_vm(
    options: &CustomBuildOptions,
    plan: &BuildPlan,
    vm: &mut dyn Vm,
    slot: &Slot,
    log: &BuildLogFn,
    paths: &TemplateBuildPaths,
    cache: &LayerCache,
    keys: &[String],
    first_uncached: usize,
    state: &mut StepState,
    active_layer: &mut Option<String>,
    final_layer: &Path,
    mode: &Mode,
) -> Result<(), CustomBuildError> {
    let agent = GuestAgent::new(format!("http://{}:{ENVD_PORT}", slot.guest_route_ip));
    agent
        .init(&BTreeMap::new(), Some("root"), Some("/"))
        .await
        .map_err(|err| CustomBuildError::new(StepRef::Base, format!("envd /init failed: {err}")))?;

    let mut copy_serial = 0u32;
    for index in first_uncached..plan.steps.len() {
        let step = &plan.steps[index];
        let step_ref = StepRef::Number(index + 1);
        let started = Instant::now();
        log(&step_ref, LogKind::Info, &step.describe());
        match step {
            PlanStep::Env(_) | PlanStep::User(_) => apply_metadata(state, step),
            PlanStep::Workdir(_) => {
                apply_metadata(state, step);
                let empty = paths.dir().join("empty.tar");
                write_empty_tar(&empty).map_err(|err| CustomBuildError::new(step_ref.clone(), format!("{err}")))?;
                let owner = (state.user != "root").then(|| state.user.clone());
                copy_into_guest(&agent, options, &empty, &state.workdir.clone(), owner.as_deref(), None, false, &mut copy_serial, &step_ref, log).await?;
            }
            PlanStep::Run { argv, user, extra_env, .. } => {
                let mut env = state.env.clone();
                env.extend(extra_env.iter().cloned());
                let user = user.clone().unwrap_or_else(|| state.user.clone());
                run_step_command(&agent, options, argv, &user, &state.workdir, &env, &step_ref, log).await?;
            }
            PlanStep::Copy { archive, dest, owner, mode, single_file, .. } => {
                let dest = state.resolve(dest);
                copy_into_guest(&agent, options, archive, &dest, owner.as_deref(), *mode, *single_file, &mut copy_serial, &step_ref, log).await?;
            }
        }
        if step.changes_files() {
            sync_guest(&agent, &step_ref).await?;
            let next = ((index + 1)..plan.steps.len()).find(|&i| plan.steps[i].changes_files());
            let next_layer = match next {
                Some(next) => {
                    cache.discard(&keys[next]);
                    cache.layer(&keys[next])
                }
                None => final_layer.to_owned(),
            };
            if next.is_none() {
                // After the last step that changes files, a saved state would serve only
                // rebuilds that change nothing but the start command; it is not kept.
                vm.push_disk_layer(&next_layer)
                    .await
                    .map_err(|err| CustomBuildError::new(step_ref.clone(), format!("failed to add a disk layer: {err}")))?;
            } else {
                // The guest is paused from its device state until the new layer exists and
                // its memory is copied, so the saved state matches this step's layer exactly.
                let state_dir = cache.vm_state(&keys[index], &machine_tag(options));
                let saved = save_vm_state(vm, paths, &state_dir).await;
                let pushed = vm.push_disk_layer(&next_layer).await;
                let saved = match (saved, &pushed) {
                    (Ok(()), Ok(())) => copy_saved_memory(paths, &state_dir),
                    (Err(err), _) => Err(err),
                    (Ok(()), Err(_)) => Err("the disk layer was not added".into()),
                };
                if let Err(err) = vm.resume().await {
                    return Err(CustomBuildError::new(step_ref.clone(), format!("the build VM did not continue: {err}")));
                }
                if let Err(err) = saved {
                    let _ = std::fs::remove_dir_all(&state_dir);
                    log(&step_ref, LogKind::Warn, &format!("the build VM's state was not saved ({err}); a rebuild from here boots"));
                }
                pushed.map_err(|err| CustomBuildError::new(step_ref.clone(), format!("failed to add a disk layer: {err}")))?;
            }
            cache
                .mark_done(&keys[index])
                .map_err(|err| CustomBuildError::new(step_ref.clone(), format!("failed to record the step's layer: {err}")))?;
            *active_layer = next.map(|next| keys[next].clone());
        }
        log(&step_ref, LogKind::Info, &format!("done in {:.2} s", started.elapsed().as_secs_f64()));
    }

    match mode {
        Mode::Template => finalize_guest(options, plan, vm, slot, log, paths, &agent, state).await,
        Mode::Stage { .. } => sync_guest(&agent, &StepRef::Finalize).await,
    }
}

/// Starts the start command, waits for readiness and takes the snapshot.
#[allow(clippy::too_many_arguments)]
async fn finalize_guest(
    options: &CustomBuildOptions,
    plan: &BuildPlan,
    vm: &mut dyn Vm,
    slot: &Slot,
    log: &BuildLogFn,
    paths: &TemplateBuildPaths,
    agent: &GuestAgent,
    state: &StepState,
) -> Result<(), CustomBuildError> {
    let fin = StepRef::Finalize;
    let fail = |message: String| CustomBuildError::new(StepRef::Finalize, message);
    agent
        .init(&state.env, Some(&state.user), Some(&state.workdir))
        .await
        .map_err(|err| fail(format!("envd /init with the template's defaults failed: {err}")))?;

    let mut background = None;
    if let Some(start) = &plan.start {
        log(&fin, LogKind::Info, &format!("starting: {}", start.command));
        let args = vec!["-c".to_owned(), start.command.clone()];
        let spec = RunSpec {
            cmd: "/bin/sh",
            args: &args,
            user: &state.user,
            cwd: Some(&state.workdir),
            env: &state.env,
            timeout: Duration::from_secs(60),
        };
        background = Some(agent.start_background(&spec).await.map_err(|err| fail(format!("failed to start `{}`: {err}", start.command)))?);
    }
    let ready = plan.start.as_ref().and_then(|start| start.ready.clone()).or_else(|| plan.ready_only.clone());
    let deadline = Instant::now() + options.ready_timeout;
    let settle_until = Instant::now() + options.start_settle;
    let mut last_output = String::new();
    loop {
        if let Some(process) = &background {
            let ended = match process.status() {
                BackgroundStatus::Running => None,
                BackgroundStatus::Exited(code) => Some(format!("exit code {code}")),
                BackgroundStatus::Signaled(status) => Some(status),
                BackgroundStatus::Lost(reason) => Some(format!("an unknown status ({reason})")),
            };
            if let Some(code) = ended {
                let output = process.output_tail();
                for line in output.lines() {
                    log(&fin, LogKind::Output, line);
                }
                return Err(fail(format!(
                    "the start command exited with {code} before the template was ready; its output ends with:\n{}",
                    tail_lines(&output, FAILURE_TAIL_LINES)
                )));
            }
        }
        let passed = match &ready {
            // A start command without a check must survive the settle time; with neither
            // there is nothing to wait for.
            None => background.is_none() || Instant::now() >= settle_until,
            Some(ReadyCheck::Ports(ports)) => ports_accept(slot, ports).await,
            Some(ReadyCheck::Command(command)) => {
                let args = vec!["-c".to_owned(), command.clone()];
                let spec = RunSpec {
                    cmd: "/bin/sh",
                    args: &args,
                    user: &state.user,
                    cwd: Some(&state.workdir),
                    env: &state.env,
                    timeout: Duration::from_secs(10),
                };
                let collected = std::sync::Mutex::new(String::new());
                let code = agent
                    .run(&spec, &|_, line: &str| {
                        let mut text = collected.lock().expect("output lock");
                        text.push_str(line);
                        text.push('\n');
                    })
                    .await;
                last_output = collected.into_inner().expect("output lock");
                matches!(code, Ok(0))
            }
        };
        if passed {
            break;
        }
        if Instant::now() >= deadline {
            let mut message = format!(
                "the template did not become ready within {} s (check: {})",
                options.ready_timeout.as_secs(),
                ready.as_ref().map(describe_ready).unwrap_or_else(|| "none".into())
            );
            if let Some(process) = &background {
                message.push_str(&format!(
                    "; the start command's output ends with:\n{}",
                    tail_lines(&process.output_tail(), FAILURE_TAIL_LINES)
                ));
            }
            if !last_output.is_empty() {
                message.push_str(&format!("; the last check printed:\n{}", tail_lines(&last_output, FAILURE_TAIL_LINES)));
            }
            return Err(fail(message));
        }
        tokio::time::sleep(READY_POLL_INTERVAL).await;
    }
    if let Some(process) = &background {
        for line in process.output_tail().lines() {
            log(&fin, LogKind::Output, line);
        }
    }
    if ready.is_some() {
        log(&fin, LogKind::Info, "ready");
    }

    log(&fin, LogKind::Info, "saving the snapshot");
    let target = SnapshotTarget { vmstate: paths.vmstate(), memory: paths.memory(), diff: false };
    vm.snapshot(&target).await.map_err(|err| fail(format!("snapshot failed: {err}")))?;
    Ok(())
}

/// Pauses the build VM and writes its device state into `state_dir`; the memory stays in
/// the build's shared memory file until [`copy_saved_memory`]. Leaves the guest paused.
async fn save_vm_state(vm: &mut dyn Vm, paths: &TemplateBuildPaths, state_dir: &Path) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(state_dir);
    std::fs::create_dir_all(state_dir).map_err(|err| format!("{}: {err}", state_dir.display()))?;
    let target = SnapshotTarget { vmstate: state_dir.join("vmstate"), memory: paths.memory(), diff: false };
    vm.snapshot(&target).await.map(|_| ()).map_err(|err| err.to_string())
}

/// Copies the paused build VM's memory into `state_dir`. A background task then makes the
/// copy durable and marks the saved state complete, so the guest does not wait for the
/// disk; until the marker exists, a rebuild boots instead of restoring.
fn copy_saved_memory(paths: &TemplateBuildPaths, state_dir: &Path) -> Result<(), String> {
    let memory = state_dir.join("memory");
    hearth_storage::clone::clone_sparse(&paths.memory(), &memory).map_err(|err| format!("{}: {err}", memory.display()))?;
    let state_dir = state_dir.to_owned();
    tokio::task::spawn_blocking(move || {
        let durable = hearth_storage::durable::sync_file(&state_dir.join("memory"))
            .and_then(|()| hearth_storage::durable::sync_file(&state_dir.join("vmstate")))
            .and_then(|()| hearth_storage::durable::write_atomic(&state_dir.join("done"), b"ok\n"));
        if let Err(err) = durable {
            tracing::warn!(path = %state_dir.display(), error = %err, "failed to complete a saved build VM state");
            let _ = std::fs::remove_dir_all(&state_dir);
        }
    });
    Ok(())
}

/// Restores a build VM saved after a cached step, on a fresh layer over that step's
/// layer, with its memory copied into the build's memory file (mapped shared, as a booted
/// build VM's is).
#[allow(clippy::too_many_arguments)]
async fn restore_saved_vm(
    options: &CustomBuildOptions,
    driver: &dyn VmmDriver,
    state_dir: &Path,
    boot: &BootSpec,
    layer: &Path,
    top: &(PathBuf, BackingFormat),
    disk_size: u64,
    agent: &GuestAgent,
) -> Result<Box<dyn Vm>, String> {
    let _ = std::fs::remove_file(&boot.memory_file);
    hearth_storage::clone::clone_sparse(&state_dir.join("memory"), &boot.memory_file)
        .map_err(|err| format!("copying the saved memory: {err}"))?;
    let _ = std::fs::remove_file(layer);
    create_overlay_over(layer, &top.0, top.1, disk_size).map_err(|err| format!("creating the layer: {err}"))?;
    let spec = hearth_vmm::RestoreSpec {
        machine: options.machine,
        memory_file: boot.memory_file.clone(),
        vmstate: state_dir.join("vmstate"),
        vmstate_has_memory: false,
        memory_shared: true,
        disk: boot.disk.clone(),
        placement: boot.placement.clone(),
    };
    let mut vm = driver.restore(&spec).await.map_err(|err| err.to_string())?;
    if let Err(err) = agent.wait_healthy(Duration::from_secs(20)).await {
        let _ = vm.stop().await;
        let _ = std::fs::remove_file(layer);
        return Err(format!("envd did not answer after the restore: {err}"));
    }
    Ok(vm)
}

async fn ports_accept(slot: &Slot, ports: &[u16]) -> bool {
    for port in ports {
        let address = std::net::SocketAddr::from((slot.guest_route_ip, *port));
        let connect = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(address)).await;
        if !matches!(connect, Ok(Ok(_))) {
            return false;
        }
    }
    true
}

#[allow(clippy::too_many_arguments)]
async fn run_step_command(
    agent: &GuestAgent,
    options: &CustomBuildOptions,
    argv: &[String],
    user: &str,
    cwd: &str,
    env: &BTreeMap<String, String>,
    step: &StepRef,
    log: &BuildLogFn,
) -> Result<(), CustomBuildError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(CustomBuildError::new(step.clone(), "RUN has an empty command"));
    };
    let spec = RunSpec { cmd: program, args, user, cwd: Some(cwd), env, timeout: options.step_timeout };
    let output = std::sync::Mutex::new(Vec::<String>::new());
    let result = agent
        .run(&spec, &|stream, line: &str| {
            let kind = match stream {
                OutputStream::Stdout => LogKind::Output,
                OutputStream::Stderr => LogKind::Output,
            };
            log(step, kind, line);
            let mut lines = output.lock().expect("output lock");
            lines.push(line.to_owned());
            if lines.len() > FAILURE_TAIL_LINES {
                lines.remove(0);
            }
        })
        .await;
    let tail = output.into_inner().expect("output lock").join("\n");
    let shown = argv.join(" ");
    match result {
        Ok(0) => Ok(()),
        Ok(code) => Err(CustomBuildError::new(
            step.clone(),
            format!("step {step} `{shown}` exited with code {code}; its output ends with:\n{tail}"),
        )),
        Err(err) => Err(CustomBuildError::new(step.clone(), format!("step {step} `{shown}` failed: {err}\n{tail}"))),
    }
}

#[allow(clippy::too_many_arguments)]
async fn copy_into_guest(
    agent: &GuestAgent,
    options: &CustomBuildOptions,
    archive: &Path,
    dest: &str,
    owner: Option<&str>,
    mode: Option<u32>,
    single_file: bool,
    serial: &mut u32,
    step: &StepRef,
    log: &BuildLogFn,
) -> Result<(), CustomBuildError> {
    *serial += 1;
    let fail = |message: String| CustomBuildError::new(step.clone(), message);
    let guest_archive = format!("{GUEST_STAGING}/copy-{serial}.tar");
    let body = tokio::fs::read(archive)
        .await
        .map_err(|err| fail(format!("failed to read {}: {err}", archive.display())))?;
    agent
        .upload(&guest_archive, "root", body)
        .await
        .map_err(|err| fail(format!("failed to upload the files: {err}")))?;
    let mut args = vec![
        "build-copy".to_owned(),
        "--archive".to_owned(),
        guest_archive.clone(),
        "--dest".to_owned(),
        dest.to_owned(),
    ];
    if let Some(owner) = owner.filter(|owner| !owner.is_empty()) {
        args.extend(["--owner".to_owned(), owner.to_owned()]);
    }
    if let Some(mode) = mode {
        args.extend(["--mode".to_owned(), format!("{mode:o}")]);
    }
    if single_file {
        args.push("--file".to_owned());
    }
    args.push("--remove-archive".to_owned());
    let env = BTreeMap::new();
    let mut argv = vec![GUEST_ENVD.to_owned()];
    argv.extend(args);
    run_step_command(agent, options, &argv, "root", "/", &env, step, log).await
}

async fn sync_guest(agent: &GuestAgent, step: &StepRef) -> Result<(), CustomBuildError> {
    let args = vec!["build-sync".to_owned()];
    let env = BTreeMap::new();
    let spec = RunSpec { cmd: GUEST_ENVD, args: &args, user: "root", cwd: Some("/"), env: &env, timeout: Duration::from_secs(120) };
    match agent.run(&spec, &|_, _| {}).await {
        Ok(0) => Ok(()),
        Ok(code) => Err(CustomBuildError::new(step.clone(), format!("flushing the guest's files failed with code {code}"))),
        Err(err) => Err(CustomBuildError::new(step.clone(), format!("flushing the guest's files failed: {err}"))),
    }
}

/// A tar archive with no entries: two zero blocks.
fn write_empty_tar(path: &Path) -> std::io::Result<()> {
    std::fs::write(path, vec![0u8; 1024])
}

fn console_tail(vm: &dyn Vm) -> String {
    crate::build::read_console_tail(&vm.console_log())
}

fn tail_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

fn link_or_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to).map(|_| ())
}

async fn write_manifest(
    options: &CustomBuildOptions,
    paths: &TemplateBuildPaths,
    disk_size: u64,
    guest: GuestConfig,
) -> std::io::Result<TemplateManifest> {
    let files = crate::build::manifest_files(paths)?;
    let manifest = TemplateManifest {
        format_version: MANIFEST_FORMAT_VERSION,
        template_id: options.template_id.to_string(),
        build_id: options.build_id.to_string(),
        vcpus: options.machine.vcpus,
        memory_mib: options.machine.memory_mib,
        kernel_release: options.boot.kernel_release.clone(),
        kernel_cmdline: options.boot.cmdline.clone(),
        envd_version: options.envd_version.clone(),
        disk_size_bytes: disk_size,
        files,
        created_at_unix_secs: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        vmm: hearth_vmm::VmmKind::Qemu.as_str().into(),
        snapshot: None,
        guest: Some(guest),
    };
    manifest
        .store(&paths.manifest())
        .map_err(|err| std::io::Error::other(err.to_string()))?;
    Ok(manifest)
}

/// Reads the manifest back and checks every artifact's size and recorded hash.
fn verify_build(paths: &TemplateBuildPaths, written: &TemplateManifest) -> Result<(), String> {
    let loaded = TemplateManifest::load(&paths.manifest()).map_err(|err| err.to_string())?;
    if &loaded != written {
        return Err("the manifest read back differs from the one written".into());
    }
    for file in &loaded.files {
        let path = paths.dir().join(&file.name);
        let size = std::fs::metadata(&path).map_err(|err| format!("{}: {err}", path.display()))?.len();
        if size != file.size_bytes {
            return Err(format!("{} has {size} bytes, expected {}", path.display(), file.size_bytes));
        }
        if let Some(expected) = &file.sha256 {
            let data = std::fs::read(&path).map_err(|err| format!("{}: {err}", path.display()))?;
            if &hex::encode(Sha256::digest(&data)) != expected {
                return Err(format!("{} does not match its recorded SHA-256", path.display()));
            }
        }
    }
    if !paths.is_ready() {
        return Err("the build directory is incomplete".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_step(command: &str) -> PlanStep {
        PlanStep::Run { argv: vec!["/bin/sh".into(), "-c".into(), command.into()], user: None, extra_env: vec![], force: false }
    }

    #[test]
    fn a_changed_step_changes_its_key_and_every_later_one() {
        let steps = vec![run_step("a"), PlanStep::Env(vec![("K".into(), "v".into())]), run_step("b"), run_step("c")];
        let mut changed = steps.clone();
        changed[2] = run_step("B");
        let before = step_keys("base", &steps);
        let after = step_keys("base", &changed);
        assert_eq!(before[..2], after[..2]);
        assert_ne!(before[2], after[2]);
        assert_ne!(before[3], after[3]);
        assert_ne!(step_keys("other-base", &steps)[0], before[0]);
    }

    #[test]
    fn env_values_are_part_of_the_key() {
        let a = step_keys("b", &[PlanStep::Env(vec![("K".into(), "x y".into())])]);
        let b = step_keys("b", &[PlanStep::Env(vec![("K".into(), "x  y".into())])]);
        assert_ne!(a, b);
    }

    #[test]
    fn workdir_resolves_relative_paths() {
        let mut state = StepState::from_defaults(&GuestConfig::default());
        assert_eq!(state.user, "root");
        apply_metadata(&mut state, &PlanStep::Workdir("/app".into()));
        apply_metadata(&mut state, &PlanStep::Workdir("sub".into()));
        assert_eq!(state.workdir, "/app/sub");
        assert_eq!(state.resolve("x"), "/app/sub/x");
        assert_eq!(state.resolve("/abs"), "/abs");
    }
}
