//! Small helpers for the files the agent reads back (command output, job
//! histories).

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;

/// The last `n` bytes of the file at `path`: fewer when the file is
/// shorter, what could be read when a read fails part way, and nothing
/// when it cannot be opened. The cut may fall inside a multi-byte
/// character: callers that want text decode it lossily.
pub fn tail_bytes(path: &Path, n: u64) -> Vec<u8> {
    let Ok(mut f) = File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(n))).is_err() {
        return Vec::new();
    }
    let mut bytes = Vec::new();
    let _ = f.take(n).read_to_end(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::tail_bytes;

    #[test]
    fn the_tail_is_the_last_bytes_even_inside_a_character() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        // "à" is two bytes (c3 a0): a tail of 11 bytes starts on its second.
        std::fs::write(&path, "déjà vu\nfailed").unwrap();
        assert_eq!(tail_bytes(&path, 11), b"\xa0 vu\nfailed");
        let all = std::fs::read(&path).unwrap();
        assert_eq!(tail_bytes(&path, 1000), all);
        assert_eq!(tail_bytes(&path, 0), b"");
        assert_eq!(tail_bytes(&dir.path().join("missing"), 10), b"");
    }
}
