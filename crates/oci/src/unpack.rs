//! Applies image layers, in order, onto a root filesystem directory.
//!
//! Every path is resolved inside the destination the way a chroot would resolve it. A symlink met on
//! the way to an entry (say `lib -> /usr/lib` from a lower layer) is followed with the destination as
//! `/`, and `..` stops at the destination. The last component of an entry is never followed, so an
//! entry replaces a symlink rather than writing through it. Entry names containing `..` are rejected.

use std::collections::HashSet;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use tar::EntryType;

use crate::{Layer, OciError};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
/// Same bound as Linux's path resolution (`MAXSYMLINKS`).
const MAX_SYMLINK_HOPS: u32 = 40;
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// Applies the layers in order onto `dest`, which must be empty or absent.
///
/// Handles whiteouts (`.wh.NAME` and the opaque `.wh..wh..opq`), numeric ownership, modes including
/// setuid/setgid/sticky, `SCHILY.xattr.*` extended attributes, symlinks (targets stored as written),
/// hard links (the target must resolve inside `dest`) and FIFOs. Device nodes are skipped with a
/// warning. Compression is detected from the content (gzip, zstd or plain tar).
pub fn unpack_layers(layers: &[Layer], dest: &Path) -> Result<(), OciError> {
    prepare_destination(dest)?;
    let root = dest.canonicalize().map_err(|err| OciError::io(dest, err))?;
    let mut unpacker = Unpacker {
        root,
        ownership_warning_logged: false,
    };

    for layer in layers {
        tracing::debug!(layer = %layer.path.display(), digest = %layer.digest, "applying layer");
        unpacker.apply_layer(&layer.path)?;
    }
    Ok(())
}

fn prepare_destination(dest: &Path) -> Result<(), OciError> {
    match fs::read_dir(dest) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(OciError::DestinationNotEmpty {
                    path: dest.to_owned(),
                });
            }
            Ok(())
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dest).map_err(|err| OciError::io(dest, err))
        }
        Err(err) => Err(OciError::io(dest, err)),
    }
}

/// Opens a layer file and wraps it in the decompressor that its first bytes call for.
pub(crate) fn open_layer(path: &Path) -> Result<Box<dyn Read>, OciError> {
    let file = File::open(path).map_err(|err| OciError::io(path, err))?;
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let head = reader.fill_buf().map_err(|err| OciError::io(path, err))?;

    if head.starts_with(GZIP_MAGIC) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(reader)))
    } else if head.starts_with(ZSTD_MAGIC) {
        // NOTE: ruzstd's streaming decoder reads a single zstd frame; multi-frame layers
        // (zstd:chunked) would be cut short after the first frame.
        let decoder = ruzstd::decoding::StreamingDecoder::new(reader).map_err(|err| {
            OciError::io(
                path,
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("invalid zstd layer: {err}"),
                ),
            )
        })?;
        Ok(Box::new(decoder))
    } else {
        Ok(Box::new(reader))
    }
}

struct Unpacker {
    /// Canonical path of the destination, which plays the role of `/` for every entry.
    root: PathBuf,
    ownership_warning_logged: bool,
}

impl Unpacker {
    fn apply_layer(&mut self, layer: &Path) -> Result<(), OciError> {
        let mut archive = tar::Archive::new(open_layer(layer)?);
        let entries = archive.entries().map_err(|err| OciError::io(layer, err))?;
        // Entries written by this layer survive an opaque whiteout of their directory, whichever
        // order the two appear in the tar stream.
        let mut written: HashSet<PathBuf> = HashSet::new();

        for entry in entries {
            let mut entry = entry.map_err(|err| OciError::io(layer, err))?;
            let raw_path = entry
                .path()
                .map_err(|err| OciError::io(layer, err))?
                .into_owned();
            let unsafe_path = |reason: &str| OciError::UnsafePath {
                layer: layer.to_owned(),
                entry: raw_path.display().to_string(),
                reason: reason.to_owned(),
            };

            let relative =
                normalize_entry_path(&raw_path).map_err(|reason| unsafe_path(&reason))?;
            let (Some(parent_relative), Some(name)) = (relative.parent(), relative.file_name())
            else {
                // The archive's root directory entry (`./`) names the destination itself.
                continue;
            };
            let parent = self
                .resolve(parent_relative, true)
                .map_err(|reason| unsafe_path(&reason))?;

            if name == OPAQUE_WHITEOUT {
                self.clear_directory(&parent, &written)?;
                continue;
            }
            if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
                if hidden.is_empty() || hidden == b"." || hidden == b".." {
                    return Err(unsafe_path("a whiteout must name a file"));
                }
                remove_existing(&parent.join(OsStr::from_bytes(hidden)))?;
                continue;
            }

            let target = parent.join(name);
            self.write_entry(layer, &mut entry, &target)
                .map_err(|err| match err {
                    EntryError::Unsafe(reason) => unsafe_path(&reason),
                    EntryError::Oci(err) => err,
                })?;
            written.insert(target);
        }
        Ok(())
    }

    fn write_entry<R: Read>(
        &mut self,
        layer: &Path,
        entry: &mut tar::Entry<'_, R>,
        target: &Path,
    ) -> Result<(), EntryError> {
        let header = entry.header();
        let entry_type = header.entry_type();
        let mode = header.mode().map_err(|err| OciError::io(layer, err))? & 0o7777;
        let uid = header.uid().map_err(|err| OciError::io(layer, err))?;
        let gid = header.gid().map_err(|err| OciError::io(layer, err))?;
        let mtime = header.mtime().unwrap_or(0);
        let xattrs = read_xattrs(entry).map_err(|err| OciError::io(layer, err))?;
        let io_error = |err| EntryError::Oci(OciError::io(target, err));

        match entry_type {
            EntryType::Directory => {
                let is_directory = fs::symlink_metadata(target)
                    .map(|meta| meta.is_dir())
                    .unwrap_or(false);
                if !is_directory {
                    remove_existing(target)?;
                    fs::create_dir(target).map_err(io_error)?;
                }
                self.set_owner(target, uid, gid)?;
                fs::set_permissions(target, fs::Permissions::from_mode(mode)).map_err(io_error)?;
                set_xattrs(target, &xattrs);
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                remove_existing(target)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(target)
                    .map_err(io_error)?;
                io::copy(entry, &mut file).map_err(io_error)?;
                file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime))
                    .map_err(io_error)?;
                drop(file);
                // chown clears setuid/setgid bits and file capabilities, so it comes before both.
                self.set_owner(target, uid, gid)?;
                fs::set_permissions(target, fs::Permissions::from_mode(mode)).map_err(io_error)?;
                set_xattrs(target, &xattrs);
            }
            EntryType::Symlink => {
                let link_target = entry
                    .link_name()
                    .map_err(|err| OciError::io(layer, err))?
                    .ok_or_else(|| {
                        EntryError::Unsafe("symlink entry without a target".to_owned())
                    })?;
                remove_existing(target)?;
                std::os::unix::fs::symlink(&link_target, target).map_err(io_error)?;
                self.set_owner(target, uid, gid)?;
            }
            EntryType::Link => {
                let link_name = entry
                    .link_name()
                    .map_err(|err| OciError::io(layer, err))?
                    .ok_or_else(|| {
                        EntryError::Unsafe("hard link entry without a target".to_owned())
                    })?
                    .into_owned();
                let source = self
                    .resolve_hard_link_source(&link_name)
                    .map_err(EntryError::Unsafe)?;
                if source == target {
                    return Ok(());
                }
                remove_existing(target)?;
                fs::hard_link(&source, target).map_err(io_error)?;
            }
            EntryType::Fifo => {
                remove_existing(target)?;
                make_fifo(target, mode).map_err(io_error)?;
                self.set_owner(target, uid, gid)?;
                fs::set_permissions(target, fs::Permissions::from_mode(mode)).map_err(io_error)?;
            }
            EntryType::Char | EntryType::Block => {
                tracing::warn!(layer = %layer.display(), path = %target.display(), "skipping device node in layer");
            }
            EntryType::XGlobalHeader
            | EntryType::XHeader
            | EntryType::GNULongName
            | EntryType::GNULongLink => {}
            other => {
                tracing::warn!(
                    layer = %layer.display(),
                    path = %target.display(),
                    entry_type = ?other,
                    "skipping unsupported tar entry type"
                );
            }
        }
        Ok(())
    }

    /// Resolves a hard link's target name to an existing non-directory inside the root.
    fn resolve_hard_link_source(&self, link_name: &Path) -> Result<PathBuf, String> {
        let relative = normalize_entry_path(link_name)
            .map_err(|reason| format!("hard link target: {reason}"))?;
        let (Some(parent), Some(name)) = (relative.parent(), relative.file_name()) else {
            return Err("hard link target is the root directory".to_owned());
        };
        let source = self.resolve(parent, false)?.join(name);
        match fs::symlink_metadata(&source) {
            Ok(meta) if meta.is_dir() => Err(format!(
                "hard link target {} is a directory",
                link_name.display()
            )),
            Ok(_) => Ok(source),
            Err(_) => Err(format!(
                "hard link target {} does not exist in the image",
                link_name.display()
            )),
        }
    }

    /// Resolves a directory path inside the root, following symlinks with the root as `/` and
    /// clamping `..` at the root. Missing directories are created when `create` is set.
    fn resolve(&self, relative: &Path, create: bool) -> Result<PathBuf, String> {
        let mut pending: Vec<OsString> = relative.iter().rev().map(OsStr::to_owned).collect();
        let mut current = self.root.clone();
        let mut hops = 0;

        while let Some(component) = pending.pop() {
            if component == "." || component == "/" || component.is_empty() {
                continue;
            }
            if component == ".." {
                if current != self.root {
                    current.pop();
                }
                continue;
            }

            let candidate = current.join(&component);
            match fs::symlink_metadata(&candidate) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(format!(
                            "too many symlinks while resolving {}",
                            relative.display()
                        ));
                    }
                    let link = fs::read_link(&candidate)
                        .map_err(|err| format!("{}: {err}", candidate.display()))?;
                    if link.is_absolute() {
                        current = self.root.clone();
                    }
                    pending.extend(link.iter().rev().map(OsStr::to_owned));
                }
                Ok(meta) if meta.is_dir() => current = candidate,
                Ok(_) => return Err(format!("{} is not a directory", relative.display())),
                Err(err) if err.kind() == io::ErrorKind::NotFound && create => {
                    fs::create_dir(&candidate)
                        .map_err(|err| format!("{}: {err}", candidate.display()))?;
                    current = candidate;
                }
                Err(err) => return Err(format!("{}: {err}", candidate.display())),
            }
        }
        Ok(current)
    }

    /// Applies an opaque whiteout: removes what lower layers put in `directory`.
    fn clear_directory(
        &self,
        directory: &Path,
        written: &HashSet<PathBuf>,
    ) -> Result<(), OciError> {
        let children = fs::read_dir(directory).map_err(|err| OciError::io(directory, err))?;
        for child in children {
            let child = child.map_err(|err| OciError::io(directory, err))?.path();
            if !written.contains(&child) {
                remove_existing(&child)?;
            }
        }
        Ok(())
    }

    fn set_owner(&mut self, path: &Path, uid: u64, gid: u64) -> Result<(), OciError> {
        let (Ok(uid), Ok(gid)) = (u32::try_from(uid), u32::try_from(gid)) else {
            return Err(OciError::io(
                path,
                io::Error::new(io::ErrorKind::InvalidData, "uid or gid out of range"),
            ));
        };
        match std::os::unix::fs::lchown(path, Some(uid), Some(gid)) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
                // Unprivileged unpacking (tests, tooling) keeps the caller's ownership.
                if !self.ownership_warning_logged {
                    tracing::warn!(path = %path.display(), "cannot set file ownership without root; keeping the current owner");
                    self.ownership_warning_logged = true;
                }
                Ok(())
            }
            Err(err) => Err(OciError::io(path, err)),
        }
    }
}

enum EntryError {
    Unsafe(String),
    Oci(OciError),
}

impl From<OciError> for EntryError {
    fn from(err: OciError) -> Self {
        EntryError::Oci(err)
    }
}

/// Turns an entry name into a relative path: drops leading `/` and `.` components and rejects `..`.
fn normalize_entry_path(raw: &Path) -> Result<PathBuf, String> {
    let mut relative = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(part) => relative.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err("the path contains a '..' component".to_owned()),
            Component::Prefix(_) => return Err("the path has a prefix".to_owned()),
        }
    }
    Ok(relative)
}

/// Removes whatever is at `path` (file, symlink or directory tree) without following a final symlink.
fn remove_existing(path: &Path) -> Result<(), OciError> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    };
    result.map_err(|err| OciError::io(path, err))
}

fn read_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Vec<(CString, Vec<u8>)>> {
    let mut xattrs = Vec::new();
    if let Some(extensions) = entry.pax_extensions()? {
        for extension in extensions {
            let extension = extension?;
            if let Some(name) = extension.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                if let Ok(name) = CString::new(name) {
                    xattrs.push((name, extension.value_bytes().to_vec()));
                }
            }
        }
    }
    Ok(xattrs)
}

/// Sets extended attributes such as `security.capability`; failures are logged, not fatal, because
/// some filesystems (tmpfs without xattr support) reject them.
fn set_xattrs(path: &Path, xattrs: &[(CString, Vec<u8>)]) {
    if xattrs.is_empty() {
        return;
    }
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    for (name, value) in xattrs {
        // SAFETY: `c_path` and `name` are NUL-terminated strings that outlive the call, and
        // `value` is a live buffer whose length is passed alongside it.
        let result = unsafe {
            libc::lsetxattr(
                c_path.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if result != 0 {
            let err = io::Error::last_os_error();
            tracing::warn!(path = %path.display(), xattr = ?name, error = %err, "failed to set extended attribute");
        }
    }
}

fn make_fifo(path: &Path, mode: u32) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: `c_path` is a NUL-terminated string that outlives the call.
    let result = unsafe { libc::mkfifo(c_path.as_ptr(), mode as libc::mode_t) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn new_header(kind: EntryType) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header
    }

    fn append_file(builder: &mut tar::Builder<Vec<u8>>, path: &str, content: &[u8], mode: u32) {
        let mut header = new_header(EntryType::Regular);
        header.set_size(content.len() as u64);
        header.set_mode(mode);
        builder.append_data(&mut header, path, content).unwrap();
    }

    fn append_link(builder: &mut tar::Builder<Vec<u8>>, kind: EntryType, path: &str, target: &str) {
        let mut header = new_header(kind);
        header.set_size(0);
        header.set_mode(0o777);
        builder.append_link(&mut header, path, target).unwrap();
    }

    /// Writes a raw entry name into the header, bypassing the `tar` crate's own `..` check.
    fn append_raw_name(builder: &mut tar::Builder<Vec<u8>>, name: &str) {
        let mut header = new_header(EntryType::Regular);
        header.set_size(1);
        header.set_mode(0o644);
        let name_field = &mut header.as_old_mut().name;
        name_field[..name.len()].copy_from_slice(name.as_bytes());
        header.set_cksum();
        builder.append(&header, &b"x"[..]).unwrap();
    }

    fn layer_from(dir: &Path, name: &str, builder: tar::Builder<Vec<u8>>) -> Layer {
        let path = dir.join(name);
        fs::write(&path, builder.into_inner().unwrap()).unwrap();
        Layer {
            path,
            digest: String::new(),
            media_type: crate::spec::MEDIA_TYPE_OCI_LAYER_TAR.to_owned(),
        }
    }

    #[test]
    fn unpack_rejects_parent_dir_entry() {
        let work = tempfile::tempdir().unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        append_raw_name(&mut builder, "../escaped");
        let layer = layer_from(work.path(), "layer.tar", builder);

        let err = unpack_layers(&[layer], &work.path().join("rootfs")).unwrap_err();
        assert!(matches!(err, OciError::UnsafePath { .. }), "{err}");
        assert!(!work.path().join("escaped").exists());
    }

    #[test]
    fn unpack_writes_through_absolute_symlink_inside_root() {
        let work = tempfile::tempdir().unwrap();
        let outside = work.path().join("outside");
        fs::create_dir(&outside).unwrap();

        let mut lower = tar::Builder::new(Vec::new());
        append_link(
            &mut lower,
            EntryType::Symlink,
            "escape",
            outside.to_str().unwrap(),
        );
        append_link(&mut lower, EntryType::Symlink, "up", "../../..");
        let mut upper = tar::Builder::new(Vec::new());
        append_file(&mut upper, "escape/file", b"a", 0o644);
        append_file(&mut upper, "up/other", b"b", 0o644);
        let layers = [
            layer_from(work.path(), "lower.tar", lower),
            layer_from(work.path(), "upper.tar", upper),
        ];

        let rootfs = work.path().join("rootfs");
        unpack_layers(&layers, &rootfs).unwrap();
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            0,
            "a write left the root"
        );
        assert_eq!(
            fs::read(rootfs.join(outside.strip_prefix("/").unwrap()).join("file")).unwrap(),
            b"a"
        );
        assert_eq!(fs::read(rootfs.join("other")).unwrap(), b"b");
    }

    #[test]
    fn unpack_rejects_hard_link_outside_root() {
        let work = tempfile::tempdir().unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        append_link(&mut builder, EntryType::Link, "passwd", "../../etc/passwd");
        let layer = layer_from(work.path(), "layer.tar", builder);

        let err = unpack_layers(&[layer], &work.path().join("rootfs")).unwrap_err();
        assert!(matches!(err, OciError::UnsafePath { .. }), "{err}");
    }

    #[test]
    fn unpack_hard_link_shares_inode() {
        let work = tempfile::tempdir().unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        append_file(&mut builder, "bin/a", b"data", 0o755);
        append_link(&mut builder, EntryType::Link, "bin/b", "/bin/a");
        let layer = layer_from(work.path(), "layer.tar", builder);

        let rootfs = work.path().join("rootfs");
        unpack_layers(&[layer], &rootfs).unwrap();
        let a = fs::metadata(rootfs.join("bin/a")).unwrap();
        let b = fs::metadata(rootfs.join("bin/b")).unwrap();
        assert_eq!(a.ino(), b.ino());
    }

    #[test]
    fn unpack_opaque_whiteout_keeps_same_layer_entries() {
        let work = tempfile::tempdir().unwrap();
        let mut lower = tar::Builder::new(Vec::new());
        append_file(&mut lower, "dir/old", b"old", 0o644);
        append_file(&mut lower, "gone", b"x", 0o644);
        let mut upper = tar::Builder::new(Vec::new());
        append_file(&mut upper, "dir/new", b"new", 0o644);
        append_file(&mut upper, "dir/.wh..wh..opq", b"", 0o644);
        append_file(&mut upper, ".wh.gone", b"", 0o644);
        let layers = [
            layer_from(work.path(), "lower.tar", lower),
            layer_from(work.path(), "upper.tar", upper),
        ];

        let rootfs = work.path().join("rootfs");
        unpack_layers(&layers, &rootfs).unwrap();
        assert!(!rootfs.join("dir/old").exists());
        assert_eq!(fs::read(rootfs.join("dir/new")).unwrap(), b"new");
        assert!(!rootfs.join("gone").exists());
        assert!(!rootfs.join(".wh.gone").exists());
    }

    #[test]
    fn unpack_rejects_non_empty_destination() {
        let work = tempfile::tempdir().unwrap();
        fs::write(work.path().join("existing"), b"").unwrap();
        let err = unpack_layers(&[], work.path()).unwrap_err();
        assert!(matches!(err, OciError::DestinationNotEmpty { .. }), "{err}");
    }

    #[test]
    fn normalize_entry_path_strips_root_and_dot() {
        assert_eq!(
            normalize_entry_path(Path::new("/./usr//bin/")).unwrap(),
            Path::new("usr/bin")
        );
        assert!(normalize_entry_path(Path::new("usr/../../x")).is_err());
    }
}
