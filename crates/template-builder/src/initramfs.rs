//! The initramfs Hearth generates: busybox, the driver modules Debian's kernel builds as
//! modules (virtio-mmio, virtio-blk, virtio-net, ext4) and an `/init` script that
//! configures the guest network, mounts `/dev/vda` and switches to envd as PID 1.
//!
//! The archive is left uncompressed: under TCG the guest decompresses slowly, and the
//! file is a few MiB.

use std::io::BufWriter;
use std::path::{Path, PathBuf};

use hearth_types::guest::{GATEWAY_IP, GUEST_IP, GUEST_PREFIX_LEN};

use crate::cpio::CpioWriter;
use crate::modules::{render_modules_dep, resolve_modules, ModuleError, ResolvedModule};

/// Modules the guest needs before it can mount its root disk and reach the network.
/// `crc32c_generic` is listed because ext4 requests the crc32c algorithm by name
/// (a soft dependency, which `depends=` does not record).
pub const REQUIRED_MODULES: &[&str] =
    &["virtio_mmio", "virtio_blk", "virtio_net", "crc32c_generic", "ext4"];

/// Program `/init` hands PID 1 to, inside the root filesystem.
pub const GUEST_INIT: &str = "/usr/bin/envd";

/// Host path of the statically linked busybox (Debian package `busybox-static`).
pub const BUSYBOX_STATIC: &str = "/bin/busybox";

/// Errors building the initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error(transparent)]
    Module(#[from] ModuleError),
    #[error("failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to write initramfs {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Inputs of the initramfs.
#[derive(Clone, Debug)]
pub struct InitramfsSpec<'a> {
    /// Kernel release, the name of the modules directory in the archive.
    pub kernel_release: &'a str,
    /// `lib/modules/<release>` of the unpacked kernel package.
    pub modules_dir: &'a Path,
    /// Statically linked busybox to copy in.
    pub busybox: &'a Path,
    /// Host name the guest gets.
    pub hostname: &'a str,
}

/// Writes the initramfs to `out` and returns the modules it loads, in load order.
pub fn write_initramfs(spec: &InitramfsSpec<'_>, out: &Path) -> Result<Vec<ResolvedModule>, InitramfsError> {
    let modules = resolve_modules(spec.modules_dir, REQUIRED_MODULES)?;
    let busybox = std::fs::read(spec.busybox)
        .map_err(|source| InitramfsError::Read { path: spec.busybox.to_owned(), source })?;
    let write_err = |source| InitramfsError::Write { path: out.to_owned(), source };

    let file = std::fs::File::create(out).map_err(write_err)?;
    let mut cpio = CpioWriter::new(BufWriter::new(file));
    for dir in ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
        cpio.directory(dir, 0o755).map_err(write_err)?;
    }
    // The kernel opens /dev/console for init's standard streams before /init can mount devtmpfs.
    cpio.char_device("dev/console", 0o600, 5, 1).map_err(write_err)?;
    cpio.file("bin/busybox", 0o755, &busybox).map_err(write_err)?;

    let modules_root = format!("lib/modules/{}", spec.kernel_release);
    let mut created = vec!["lib".to_owned(), "lib/modules".to_owned(), modules_root.clone()];
    cpio.directory(&modules_root, 0o755).map_err(write_err)?;
    for module in &modules {
        let archive_path = format!("{modules_root}/{}", module.relative_path.to_string_lossy());
        for parent in parents(&archive_path) {
            if !created.contains(&parent) {
                cpio.directory(&parent, 0o755).map_err(write_err)?;
                created.push(parent);
            }
        }
        let source = spec.modules_dir.join(&module.relative_path);
        let data = std::fs::read(&source).map_err(|err| InitramfsError::Read { path: source, source: err })?;
        cpio.file(&archive_path, 0o644, &data).map_err(write_err)?;
    }
    cpio.file(&format!("{modules_root}/modules.dep"), 0o644, render_modules_dep(&modules).as_bytes())
        .map_err(write_err)?;

    let init = init_script(spec.kernel_release, &modules, spec.hostname);
    cpio.file("init", 0o755, init.as_bytes()).map_err(write_err)?;
    let mut writer = cpio.finish().map_err(write_err)?;
    std::io::Write::flush(&mut writer).map_err(write_err)?;
    Ok(modules)
}

/// Parent directories of `path` below the modules root, outermost first.
fn parents(path: &str) -> Vec<String> {
    let parts: Vec<&str> = path.split('/').collect();
    (1..parts.len()).map(|n| parts[..n].join("/")).collect()
}

/// Renders the `/init` script. Failures print to the console and reset the guest, which ends a VMM
/// started with `-no-reboot`, so a broken image fails fast instead of hanging.
pub fn init_script(kernel_release: &str, modules: &[ResolvedModule], hostname: &str) -> String {
    let mut insmods = String::new();
    for module in modules {
        let path = format!("/lib/modules/{kernel_release}/{}", module.relative_path.to_string_lossy());
        // virtio_mmio takes the device list QEMU appends to the command line as
        // `virtio_mmio.device=...`; a built-in driver would read it from there itself.
        let args = if module.name == "virtio_mmio" { " $mmio_args" } else { "" };
        insmods.push_str(&format!("insmod {path}{args} || fail \"insmod {}\"\n", module.name));
    }

    // NOTE: stopping the PIT from the guest is a workaround. QEMU's `microvm,pit=off` would
    // remove the device, but that changes the machine, so existing snapshots would not restore.
    format!(
        r#"#!/bin/busybox sh
# Generated by the Hearth template builder.
/bin/busybox --install -s /bin
export PATH=/bin

fail() {{
    echo "hearth-init: failed: $*" > /dev/console
    reboot -f
}}

mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount /dev"

# QEMU resets the PIT to a square wave that interrupts every 27.5 ms. A kernel that keeps
# time with its local APIC never reprograms it, so the timer keeps waking QEMU. One-shot
# mode (control word 0x30 to port 0x43) with count 0 (two bytes to port 0x40) stops it.
if ! grep -qsw pit /sys/devices/system/clockevents/*/current_device \
        /sys/devices/system/clocksource/clocksource0/current_clocksource; then
    printf '\060' | dd of=/dev/port bs=1 seek=67 conv=notrunc 2>/dev/null
    printf '\000' | dd of=/dev/port bs=1 seek=64 conv=notrunc 2>/dev/null
    printf '\000' | dd of=/dev/port bs=1 seek=64 conv=notrunc 2>/dev/null
fi

mmio_args=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        virtio_mmio.device=*) mmio_args="$mmio_args ${{arg#virtio_mmio.}}" ;;
    esac
done
{insmods}
for i in $(seq 1 100); do
    [ -b /dev/vda ] && break
    sleep 0.05
done
[ -b /dev/vda ] || fail "no /dev/vda"

ip link set lo up || fail "lo up"
ip link set eth0 up || fail "eth0 up"
ip addr add {GUEST_IP}/{GUEST_PREFIX_LEN} dev eth0 || fail "eth0 address"
ip route add default via {GATEWAY_IP} dev eth0 || fail "default route"

mount -t ext4 -o rw,noatime /dev/vda /newroot || fail "mount /dev/vda"
mount --move /dev /newroot/dev || fail "move /dev"
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /newroot/dev/pts || fail "mount /dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev shm /newroot/dev/shm || fail "mount /dev/shm"
mount --move /proc /newroot/proc || fail "move /proc"
mount --move /sys /newroot/sys || fail "move /sys"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /newroot/tmp || fail "mount /tmp"
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /newroot/run || fail "mount /run"
hostname {hostname}

exec switch_root /newroot {GUEST_INIT}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_lists_outer_directories_first() {
        assert_eq!(parents("lib/modules/k/a.ko"), vec!["lib", "lib/modules", "lib/modules/k"]);
    }

    #[test]
    fn init_script_passes_mmio_devices_to_virtio_mmio() {
        let modules = vec![ResolvedModule {
            name: "virtio_mmio".into(),
            relative_path: "kernel/drivers/virtio/virtio_mmio.ko".into(),
            depends: vec![],
        }];

        let script = init_script("6.1.0-57-amd64", &modules, "hearth");

        assert!(script.contains(
            "insmod /lib/modules/6.1.0-57-amd64/kernel/drivers/virtio/virtio_mmio.ko $mmio_args"
        ));
        assert!(script.contains("ip addr add 169.254.0.21/30 dev eth0"));
        assert!(script.ends_with("exec switch_root /newroot /usr/bin/envd\n"));
    }

    #[test]
    fn init_script_stops_an_unused_pit() {
        let script = init_script("6.1.0-57-amd64", &[], "hearth");

        assert!(script.contains("grep -qsw pit /sys/devices/system/clockevents/*/current_device"));
        assert!(script.contains("printf '\\060' | dd of=/dev/port bs=1 seek=67 conv=notrunc"));
        assert_eq!(script.matches("printf '\\000' | dd of=/dev/port bs=1 seek=64 conv=notrunc").count(), 2);
    }
}
