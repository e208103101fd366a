//! Running Firecracker under its jailer: the command line and the chroot's files.
//!
//! The jailer (v1.12) creates `<chroot_base>/<exec file name>/<id>/root`, joins the network
//! namespace given by `--netns`, places the process in cgroups, chroots, drops to `uid`/`gid`
//! and execs Firecracker with the arguments after `--`. It does not fork without
//! `--daemonize` or `--new-pid-ns`, so the PID Hearth spawned becomes Firecracker's PID.
//! Every file Firecracker opens must be inside the chroot: Hearth hard-links the kernel, initrd,
//! disk, memory and snapshot files there before the request that names them.

use std::path::{Path, PathBuf};

/// Jailer settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailerConfig {
    /// The `jailer` binary.
    pub binary: PathBuf,
    /// User Firecracker runs as.
    pub uid: u32,
    /// Group Firecracker runs as.
    pub gid: u32,
    /// Directory under which the jailer creates each VM's chroot.
    pub chroot_base: PathBuf,
    /// Cgroup hierarchy version, 1 or 2.
    pub cgroup_version: u8,
}

impl JailerConfig {
    /// Directory the jailer chroots into for the VM `id`: `<chroot_base>/<exec file name>/<id>/root`.
    pub fn chroot_root(&self, firecracker: &Path, id: &str) -> PathBuf {
        self.jail_dir(firecracker, id).join("root")
    }

    /// Per-VM directory the jailer creates, removed when the VM stops.
    pub fn jail_dir(&self, firecracker: &Path, id: &str) -> PathBuf {
        let exec_name = firecracker.file_name().map(PathBuf::from).unwrap_or_else(|| "firecracker".into());
        self.chroot_base.join(exec_name).join(id)
    }

    /// Builds the jailer's arguments: its own options, then `--` and Firecracker's arguments.
    /// `netns` is a name under `/run/netns`.
    pub fn args(&self, id: &str, firecracker: &Path, netns: Option<&str>, firecracker_args: &[String]) -> Vec<String> {
        let mut args = vec![
            "--id".to_owned(),
            id.to_owned(),
            "--exec-file".to_owned(),
            firecracker.to_string_lossy().into_owned(),
            "--uid".to_owned(),
            self.uid.to_string(),
            "--gid".to_owned(),
            self.gid.to_string(),
            "--chroot-base-dir".to_owned(),
            self.chroot_base.to_string_lossy().into_owned(),
        ];
        if let Some(netns) = netns {
            args.push("--netns".to_owned());
            args.push(Path::new("/run/netns").join(netns).to_string_lossy().into_owned());
        }
        args.push("--cgroup-version".to_owned());
        args.push(self.cgroup_version.to_string());
        args.push("--".to_owned());
        args.extend(firecracker_args.iter().cloned());
        args
    }
}

/// Makes `host` visible in the chroot `root` as `/<name>`: a hard link, or a copy when `host`
/// is on another filesystem. `owned` files are given to `uid`:`gid` so that Firecracker can
/// write them. Returns the path Firecracker uses.
pub fn link_into(root: &Path, host: &Path, name: &str, owner: Option<(u32, u32)>) -> Result<PathBuf, std::io::Error> {
    let inside = root.join(name);
    match std::fs::remove_file(&inside) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    if let Err(err) = std::fs::hard_link(host, &inside) {
        if err.raw_os_error() != Some(libc::EXDEV) {
            return Err(err);
        }
        // NOTE: a copy of a disk is a different file, so the guest's writes do not reach
        // `host`. Keep the chroot base on the disk's filesystem to get hard links.
        tracing::warn!(host = %host.display(), inside = %inside.display(), "chroot is on another filesystem; copying");
        hearth_storage::clone_sparse(host, &inside)?;
    }
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&inside, Some(uid), Some(gid))?;
    }
    Ok(PathBuf::from("/").join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> JailerConfig {
        JailerConfig {
            binary: "/usr/local/lib/hearth/jailer".into(),
            uid: 1234,
            gid: 1235,
            chroot_base: "/srv/jail".into(),
            cgroup_version: 2,
        }
    }

    #[test]
    fn args_with_netns() {
        let firecracker_args = vec!["--api-sock".to_owned(), "/fc.sock".to_owned()];

        let args = config().args("vm-1", Path::new("/usr/local/lib/hearth/firecracker"), Some("slot3"), &firecracker_args);

        assert_eq!(
            args,
            [
                "--id",
                "vm-1",
                "--exec-file",
                "/usr/local/lib/hearth/firecracker",
                "--uid",
                "1234",
                "--gid",
                "1235",
                "--chroot-base-dir",
                "/srv/jail",
                "--netns",
                "/run/netns/slot3",
                "--cgroup-version",
                "2",
                "--",
                "--api-sock",
                "/fc.sock"
            ]
        );
    }

    #[test]
    fn args_without_netns() {
        let args = config().args("vm-1", Path::new("/bin/firecracker"), None, &[]);

        assert!(!args.contains(&"--netns".to_owned()));
        assert_eq!(args.last().map(String::as_str), Some("--"));
    }

    #[test]
    fn chroot_root_uses_exec_file_name() {
        let root = config().chroot_root(Path::new("/usr/local/lib/hearth/firecracker"), "vm-1");

        assert_eq!(root, Path::new("/srv/jail/firecracker/vm-1/root"));
    }

    #[test]
    fn link_into_shares_the_inode() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let host = dir.path().join("disk.img");
        std::fs::write(&host, b"data").unwrap();

        let inside = link_into(&root, &host, "rootfs.img", None).unwrap();

        assert_eq!(inside, Path::new("/rootfs.img"));
        let linked = std::fs::metadata(root.join("rootfs.img")).unwrap();
        assert_eq!(linked.ino(), std::fs::metadata(&host).unwrap().ino());
    }
}
