//! The base root filesystem: Debian by `debootstrap --variant=minbase`, cached as a tarball,
//! then the E2B-style user, envd and network files added, then `mkfs.ext4 -d` into a
//! sparse image.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::command::{run, CommandError};

/// Packages installed on top of minbase: what the E2B base image offers to user code.
pub const BASE_PACKAGES: &[&str] =
    &["bash", "coreutils", "python3", "procps", "iproute2", "ca-certificates", "sudo"];

/// Name and UID of the unprivileged user sandboxes run commands as.
pub const SANDBOX_USER: &str = "user";
pub const SANDBOX_UID: u32 = 1000;

/// Resolver the guest uses; outbound DNS goes through the slot's NAT like any traffic.
const GUEST_NAMESERVER: &str = "8.8.8.8";

/// Errors building the root filesystem.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("I/O on {path} failed")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RootfsError {
    let path = path.to_owned();
    move |source| RootfsError::Io { path, source }
}

fn arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Source of the debootstrap tree: suite, mirror and extra packages.
#[derive(Clone, Debug)]
pub struct DebootstrapSpec<'a> {
    /// Debian suite, e.g. `bookworm`.
    pub suite: &'a str,
    /// Mirror URL, e.g. `http://deb.debian.org/debian`.
    pub mirror: &'a str,
    /// Packages added to minbase.
    pub packages: &'a [&'a str],
}

/// Returns the cached debootstrap tarball for `spec`, creating it first if missing.
/// The second value is whether the cache was hit.
pub async fn cached_debootstrap(cache_dir: &Path, spec: &DebootstrapSpec<'_>) -> Result<(PathBuf, bool), RootfsError> {
    let dir = cache_dir.join("rootfs");
    tokio::fs::create_dir_all(&dir).await.map_err(io_err(&dir))?;

    let key = format!("{}|{}|{}", spec.suite, spec.mirror, spec.packages.join(","));
    let digest = hex::encode(&Sha256::digest(key.as_bytes())[..8]);
    let tarball = dir.join(format!("{}-minbase-{digest}.tar", spec.suite));
    if tarball.is_file() {
        return Ok((tarball, true));
    }

    let tree = dir.join(format!("tmp-{}-{digest}", std::process::id()));
    let _ = tokio::fs::remove_dir_all(&tree).await;
    let include = format!("--include={}", spec.packages.join(","));
    let result = async {
        run(
            "debootstrap",
            &["--variant=minbase", &include, spec.suite, &arg(&tree), spec.mirror],
            None,
        )
        .await?;
        let partial = tarball.with_extension("tar.tmp");
        run("tar", &["--numeric-owner", "-C", &arg(&tree), "-cf", &arg(&partial), "."], None).await?;
        tokio::fs::rename(&partial, &tarball).await.map_err(io_err(&tarball))
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&tree).await;
    result.map(|()| (tarball, false))
}

/// Additions to the root filesystem beyond the Debian tree.
#[derive(Clone, Debug)]
pub struct RootfsCustomization<'a> {
    /// envd binary, installed as `/usr/bin/envd`.
    pub envd_binary: &'a Path,
    /// Guest host name.
    pub hostname: &'a str,
}

/// Unpacks `tarball` into `tree` and adds the user, sudo rule, network files and envd.
pub async fn prepare_tree(tarball: &Path, tree: &Path, custom: &RootfsCustomization<'_>) -> Result<(), RootfsError> {
    tokio::fs::create_dir_all(tree).await.map_err(io_err(tree))?;
    run("tar", &["--numeric-owner", "-C", &arg(tree), "-xpf", &arg(tarball)], None).await?;

    let uid = SANDBOX_UID.to_string();
    run(
        "chroot",
        &[&arg(tree), "useradd", "--create-home", "--uid", &uid, "--shell", "/bin/bash", "--groups", "sudo", SANDBOX_USER],
        None,
    )
    .await?;

    let sudoers = tree.join("etc/sudoers.d/hearth-user");
    tokio::fs::write(&sudoers, format!("{SANDBOX_USER} ALL=(ALL:ALL) NOPASSWD: ALL\n"))
        .await
        .map_err(io_err(&sudoers))?;
    set_mode(&sudoers, 0o440)?;
    inject_guest_files(tree, custom).await?;

    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        clear_files(&tree.join(dir)).await?;
    }
    Ok(())
}

/// Adds what every Hearth guest needs to a root filesystem tree, whatever image it came
/// from: envd at `/usr/bin/envd`, host name, hosts and resolver files, the mount points
/// the initramfs uses, and a root account when the image has no `/etc/passwd`.
pub async fn inject_guest_files(tree: &Path, custom: &RootfsCustomization<'_>) -> Result<(), RootfsError> {
    for dir in ["dev", "proc", "sys", "tmp", "run", "etc", "usr/bin", "root"] {
        let path = tree.join(dir);
        // A symlink (such as /usr/bin on merged-/usr images) counts as present.
        if tokio::fs::symlink_metadata(&path).await.is_err() {
            tokio::fs::create_dir_all(&path).await.map_err(io_err(&path))?;
        }
    }
    set_mode(&tree.join("tmp"), 0o1777)?;
    let write = |relative: &str, content: String, mode: u32| {
        let path = tree.join(relative);
        async move {
            // Images often ship these as symlinks (resolv.conf into /run); replace them.
            let _ = tokio::fs::remove_file(&path).await;
            tokio::fs::write(&path, content).await.map_err(io_err(&path))?;
            set_mode(&path, mode)
        }
    };
    write("etc/hostname", format!("{}\n", custom.hostname), 0o644).await?;
    write(
        "etc/hosts",
        format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n", custom.hostname),
        0o644,
    )
    .await?;
    write("etc/resolv.conf", format!("nameserver {GUEST_NAMESERVER}\n"), 0o644).await?;
    if !tree.join("etc/passwd").exists() {
        write("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n".into(), 0o644).await?;
    }
    if !tree.join("etc/group").exists() {
        write("etc/group", "root:x:0:\n".into(), 0o644).await?;
    }

    let envd = tree.join("usr/bin/envd");
    let _ = tokio::fs::remove_file(&envd).await;
    tokio::fs::copy(custom.envd_binary, &envd).await.map_err(io_err(custom.envd_binary))?;
    set_mode(&envd, 0o755)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), RootfsError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

/// Removes the regular files directly inside `dir`, keeping subdirectories.
async fn clear_files(dir: &Path) -> Result<(), RootfsError> {
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return Ok(());
    };
    while let Some(entry) = entries.next_entry().await.map_err(io_err(dir))? {
        if entry.file_type().await.map_err(io_err(dir))?.is_file() {
            tokio::fs::remove_file(entry.path()).await.map_err(io_err(&entry.path()))?;
        }
    }
    Ok(())
}

/// Creates a sparse ext4 image of `size_bytes` at `image` holding `tree`.
pub async fn make_ext4(tree: &Path, image: &Path, size_bytes: u64) -> Result<(), RootfsError> {
    let file = std::fs::File::create(image).map_err(io_err(image))?;
    file.set_len(size_bytes).map_err(io_err(image))?;
    drop(file);
    // The image is a fresh sparse file, so it reads as zeros: mke2fs may skip zeroing the
    // inode tables, and the guest kernel then has no lazy initialization left to write.
    run(
        "mkfs.ext4",
        &["-q", "-F", "-L", "hearth-root", "-m", "0", "-E", "assume_storage_prezeroed=1", "-d", &arg(tree), &arg(image)],
        None,
    )
    .await?;
    Ok(())
}
