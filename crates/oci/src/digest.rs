//! sha256 digests: validation, hashing files and streams, and content-addressed blob paths.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::OciError;

const SHA256_PREFIX: &str = "sha256:";

/// Returns the hex part of a `sha256:<64 hex>` digest, or an error naming the digest.
pub fn sha256_hex(digest: &str) -> Result<&str, OciError> {
    let invalid = || OciError::InvalidDigest {
        digest: digest.to_owned(),
    };
    let hex = digest.strip_prefix(SHA256_PREFIX).ok_or_else(invalid)?;
    let well_formed = hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if well_formed {
        Ok(hex)
    } else {
        Err(invalid())
    }
}

/// Returns the path of a blob in a content-addressed directory: `<dir>/sha256/<hex>`.
pub fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf, OciError> {
    Ok(dir.join("sha256").join(sha256_hex(digest)?))
}

pub fn sha256_bytes(data: &[u8]) -> String {
    format!("{SHA256_PREFIX}{}", hex::encode(Sha256::digest(data)))
}

/// Hashes a file's content and returns `sha256:<hex>`.
pub fn sha256_file(path: &Path) -> Result<String, OciError> {
    let mut file = File::open(path).map_err(|err| OciError::io(path, err))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let read = file
            .read(&mut buffer)
            .map_err(|err| OciError::io(path, err))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(format!("{SHA256_PREFIX}{}", hex::encode(hasher.finalize())))
}

/// Fails with `DigestMismatch` unless `actual` equals `expected`.
pub fn check_digest(what: &str, expected: &str, actual: &str) -> Result<(), OciError> {
    if expected == actual {
        Ok(())
    } else {
        Err(OciError::DigestMismatch {
            what: what.to_owned(),
            expected: expected.to_owned(),
            actual: actual.to_owned(),
        })
    }
}

/// Verifies that a file's content hashes to `expected`.
pub fn verify_file(path: &Path, expected: &str) -> Result<(), OciError> {
    let actual = sha256_file(path)?;
    check_digest(&path.display().to_string(), expected, &actual)
}

/// A writer that hashes and counts everything written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// Returns the inner writer, the `sha256:<hex>` digest and the byte count.
    pub fn finish(self) -> (W, String, u64) {
        let digest = format!("{SHA256_PREFIX}{}", hex::encode(self.hasher.finalize()));
        (self.inner, digest, self.written)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        self.written += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_hex_accepts_valid_digest() {
        let digest = sha256_bytes(b"hearth");
        assert_eq!(sha256_hex(&digest).unwrap().len(), 64);
    }

    #[test]
    fn sha256_hex_rejects_malformed_digests() {
        for digest in [
            "sha256:abc",
            "md5:00",
            "sha256:../../etc/passwd",
            &format!("sha256:{}", "A".repeat(64)),
        ] {
            assert!(sha256_hex(digest).is_err(), "{digest} was accepted");
        }
    }

    #[test]
    fn hashing_writer_matches_sha256_bytes() {
        let mut writer = HashingWriter::new(Vec::new());
        writer.write_all(b"hello").unwrap();
        let (inner, digest, size) = writer.finish();
        assert_eq!(inner, b"hello");
        assert_eq!(digest, sha256_bytes(b"hello"));
        assert_eq!(size, 5);
    }
}
