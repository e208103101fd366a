//! Deleting template builds without breaking the sandboxes that still read them.
//!
//! A sandbox reads its template build's files for as long as it lives: its disk overlay's
//! backing chain ends in the template's root filesystem (through any snapshot builds in
//! between), and a paused sandbox resumes from them. So deleting a template removes the
//! builds nothing uses and marks the others with a `deleted` file; [`sweep_deleted`]
//! removes a marked build once the last sandbox or snapshot that uses it is gone.
//!
//! Uses are found on disk, which also covers sandboxes paused before a restart: every
//! qcow2 file in a sandbox directory is followed along its backing chain, as is every
//! snapshot build's disk, and a pause record or snapshot manifest names its memory file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use hearth_storage::{DataDir, PauseRecord, TemplateBuildPaths, TemplateManifest};
use hearth_types::TemplateId;

/// Name of the marker file of a deleted build that is still in use.
const DELETED_MARKER: &str = "deleted";

/// Counts of what [`delete_template`] removed and kept.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DeleteOutcome {
    /// Builds removed now.
    pub removed: usize,
    /// Builds kept, marked deleted, because sandboxes or snapshots still use them.
    pub kept: usize,
}

/// The template build directory (`<templates>/<id>/<build>`) that `file` lies in, if any.
fn build_dir_of(templates: &Path, file: &Path) -> Option<PathBuf> {
    let relative = file.strip_prefix(templates).ok()?;
    let mut parts = relative.components();
    let template = parts.next()?;
    let build = parts.next()?;
    Some(templates.join(template).join(build))
}

/// Template build directories that something other than the builds of `excluded` uses.
fn builds_in_use(data_dir: &DataDir, excluded: Option<&Path>) -> HashSet<PathBuf> {
    let templates = data_dir.templates_dir();
    let mut used = HashSet::new();
    // Every build directory `file` and its backing chain lie in, except `owner`'s own.
    let note = |file: &Path, used: &mut HashSet<PathBuf>, owner: Option<&Path>| {
        let chain = std::iter::once(file.to_owned()).chain(hearth_storage::qcow2::backing_chain(file));
        for link in chain {
            if let Some(dir) = build_dir_of(&templates, &link) {
                if owner != Some(dir.as_path()) {
                    used.insert(dir);
                }
            }
        }
    };

    if let Ok(sandboxes) = std::fs::read_dir(data_dir.sandboxes_dir()) {
        for sandbox in sandboxes.flatten() {
            let dir = sandbox.path();
            for sub in [dir.clone(), dir.join("paused")] {
                let Ok(files) = std::fs::read_dir(&sub) else { continue };
                for file in files.flatten() {
                    let path = file.path();
                    if path.extension().is_some_and(|ext| ext == "qcow2") {
                        note(&path, &mut used, None);
                    }
                }
                for record in ["pause.json", "pause.resuming.json"] {
                    if let Ok(record) = PauseRecord::load(&sub.join(record)) {
                        note(&record.memory_file, &mut used, None);
                        note(&record.disk_file, &mut used, None);
                    }
                }
            }
        }
    }

    if let Ok(template_dirs) = std::fs::read_dir(&templates) {
        for template in template_dirs.flatten() {
            let Ok(builds) = std::fs::read_dir(template.path()) else { continue };
            for build in builds.flatten() {
                let dir = build.path();
                if excluded.is_some_and(|excluded| dir.starts_with(excluded)) || dir.join(DELETED_MARKER).exists() {
                    continue;
                }
                let paths = TemplateBuildPaths::new(&dir);
                let Ok(manifest) = TemplateManifest::load(&paths.manifest()) else { continue };
                if let Some(origin) = &manifest.snapshot {
                    note(&origin.memory_file, &mut used, Some(&dir));
                    note(&dir.join(&origin.disk_file), &mut used, Some(&dir));
                }
            }
        }
    }
    used
}

/// Deletes the builds of `template_id`. Builds in use stay, marked deleted, until
/// [`sweep_deleted`] finds them unused.
pub fn delete_template(data_dir: &DataDir, template_id: &TemplateId) -> std::io::Result<DeleteOutcome> {
    let dir = data_dir.templates_dir().join(template_id.as_str());
    let builds = match std::fs::read_dir(&dir) {
        Ok(builds) => builds,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(DeleteOutcome::default()),
        Err(err) => return Err(err),
    };
    let used = builds_in_use(data_dir, Some(&dir));
    let mut outcome = DeleteOutcome::default();
    for build in builds.flatten() {
        let path = build.path();
        if used.contains(&path) {
            hearth_storage::durable::write_atomic(&path.join(DELETED_MARKER), b"deleted\n")?;
            outcome.kept += 1;
        } else {
            std::fs::remove_dir_all(&path)?;
            outcome.removed += 1;
        }
    }
    if outcome.kept == 0 {
        let _ = std::fs::remove_dir(&dir);
    }
    Ok(outcome)
}

/// Removes the builds marked deleted that nothing uses any more; returns how many.
pub fn sweep_deleted(data_dir: &DataDir) -> usize {
    let templates = data_dir.templates_dir();
    let Ok(template_dirs) = std::fs::read_dir(&templates) else { return 0 };
    let mut marked = Vec::new();
    for template in template_dirs.flatten() {
        let Ok(builds) = std::fs::read_dir(template.path()) else { continue };
        for build in builds.flatten() {
            if build.path().join(DELETED_MARKER).exists() {
                marked.push(build.path());
            }
        }
    }
    if marked.is_empty() {
        return 0;
    }
    let used = builds_in_use(data_dir, None);
    let mut removed = 0;
    for dir in marked {
        if used.contains(&dir) {
            continue;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                removed += 1;
                tracing::info!(path = %dir.display(), "removed a deleted template build that is no longer used");
                if let Some(parent) = dir.parent() {
                    let _ = std::fs::remove_dir(parent);
                }
            }
            Err(err) => tracing::error!(path = %dir.display(), error = %err, "failed to remove a deleted template build"),
        }
    }
    removed
}

/// Whether a build directory was deleted and is kept only for the sandboxes using it.
pub fn is_deleted(build_dir: &Path) -> bool {
    build_dir.join(DELETED_MARKER).exists()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_storage::qcow2::create_overlay;

    fn fake_build(data_dir: &DataDir, template: &str, build: &str) -> PathBuf {
        let dir = data_dir.templates_dir().join(template).join(build);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("rootfs.ext4"), b"raw").unwrap();
        dir
    }

    #[test]
    fn delete_keeps_build_under_sandbox_disk() {
        let root = tempfile::tempdir().unwrap();
        let data_dir = DataDir::new(root.path());
        let used = fake_build(&data_dir, "app", "b1");
        let unused = fake_build(&data_dir, "app", "b2");
        let sandbox = data_dir.sandboxes_dir().join("sbx1");
        std::fs::create_dir_all(&sandbox).unwrap();
        create_overlay(&sandbox.join("disk.qcow2"), &used.join("rootfs.ext4"), 1 << 30).unwrap();

        let template = TemplateId::parse("app").unwrap();
        let outcome = delete_template(&data_dir, &template).unwrap();
        assert_eq!(outcome, DeleteOutcome { removed: 1, kept: 1 });
        assert!(!unused.exists());
        assert!(used.join("rootfs.ext4").exists());
        assert!(is_deleted(&used));

        assert_eq!(sweep_deleted(&data_dir), 0, "the sandbox still uses the build");
        std::fs::remove_dir_all(&sandbox).unwrap();
        assert_eq!(sweep_deleted(&data_dir), 1);
        assert!(!used.exists());
        assert!(!data_dir.templates_dir().join("app").exists());
    }

    #[test]
    fn other_templates_are_never_touched() {
        let root = tempfile::tempdir().unwrap();
        let data_dir = DataDir::new(root.path());
        let other = fake_build(&data_dir, "other", "b1");
        fake_build(&data_dir, "app", "b1");
        delete_template(&data_dir, &TemplateId::parse("app").unwrap()).unwrap();
        assert!(other.join("rootfs.ext4").exists());
        assert_eq!(sweep_deleted(&data_dir), 0);
    }
}
