//! Checks every request the Firecracker driver sends against the real Firecracker binary
//! (v1.12.1, from `scripts/install-firecracker.sh`), and runs the driver's boot, snapshot and
//! restore against it.
//!
//! Needs root: the tests create network namespaces with a tap device. Firecracker also needs
//! `/dev/kvm`. Where the host's KVM cannot run a guest, Firecracker still accepts the
//! requests; the tests print each step they could not check and why.
//!
//! The request bodies come from `hearth_vmm::firecracker::config`, the functions the driver
//! itself uses, and are sent with the driver's API client.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use hearth_types::guest::{GUEST_MAC, TAP_NAME};
use hearth_vmm::firecracker::config::{
    self, ApiRequest, BootPlan, LogLevel, SnapshotType, VmRunState,
};
use hearth_vmm::firecracker::{firecracker_binary_from_env, ApiClient, ApiError, JailerConfig};
use hearth_vmm::{
    BootSpec, DiskFormat, DiskSpec, FirecrackerConfig, FirecrackerDriver, MachineSize, RestoreSpec,
    SnapshotMemory, SnapshotTarget, Vm, VmPlacement,
};

const MEMORY_MIB: u32 = 128;
/// Guest-physical load address of the test kernel: above the 1 MiB that Firecracker's ELF
/// loader requires.
const TEST_KERNEL_LOAD: u64 = 0x100_0000;

fn firecracker() -> PathBuf {
    let binary = firecracker_binary_from_env();
    match binary {
        Some(path) if path.is_file() => path,
        _ => panic!(
            "Firecracker binary not found (HEARTH_FIRECRACKER_BIN, /usr/local/lib/hearth/firecracker, PATH; \
             found {binary:?}): run scripts/install-firecracker.sh to install it"
        ),
    }
}

/// A network namespace with a tap device named like the driver's, deleted on drop.
struct TestNetns {
    name: String,
}

impl TestNetns {
    fn create(tag: &str) -> Self {
        let name = format!("hearth-fct-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run(&["ip", "netns", "add", &name]);
        let netns = Self { name };
        run(&[
            "ip",
            "netns",
            "exec",
            &netns.name,
            "ip",
            "tuntap",
            "add",
            "dev",
            TAP_NAME,
            "mode",
            "tap",
        ]);
        run(&[
            "ip",
            "netns",
            "exec",
            &netns.name,
            "ip",
            "link",
            "set",
            TAP_NAME,
            "up",
        ]);
        netns
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the tap inside it.
        let status = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if !matches!(status, Ok(status) if status.success()) {
            eprintln!(
                "failed to delete network namespace {}: {status:?}",
                self.name
            );
        }
    }
}

fn run(args: &[&str]) {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("failed to run command");
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A bare Firecracker process, started in `netns` when given, killed on drop.
struct FirecrackerProcess {
    child: std::process::Child,
    client: ApiClient,
    _dir: tempfile::TempDir,
}

impl FirecrackerProcess {
    async fn start(netns: Option<&TestNetns>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("fc.sock");
        let binary = firecracker();
        let mut command = match netns {
            // `ip netns exec` execs the program, so the child's PID is Firecracker's.
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", &netns.name]).arg(&binary);
                command
            }
            None => Command::new(&binary),
        };
        let log = std::fs::File::create(dir.path().join("vmm.log")).unwrap();
        let child = command
            .arg("--api-sock")
            .arg(&socket)
            .args(["--id", "api-test"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("failed to start firecracker");
        let client = ApiClient::new(&socket);
        let mut process = Self {
            child,
            client,
            _dir: dir,
        };
        let child = &mut process.child;
        process
            .client
            .wait_ready(Duration::from_secs(10), || {
                matches!(child.try_wait(), Ok(None))
            })
            .await
            .expect("Firecracker API socket did not come up");
        process
    }

    fn dir(&self) -> &Path {
        self._dir.path()
    }
}

impl Drop for FirecrackerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a minimal ELF64 kernel: one loadable segment whose entry point loops forever
/// (`jmp .`). Firecracker's loader accepts it, and it needs no guest devices.
fn write_test_kernel(path: &Path) {
    let code = [0xeb_u8, 0xfe];
    let header_len = 64u64;
    let phdr_len = 56u64;
    let file_len = header_len + phdr_len + code.len() as u64;
    let entry = TEST_KERNEL_LOAD + header_len + phdr_len;

    let mut elf = Vec::new();
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: executable
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&entry.to_le_bytes()); // e_entry
    elf.extend_from_slice(&header_len.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&(header_len as u16).to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&(phdr_len as u16).to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    elf.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // p_flags: read, execute
    elf.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    elf.extend_from_slice(&TEST_KERNEL_LOAD.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&TEST_KERNEL_LOAD.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&file_len.to_le_bytes()); // p_filesz
    elf.extend_from_slice(&file_len.to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    elf.extend_from_slice(&code);
    assert_eq!(elf.len() as u64, file_len);
    std::fs::write(path, elf).unwrap();
}

/// Kernel and initrd for the boot tests: the base template's when `HEARTH_TEST_TEMPLATE_DIR`
/// is set, else the minimal test kernel written into `dir`.
fn test_kernel(dir: &Path) -> (PathBuf, Option<PathBuf>) {
    if let Some(template) = std::env::var_os("HEARTH_TEST_TEMPLATE_DIR") {
        let template = PathBuf::from(template);
        let initrd = template.join("initrd");
        return (template.join("vmlinux"), initrd.exists().then_some(initrd));
    }
    let kernel = dir.join("test-kernel.elf");
    write_test_kernel(&kernel);
    (kernel, None)
}

fn raw_disk(path: &Path) {
    let file = std::fs::File::create(path).unwrap();
    file.set_len(64 << 20).unwrap();
}

/// Returns whether a rejection comes from the host's KVM rather than from the request.
fn is_kvm_limit(err: &ApiError) -> bool {
    err.fault_message()
        .is_some_and(|message| message.to_lowercase().contains("kvm"))
}

fn assert_parsed_but_rejected(err: &ApiError, expected: &str) {
    let message = err
        .fault_message()
        .unwrap_or_else(|| panic!("expected a Firecracker rejection, got {err}"));
    assert!(
        !message.contains("deserializing"),
        "Firecracker rejected the request body: {message}"
    );
    assert!(
        message.contains(expected),
        "unexpected rejection: {message}"
    );
}

/// Sends every boot request of the driver, one at a time, and checks that Firecracker
/// accepts each (root: network namespace and tap).
#[tokio::test]
async fn boot_requests_accepted_root() {
    let netns = TestNetns::create("boot");
    let process = FirecrackerProcess::start(Some(&netns)).await;
    let dir = process.dir().to_owned();
    let (kernel, initrd) = test_kernel(&dir);
    let disk = dir.join("rootfs.img");
    raw_disk(&disk);
    for name in ["fc.log", "fc-metrics.json"] {
        std::fs::File::create(dir.join(name)).unwrap();
    }
    let plan = BootPlan {
        log_path: dir.join("fc.log"),
        metrics_path: dir.join("fc-metrics.json"),
        log_level: LogLevel::Info,
        vcpus: 1,
        memory_mib: MEMORY_MIB,
        kernel,
        initrd,
        cmdline: "console=ttyS0 reboot=k panic=1".into(),
        disk,
        tap: Some(TAP_NAME.into()),
        guest_mac: GUEST_MAC.into(),
        mmds: serde_json::json!({"sandboxID": "test", "templateID": "base"}),
        balloon: true,
    };

    let requests = config::boot_requests(&plan);

    let mut skipped = Vec::new();
    for request in &requests {
        let result = process.client.send(request).await;
        let is_start = request.path == "/actions";
        match result {
            Ok(response) => {
                assert_eq!(
                    response.status,
                    204,
                    "{} {}",
                    request.method.as_str(),
                    request.path
                );
                println!("accepted: {} {}", request.method.as_str(), request.path);
            }
            Err(err) if is_start && is_kvm_limit(&err) => {
                skipped.push(format!(
                    "InstanceStart: this host's KVM cannot run the guest: {err}"
                ));
            }
            Err(err) => panic!(
                "{} {} rejected: {err}",
                request.method.as_str(),
                request.path
            ),
        }
    }
    let expected = [
        "/logger",
        "/metrics",
        "/machine-config",
        "/boot-source",
        "/drives/rootfs",
    ];
    for path in expected.into_iter().chain([
        "/network-interfaces/eth0",
        "/mmds/config",
        "/mmds",
        "/balloon",
        "/actions",
    ]) {
        assert!(
            requests.iter().any(|request| request.path == path),
            "driver sends no {path}"
        );
    }

    let state = process.client.send(&ApiRequest::get("/")).await.unwrap();
    println!("instance info after InstanceStart: {}", state.body);
    for step in &skipped {
        println!("skipped: {step}");
    }
    println!(
        "not checked here: whether the guest kernel runs (this host's /dev/kvm is paravirtual and \
         cannot run a standard kernel), and MMDS and the balloon as seen from inside the guest"
    );
}

/// The snapshot load body passes Firecracker's parsing: a file that is not a snapshot is
/// rejected for its content, while a malformed body is rejected for its JSON.
#[tokio::test]
async fn snapshot_load_body_parses() {
    let process = FirecrackerProcess::start(None).await;
    let vmstate = process.dir().join("vmstate");
    let memory = process.dir().join("memory");
    std::fs::write(&vmstate, b"not a snapshot").unwrap();
    std::fs::File::create(&memory)
        .unwrap()
        .set_len(u64::from(MEMORY_MIB) << 20)
        .unwrap();

    let err = process
        .client
        .send(&config::snapshot_load_request(&vmstate, &memory))
        .await
        .unwrap_err();

    assert_eq!(err.status(), Some(400));
    assert_parsed_but_rejected(&err, "Load snapshot error");
    println!("snapshot load of an invalid file: {err}");

    // A failed load ends the Firecracker process, so the control case needs a new one.
    let control = FirecrackerProcess::start(None).await;
    let mut malformed = config::snapshot_load_request(&vmstate, &memory);
    malformed.body.as_mut().unwrap()["track_dirty_pages"] = serde_json::json!(true);
    let err = control.client.send(&malformed).await.unwrap_err();
    assert!(
        err.fault_message()
            .unwrap_or_default()
            .contains("deserializing"),
        "{err}"
    );
}

/// Snapshot and run-state bodies parse; without a started VM Firecracker rejects them for
/// the VM's state.
#[tokio::test]
async fn snapshot_and_vm_state_bodies_parse() {
    let process = FirecrackerProcess::start(None).await;
    let vmstate = process.dir().join("vmstate");
    let memory = process.dir().join("memory");
    let requests = [
        config::snapshot_create_request(SnapshotType::Full, &vmstate, &memory),
        config::snapshot_create_request(SnapshotType::Diff, &vmstate, &memory),
        config::vm_state_request(VmRunState::Paused),
        config::vm_state_request(VmRunState::Resumed),
    ];

    for request in &requests {
        let err = process.client.send(request).await.unwrap_err();

        assert_parsed_but_rejected(&err, "not supported before starting the microVM");
    }
}

/// Boots with the driver, writes a full snapshot, resumes, stops, restores it, writes a
/// diff snapshot merged into a copy of the memory, and restores that (root: network namespace).
#[tokio::test]
async fn driver_boot_snapshot_restore_root() {
    let netns = TestNetns::create("drv");
    let dir = tempfile::tempdir().unwrap();
    let (kernel, initrd) = test_kernel(dir.path());
    let disk = dir.path().join("rootfs.img");
    raw_disk(&disk);
    let run_dirs: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("run{i}"))).collect();
    for run_dir in &run_dirs {
        std::fs::create_dir(run_dir).unwrap();
    }
    let driver = FirecrackerDriver::new(FirecrackerConfig {
        binary: firecracker(),
        log_level: Some(LogLevel::Info),
        mmds_metadata: Some(serde_json::json!({"sandboxID": "test"})),
        ..FirecrackerConfig::default()
    });
    let machine = MachineSize {
        vcpus: 1,
        memory_mib: MEMORY_MIB,
    };
    let placement = |run_dir: &Path| VmPlacement {
        netns: Some(netns.name.clone()),
        run_dir: run_dir.to_owned(),
    };
    let spec = BootSpec {
        machine,
        memory_file: dir.path().join("unused-memory"),
        kernel,
        initrd,
        cmdline: "console=ttyS0 reboot=k panic=1".into(),
        disk: DiskSpec {
            path: disk.clone(),
            format: DiskFormat::Raw,
        },
        placement: placement(&run_dirs[0]),
    };

    let mut vm = match driver.boot_vm(&spec).await {
        Ok(vm) => vm,
        Err(err) if err.to_string().to_lowercase().contains("kvm") => {
            println!(
                "skipped: boot, snapshot and restore: this host's KVM cannot run the guest: {err}"
            );
            return;
        }
        Err(err) => panic!("boot failed: {err}"),
    };
    assert!(vm.is_running());
    assert!(run_dirs[0].join("fc.sock").exists());
    assert!(std::fs::symlink_metadata(run_dirs[0].join("fc-rootfs.img"))
        .unwrap()
        .file_type()
        .is_symlink());

    let full = SnapshotTarget {
        vmstate: dir.path().join("vmstate"),
        memory: dir.path().join("memory"),
        diff: false,
    };
    let report = vm.snapshot(&full).await.expect("full snapshot failed");
    assert_eq!(report.memory, SnapshotMemory::InMemoryFile);
    let memory_len = std::fs::metadata(&full.memory).unwrap().len();
    assert_eq!(memory_len, u64::from(MEMORY_MIB) << 20);
    assert!(report.bytes_written > std::fs::metadata(&full.vmstate).unwrap().len());
    vm.resume().await.expect("resume after snapshot failed");
    vm.resume().await.expect("resume of a running VM failed");
    vm.stop().await.unwrap();
    vm.stop().await.expect("second stop failed");
    assert!(!run_dirs[0].join("fc.sock").exists());
    assert!(!run_dirs[0].join("fc-rootfs.img").exists());
    assert!(disk.exists());

    let restore = RestoreSpec {
        machine,
        memory_file: full.memory.clone(),
        vmstate: full.vmstate.clone(),
        vmstate_has_memory: false,
        memory_shared: false,
        disk: DiskSpec {
            path: disk.clone(),
            format: DiskFormat::Raw,
        },
        placement: placement(&run_dirs[1]),
    };
    let mut restored = driver.restore_vm(&restore).await.expect("restore failed");
    assert!(restored.is_running());

    let merged_memory = dir.path().join("memory-diff");
    hearth_storage::clone_sparse(&full.memory, &merged_memory).unwrap();
    let diff = SnapshotTarget {
        vmstate: dir.path().join("vmstate-diff"),
        memory: merged_memory.clone(),
        diff: true,
    };
    let report = restored
        .snapshot(&diff)
        .await
        .expect("diff snapshot failed");
    let vmstate_len = std::fs::metadata(&diff.vmstate).unwrap().len();
    println!(
        "diff snapshot wrote {} bytes ({vmstate_len} of device state)",
        report.bytes_written
    );
    assert!(
        report.bytes_written < memory_len / 2,
        "diff wrote {} bytes",
        report.bytes_written
    );
    assert_eq!(std::fs::metadata(&merged_memory).unwrap().len(), memory_len);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    restored.stop().await.unwrap();

    let mut again = driver
        .restore_vm(&RestoreSpec {
            memory_file: merged_memory,
            vmstate: diff.vmstate.clone(),
            vmstate_has_memory: false,
            memory_shared: false,
            placement: placement(&run_dirs[2]),
            ..restore
        })
        .await
        .expect("restore of the merged diff snapshot failed");
    assert!(again.is_running());
    again.stop().await.unwrap();

    // The source memory file keeps its blocks; the full snapshot allocated it all.
    assert!(std::fs::metadata(&full.memory).unwrap().blocks() > 0);
    println!(
        "not checked here: that the guest runs after restore and that diff pages hold the guest's \
         writes (the test kernel writes no memory; a real guest needs a KVM host)"
    );
}

/// Boots under the jailer (next to the Firecracker binary) in a network namespace, writes a
/// full snapshot out of the jail, and removes the jail on stop (root).
#[tokio::test]
async fn driver_jailed_boot_snapshot_root() {
    let binary = firecracker();
    let jailer_binary = binary.with_file_name("jailer");
    assert!(
        jailer_binary.exists(),
        "no jailer at {}; run scripts/install-firecracker.sh",
        jailer_binary.display()
    );
    let netns = TestNetns::create("jail");
    let dir = tempfile::tempdir().unwrap();
    let (kernel, initrd) = test_kernel(dir.path());
    let disk = dir.path().join("disk.img");
    raw_disk(&disk);
    let run_dir = dir.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    let chroot_base = dir.path().join("jail");
    let driver = FirecrackerDriver::new(FirecrackerConfig {
        binary: binary.clone(),
        jailer: Some(JailerConfig {
            binary: jailer_binary,
            uid: 65534,
            gid: 65534,
            chroot_base: chroot_base.clone(),
            cgroup_version: 2,
        }),
        log_level: Some(LogLevel::Info),
        mmds_metadata: None,
    });
    let spec = BootSpec {
        machine: MachineSize {
            vcpus: 1,
            memory_mib: MEMORY_MIB,
        },
        memory_file: dir.path().join("unused-memory"),
        kernel,
        initrd,
        cmdline: "console=ttyS0".into(),
        disk: DiskSpec {
            path: disk.clone(),
            format: DiskFormat::Raw,
        },
        placement: VmPlacement {
            netns: Some(netns.name.clone()),
            run_dir: run_dir.clone(),
        },
    };

    let mut vm = driver.boot_vm(&spec).await.expect("jailed boot failed");
    let jail_dir = chroot_base.join("firecracker").join(vm.id());
    assert!(jail_dir.join("root/fc-rootfs.img").exists());
    let target = SnapshotTarget {
        vmstate: dir.path().join("vmstate"),
        memory: dir.path().join("memory"),
        diff: false,
    };
    let report = vm.snapshot(&target).await.expect("jailed snapshot failed");
    vm.stop().await.unwrap();

    assert_eq!(
        std::fs::metadata(&target.memory).unwrap().len(),
        u64::from(MEMORY_MIB) << 20
    );
    assert!(report.bytes_written > 0);
    assert!(
        !jail_dir.exists(),
        "jail {} left after stop",
        jail_dir.display()
    );
    assert!(disk.exists());
    let fc_log = std::fs::read_to_string(run_dir.join("fc.log")).unwrap();
    assert!(fc_log.contains("create full snapshot"), "fc.log: {fc_log}");
}

/// A boot with a qcow2 disk fails before Firecracker starts.
#[tokio::test]
async fn driver_rejects_qcow2_disk() {
    let dir = tempfile::tempdir().unwrap();
    let driver = FirecrackerDriver::new(FirecrackerConfig {
        binary: firecracker(),
        ..FirecrackerConfig::default()
    });
    let spec = BootSpec {
        machine: MachineSize {
            vcpus: 1,
            memory_mib: MEMORY_MIB,
        },
        memory_file: dir.path().join("memory"),
        kernel: dir.path().join("vmlinux"),
        initrd: None,
        cmdline: String::new(),
        disk: DiskSpec {
            path: dir.path().join("disk.qcow2"),
            format: DiskFormat::Qcow2,
        },
        placement: VmPlacement {
            netns: None,
            run_dir: dir.path().to_owned(),
        },
    };

    let err = driver
        .boot_vm(&spec)
        .await
        .err()
        .expect("qcow2 disk accepted");

    assert!(err.to_string().contains("raw"), "{err}");
}

/// A rejected boot request reports Firecracker's fault message and its log.
#[tokio::test]
async fn driver_boot_error_quotes_fault_message() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("rootfs.img");
    raw_disk(&disk);
    let not_a_kernel = dir.path().join("vmlinux");
    std::fs::write(&not_a_kernel, b"not an ELF file").unwrap();
    let driver = FirecrackerDriver::new(FirecrackerConfig {
        binary: firecracker(),
        ..FirecrackerConfig::default()
    });
    let spec = BootSpec {
        machine: MachineSize {
            vcpus: 1,
            memory_mib: MEMORY_MIB,
        },
        memory_file: dir.path().join("memory"),
        kernel: not_a_kernel,
        initrd: None,
        cmdline: String::new(),
        disk: DiskSpec {
            path: disk,
            format: DiskFormat::Raw,
        },
        placement: VmPlacement {
            netns: None,
            run_dir: dir.path().to_owned(),
        },
    };

    let err = driver
        .boot_vm(&spec)
        .await
        .err()
        .expect("boot of a non-ELF kernel succeeded");

    let message = err.to_string();
    assert!(message.contains("/actions"), "{message}");
    assert!(message.contains("elf header"), "{message}");
    assert!(message.contains("fc.log:"), "{message}");
    assert!(
        !dir.path().join("fc.sock").exists(),
        "socket left after a failed boot"
    );
    assert_eq!(
        std::fs::metadata(dir.path().join("rootfs.img"))
            .unwrap()
            .len(),
        64 << 20
    );
}
