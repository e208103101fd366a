//! `EntryInfo` of a path: type, size, mode, owner, time, symlink target and the
//! `user.e2b.*` extended attributes that hold user metadata.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::Metadata;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use hearth_envd_proto::filesystem::{EntryInfo, FileType};
use hearth_envd_proto::Timestamp;

use crate::users::{NameTable, User};

/// Prefix of the extended attributes that carry user metadata of a file.
pub const METADATA_XATTR_PREFIX: &str = "user.e2b.";

/// Returns the entry of `path`. For a symlink, the type, size and mode are those of its
/// target, and `is_symlink` marks the link.
pub fn entry_info(path: &Path, names: &NameTable) -> io::Result<EntryInfo> {
    let link_metadata = std::fs::symlink_metadata(path)?;
    let is_symlink = link_metadata.file_type().is_symlink();
    let (metadata, symlink_target) = if is_symlink {
        let target = std::fs::canonicalize(path)
            .or_else(|_| std::fs::read_link(path))
            .map(|target| target.display().to_string())
            .ok();
        match std::fs::metadata(path) {
            Ok(target_metadata) => (target_metadata, target),
            // A broken link keeps its own metadata and the SYMLINK type.
            Err(_) => (link_metadata.clone(), target),
        }
    } else {
        (link_metadata.clone(), None)
    };

    let file_type = if metadata.is_dir() {
        FileType::Directory
    } else if metadata.file_type().is_symlink() {
        FileType::Symlink
    } else {
        FileType::File
    };
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".to_string());

    Ok(EntryInfo {
        name,
        r#type: file_type as i32,
        path: path.display().to_string(),
        size: metadata.len() as i64,
        mode: metadata.permissions().mode() & 0o777,
        permissions: permissions_string(&metadata),
        owner: names.user_name(metadata.uid()),
        group: names.group_name(metadata.gid()),
        modified_time: Some(Timestamp {
            seconds: metadata.mtime(),
            nanos: metadata.mtime_nsec() as i32,
        }),
        symlink_target,
        metadata: read_metadata(path),
        is_symlink,
    })
}

/// Formats the mode as `ls -l` does for the type and permission bits, for example
/// `drwxr-xr-x`.
fn permissions_string(metadata: &Metadata) -> String {
    let file_type = metadata.file_type();
    let type_char = if file_type.is_dir() {
        'd'
    } else if file_type.is_symlink() {
        'L'
    } else {
        '-'
    };
    let mode = metadata.permissions().mode();
    let mut text = String::with_capacity(10);
    text.push(type_char);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 0o7;
        text.push(if bits & 0o4 != 0 { 'r' } else { '-' });
        text.push(if bits & 0o2 != 0 { 'w' } else { '-' });
        text.push(if bits & 0o1 != 0 { 'x' } else { '-' });
    }
    text
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Reads the `user.e2b.*` extended attributes of `path` (not following symlinks) as a
/// map keyed by the name after the prefix. Filesystems without xattrs give an empty map.
pub fn read_metadata(path: &Path) -> HashMap<String, String> {
    let mut metadata = HashMap::new();
    let Ok(c_path) = c_path(path) else {
        return metadata;
    };
    let mut names = vec![0u8; 4096];
    // SAFETY: `names` is valid for writes of its length and `c_path` is NUL-terminated.
    let length = unsafe { libc::llistxattr(c_path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if length <= 0 {
        return metadata;
    }
    names.truncate(length as usize);
    for raw_name in names.split(|byte| *byte == 0).filter(|name| !name.is_empty()) {
        let Ok(name) = std::str::from_utf8(raw_name) else {
            continue;
        };
        let Some(key) = name.strip_prefix(METADATA_XATTR_PREFIX) else {
            continue;
        };
        let Ok(c_name) = CString::new(raw_name) else {
            continue;
        };
        let mut value = vec![0u8; 64 * 1024];
        // SAFETY: `value` is valid for writes of its length; both strings are NUL-terminated.
        let size = unsafe {
            libc::lgetxattr(c_path.as_ptr(), c_name.as_ptr(), value.as_mut_ptr().cast(), value.len())
        };
        if size >= 0 {
            value.truncate(size as usize);
            metadata.insert(key.to_string(), String::from_utf8_lossy(&value).into_owned());
        }
    }
    metadata
}

/// Stores user metadata as `user.e2b.<key>` extended attributes on `path`.
pub fn write_metadata(path: &Path, metadata: &HashMap<String, String>) -> io::Result<()> {
    let c_path = c_path(path)?;
    for (key, value) in metadata {
        let name = CString::new(format!("{METADATA_XATTR_PREFIX}{key}"))
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("metadata key {key:?} contains a NUL byte")))?;
        // SAFETY: both strings are NUL-terminated and `value` is valid for reads of its length.
        let result = unsafe {
            libc::lsetxattr(c_path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0)
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Changes the owner of `path` to `user`, without following symlinks.
pub fn chown_to(path: &Path, user: &User) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))
}

/// Creates `path` and its missing parents, owning each created directory by `user`.
/// Returns whether the final directory was created.
pub fn create_dirs_owned(path: &Path, user: &User) -> io::Result<bool> {
    if path.is_dir() {
        return Ok(false);
    }
    let mut missing = Vec::new();
    let mut current = Some(path);
    while let Some(dir) = current {
        if dir.exists() {
            break;
        }
        missing.push(dir.to_path_buf());
        current = dir.parent();
    }
    for dir in missing.iter().rev() {
        match std::fs::create_dir(dir) {
            Ok(()) => chown_to(dir, user)?,
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(err) => return Err(err),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_info_of_file_and_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data.txt");
        std::fs::write(&file, b"hello").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let names = NameTable::load();

        let entry = entry_info(&file, &names).unwrap();
        assert_eq!(entry.name, "data.txt");
        assert_eq!(entry.r#type(), FileType::File);
        assert_eq!(entry.size, 5);
        assert_eq!(entry.mode, 0o640);
        assert_eq!(entry.permissions, "-rw-r-----");
        assert!(!entry.is_symlink);

        let entry = entry_info(&link, &names).unwrap();
        assert!(entry.is_symlink);
        assert_eq!(entry.r#type(), FileType::File);
        assert_eq!(entry.symlink_target.as_deref(), Some(file.to_str().unwrap()));
    }

    #[test]
    fn entry_info_of_directory() {
        let dir = tempfile::tempdir().unwrap();
        let entry = entry_info(dir.path(), &NameTable::load()).unwrap();
        assert_eq!(entry.r#type(), FileType::Directory);
        assert!(entry.permissions.starts_with('d'));
    }
}
