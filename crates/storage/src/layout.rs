//! Paths inside the data directory.
//!
//! ```text
//! <root>/templates/<template_id>/<build_id>/   one ready template build (see TemplateBuildPaths)
//! <root>/templates/<template_id>/.tmp-<build_id>/   a build in progress, renamed when complete
//! <root>/sandboxes/<sandbox_id>/               run directory of one sandbox (see SandboxPaths)
//! <root>/cache/                                downloads and intermediate artifacts
//! ```

use std::path::{Path, PathBuf};

use hearth_types::{BuildId, SandboxId, TemplateId};

/// Root of a node's data directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// Wraps `root` without touching the file system.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory holding every build of every template.
    pub fn templates_dir(&self) -> PathBuf {
        self.root.join("templates")
    }

    /// Directory of one ready template build.
    pub fn template_build(&self, template_id: &TemplateId, build_id: &BuildId) -> TemplateBuildPaths {
        TemplateBuildPaths::new(
            self.templates_dir().join(template_id.as_str()).join(build_id.as_str()),
        )
    }

    /// Directory where a build is assembled before it is renamed to its final path, so a
    /// crash never leaves a half-written build under the final name.
    pub fn template_build_staging(&self, template_id: &TemplateId, build_id: &BuildId) -> PathBuf {
        self.templates_dir()
            .join(template_id.as_str())
            .join(format!(".tmp-{}", build_id.as_str()))
    }

    /// Directory holding the run directories of all sandboxes.
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.root.join("sandboxes")
    }

    /// Run directory of one sandbox.
    pub fn sandbox(&self, sandbox_id: &SandboxId) -> SandboxPaths {
        SandboxPaths::new(self.sandboxes_dir().join(sandbox_id.as_str()))
    }

    /// Cache of downloads (kernel packages, root filesystem tarballs).
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }
}

/// Files of one template build. The manifest is written last, so a build directory is
/// complete exactly when [`TemplateBuildPaths::manifest`] exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateBuildPaths {
    dir: PathBuf,
}

impl TemplateBuildPaths {
    /// Wraps a build directory path.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The build directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Uncompressed guest kernel (ELF with a PVH entry point).
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }

    /// Initramfs (newc cpio) that loads the drivers and switches to the root filesystem.
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initrd")
    }

    /// Root filesystem image (raw ext4, sparse).
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs.ext4")
    }

    /// Guest RAM at snapshot time, mapped copy-on-write by every restore.
    pub fn memory(&self) -> PathBuf {
        self.dir.join("memory")
    }

    /// Device state of the snapshot (QEMU migration stream without RAM).
    pub fn vmstate(&self) -> PathBuf {
        self.dir.join("vmstate")
    }

    /// Serial console output of the build VM.
    pub fn build_console_log(&self) -> PathBuf {
        self.dir.join("build-console.log")
    }

    /// JSON manifest; its presence marks the build as complete.
    pub fn manifest(&self) -> PathBuf {
        self.dir.join("manifest.json")
    }

    /// Whether the build is complete (its manifest exists).
    pub fn is_ready(&self) -> bool {
        self.manifest().is_file()
    }
}

/// Files in a sandbox's run directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxPaths {
    dir: PathBuf,
}

impl SandboxPaths {
    /// Wraps a run directory path.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The run directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// qcow2 overlay over the template's root filesystem, holding this sandbox's writes.
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }

    /// Raw copy of the template's root filesystem, for VMMs that cannot read qcow2.
    pub fn raw_disk(&self) -> PathBuf {
        self.dir.join("disk.raw")
    }

    /// Directory of the paused state: memory, device state and the pause record.
    pub fn paused_dir(&self) -> PathBuf {
        self.dir.join("paused")
    }

    /// Returns the path of the pause record, whose presence marks the sandbox as paused on disk.
    pub fn pause_record(&self) -> PathBuf {
        self.paused_dir().join("pause.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_build_paths_nest_under_template_and_build() {
        let data = DataDir::new("/data");
        let template = TemplateId::parse("base").unwrap();
        let build = BuildId::parse("b1").unwrap();

        let paths = data.template_build(&template, &build);

        assert_eq!(paths.dir(), Path::new("/data/templates/base/b1"));
        assert_eq!(paths.memory(), Path::new("/data/templates/base/b1/memory"));
    }

    #[test]
    fn staging_dir_is_a_sibling_of_the_build() {
        let data = DataDir::new("/data");
        let template = TemplateId::parse("base").unwrap();
        let build = BuildId::parse("b1").unwrap();

        let staging = data.template_build_staging(&template, &build);

        assert_eq!(staging, Path::new("/data/templates/base/.tmp-b1"));
    }
}
