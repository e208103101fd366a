//! A writer for the cpio "newc" format, the format the Linux kernel unpacks as initramfs.
//!
//! Each entry is a 110-byte ASCII header (magic `070701` and 13 eight-digit hexadecimal
//! fields), the NUL-terminated name and then the data, the name and the data each padded
//! to a multiple of 4 bytes. An entry named `TRAILER!!!` ends the archive.

use std::io::{self, Write};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Writes a newc archive. Paths are given without a leading `/`; parents come first.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_inode: u32,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        Self { out, written: 0, next_inode: 1 }
    }

    /// Adds a directory.
    pub fn directory(&mut self, path: &str, permissions: u32) -> io::Result<()> {
        self.entry(path, S_IFDIR | permissions, 2, (0, 0), &[])
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, permissions: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | permissions, 1, (0, 0), data)
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_device(&mut self, path: &str, permissions: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | permissions, 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.next_inode = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        Ok(self.out)
    }

    fn entry(&mut self, name: &str, mode: u32, links: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let inode = self.next_inode;
        self.next_inode += 1;
        let fields = [
            inode,
            mode,
            0, // uid
            0, // gid
            links,
            0, // mtime: fixed, so that equal inputs give equal archives
            u32::try_from(data.len()).map_err(|_| io::Error::other(format!("{name} is larger than 4 GiB")))?,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let padding = (4 - (self.written % 4) as usize) % 4;
        self.write(&[0u8; 3][..padding])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a newc archive into (name, mode, data) triples.
    fn parse(mut archive: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut offset = 0usize;
        loop {
            assert_eq!(&archive[..6], b"070701", "bad magic at offset {offset}");
            let field = |i: usize| u32::from_str_radix(std::str::from_utf8(&archive[6 + i * 8..14 + i * 8]).unwrap(), 16).unwrap();
            let (mode, size, name_size) = (field(1), field(6) as usize, field(11) as usize);
            let name = String::from_utf8(archive[110..110 + name_size - 1].to_vec()).unwrap();
            let data_start = (110 + name_size).next_multiple_of(4);
            let data = archive[data_start..data_start + size].to_vec();
            let next = (data_start + size).next_multiple_of(4);
            offset += next;
            archive = &archive[next..];
            if name == "TRAILER!!!" {
                assert!(archive.is_empty());
                return entries;
            }
            entries.push((name, mode, data));
        }
    }

    #[test]
    fn cpio_writer_round_trips_entries() {
        let mut writer = CpioWriter::new(Vec::new());
        writer.directory("bin", 0o755).unwrap();
        writer.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        writer.symlink("bin/sh", "busybox").unwrap();
        writer.char_device("dev/console", 0o600, 5, 1).unwrap();

        let entries = parse(&writer.finish().unwrap());

        assert_eq!(entries.len(), 4);
        assert_eq!(entries[0], ("bin".into(), S_IFDIR | 0o755, vec![]));
        assert_eq!(entries[1], ("init".into(), S_IFREG | 0o755, b"#!/bin/sh\n".to_vec()));
        assert_eq!(entries[2], ("bin/sh".into(), S_IFLNK | 0o777, b"busybox".to_vec()));
        assert_eq!(entries[3].1, S_IFCHR | 0o600);
    }

    #[test]
    fn cpio_archive_is_read_by_system_cpio() {
        let mut writer = CpioWriter::new(Vec::new());
        writer.directory("etc", 0o755).unwrap();
        writer.file("etc/hostname", 0o644, b"hearth\n").unwrap();
        let archive = writer.finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.cpio");
        std::fs::write(&path, archive).unwrap();

        let output = std::process::Command::new("cpio")
            .args(["-it", "-F"])
            .arg(&path)
            .output()
            .expect("cpio is installed");

        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(String::from_utf8_lossy(&output.stdout), "etc\netc/hostname\n");
    }
}
