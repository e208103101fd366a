//! Sparse file copies for raw disk images.
//!
//! A sandbox of a VMM that opens raw images only (Firecracker) needs its own copy of the
//! template's root disk. The copy is a reflink where the filesystem supports one (btrfs,
//! xfs), which costs no data. Elsewhere only the ranges that hold data are copied, found with
//! `SEEK_DATA`/`SEEK_HOLE`, so the holes of a mostly empty 8 GiB image stay holes.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// `FICLONE` from `<linux/fs.h>`: `_IOW(0x94, 9, int)`.
const FICLONE: libc::c_ulong = 0x4004_9409;

/// Bytes moved per `copy_file_range` call (and per read in the fallback).
const COPY_CHUNK: usize = 8 << 20;

/// Creates `dst` (which must not exist) as a copy of `src` that keeps `src`'s holes.
///
/// Tries a reflink (`FICLONE`) first. Where the filesystem rejects it, copies each data range
/// of `src` to the same offset in `dst` and sets `dst`'s length to `src`'s. Returns the bytes
/// copied: 0 for a reflink, else the total length of the data ranges. On error, removes `dst`.
pub fn clone_sparse(src: &Path, dst: &Path) -> Result<u64, std::io::Error> {
    let source = File::open(src)?;
    let len = source.metadata()?.len();
    let target = OpenOptions::new().write(true).create_new(true).open(dst)?;

    let result = copy_into(&source, &target, len).and_then(|copied| {
        target.sync_all()?;
        Ok(copied)
    });
    match result {
        Ok(copied) => {
            tracing::debug!(src = %src.display(), dst = %dst.display(), len, copied, "cloned file");
            Ok(copied)
        }
        Err(err) => {
            drop(target);
            if let Err(remove_err) = std::fs::remove_file(dst) {
                tracing::warn!(dst = %dst.display(), err = %remove_err, "failed to remove partial clone");
            }
            Err(err)
        }
    }
}

fn copy_into(source: &File, target: &File, len: u64) -> Result<u64, std::io::Error> {
    // SAFETY: both descriptors are open for the duration of the call; FICLONE reads only the
    // integer argument and changes nothing on failure.
    let cloned = unsafe { libc::ioctl(target.as_raw_fd(), FICLONE, source.as_raw_fd()) };
    if cloned == 0 {
        return Ok(0);
    }

    let mut copied = 0;
    for (start, end) in data_ranges(source, len)? {
        copy_range(source, target, start, end)?;
        copied += end - start;
    }
    target.set_len(len)?;
    Ok(copied)
}

/// Returns the `[start, end)` byte ranges of `file` that hold data, in order, as
/// `SEEK_DATA`/`SEEK_HOLE` report them. A filesystem without hole reporting returns the
/// whole file as one range.
pub fn data_ranges(file: &File, len: u64) -> Result<Vec<(u64, u64)>, std::io::Error> {
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut offset = 0u64;
    while offset < len {
        // SAFETY: lseek only moves the file offset of a descriptor that `file` keeps open.
        let start = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
        if start < 0 {
            let err = std::io::Error::last_os_error();
            // ENXIO: no data at or after `offset`.
            if err.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(err);
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (start, end) = (start as u64, (end as u64).min(len));
        if end <= start {
            break;
        }
        ranges.push((start, end));
        offset = end;
    }
    Ok(ranges)
}

/// Copies bytes `[start, end)` of `source` to the same offsets in `target`, with
/// `copy_file_range` where the kernel supports it between these files, else with reads and writes.
pub fn copy_range(source: &File, target: &File, start: u64, end: u64) -> Result<(), std::io::Error> {
    let mut offset = start;
    while offset < end {
        let chunk = ((end - offset) as usize).min(COPY_CHUNK);
        let mut off_in = offset as libc::loff_t;
        let mut off_out = offset as libc::loff_t;
        // SAFETY: both descriptors stay open for the call, and the offset pointers point to
        // locals that outlive it.
        let n = unsafe {
            libc::copy_file_range(source.as_raw_fd(), &mut off_in, target.as_raw_fd(), &mut off_out, chunk, 0)
        };
        if n > 0 {
            offset += n as u64;
            continue;
        }
        if n == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                format!("source ended at offset {offset}, before {end}"),
            ));
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                return copy_range_buffered(source, target, offset, end)
            }
            Some(libc::EINTR) => continue,
            _ => return Err(err),
        }
    }
    Ok(())
}

fn copy_range_buffered(source: &File, target: &File, start: u64, end: u64) -> Result<(), std::io::Error> {
    let mut buffer = vec![0u8; COPY_CHUNK.min((end - start) as usize)];
    let mut offset = start;
    while offset < end {
        let chunk = ((end - offset) as usize).min(buffer.len());
        source.read_exact_at(&mut buffer[..chunk], offset)?;
        target.write_all_at(&buffer[..chunk], offset)?;
        offset += chunk as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const MIB: u64 = 1 << 20;

    /// Writes a 64 MiB file with 1 MiB of data at 0 and at 40 MiB, and holes elsewhere.
    fn sparse_source(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("src.img");
        let file = File::create(&path).unwrap();
        file.set_len(64 * MIB).unwrap();
        file.write_all_at(&vec![0xab; MIB as usize], 0).unwrap();
        file.write_all_at(&vec![0xcd; MIB as usize], 40 * MIB).unwrap();
        file.sync_all().unwrap();
        path
    }

    #[test]
    fn clone_keeps_content_and_length() {
        let dir = tempfile::tempdir().unwrap();
        let src = sparse_source(dir.path());
        let dst = dir.path().join("dst.img");

        clone_sparse(&src, &dst).unwrap();

        let original = std::fs::read(&src).unwrap();
        let copy = std::fs::read(&dst).unwrap();
        assert_eq!(copy.len() as u64, 64 * MIB);
        assert!(copy == original, "clone content differs from the source");
    }

    #[test]
    fn clone_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = sparse_source(dir.path());
        let dst = dir.path().join("dst.img");

        let copied = clone_sparse(&src, &dst).unwrap();

        let allocated = std::fs::metadata(&dst).unwrap().blocks() * 512;
        // A reflink copies nothing; a data-range copy moves the 2 MiB of data, possibly
        // rounded to the filesystem's allocation unit.
        assert!(copied == 0 || (2 * MIB..=4 * MIB).contains(&copied), "copied {copied} bytes");
        assert!(allocated <= 8 * MIB, "clone allocates {allocated} bytes of a 64 MiB file with 2 MiB of data");
    }

    #[test]
    fn clone_rejects_existing_destination() {
        let dir = tempfile::tempdir().unwrap();
        let src = sparse_source(dir.path());
        let dst = dir.path().join("dst.img");
        std::fs::write(&dst, b"keep").unwrap();

        let err = clone_sparse(&src, &dst).unwrap_err();

        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&dst).unwrap(), b"keep");
    }

    #[test]
    fn clone_of_missing_source_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("dst.img");

        let err = clone_sparse(&dir.path().join("missing.img"), &dst).unwrap_err();

        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(!dst.exists());
    }

    #[test]
    fn data_ranges_of_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let src = sparse_source(dir.path());
        let file = File::open(&src).unwrap();

        let ranges = data_ranges(&file, 64 * MIB).unwrap();

        let total: u64 = ranges.iter().map(|(start, end)| end - start).sum();
        assert!(ranges.iter().any(|&(start, end)| start <= 40 * MIB && end >= 41 * MIB), "{ranges:?}");
        assert!(total < 64 * MIB, "no hole reported: {ranges:?}");
    }
}
