//! The end of a VMM's log, quoted in errors.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Bytes of a log quoted in errors.
const LOG_TAIL_BYTES: u64 = 2048;

/// Returns the last bytes of a log file, or a note saying why it cannot be read.
pub(crate) fn read_tail(path: &Path) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("({} cannot be read)", path.display());
    };
    let len = file.metadata().map(|meta| meta.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
    let mut tail = Vec::new();
    let _ = file.read_to_end(&mut tail);
    String::from_utf8_lossy(&tail).trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_tail_keeps_the_last_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm.log");
        std::fs::write(&path, format!("{}end of log\n", "x".repeat(5000))).unwrap();

        let tail = read_tail(&path);

        assert!(tail.ends_with("end of log"), "{tail}");
        assert!(tail.len() <= LOG_TAIL_BYTES as usize);
    }

    #[test]
    fn read_tail_names_a_missing_file() {
        assert!(read_tail(Path::new("/nonexistent/vmm.log")).contains("cannot be read"));
    }
}
