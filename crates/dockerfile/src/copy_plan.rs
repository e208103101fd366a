//! Resolving COPY and ADD sources in a build context directory into what goes where in the guest.
//!
//! The rules follow Docker (BuildKit):
//! - Sources are relative to the context root; a leading `/` is ignored and `..` may not leave
//!   the context. A source that is a symlink is followed, but only to a target inside the context.
//! - A directory source copies its contents, not the directory itself, into the destination.
//! - The destination is a directory when it ends in `/` (or `.`), when there are several
//!   sources, or when a pattern matches several paths. Several literal sources require the `/`.
//! - A relative destination is resolved against the working directory.
//! - Patterns (`*`, `?`, `[...]`) may match nothing, which copies nothing, as in BuildKit.
//! - Paths excluded by `.dockerignore` are not in the context: a literal source that is
//!   excluded is not found, and excluded files inside a copied directory are skipped.
//! - ADD extracts a local tar archive (plain, gzip, bzip2, xz or zstd) into the destination
//!   directory.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::archive::{self, Compression};
use crate::glob;
use crate::ignore::IgnoreMatcher;
use crate::unix_path;

/// The result of resolving one COPY or ADD: entries in order, each directory before its contents.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CopyPlan {
    pub entries: Vec<CopyEntry>,
}

/// One thing to create in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyEntry {
    /// The source on the host: a file or directory inside the context (symlinks in a source
    /// path resolved), or the link itself for [`EntryKind::Symlink`].
    pub host_path: PathBuf,
    /// Absolute guest path to create; for [`EntryKind::ExtractArchive`], the directory to
    /// extract into.
    pub guest_path: String,
    pub kind: EntryKind,
    /// Set for a single file copied to a destination without a trailing `/`. Docker writes such
    /// a file at `guest_path`, but when `guest_path` already exists as a directory in the guest,
    /// the file goes inside it as `guest_path/file_name`.
    pub into_existing_dir: bool,
    /// The name the file has in the context, for `into_existing_dir`.
    pub file_name: String,
}

/// The kind of a [`CopyEntry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    /// A directory to create, with the mode and ownership of `host_path`.
    Dir,
    /// A symlink to recreate with the same target (read it from `host_path`).
    Symlink,
    /// A tar archive to unpack into `guest_path` (ADD only).
    ExtractArchive(Compression),
}

/// An error while resolving COPY or ADD sources.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("source {path:?} is outside the build context")]
    OutsideContext { path: String },
    #[error("source {path:?} was not found in the build context (it may be excluded by .dockerignore)")]
    NotFound { path: String },
    #[error("destination {dest:?} must be a directory ending in '/' when copying more than one source")]
    DestinationNotDirectory { dest: String },
    #[error("invalid pattern in source {pattern:?}")]
    BadPattern { pattern: String },
    #[error("file name {path:?} in the build context is not valid UTF-8")]
    NonUtf8Name { path: PathBuf },
    #[error("source {path:?} is a special file (socket, FIFO or device), which cannot be copied")]
    SpecialFile { path: PathBuf },
    #[error("failed to read {path:?} in the build context")]
    Io {
        path: PathBuf,
        #[source]
        error: io::Error,
    },
}

/// Resolves a COPY from the context directory. See the module documentation for the rules.
pub fn plan_copy(
    context: &Path,
    sources: &[String],
    dest: &str,
    workdir: &str,
    ignore: &IgnoreMatcher,
) -> Result<CopyPlan, CopyError> {
    Planner::new(context, ignore, false)?.plan(sources, dest, workdir)
}

/// Resolves an ADD from the context directory: as [`plan_copy`], but a source file that is a tar
/// archive becomes an [`EntryKind::ExtractArchive`] entry.
pub fn plan_add(
    context: &Path,
    sources: &[String],
    dest: &str,
    workdir: &str,
    ignore: &IgnoreMatcher,
) -> Result<CopyPlan, CopyError> {
    Planner::new(context, ignore, true)?.plan(sources, dest, workdir)
}

/// A source path matched in the context, relative to its root.
struct Match {
    written: String,
    rel: String,
    /// Whether a pattern produced this path: an excluded or vanished match is then skipped
    /// rather than an error.
    from_pattern: bool,
}

struct Planner<'a> {
    /// The context directory with symlinks resolved.
    root: PathBuf,
    ignore: &'a IgnoreMatcher,
    add: bool,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CopyError + '_ {
    move |error| CopyError::Io { path: path.to_path_buf(), error }
}

fn join_guest(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn utf8_name(path: &Path) -> Result<String, CopyError> {
    let name = path.file_name().unwrap_or(path.as_os_str());
    name.to_str().map(str::to_string).ok_or_else(|| CopyError::NonUtf8Name { path: path.to_path_buf() })
}

impl<'a> Planner<'a> {
    fn new(context: &Path, ignore: &'a IgnoreMatcher, add: bool) -> Result<Self, CopyError> {
        let root = context.canonicalize().map_err(io_error(context))?;
        Ok(Self { root, ignore, add })
    }

    fn plan(&self, sources: &[String], dest: &str, workdir: &str) -> Result<CopyPlan, CopyError> {
        let dest_is_dir = dest.ends_with('/')
            || dest == "."
            || dest == ".."
            || dest.ends_with("/.")
            || dest.ends_with("/..");
        if sources.len() > 1 && !dest_is_dir {
            return Err(CopyError::DestinationNotDirectory { dest: dest.to_string() });
        }
        let guest_dest = unix_path::resolve(workdir, dest);

        let mut matches = Vec::new();
        for source in sources {
            matches.extend(self.expand_source(source)?);
        }
        if matches.is_empty() {
            tracing::debug!(?sources, dest, "COPY patterns matched no files in the build context");
        }
        let into_dir = dest_is_dir || matches.len() > 1;

        let mut plan = CopyPlan::default();
        for source in &matches {
            self.plan_source(source, &guest_dest, into_dir, &mut plan)?;
        }
        Ok(plan)
    }

    /// Turns one source as written into the context paths it names: itself, or the paths a
    /// pattern matches (excluded paths left out).
    fn expand_source(&self, source: &str) -> Result<Vec<Match>, CopyError> {
        let cleaned = unix_path::clean(source);
        if cleaned == ".." || cleaned.starts_with("../") {
            return Err(CopyError::OutsideContext { path: source.to_string() });
        }
        let rel = match cleaned.trim_start_matches('/') {
            "" => ".".to_string(),
            rest => rest.to_string(),
        };

        if !glob::has_meta(&rel) {
            return Ok(vec![Match { written: source.to_string(), rel, from_pattern: false }]);
        }

        let mut candidates = vec![String::from(".")];
        for component in rel.split('/') {
            let mut next = Vec::new();
            for candidate in &candidates {
                if glob::has_meta(component) {
                    next.extend(self.match_in_dir(candidate, component, source)?);
                } else {
                    next.push(rel_join(candidate, component));
                }
            }
            candidates = next;
        }
        Ok(candidates
            .into_iter()
            .filter(|rel| self.root.join(rel).symlink_metadata().is_ok())
            .map(|rel| Match { written: source.to_string(), rel, from_pattern: true })
            .collect())
    }

    fn match_in_dir(&self, dir_rel: &str, component: &str, source: &str) -> Result<Vec<String>, CopyError> {
        let dir = self.root.join(dir_rel);
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(Vec::new());
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_error(&dir))?;
            let name = utf8_name(&entry.path())?;
            match glob::matches(component, &name) {
                Ok(true) => names.push(name),
                Ok(false) => {}
                Err(glob::BadPattern) => return Err(CopyError::BadPattern { pattern: source.to_string() }),
            }
        }
        names.sort();
        Ok(names.into_iter().map(|name| rel_join(dir_rel, &name)).collect())
    }

    fn plan_source(&self, source: &Match, guest_dest: &str, into_dir: bool, plan: &mut CopyPlan) -> Result<(), CopyError> {
        let written_path = self.root.join(&source.rel);
        let not_found = || {
            if source.from_pattern {
                Ok(())
            } else {
                Err(CopyError::NotFound { path: source.written.clone() })
            }
        };
        if written_path.symlink_metadata().is_err() {
            return not_found();
        }
        // The source itself is followed when it is a symlink, but must stay in the context.
        let Ok(host) = written_path.canonicalize() else {
            return not_found();
        };
        let Ok(rel_in_context) = host.strip_prefix(&self.root) else {
            return Err(CopyError::OutsideContext { path: source.written.clone() });
        };
        let rel_in_context = rel_in_context.to_path_buf();
        let metadata = host.metadata().map_err(io_error(&host))?;

        if metadata.is_dir() {
            let mut contents = Vec::new();
            self.walk_dir(&host, guest_dest, &mut contents)?;
            if contents.is_empty() && self.ignore.is_ignored(&rel_in_context) {
                return not_found();
            }
            plan.entries.push(entry(host, guest_dest.to_string(), EntryKind::Dir));
            plan.entries.extend(contents);
            return Ok(());
        }

        if self.ignore.is_ignored(&rel_in_context) || self.ignore.is_ignored(Path::new(&source.rel)) {
            return not_found();
        }
        if !metadata.is_file() {
            return Err(CopyError::SpecialFile { path: host });
        }
        let name = utf8_name(Path::new(&source.rel))?;

        if self.add {
            if let Some(compression) = archive::detect(&host).map_err(io_error(&host))? {
                plan.entries.push(entry(host, guest_dest.to_string(), EntryKind::ExtractArchive(compression)));
                return Ok(());
            }
        }

        if into_dir {
            plan.entries.push(entry(host, join_guest(guest_dest, &name), EntryKind::File));
        } else {
            plan.entries.push(CopyEntry {
                host_path: host,
                guest_path: guest_dest.to_string(),
                kind: EntryKind::File,
                into_existing_dir: true,
                file_name: name,
            });
        }
        Ok(())
    }

    /// Adds the contents of `dir` (not `dir` itself), sorted by name, skipping excluded paths.
    /// An excluded directory is still created when an exception re-includes something in it.
    fn walk_dir(&self, dir: &Path, guest_dir: &str, out: &mut Vec<CopyEntry>) -> Result<(), CopyError> {
        let mut children: Vec<PathBuf> = Vec::new();
        for child in fs::read_dir(dir).map_err(io_error(dir))? {
            children.push(child.map_err(io_error(dir))?.path());
        }
        children.sort();

        for child in children {
            let name = utf8_name(&child)?;
            let guest = join_guest(guest_dir, &name);
            let rel = child.strip_prefix(&self.root).unwrap_or(&child).to_path_buf();
            let ignored = self.ignore.is_ignored(&rel);
            let file_type = child.symlink_metadata().map_err(io_error(&child))?.file_type();

            if file_type.is_dir() {
                let mut contents = Vec::new();
                self.walk_dir(&child, &guest, &mut contents)?;
                if !ignored || !contents.is_empty() {
                    out.push(entry(child, guest, EntryKind::Dir));
                    out.extend(contents);
                }
            } else if ignored {
                continue;
            } else if file_type.is_file() {
                out.push(entry(child, guest, EntryKind::File));
            } else if file_type.is_symlink() {
                out.push(entry(child, guest, EntryKind::Symlink));
            } else {
                // Docker's context transfer drops sockets too; FIFOs and devices are not
                // useful in a template either.
                tracing::warn!(path = %child.display(), "skipping special file in build context");
            }
        }
        Ok(())
    }
}

fn entry(host_path: PathBuf, guest_path: String, kind: EntryKind) -> CopyEntry {
    CopyEntry { host_path, guest_path, kind, into_existing_dir: false, file_name: String::new() }
}

fn rel_join(dir: &str, name: &str) -> String {
    if dir == "." {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::symlink;

    /// Creates a context directory:
    /// `a.txt b.txt app.log dir/{x.txt, skip.log, sub/y.txt, link->x.txt} vendor/{keep.txt, drop.txt}
    /// to_a -> a.txt, escape -> /etc, archive.tar{,.gz,.xz,.bz2,.zst}, plain.gz, fake.zst, empty/`.
    fn context() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("dir/sub")).unwrap();
        fs::create_dir_all(root.join("vendor")).unwrap();
        fs::create_dir_all(root.join("empty")).unwrap();
        for (path, text) in [
            ("a.txt", "a"),
            ("b.txt", "b"),
            ("app.log", "log"),
            ("dir/x.txt", "x"),
            ("dir/skip.log", "log"),
            ("dir/sub/y.txt", "y"),
            ("vendor/keep.txt", "k"),
            ("vendor/drop.txt", "d"),
        ] {
            fs::write(root.join(path), text).unwrap();
        }
        symlink("x.txt", root.join("dir/link")).unwrap();
        symlink("a.txt", root.join("to_a")).unwrap();
        symlink("/etc", root.join("escape")).unwrap();

        let tar_bytes = tar_with_one_file();
        fs::write(root.join("archive.tar"), &tar_bytes).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar_bytes).unwrap();
        fs::write(root.join("archive.tar.gz"), gz.finish().unwrap()).unwrap();
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
        xz.write_all(&tar_bytes).unwrap();
        fs::write(root.join("archive.tar.xz"), xz.finish().unwrap()).unwrap();
        let mut plain_gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        plain_gz.write_all(b"just text, not a tar archive").unwrap();
        fs::write(root.join("plain.gz"), plain_gz.finish().unwrap()).unwrap();
        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        bz.write_all(&tar_bytes).unwrap();
        fs::write(root.join("archive.tar.bz2"), bz.finish().unwrap()).unwrap();
        fs::write(root.join("fake.zst"), [0x28, 0xb5, 0x2f, 0xfd, 0, 0]).unwrap();
        let zst = ruzstd::encoding::compress_to_vec(&tar_bytes[..], ruzstd::encoding::CompressionLevel::Fastest);
        fs::write(root.join("archive.tar.zst"), zst).unwrap();
        dir
    }

    fn tar_with_one_file() -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(5);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, "hello.txt", &b"hello"[..]).unwrap();
        builder.into_inner().unwrap()
    }

    fn sources(items: &[&str]) -> Vec<String> {
        items.iter().map(|item| item.to_string()).collect()
    }

    fn guest_paths(plan: &CopyPlan) -> Vec<(&str, EntryKind)> {
        plan.entries.iter().map(|entry| (entry.guest_path.as_str(), entry.kind)).collect()
    }

    fn no_ignore() -> IgnoreMatcher {
        IgnoreMatcher::parse("")
    }

    #[test]
    fn copy_single_file_to_exact_path() {
        let ctx = context();
        let plan = plan_copy(ctx.path(), &sources(&["a.txt"]), "/opt/renamed", "/", &no_ignore()).unwrap();
        assert_eq!(plan.entries.len(), 1);
        let entry = &plan.entries[0];
        assert_eq!(entry.guest_path, "/opt/renamed");
        assert_eq!(entry.kind, EntryKind::File);
        assert!(entry.into_existing_dir);
        assert_eq!(entry.file_name, "a.txt");
        assert_eq!(entry.host_path, ctx.path().canonicalize().unwrap().join("a.txt"));
    }

    #[test]
    fn copy_single_file_into_directory_dest() {
        let ctx = context();
        for (dest, workdir, expected) in [
            ("/opt/", "/", "/opt/a.txt"),
            (".", "/srv", "/srv/a.txt"),
            ("rel/", "/srv", "/srv/rel/a.txt"),
            ("../up/.", "/srv/app", "/srv/up/a.txt"),
        ] {
            let plan = plan_copy(ctx.path(), &sources(&["/a.txt"]), dest, workdir, &no_ignore()).unwrap();
            assert_eq!(guest_paths(&plan), vec![(expected, EntryKind::File)], "dest {dest:?} in {workdir}");
            assert!(!plan.entries[0].into_existing_dir);
        }
    }

    #[test]
    fn copy_relative_dest_without_slash_uses_workdir() {
        let ctx = context();
        let plan = plan_copy(ctx.path(), &sources(&["a.txt"]), "conf", "/etc/app", &no_ignore()).unwrap();
        assert_eq!(guest_paths(&plan), vec![("/etc/app/conf", EntryKind::File)]);
    }

    #[test]
    fn copy_directory_copies_contents() {
        let ctx = context();
        let ignore = IgnoreMatcher::parse("*.log\ndir/*.log\n");
        let plan = plan_copy(ctx.path(), &sources(&["dir"]), "/app", "/", &ignore).unwrap();
        assert_eq!(
            guest_paths(&plan),
            vec![
                ("/app", EntryKind::Dir),
                ("/app/link", EntryKind::Symlink),
                ("/app/sub", EntryKind::Dir),
                ("/app/sub/y.txt", EntryKind::File),
                ("/app/x.txt", EntryKind::File),
            ]
        );
    }

    #[test]
    fn copy_context_root_skips_ignored() {
        let ctx = context();
        let ignore = IgnoreMatcher::parse("**/*.log\nvendor\n!vendor/keep.txt\narchive*\nplain.gz\nfake.zst\nescape\nto_a\n");
        let plan = plan_copy(ctx.path(), &sources(&["."]), "/app/", "/", &ignore).unwrap();
        let paths: Vec<&str> = plan.entries.iter().map(|entry| entry.guest_path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "/app",
                "/app/a.txt",
                "/app/b.txt",
                "/app/dir",
                "/app/dir/link",
                "/app/dir/sub",
                "/app/dir/sub/y.txt",
                "/app/dir/x.txt",
                "/app/empty",
                "/app/vendor",
                "/app/vendor/keep.txt",
            ]
        );
    }

    #[test]
    fn copy_several_sources_need_directory_dest() {
        let ctx = context();
        let err = plan_copy(ctx.path(), &sources(&["a.txt", "b.txt"]), "/opt", "/", &no_ignore()).unwrap_err();
        assert!(matches!(err, CopyError::DestinationNotDirectory { .. }), "{err}");

        let plan = plan_copy(ctx.path(), &sources(&["a.txt", "b.txt"]), "/opt/", "/", &no_ignore()).unwrap();
        assert_eq!(guest_paths(&plan), vec![("/opt/a.txt", EntryKind::File), ("/opt/b.txt", EntryKind::File)]);
    }

    #[test]
    fn copy_glob_sources() {
        let ctx = context();
        let plan = plan_copy(ctx.path(), &sources(&["*.txt"]), "/opt", "/", &no_ignore()).unwrap();
        assert_eq!(guest_paths(&plan), vec![("/opt/a.txt", EntryKind::File), ("/opt/b.txt", EntryKind::File)]);

        let plan = plan_copy(ctx.path(), &sources(&["[a]?txt"]), "/opt/single", "/", &no_ignore()).unwrap();
        assert_eq!(guest_paths(&plan), vec![("/opt/single", EntryKind::File)]);
        assert!(plan.entries[0].into_existing_dir);

        let plan = plan_copy(ctx.path(), &sources(&["d*/s*/*.txt"]), "/opt/", "/", &no_ignore()).unwrap();
        assert_eq!(guest_paths(&plan), vec![("/opt/y.txt", EntryKind::File)]);

        let plan = plan_copy(ctx.path(), &sources(&["*.none"]), "/opt/", "/", &no_ignore()).unwrap();
        assert!(plan.entries.is_empty());

        let ignore = IgnoreMatcher::parse("b.txt\n");
        let plan = plan_copy(ctx.path(), &sources(&["*.txt"]), "/opt/", "/", &ignore).unwrap();
        assert_eq!(guest_paths(&plan), vec![("/opt/a.txt", EntryKind::File)]);

        let err = plan_copy(ctx.path(), &sources(&["[a"]), "/opt/", "/", &no_ignore()).unwrap_err();
        assert!(matches!(err, CopyError::BadPattern { .. }), "{err}");
    }

    #[test]
    fn copy_outside_context_is_rejected() {
        let ctx = context();
        for source in ["../x", "dir/../../x", "escape", "escape/passwd"] {
            let err = plan_copy(ctx.path(), &sources(&[source]), "/opt/", "/", &no_ignore()).unwrap_err();
            assert!(matches!(err, CopyError::OutsideContext { .. }), "{source}: {err}");
        }
    }

    #[test]
    fn copy_missing_or_ignored_source_is_not_found() {
        let ctx = context();
        let err = plan_copy(ctx.path(), &sources(&["missing.txt"]), "/opt/", "/", &no_ignore()).unwrap_err();
        assert!(matches!(err, CopyError::NotFound { .. }), "{err}");

        let ignore = IgnoreMatcher::parse("a.txt\nempty\n");
        let err = plan_copy(ctx.path(), &sources(&["a.txt"]), "/opt/", "/", &ignore).unwrap_err();
        assert_eq!(err.to_string(), "source \"a.txt\" was not found in the build context (it may be excluded by .dockerignore)");
        let err = plan_copy(ctx.path(), &sources(&["empty"]), "/opt/", "/", &ignore).unwrap_err();
        assert!(matches!(err, CopyError::NotFound { .. }), "{err}");
    }

    #[test]
    fn copy_ignored_directory_with_exception() {
        let ctx = context();
        let ignore = IgnoreMatcher::parse("vendor\n!vendor/keep.txt\n");
        let plan = plan_copy(ctx.path(), &sources(&["vendor"]), "/v", "/", &ignore).unwrap();
        assert_eq!(guest_paths(&plan), vec![("/v", EntryKind::Dir), ("/v/keep.txt", EntryKind::File)]);
    }

    #[test]
    fn copy_symlink_source_is_followed() {
        let ctx = context();
        let plan = plan_copy(ctx.path(), &sources(&["to_a"]), "/opt/", "/", &no_ignore()).unwrap();
        assert_eq!(guest_paths(&plan), vec![("/opt/to_a", EntryKind::File)]);
        assert!(plan.entries[0].host_path.ends_with("a.txt"));
    }

    #[test]
    fn add_marks_tar_archives_for_extraction() {
        let ctx = context();
        let cases = [
            ("archive.tar", EntryKind::ExtractArchive(Compression::None)),
            ("archive.tar.gz", EntryKind::ExtractArchive(Compression::Gzip)),
            ("archive.tar.xz", EntryKind::ExtractArchive(Compression::Xz)),
            ("archive.tar.bz2", EntryKind::ExtractArchive(Compression::Bzip2)),
            ("archive.tar.zst", EntryKind::ExtractArchive(Compression::Zstd)),
        ];
        for (source, kind) in cases {
            let plan = plan_add(ctx.path(), &sources(&[source]), "/opt/x", "/", &no_ignore()).unwrap();
            assert_eq!(guest_paths(&plan), vec![("/opt/x", kind)], "{source}");
        }

        let plan = plan_add(ctx.path(), &sources(&["plain.gz"]), "/opt/", "/", &no_ignore()).unwrap();
        assert_eq!(guest_paths(&plan), vec![("/opt/plain.gz", EntryKind::File)]);

        let plan = plan_add(ctx.path(), &sources(&["a.txt"]), "/opt/", "/", &no_ignore()).unwrap();
        assert_eq!(guest_paths(&plan), vec![("/opt/a.txt", EntryKind::File)]);

        let plan = plan_add(ctx.path(), &sources(&["fake.zst"]), "/opt/", "/", &no_ignore()).unwrap();
        assert_eq!(guest_paths(&plan), vec![("/opt/fake.zst", EntryKind::File)]);
    }

    #[test]
    fn copy_never_extracts_archives() {
        let ctx = context();
        let plan = plan_copy(ctx.path(), &sources(&["archive.tar"]), "/opt/", "/", &no_ignore()).unwrap();
        assert_eq!(guest_paths(&plan), vec![("/opt/archive.tar", EntryKind::File)]);
    }
}
