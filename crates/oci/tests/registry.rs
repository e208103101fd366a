//! End-to-end tests against Debian's `docker-registry` (distribution 2.8) on loopback: push and pull
//! round trips, Basic auth over htpasswd, error cases, local image layouts and `docker save`
//! archives. Needs `apt-get install docker-registry`. Tests with `as_root` in their name create
//! files owned by another uid and setuid files, so they need root.

use std::fs;
use std::io::Read as _;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hearth_oci::{
    read_docker_archive, read_layout, unpack_layers, write_layout, write_layout_layers,
    ImageConfig, ImageReference, OciError, RegistryAuth, RegistryClient,
};

const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";
const USERNAME: &str = "hearth";
const PASSWORD: &str = "correct horse battery staple";

/// A registry process on 127.0.0.1 with its storage in a temporary directory; killed on drop.
struct Registry {
    child: Child,
    address: String,
    storage: PathBuf,
    _work: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        Registry::start_with(false)
    }

    fn start_with_htpasswd() -> Registry {
        Registry::start_with(true)
    }

    fn start_with(htpasswd: bool) -> Registry {
        let work = tempfile::tempdir().unwrap();
        let storage = work.path().join("storage");
        fs::create_dir(&storage).unwrap();
        let port = free_port();
        let address = format!("127.0.0.1:{port}");

        let auth_section = if htpasswd {
            let hash = bcrypt::hash(PASSWORD, 4).unwrap();
            let htpasswd_path = work.path().join("htpasswd");
            fs::write(&htpasswd_path, format!("{USERNAME}:{hash}\n")).unwrap();
            format!(
                "auth:\n  htpasswd:\n    realm: hearth-test\n    path: {}\n",
                htpasswd_path.display()
            )
        } else {
            String::new()
        };
        let config = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: {address}\n  secret: hearth-test-secret\n\
             {auth_section}",
            storage.display()
        );
        let config_path = work.path().join("config.yml");
        fs::write(&config_path, config).unwrap();

        let log = fs::File::create(work.path().join("registry.log")).unwrap();
        let child = Command::new(REGISTRY_BINARY)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| {
                panic!("failed to start {REGISTRY_BINARY} (apt-get install docker-registry): {err}")
            });

        let mut registry = Registry {
            child,
            address,
            storage,
            _work: work,
        };
        registry.wait_until_listening();
        registry
    }

    fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("registry exited with {status}: {}", self.log());
            }
            if TcpStream::connect(&self.address).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "registry did not listen on {} within 20 s: {}",
            self.address,
            self.log()
        );
    }

    fn log(&self) -> String {
        fs::read_to_string(self._work.path().join("registry.log")).unwrap_or_default()
    }

    fn reference(&self, repository_and_tag: &str) -> ImageReference {
        ImageReference::parse(&format!("{}/{repository_and_tag}", self.address)).unwrap()
    }

    /// Path of a blob's content in the registry's filesystem storage (distribution 2.x layout).
    fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn credentials() -> RegistryAuth {
    RegistryAuth::Basic {
        username: USERNAME.to_owned(),
        password: PASSWORD.to_owned(),
    }
}

fn sample_config() -> ImageConfig {
    ImageConfig {
        env: vec!["PATH=/usr/bin:/bin".into(), "HEARTH=1".into()],
        user: Some("1234:1234".into()),
        working_dir: Some("/home/app".into()),
        cmd: Some(vec!["/bin/tool".into(), "--serve".into()]),
        entrypoint: None,
        exposed_ports: vec!["8080/tcp".into()],
        labels: [("org.example.test".to_owned(), "yes".to_owned())].into(),
        shell: None,
    }
}

/// Lower layer: files, directories, symlinks, a hard link, a setuid file and a uid 1234 file.
fn build_lower_tree(root: &Path) {
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("home/app")).unwrap();
    fs::create_dir_all(root.join("usr/lib")).unwrap();
    fs::create_dir_all(root.join("opaque/sub")).unwrap();

    fs::write(root.join("etc/hostname"), b"hearth\n").unwrap();
    fs::write(root.join("etc/removed.conf"), b"removed by a whiteout\n").unwrap();
    fs::write(root.join("bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
    fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::hard_link(root.join("bin/tool"), root.join("bin/tool-hardlink")).unwrap();
    std::os::unix::fs::symlink("/bin/tool", root.join("bin/absolute-link")).unwrap();
    std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
    fs::write(root.join("usr/lib/libhearth.so"), b"ELF").unwrap();

    fs::write(root.join("home/app/owned"), b"owned by 1234\n").unwrap();
    std::os::unix::fs::chown(root.join("home/app/owned"), Some(1234), Some(1234)).unwrap();
    std::os::unix::fs::chown(root.join("home/app"), Some(1234), Some(1234)).unwrap();

    fs::write(root.join("opaque/old"), b"hidden by the opaque whiteout\n").unwrap();
    fs::write(root.join("opaque/sub/old"), b"hidden too\n").unwrap();
}

/// Upper layer: a whiteout, an opaque directory with a new file, and a new file.
fn build_upper_tree(root: &Path) {
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::create_dir_all(root.join("opaque")).unwrap();
    fs::write(root.join("etc/.wh.removed.conf"), b"").unwrap();
    fs::write(root.join("opaque/.wh..wh..opq"), b"").unwrap();
    fs::write(root.join("opaque/new"), b"from the upper layer\n").unwrap();
    fs::write(root.join("etc/motd"), b"welcome\n").unwrap();
}

/// Writes a two-layer layout from the trees above and returns its directory.
fn build_two_layer_layout(work: &Path, tag: &str) -> PathBuf {
    let lower = work.join("lower");
    let upper = work.join("upper");
    build_lower_tree(&lower);
    build_upper_tree(&upper);
    let layout = work.join("layout");
    write_layout_layers(&[&lower, &upper], &sample_config(), &layout, tag).unwrap();
    layout
}

fn assert_unpacked_tree(rootfs: &Path) {
    assert_eq!(fs::read(rootfs.join("etc/hostname")).unwrap(), b"hearth\n");
    assert_eq!(fs::read(rootfs.join("etc/motd")).unwrap(), b"welcome\n");
    assert!(
        !rootfs.join("etc/removed.conf").exists(),
        "whiteout did not remove etc/removed.conf"
    );
    assert!(
        !rootfs.join("etc/.wh.removed.conf").exists(),
        "whiteout marker was written"
    );

    let tool = fs::metadata(rootfs.join("bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o4755, "setuid bit lost");
    let hard_link = fs::metadata(rootfs.join("bin/tool-hardlink")).unwrap();
    assert_eq!(tool.ino(), hard_link.ino(), "hard link is a copy");

    assert_eq!(
        fs::read_link(rootfs.join("bin/absolute-link")).unwrap(),
        Path::new("/bin/tool")
    );
    assert_eq!(
        fs::read_link(rootfs.join("lib")).unwrap(),
        Path::new("usr/lib")
    );
    assert_eq!(fs::read(rootfs.join("lib/libhearth.so")).unwrap(), b"ELF");

    let owned = fs::metadata(rootfs.join("home/app/owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1234, 1234));
    let home = fs::metadata(rootfs.join("home/app")).unwrap();
    assert_eq!((home.uid(), home.gid()), (1234, 1234));

    assert!(
        !rootfs.join("opaque/old").exists(),
        "opaque whiteout kept opaque/old"
    );
    assert!(
        !rootfs.join("opaque/sub").exists(),
        "opaque whiteout kept opaque/sub"
    );
    assert!(
        !rootfs.join("opaque/.wh..wh..opq").exists(),
        "opaque marker was written"
    );
    assert_eq!(
        fs::read(rootfs.join("opaque/new")).unwrap(),
        b"from the upper layer\n"
    );
}

#[tokio::test]
async fn push_pull_round_trip_as_root() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = build_two_layer_layout(work.path(), "v1");
    let client = RegistryClient::new(Vec::new());
    let reference = registry.reference("hearth/round-trip:v1");

    let pushed_digest = client
        .push_layout(&layout, &reference, &RegistryAuth::Anonymous)
        .await
        .unwrap();
    let blob_dir = work.path().join("blobs");
    let image = client
        .pull(&reference, &RegistryAuth::Anonymous, &blob_dir)
        .await
        .unwrap();

    assert_eq!(image.manifest_digest, pushed_digest);
    assert_eq!(image.config, sample_config());
    assert_eq!(image.layers.len(), 2);
    for layer in &image.layers {
        assert!(
            layer.path.starts_with(&blob_dir),
            "{} is outside the blob directory",
            layer.path.display()
        );
        assert_eq!(hearth_oci::sha256_file(&layer.path).unwrap(), layer.digest);
    }

    let rootfs = work.path().join("rootfs");
    unpack_layers(&image.layers, &rootfs).unwrap();
    assert_unpacked_tree(&rootfs);
}

#[tokio::test]
async fn pull_by_digest_reuses_cached_blobs_as_root() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = build_two_layer_layout(work.path(), "v1");
    let client = RegistryClient::new(Vec::new());
    let tagged = registry.reference("hearth/by-digest:v1");
    let digest = client
        .push_layout(&layout, &tagged, &RegistryAuth::Anonymous)
        .await
        .unwrap();

    let blob_dir = work.path().join("blobs");
    let first = client
        .pull(&tagged, &RegistryAuth::Anonymous, &blob_dir)
        .await
        .unwrap();
    let modified_before = fs::metadata(&first.layers[0].path)
        .unwrap()
        .modified()
        .unwrap();

    let by_digest = registry.reference(&format!("hearth/by-digest@{digest}"));
    let second = client
        .pull(&by_digest, &RegistryAuth::Anonymous, &blob_dir)
        .await
        .unwrap();
    assert_eq!(second.manifest_digest, digest);
    let modified_after = fs::metadata(&second.layers[0].path)
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(
        modified_before, modified_after,
        "cached layer was downloaded again"
    );
}

#[tokio::test]
async fn pull_with_credentials_as_root() {
    let registry = Registry::start_with_htpasswd();
    let work = tempfile::tempdir().unwrap();
    let layout = build_two_layer_layout(work.path(), "v1");
    let client = RegistryClient::new(Vec::new());
    let reference = registry.reference("hearth/private:v1");

    let digest = client
        .push_layout(&layout, &reference, &credentials())
        .await
        .unwrap();
    let image = client
        .pull(&reference, &credentials(), &work.path().join("blobs"))
        .await
        .unwrap();
    assert_eq!(image.manifest_digest, digest);

    let rootfs = work.path().join("rootfs");
    unpack_layers(&image.layers, &rootfs).unwrap();
    assert_unpacked_tree(&rootfs);
}

#[tokio::test]
async fn pull_wrong_password_is_auth_error() {
    let registry = Registry::start_with_htpasswd();
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    fs::create_dir(&rootfs).unwrap();
    fs::write(rootfs.join("file"), b"x").unwrap();
    write_layout(
        &rootfs,
        &ImageConfig::default(),
        &work.path().join("layout"),
        "v1",
    )
    .unwrap();
    let reference = registry.reference("hearth/private:v1");
    RegistryClient::new(Vec::new())
        .push_layout(&work.path().join("layout"), &reference, &credentials())
        .await
        .unwrap();

    let wrong = RegistryAuth::Basic {
        username: USERNAME.to_owned(),
        password: "wrong".to_owned(),
    };
    let err = RegistryClient::new(Vec::new())
        .pull(&reference, &wrong, &work.path().join("blobs"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, OciError::AuthenticationRequired { .. }),
        "{err}"
    );
    let message = err.to_string();
    assert!(message.contains("authentication required"), "{message}");
    assert!(message.contains(&registry.address), "{message}");
    assert!(message.contains("hearth/private"), "{message}");
    assert!(message.contains("rejected"), "{message}");
    assert!(
        !message.contains("wrong"),
        "the password leaked into the message: {message}"
    );

    let err = RegistryClient::new(Vec::new())
        .pull(
            &reference,
            &RegistryAuth::Anonymous,
            &work.path().join("blobs"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, OciError::AuthenticationRequired { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("none were given"), "{err}");
}

#[tokio::test]
async fn pull_missing_tag_is_not_found() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    fs::create_dir(&rootfs).unwrap();
    fs::write(rootfs.join("file"), b"x").unwrap();
    write_layout(
        &rootfs,
        &ImageConfig::default(),
        &work.path().join("layout"),
        "v1",
    )
    .unwrap();
    let client = RegistryClient::new(Vec::new());
    client
        .push_layout(
            &work.path().join("layout"),
            &registry.reference("hearth/app:v1"),
            &RegistryAuth::Anonymous,
        )
        .await
        .unwrap();

    for missing in ["hearth/app:nope", "hearth/never-pushed:v1"] {
        let reference = registry.reference(missing);
        let err = client
            .pull(
                &reference,
                &RegistryAuth::Anonymous,
                &work.path().join("blobs"),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, OciError::NotFound { status: 404, .. }),
            "{missing}: {err}"
        );
        assert!(err.to_string().contains("not found"), "{err}");
    }
}

#[tokio::test]
async fn pull_corrupted_blob_is_digest_error() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    fs::create_dir(&rootfs).unwrap();
    fs::write(rootfs.join("file"), vec![7u8; 4096]).unwrap();
    let layout = work.path().join("layout");
    write_layout(&rootfs, &ImageConfig::default(), &layout, "v1").unwrap();
    let reference = registry.reference("hearth/corrupt:v1");
    let client = RegistryClient::new(Vec::new());
    client
        .push_layout(&layout, &reference, &RegistryAuth::Anonymous)
        .await
        .unwrap();

    let layer_digest = read_layout(&layout, None).unwrap().layers[0].digest.clone();
    let data_path = registry.blob_data_path(&layer_digest);
    let mut data = fs::read(&data_path).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    fs::write(&data_path, &data).unwrap();

    let blob_dir = work.path().join("blobs");
    let err = client
        .pull(&reference, &RegistryAuth::Anonymous, &blob_dir)
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&layer_digest), "{err}");
    let hex = layer_digest.strip_prefix("sha256:").unwrap();
    assert!(
        !blob_dir.join("sha256").join(hex).exists(),
        "the corrupted blob was kept"
    );
}

#[test]
fn read_layout_unpacks_two_layers_as_root() {
    let work = tempfile::tempdir().unwrap();
    let layout = build_two_layer_layout(work.path(), "v1");

    let image = read_layout(&layout, Some("v1")).unwrap();
    assert_eq!(image.config, sample_config());
    let rootfs = work.path().join("rootfs");
    unpack_layers(&image.layers, &rootfs).unwrap();
    assert_unpacked_tree(&rootfs);

    let err = read_layout(&layout, Some("v2")).unwrap_err();
    assert!(err.to_string().contains("no image named \"v2\""), "{err}");
}

/// Builds a classic `docker save` archive: `manifest.json`, `<id>.json` and `<id>/layer.tar`.
fn build_docker_save_archive(work: &Path) -> PathBuf {
    let mut layer = tar::Builder::new(Vec::new());
    let content = b"from a docker save archive\n";
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(content.len() as u64);
    header.set_mode(0o640);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    layer
        .append_data(&mut header, "srv/hello.txt", &content[..])
        .unwrap();
    let layer_bytes = layer.into_inner().unwrap();

    let config = br#"{"architecture":"amd64","os":"linux","config":{"Env":["FROM_ARCHIVE=1"],"Cmd":["/bin/true"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;
    let manifest = r#"[{"Config":"0123abcd.json","RepoTags":["hearth/archived:v1"],"Layers":["deadbeef/layer.tar"]}]"#;

    let mut archive = tar::Builder::new(Vec::new());
    for (path, data) in [
        ("manifest.json", manifest.as_bytes()),
        ("0123abcd.json", &config[..]),
        ("deadbeef/layer.tar", &layer_bytes[..]),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        archive.append_data(&mut header, path, data).unwrap();
    }
    let path = work.join("image.tar");
    fs::write(&path, archive.into_inner().unwrap()).unwrap();
    path
}

#[test]
fn read_docker_archive_classic_format() {
    let work = tempfile::tempdir().unwrap();
    let archive = build_docker_save_archive(work.path());

    let image = read_docker_archive(
        &archive,
        &work.path().join("extracted"),
        Some("hearth/archived:v1"),
    )
    .unwrap();
    assert_eq!(image.config.env, vec!["FROM_ARCHIVE=1"]);
    assert_eq!(image.config.cmd, Some(vec!["/bin/true".to_owned()]));
    assert_eq!(image.layers.len(), 1);
    assert_eq!(
        image.layers[0].digest,
        hearth_oci::sha256_file(&image.layers[0].path).unwrap()
    );

    let rootfs = work.path().join("rootfs");
    unpack_layers(&image.layers, &rootfs).unwrap();
    assert_eq!(
        fs::read(rootfs.join("srv/hello.txt")).unwrap(),
        b"from a docker save archive\n"
    );
    assert_eq!(
        fs::metadata(rootfs.join("srv/hello.txt")).unwrap().mode() & 0o7777,
        0o640
    );

    let err = read_docker_archive(&archive, &work.path().join("extracted-2"), Some("other:v1"))
        .unwrap_err();
    assert!(
        err.to_string().contains("hearth/archived:v1"),
        "the error should list the tags present: {err}"
    );
}

#[test]
fn read_docker_archive_oci_layout_format_as_root() {
    let work = tempfile::tempdir().unwrap();
    let layout = build_two_layer_layout(work.path(), "v1");
    let archive_path = work.path().join("oci.tar");
    let mut archive = tar::Builder::new(fs::File::create(&archive_path).unwrap());
    archive.append_dir_all(".", &layout).unwrap();
    archive.finish().unwrap();
    drop(archive);

    let image = read_docker_archive(&archive_path, &work.path().join("extracted"), None).unwrap();
    assert_eq!(image.config, sample_config());
    let rootfs = work.path().join("rootfs");
    unpack_layers(&image.layers, &rootfs).unwrap();
    assert_unpacked_tree(&rootfs);
}

#[test]
fn unpack_rejects_parent_directory_paths() {
    let work = tempfile::tempdir().unwrap();
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(4);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    // The tar crate refuses to write `..` itself, so the name goes straight into the header field.
    let name = b"usr/../../escaped";
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder.append(&header, &b"evil"[..]).unwrap();
    let layer_path = work.path().join("layer.tar");
    fs::write(&layer_path, builder.into_inner().unwrap()).unwrap();
    let layer = hearth_oci::Layer {
        path: layer_path,
        digest: String::new(),
        media_type: "application/vnd.oci.image.layer.v1.tar".to_owned(),
    };

    let rootfs = work.path().join("nested/rootfs");
    let err = unpack_layers(&[layer], &rootfs).unwrap_err();
    assert!(matches!(err, OciError::UnsafePath { .. }), "{err}");
    assert!(err.to_string().contains("usr/../../escaped"), "{err}");
    assert!(!work.path().join("escaped").exists());
    assert!(!work.path().join("nested/escaped").exists());
}

#[tokio::test]
async fn push_binary_sets_config() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    fs::create_dir_all(rootfs.join("app")).unwrap();
    fs::write(rootfs.join("app/run.sh"), b"#!/bin/sh\n").unwrap();
    let target = format!("{}/hearth/pushed:latest", registry.address);

    let output = Command::new(env!("CARGO_BIN_EXE_hearth-oci-push"))
        .args(["--rootfs", rootfs.to_str().unwrap(), "--to", &target])
        .args([
            "--env",
            "A=1",
            "--env",
            "B=two",
            "--user",
            "1000",
            "--workdir",
            "/app",
        ])
        .args(["--cmd", r#"["/app/run.sh","--fast"]"#])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "hearth-oci-push failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut stdout = String::new();
    output
        .stdout
        .as_slice()
        .read_to_string(&mut stdout)
        .unwrap();
    let digest = stdout.trim();
    assert!(
        digest.starts_with("sha256:"),
        "unexpected output {stdout:?}"
    );

    let image = RegistryClient::new(Vec::new())
        .pull(
            &ImageReference::parse(&target).unwrap(),
            &RegistryAuth::Anonymous,
            &work.path().join("blobs"),
        )
        .await
        .unwrap();
    assert_eq!(image.manifest_digest, digest);
    assert_eq!(image.config.env, vec!["A=1", "B=two"]);
    assert_eq!(image.config.user.as_deref(), Some("1000"));
    assert_eq!(image.config.working_dir.as_deref(), Some("/app"));
    assert_eq!(
        image.config.cmd,
        Some(vec!["/app/run.sh".to_owned(), "--fast".to_owned()])
    );
}
