//! OCI image layout directories (`oci-layout`, `index.json`, `blobs/sha256/<hex>`): reading an image
//! from one, and writing one from directory trees.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;

use crate::digest::{blob_path, check_digest, sha256_bytes, verify_file, HashingWriter};
use crate::spec::{
    is_index_media_type, ConfigFile, Descriptor, Index, Manifest, ManifestKind, Platform, RootFs,
    ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME, MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_LAYER_GZIP, MEDIA_TYPE_OCI_MANIFEST, SUPPORTED_LAYER_MEDIA_TYPES,
};
use crate::{Image, ImageConfig, ImageReference, Layer, OciError};

const INDEX_FILE: &str = "index.json";
const LAYOUT_FILE: &str = "oci-layout";
const LAYOUT_VERSION_JSON: &str = r#"{"imageLayoutVersion":"1.0.0"}"#;
/// Upper bound for a manifest, index or config read into memory.
pub(crate) const MAX_DOCUMENT_SIZE: u64 = 8 * 1024 * 1024;

/// Reads an image from a local OCI image layout directory. `tag` picks the manifest whose
/// `org.opencontainers.image.ref.name` (or `io.containerd.image.name`) annotation matches, either
/// exactly, as a tag (`3.20`) or as a full reference (`alpine:3.20`). `None` requires a single image.
/// Every blob is verified against its digest.
pub fn read_layout(dir: &Path, tag: Option<&str>) -> Result<Image, OciError> {
    let (descriptor, manifest_bytes) = read_manifest_blob(dir, tag)?;
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes).map_err(|err| {
        OciError::json(
            format!("manifest {} in {}", descriptor.digest, dir.display()),
            err,
        )
    })?;

    let blobs = dir.join("blobs");
    let config_path = blob_path(&blobs, &manifest.config.digest)?;
    let config_bytes = read_verified(&config_path, &manifest.config.digest)?;
    let config =
        ImageConfig::from_json(&config_bytes, &format!("config {}", manifest.config.digest))?;

    let mut layers = Vec::with_capacity(manifest.layers.len());
    for layer in &manifest.layers {
        check_layer_media_type(layer)?;
        let path = blob_path(&blobs, &layer.digest)?;
        verify_file(&path, &layer.digest)?;
        layers.push(Layer {
            path,
            digest: layer.digest.clone(),
            media_type: layer.media_type.clone(),
        });
    }

    Ok(Image {
        manifest_digest: descriptor.digest,
        config,
        layers,
    })
}

/// Selects a manifest in a layout and returns its descriptor and verified bytes. A nested index is
/// resolved to its linux/amd64 manifest.
pub(crate) fn read_manifest_blob(
    dir: &Path,
    tag: Option<&str>,
) -> Result<(Descriptor, Vec<u8>), OciError> {
    let index_path = dir.join(INDEX_FILE);
    let index_bytes = read_small_file(&index_path)?;
    let index: Index = serde_json::from_slice(&index_bytes)
        .map_err(|err| OciError::json(index_path.display().to_string(), err))?;
    let mut descriptor = select_by_name(dir, &index.manifests, tag)?.clone();
    let blobs = dir.join("blobs");
    let mut bytes = read_verified(&blob_path(&blobs, &descriptor.digest)?, &descriptor.digest)?;

    if is_index_media_type(&descriptor.media_type) || is_index_document(&bytes) {
        let nested: Index = serde_json::from_slice(&bytes).map_err(|err| {
            OciError::json(
                format!("index {} in {}", descriptor.digest, dir.display()),
                err,
            )
        })?;
        descriptor = select_platform(
            &nested,
            &format!("{} in {}", descriptor.digest, dir.display()),
        )?
        .clone();
        bytes = read_verified(&blob_path(&blobs, &descriptor.digest)?, &descriptor.digest)?;
    }
    Ok((descriptor, bytes))
}

fn select_by_name<'a>(
    dir: &Path,
    manifests: &'a [Descriptor],
    tag: Option<&str>,
) -> Result<&'a Descriptor, OciError> {
    let invalid = |reason: String| OciError::InvalidLayout {
        path: dir.to_owned(),
        reason,
    };
    let names = || {
        manifests
            .iter()
            .flat_map(|descriptor| descriptor_names(descriptor).map(str::to_owned))
            .collect::<Vec<_>>()
            .join(", ")
    };

    match tag {
        Some(tag) => {
            let matching: Vec<_> = manifests
                .iter()
                .filter(|descriptor| {
                    descriptor_names(descriptor).any(|name| name_matches(name, tag))
                })
                .collect();
            match matching.as_slice() {
                [] if manifests.len() == 1 && descriptor_names(&manifests[0]).next().is_none() => {
                    Ok(&manifests[0])
                }
                [] => Err(invalid(format!(
                    "no image named {tag:?}; names present: [{}]",
                    names()
                ))),
                [first, ..] => Ok(first),
            }
        }
        None => match manifests {
            [only] => Ok(only),
            [] => Err(invalid("index.json lists no images".to_owned())),
            _ => Err(invalid(format!(
                "index.json lists {} images; pick one by name from [{}]",
                manifests.len(),
                names()
            ))),
        },
    }
}

fn descriptor_names(descriptor: &Descriptor) -> impl Iterator<Item = &str> {
    [ANNOTATION_REF_NAME, ANNOTATION_CONTAINERD_NAME]
        .into_iter()
        .filter_map(|key| descriptor.annotations.get(key).map(String::as_str))
}

/// Compares an image name from a layout or archive with the name a caller asked for: exactly, as
/// normalised references (`alpine:3` equals `docker.io/library/alpine:3`), or by tag alone.
pub(crate) fn name_matches(candidate: &str, requested: &str) -> bool {
    if candidate == requested {
        return true;
    }
    match (
        ImageReference::parse(candidate),
        ImageReference::parse(requested),
    ) {
        (Ok(candidate), Ok(requested_reference)) => {
            candidate == requested_reference || candidate.tag.as_deref() == Some(requested)
        }
        _ => false,
    }
}

/// Picks the linux/amd64 manifest of an index.
pub(crate) fn select_platform<'a>(
    index: &'a Index,
    what: &str,
) -> Result<&'a Descriptor, OciError> {
    let is_amd64 = |platform: &Platform| {
        platform.os == "linux"
            && (platform.architecture == "amd64" || platform.architecture == "x86_64")
    };
    index
        .manifests
        .iter()
        .find(|descriptor| descriptor.platform.as_ref().is_some_and(is_amd64))
        .ok_or_else(|| OciError::NoMatchingPlatform {
            reference: what.to_owned(),
            platforms: index
                .manifests
                .iter()
                .filter_map(|descriptor| descriptor.platform.as_ref())
                .map(|platform| format!("{}/{}", platform.os, platform.architecture))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Returns whether a manifest document is an index, judged by its `mediaType` or its `manifests` array.
pub(crate) fn is_index_document(bytes: &[u8]) -> bool {
    match serde_json::from_slice::<ManifestKind>(bytes) {
        Ok(kind) => kind
            .media_type
            .as_deref()
            .map(is_index_media_type)
            .unwrap_or(kind.manifests.is_some()),
        Err(_) => false,
    }
}

pub(crate) fn check_layer_media_type(layer: &Descriptor) -> Result<(), OciError> {
    if SUPPORTED_LAYER_MEDIA_TYPES.contains(&layer.media_type.as_str()) {
        Ok(())
    } else {
        Err(OciError::UnsupportedMediaType {
            what: format!("layer {}", layer.digest),
            media_type: layer.media_type.clone(),
        })
    }
}

fn read_small_file(path: &Path) -> Result<Vec<u8>, OciError> {
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
    fs::read(path).map_err(|err| OciError::io(path, err))
}

fn read_verified(path: &Path, digest: &str) -> Result<Vec<u8>, OciError> {
    let bytes = read_small_file(path)?;
    check_digest(&path.display().to_string(), digest, &sha256_bytes(&bytes))?;
    Ok(bytes)
}

/// Writes a one-layer OCI image layout from a directory tree and a config, tagged `tag`.
pub fn write_layout(
    rootfs: &Path,
    config: &ImageConfig,
    out_dir: &Path,
    tag: &str,
) -> Result<(), OciError> {
    write_layout_layers(&[rootfs], config, out_dir, tag)
}

/// Writes an OCI image layout with one gzip layer per directory tree, in order. Files named
/// `.wh.NAME` or `.wh..wh..opq` in a later tree become whiteouts. An existing layout in `out_dir`
/// is extended, and an image already tagged `tag` is replaced in its `index.json`.
///
/// Each tree keeps numeric ownership, modes, symlinks, hard links (files sharing an inode) and FIFOs.
/// Device nodes and sockets are skipped with a warning.
pub fn write_layout_layers(
    layer_dirs: &[&Path],
    config: &ImageConfig,
    out_dir: &Path,
    tag: &str,
) -> Result<(), OciError> {
    let blobs = out_dir.join("blobs");
    let blob_dir = blobs.join("sha256");
    fs::create_dir_all(&blob_dir).map_err(|err| OciError::io(&blob_dir, err))?;

    let mut layers = Vec::with_capacity(layer_dirs.len());
    let mut diff_ids = Vec::with_capacity(layer_dirs.len());
    for dir in layer_dirs {
        let (descriptor, diff_id) = write_layer_blob(dir, &blob_dir)?;
        layers.push(descriptor);
        diff_ids.push(diff_id);
    }

    let config_file = ConfigFile {
        architecture: "amd64".to_owned(),
        os: "linux".to_owned(),
        config: Some(config.to_container_config()),
        rootfs: Some(RootFs {
            kind: "layers".to_owned(),
            diff_ids,
        }),
    };
    let config_bytes =
        serde_json::to_vec(&config_file).map_err(|err| OciError::json("image config", err))?;
    let config_descriptor = write_json_blob(&blobs, MEDIA_TYPE_OCI_CONFIG, &config_bytes)?;

    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_OCI_MANIFEST.to_owned()),
        config: config_descriptor,
        layers,
    };
    let manifest_bytes =
        serde_json::to_vec(&manifest).map_err(|err| OciError::json("image manifest", err))?;
    let mut manifest_descriptor =
        write_json_blob(&blobs, MEDIA_TYPE_OCI_MANIFEST, &manifest_bytes)?;
    manifest_descriptor
        .annotations
        .insert(ANNOTATION_REF_NAME.to_owned(), tag.to_owned());

    update_index(out_dir, manifest_descriptor)?;
    let layout_path = out_dir.join(LAYOUT_FILE);
    fs::write(&layout_path, LAYOUT_VERSION_JSON).map_err(|err| OciError::io(&layout_path, err))
}

fn update_index(out_dir: &Path, descriptor: Descriptor) -> Result<(), OciError> {
    let index_path = out_dir.join(INDEX_FILE);
    let mut index = match fs::read(&index_path) {
        Ok(bytes) => serde_json::from_slice::<Index>(&bytes)
            .map_err(|err| OciError::json(index_path.display().to_string(), err))?,
        Err(err) if err.kind() == io::ErrorKind::NotFound => Index {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_OCI_INDEX.to_owned()),
            manifests: Vec::new(),
        },
        Err(err) => return Err(OciError::io(&index_path, err)),
    };

    let tag = descriptor.annotations.get(ANNOTATION_REF_NAME).cloned();
    index
        .manifests
        .retain(|existing| existing.annotations.get(ANNOTATION_REF_NAME) != tag.as_ref());
    index.manifests.push(descriptor);
    let bytes =
        serde_json::to_vec_pretty(&index).map_err(|err| OciError::json("index.json", err))?;
    fs::write(&index_path, bytes).map_err(|err| OciError::io(&index_path, err))
}

fn write_json_blob(blobs: &Path, media_type: &str, bytes: &[u8]) -> Result<Descriptor, OciError> {
    let digest = sha256_bytes(bytes);
    let path = blob_path(blobs, &digest)?;
    fs::write(&path, bytes).map_err(|err| OciError::io(&path, err))?;
    Ok(Descriptor {
        media_type: media_type.to_owned(),
        digest,
        size: bytes.len() as u64,
        platform: None,
        annotations: BTreeMap::new(),
    })
}

/// Writes a tree as a gzip tar blob; returns its descriptor and the digest of the uncompressed tar.
fn write_layer_blob(tree: &Path, blob_dir: &Path) -> Result<(Descriptor, String), OciError> {
    let temp =
        tempfile::NamedTempFile::new_in(blob_dir).map_err(|err| OciError::io(blob_dir, err))?;
    let file = temp
        .reopen()
        .map_err(|err| OciError::io(temp.path(), err))?;
    let compressed = HashingWriter::new(BufWriter::new(file));
    let uncompressed = HashingWriter::new(GzEncoder::new(compressed, Compression::default()));
    let mut builder = tar::Builder::new(uncompressed);

    let mut hard_links = HashMap::new();
    append_tree(&mut builder, tree, Path::new(""), &mut hard_links)?;

    let write_error = |err| OciError::io(temp.path(), err);
    let uncompressed = builder.into_inner().map_err(write_error)?;
    let (encoder, diff_id, _) = uncompressed.finish();
    let compressed = encoder.finish().map_err(write_error)?;
    let (mut file, digest, size) = compressed.finish();
    file.flush().map_err(write_error)?;

    let path = blob_path(blob_dir.parent().unwrap_or(blob_dir), &digest)?;
    temp.persist(&path)
        .map_err(|err| OciError::io(&path, err.error))?;
    let descriptor = Descriptor {
        media_type: MEDIA_TYPE_OCI_LAYER_GZIP.to_owned(),
        digest,
        size,
        platform: None,
        annotations: BTreeMap::new(),
    };
    Ok((descriptor, diff_id))
}

/// Appends the children of `root/relative` in name order, so the same tree gives the same tar.
fn append_tree<W: Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    relative: &Path,
    hard_links: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<(), OciError> {
    let dir = root.join(relative);
    let mut children: Vec<_> = fs::read_dir(&dir)
        .map_err(|err| OciError::io(&dir, err))?
        .map(|entry| entry.map(|entry| entry.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|err| OciError::io(&dir, err))?;
    children.sort();

    for name in children {
        let child_relative = relative.join(&name);
        let child = root.join(&child_relative);
        let meta = fs::symlink_metadata(&child).map_err(|err| OciError::io(&child, err))?;
        let file_type = meta.file_type();
        let io_error = |err| OciError::io(&child, err);

        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        header.set_mode(meta.mode() & 0o7777);

        if file_type.is_dir() {
            builder
                .append_data(&mut header, &child_relative, io::empty())
                .map_err(io_error)?;
            append_tree(builder, root, &child_relative, hard_links)?;
        } else if file_type.is_symlink() {
            let target = fs::read_link(&child).map_err(io_error)?;
            builder
                .append_link(&mut header, &child_relative, &target)
                .map_err(io_error)?;
        } else if file_type.is_file() {
            let key = (meta.dev(), meta.ino());
            match hard_links.get(&key) {
                Some(first) if meta.nlink() > 1 => {
                    header.set_entry_type(tar::EntryType::Link);
                    header.set_size(0);
                    builder
                        .append_link(&mut header, &child_relative, first)
                        .map_err(io_error)?;
                }
                _ => {
                    if meta.nlink() > 1 {
                        hard_links.insert(key, child_relative.clone());
                    }
                    let file = File::open(&child).map_err(io_error)?;
                    builder
                        .append_data(&mut header, &child_relative, file)
                        .map_err(io_error)?;
                }
            }
        } else if file_type_is_fifo(&file_type) {
            header.set_size(0);
            builder
                .append_data(&mut header, &child_relative, io::empty())
                .map_err(io_error)?;
        } else {
            tracing::warn!(path = %child.display(), "skipping device node or socket while writing a layer");
        }
    }
    Ok(())
}

fn file_type_is_fifo(file_type: &fs::FileType) -> bool {
    use std::os::unix::fs::FileTypeExt;
    file_type.is_fifo()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor_named(names: &[(&str, &str)]) -> Descriptor {
        Descriptor {
            media_type: MEDIA_TYPE_OCI_MANIFEST.to_owned(),
            digest: sha256_bytes(b"x"),
            size: 1,
            platform: None,
            annotations: names
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn name_matches_tag_and_full_reference() {
        assert!(name_matches("3.20", "3.20"));
        assert!(name_matches("docker.io/library/alpine:3.20", "alpine:3.20"));
        assert!(name_matches("docker.io/library/alpine:3.20", "3.20"));
        assert!(!name_matches(
            "docker.io/library/alpine:3.20",
            "alpine:3.19"
        ));
    }

    #[test]
    fn select_by_name_requires_name_when_several_images() {
        let manifests = vec![
            descriptor_named(&[(ANNOTATION_REF_NAME, "a")]),
            descriptor_named(&[(ANNOTATION_REF_NAME, "b")]),
        ];
        let err = select_by_name(Path::new("/layout"), &manifests, None).unwrap_err();
        assert!(err.to_string().contains("[a, b]"), "{err}");
        let selected = select_by_name(Path::new("/layout"), &manifests, Some("b")).unwrap();
        assert_eq!(selected.annotations[ANNOTATION_REF_NAME], "b");
    }

    #[test]
    fn write_then_read_layout_round_trips_config() {
        let work = tempfile::tempdir().unwrap();
        let rootfs = work.path().join("rootfs");
        fs::create_dir_all(rootfs.join("etc")).unwrap();
        fs::write(rootfs.join("etc/hostname"), b"hearth\n").unwrap();
        let config = ImageConfig {
            env: vec!["A=1".into()],
            cmd: Some(vec!["/bin/sh".into()]),
            ..Default::default()
        };

        let layout = work.path().join("layout");
        write_layout(&rootfs, &config, &layout, "v1").unwrap();
        write_layout(&rootfs, &ImageConfig::default(), &layout, "v2").unwrap();

        let image = read_layout(&layout, Some("v1")).unwrap();
        assert_eq!(image.config, config);
        assert_eq!(image.layers.len(), 1);
        assert!(
            read_layout(&layout, None).is_err(),
            "two tags must need a name"
        );
        assert_eq!(
            read_layout(&layout, Some("v2")).unwrap().config,
            ImageConfig::default()
        );
    }
}
