//! `envd build-copy`: the guest side of a template build's COPY step.
//!
//! The template builder uploads a plain tar of the copied files and runs this subcommand
//! as root in the build VM. It extracts the archive into the destination with Docker's COPY
//! semantics: everything is owned by 0:0 unless `--owner` names another owner, modes come
//! from the archive unless `--mode` overrides them, and symlinks and hard links are kept.
//!
//! The archive is read twice. The first pass checks every entry name (relative, without
//! `..`) and the `--file` rules, so a rejected archive leaves the destination untouched.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

const USAGE: &str = "usage: envd build-copy --archive TAR --dest PATH [--owner SPEC] [--mode OCTAL] [--file] [--remove-archive]\n\
  --archive TAR   plain tar whose entry names are relative paths\n\
  --dest PATH     absolute destination directory (or file path with --file), created when missing\n\
  --owner SPEC    owner of every copied file and created directory: user, user:group, uid or uid:gid\n\
                  (default 0:0); a user without a group gets the user's primary group\n\
  --mode OCTAL    permission bits of every copied file and directory (default: the archive's)\n\
  --file          the archive contains one regular file, written at PATH, or inside PATH when PATH\n\
                  is an existing directory\n\
  --remove-archive  delete TAR afterwards, whether the copy worked or not";

/// Permission bits of the directories that the copy creates and the archive does not list.
const CREATED_DIR_MODE: u32 = 0o755;

/// Failure of a copy, with the path or value involved.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("invalid arguments: {0}")]
    Usage(String),
    #[error("destination {0} is not an absolute path")]
    RelativeDest(PathBuf),
    #[error("invalid owner {0:?}: expected user, user:group, uid or uid:gid")]
    InvalidOwner(String),
    #[error("user {name:?} not found in {passwd}")]
    UnknownUser { name: String, passwd: PathBuf },
    #[error("group {name:?} not found in {group}")]
    UnknownGroup { name: String, group: PathBuf },
    #[error("archive entry {0:?} is absolute or contains '..'; entries must be relative paths")]
    UnsafePath(String),
    #[error("archive entry {path:?} has unsupported type {kind}; only files, directories, symlinks and hard links are copied")]
    UnsupportedEntry { path: String, kind: String },
    #[error("archive entry {0:?} lies under a symlink that the same archive created")]
    ThroughSymlink(String),
    #[error("--file expects an archive with exactly one regular file: {0}")]
    NotSingleFile(String),
    #[error("failed to read archive {path}")]
    Archive {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CopyError + 'a {
    move |source| CopyError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Numeric owner of copied files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Arguments of one copy.
#[derive(Debug)]
pub struct CopyOptions {
    pub archive: PathBuf,
    pub dest: PathBuf,
    /// Owner spec as given to `--owner`; `None` means 0:0.
    pub owner: Option<String>,
    /// Permission bits for every copied file and directory; `None` keeps the archive's.
    pub mode: Option<u32>,
    /// The archive contains one regular file, written at `dest` (or inside it when it is a directory).
    pub single_file: bool,
    /// Root of the file system whose `/etc/passwd` and `/etc/group` resolve `owner`.
    pub root: PathBuf,
    /// Delete the archive afterwards, whether the copy worked or not. Template builds stage
    /// archives in the guest's `/tmp`, which the template's snapshot would otherwise keep.
    pub remove_archive: bool,
}

/// Counts of what a copy wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopySummary {
    pub files: u64,
    pub bytes: u64,
    pub directories: u64,
    pub links: u64,
}

/// Runs the subcommand with the arguments after `build-copy` and returns the exit code.
pub fn run(args: impl Iterator<Item = String>) -> i32 {
    let options = match parse_args(args) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return 0;
        }
        Err(err) => {
            eprintln!("envd build-copy: {err}\n{USAGE}");
            return 2;
        }
    };
    let copied = copy_archive(&options);
    if options.remove_archive {
        if let Err(err) = std::fs::remove_file(&options.archive) {
            eprintln!("envd build-copy: failed to remove {}: {err}", options.archive.display());
        }
    }
    match copied {
        Ok(summary) => {
            println!(
                "copied {} files ({} bytes), {} directories and {} links to {}",
                summary.files,
                summary.bytes,
                summary.directories,
                summary.links,
                options.dest.display()
            );
            0
        }
        Err(err) => {
            eprintln!("envd build-copy: {}", error_chain(&err));
            1
        }
    }
}

/// Runs `envd build-sync`: flushes every file system's dirty data to disk, so that a
/// template build can snapshot or stop the VM without losing copied files.
pub fn run_sync() -> i32 {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    0
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Parses the arguments; `Ok(None)` means `--help`.
fn parse_args(args: impl Iterator<Item = String>) -> Result<Option<CopyOptions>, CopyError> {
    let mut archive = None;
    let mut dest = None;
    let mut owner = None;
    let mut mode = None;
    let mut single_file = false;
    let mut remove_archive = false;
    // Hidden: tests point the passwd and group lookups at a temporary root.
    let mut root = PathBuf::from("/");

    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| CopyError::Usage(format!("{name} needs a value")));
        match arg.as_str() {
            "--archive" => archive = Some(PathBuf::from(value("--archive")?)),
            "--dest" => dest = Some(PathBuf::from(value("--dest")?)),
            "--owner" => owner = Some(value("--owner")?),
            "--mode" => {
                let text = value("--mode")?;
                let bits = u32::from_str_radix(&text, 8)
                    .ok()
                    .filter(|bits| *bits <= 0o7777)
                    .ok_or_else(|| CopyError::Usage(format!("invalid octal mode {text:?}; expected e.g. 755 or 0644")))?;
                mode = Some(bits);
            }
            "--file" => single_file = true,
            "--remove-archive" => remove_archive = true,
            "--root" => root = PathBuf::from(value("--root")?),
            "--help" | "-h" => return Ok(None),
            other => return Err(CopyError::Usage(format!("unknown argument {other:?}"))),
        }
    }
    Ok(Some(CopyOptions {
        archive: archive.ok_or_else(|| CopyError::Usage("missing --archive".into()))?,
        dest: dest.ok_or_else(|| CopyError::Usage("missing --dest".into()))?,
        owner,
        mode,
        single_file,
        root,
        remove_archive,
    }))
}

/// Extracts `options.archive` into `options.dest`.
pub fn copy_archive(options: &CopyOptions) -> Result<CopySummary, CopyError> {
    if !options.dest.is_absolute() {
        return Err(CopyError::RelativeDest(options.dest.clone()));
    }
    let owner = match &options.owner {
        Some(spec) => resolve_owner(spec, &options.root)?,
        None => Owner { uid: 0, gid: 0 },
    };

    let checked = check_archive(&options.archive, options.single_file)?;
    let mut copier = Copier {
        dest: options.dest.clone(),
        owner,
        mode: options.mode,
        summary: CopySummary::default(),
        created_symlinks: HashSet::new(),
        directories: Vec::new(),
    };
    if options.single_file {
        let name = checked.single_file_name.expect("check_archive returns the name of the only file");
        copier.copy_single_file(&options.archive, &name)?;
    } else {
        copier.create_dirs(&options.dest)?;
        copier.extract(&options.archive)?;
    }
    copier.finish_directories()?;
    Ok(copier.summary)
}

/// Result of the first pass over the archive.
struct CheckedArchive {
    /// File name of the only entry, in `--file` mode.
    single_file_name: Option<String>,
}

fn open_archive(path: &Path) -> Result<tar::Archive<fs::File>, CopyError> {
    let file = fs::File::open(path).map_err(|source| CopyError::Archive {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(tar::Archive::new(file))
}

fn check_archive(path: &Path, single_file: bool) -> Result<CheckedArchive, CopyError> {
    let archive_error = |source| CopyError::Archive {
        path: path.to_path_buf(),
        source,
    };
    let mut archive = open_archive(path)?;
    let mut entries = 0usize;
    let mut single_file_name = None;
    for entry in archive.entries_with_seek().map_err(archive_error)? {
        let entry = entry.map_err(archive_error)?;
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            continue;
        }
        let raw_name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let relative = relative_path(&raw_name)?;
        if kind.is_hard_link() {
            let target = entry.link_name_bytes().unwrap_or_default();
            relative_path(&String::from_utf8_lossy(&target))?;
        }
        entries += 1;
        if single_file {
            if entries > 1 {
                return Err(CopyError::NotSingleFile("the archive contains more than one entry".into()));
            }
            if !is_regular(kind) {
                return Err(CopyError::NotSingleFile(format!("entry {raw_name:?} is not a regular file")));
            }
            let name = relative
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .ok_or_else(|| CopyError::NotSingleFile(format!("entry {raw_name:?} has no file name")))?;
            single_file_name = Some(name);
        }
    }
    if single_file && single_file_name.is_none() {
        return Err(CopyError::NotSingleFile("the archive is empty".into()));
    }
    Ok(CheckedArchive { single_file_name })
}

fn is_regular(kind: tar::EntryType) -> bool {
    matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous)
}

/// Turns an entry name into a relative path without `.` components, rejecting absolute
/// names and `..`. The archive's root (`.` or `./`) becomes the empty path.
fn relative_path(name: &str) -> Result<PathBuf, CopyError> {
    let mut relative = PathBuf::new();
    for component in Path::new(name).components() {
        match component {
            Component::Normal(part) => relative.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::ParentDir | Component::Prefix(_) => {
                return Err(CopyError::UnsafePath(name.to_string()))
            }
        }
    }
    Ok(relative)
}

/// State of the second pass, which writes the files.
struct Copier {
    dest: PathBuf,
    owner: Owner,
    mode: Option<u32>,
    summary: CopySummary,
    /// Relative paths of the symlinks this copy created: later entries must not lie under them.
    created_symlinks: HashSet<PathBuf>,
    /// Copied directories with their mode and modification time, applied after all entries
    /// because a read-only mode would prevent writing their children.
    directories: Vec<(PathBuf, u32, Option<SystemTime>)>,
}

impl Copier {
    fn extract(&mut self, archive_path: &Path) -> Result<(), CopyError> {
        let archive_error = |source| CopyError::Archive {
            path: archive_path.to_path_buf(),
            source,
        };
        let mut archive = open_archive(archive_path)?;
        for entry in archive.entries().map_err(archive_error)? {
            let mut entry = entry.map_err(archive_error)?;
            let kind = entry.header().entry_type();
            if kind == tar::EntryType::XGlobalHeader {
                continue;
            }
            let raw_name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let relative = relative_path(&raw_name)?;
            if relative.as_os_str().is_empty() {
                // The archive's root is the destination itself, which keeps its metadata.
                continue;
            }
            self.check_not_under_symlink(&relative, &raw_name)?;
            let target = self.dest.join(&relative);
            if let Some(parent) = target.parent() {
                self.create_dirs(parent)?;
            }

            let archive_mode = entry.header().mode().map_err(archive_error)? & 0o7777;
            let mode = self.mode.unwrap_or(archive_mode);
            let mtime = entry.header().mtime().ok().map(|seconds| SystemTime::UNIX_EPOCH + Duration::from_secs(seconds));
            match kind {
                tar::EntryType::Directory => self.copy_directory(&target, mode, mtime)?,
                kind if is_regular(kind) => self.write_file(&target, &mut entry, mode, mtime)?,
                tar::EntryType::Symlink => {
                    let link = entry.link_name_bytes().unwrap_or_default();
                    let link = PathBuf::from(String::from_utf8_lossy(&link).into_owned());
                    self.create_symlink(&target, &link)?;
                    self.created_symlinks.insert(relative);
                }
                tar::EntryType::Link => {
                    let link = entry.link_name_bytes().unwrap_or_default();
                    let link_name = String::from_utf8_lossy(&link).into_owned();
                    let source_relative = relative_path(&link_name)?;
                    self.check_not_under_symlink(&source_relative, &link_name)?;
                    self.create_hard_link(&self.dest.join(source_relative), &target)?;
                }
                other => {
                    return Err(CopyError::UnsupportedEntry {
                        path: raw_name,
                        kind: format!("{other:?}"),
                    })
                }
            }
        }
        Ok(())
    }

    fn copy_single_file(&mut self, archive_path: &Path, name: &str) -> Result<(), CopyError> {
        let archive_error = |source| CopyError::Archive {
            path: archive_path.to_path_buf(),
            source,
        };
        let target = if self.dest.is_dir() {
            self.dest.join(name)
        } else {
            self.dest.clone()
        };
        if let Some(parent) = target.parent() {
            self.create_dirs(parent)?;
        }
        let mut archive = open_archive(archive_path)?;
        for entry in archive.entries().map_err(archive_error)? {
            let mut entry = entry.map_err(archive_error)?;
            if entry.header().entry_type() == tar::EntryType::XGlobalHeader {
                continue;
            }
            let archive_mode = entry.header().mode().map_err(archive_error)? & 0o7777;
            let mode = self.mode.unwrap_or(archive_mode);
            let mtime = entry.header().mtime().ok().map(|seconds| SystemTime::UNIX_EPOCH + Duration::from_secs(seconds));
            return self.write_file(&target, &mut entry, mode, mtime);
        }
        Err(CopyError::NotSingleFile("the archive is empty".into()))
    }

    fn check_not_under_symlink(&self, relative: &Path, raw_name: &str) -> Result<(), CopyError> {
        let under_symlink = relative
            .ancestors()
            .skip(1)
            .any(|ancestor| self.created_symlinks.contains(ancestor));
        if under_symlink {
            return Err(CopyError::ThroughSymlink(raw_name.to_string()));
        }
        Ok(())
    }

    /// Creates `path` and its missing parents with mode 0755, owned by the copy's owner.
    fn create_dirs(&mut self, path: &Path) -> Result<(), CopyError> {
        let mut missing = Vec::new();
        for ancestor in path.ancestors() {
            if ancestor.is_dir() {
                break;
            }
            missing.push(ancestor);
        }
        for dir in missing.into_iter().rev() {
            remove_non_directory(dir)?;
            fs::DirBuilder::new()
                .mode(CREATED_DIR_MODE)
                .create(dir)
                .map_err(io_error("create directory", dir))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(CREATED_DIR_MODE))
                .map_err(io_error("set the mode of", dir))?;
            self.chown(dir)?;
        }
        Ok(())
    }

    fn copy_directory(&mut self, target: &Path, mode: u32, mtime: Option<SystemTime>) -> Result<(), CopyError> {
        if !target.is_dir() {
            remove_non_directory(target)?;
            // Owner-writable until `finish_directories` sets the final mode.
            fs::DirBuilder::new()
                .mode(0o700)
                .create(target)
                .map_err(io_error("create directory", target))?;
        }
        self.chown(target)?;
        self.directories.push((target.to_path_buf(), mode, mtime));
        self.summary.directories += 1;
        Ok(())
    }

    fn write_file(
        &mut self,
        target: &Path,
        content: &mut impl io::Read,
        mode: u32,
        mtime: Option<SystemTime>,
    ) -> Result<(), CopyError> {
        if target.is_dir() && !is_symlink(target) {
            return Err(CopyError::Io {
                action: "write file",
                path: target.to_path_buf(),
                source: io::Error::new(io::ErrorKind::IsADirectory, "a directory exists at this path"),
            });
        }
        // A new inode, so that an existing symlink or hard link at the path is replaced
        // rather than written through.
        remove_non_directory(target)?;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(target)
            .map_err(io_error("create file", target))?;
        let bytes = io::copy(content, &mut file).map_err(io_error("write file", target))?;
        // The owner first, because chown clears the setuid and setgid bits.
        std::os::unix::fs::fchown(&file, Some(self.owner.uid), Some(self.owner.gid))
            .map_err(io_error("change the owner of", target))?;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_error("set the mode of", target))?;
        if let Some(mtime) = mtime {
            file.set_modified(mtime).map_err(io_error("set the modification time of", target))?;
        }
        self.summary.files += 1;
        self.summary.bytes += bytes;
        Ok(())
    }

    fn create_symlink(&mut self, target: &Path, link: &Path) -> Result<(), CopyError> {
        if target.is_dir() && !is_symlink(target) {
            return Err(CopyError::Io {
                action: "create symlink",
                path: target.to_path_buf(),
                source: io::Error::new(io::ErrorKind::IsADirectory, "a directory exists at this path"),
            });
        }
        remove_non_directory(target)?;
        std::os::unix::fs::symlink(link, target).map_err(io_error("create symlink", target))?;
        self.chown(target)?;
        self.summary.links += 1;
        Ok(())
    }

    fn create_hard_link(&mut self, source: &Path, target: &Path) -> Result<(), CopyError> {
        remove_non_directory(target)?;
        fs::hard_link(source, target).map_err(io_error("create hard link", target))?;
        self.summary.links += 1;
        Ok(())
    }

    fn chown(&self, path: &Path) -> Result<(), CopyError> {
        std::os::unix::fs::lchown(path, Some(self.owner.uid), Some(self.owner.gid))
            .map_err(io_error("change the owner of", path))
    }

    /// Applies the modes and times of copied directories in reverse archive order. Archives
    /// list a directory before its children, so each child is finished before its parent.
    fn finish_directories(&mut self) -> Result<(), CopyError> {
        for (dir, mode, mtime) in self.directories.iter().rev() {
            fs::set_permissions(dir, fs::Permissions::from_mode(*mode)).map_err(io_error("set the mode of", dir))?;
            if let Some(mtime) = mtime {
                let handle = fs::File::open(dir).map_err(io_error("open directory", dir))?;
                handle
                    .set_modified(*mtime)
                    .map_err(io_error("set the modification time of", dir))?;
            }
        }
        Ok(())
    }
}

fn is_symlink(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|metadata| metadata.file_type().is_symlink())
}

/// Removes a file or symlink at `path`; a missing path or a directory is left alone.
fn remove_non_directory(path: &Path) -> Result<(), CopyError> {
    match fs::symlink_metadata(path) {
        Ok(metadata) if !metadata.is_dir() => fs::remove_file(path).map_err(io_error("remove", path)),
        _ => Ok(()),
    }
}

/// Resolves an owner spec against `root/etc/passwd` and `root/etc/group`.
pub fn resolve_owner(spec: &str, root: &Path) -> Result<Owner, CopyError> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    if user_part.is_empty() || group_part.is_some_and(str::is_empty) || group_part.is_some_and(|group| group.contains(':')) {
        return Err(CopyError::InvalidOwner(spec.to_string()));
    }

    let passwd_path = root.join("etc/passwd");
    let passwd = fs::read_to_string(&passwd_path).unwrap_or_default();
    let accounts = parse_id_file(&passwd, 4);
    let (uid, primary_gid) = match user_part.parse::<u32>() {
        // A numeric uid without an account uses the same number as its group.
        Ok(uid) => {
            let gid = accounts.iter().find(|account| account.1 == uid).map(|account| account.2).unwrap_or(uid);
            (uid, gid)
        }
        Err(_) => accounts
            .iter()
            .find(|account| account.0 == user_part)
            .map(|account| (account.1, account.2))
            .ok_or_else(|| CopyError::UnknownUser {
                name: user_part.to_string(),
                passwd: passwd_path.clone(),
            })?,
    };

    let gid = match group_part {
        None => primary_gid,
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let group_path = root.join("etc/group");
                let groups = parse_id_file(&fs::read_to_string(&group_path).unwrap_or_default(), 3);
                groups
                    .iter()
                    .find(|entry| entry.0 == group)
                    .map(|entry| entry.1)
                    .ok_or_else(|| CopyError::UnknownGroup {
                        name: group.to_string(),
                        group: group_path,
                    })?
            }
        },
    };
    Ok(Owner { uid, gid })
}

/// Parses `name:x:id[:gid]:...` lines into (name, id, gid); for `/etc/group`, where the
/// fourth field is the member list, the gid slot repeats the id.
fn parse_id_file(text: &str, min_fields: usize) -> Vec<(String, u32, u32)> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < min_fields {
                return None;
            }
            let id = fields[2].parse().ok()?;
            let gid = if min_fields >= 4 { fields[3].parse().ok()? } else { id };
            Some((fields[0].to_string(), id, gid))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\napp:x:1001:50::/srv/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app\nuser:x:1000:\ndocker:x:999:user\n";

    /// A temporary directory with a fake root (passwd, group), a destination and archives.
    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir_all(dir.path().join("root/etc")).unwrap();
            fs::write(dir.path().join("root/etc/passwd"), PASSWD).unwrap();
            fs::write(dir.path().join("root/etc/group"), GROUP).unwrap();
            Self { dir }
        }

        fn root(&self) -> PathBuf {
            self.dir.path().join("root")
        }

        fn path(&self, relative: &str) -> PathBuf {
            self.dir.path().join(relative)
        }

        /// Writes an archive built by `build` and returns its path.
        fn archive(&self, name: &str, build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> PathBuf {
            let mut builder = tar::Builder::new(Vec::new());
            build(&mut builder);
            let bytes = builder.into_inner().unwrap();
            let path = self.path(name);
            fs::write(&path, bytes).unwrap();
            path
        }

        fn options(&self, archive: PathBuf, dest: &str) -> CopyOptions {
            CopyOptions {
                archive,
                dest: self.path(dest),
                owner: None,
                remove_archive: false,
                mode: None,
                single_file: false,
                root: self.root(),
            }
        }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_mtime(1_700_000_000);
        header.set_uid(4242);
        header.set_gid(4242);
        header
    }

    fn add_file(builder: &mut tar::Builder<Vec<u8>>, name: &str, mode: u32, content: &[u8]) {
        let mut header = header(tar::EntryType::Regular, mode, content.len() as u64);
        builder.append_data(&mut header, name, content).unwrap();
    }

    fn add_dir(builder: &mut tar::Builder<Vec<u8>>, name: &str, mode: u32) {
        let mut header = header(tar::EntryType::Directory, mode, 0);
        builder.append_data(&mut header, name, io::empty()).unwrap();
    }

    fn add_link(builder: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, name: &str, target: &str) {
        let mut header = header(kind, 0o777, 0);
        builder.append_link(&mut header, name, target).unwrap();
    }

    /// Writes a raw ustar header with `name`, bypassing the tar crate's own name checks.
    fn add_raw_file(builder: &mut tar::Builder<Vec<u8>>, name: &str, content: &[u8]) {
        let mut header = header(tar::EntryType::Regular, 0o644, content.len() as u64);
        let bytes = header.as_old_mut().name.as_mut_slice();
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        header.set_cksum();
        builder.append(&header, content).unwrap();
    }

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    fn owner_of(path: &Path) -> (u32, u32) {
        let metadata = fs::symlink_metadata(path).unwrap();
        (metadata.uid(), metadata.gid())
    }

    #[test]
    fn owner_spec_forms_resolve() {
        let fixture = Fixture::new();
        let root = fixture.root();
        assert_eq!(resolve_owner("user", &root).unwrap(), Owner { uid: 1000, gid: 1000 });
        assert_eq!(resolve_owner("app", &root).unwrap(), Owner { uid: 1001, gid: 50 });
        assert_eq!(resolve_owner("user:docker", &root).unwrap(), Owner { uid: 1000, gid: 999 });
        assert_eq!(resolve_owner("1001", &root).unwrap(), Owner { uid: 1001, gid: 50 });
        assert_eq!(resolve_owner("2000", &root).unwrap(), Owner { uid: 2000, gid: 2000 });
        assert_eq!(resolve_owner("2000:7", &root).unwrap(), Owner { uid: 2000, gid: 7 });
        assert_eq!(resolve_owner("app:user", &root).unwrap(), Owner { uid: 1001, gid: 1000 });
    }

    #[test]
    fn owner_spec_errors_name_value() {
        let fixture = Fixture::new();
        let root = fixture.root();
        let unknown_user = resolve_owner("nobody", &root).unwrap_err().to_string();
        assert!(unknown_user.contains("\"nobody\""), "{unknown_user}");
        let unknown_group = resolve_owner("user:wheel", &root).unwrap_err().to_string();
        assert!(unknown_group.contains("\"wheel\""), "{unknown_group}");
        assert!(matches!(resolve_owner(":1", &root), Err(CopyError::InvalidOwner(_))));
        assert!(matches!(resolve_owner("1:", &root), Err(CopyError::InvalidOwner(_))));
        assert!(matches!(resolve_owner("1:2:3", &root), Err(CopyError::InvalidOwner(_))));
    }

    #[test]
    fn relative_path_rejects_escapes() {
        assert_eq!(relative_path("./a/./b").unwrap(), PathBuf::from("a/b"));
        assert_eq!(relative_path("./").unwrap(), PathBuf::new());
        assert!(matches!(relative_path("/etc/passwd"), Err(CopyError::UnsafePath(_))));
        assert!(matches!(relative_path("a/../../b"), Err(CopyError::UnsafePath(_))));
    }

    /// Needs root: the copy changes owners.
    #[test]
    fn extract_tree_as_root() {
        let fixture = Fixture::new();
        let archive = fixture.archive("tree.tar", |builder| {
            add_dir(builder, "./", 0o700);
            add_dir(builder, "bin", 0o750);
            add_file(builder, "bin/tool", 0o4755, b"#!/bin/sh\n");
            add_file(builder, "deep/nested/data.txt", 0o640, b"hello");
            add_dir(builder, "readonly", 0o555);
            add_file(builder, "readonly/inner", 0o444, b"x");
            add_link(builder, tar::EntryType::Symlink, "bin/link", "tool");
            add_link(builder, tar::EntryType::Link, "hard", "deep/nested/data.txt");
        });
        let options = fixture.options(archive, "dest/sub");
        let summary = copy_archive(&options).unwrap();

        let dest = fixture.path("dest/sub");
        assert_eq!(summary.files, 3);
        assert_eq!(summary.bytes, 10 + 5 + 1);
        assert_eq!(summary.directories, 2);
        assert_eq!(summary.links, 2);
        assert_eq!(mode_of(&fixture.path("dest")), 0o755);
        assert_eq!(mode_of(&dest), 0o755, "the archive root keeps the created directory's mode");
        assert_eq!(mode_of(&dest.join("bin")), 0o750);
        assert_eq!(mode_of(&dest.join("bin/tool")), 0o4755);
        assert_eq!(mode_of(&dest.join("deep")), 0o755);
        assert_eq!(mode_of(&dest.join("readonly")), 0o555);
        assert_eq!(fs::read(dest.join("deep/nested/data.txt")).unwrap(), b"hello");
        assert_eq!(fs::read_link(dest.join("bin/link")).unwrap(), PathBuf::from("tool"));
        let hard = fs::metadata(dest.join("hard")).unwrap();
        assert_eq!(hard.ino(), fs::metadata(dest.join("deep/nested/data.txt")).unwrap().ino());
        assert_eq!(owner_of(&dest.join("bin/tool")), (0, 0), "archive uid 4242 is not kept");
        assert_eq!(owner_of(&dest.join("bin/link")), (0, 0));
        let mtime = fs::metadata(dest.join("bin")).unwrap().mtime();
        assert_eq!(mtime, 1_700_000_000);
    }

    /// Needs root: the copy changes owners.
    #[test]
    fn owner_and_mode_apply_as_root() {
        let fixture = Fixture::new();
        let archive = fixture.archive("tree.tar", |builder| {
            add_dir(builder, "conf", 0o700);
            add_file(builder, "conf/app.toml", 0o600, b"a = 1\n");
            add_file(builder, "implicit/file", 0o600, b"");
            add_link(builder, tar::EntryType::Symlink, "current", "conf");
        });
        let mut options = fixture.options(archive, "srv/app");
        options.owner = Some("app".into());
        options.mode = Some(0o640);
        copy_archive(&options).unwrap();

        let dest = fixture.path("srv/app");
        assert_eq!(owner_of(&fixture.path("srv")), (1001, 50), "created parents get the owner");
        assert_eq!(owner_of(&dest), (1001, 50));
        assert_eq!(owner_of(&dest.join("conf")), (1001, 50));
        assert_eq!(owner_of(&dest.join("conf/app.toml")), (1001, 50));
        assert_eq!(owner_of(&dest.join("implicit")), (1001, 50));
        assert_eq!(owner_of(&dest.join("current")), (1001, 50));
        assert_eq!(mode_of(&dest.join("conf")), 0o640);
        assert_eq!(mode_of(&dest.join("conf/app.toml")), 0o640);
        assert_eq!(mode_of(&dest.join("implicit")), 0o755, "directories the archive does not list get 0755");
    }

    #[test]
    fn extract_replaces_existing_files() {
        let fixture = Fixture::new();
        let dest = fixture.path("dest");
        fs::create_dir_all(&dest).unwrap();
        fs::write(fixture.path("outside"), "keep").unwrap();
        std::os::unix::fs::symlink(fixture.path("outside"), dest.join("file")).unwrap();
        let archive = fixture.archive("one.tar", |builder| add_file(builder, "file", 0o644, b"new"));
        copy_archive(&fixture.options(archive, "dest")).unwrap();

        assert_eq!(fs::read(dest.join("file")).unwrap(), b"new");
        assert!(!is_symlink(&dest.join("file")));
        assert_eq!(fs::read(fixture.path("outside")).unwrap(), b"keep", "the old symlink's target is not written");
    }

    #[test]
    fn unsafe_entry_leaves_dest_untouched() {
        let fixture = Fixture::new();
        let archive = fixture.archive("bad.tar", |builder| {
            add_file(builder, "good", 0o644, b"1");
            add_raw_file(builder, "../escape", b"2");
        });
        let err = copy_archive(&fixture.options(archive, "dest")).unwrap_err();
        assert!(matches!(err, CopyError::UnsafePath(ref name) if name == "../escape"), "{err}");
        assert!(!fixture.path("dest").exists());
        assert!(!fixture.path("escape").exists());

        let absolute = fixture.archive("abs.tar", |builder| add_raw_file(builder, "/abs", b"3"));
        let err = copy_archive(&fixture.options(absolute, "dest")).unwrap_err();
        assert!(matches!(err, CopyError::UnsafePath(_)), "{err}");
    }

    #[test]
    fn hard_link_outside_rejected() {
        let fixture = Fixture::new();
        let archive = fixture.archive("link.tar", |builder| {
            let mut header = header(tar::EntryType::Link, 0o644, 0);
            header.set_path("inside").unwrap();
            let name = b"../../etc/passwd";
            header.as_old_mut().linkname[..name.len()].copy_from_slice(name);
            header.set_cksum();
            builder.append(&header, io::empty()).unwrap();
        });
        let err = copy_archive(&fixture.options(archive, "dest")).unwrap_err();
        assert!(matches!(err, CopyError::UnsafePath(_)), "{err}");
    }

    #[test]
    fn entry_under_created_symlink_rejected() {
        let fixture = Fixture::new();
        fs::create_dir(fixture.path("elsewhere")).unwrap();
        let target = fixture.path("elsewhere").display().to_string();
        let archive = fixture.archive("sym.tar", |builder| {
            add_link(builder, tar::EntryType::Symlink, "out", &target);
            add_raw_file(builder, "out/planted", b"x");
        });
        let err = copy_archive(&fixture.options(archive, "dest")).unwrap_err();
        assert!(matches!(err, CopyError::ThroughSymlink(_)), "{err}");
        assert!(!fixture.path("elsewhere/planted").exists());
    }

    #[test]
    fn single_file_to_path_and_into_dir() {
        let fixture = Fixture::new();
        let archive = fixture.archive("file.tar", |builder| add_file(builder, "sub/config.json", 0o600, b"{}"));

        let mut options = fixture.options(archive.clone(), "out/renamed.json");
        options.single_file = true;
        let summary = copy_archive(&options).unwrap();
        assert_eq!(summary.files, 1);
        assert_eq!(fs::read(fixture.path("out/renamed.json")).unwrap(), b"{}");
        assert_eq!(mode_of(&fixture.path("out/renamed.json")), 0o600);

        fs::create_dir(fixture.path("dir")).unwrap();
        let mut options = fixture.options(archive, "dir");
        options.single_file = true;
        options.mode = Some(0o755);
        copy_archive(&options).unwrap();
        assert_eq!(fs::read(fixture.path("dir/config.json")).unwrap(), b"{}");
        assert_eq!(mode_of(&fixture.path("dir/config.json")), 0o755);
    }

    #[test]
    fn single_file_rejects_other_archives() {
        let fixture = Fixture::new();
        let two = fixture.archive("two.tar", |builder| {
            add_file(builder, "a", 0o644, b"a");
            add_file(builder, "b", 0o644, b"b");
        });
        let mut options = fixture.options(two, "out");
        options.single_file = true;
        assert!(matches!(copy_archive(&options), Err(CopyError::NotSingleFile(_))));
        assert!(!fixture.path("out").exists());

        let dir = fixture.archive("dir.tar", |builder| add_dir(builder, "d", 0o755));
        let mut options = fixture.options(dir, "out");
        options.single_file = true;
        assert!(matches!(copy_archive(&options), Err(CopyError::NotSingleFile(_))));

        let empty = fixture.archive("empty.tar", |_| {});
        let mut options = fixture.options(empty, "out");
        options.single_file = true;
        assert!(matches!(copy_archive(&options), Err(CopyError::NotSingleFile(_))));
    }

    #[test]
    fn relative_dest_rejected() {
        let fixture = Fixture::new();
        let archive = fixture.archive("one.tar", |builder| add_file(builder, "f", 0o644, b""));
        let mut options = fixture.options(archive, "dest");
        options.dest = PathBuf::from("relative/dest");
        assert!(matches!(copy_archive(&options), Err(CopyError::RelativeDest(_))));
    }

    #[test]
    fn parse_args_reads_options() {
        let args = ["--archive", "/a.tar", "--dest", "/d", "--owner", "1:2", "--mode", "0644", "--file", "--root", "/r"];
        let options = parse_args(args.iter().map(|arg| arg.to_string())).unwrap().unwrap();
        assert_eq!(options.archive, PathBuf::from("/a.tar"));
        assert_eq!(options.dest, PathBuf::from("/d"));
        assert_eq!(options.owner.as_deref(), Some("1:2"));
        assert_eq!(options.mode, Some(0o644));
        assert!(options.single_file);
        assert_eq!(options.root, PathBuf::from("/r"));

        let bad_mode = parse_args(["--archive", "a", "--dest", "/d", "--mode", "999"].iter().map(|arg| arg.to_string()));
        assert!(matches!(bad_mode, Err(CopyError::Usage(_))));
        let missing = parse_args(["--archive", "a"].iter().map(|arg| arg.to_string()));
        assert!(matches!(missing, Err(CopyError::Usage(_))));
    }
}
