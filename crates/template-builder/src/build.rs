//! The base template build, step by step (see the crate documentation).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hearth_network::Slot;
use hearth_storage::{DataDir, ManifestError, ManifestFile, TemplateBuildPaths, TemplateManifest, MANIFEST_FORMAT_VERSION};
use hearth_types::guest::ENVD_PORT;
use hearth_types::{BuildId, TemplateId, ENVD_VERSION};
use hearth_vmm::{BootSpec, DiskFormat, DiskSpec, MachineSize, SnapshotTarget, Vm, VmPlacement, VmmDriver, VmmError};
use sha2::{Digest, Sha256};

use crate::initramfs::{write_initramfs, InitramfsError, InitramfsSpec, BUSYBOX_STATIC};
use crate::kernel::{extract_vmlinux, fetch_kernel, KernelError};
use crate::rootfs::{cached_debootstrap, make_ext4, prepare_tree, DebootstrapSpec, RootfsCustomization, RootfsError, BASE_PACKAGES};

/// Kernel command line of template VMs. `reboot=t` resets by triple fault, which works
/// on a microvm (no keyboard controller, no ACPI reset) and ends QEMU under `-no-reboot`.
pub const DEFAULT_KERNEL_CMDLINE: &str = "console=ttyS0 reboot=t panic=1 quiet";

/// Boots of the build VM tried before the build fails; each gets an equal share of
/// `boot_timeout`.
const BOOT_ATTEMPTS: u32 = 3;

/// Interval between `/health` requests while the build VM boots.
const HEALTH_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A step of the build, for progress display.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildStep {
    Kernel,
    Initramfs,
    RootFilesystem,
    DiskImage,
    Boot,
    Snapshot,
    Manifest,
    Done,
}

/// One progress event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildProgress {
    /// Step the event belongs to.
    pub step: BuildStep,
    /// Human-readable detail.
    pub message: String,
}

/// Settings of a base template build.
#[derive(Clone, Debug)]
pub struct BaseTemplateOptions {
    /// Data directory the build goes into.
    pub data_dir: DataDir,
    /// Template ID, `base` by default.
    pub template_id: TemplateId,
    /// Build ID; a new random one by default.
    pub build_id: BuildId,
    /// envd binary to install as `/usr/bin/envd` (static, runs as PID 1).
    pub envd_binary: PathBuf,
    /// envd version recorded in the manifest.
    pub envd_version: String,
    /// CPUs and memory of the snapshot, and so of every sandbox restored from it.
    pub machine: MachineSize,
    /// Apparent size of the root filesystem image in bytes.
    pub disk_size_bytes: u64,
    /// Debian mirror for debootstrap.
    pub debian_mirror: String,
    /// Debian suite for debootstrap.
    pub debian_suite: String,
    /// Host name inside the guest.
    pub hostname: String,
    /// Kernel command line.
    pub kernel_cmdline: String,
    /// Maximum time from VM launch until envd responds to `/health`.
    pub boot_timeout: Duration,
}

impl BaseTemplateOptions {
    /// Defaults: template `base`, a new build ID, 2 vCPUs, 512 MiB, 8 GiB disk, bookworm
    /// from deb.debian.org, and envd version [`ENVD_VERSION`].
    pub fn new(data_dir: DataDir, envd_binary: impl Into<PathBuf>) -> Self {
        Self {
            data_dir,
            template_id: TemplateId::parse("base").expect("valid template ID"),
            build_id: BuildId::generate(),
            envd_binary: envd_binary.into(),
            envd_version: ENVD_VERSION.to_owned(),
            machine: MachineSize { vcpus: 2, memory_mib: 512 },
            disk_size_bytes: 8 << 30,
            debian_mirror: "http://deb.debian.org/debian".to_owned(),
            debian_suite: "bookworm".to_owned(),
            hostname: "e2b".to_owned(),
            kernel_cmdline: DEFAULT_KERNEL_CMDLINE.to_owned(),
            boot_timeout: Duration::from_secs(180),
        }
    }
}

/// A finished build.
#[derive(Clone, Debug)]
pub struct BuiltTemplate {
    /// Final build directory.
    pub paths: TemplateBuildPaths,
    /// Its manifest.
    pub manifest: TemplateManifest,
    /// Time from VM launch until envd responded to `/health`.
    pub boot_to_health: Duration,
    /// Whole build time.
    pub total: Duration,
}

/// Errors of a template build.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("kernel step failed")]
    Kernel(#[from] KernelError),
    #[error("initramfs step failed")]
    Initramfs(#[from] InitramfsError),
    #[error("root filesystem step failed")]
    Rootfs(#[from] RootfsError),
    #[error("build VM failed")]
    Vmm(#[from] VmmError),
    #[error("envd in the build VM did not answer {url} within {timeout_secs} s; console ends with: {console_tail}")]
    HealthTimeout { url: String, timeout_secs: u64, console_tail: String },
    #[error("build VM exited before envd answered {url}; console ends with: {console_tail}")]
    VmExited { url: String, console_tail: String },
    #[error("writing the manifest failed")]
    Manifest(#[from] ManifestError),
    #[error("template build directory {0} already exists")]
    Exists(PathBuf),
    #[error("I/O on {path} failed")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError {
    let path = path.to_owned();
    move |source| BuildError::Io { path, source }
}

/// Builds the base template into `options.data_dir`, booting the build VM with `driver`
/// in `slot`, and reports progress through `progress`.
///
/// The build happens in a staging directory that is removed on failure; the final
/// directory appears complete or not at all.
pub async fn build_base_template(
    options: &BaseTemplateOptions,
    driver: &dyn VmmDriver,
    slot: &Slot,
    progress: &(dyn Fn(BuildProgress) + Send + Sync),
) -> Result<BuiltTemplate, BuildError> {
    let final_paths = options.data_dir.template_build(&options.template_id, &options.build_id);
    if final_paths.dir().exists() {
        return Err(BuildError::Exists(final_paths.dir().to_owned()));
    }
    let staging = options.data_dir.template_build_staging(&options.template_id, &options.build_id);
    let _ = tokio::fs::remove_dir_all(&staging).await;
    tokio::fs::create_dir_all(&staging).await.map_err(io_err(&staging))?;

    let result = build_in(options, driver, slot, progress, &staging).await;
    let (manifest, boot_to_health, total) = match result {
        Ok(done) => done,
        Err(err) => {
            let _ = tokio::fs::remove_dir_all(&staging).await;
            tracing::warn!(template_id = %options.template_id, build_id = %options.build_id, error = %err, "template build failed");
            return Err(err);
        }
    };
    tokio::fs::rename(&staging, final_paths.dir()).await.map_err(io_err(final_paths.dir()))?;

    progress(BuildProgress {
        step: BuildStep::Done,
        message: format!("template ready in {} after {:.1} s", final_paths.dir().display(), total.as_secs_f64()),
    });
    tracing::info!(
        template_id = %options.template_id,
        build_id = %options.build_id,
        elapsed_ms = total.as_millis() as u64,
        "template built"
    );
    Ok(BuiltTemplate { paths: final_paths, manifest, boot_to_health, total })
}

async fn build_in(
    options: &BaseTemplateOptions,
    driver: &dyn VmmDriver,
    slot: &Slot,
    progress: &(dyn Fn(BuildProgress) + Send + Sync),
    staging: &Path,
) -> Result<(TemplateManifest, Duration, Duration), BuildError> {
    let started = Instant::now();
    let paths = TemplateBuildPaths::new(staging);
    let cache = options.data_dir.cache_dir();
    let report = |step, message: String| {
        tracing::info!(step = ?step, %message, "template build progress");
        progress(BuildProgress { step, message });
    };

    report(BuildStep::Kernel, "fetching Debian's linux-image-amd64".into());
    let kernel = fetch_kernel(&cache.join("kernel")).await?;
    let vmlinuz = tokio::fs::read(&kernel.vmlinuz).await.map_err(io_err(&kernel.vmlinuz))?;
    let vmlinux = tokio::task::spawn_blocking(move || extract_vmlinux(&vmlinuz))
        .await
        .expect("vmlinux extraction does not panic")?;
    tokio::fs::write(paths.kernel(), &vmlinux).await.map_err(io_err(&paths.kernel()))?;
    report(BuildStep::Kernel, format!("kernel {} extracted ({} MiB)", kernel.release, vmlinux.len() >> 20));

    let initramfs_spec = InitramfsSpec {
        kernel_release: &kernel.release,
        modules_dir: &kernel.modules_dir,
        busybox: Path::new(BUSYBOX_STATIC),
        hostname: &options.hostname,
    };
    let modules = write_initramfs(&initramfs_spec, &paths.initrd())?;
    let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
    report(BuildStep::Initramfs, format!("initramfs with modules {}", names.join(", ")));

    let debootstrap = DebootstrapSpec {
        suite: &options.debian_suite,
        mirror: &options.debian_mirror,
        packages: BASE_PACKAGES,
    };
    report(BuildStep::RootFilesystem, format!("Debian {} root filesystem", options.debian_suite));
    let (tarball, cached) = cached_debootstrap(&cache, &debootstrap).await?;
    report(
        BuildStep::RootFilesystem,
        format!("{} {}", if cached { "reused cached" } else { "debootstrapped" }, tarball.display()),
    );
    let tree = staging.join("tree");
    let custom = RootfsCustomization { envd_binary: &options.envd_binary, hostname: &options.hostname };
    let prepared = prepare_tree(&tarball, &tree, &custom).await;
    let image = match prepared {
        Ok(()) => {
            report(BuildStep::DiskImage, format!("mkfs.ext4 -d into a {} GiB sparse image", options.disk_size_bytes >> 30));
            make_ext4(&tree, &paths.rootfs(), options.disk_size_bytes).await
        }
        Err(err) => Err(err),
    };
    let _ = tokio::fs::remove_dir_all(&tree).await;
    image?;

    let boot_to_health = boot_and_snapshot(options, driver, slot, &paths, &report).await?;

    report(BuildStep::Manifest, "writing manifest".into());
    let manifest = write_manifest(driver.kind(), options, &paths, &kernel.release).await?;
    Ok((manifest, boot_to_health, started.elapsed()))
}

/// Boots the build VM, waits for envd, snapshots it and stops it. Returns the time from
/// launch until `/health` responded.
async fn boot_and_snapshot(
    options: &BaseTemplateOptions,
    driver: &dyn VmmDriver,
    slot: &Slot,
    paths: &TemplateBuildPaths,
    report: &(dyn Fn(BuildStep, String) + Send + Sync),
) -> Result<Duration, BuildError> {
    report(BuildStep::Boot, format!("booting with {} in {}", driver.kind(), slot.netns));
    let spec = BootSpec {
        machine: options.machine,
        memory_file: paths.memory(),
        kernel: paths.kernel(),
        initrd: Some(paths.initrd()),
        cmdline: options.kernel_cmdline.clone(),
        disk: DiskSpec { path: paths.rootfs(), format: DiskFormat::Raw },
        placement: VmPlacement { netns: Some(slot.netns.clone()), run_dir: paths.dir().to_owned() },
    };
    let url = format!("http://{}:{ENVD_PORT}/health", slot.guest_route_ip);
    let attempt_timeout = options.boot_timeout / BOOT_ATTEMPTS;
    let mut attempt = 1;
    let (mut vm, launched, waited) = loop {
        let launched = Instant::now();
        let mut vm = driver.boot(&spec).await?;
        let waited = wait_for_health(&mut vm, &url, attempt_timeout).await;
        match waited {
            Err(BuildError::HealthTimeout { .. }) if attempt < BOOT_ATTEMPTS => {
                // Under TCG on a loaded host the guest kernel can fail its PIT calibration
                // and stop before userspace; a fresh boot usually gets through.
                tracing::warn!(attempt, timeout_secs = attempt_timeout.as_secs(), "build VM did not respond; booting it again");
                report(BuildStep::Boot, format!("no response after {} s; boot attempt {}", attempt_timeout.as_secs(), attempt + 1));
                vm.stop().await?;
                attempt += 1;
            }
            waited => break (vm, launched, waited),
        }
    };
    let result = match waited {
        Ok(()) => {
            let boot_to_health = launched.elapsed();
            report(BuildStep::Boot, format!("envd answered after {:.2} s", boot_to_health.as_secs_f64()));
            report(BuildStep::Snapshot, "saving device state".into());
            let target = SnapshotTarget { vmstate: paths.vmstate(), memory: paths.memory(), diff: false };
            vm.snapshot(&target).await.map(|_| boot_to_health).map_err(BuildError::from)
        }
        Err(err) => Err(err),
    };
    vm.stop().await?;

    for (from, to) in [("console.log", paths.build_console_log()), ("vmm.log", paths.dir().join("build-vmm.log"))] {
        let from = paths.dir().join(from);
        let _ = tokio::fs::rename(&from, &to).await;
    }
    result
}

async fn wait_for_health(vm: &mut Box<dyn Vm>, url: &str, timeout: Duration) -> Result<(), BuildError> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .no_proxy()
        .build()
        .expect("a client without TLS settings always builds");
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(response) = client.get(url).send().await {
            if response.status().is_success() {
                return Ok(());
            }
        }
        if !vm.is_running() {
            return Err(BuildError::VmExited { url: url.to_owned(), console_tail: console_tail(&**vm) });
        }
        if Instant::now() >= deadline {
            return Err(BuildError::HealthTimeout {
                url: url.to_owned(),
                timeout_secs: timeout.as_secs(),
                console_tail: console_tail(&**vm),
            });
        }
        tokio::time::sleep(HEALTH_POLL_INTERVAL).await;
    }
}

fn console_tail(vm: &dyn Vm) -> String {
    read_console_tail(&vm.console_log())
}

/// The last 1500 bytes of a console log, trimmed; empty when it cannot be read.
pub(crate) fn read_console_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(1500);
    let start = (start..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
    text[start..].trim().to_owned()
}

/// Lists a template build's artifacts for its manifest, each made durable first: its size,
/// and the SHA-256 of the small ones (initramfs and device state).
pub(crate) fn manifest_files(paths: &TemplateBuildPaths) -> std::io::Result<Vec<ManifestFile>> {
    let mut files = Vec::new();
    for (path, hash) in [
        (paths.kernel(), false),
        (paths.initrd(), true),
        (paths.rootfs(), false),
        (paths.memory(), false),
        (paths.vmstate(), true),
    ] {
        hearth_storage::durable::sync_file(&path)?;
        let size_bytes = std::fs::metadata(&path)?.len();
        let sha256 = if hash { Some(hex::encode(Sha256::digest(std::fs::read(&path)?))) } else { None };
        let name = path.file_name().expect("artifact paths have names").to_string_lossy().into_owned();
        files.push(ManifestFile { name, size_bytes, sha256 });
    }
    Ok(files)
}

/// Records every artifact's size (and the SHA-256 of the small ones) and writes the manifest.
async fn write_manifest(
    vmm: hearth_vmm::VmmKind,
    options: &BaseTemplateOptions,
    paths: &TemplateBuildPaths,
    kernel_release: &str,
) -> Result<TemplateManifest, BuildError> {
    let files = manifest_files(paths).map_err(|source| BuildError::Io { path: paths.dir().to_owned(), source })?;

    let manifest = TemplateManifest {
        format_version: MANIFEST_FORMAT_VERSION,
        template_id: options.template_id.to_string(),
        build_id: options.build_id.to_string(),
        vcpus: options.machine.vcpus,
        memory_mib: options.machine.memory_mib,
        kernel_release: kernel_release.to_owned(),
        kernel_cmdline: options.kernel_cmdline.clone(),
        envd_version: options.envd_version.clone(),
        disk_size_bytes: options.disk_size_bytes,
        files,
        created_at_unix_secs: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        vmm: vmm.as_str().into(),
        snapshot: None,
        guest: None,
    };
    manifest.store(&paths.manifest())?;
    Ok(manifest)
}
