//! `hearth doctor`: checks what this host offers and which VMM Hearth would choose.

use std::path::Path;

/// Arguments of `hearth doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {}

/// One finding: a name, whether it passed, and what it found.
struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
}

fn find_in_path(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|candidate| candidate.is_file())
}

fn tool_check(name: &'static str, program: &str, package: &str) -> Check {
    match find_in_path(program) {
        Some(path) => Check { name, ok: true, detail: path.display().to_string() },
        None => Check { name, ok: false, detail: format!("{program} not found; install the Debian package {package}") },
    }
}

pub async fn run(_args: DoctorArgs) -> anyhow::Result<()> {
    let mut checks = vec![
        Check {
            name: "root",
            ok: nix::unistd::Uid::effective().is_root(),
            detail: "Hearth creates network namespaces and taps, so it runs as root".to_owned(),
        },
        tool_check("qemu", "qemu-system-x86_64", "qemu-system-x86"),
        tool_check("debootstrap", "debootstrap", "debootstrap"),
        tool_check("mkfs.ext4", "mkfs.ext4", "e2fsprogs"),
        tool_check("busybox", "busybox", "busybox-static"),
        tool_check("nft", "nft", "nftables"),
        tool_check("ip", "ip", "iproute2"),
        Check {
            name: "tun",
            ok: Path::new("/dev/net/tun").exists(),
            detail: "/dev/net/tun is needed for tap devices".to_owned(),
        },
    ];

    let accel = hearth_vmm::accel::choose_accel();
    checks.push(Check { name: "accelerator", ok: true, detail: format!("QEMU with {}: {}", accel.accel, accel.reason) });
    let firecracker = hearth_vmm::firecracker::firecracker_binary_from_env();
    let firecracker_detail = match &firecracker {
        Some(binary) => binary.display().to_string(),
        None => "not installed (optional; scripts/install-firecracker.sh installs it)".to_owned(),
    };
    checks.push(Check { name: "firecracker", ok: true, detail: firecracker_detail });
    let vmm = match super::vmm::auto_choice(&accel, firecracker) {
        (super::vmm::AutoVmm::Firecracker(_), reason) => format!("`--vmm auto` picks firecracker: {reason}"),
        (super::vmm::AutoVmm::Qemu, reason) => format!("`--vmm auto` picks qemu with {}: {reason}", accel.accel),
    };
    checks.push(Check { name: "vmm", ok: true, detail: vmm });

    let mut failed = 0;
    for check in &checks {
        let mark = if check.ok { "ok  " } else { "FAIL" };
        println!("{mark} {:<12} {}", check.name, check.detail);
        if !check.ok {
            failed += 1;
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed");
    }
    Ok(())
}
