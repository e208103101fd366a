//! Detection of local tar archives for ADD, which extracts them instead of copying them.
//!
//! Docker decides by content, not by file name: a file is an archive when, after removing a
//! recognised compression, the first tar header reads without error. An empty tar archive or a
//! compressed file that does not hold a tar archive is copied as a plain file.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

/// The compression around a tar archive that ADD extracts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Bzip2,
    Xz,
    Zstd,
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
const BZIP2_MAGIC: &[u8] = b"BZh";
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// Returns the compression of the tar archive at `path`, or `None` when the file is not a tar
/// archive (also when it is compressed but contains something else).
pub(crate) fn detect(path: &Path) -> io::Result<Option<Compression>> {
    let mut magic = [0u8; 6];
    let read = read_up_to(&mut File::open(path)?, &mut magic)?;
    let magic = &magic[..read];

    let file = BufReader::new(File::open(path)?);
    let (compression, has_tar) = if magic.starts_with(GZIP_MAGIC) {
        (Compression::Gzip, starts_with_tar_header(flate2::read::GzDecoder::new(file)))
    } else if magic.starts_with(XZ_MAGIC) {
        (Compression::Xz, starts_with_tar_header(liblzma::read::XzDecoder::new(file)))
    } else if magic.starts_with(BZIP2_MAGIC) {
        (Compression::Bzip2, starts_with_tar_header(bzip2::read::BzDecoder::new(file)))
    } else if magic.starts_with(ZSTD_MAGIC) {
        let has_tar = ruzstd::decoding::StreamingDecoder::new(file).is_ok_and(starts_with_tar_header);
        (Compression::Zstd, has_tar)
    } else {
        (Compression::None, starts_with_tar_header(file))
    };

    Ok(has_tar.then_some(compression))
}

fn read_up_to(reader: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(count) => filled += count,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

fn starts_with_tar_header(reader: impl Read) -> bool {
    let mut archive = tar::Archive::new(reader);
    let Ok(mut entries) = archive.entries() else {
        return false;
    };
    matches!(entries.next(), Some(Ok(_)))
}
