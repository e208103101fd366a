//! The root disk a custom build starts from: an image's layers unpacked into a tree, the
//! guest files added, and `mkfs.ext4 -d` into a sparse raw image. Disks are cached under
//! `<cache>/base-disks/<key>.ext4`, keyed by the image's manifest digest and envd's hash,
//! so a rebuild from the same image skips the pull, the unpacking and the image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hearth_oci::{Image, ImageConfig, ImageReference, RegistryAuth, RegistryClient};
use hearth_storage::{DataDir, GuestConfig, TemplateBuildPaths, TemplateManifest};
use sha2::{Digest, Sha256};

use crate::custom::BaseDisk;
use crate::rootfs::{inject_guest_files, make_ext4, RootfsCustomization, SANDBOX_USER};

/// Version of the base disk layout; bump it when the injected files change.
const BASE_DISK_VERSION: &str = "hearth-base-disk-v2";

/// Errors preparing a base disk.
#[derive(Debug, thiserror::Error)]
pub enum BaseDiskError {
    #[error("image {reference}: {source}")]
    Image {
        reference: String,
        #[source]
        source: Box<hearth_oci::OciError>,
    },
    #[error("template build {0} has no root filesystem")]
    Template(PathBuf),
    #[error("preparing the root filesystem failed: {0}")]
    Rootfs(#[from] crate::rootfs::RootfsError),
    #[error(transparent)]
    Command(#[from] crate::command::CommandError),
    #[error("I/O on {path} failed: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BaseDiskError {
    let path = path.to_owned();
    move |source| BaseDiskError::Io { path, source }
}

/// Settings that base disks are made with.
#[derive(Clone, Debug)]
pub struct BaseDiskSettings {
    pub data_dir: DataDir,
    pub envd_binary: PathBuf,
    pub hostname: String,
    /// Apparent size of a new base disk.
    pub disk_size_bytes: u64,
    /// Registries reached over plain HTTP besides loopback ones.
    pub plain_http_registries: Vec<String>,
}

impl BaseDiskSettings {
    fn dir(&self) -> PathBuf {
        self.data_dir.cache_dir().join("base-disks")
    }

    fn envd_hash(&self) -> Result<String, BaseDiskError> {
        let data = std::fs::read(&self.envd_binary).map_err(io_err(&self.envd_binary))?;
        Ok(hex::encode(Sha256::digest(&data)))
    }

    fn disk_key(&self, source: &str) -> Result<String, BaseDiskError> {
        let mut hasher = Sha256::new();
        for part in [BASE_DISK_VERSION, source, &self.envd_hash()?, &self.hostname, &self.disk_size_bytes.to_string()] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        Ok(hex::encode(hasher.finalize()))
    }
}

/// The guest defaults an image's config sets: its `Env`, `User` and `WorkingDir`.
pub fn defaults_from_image(config: &ImageConfig) -> GuestConfig {
    let mut env = BTreeMap::new();
    for entry in &config.env {
        match entry.split_once('=') {
            Some((key, value)) => env.insert(key.to_owned(), value.to_owned()),
            None => env.insert(entry.clone(), String::new()),
        };
    }
    GuestConfig {
        user: config.user.clone().filter(|user| !user.is_empty()).unwrap_or_else(|| "root".into()),
        workdir: config.working_dir.clone().filter(|dir| !dir.is_empty()),
        env,
        exposed_ports: config.exposed_ports.clone(),
        labels: config.labels.clone(),
        ..GuestConfig::default()
    }
}

/// Pulls `reference` (with `auth`) and returns its base disk, building it when the cache
/// has none for the image's digest. `progress` receives one line per phase.
pub async fn from_registry(
    settings: &BaseDiskSettings,
    reference: &str,
    auth: &RegistryAuth,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<(BaseDisk, ImageConfig), BaseDiskError> {
    let image_err = |source| BaseDiskError::Image { reference: reference.to_owned(), source: Box::new(source) };
    let parsed = ImageReference::parse(reference).map_err(image_err)?;
    let client = RegistryClient::new(settings.plain_http_registries.clone());
    let blobs = settings.data_dir.cache_dir().join("blobs");
    progress(&format!("pulling {parsed}"));
    let image = client.pull(&parsed, auth, &blobs).await.map_err(image_err)?;
    progress(&format!("pulled {} ({} layers)", image.manifest_digest, image.layers.len()));
    from_image(settings, reference, image, progress).await
}

/// The base disk of an image already on the host (a pulled image, an OCI layout or a
/// `docker save` archive).
pub async fn from_image(
    settings: &BaseDiskSettings,
    name: &str,
    image: Image,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<(BaseDisk, ImageConfig), BaseDiskError> {
    let key = settings.disk_key(&format!("image:{}", image.manifest_digest))?;
    let defaults = defaults_from_image(&image.config);
    let config = image.config.clone();
    let disk = settings.dir().join(format!("{key}.ext4"));
    if disk.is_file() {
        progress(&format!("reusing the root filesystem of {name}"));
        return Ok((BaseDisk::Prepared { path: disk, key, defaults }, config));
    }
    progress(&format!("unpacking {} layers of {name}", image.layers.len()));
    let layers = image.layers.clone();
    let disk_for_task = disk.clone();
    build_disk(settings, &disk_for_task, move |tree| {
        hearth_oci::unpack_layers(&layers, tree)
            .map_err(|source| BaseDiskError::Image { reference: String::new(), source: Box::new(source) })
    })
    .await?;
    Ok((BaseDisk::Prepared { path: disk, key, defaults }, config))
}

/// The base disk of an empty tree (`FROM scratch`).
pub async fn from_scratch(settings: &BaseDiskSettings) -> Result<BaseDisk, BaseDiskError> {
    let key = settings.disk_key("scratch")?;
    let disk = settings.dir().join(format!("{key}.ext4"));
    if !disk.is_file() {
        build_disk(settings, &disk, |_| Ok(())).await?;
    }
    Ok(BaseDisk::Prepared { path: disk, key, defaults: GuestConfig { user: "root".into(), ..GuestConfig::default() } })
}

/// The base disk of another template's ready build: a copy of its root filesystem with
/// the current envd written into it (the build VM needs envd's build subcommands, which a
/// template built by an older Hearth may lack). The copy is cached, so deleting the
/// template later does not break cached layers.
pub async fn from_template(settings: &BaseDiskSettings, build_dir: &Path) -> Result<BaseDisk, BaseDiskError> {
    let paths = TemplateBuildPaths::new(build_dir);
    let manifest = TemplateManifest::load(&paths.manifest()).map_err(|_| BaseDiskError::Template(build_dir.to_owned()))?;
    if manifest.snapshot.is_some() || !paths.rootfs().is_file() {
        return Err(BaseDiskError::Template(build_dir.to_owned()));
    }
    let key = settings.disk_key(&format!("template:{}:{}", manifest.template_id, manifest.build_id))?;
    let dir = settings.dir();
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let disk = dir.join(format!("{key}.ext4"));
    if !disk.is_file() {
        let partial = dir.join(format!("{key}.ext4.partial"));
        let _ = std::fs::remove_file(&partial);
        let result = async {
            hearth_storage::clone::clone_sparse(&paths.rootfs(), &partial).map_err(io_err(&partial))?;
            replace_envd(&partial, &settings.envd_binary).await?;
            hearth_storage::durable::sync_file(&partial).map_err(io_err(&partial))?;
            std::fs::rename(&partial, &disk).map_err(io_err(&disk))
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result?;
    }
    // The base template predates guest defaults: its sandboxes run as `user` in its home.
    let defaults = manifest.guest.clone().unwrap_or_else(|| GuestConfig {
        user: SANDBOX_USER.into(),
        workdir: Some(format!("/home/{SANDBOX_USER}")),
        ..GuestConfig::default()
    });
    Ok(BaseDisk::Prepared { path: disk, key, defaults })
}

/// Writes `envd` as `/usr/bin/envd` (mode 0755) into the unmounted ext4 image `image`
/// with `debugfs`.
async fn replace_envd(image: &Path, envd: &Path) -> Result<(), BaseDiskError> {
    let image_arg = image.to_string_lossy();
    let envd_arg = envd.to_string_lossy();
    let requests = [
        "rm /usr/bin/envd".to_owned(),
        format!("write {envd_arg} /usr/bin/envd"),
        "sif /usr/bin/envd mode 0100755".to_owned(),
        "sif /usr/bin/envd uid 0".to_owned(),
        "sif /usr/bin/envd gid 0".to_owned(),
    ];
    for request in &requests {
        // `rm` of a missing file only prints an error; debugfs exits 0 either way, so the
        // result is checked below.
        crate::command::run("debugfs", &["-w", "-R", request, &image_arg], None).await?;
    }
    let listing = crate::command::run("debugfs", &["-R", "stat /usr/bin/envd", &image_arg], None).await?;
    let size = std::fs::metadata(envd).map_err(io_err(envd))?.len();
    if !listing.contains(&format!("Size: {size}")) {
        return Err(BaseDiskError::Io {
            path: image.to_owned(),
            source: std::io::Error::other(format!("envd was not written into the image: {listing}")),
        });
    }
    Ok(())
}

/// Fills a fresh tree with `fill`, adds the guest files and writes the image to `disk`
/// through a temporary name.
async fn build_disk<F>(settings: &BaseDiskSettings, disk: &Path, fill: F) -> Result<(), BaseDiskError>
where
    F: FnOnce(&Path) -> Result<(), BaseDiskError> + Send + 'static,
{
    let dir = settings.dir();
    tokio::fs::create_dir_all(&dir).await.map_err(io_err(&dir))?;
    let stem = disk.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let tree = dir.join(format!("{stem}.tree-{}", std::process::id()));
    let partial = dir.join(format!("{stem}.ext4.partial"));
    let _ = tokio::fs::remove_dir_all(&tree).await;
    let _ = tokio::fs::remove_file(&partial).await;
    tokio::fs::create_dir_all(&tree).await.map_err(io_err(&tree))?;
    let result = async {
        let tree_for_task = tree.clone();
        tokio::task::spawn_blocking(move || fill(&tree_for_task))
            .await
            .map_err(|err| BaseDiskError::Io { path: tree.clone(), source: std::io::Error::other(err.to_string()) })??;
        let custom = RootfsCustomization { envd_binary: &settings.envd_binary, hostname: &settings.hostname };
        inject_guest_files(&tree, &custom).await?;
        make_ext4(&tree, &partial, settings.disk_size_bytes).await?;
        hearth_storage::durable::sync_file(&partial).map_err(io_err(&partial))?;
        tokio::fs::rename(&partial, disk).await.map_err(io_err(disk))
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&tree).await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&partial).await;
    }
    result
}
