//! QEMU driver: one `qemu-system-x86_64 -M microvm` process per VM, controlled over QMP.
//!
//! Launch, step by step:
//! 1. Hearth creates a connected socket pair for QMP and hands one end to QEMU
//!    (`-chardev socket,fd=N,server=off`), so it talks to QEMU at once instead of polling
//!    for a socket file to appear.
//! 2. The child enters the slot's network namespace with `setns` between fork and exec, so
//!    QEMU opens the namespace's tap device; no `ip netns exec` process is involved.
//! 3. Guest RAM is a `memory-backend-file`. A booted VM maps it shared, so the file is the
//!    snapshot's memory once the VM is paused and killed. The migration capability
//!    `x-ignore-shared` keeps that RAM out of the device state stream. A restore maps the same file
//!    private (copy-on-write) and reads the device state from a descriptor Hearth opened
//!    (`migrate-incoming fd:N`), which again spawns no helper process.
//!
//! Files in the run directory: `console.log` (guest serial console) and
//! `vmm.log` (QEMU's own output).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hearth_types::guest::{GUEST_MAC, TAP_NAME};
use serde_json::json;
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use crate::accel::{choose_accel, Accel, AccelChoice};
use crate::log_tail::read_tail;
use crate::qmp::{QmpClient, QmpError};
use crate::{
    BootSpec, DiskFormat, DiskSpec, MachineSize, RestoreSpec, SnapshotMemory, SnapshotReport,
    SnapshotTarget, Vm, VmPlacement, VmmDriver, VmmError, VmmKind,
};

/// Default QEMU binary, looked up in `PATH`.
pub const DEFAULT_QEMU_BINARY: &str = "qemu-system-x86_64";

/// Time QEMU gets from spawn to its QMP greeting.
const QMP_GREETING_TIMEOUT: Duration = Duration::from_secs(15);
/// Time a restore gets to load the device state.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a snapshot gets to write the device state.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Name under which a snapshot's file descriptor is handed to QEMU.
const SNAPSHOT_FD_NAME: &str = "hearth-snapshot";

/// File names in the run directory.
const CONSOLE_LOG: &str = "console.log";
const VMM_LOG: &str = "vmm.log";

/// Drives QEMU microVMs.
#[derive(Clone, Debug)]
pub struct QemuDriver {
    binary: PathBuf,
    accel: AccelChoice,
}

impl QemuDriver {
    /// Creates a driver that runs `qemu-system-x86_64` with the accelerator chosen by
    /// [`choose_accel`], and logs that choice.
    pub fn from_env() -> Self {
        let accel = choose_accel();
        tracing::info!(accel = %accel.accel, reason = %accel.reason, "chose QEMU accelerator");
        Self::new(DEFAULT_QEMU_BINARY, accel)
    }

    /// Creates a driver with an explicit binary and accelerator.
    pub fn new(binary: impl Into<PathBuf>, accel: AccelChoice) -> Self {
        Self {
            binary: binary.into(),
            accel,
        }
    }

    /// Returns the accelerator this driver uses and the reason for the choice.
    pub fn accel(&self) -> &AccelChoice {
        &self.accel
    }

    /// Boots a guest; see [`VmmDriver::boot`].
    pub async fn boot_vm(&self, spec: &BootSpec) -> Result<QemuVm, VmmError> {
        let mut args = self.machine_args(spec.machine, &spec.memory_file, true);
        args.extend(device_args(&spec.disk, &spec.placement));
        args.extend(["-kernel".into(), path_arg(&spec.kernel)]);
        if let Some(initrd) = &spec.initrd {
            args.extend(["-initrd".into(), path_arg(initrd)]);
        }
        let cmdline = match self.accel.accel {
            // TCG guests get the host's TSC rate, so a busy host cannot hang their boot. Where
            // the host's TSC is stable, they also keep time with it (see `tsc`).
            Accel::Tcg => crate::tsc::tcg_cmdline(&spec.cmdline, crate::tsc::host_tsc()),
            Accel::Kvm => spec.cmdline.clone(),
        };
        args.extend(["-append".into(), cmdline]);

        let mut vm = self.launch(args, &spec.placement, None).await?;
        vm.shared_memory = true;
        vm.memory_file = spec.memory_file.clone();
        vm.qmp(|qmp| Box::pin(qmp.execute("migrate-set-capabilities", Some(capabilities()))))
            .await?;
        tracing::info!(pid = vm.pid, run_dir = %spec.placement.run_dir.display(), "VM booted");
        Ok(vm)
    }

    /// Restores a snapshot; see [`VmmDriver::restore`].
    pub async fn restore_vm(&self, spec: &RestoreSpec) -> Result<QemuVm, VmmError> {
        let started = Instant::now();
        let vmstate = File::open(&spec.vmstate).map_err(|source| VmmError::Prepare {
            what: "snapshot device state",
            path: spec.vmstate.clone(),
            source,
        })?;
        let vmstate_fd = vmstate.as_raw_fd();

        if spec.memory_shared {
            prepare_memory_file(&spec.memory_file, spec.machine.memory_mib)?;
        }
        let mut args = self.machine_args(spec.machine, &spec.memory_file, spec.memory_shared);
        args.extend(device_args(&spec.disk, &spec.placement));
        args.extend(["-incoming".into(), "defer".into()]);

        let mut vm = self.launch(args, &spec.placement, Some(vmstate_fd)).await?;
        vm.shared_memory = spec.memory_shared;
        vm.memory_file = spec.memory_file.clone();
        // QEMU keeps its own copy of the descriptor from here on.
        drop(vmstate);

        // The capability must match the one the stream was written with: on when shared
        // RAM stayed out of it, off when it carries every page.
        let ignore_shared = !spec.vmstate_has_memory;
        let result =
            tokio::time::timeout(RESTORE_TIMEOUT, vm.load_incoming(vmstate_fd, ignore_shared))
                .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                let _ = vm.stop().await;
                return Err(err);
            }
            Err(_) => {
                let pid = vm.pid;
                let _ = vm.stop().await;
                return Err(VmmError::Timeout {
                    pid,
                    what: "restore",
                    timeout_ms: RESTORE_TIMEOUT.as_millis() as u64,
                });
            }
        }
        tracing::info!(
            pid = vm.pid,
            run_dir = %spec.placement.run_dir.display(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "VM restored"
        );
        Ok(vm)
    }

    /// Options for the machine, accelerator, CPUs and file-backed RAM.
    fn machine_args(&self, machine: MachineSize, memory_file: &Path, shared: bool) -> Vec<String> {
        let cpu = match self.accel.accel {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        };
        let share = if shared { "on" } else { "off" };
        vec![
            "-M".into(),
            "microvm,x-option-roms=off,isa-serial=on,rtc=on,memory-backend=mem".into(),
            "-accel".into(),
            self.accel.accel.qemu_name().into(),
            "-cpu".into(),
            cpu.into(),
            "-smp".into(),
            machine.vcpus.to_string(),
            "-m".into(),
            format!("{}M", machine.memory_mib),
            "-object".into(),
            format!(
                "memory-backend-file,id=mem,size={}M,mem-path={},share={share}",
                machine.memory_mib,
                escape_opt(&memory_file.to_string_lossy())
            ),
            "-nodefaults".into(),
            "-no-user-config".into(),
            // A guest reset (the kernel's panic=1, or a failed init) ends the process.
            "-no-reboot".into(),
            "-display".into(),
            "none".into(),
        ]
    }

    /// Spawns QEMU with the QMP listener (and `extra_fd`, if any) inherited, connects to
    /// QMP and completes the handshake.
    async fn launch(
        &self,
        mut args: Vec<String>,
        placement: &VmPlacement,
        extra_fd: Option<RawFd>,
    ) -> Result<QemuVm, VmmError> {
        let run_dir = &placement.run_dir;
        let prepare = |what, path: &Path| {
            let path = path.to_owned();
            move |source| VmmError::Prepare { what, path, source }
        };

        // QMP runs over a connected socket pair: QEMU gets one end as an open descriptor,
        // so no socket file exists whose path could exceed the 108-byte limit of Unix
        // socket addresses in deep data directories.
        let (qmp_ours, qmp_theirs) =
            std::os::unix::net::UnixStream::pair().map_err(prepare("QMP socket pair", run_dir))?;
        let listen_fd = qmp_theirs.as_raw_fd();
        let log_path = run_dir.join(VMM_LOG);
        let log = File::create(&log_path).map_err(prepare("VMM log", &log_path))?;
        let log_err = log.try_clone().map_err(prepare("VMM log", &log_path))?;
        let netns = match &placement.netns {
            Some(name) => {
                let path = Path::new("/run/netns").join(name);
                Some(File::open(&path).map_err(prepare("network namespace", &path))?)
            }
            None => None,
        };

        args.extend([
            "-chardev".into(),
            format!("socket,id=qmp,fd={listen_fd},server=off"),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
            "-chardev".into(),
            format!(
                "file,id=console,path={}",
                escape_opt(&run_dir.join(CONSOLE_LOG).to_string_lossy())
            ),
            "-serial".into(),
            "chardev:console".into(),
        ]);

        let mut command = Command::new(&self.binary);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true);
        let netns_fd = netns.as_ref().map(|file| file.as_raw_fd());
        let inherited = [Some(listen_fd), extra_fd];
        // SAFETY: the closure runs in the forked child before exec. It allocates nothing and
        // calls only async-signal-safe system calls (prctl, fcntl, setns), on descriptors
        // that stay open in the parent until spawn returns.
        unsafe {
            command.pre_exec(move || {
                // If the process that started QEMU dies, even by SIGKILL, QEMU dies with it
                // instead of running on unowned. The signal follows the spawning thread, a
                // tokio worker that lives as long as the runtime.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                for fd in inherited.into_iter().flatten() {
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(fd) = netns_fd {
                    if libc::setns(fd, libc::CLONE_NEWNET) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }

        tracing::debug!(binary = %self.binary.display(), ?args, "starting QEMU");
        let child = command.spawn().map_err(|source| VmmError::Spawn {
            program: self.binary.display().to_string(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        drop(qmp_theirs);
        drop(netns);
        let stream = qmp_ours
            .set_nonblocking(true)
            .and_then(|()| UnixStream::from_std(qmp_ours));

        let mut vm = QemuVm {
            disk_layers: 0,
            pid,
            child: Some(child),
            qmp: None,
            run_dir: run_dir.clone(),
            shared_memory: false,
            memory_file: PathBuf::new(),
        };
        let stream = match stream {
            Ok(stream) => stream,
            Err(source) => {
                let _ = vm.stop().await;
                return Err(VmmError::Prepare {
                    what: "QMP connection",
                    path: run_dir.clone(),
                    source,
                });
            }
        };
        match tokio::time::timeout(QMP_GREETING_TIMEOUT, QmpClient::handshake(stream)).await {
            Ok(Ok(qmp)) => vm.qmp = Some(qmp),
            Ok(Err(err)) => return Err(vm.fail(err).await),
            Err(_) => {
                let _ = vm.stop().await;
                return Err(VmmError::Timeout {
                    pid,
                    what: "QMP greeting",
                    timeout_ms: QMP_GREETING_TIMEOUT.as_millis() as u64,
                });
            }
        }
        Ok(vm)
    }
}

#[async_trait]
impl VmmDriver for QemuDriver {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    async fn boot(&self, spec: &BootSpec) -> Result<Box<dyn Vm>, VmmError> {
        Ok(Box::new(self.boot_vm(spec).await?))
    }

    async fn restore(&self, spec: &RestoreSpec) -> Result<Box<dyn Vm>, VmmError> {
        Ok(Box::new(self.restore_vm(spec).await?))
    }
}

/// A QEMU process running one guest. Dropping it without [`Vm::stop`] kills the process
/// but leaves the QMP socket file.
pub struct QemuVm {
    pid: u32,
    child: Option<Child>,
    qmp: Option<QmpClient>,
    run_dir: PathBuf,
    /// True for a booted VM, whose RAM is the shared memory file; false for a restored
    /// one, whose RAM is a private copy-on-write mapping.
    shared_memory: bool,
    /// The memory backend's file.
    memory_file: PathBuf,
    /// Disk layers added by [`Vm::push_disk_layer`]; the writable node is `root` before
    /// the first and `layer<N>` after the N-th.
    disk_layers: u32,
}

impl QemuVm {
    /// Path of the guest's serial console log.
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join(CONSOLE_LOG)
    }

    /// Path of QEMU's own log (its stdout and stderr).
    pub fn vmm_log(&self) -> PathBuf {
        self.run_dir.join(VMM_LOG)
    }

    /// Returns whether the QEMU process is still alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Runs one QMP exchange, turning a failure into a [`VmmError`] with QEMU's log.
    async fn qmp<'a, T>(
        &'a mut self,
        exchange: impl FnOnce(
            &'a mut QmpClient,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, QmpError>> + Send + 'a>,
        >,
    ) -> Result<T, VmmError> {
        let pid = self.pid;
        let Some(qmp) = self.qmp.as_mut() else {
            return Err(VmmError::Qmp {
                pid,
                source: QmpError::Closed,
            });
        };
        match exchange(qmp).await {
            Ok(value) => Ok(value),
            Err(err) => Err(VmmError::Qmp { pid, source: err }),
        }
    }

    /// Loads the device state from the inherited descriptor and resumes the guest.
    async fn load_incoming(
        &mut self,
        vmstate_fd: RawFd,
        ignore_shared: bool,
    ) -> Result<(), VmmError> {
        let Some(qmp) = self.qmp.as_mut() else {
            return Err(VmmError::Qmp {
                pid: self.pid,
                source: QmpError::Closed,
            });
        };
        let result = async {
            qmp.execute(
                "migrate-set-capabilities",
                Some(capabilities_with(ignore_shared)),
            )
            .await?;
            qmp.execute(
                "migrate-incoming",
                Some(json!({ "uri": format!("fd:{vmstate_fd}") })),
            )
            .await?;
            qmp.wait_migration_end().await
        }
        .await;
        let status = match result {
            Ok(status) => status,
            Err(err) => return Err(self.fail(err).await),
        };
        if status != "completed" {
            let message = format!("loading the snapshot ended with migration status {status}");
            return Err(self.fail_with(message).await);
        }

        // The template was paused before it was saved, so the restored guest starts paused.
        let qmp = self.qmp.as_mut().expect("checked above");
        let resumed = async {
            if qmp.run_state().await? != "running" {
                qmp.execute("cont", None).await?;
            }
            qmp.run_state().await
        }
        .await;
        match resumed {
            Ok(state) if state == "running" => Ok(()),
            Ok(state) => Err(self.fail_with(format!("guest is {state} after cont")).await),
            Err(err) => Err(self.fail(err).await),
        }
    }

    /// Builds the error for a QMP failure, stopping the VM and quoting its log.
    async fn fail(&mut self, err: QmpError) -> VmmError {
        self.fail_with(err.to_string()).await
    }

    async fn fail_with(&mut self, message: String) -> VmmError {
        let _ = self.stop().await;
        VmmError::Vmm {
            pid: self.pid,
            message,
            log_tail: read_tail(&self.vmm_log()),
        }
    }
}

#[async_trait]
impl Vm for QemuVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn is_running(&mut self) -> bool {
        QemuVm::is_running(self)
    }

    fn console_log(&self) -> PathBuf {
        QemuVm::console_log(self)
    }

    async fn push_disk_layer(&mut self, overlay: &Path) -> Result<(), VmmError> {
        let current = match self.disk_layers {
            0 => "root".to_owned(),
            n => format!("layer{n}"),
        };
        let next = format!("layer{}", self.disk_layers + 1);
        let arguments = serde_json::json!({
            "node-name": current,
            "snapshot-file": overlay.to_string_lossy(),
            "snapshot-node-name": next,
            "format": "qcow2",
            "mode": "absolute-paths",
        });
        self.qmp(|qmp| Box::pin(qmp.execute("blockdev-snapshot-sync", Some(arguments)))).await?;
        self.disk_layers += 1;
        tracing::debug!(pid = self.pid, overlay = %overlay.display(), node = %next, "added a disk layer");
        Ok(())
    }

    async fn snapshot(&mut self, target: &SnapshotTarget) -> Result<SnapshotReport, VmmError> {
        let started = Instant::now();
        let pid = self.pid;
        let vmstate = &target.vmstate;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(vmstate)
            .map_err(|source| VmmError::Prepare {
                what: "snapshot file",
                path: vmstate.clone(),
                source,
            })?;
        // RAM stays out of the stream only when it lives in the target's memory file
        // already; otherwise every page goes into the stream.
        let in_place = self.shared_memory && target.memory == self.memory_file;
        let Some(qmp) = self.qmp.as_mut() else {
            return Err(VmmError::Qmp {
                pid,
                source: QmpError::Closed,
            });
        };
        // QEMU writes the stream itself into the descriptor Hearth opened, so a write error
        // (a full disk) fails the migration instead of vanishing in a helper process.
        let result = tokio::time::timeout(SNAPSHOT_TIMEOUT, async {
            qmp.execute(
                "migrate-set-capabilities",
                Some(capabilities_with(in_place)),
            )
            .await?;
            qmp.execute_with_fd("getfd", json!({ "fdname": SNAPSHOT_FD_NAME }), file.as_fd())
                .await?;
            qmp.execute("stop", None).await?;
            qmp.execute(
                "migrate",
                Some(json!({ "uri": format!("fd:{SNAPSHOT_FD_NAME}") })),
            )
            .await?;
            qmp.wait_migration_end().await
        })
        .await;
        let status = match result {
            Ok(Ok(status)) => status,
            Ok(Err(source)) => return Err(VmmError::Qmp { pid, source }),
            Err(_) => {
                return Err(VmmError::Timeout {
                    pid,
                    what: "snapshot",
                    timeout_ms: SNAPSHOT_TIMEOUT.as_millis() as u64,
                })
            }
        };
        if status != "completed" {
            let (_, error) = self
                .qmp
                .as_mut()
                .expect("checked above")
                .migration_status()
                .await
                .unwrap_or_default();
            return Err(VmmError::Vmm {
                pid,
                message: format!(
                    "writing snapshot {} ended with status {status}: {}",
                    vmstate.display(),
                    error.unwrap_or_else(|| "QEMU reported no reason (check the free space for the file)".into())
                ),
                log_tail: read_tail(&self.vmm_log()),
            });
        }
        let synced =
            tokio::task::spawn_blocking(move || file.sync_all().and_then(|()| file.metadata()))
                .await
                .map_err(|err| std::io::Error::other(err.to_string()))
                .and_then(|result| result);
        let mut bytes_written = synced
            .map_err(|source| VmmError::Prepare {
                what: "snapshot file (sync)",
                path: vmstate.clone(),
                source,
            })?
            .len();
        let memory = if in_place {
            // The pages the guest changed since they last reached the disk are what the
            // flush writes now.
            bytes_written += dirty_bytes(pid, &self.memory_file).unwrap_or(0);
            let memory_file = self.memory_file.clone();
            tokio::task::spawn_blocking(move || {
                File::open(&memory_file).and_then(|file| file.sync_all())
            })
            .await
            .map_err(|err| std::io::Error::other(err.to_string()))
            .and_then(|result| result)
            .map_err(|source| VmmError::Prepare {
                what: "memory file (sync)",
                path: self.memory_file.clone(),
                source,
            })?;
            SnapshotMemory::InMemoryFile
        } else {
            SnapshotMemory::InVmstate
        };
        tracing::info!(
            pid,
            vmstate = %vmstate.display(),
            bytes_written,
            elapsed_us = started.elapsed().as_micros() as u64,
            "VM snapshot written"
        );
        Ok(SnapshotReport {
            memory,
            bytes_written,
        })
    }

    async fn resume(&mut self) -> Result<(), VmmError> {
        let pid = self.pid;
        let Some(qmp) = self.qmp.as_mut() else {
            return Err(VmmError::Qmp {
                pid,
                source: QmpError::Closed,
            });
        };
        let result = async {
            // A failed `migrate` may have left the descriptor registered.
            let _ = qmp
                .execute("closefd", Some(json!({ "fdname": SNAPSHOT_FD_NAME })))
                .await;
            if qmp.run_state().await? != "running" {
                qmp.execute("cont", None).await?;
            }
            qmp.run_state().await
        }
        .await;
        match result {
            Ok(state) if state == "running" => Ok(()),
            Ok(state) => Err(VmmError::Vmm {
                pid,
                message: format!("guest is {state} after cont"),
                log_tail: read_tail(&self.vmm_log()),
            }),
            Err(source) => Err(VmmError::Qmp { pid, source }),
        }
    }

    async fn stop(&mut self) -> Result<(), VmmError> {
        self.qmp = None;
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
            tracing::info!(pid = self.pid, run_dir = %self.run_dir.display(), "VM stopped");
        }
        Ok(())
    }
}

impl QmpClient {
    /// Polls `query-migrate` until the migration leaves its running states, and returns the
    /// final status. A failure's description from QEMU is logged.
    async fn wait_migration_end(&mut self) -> Result<String, QmpError> {
        loop {
            let (status, error) = self.migration_status().await?;
            match status.as_str() {
                "setup" | "active" | "device" | "pre-switchover" | "none" => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                _ => {
                    if let Some(error) = error {
                        tracing::warn!(status, error, "migration failed");
                    }
                    return Ok(status);
                }
            }
        }
    }
}

/// Capabilities set on every VM: RAM in a shared file stays out of the migration stream.
fn capabilities() -> serde_json::Value {
    capabilities_with(true)
}

/// Migration capabilities with `x-ignore-shared` as given. Source and destination of a
/// stream must agree on it.
fn capabilities_with(ignore_shared: bool) -> serde_json::Value {
    json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": ignore_shared }] })
}

/// Creates the memory file of a VM whose RAM lives in it, at `memory_mib`, unless it
/// exists with that size. Missing pages read as zero, so the file stays sparse where the
/// guest never wrote.
fn prepare_memory_file(path: &Path, memory_mib: u32) -> Result<(), VmmError> {
    let size = u64::from(memory_mib) << 20;
    let prepare = |source| VmmError::Prepare {
        what: "memory file",
        path: path.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(prepare)?;
    let found = file.metadata().map_err(prepare)?.len();
    if found != size {
        if found != 0 {
            return Err(prepare(std::io::Error::other(format!(
                "memory file has {found} bytes, the VM needs {size}"
            ))));
        }
        file.set_len(size).map_err(prepare)?;
    }
    Ok(())
}

/// Bytes of `memory_file`'s mapping in process `pid` that are dirty (changed since they
/// were last written back), from `/proc/<pid>/smaps`.
fn dirty_bytes(pid: u32, memory_file: &Path) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let wanted = std::fs::canonicalize(memory_file).unwrap_or_else(|_| memory_file.to_owned());
    let wanted = wanted.to_string_lossy();
    let mut in_mapping = false;
    let mut kib = 0u64;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            in_mapping = line.ends_with(wanted.as_ref());
            continue;
        }
        if in_mapping && (line.starts_with("Shared_Dirty:") || line.starts_with("Private_Dirty:")) {
            kib += line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Some(kib * 1024)
}

/// Disk and network devices, in a fixed order: boot and restore must create the same
/// virtio-mmio devices in the same slots.
fn device_args(disk: &DiskSpec, placement: &VmPlacement) -> Vec<String> {
    let driver = match disk.format {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    };
    let mut args = vec![
        "-blockdev".into(),
        format!(
            "driver={driver},node-name=root,file.driver=file,file.filename={}",
            escape_opt(&disk.path.to_string_lossy())
        ),
        "-device".into(),
        "virtio-blk-device,drive=root".into(),
    ];
    if placement.netns.is_some() {
        args.extend([
            "-netdev".into(),
            format!("tap,id=net0,ifname={TAP_NAME},script=no,downscript=no"),
            "-device".into(),
            format!("virtio-net-device,netdev=net0,mac={GUEST_MAC}"),
        ]);
    }
    args
}

/// Escapes a value for QEMU's `key=value,...` option syntax, where a comma is doubled.
fn escape_opt(value: &str) -> String {
    value.replace(',', ",,")
}

fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_set_ignore_shared_as_given() {
        assert_eq!(capabilities_with(false)["capabilities"][0]["state"], false);
        assert_eq!(capabilities()["capabilities"][0]["state"], true);
    }

    #[test]
    fn prepare_memory_file_creates_a_sparse_file_of_the_memory_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");

        prepare_memory_file(&path, 4).unwrap();
        prepare_memory_file(&path, 4).unwrap();

        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 << 20);
        let err = prepare_memory_file(&path, 8).unwrap_err();
        assert!(err.to_string().contains("memory file"), "{err}");
    }

    #[test]
    fn dirty_bytes_sums_the_memory_mapping_only() {
        let dir = tempfile::tempdir().unwrap();
        let memory = dir.path().join("memory");
        std::fs::write(&memory, b"").unwrap();
        let memory = std::fs::canonicalize(&memory).unwrap();
        // This process maps the file shared and dirties two of its four pages.
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&memory).unwrap();
        file.set_len(4 * 4096).unwrap();
        // SAFETY: maps a 16 KiB file this test owns; the pointer is used only within the
        // mapping's bounds and unmapped before the file is dropped.
        unsafe {
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                4 * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(ptr, libc::MAP_FAILED);
            *(ptr as *mut u8) = 1;
            *(ptr as *mut u8).add(2 * 4096) = 1;
            let dirty = dirty_bytes(std::process::id(), &memory).unwrap();
            libc::munmap(ptr, 4 * 4096);
            assert_eq!(dirty, 2 * 4096);
        }
    }

    #[test]
    fn escape_opt_doubles_commas() {
        assert_eq!(escape_opt("/a,b/c"), "/a,,b/c");
    }

    #[test]
    fn device_args_put_disk_before_network() {
        let disk = DiskSpec {
            path: "/d.qcow2".into(),
            format: DiskFormat::Qcow2,
        };
        let placement = VmPlacement {
            netns: Some("ns".into()),
            run_dir: "/run".into(),
        };

        let args = device_args(&disk, &placement);

        let blk = args
            .iter()
            .position(|arg| arg.starts_with("virtio-blk"))
            .unwrap();
        let net = args
            .iter()
            .position(|arg| arg.starts_with("virtio-net"))
            .unwrap();
        assert!(blk < net);
        assert!(args.contains(
            &"driver=qcow2,node-name=root,file.driver=file,file.filename=/d.qcow2".to_owned()
        ));
    }
}
