//! Creation of qcow2 overlays, written directly so that the sandbox create path spawns
//! no `qemu-img` process.
//!
//! An empty overlay is four clusters: the header (with the backing file name), a refcount
//! table, one refcount block and the L1 table. Every L1 entry is zero, so each read falls
//! through to the backing file until the guest writes the cluster. The cost is four small
//! writes whatever the size of the backing image. The file is sparse: the 256 KiB it
//! spans are mostly holes.
//!
//! Field offsets follow the qcow2 specification (version 3) in QEMU's `docs/interop/qcow2.txt`.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// log2 of the cluster size; 64 KiB is QEMU's default.
const CLUSTER_BITS: u32 = 16;
const CLUSTER_SIZE: u64 = 1 << CLUSTER_BITS;

/// Refcounts are 16 bits wide (refcount_order 4), QEMU's default.
const REFCOUNT_ORDER: u32 = 4;

/// Length of the version 3 header without optional fields.
const HEADER_LENGTH: u32 = 104;

/// Header extension naming the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;

const REFCOUNT_TABLE_OFFSET: u64 = CLUSTER_SIZE;
const REFCOUNT_BLOCK_OFFSET: u64 = 2 * CLUSTER_SIZE;
const L1_TABLE_OFFSET: u64 = 3 * CLUSTER_SIZE;
const CLUSTER_COUNT: u64 = 4;

/// Errors creating an overlay.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("backing file path {0} is not valid UTF-8 or is too long for a qcow2 header")]
    BackingPath(PathBuf),
    #[error("virtual size {0} bytes needs an L1 table larger than one cluster")]
    TooLarge(u64),
    #[error("failed to write qcow2 overlay {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Creates a new qcow2 file at `path` of `virtual_size` bytes whose unwritten clusters read
/// from the raw image `backing`. Fails if `path` already exists.
///
/// `backing` is stored as given, so pass an absolute path: QEMU resolves a relative one
/// against the overlay's directory.
pub fn create_overlay(path: &Path, backing: &Path, virtual_size: u64) -> Result<(), Qcow2Error> {
    create_overlay_over(path, backing, BackingFormat::Raw, virtual_size)
}

/// Format of an overlay's backing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingFormat {
    /// A raw image, such as a template's root filesystem.
    Raw,
    /// Another qcow2 overlay, such as a snapshot's disk; QEMU follows its backing chain.
    Qcow2,
}

impl BackingFormat {
    fn name(self) -> &'static [u8] {
        match self {
            Self::Raw => b"raw",
            Self::Qcow2 => b"qcow2",
        }
    }
}

/// Like [`create_overlay`], with a backing file of the given format.
pub fn create_overlay_over(
    path: &Path,
    backing: &Path,
    format: BackingFormat,
    virtual_size: u64,
) -> Result<(), Qcow2Error> {
    let header = build_header(backing, format, virtual_size)?;
    let write_err = |source| Qcow2Error::Write { path: path.to_owned(), source };

    let file = OpenOptions::new().write(true).create_new(true).open(path).map_err(write_err)?;
    file.write_all_at(&header, 0).map_err(write_err)?;
    file.write_all_at(&REFCOUNT_BLOCK_OFFSET.to_be_bytes(), REFCOUNT_TABLE_OFFSET)
        .map_err(write_err)?;
    file.write_all_at(&refcount_block_prefix(), REFCOUNT_BLOCK_OFFSET).map_err(write_err)?;
    file.set_len(CLUSTER_COUNT * CLUSTER_SIZE).map_err(write_err)?;
    Ok(())
}

/// Reads the backing file name from the header of the qcow2 file at `path`. `None` for a
/// file that is not qcow2 or has no backing file.
pub fn backing_file(path: &Path) -> std::io::Result<Option<PathBuf>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut header = [0u8; 20];
    if file.read_exact(&mut header).is_err() || &header[..4] != b"QFI\xfb" {
        return Ok(None);
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
    let length = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
    if offset == 0 || length == 0 || length > 4096 {
        return Ok(None);
    }
    let mut name = vec![0u8; length as usize];
    file.read_exact_at(&mut name, offset)?;
    Ok(Some(PathBuf::from(String::from_utf8_lossy(&name).into_owned())))
}

/// Every file in the backing chain of the image at `path`, nearest first, relative names
/// resolved against the directory of the file that names them. Stops after 64 links.
pub fn backing_chain(path: &Path) -> Vec<PathBuf> {
    let mut chain = Vec::new();
    let mut current = path.to_owned();
    while chain.len() < 64 {
        let Ok(Some(next)) = backing_file(&current) else { break };
        let next = if next.is_absolute() {
            next
        } else {
            current.parent().map(|dir| dir.join(&next)).unwrap_or(next)
        };
        chain.push(next.clone());
        current = next;
    }
    chain
}

/// Number of L1 entries for `virtual_size`: one L2 table maps `CLUSTER_SIZE / 8` clusters.
fn l1_entries(virtual_size: u64) -> u64 {
    let bytes_per_l2 = CLUSTER_SIZE * (CLUSTER_SIZE / 8);
    virtual_size.div_ceil(bytes_per_l2)
}

/// The header cluster's content: header, backing format extension, end marker, backing name.
fn build_header(backing: &Path, format: BackingFormat, virtual_size: u64) -> Result<Vec<u8>, Qcow2Error> {
    let backing_name = backing
        .to_str()
        .filter(|name| name.len() < 1023)
        .ok_or_else(|| Qcow2Error::BackingPath(backing.to_owned()))?;
    let l1_size = l1_entries(virtual_size);
    if l1_size * 8 > CLUSTER_SIZE {
        return Err(Qcow2Error::TooLarge(virtual_size));
    }

    let mut extensions = Vec::new();
    push_extension(&mut extensions, EXT_BACKING_FORMAT, format.name());
    push_extension(&mut extensions, 0, b"");
    let backing_offset = u64::from(HEADER_LENGTH) + extensions.len() as u64;

    let mut h = Vec::with_capacity(HEADER_LENGTH as usize);
    h.extend_from_slice(b"QFI\xfb");
    h.extend_from_slice(&3u32.to_be_bytes()); // version
    h.extend_from_slice(&backing_offset.to_be_bytes());
    h.extend_from_slice(&(backing_name.len() as u32).to_be_bytes());
    h.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
    h.extend_from_slice(&virtual_size.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // crypt_method: none
    h.extend_from_slice(&(l1_size as u32).to_be_bytes());
    h.extend_from_slice(&L1_TABLE_OFFSET.to_be_bytes());
    h.extend_from_slice(&REFCOUNT_TABLE_OFFSET.to_be_bytes());
    h.extend_from_slice(&1u32.to_be_bytes()); // refcount_table_clusters
    h.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
    h.extend_from_slice(&0u64.to_be_bytes()); // snapshots_offset
    h.extend_from_slice(&0u64.to_be_bytes()); // incompatible_features
    h.extend_from_slice(&0u64.to_be_bytes()); // compatible_features
    h.extend_from_slice(&0u64.to_be_bytes()); // autoclear_features
    h.extend_from_slice(&REFCOUNT_ORDER.to_be_bytes());
    h.extend_from_slice(&HEADER_LENGTH.to_be_bytes());
    debug_assert_eq!(h.len(), HEADER_LENGTH as usize);

    h.extend_from_slice(&extensions);
    h.extend_from_slice(backing_name.as_bytes());
    Ok(h)
}

/// Appends one header extension, padded to a multiple of 8 bytes.
fn push_extension(out: &mut Vec<u8>, kind: u32, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(8), 0);
}

/// Refcount entries of the four metadata clusters, each referenced once.
fn refcount_block_prefix() -> Vec<u8> {
    (0..CLUSTER_COUNT).flat_map(|_| 1u16.to_be_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_chain_follows_every_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("rootfs.ext4");
        std::fs::write(&raw, b"not qcow2").unwrap();
        let middle = dir.path().join("middle.qcow2");
        let top = dir.path().join("top.qcow2");
        create_overlay(&middle, &raw, 1 << 30).unwrap();
        create_overlay_over(&top, &middle, BackingFormat::Qcow2, 1 << 30).unwrap();
        assert_eq!(backing_file(&top).unwrap(), Some(middle.clone()));
        assert_eq!(backing_chain(&top), vec![middle, raw.clone()]);
        assert_eq!(backing_file(&raw).unwrap(), None);
        assert!(backing_chain(&raw).is_empty());
    }

    #[test]
    fn l1_entries_cover_virtual_size() {
        assert_eq!(l1_entries(8 << 30), 16);
        assert_eq!(l1_entries((512 << 20) + 1), 2);
    }

    #[test]
    fn create_overlay_writes_header_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");

        create_overlay(&path, Path::new("/templates/base/rootfs.ext4"), 8 << 30).unwrap();

        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len() as u64, 4 * CLUSTER_SIZE);
        assert_eq!(&data[0..4], b"QFI\xfb");
        assert_eq!(u64::from_be_bytes(data[24..32].try_into().unwrap()), 8 << 30);
        let name_offset = u64::from_be_bytes(data[8..16].try_into().unwrap()) as usize;
        let name_len = u32::from_be_bytes(data[16..20].try_into().unwrap()) as usize;
        assert_eq!(&data[name_offset..name_offset + name_len], b"/templates/base/rootfs.ext4");
    }

    #[test]
    fn create_overlay_rejects_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        std::fs::write(&path, b"x").unwrap();

        let err = create_overlay(&path, Path::new("/b"), 1 << 30).unwrap_err();

        assert!(matches!(err, Qcow2Error::Write { .. }));
    }
}
