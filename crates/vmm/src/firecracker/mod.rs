//! Firecracker driver: one `firecracker` process per VM, configured over its REST API on a
//! Unix socket, optionally under the jailer.
//!
//! Launch, step by step:
//! 1. Hearth spawns Firecracker with `--api-sock`, `--id` and `--level`. The child sets
//!    `PR_SET_PDEATHSIG` and enters the slot's network namespace with `setns` between fork and
//!    exec, so Firecracker opens the namespace's tap device. Its working directory is the run
//!    directory (or `/` in the jail).
//! 2. Hearth polls the socket until it accepts connections, then sends `PUT /logger` and
//!    `PUT /metrics`, followed by the boot configuration and `InstanceStart`, or by
//!    `PUT /snapshot/load`.
//!
//! The root disk is attached by the relative path `fc-rootfs.img`, a symlink in the run directory
//! (a hard link in the jail) to the VM's disk. A snapshot records the drive's path, and
//! Firecracker v1.12 cannot change it on load, so the relative path makes every restore
//! open its own sandbox's disk. The tap device has the same name in every slot's namespace, so
//! the network device in the snapshot needs no override either.
//!
//! A booted VM's memory is anonymous: [`BootSpec::memory_file`] is not used, and
//! [`Vm::snapshot`] writes the memory to [`SnapshotTarget::memory`].
//!
//! Files in the run directory: `vmm.log` (Firecracker's stdout and stderr, which include the
//! guest's serial console), `fc.log` (Firecracker's log), `fc-metrics.json`, `fc-rootfs.img`,
//! and `fc.sock` when the run directory's path is short enough for a socket address.

pub mod api;
pub mod config;
pub mod jailer;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hearth_types::guest::{GUEST_MAC, TAP_NAME};
use tokio::process::{Child, Command};

pub use api::{ApiClient, ApiError, ApiResponse};
pub use config::{ApiRequest, BootPlan, LogLevel, SnapshotType, VmRunState};
pub use jailer::JailerConfig;

use crate::log_tail::read_tail;
use crate::{
    BootSpec, DiskFormat, RestoreSpec, SnapshotMemory, SnapshotReport, SnapshotTarget, Vm,
    VmPlacement, VmmDriver, VmmError, VmmKind,
};

/// Environment variable naming the Firecracker binary.
pub const FIRECRACKER_BIN_ENV: &str = "HEARTH_FIRECRACKER_BIN";
/// Install path of Firecracker used by `scripts/install-firecracker.sh`.
pub const INSTALLED_FIRECRACKER: &str = "/usr/local/lib/hearth/firecracker";
/// Directory for API sockets whose path in the run directory would be too long.
pub const SOCKET_DIR: &str = "/run/hearth/fc";

/// Maximum socket path length that fits `sockaddr_un.sun_path` (108 bytes with the trailing NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Time from spawn until the API socket accepts connections.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a boot's configuration requests and `InstanceStart` get together.
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a snapshot load gets.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a snapshot gets to write device state and memory.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

const VMM_LOG: &str = "vmm.log";
const FC_LOG: &str = "fc.log";
const FC_METRICS: &str = "fc-metrics.json";
const SOCKET_NAME: &str = "fc.sock";
/// Root disk path as Firecracker opens it, relative to its working directory.
const DISK_LINK: &str = "fc-rootfs.img";

/// Driver settings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FirecrackerConfig {
    /// The `firecracker` binary.
    pub binary: PathBuf,
    /// Run Firecracker under this jailer; `None` runs it directly.
    pub jailer: Option<JailerConfig>,
    /// Firecracker's log level; `None` keeps Firecracker's default (`Warning`).
    pub log_level: Option<LogLevel>,
    /// JSON object served by MMDS to booted guests that have a network device; `None` serves `{}`.
    pub mmds_metadata: Option<serde_json::Value>,
}

/// Returns the Firecracker binary to use: `$HEARTH_FIRECRACKER_BIN` if set, else
/// [`INSTALLED_FIRECRACKER`] if it exists, else `firecracker` found in `PATH`.
pub fn firecracker_binary_from_env() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(FIRECRACKER_BIN_ENV).filter(|value| !value.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let installed = Path::new(INSTALLED_FIRECRACKER);
    if installed.is_file() {
        return Some(installed.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("firecracker"))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Drives Firecracker microVMs.
#[derive(Clone, Debug)]
pub struct FirecrackerDriver {
    config: FirecrackerConfig,
}

impl FirecrackerDriver {
    /// Creates a driver with `config`.
    pub fn new(config: FirecrackerConfig) -> Self {
        Self { config }
    }

    /// Creates a driver for the binary [`firecracker_binary_from_env`] finds, without a jailer,
    /// or returns `None` when there is none.
    pub fn from_env() -> Option<Self> {
        let binary = firecracker_binary_from_env()?;
        Some(Self::new(FirecrackerConfig {
            binary,
            ..FirecrackerConfig::default()
        }))
    }

    /// Settings of the driver.
    pub fn config(&self) -> &FirecrackerConfig {
        &self.config
    }

    /// Boots a guest; see [`VmmDriver::boot`].
    pub async fn boot_vm(&self, spec: &BootSpec) -> Result<FirecrackerVm, VmmError> {
        let started = Instant::now();
        require_raw_disk(spec.disk.format, &spec.disk.path)?;
        let mut vm = self.spawn(&spec.placement).await?;

        let plan = match vm.boot_plan(spec, &self.config) {
            Ok(plan) => plan,
            Err(err) => return Err(vm.fail(err.to_string()).await),
        };
        let requests = config::boot_requests(&plan);
        vm.send_all(&requests, BOOT_TIMEOUT, "boot").await?;

        tracing::info!(
            pid = vm.pid,
            id = %vm.id,
            run_dir = %spec.placement.run_dir.display(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "Firecracker VM booted"
        );
        Ok(vm)
    }

    /// Restores a snapshot; see [`VmmDriver::restore`].
    pub async fn restore_vm(&self, spec: &RestoreSpec) -> Result<FirecrackerVm, VmmError> {
        let started = Instant::now();
        require_raw_disk(spec.disk.format, &spec.disk.path)?;
        let mut vm = self.spawn(&spec.placement).await?;

        let files = vm.expose_disk(&spec.disk.path).and_then(|_| {
            let vmstate = vm.expose_input(&spec.vmstate, "snapshot.vmstate")?;
            let memory = vm.expose_input(&spec.memory_file, "snapshot.mem")?;
            Ok((vmstate, memory))
        });
        let (vmstate, memory) = match files {
            Ok(files) => files,
            Err(err) => {
                return Err(vm
                    .fail(format!("failed to prepare snapshot files: {err}"))
                    .await)
            }
        };
        let mut requests = vm.logging_requests(&self.config);
        requests.push(config::snapshot_load_request(&vmstate, &memory));
        vm.send_all(&requests, RESTORE_TIMEOUT, "restore").await?;

        tracing::info!(
            pid = vm.pid,
            id = %vm.id,
            run_dir = %spec.placement.run_dir.display(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "Firecracker VM restored"
        );
        Ok(vm)
    }

    /// Starts a Firecracker process (under the jailer if configured) and waits for its socket.
    async fn spawn(&self, placement: &VmPlacement) -> Result<FirecrackerVm, VmmError> {
        let id = new_vm_id();
        let run_dir = &placement.run_dir;
        let prepare = |what, path: &Path| {
            let path = path.to_owned();
            move |source| VmmError::Prepare { what, path, source }
        };

        let log_path = run_dir.join(VMM_LOG);
        let log = File::create(&log_path).map_err(prepare("VMM log", &log_path))?;
        let log_err = log.try_clone().map_err(prepare("VMM log", &log_path))?;
        for name in [FC_LOG, FC_METRICS] {
            let path = run_dir.join(name);
            File::create(&path).map_err(prepare("Firecracker log", &path))?;
        }

        let jail = match &self.config.jailer {
            Some(jailer) => {
                let root = jailer.chroot_root(&self.config.binary, &id);
                std::fs::create_dir_all(&root).map_err(prepare("jail directory", &root))?;
                Some(Jail {
                    dir: jailer.jail_dir(&self.config.binary, &id),
                    root,
                    owner: (jailer.uid, jailer.gid),
                })
            }
            None => None,
        };
        let sockets =
            SocketPaths::choose(run_dir, jail.as_ref().map(|jail| jail.root.as_path()), &id)
                .map_err(prepare("API socket", run_dir))?;

        let mut firecracker_args = vec![
            "--api-sock".to_owned(),
            sockets.firecracker.to_string_lossy().into_owned(),
        ];
        // The jailer passes its own `--id` on to Firecracker, which rejects a second one.
        if self.config.jailer.is_none() {
            firecracker_args.extend(["--id".to_owned(), id.clone()]);
        }
        if let Some(level) = self.config.log_level {
            firecracker_args.extend(["--level".to_owned(), level.as_str().to_owned()]);
        }

        let (program, args, netns_path, cwd) = match &self.config.jailer {
            Some(jailer) => {
                let args = jailer.args(
                    &id,
                    &self.config.binary,
                    placement.netns.as_deref(),
                    &firecracker_args,
                );
                // The jailer joins the namespace itself and chroots, which sets the directory.
                (jailer.binary.clone(), args, None, PathBuf::from("/"))
            }
            None => {
                let netns = placement
                    .netns
                    .as_ref()
                    .map(|name| Path::new("/run/netns").join(name));
                (
                    self.config.binary.clone(),
                    firecracker_args,
                    netns,
                    run_dir.clone(),
                )
            }
        };
        let netns = match &netns_path {
            Some(path) => Some(File::open(path).map_err(prepare("network namespace", path))?),
            None => None,
        };

        let mut command = Command::new(&program);
        command
            .args(&args)
            .current_dir(&cwd)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true);
        let netns_fd = netns.as_ref().map(|file| file.as_raw_fd());
        // SAFETY: the closure runs in the forked child before exec. It allocates nothing and
        // calls only async-signal-safe system calls (prctl, setns), on a descriptor that stays
        // open in the parent until spawn returns.
        unsafe {
            command.pre_exec(move || {
                // Firecracker dies with the thread that spawned it, even on SIGKILL.
                // NOTE: the kernel clears this signal when the jailer changes its user ID,
                // so a jailed Firecracker outlives a killed Hearth.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = netns_fd {
                    if libc::setns(fd, libc::CLONE_NEWNET) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }

        tracing::debug!(program = %program.display(), ?args, id, "starting Firecracker");
        let child = command.spawn().map_err(|source| VmmError::Spawn {
            program: program.display().to_string(),
            source,
        })?;
        drop(netns);

        let mut vm = FirecrackerVm {
            pid: child.id().unwrap_or(0),
            id,
            child: Some(child),
            client: ApiClient::new(&sockets.host),
            run_dir: run_dir.clone(),
            sockets,
            jail,
        };
        let child = vm.child.as_mut().expect("set above");
        let ready = vm
            .client
            .wait_ready(SOCKET_TIMEOUT, || matches!(child.try_wait(), Ok(None)))
            .await;
        if let Err(err) = ready {
            return Err(vm.fail(err.to_string()).await);
        }
        Ok(vm)
    }
}

#[async_trait]
impl VmmDriver for FirecrackerDriver {
    fn kind(&self) -> VmmKind {
        VmmKind::Firecracker
    }

    async fn boot(&self, spec: &BootSpec) -> Result<Box<dyn Vm>, VmmError> {
        Ok(Box::new(self.boot_vm(spec).await?))
    }

    async fn restore(&self, spec: &RestoreSpec) -> Result<Box<dyn Vm>, VmmError> {
        Ok(Box::new(self.restore_vm(spec).await?))
    }
}

fn require_raw_disk(format: DiskFormat, path: &Path) -> Result<(), VmmError> {
    if format == DiskFormat::Raw {
        return Ok(());
    }
    Err(VmmError::Prepare {
        what: "root disk (Firecracker opens raw images only)",
        path: path.to_owned(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "disk format is qcow2, expected raw",
        ),
    })
}

/// Returns an ID unique on this host: Firecracker's `--id` and the jail directory's name
/// (alphanumeric and `-`, at most 64 characters).
fn new_vm_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or(0);
    format!(
        "hearth-{}-{}-{nanos:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The jail of one VM.
#[derive(Clone, Debug)]
struct Jail {
    /// `<chroot_base>/<exec>/<id>`, removed on stop.
    dir: PathBuf,
    /// The chroot, `dir/root`.
    root: PathBuf,
    /// User and group Firecracker runs as.
    owner: (u32, u32),
}

/// Location of the API socket, for Firecracker and for Hearth.
#[derive(Clone, Debug)]
struct SocketPaths {
    /// `--api-sock` value, inside the jail when there is one.
    firecracker: PathBuf,
    /// Path Hearth connects to.
    host: PathBuf,
    /// Files Hearth removes on stop: the socket, or the symlink to it.
    cleanup: Vec<PathBuf>,
}

impl SocketPaths {
    /// Chooses `run_dir/fc.sock`, or `/run/hearth/fc/<id>.sock` when that path is too long
    /// for a socket address. In a jail the socket is `/fc.sock` inside it, and a long host
    /// path is reached through a symlink under `/run/hearth/fc`.
    fn choose(run_dir: &Path, jail_root: Option<&Path>, id: &str) -> Result<Self, std::io::Error> {
        let short = || -> Result<PathBuf, std::io::Error> {
            std::fs::create_dir_all(SOCKET_DIR)?;
            Ok(Path::new(SOCKET_DIR).join(format!("{id}.sock")))
        };
        let paths = match jail_root {
            None => {
                let preferred = run_dir.join(SOCKET_NAME);
                let path = if preferred.as_os_str().len() <= MAX_SOCKET_PATH {
                    preferred
                } else {
                    short()?
                };
                Self {
                    firecracker: path.clone(),
                    host: path.clone(),
                    cleanup: vec![path],
                }
            }
            Some(root) => {
                let inside = root.join(SOCKET_NAME);
                let firecracker = Path::new("/").join(SOCKET_NAME);
                if inside.as_os_str().len() <= MAX_SOCKET_PATH {
                    Self {
                        firecracker,
                        host: inside,
                        cleanup: Vec::new(),
                    }
                } else {
                    let link = short()?;
                    remove_if_present(&link)?;
                    std::os::unix::fs::symlink(&inside, &link)?;
                    Self {
                        firecracker,
                        host: link.clone(),
                        cleanup: vec![link],
                    }
                }
            }
        };
        // Firecracker refuses to start when its socket path exists.
        if jail_root.is_none() {
            remove_if_present(&paths.host)?;
        }
        Ok(paths)
    }
}

/// Removes `path` if it is a symlink. Fails, removing nothing, if it is another kind of file.
fn remove_symlink(path: &Path) -> Result<(), std::io::Error> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => std::fs::remove_file(path),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a symlink; move it out of the run directory",
                path.display()
            ),
        )),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    }
}

fn remove_if_present(path: &Path) -> Result<(), std::io::Error> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    }
}

/// A Firecracker process running one guest. Dropping it without [`Vm::stop`] kills the
/// process but leaves its socket and jail files.
pub struct FirecrackerVm {
    pid: u32,
    id: String,
    child: Option<Child>,
    client: ApiClient,
    run_dir: PathBuf,
    sockets: SocketPaths,
    jail: Option<Jail>,
}

impl FirecrackerVm {
    /// Firecracker's `--id` for this VM.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// API client of this VM's socket.
    pub fn api(&self) -> &ApiClient {
        &self.client
    }

    /// Path of Firecracker's stdout and stderr, which include the guest's serial console.
    pub fn vmm_log(&self) -> PathBuf {
        self.run_dir.join(VMM_LOG)
    }

    /// Path of Firecracker's own log.
    pub fn firecracker_log(&self) -> PathBuf {
        self.run_dir.join(FC_LOG)
    }

    /// Returns whether the Firecracker process is still alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Builds the boot requests' values, with paths as Firecracker opens them.
    fn boot_plan(
        &self,
        spec: &BootSpec,
        config: &FirecrackerConfig,
    ) -> Result<BootPlan, std::io::Error> {
        let disk = self.expose_disk(&spec.disk.path)?;
        let kernel = self.expose_input(&spec.kernel, "vmlinux")?;
        let initrd = match &spec.initrd {
            Some(initrd) => Some(self.expose_input(initrd, "initrd")?),
            None => None,
        };
        let (log_path, metrics_path) = self.log_paths()?;
        Ok(BootPlan {
            log_path,
            metrics_path,
            log_level: config.log_level.unwrap_or_default(),
            vcpus: spec.machine.vcpus,
            memory_mib: spec.machine.memory_mib,
            kernel,
            initrd,
            cmdline: spec.cmdline.clone(),
            disk,
            tap: spec.placement.netns.as_ref().map(|_| TAP_NAME.to_owned()),
            guest_mac: GUEST_MAC.to_owned(),
            mmds: config
                .mmds_metadata
                .clone()
                .unwrap_or_else(|| serde_json::json!({})),
            balloon: true,
        })
    }

    fn logging_requests(&self, config: &FirecrackerConfig) -> Vec<ApiRequest> {
        match self.log_paths() {
            Ok((log, metrics)) => {
                config::logging_requests(&log, &metrics, config.log_level.unwrap_or_default())
            }
            Err(err) => {
                tracing::warn!(pid = self.pid, %err, "failed to link Firecracker's logs into the jail; running without them");
                Vec::new()
            }
        }
    }

    /// Paths of `fc.log` and `fc-metrics.json` as Firecracker opens them.
    fn log_paths(&self) -> Result<(PathBuf, PathBuf), std::io::Error> {
        let log = self.run_dir.join(FC_LOG);
        let metrics = self.run_dir.join(FC_METRICS);
        match &self.jail {
            None => Ok((log, metrics)),
            Some(jail) => Ok((
                jailer::link_into(&jail.root, &log, FC_LOG, Some(jail.owner))?,
                jailer::link_into(&jail.root, &metrics, FC_METRICS, Some(jail.owner))?,
            )),
        }
    }

    /// Makes the root disk reachable as the relative path [`DISK_LINK`] and returns that path.
    fn expose_disk(&self, disk: &Path) -> Result<PathBuf, std::io::Error> {
        match &self.jail {
            None => {
                let link = std::path::absolute(self.run_dir.join(DISK_LINK))?;
                let target = std::path::absolute(disk)?;
                if link != target {
                    remove_symlink(&link)?;
                    std::os::unix::fs::symlink(&target, &link)?;
                }
            }
            Some(jail) => {
                jailer::link_into(&jail.root, disk, DISK_LINK, Some(jail.owner))?;
            }
        }
        Ok(PathBuf::from(DISK_LINK))
    }

    /// Returns the path Firecracker opens to read `host`: `host` itself, or its link in the jail.
    fn expose_input(&self, host: &Path, name: &str) -> Result<PathBuf, std::io::Error> {
        match &self.jail {
            None => Ok(host.to_owned()),
            Some(jail) => jailer::link_into(&jail.root, host, name, None),
        }
    }

    /// Sends `requests` in order within `timeout`; the first failure stops the VM.
    async fn send_all(
        &mut self,
        requests: &[ApiRequest],
        timeout: Duration,
        what: &'static str,
    ) -> Result<(), VmmError> {
        let client = self.client.clone();
        let sent = tokio::time::timeout(timeout, async {
            for request in requests {
                client.send(request).await?;
            }
            Ok::<(), ApiError>(())
        })
        .await;
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(self.fail(err.to_string()).await),
            Err(_) => {
                let pid = self.pid;
                let _ = self.stop().await;
                Err(VmmError::Timeout {
                    pid,
                    what,
                    timeout_ms: timeout.as_millis() as u64,
                })
            }
        }
    }

    /// Sends one request, turning a failure into a [`VmmError`] with Firecracker's logs,
    /// without stopping the VM.
    async fn request(&self, request: &ApiRequest) -> Result<(), VmmError> {
        self.client
            .send(request)
            .await
            .map(|_| ())
            .map_err(|err| self.error(err.to_string()))
    }

    fn error(&self, message: String) -> VmmError {
        VmmError::Vmm {
            pid: self.pid,
            message,
            log_tail: self.log_tail(),
        }
    }

    /// Stops the VM and builds the error for `message`, quoting the logs.
    async fn fail(&mut self, message: String) -> VmmError {
        if let Err(err) = self.stop().await {
            tracing::warn!(pid = self.pid, %err, "failed to stop Firecracker after an error");
        }
        self.error(message)
    }

    /// Returns the ends of `fc.log` and `vmm.log`.
    fn log_tail(&self) -> String {
        format!(
            "{FC_LOG}: {} | {VMM_LOG}: {}",
            read_tail(&self.run_dir.join(FC_LOG)),
            read_tail(&self.run_dir.join(VMM_LOG))
        )
    }

    /// Writes the snapshot files, then moves and merges them into `target`. Returns the
    /// memory bytes written to `target.memory`.
    async fn write_snapshot(&mut self, target: &SnapshotTarget) -> Result<u64, VmmError> {
        let prepare = |what, path: &Path| {
            let path = path.to_owned();
            move |source| VmmError::Prepare { what, path, source }
        };
        let memory_dir = parent_dir(&target.memory);
        let vmstate_dir = parent_dir(&target.vmstate);
        // Firecracker writes the memory to a new file next to the target. Writing over
        // `target.memory` in place would change pages that this VM, restored from that
        // file, still maps.
        let memory_temp = TempFile::next_to(&target.memory, &self.id);
        let vmstate_temp = TempFile::next_to(&target.vmstate, &self.id);

        let (vmstate_out, memory_out) = match &self.jail {
            None => (vmstate_temp.path.clone(), memory_temp.path.clone()),
            Some(jail) => {
                for name in ["snapshot-out.vmstate", "snapshot-out.mem"] {
                    let path = jail.root.join(name);
                    remove_if_present(&path).map_err(prepare("jail snapshot file", &path))?;
                }
                (
                    PathBuf::from("/snapshot-out.vmstate"),
                    PathBuf::from("/snapshot-out.mem"),
                )
            }
        };
        let snapshot_type = if target.diff {
            SnapshotType::Diff
        } else {
            SnapshotType::Full
        };
        self.request(&config::snapshot_create_request(
            snapshot_type,
            &vmstate_out,
            &memory_out,
        ))
        .await?;

        if let Some(jail) = &self.jail {
            let moves = [
                (
                    jail.root.join("snapshot-out.vmstate"),
                    vmstate_temp.path.clone(),
                ),
                (jail.root.join("snapshot-out.mem"), memory_temp.path.clone()),
            ];
            for (from, to) in moves {
                move_file(&from, &to).map_err(prepare("jail snapshot file", &from))?;
            }
        }

        let memory_bytes = if target.diff {
            merge_diff(&memory_temp.path, &target.memory)
                .map_err(prepare("snapshot memory file", &target.memory))?
        } else {
            let file = File::open(&memory_temp.path)
                .map_err(prepare("snapshot memory file", &memory_temp.path))?;
            file.sync_all()
                .map_err(prepare("snapshot memory file", &memory_temp.path))?;
            let written = allocated_bytes(&file)
                .map_err(prepare("snapshot memory file", &memory_temp.path))?;
            memory_temp
                .persist(&target.memory)
                .map_err(prepare("snapshot memory file", &target.memory))?;
            written
        };

        let vmstate = File::open(&vmstate_temp.path)
            .map_err(prepare("snapshot state file", &vmstate_temp.path))?;
        vmstate
            .sync_all()
            .map_err(prepare("snapshot state file", &vmstate_temp.path))?;
        vmstate_temp
            .persist(&target.vmstate)
            .map_err(prepare("snapshot state file", &target.vmstate))?;
        hearth_storage::durable::sync_dir(memory_dir).map_err(prepare("snapshot directory", memory_dir))?;
        if vmstate_dir != memory_dir {
            hearth_storage::durable::sync_dir(vmstate_dir).map_err(prepare("snapshot directory", vmstate_dir))?;
        }
        Ok(memory_bytes)
    }
}

#[async_trait]
impl Vm for FirecrackerVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn is_running(&mut self) -> bool {
        FirecrackerVm::is_running(self)
    }

    fn console_log(&self) -> PathBuf {
        // Firecracker writes the guest's serial console to its standard output.
        self.vmm_log()
    }

    async fn snapshot(&mut self, target: &SnapshotTarget) -> Result<SnapshotReport, VmmError> {
        let started = Instant::now();
        let pid = self.pid;
        self.request(&config::vm_state_request(VmRunState::Paused))
            .await?;

        let written =
            match tokio::time::timeout(SNAPSHOT_TIMEOUT, self.write_snapshot(target)).await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(VmmError::Timeout {
                        pid,
                        what: "snapshot",
                        timeout_ms: SNAPSHOT_TIMEOUT.as_millis() as u64,
                    })
                }
            };
        let vmstate_bytes = std::fs::metadata(&target.vmstate)
            .map(|meta| meta.len())
            .unwrap_or(0);
        let bytes_written = vmstate_bytes + written;

        tracing::info!(
            pid,
            id = %self.id,
            vmstate = %target.vmstate.display(),
            memory = %target.memory.display(),
            diff = target.diff,
            bytes_written,
            elapsed_us = started.elapsed().as_micros() as u64,
            "Firecracker snapshot written"
        );
        Ok(SnapshotReport {
            memory: SnapshotMemory::InMemoryFile,
            bytes_written,
        })
    }

    async fn resume(&mut self) -> Result<(), VmmError> {
        self.request(&config::vm_state_request(VmRunState::Resumed))
            .await
    }

    async fn stop(&mut self) -> Result<(), VmmError> {
        if let Some(mut child) = self.child.take() {
            // start_kill sends SIGKILL to this child's PID; wait reaps it, so no zombie remains.
            if let Err(source) = child.start_kill() {
                if source.kind() != std::io::ErrorKind::InvalidInput {
                    self.child = Some(child);
                    return Err(VmmError::Stop {
                        pid: self.pid,
                        source,
                    });
                }
            }
            if let Err(source) = child.wait().await {
                return Err(VmmError::Stop {
                    pid: self.pid,
                    source,
                });
            }
            tracing::info!(pid = self.pid, id = %self.id, run_dir = %self.run_dir.display(), "Firecracker VM stopped");
        }

        for path in std::mem::take(&mut self.sockets.cleanup) {
            if let Err(err) = remove_if_present(&path) {
                tracing::warn!(pid = self.pid, path = %path.display(), %err, "failed to remove Firecracker socket");
            }
        }
        if self.jail.is_none() {
            let link = self.run_dir.join(DISK_LINK);
            if let Err(err) = remove_symlink(&link) {
                tracing::warn!(pid = self.pid, path = %link.display(), %err, "failed to remove disk link");
            }
        }
        if let Some(jail) = self.jail.take() {
            // The jail contains hard links and copies only, so removing it leaves the originals.
            if let Err(err) = std::fs::remove_dir_all(&jail.dir) {
                if err.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(pid = self.pid, dir = %jail.dir.display(), %err, "failed to remove jail");
                }
            }
        }
        Ok(())
    }
}

/// A file path that is removed on drop unless [`TempFile::persist`] renames it.
struct TempFile {
    path: PathBuf,
    persisted: bool,
}

impl TempFile {
    /// Names a temporary file in the directory of `target`; the file itself is not created.
    fn next_to(target: &Path, id: &str) -> Self {
        let name = target
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = target.with_file_name(format!(".{name}.{id}.tmp"));
        Self {
            path,
            persisted: false,
        }
    }

    /// Renames the file to `target`, replacing it.
    fn persist(mut self, target: &Path) -> Result<(), std::io::Error> {
        std::fs::rename(&self.path, target)?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            if let Err(err) = remove_if_present(&self.path) {
                tracing::warn!(path = %self.path.display(), %err, "failed to remove temporary snapshot file");
            }
        }
    }
}

/// Copies the data ranges of the diff snapshot `diff` into `base` at the same offsets,
/// fsyncs `base` and returns the bytes copied. `base` must hold the memory the VM was
/// restored from.
fn merge_diff(diff: &Path, base: &Path) -> Result<u64, std::io::Error> {
    let source = File::open(diff)?;
    let target = std::fs::OpenOptions::new().write(true).open(base)?;
    let len = source.metadata()?.len();
    let base_len = target.metadata()?.len();
    if base_len != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "diff snapshot memory is {len} bytes but the base memory file is {base_len} bytes"
            ),
        ));
    }
    let mut copied = 0;
    for (start, end) in hearth_storage::clone::data_ranges(&source, len)? {
        hearth_storage::clone::copy_range(&source, &target, start, end)?;
        copied += end - start;
    }
    target.sync_all()?;
    Ok(copied)
}

/// Bytes of `file` backed by disk blocks, at most its length.
fn allocated_bytes(file: &File) -> Result<u64, std::io::Error> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    Ok((meta.blocks() * 512).min(meta.len()))
}

/// Renames `from` to `to`, or copies and removes it when they are on different filesystems.
fn move_file(from: &Path, to: &Path) -> Result<(), std::io::Error> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(err) if err.raw_os_error() == Some(libc::EXDEV) => {
            remove_if_present(to)?;
            hearth_storage::clone_sparse(from, to)?;
            std::fs::remove_file(from)
        }
        Err(err) => Err(err),
    }
}

fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}



#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn socket_in_short_run_dir() {
        let dir = tempfile::tempdir().unwrap();

        let sockets = SocketPaths::choose(dir.path(), None, "vm-1").unwrap();

        assert_eq!(sockets.host, dir.path().join("fc.sock"));
        assert_eq!(sockets.firecracker, sockets.host);
    }

    #[test]
    fn deep_run_dir_socket_moves() {
        let deep = PathBuf::from("/").join("d".repeat(120));

        let sockets = SocketPaths::choose(&deep, None, "vm-deep").unwrap();

        assert_eq!(sockets.host, Path::new(SOCKET_DIR).join("vm-deep.sock"));
        assert_eq!(sockets.cleanup, vec![sockets.host.clone()]);
    }

    #[test]
    fn jailed_socket_is_inside_the_chroot() {
        let dir = tempfile::tempdir().unwrap();

        let sockets = SocketPaths::choose(Path::new("/unused"), Some(dir.path()), "vm-1").unwrap();

        assert_eq!(sockets.firecracker, Path::new("/fc.sock"));
        assert_eq!(sockets.host, dir.path().join("fc.sock"));
    }

    #[test]
    fn vm_ids_unique_and_valid() {
        let first = new_vm_id();
        let second = new_vm_id();

        assert_ne!(first, second);
        assert!(first.len() <= 64);
        assert!(
            first.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "{first}"
        );
    }

    #[test]
    fn merge_diff_copies_only_data_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        let diff = dir.path().join("diff");
        std::fs::write(&base, vec![1u8; 3 << 20]).unwrap();
        let diff_file = File::create(&diff).unwrap();
        diff_file.set_len(3 << 20).unwrap();
        diff_file.write_all_at(&vec![9u8; 4096], 1 << 20).unwrap();
        drop(diff_file);

        let copied = merge_diff(&diff, &base).unwrap();

        let merged = std::fs::read(&base).unwrap();
        assert!((4096..3 << 20).contains(&copied), "copied {copied}");
        assert_eq!(merged[(1 << 20) - 1], 1);
        assert!(merged[1 << 20..(1 << 20) + 4096]
            .iter()
            .all(|&byte| byte == 9));
        assert_eq!(merged[(1 << 20) + 4096], 1);
    }

    #[test]
    fn merge_diff_rejects_size_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        let diff = dir.path().join("diff");
        std::fs::write(&base, vec![1u8; 8192]).unwrap();
        std::fs::write(&diff, vec![1u8; 4096]).unwrap();

        let err = merge_diff(&diff, &base).unwrap_err();

        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn qcow2_disk_is_rejected() {
        let err = require_raw_disk(DiskFormat::Qcow2, Path::new("/d.qcow2")).unwrap_err();

        assert!(err.to_string().contains("raw"), "{err}");
    }
}
