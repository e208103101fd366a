//! End-to-end tests of the base template with real QEMU (TCG here), debootstrap and
//! network namespaces. They need root.
//!
//! The template comes from `HEARTH_TEST_TEMPLATE_DIR` (a ready build directory) when set;
//! otherwise it is built once into `target/tmp/hearth-base-template` and reused by later
//! runs. The envd installed is `HEARTH_TEST_ENVD` when set, otherwise a Python stand-in
//! that returns 204 for `GET /health`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use hearth_network::Slot;
use hearth_storage::{DataDir, TemplateBuildPaths};
use hearth_template_builder::{build_base_template, BaseTemplateOptions, BuildProgress};
use hearth_types::guest::{ENVD_PORT, GATEWAY_IP, GUEST_IP, TAP_MAC, TAP_NAME};
use hearth_vmm::{
    restore_sandbox, BootSpec, DiskFormat, DiskSpec, QemuDriver, SnapshotTemplate, Vm, VmPlacement,
};
use tokio::sync::OnceCell;

static TEMPLATE: OnceCell<PathBuf> = OnceCell::const_new();
static NEXT_SLOT: AtomicU16 = AtomicU16::new(0);

const STAND_IN_ENVD: &str = r#"#!/bin/sh
exec /usr/bin/python3 -c '
import http.server
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(204 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 49983), Health).serve_forever()
'
"#;

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("ip is installed");
    assert!(status.success(), "ip {} failed with {status}", args.join(" "));
}

fn run_in(netns: &str, program: &str, args: &[&str]) {
    let status = Command::new("ip")
        .args(["netns", "exec", netns, program])
        .args(args)
        .status()
        .expect("ip is installed");
    assert!(status.success(), "{program} {} in {netns} failed with {status}", args.join(" "));
}

/// A network namespace shaped like a Hearth slot: `tap0` with the gateway address, a veth
/// pair to the host, and a DNAT of the namespace-side veth address to the guest's envd.
struct TestSlot {
    slot: Slot,
    veth: String,
}

impl TestSlot {
    fn create() -> Self {
        let n = NEXT_SLOT.fetch_add(1, Ordering::SeqCst);
        let id = ((std::process::id() as u16) << 4 | (n & 0xf)) & 0x3fff;
        let netns = format!("hearthtest-{id:04x}");
        let veth = netns.clone();
        let host_ip = Ipv4Addr::new(10, 254, (id >> 6) as u8, (((id & 63) << 2) | 1) as u8);
        let ns_ip = Ipv4Addr::new(10, 254, (id >> 6) as u8, (((id & 63) << 2) | 2) as u8);
        let slot = Slot { index: u32::from(id), netns: netns.clone(), host_ip, guest_route_ip: ns_ip };
        let test_slot = Self { slot, veth: veth.clone() };

        ip(&["netns", "add", &netns]);
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", "veth0", "netns", &netns]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        ip(&["-n", &netns, "addr", "add", &format!("{ns_ip}/30"), "dev", "veth0"]);
        ip(&["-n", &netns, "link", "set", "veth0", "up"]);
        ip(&["-n", &netns, "tuntap", "add", TAP_NAME, "mode", "tap"]);
        ip(&["-n", &netns, "link", "set", TAP_NAME, "address", TAP_MAC]);
        ip(&["-n", &netns, "addr", "add", &format!("{GATEWAY_IP}/30"), "dev", TAP_NAME]);
        ip(&["-n", &netns, "link", "set", TAP_NAME, "up"]);
        run_in(&netns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        run_in(&netns, "nft", &["add", "table", "ip", "hearthtest"]);
        run_in(
            &netns,
            "nft",
            &["add", "chain", "ip", "hearthtest", "prerouting", "{ type nat hook prerouting priority dstnat; }"],
        );
        run_in(
            &netns,
            "nft",
            &[
                "add", "rule", "ip", "hearthtest", "prerouting", "ip", "daddr", &ns_ip.to_string(), "tcp", "dport",
                &ENVD_PORT.to_string(), "dnat", "to", &GUEST_IP.to_string(),
            ],
        );
        test_slot
    }
}

impl Drop for TestSlot {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.slot.netns]).status();
        let _ = Command::new("ip").args(["link", "del", &self.veth]).stderr(std::process::Stdio::null()).status();
    }
}

fn health_url(slot: &Slot) -> String {
    format!("http://{}:{ENVD_PORT}/health", slot.guest_route_ip)
}

/// Polls envd's `/health` through the slot until it returns a 2xx status, and returns the time waited.
async fn wait_for_health(slot: &Slot, timeout: Duration) -> Duration {
    let client = reqwest::Client::builder().timeout(Duration::from_millis(500)).no_proxy().build().unwrap();
    let started = Instant::now();
    let url = health_url(slot);
    loop {
        if let Ok(response) = client.get(&url).send().await {
            if response.status().is_success() {
                return started.elapsed();
            }
        }
        assert!(started.elapsed() < timeout, "{url} did not answer within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn find_ready_build(data_dir: &DataDir) -> Option<PathBuf> {
    let base = data_dir.templates_dir().join("base");
    std::fs::read_dir(base)
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| TemplateBuildPaths::new(path).is_ready())
}

/// Returns a ready base template build directory, building it on first use.
async fn template_dir() -> PathBuf {
    TEMPLATE
        .get_or_init(|| async {
            if let Some(dir) = std::env::var_os("HEARTH_TEST_TEMPLATE_DIR") {
                return PathBuf::from(dir);
            }
            let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hearth-base-template");
            let data_dir = DataDir::new(&root);
            if let Some(dir) = find_ready_build(&data_dir) {
                return dir;
            }

            std::fs::create_dir_all(&root).unwrap();
            let envd = match std::env::var_os("HEARTH_TEST_ENVD") {
                Some(path) => PathBuf::from(path),
                None => {
                    let path = root.join("stand-in-envd");
                    std::fs::write(&path, STAND_IN_ENVD).unwrap();
                    path
                }
            };
            let options = BaseTemplateOptions::new(data_dir, envd);
            let slot = TestSlot::create();
            let events = std::sync::Mutex::new(Vec::<BuildProgress>::new());
            let progress = |event: BuildProgress| {
                eprintln!("[{:?}] {}", event.step, event.message);
                events.lock().unwrap().push(event);
            };

            let built = build_base_template(&options, &QemuDriver::from_env(), &slot.slot, &progress)
                .await
                .expect("base template builds");

            eprintln!(
                "MEASURED: template build {:.1} s, build VM launch to envd health {:.2} s",
                built.total.as_secs_f64(),
                built.boot_to_health.as_secs_f64()
            );
            assert!(built.paths.is_ready());
            assert!(events.lock().unwrap().iter().any(|e| e.step == hearth_template_builder::BuildStep::Snapshot));
            built.paths.dir().to_owned()
        })
        .await
        .clone()
}

fn sha256sum(path: &Path) -> String {
    let output = Command::new("sha256sum").arg(path).output().expect("sha256sum is installed");
    assert!(output.status.success());
    String::from_utf8_lossy(&output.stdout).split_whitespace().next().unwrap().to_owned()
}

/// Fingerprint of the template files: hashes of the memory and device state files, and
/// size plus change time of the 8 GiB sparse disk image, which is too large to hash here.
fn template_fingerprint(paths: &TemplateBuildPaths) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let rootfs = std::fs::metadata(paths.rootfs()).unwrap();
    vec![
        sha256sum(&paths.memory()),
        sha256sum(&paths.vmstate()),
        format!("{} {}.{} {}.{}", rootfs.len(), rootfs.mtime(), rootfs.mtime_nsec(), rootfs.ctime(), rootfs.ctime_nsec()),
    ]
}

/// Serialises the VM tests of this file. A cold boot under TCG can hang in the guest's
/// TSC calibration when other guests load the host's cores, so no two VMs run at once here.
static VM_TEST_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Threads that spin until dropped, to load the host's cores.
struct CpuLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CpuLoad {
    fn start(threads: usize) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for CpuLoad {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_cold_boot_of_base_template_answers_health() {
    let _serial = VM_TEST_LOCK.lock().await;
    let template = SnapshotTemplate::load(&template_dir().await).unwrap();
    let slot = TestSlot::create();
    let run_dir = tempfile::tempdir().unwrap();
    let disk = run_dir.path().join("disk.qcow2");
    hearth_storage::create_overlay(&disk, &template.paths.rootfs(), template.manifest.disk_size_bytes).unwrap();
    let spec = BootSpec {
        machine: hearth_vmm::MachineSize { vcpus: template.manifest.vcpus, memory_mib: template.manifest.memory_mib },
        memory_file: run_dir.path().join("memory"),
        kernel: template.paths.kernel(),
        initrd: Some(template.paths.initrd()),
        // Kernel messages on the console make a failed boot diagnosable.
        cmdline: template.manifest.kernel_cmdline.replace(" quiet", ""),
        disk: DiskSpec { path: disk, format: DiskFormat::Qcow2 },
        placement: VmPlacement { netns: Some(slot.slot.netns.clone()), run_dir: run_dir.path().to_owned() },
    };

    // Two busy loops keep the host's cores loaded during the boot, as other guests and builds
    // do. Without the TSC rate on the command line, the guest kernel's calibration failed under
    // this load and its boot hung in 3 of 4 tries.
    let load = CpuLoad::start(2);
    let mut vm = QemuDriver::from_env().boot_vm(&spec).await.unwrap();
    let console = run_dir.path().join("console.log");
    let waited = tokio::time::timeout(Duration::from_secs(90), wait_for_health(&slot.slot, Duration::from_secs(90)))
        .await
        .unwrap_or_else(|_| panic!("cold boot timed out; console: {}", std::fs::read_to_string(&console).unwrap_or_default()));
    drop(load);
    eprintln!("MEASURED: cold boot launch to envd health {:.2} s", waited.as_secs_f64());
    let pid = vm.pid();
    vm.stop().await.unwrap();

    assert!(!process_exists(pid), "QEMU pid {pid} still exists after stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_restore_twice_keeps_template_unchanged() {
    let _serial = VM_TEST_LOCK.lock().await;
    let template = SnapshotTemplate::load(&template_dir().await).unwrap();
    let before = template_fingerprint(&template.paths);
    let driver = QemuDriver::from_env();
    let slots = [TestSlot::create(), TestSlot::create()];
    let run_dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];

    let mut vms = Vec::new();
    for (slot, run_dir) in slots.iter().zip(&run_dirs) {
        let started = Instant::now();
        let vm = restore_sandbox(&driver, &template, run_dir.path(), &slot.slot).await.unwrap();
        let restored = started.elapsed();
        let health = wait_for_health(&slot.slot, Duration::from_secs(30)).await;
        eprintln!(
            "MEASURED: restore (spawn to running) {:.1} ms, then envd health after {:.1} ms",
            restored.as_secs_f64() * 1e3,
            health.as_secs_f64() * 1e3
        );
        vms.push(vm);
    }
    for (vm, slot) in vms.iter_mut().zip(&slots) {
        assert!(vm.is_running(), "restored VM pid {} exited", vm.pid());
        wait_for_health(&slot.slot, Duration::from_secs(5)).await;
    }
    for vm in &mut vms {
        vm.stop().await.unwrap();
    }

    assert_eq!(template_fingerprint(&template.paths), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_stop_leaves_no_process() {
    let _serial = VM_TEST_LOCK.lock().await;
    let template = SnapshotTemplate::load(&template_dir().await).unwrap();
    let slot = TestSlot::create();
    let run_dir = tempfile::tempdir().unwrap();
    let mut vm = restore_sandbox(&QemuDriver::from_env(), &template, run_dir.path(), &slot.slot).await.unwrap();
    let pid = vm.pid();
    assert!(process_exists(pid));

    vm.stop().await.unwrap();

    assert!(!process_exists(pid), "QEMU pid {pid} still exists after stop");
    vm.stop().await.unwrap();
}
