//! `docker save` archives: the classic format (`manifest.json`, `<id>/layer.tar`, `<id>.json`) and
//! the Docker 25+ format, which is also an OCI image layout (`index.json`, `blobs/sha256/...`).

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::digest::sha256_file;
use crate::layout::{name_matches, read_layout, MAX_DOCUMENT_SIZE};
use crate::spec::{
    DockerArchiveEntry, MEDIA_TYPE_DOCKER_LAYER_GZIP, MEDIA_TYPE_OCI_LAYER_TAR,
    MEDIA_TYPE_OCI_LAYER_ZSTD,
};
use crate::unpack::open_layer;
use crate::{Image, ImageConfig, Layer, OciError};

/// Extracts a `docker save` archive (plain, gzip or zstd tar) into `work_dir` and reads one image
/// from it. `image` picks an entry by its RepoTags (`alpine:3.20`, `docker.io/library/alpine:3.20`
/// or the tag alone); `None` requires a single image. An archive without `manifest.json` is read as
/// an OCI image layout.
pub fn read_docker_archive(
    archive: &Path,
    work_dir: &Path,
    image: Option<&str>,
) -> Result<Image, OciError> {
    fs::create_dir_all(work_dir).map_err(|err| OciError::io(work_dir, err))?;
    // The tar crate's unpack skips entries whose path contains `..` and checks that each entry's
    // parent directory resolves inside `work_dir`.
    tar::Archive::new(open_layer(archive)?)
        .unpack(work_dir)
        .map_err(|err| OciError::io(archive, err))?;
    let root = work_dir
        .canonicalize()
        .map_err(|err| OciError::io(work_dir, err))?;

    let manifest_path = root.join("manifest.json");
    if !manifest_path.exists() {
        if root.join("index.json").exists() {
            return read_layout(&root, image);
        }
        return Err(OciError::InvalidLayout {
            path: archive.to_owned(),
            reason:
                "the archive has neither manifest.json (docker save) nor index.json (OCI layout)"
                    .to_owned(),
        });
    }

    let entries = read_archive_manifest(&manifest_path)?;
    let entry = select_entry(archive, &entries, image)?;

    let config_path = member_path(archive, &root, &entry.config)?;
    let config_bytes = fs::read(&config_path).map_err(|err| OciError::io(&config_path, err))?;
    let config = ImageConfig::from_json(&config_bytes, &config_path.display().to_string())?;
    let config_digest = sha256_file(&config_path)?;

    let mut layers = Vec::with_capacity(entry.layers.len());
    for layer in &entry.layers {
        let path = member_path(archive, &root, layer)?;
        let digest = sha256_file(&path)?;
        let media_type = sniff_media_type(&path)?;
        layers.push(Layer {
            path,
            digest,
            media_type,
        });
    }

    Ok(Image {
        manifest_digest: config_digest,
        config,
        layers,
    })
}

fn read_archive_manifest(path: &Path) -> Result<Vec<DockerArchiveEntry>, OciError> {
    let size = fs::metadata(path)
        .map_err(|err| OciError::io(path, err))?
        .len();
    if size > MAX_DOCUMENT_SIZE {
        return Err(OciError::InvalidLayout {
            path: path.to_owned(),
            reason: format!(
                "{size} bytes is larger than the {MAX_DOCUMENT_SIZE}-byte limit for JSON documents"
            ),
        });
    }
    let bytes = fs::read(path).map_err(|err| OciError::io(path, err))?;
    serde_json::from_slice(&bytes).map_err(|err| OciError::json(path.display().to_string(), err))
}

fn select_entry<'a>(
    archive: &Path,
    entries: &'a [DockerArchiveEntry],
    image: Option<&str>,
) -> Result<&'a DockerArchiveEntry, OciError> {
    let all_tags = || {
        entries
            .iter()
            .flat_map(|entry| entry.repo_tags.iter().flatten().cloned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let invalid = |reason: String| OciError::InvalidLayout {
        path: archive.to_owned(),
        reason,
    };

    match image {
        Some(requested) => entries
            .iter()
            .find(|entry| {
                entry
                    .repo_tags
                    .iter()
                    .flatten()
                    .any(|tag| name_matches(tag, requested))
            })
            .ok_or_else(|| {
                invalid(format!(
                    "no image tagged {requested:?}; tags present: [{}]",
                    all_tags()
                ))
            }),
        None => match entries {
            [only] => Ok(only),
            [] => Err(invalid("manifest.json lists no images".to_owned())),
            _ => Err(invalid(format!(
                "manifest.json lists {} images; pick one by tag from [{}]",
                entries.len(),
                all_tags()
            ))),
        },
    }
}

/// Resolves a path named in `manifest.json` and checks that it stays inside the extracted archive,
/// also after following symlinks (classic archives link repeated layers to one copy).
fn member_path(archive: &Path, root: &Path, member: &str) -> Result<PathBuf, OciError> {
    let joined = root.join(member);
    let resolved = joined
        .canonicalize()
        .map_err(|err| OciError::io(&joined, err))?;
    if resolved.starts_with(root) && resolved.is_file() {
        Ok(resolved)
    } else {
        Err(OciError::InvalidLayout {
            path: archive.to_owned(),
            reason: format!(
                "manifest.json names {member:?}, which is not a file inside the archive"
            ),
        })
    }
}

fn sniff_media_type(path: &Path) -> Result<String, OciError> {
    let file = fs::File::open(path).map_err(|err| OciError::io(path, err))?;
    let mut reader = BufReader::new(file);
    let head = reader.fill_buf().map_err(|err| OciError::io(path, err))?;
    let media_type = if head.starts_with(&[0x1f, 0x8b]) {
        MEDIA_TYPE_DOCKER_LAYER_GZIP
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        MEDIA_TYPE_OCI_LAYER_ZSTD
    } else {
        MEDIA_TYPE_OCI_LAYER_TAR
    };
    Ok(media_type.to_owned())
}
