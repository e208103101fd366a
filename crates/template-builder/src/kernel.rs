//! The guest kernel: Debian's `linux-image-amd64` package, downloaded into the cache and
//! unpacked there (never installed on the host), and its `vmlinuz` decompressed to
//! `vmlinux`, which boots much faster under TCG because the guest skips decompression.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::command::{run, CommandError};

/// Debian's metapackage that depends on the current kernel image package.
pub const KERNEL_METAPACKAGE: &str = "linux-image-amd64";

/// Magic bytes that start an xz stream.
const XZ_MAGIC: &[u8] = &[0xFD, b'7', b'z', b'X', b'Z', 0x00];

/// Errors preparing the kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("apt-cache lists no linux-image dependency of {KERNEL_METAPACKAGE}: {0}")]
    NoKernelPackage(String),
    #[error("no downloaded {package} package in {dir}")]
    NoDeb { package: String, dir: PathBuf },
    #[error("no vmlinuz-* in {0}")]
    NoVmlinuz(PathBuf),
    #[error("I/O on {path} failed")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no xz stream found in the compressed kernel")]
    NoXzStream,
    #[error("decompressing the kernel's xz stream failed")]
    Decompress(#[source] std::io::Error),
    #[error("the decompressed kernel is not an ELF file")]
    NotElf,
}

/// An unpacked kernel package.
#[derive(Clone, Debug)]
pub struct UnpackedKernel {
    /// Kernel release, e.g. `6.1.0-57-amd64`.
    pub release: String,
    /// The compressed kernel.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` of the package.
    pub modules_dir: PathBuf,
}

/// Downloads (unless cached) and unpacks the kernel package into `cache_dir`.
pub async fn fetch_kernel(cache_dir: &Path) -> Result<UnpackedKernel, KernelError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| KernelError::Io { path, source }
    };
    tokio::fs::create_dir_all(cache_dir).await.map_err(io_err(cache_dir))?;

    let package = kernel_package_name().await?;
    let unpacked = cache_dir.join(&package);
    if !unpacked.join(".complete").exists() {
        let deb = match find_deb(cache_dir, &package) {
            Some(deb) => deb,
            None => {
                run("apt-get", &["download", &package], Some(cache_dir)).await?;
                find_deb(cache_dir, &package)
                    .ok_or_else(|| KernelError::NoDeb { package: package.clone(), dir: cache_dir.to_owned() })?
            }
        };
        let _ = tokio::fs::remove_dir_all(&unpacked).await;
        let deb_arg = deb.to_string_lossy().into_owned();
        let unpacked_arg = unpacked.to_string_lossy().into_owned();
        run("dpkg-deb", &["-x", &deb_arg, &unpacked_arg], None).await?;
        tokio::fs::write(unpacked.join(".complete"), b"").await.map_err(io_err(&unpacked))?;
    }

    let boot = unpacked.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(io_err(&boot))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.file_name().is_some_and(|name| name.to_string_lossy().starts_with("vmlinuz-")))
        .ok_or_else(|| KernelError::NoVmlinuz(boot.clone()))?;
    let release = vmlinuz
        .file_name()
        .expect("found by file name")
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_owned();
    let modules_dir = unpacked.join("lib/modules").join(&release);
    Ok(UnpackedKernel { release, vmlinuz, modules_dir })
}

/// Asks apt which versioned image package the metapackage depends on.
async fn kernel_package_name() -> Result<String, KernelError> {
    let output = run("apt-cache", &["depends", KERNEL_METAPACKAGE], None).await?;
    output
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|name| name.starts_with("linux-image-"))
        .map(str::to_owned)
        .ok_or(KernelError::NoKernelPackage(output))
}

fn find_deb(dir: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{package}_");
    std::fs::read_dir(dir).ok()?.filter_map(Result::ok).map(|entry| entry.path()).find(|path| {
        let name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
        name.starts_with(&prefix) && name.ends_with(".deb")
    })
}

/// Decompresses a bzImage whose payload is xz-compressed: the payload is the first xz
/// stream in the file, and decoding stops at that stream's end (trailing bytes ignored).
pub fn extract_vmlinux(vmlinuz: &[u8]) -> Result<Vec<u8>, KernelError> {
    let start = vmlinuz
        .windows(XZ_MAGIC.len())
        .position(|window| window == XZ_MAGIC)
        .ok_or(KernelError::NoXzStream)?;
    let mut decoder = liblzma::read::XzDecoder::new(&vmlinuz[start..]);
    let mut vmlinux = Vec::with_capacity(vmlinuz.len() * 8);
    decoder.read_to_end(&mut vmlinux).map_err(KernelError::Decompress)?;
    if !vmlinux.starts_with(b"\x7fELF") {
        return Err(KernelError::NotElf);
    }
    Ok(vmlinux)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut encoder = liblzma::write::XzEncoder::new(Vec::new(), 6);
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn extract_vmlinux_finds_stream_after_setup_code() {
        let elf = [b"\x7fELF".as_slice(), &[7u8; 5000]].concat();
        let image = [vec![0x90u8; 1234], xz(&elf), b"trailing size".to_vec()].concat();

        assert_eq!(extract_vmlinux(&image).unwrap(), elf);
    }

    #[test]
    fn extract_vmlinux_rejects_image_without_xz() {
        let err = extract_vmlinux(&[0u8; 4096]).unwrap_err();

        assert!(matches!(err, KernelError::NoXzStream));
    }

    #[test]
    fn extract_vmlinux_rejects_non_elf_payload() {
        let image = [vec![0u8; 16], xz(b"not a kernel")].concat();

        assert!(matches!(extract_vmlinux(&image).unwrap_err(), KernelError::NotElf));
    }
}
