//! Typed bodies of the Firecracker API requests Hearth sends, and the request sequences for
//! boot, restore, pause, snapshot and resume.
//!
//! Field names follow Firecracker v1.12.1 and were checked against that binary, which rejects
//! unknown fields: for example `PUT /snapshot/load` takes `enable_diff_snapshots` in v1.12,
//! where later versions renamed it `track_dirty_pages`. The driver and the API test both build
//! their requests with the functions here, so the test checks exactly what the driver sends.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// HTTP method of an API request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
    Patch,
}

impl Method {
    /// Name as on the HTTP request line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Put => "PUT",
            Self::Patch => "PATCH",
        }
    }
}

/// One API request: method, path and JSON body.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiRequest {
    /// HTTP method.
    pub method: Method,
    /// Resource path, such as `/machine-config`.
    pub path: String,
    /// JSON body, or `None` for a request without one.
    pub body: Option<serde_json::Value>,
}

impl ApiRequest {
    fn new(method: Method, path: impl Into<String>, body: &impl Serialize) -> Self {
        let body = serde_json::to_value(body).expect("API bodies contain only strings, numbers and booleans");
        Self { method, path: path.into(), body: Some(body) }
    }

    /// `PUT path` with `body`.
    pub fn put(path: impl Into<String>, body: &impl Serialize) -> Self {
        Self::new(Method::Put, path, body)
    }

    /// `PATCH path` with `body`.
    pub fn patch(path: impl Into<String>, body: &impl Serialize) -> Self {
        Self::new(Method::Patch, path, body)
    }

    /// `GET path` without a body.
    pub fn get(path: impl Into<String>) -> Self {
        Self { method: Method::Get, path: path.into(), body: None }
    }
}

/// Firecracker log level (`PUT /logger`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum LogLevel {
    Error,
    #[default]
    Warning,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// Value of the `--level` command-line option.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "Error",
            Self::Warning => "Warning",
            Self::Info => "Info",
            Self::Debug => "Debug",
            Self::Trace => "Trace",
        }
    }
}

/// `PUT /logger`.
#[derive(Clone, Debug, Serialize)]
pub struct Logger {
    /// Existing file or FIFO the log is appended to.
    pub log_path: PathBuf,
    /// Minimum level written.
    pub level: LogLevel,
    /// Prefix each line with its level.
    pub show_level: bool,
    /// Prefix each line with its source file and line.
    pub show_log_origin: bool,
}

/// `PUT /metrics`.
#[derive(Clone, Debug, Serialize)]
pub struct Metrics {
    /// Existing file or FIFO the JSON metrics are appended to.
    pub metrics_path: PathBuf,
}

/// `PUT /machine-config`.
#[derive(Clone, Debug, Serialize)]
pub struct MachineConfig {
    /// Virtual CPUs.
    pub vcpu_count: u32,
    /// Guest RAM in MiB.
    pub mem_size_mib: u32,
    /// Simultaneous multithreading in the guest.
    pub smt: bool,
    /// Track pages the guest writes, which diff snapshots need.
    pub track_dirty_pages: bool,
}

/// `PUT /boot-source`.
#[derive(Clone, Debug, Serialize)]
pub struct BootSource {
    /// Uncompressed ELF kernel.
    pub kernel_image_path: PathBuf,
    /// Initramfs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    /// Kernel command line.
    pub boot_args: String,
}

/// `PUT /drives/{drive_id}`.
#[derive(Clone, Debug, Serialize)]
pub struct Drive {
    /// Drive name, repeated in the path.
    pub drive_id: String,
    /// Raw image file.
    pub path_on_host: PathBuf,
    /// Attach as the root device (`/dev/vda`).
    pub is_root_device: bool,
    /// Attach read-only.
    pub is_read_only: bool,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, Serialize)]
pub struct NetworkInterface {
    /// Interface name, repeated in the path.
    pub iface_id: String,
    /// Tap device in the VMM's network namespace.
    pub host_dev_name: String,
    /// MAC address of the guest's virtio-net device.
    pub guest_mac: String,
}

/// MMDS protocol version: V2 requires a session token (`PUT /latest/api/token`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum MmdsVersion {
    V1,
    V2,
}

/// `PUT /mmds/config`.
#[derive(Clone, Debug, Serialize)]
pub struct MmdsConfig {
    /// Interfaces on which the guest reaches MMDS; each must be attached first.
    pub network_interfaces: Vec<String>,
    /// Protocol version.
    pub version: MmdsVersion,
}

/// `PUT /balloon`.
#[derive(Clone, Debug, Serialize)]
pub struct Balloon {
    /// Target balloon size in MiB; 0 leaves all memory to the guest.
    pub amount_mib: u32,
    /// Let the guest deflate the balloon when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Seconds between statistics updates; 0 disables them.
    pub stats_polling_interval_s: u32,
}

/// `action_type` of `PUT /actions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// `PUT /actions`.
#[derive(Clone, Debug, Serialize)]
pub struct InstanceAction {
    /// Action to run.
    pub action_type: ActionType,
}

/// Requested run state of `PATCH /vm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum VmRunState {
    Paused,
    Resumed,
}

/// `PATCH /vm`.
#[derive(Clone, Debug, Serialize)]
pub struct VmState {
    /// Requested state.
    pub state: VmRunState,
}

/// Kind of snapshot: `Diff` writes only the pages dirtied since the last snapshot or restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum SnapshotType {
    Full,
    Diff,
}

/// `PUT /snapshot/create`.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotCreate {
    /// Full or diff memory.
    pub snapshot_type: SnapshotType,
    /// Device state output file.
    pub snapshot_path: PathBuf,
    /// Guest memory output file. A diff snapshot writes the dirty pages at their
    /// offsets and leaves the rest a hole.
    pub mem_file_path: PathBuf,
}

/// Source of guest memory for a snapshot load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum MemBackendType {
    /// A file that Firecracker maps privately (copy-on-write).
    File,
    /// A userfaultfd handler listening on a Unix socket.
    Uffd,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Clone, Debug, Serialize)]
pub struct MemBackend {
    /// Kind of backend.
    pub backend_type: MemBackendType,
    /// Memory file, or the handler's socket for `Uffd`.
    pub backend_path: PathBuf,
}

/// `PUT /snapshot/load` (v1.12 field names).
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotLoad {
    /// Device state written by `PUT /snapshot/create`.
    pub snapshot_path: PathBuf,
    /// Guest memory.
    pub mem_backend: MemBackend,
    /// Track dirty pages, so that a later diff snapshot works.
    pub enable_diff_snapshots: bool,
    /// Run the guest once loaded, instead of leaving it paused.
    pub resume_vm: bool,
}

/// Interface name of the guest's network device, in requests and in MMDS's configuration.
pub const NET_IFACE_ID: &str = "eth0";
/// Drive name of the root disk.
pub const ROOT_DRIVE_ID: &str = "rootfs";

/// Files and values of one boot, as Firecracker opens them: paths are inside the jail when a
/// jailer runs Firecracker.
#[derive(Clone, Debug)]
pub struct BootPlan {
    /// Firecracker's log file.
    pub log_path: PathBuf,
    /// Firecracker's metrics file.
    pub metrics_path: PathBuf,
    /// Log level.
    pub log_level: LogLevel,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Raw root disk.
    pub disk: PathBuf,
    /// Tap device name, when the VM has a network device.
    pub tap: Option<String>,
    /// MAC address of the guest's network device.
    pub guest_mac: String,
    /// MMDS content, served only when the VM has a network device.
    pub mmds: serde_json::Value,
    /// Attach a balloon device (size 0, deflated on guest OOM).
    pub balloon: bool,
}

/// Builds the requests that configure and start a VM, in the order Firecracker needs them:
/// MMDS's configuration names `eth0`, so the interface comes first, and `InstanceStart` last.
pub fn boot_requests(plan: &BootPlan) -> Vec<ApiRequest> {
    let mut requests = logging_requests(&plan.log_path, &plan.metrics_path, plan.log_level);
    requests.push(ApiRequest::put(
        "/machine-config",
        &MachineConfig { vcpu_count: plan.vcpus, mem_size_mib: plan.memory_mib, smt: false, track_dirty_pages: true },
    ));
    requests.push(ApiRequest::put(
        "/boot-source",
        &BootSource {
            kernel_image_path: plan.kernel.clone(),
            initrd_path: plan.initrd.clone(),
            boot_args: plan.cmdline.clone(),
        },
    ));
    requests.push(ApiRequest::put(
        format!("/drives/{ROOT_DRIVE_ID}"),
        &Drive {
            drive_id: ROOT_DRIVE_ID.into(),
            path_on_host: plan.disk.clone(),
            is_root_device: true,
            is_read_only: false,
        },
    ));
    if let Some(tap) = &plan.tap {
        requests.push(ApiRequest::put(
            format!("/network-interfaces/{NET_IFACE_ID}"),
            &NetworkInterface {
                iface_id: NET_IFACE_ID.into(),
                host_dev_name: tap.clone(),
                guest_mac: plan.guest_mac.clone(),
            },
        ));
        requests.push(ApiRequest::put(
            "/mmds/config",
            &MmdsConfig { network_interfaces: vec![NET_IFACE_ID.into()], version: MmdsVersion::V2 },
        ));
        requests.push(ApiRequest::put("/mmds", &plan.mmds));
    }
    if plan.balloon {
        requests.push(ApiRequest::put(
            "/balloon",
            &Balloon { amount_mib: 0, deflate_on_oom: true, stats_polling_interval_s: 0 },
        ));
    }
    requests.push(instance_start_request());
    requests
}

/// `PUT /logger` and `PUT /metrics`, the first requests to every Firecracker process.
pub fn logging_requests(log_path: &Path, metrics_path: &Path, level: LogLevel) -> Vec<ApiRequest> {
    vec![
        ApiRequest::put(
            "/logger",
            &Logger { log_path: log_path.to_owned(), level, show_level: true, show_log_origin: false },
        ),
        ApiRequest::put("/metrics", &Metrics { metrics_path: metrics_path.to_owned() }),
    ]
}

/// `PUT /actions {InstanceStart}`.
pub fn instance_start_request() -> ApiRequest {
    ApiRequest::put("/actions", &InstanceAction { action_type: ActionType::InstanceStart })
}

/// `PUT /snapshot/load` of a file-backed snapshot that resumes the guest and tracks dirty pages.
pub fn snapshot_load_request(vmstate: &Path, memory_file: &Path) -> ApiRequest {
    ApiRequest::put(
        "/snapshot/load",
        &SnapshotLoad {
            snapshot_path: vmstate.to_owned(),
            mem_backend: MemBackend { backend_type: MemBackendType::File, backend_path: memory_file.to_owned() },
            enable_diff_snapshots: true,
            resume_vm: true,
        },
    )
}

/// `PUT /snapshot/create`.
pub fn snapshot_create_request(snapshot_type: SnapshotType, vmstate: &Path, memory: &Path) -> ApiRequest {
    ApiRequest::put(
        "/snapshot/create",
        &SnapshotCreate { snapshot_type, snapshot_path: vmstate.to_owned(), mem_file_path: memory.to_owned() },
    )
}

/// `PATCH /vm` to pause or resume the guest.
pub fn vm_state_request(state: VmRunState) -> ApiRequest {
    ApiRequest::patch("/vm", &VmState { state })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plan(tap: Option<&str>) -> BootPlan {
        BootPlan {
            log_path: "/r/fc.log".into(),
            metrics_path: "/r/fc-metrics.json".into(),
            log_level: LogLevel::Info,
            vcpus: 2,
            memory_mib: 512,
            kernel: "/t/vmlinux".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            disk: "/s/rootfs.ext4".into(),
            tap: tap.map(str::to_owned),
            guest_mac: "02:fc:00:00:00:05".into(),
            mmds: json!({"sandboxID": "abc"}),
            balloon: true,
        }
    }

    fn paths(requests: &[ApiRequest]) -> Vec<&str> {
        requests.iter().map(|request| request.path.as_str()).collect()
    }

    #[test]
    fn boot_requests_with_network_in_order() {
        let requests = boot_requests(&plan(Some("tap0")));

        assert_eq!(
            paths(&requests),
            [
                "/logger",
                "/metrics",
                "/machine-config",
                "/boot-source",
                "/drives/rootfs",
                "/network-interfaces/eth0",
                "/mmds/config",
                "/mmds",
                "/balloon",
                "/actions"
            ]
        );
    }

    #[test]
    fn boot_requests_without_network_skip_mmds() {
        let requests = boot_requests(&plan(None));

        assert!(!paths(&requests).contains(&"/mmds/config"));
        assert!(!paths(&requests).contains(&"/network-interfaces/eth0"));
    }

    #[test]
    fn boot_source_omits_missing_initrd() {
        let requests = boot_requests(&plan(None));
        let boot_source = requests.iter().find(|request| request.path == "/boot-source").unwrap();

        assert_eq!(
            boot_source.body,
            Some(json!({"kernel_image_path": "/t/vmlinux", "boot_args": "console=ttyS0"}))
        );
    }

    #[test]
    fn snapshot_load_body_uses_v1_12_names() {
        let request = snapshot_load_request(Path::new("/s/vmstate"), Path::new("/s/memory"));

        assert_eq!(
            request.body,
            Some(json!({
                "snapshot_path": "/s/vmstate",
                "mem_backend": {"backend_type": "File", "backend_path": "/s/memory"},
                "enable_diff_snapshots": true,
                "resume_vm": true
            }))
        );
    }

    #[test]
    fn vm_state_body() {
        assert_eq!(vm_state_request(VmRunState::Paused).body, Some(json!({"state": "Paused"})));
    }
}
