//! Template builder: produces the `base` template, a Debian guest with envd whose snapshot
//! every sandbox restores.
//!
//! [`build_base_template`] runs these steps in a staging directory and renames it into place
//! only when the manifest, written last, exists:
//! 1. kernel: Debian's `linux-image-amd64` package, unpacked in the cache, `vmlinuz` → `vmlinux`;
//! 2. initramfs: busybox, driver modules and an `/init` that switches to envd;
//! 3. root filesystem: a cached debootstrap tarball plus user, envd and network files;
//! 4. disk image: `mkfs.ext4 -d` into a sparse file;
//! 5. boot in the given network slot and wait for envd's `/health`;
//! 6. snapshot (device state plus the shared memory file) and stop;
//! 7. manifest.

mod build;
pub mod base_disk;
pub mod command;
pub mod cpio;
pub mod custom;
pub mod guest;
pub mod initramfs;
pub mod kernel;
pub mod modules;
pub mod plan;
pub mod rootfs;

pub use build::{
    build_base_template, BaseTemplateOptions, BuildError, BuildProgress, BuildStep, BuiltTemplate,
    DEFAULT_KERNEL_CMDLINE,
};
