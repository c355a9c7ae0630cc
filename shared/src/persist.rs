//! Persistence of the agent's own files: atomic, durable, private writes
//! ([`write_atomic`]) and the bounded decoder for the bincode files it wrote
//! itself ([`decode_persisted`]: hash caches, ledgers).

use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// Writes `bytes` to `path` atomically and durably, as a private file (mode
/// 0600, missing directories 0700, whatever the umask): every caller keeps
/// its own state under the state dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    crate::perms::create_private_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    let tmp = dir.join(format!(
        "{}{}.{}",
        crate::relpath::TEMP_PREFIX,
        name,
        rand::random::<u32>()
    ));
    let result = (|| {
        let mut f = crate::perms::create_private_file(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Decodes a bincode file the agent wrote itself (hash caches, ledgers).
///
/// A damaged file must not make the agent allocate what a length field
/// claims: bincode allocates a string or a map before it reads it, so the
/// decoder's claim limit is set to a few times the file's size (a decoded map
/// takes more memory than its encoding, never an order of magnitude more).
/// `None` when the bytes do not decode.
pub(crate) fn decode_persisted<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    fn with<T: serde::de::DeserializeOwned, const LIMIT: usize>(bytes: &[u8]) -> Option<T> {
        let config = bincode::config::standard().with_limit::<LIMIT>();
        bincode::serde::decode_from_slice(bytes, config).ok().map(|(v, _)| v)
    }
    let need = bytes.len().saturating_mul(8);
    if need <= 1 << 20 {
        with::<T, { 1 << 20 }>(bytes)
    } else if need <= 64 << 20 {
        with::<T, { 64 << 20 }>(bytes)
    } else if need <= 1 << 30 {
        with::<T, { 1 << 30 }>(bytes)
    } else {
        with::<T, { 16 << 30 }>(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_makes_private_dirs() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        write_atomic(&d.path().join("new/dir/x"), b"x").unwrap();
        let mode = fs::metadata(d.path().join("new/dir")).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        let mode = fs::metadata(d.path().join("new/dir/x")).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read(d.path().join("new/dir/x")).unwrap(), b"x");
    }
}
