//! Permission hygiene: refusing files other users could have changed, and
//! creating the agent's own files and directories private whatever the
//! process umask is.
//!
//! The cluster file names commands the agent runs (as root, in a packaged
//! install), and a key file is the node's or operator's identity: a file
//! another user can write is theirs to command. Such files are refused when
//! they are writable by group or others, or owned by a user other than this
//! process's user or root. A private key is also refused when group or
//! others can read it, as `ssh` refuses one.
//!
//! What the agent writes under its state dir (role state, caches, ledgers,
//! diverged files, job dumps and spool) is created with mode 0600 (files)
//! and 0700 (directories), set explicitly after creation, since a umask can
//! only take bits away and a unit's `UMask=` does not apply outside systemd.

use std::fs::{self, File, Metadata};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The mode of the files the agent keeps for itself.
pub const PRIVATE_FILE: u32 = 0o600;
/// The mode of the directories the agent keeps for itself.
pub const PRIVATE_DIR: u32 = 0o700;

/// Why a file that decides what this process does or who it is was refused.
pub fn unsafe_owner_or_mode(md: &Metadata, private: bool) -> Option<String> {
    let mode = md.mode() & 0o7777;
    let uid = md.uid();
    let me = crate::sys::geteuid();
    if uid != me && uid != 0 {
        return Some(format!(
            "owned by uid {uid}, not by this user (uid {me}) or root: another user can change it (chown it)"
        ));
    }
    if mode & 0o022 != 0 {
        return Some(format!("mode {mode:04o} lets group or others write it (chmod go-w)"));
    }
    if private && mode & 0o077 != 0 {
        return Some(format!(
            "mode {mode:04o} is too open for a private key: group or others may read it (chmod 600)"
        ));
    }
    None
}

/// Why [`open_trusted`] did not return a file.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The file could not be opened or examined.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The file is open to other users: the reason names its owner or mode.
    #[error("refused: {0}")]
    Unsafe(String),
}

/// Opens `path` for reading and checks, on the open file (no second look
/// up of the path), that no other user could have written it (see the
/// module documentation); `private` also refuses a file group or others
/// can read.
pub fn open_trusted(path: &Path, private: bool) -> Result<File, TrustError> {
    let f = File::open(path)?;
    let md = f.metadata()?;
    match unsafe_owner_or_mode(&md, private) {
        Some(why) => Err(TrustError::Unsafe(why)),
        None => Ok(f),
    }
}

/// Sets `file`'s mode to 0600.
pub fn make_private(file: &File) -> io::Result<()> {
    file.set_permissions(fs::Permissions::from_mode(PRIVATE_FILE))
}

/// Creates (or truncates) `path` for writing with mode 0600, whatever the umask.
pub fn create_private_file(path: &Path) -> io::Result<File> {
    let f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(PRIVATE_FILE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    make_private(&f)?;
    Ok(f)
}

/// Opens `path` for appending, creating it with mode 0600 when missing.
pub fn append_private_file(path: &Path) -> io::Result<File> {
    let f = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(PRIVATE_FILE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    if f.metadata()?.mode() & 0o7777 != PRIVATE_FILE {
        make_private(&f)?;
    }
    Ok(f)
}

/// Creates `dir` and its missing parents with mode 0700, whatever the
/// umask; directories that already exist are left as they are.
pub fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(md) if md.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a directory", dir.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_private_dir_all(parent)?;
    }
    match fs::DirBuilder::new().mode(PRIVATE_DIR).create(dir) {
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR)),
        // Made by someone else meanwhile: as with an existing one.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes `dir` (and missing parents) exist as a private directory: created
/// with mode 0700, and an existing one this user owns set to 0700 (one kept
/// by an earlier version may be 0755). Not for directories an operator
/// chooses, only for those the agent keeps for itself under its state dir.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    create_private_dir_all(dir)?;
    let md = fs::symlink_metadata(dir)?;
    if md.is_dir() && md.uid() == crate::sys::geteuid() && md.mode() & 0o7777 != PRIVATE_DIR {
        fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_files_others_can_write_and_keys_others_can_read() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cluster.toml");
        fs::write(&p, b"x").unwrap();
        for (mode, ok_plain, ok_private) in [
            (0o600, true, true),
            (0o400, true, true),
            (0o644, true, false),
            (0o640, true, false),
            (0o620, false, false),
            (0o602, false, false),
            (0o666, false, false),
            (0o664, false, false),
        ] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            let plain = open_trusted(&p, false);
            assert_eq!(plain.is_ok(), ok_plain, "{mode:o}: {plain:?}");
            let private = open_trusted(&p, true);
            assert_eq!(private.is_ok(), ok_private, "{mode:o}: {private:?}");
            if let Err(e) = private {
                let text = e.to_string();
                assert!(text.contains(&format!("{mode:04o}")), "{text}");
            }
        }
    }

    #[test]
    fn creates_private_files_and_directories() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("a/b/c");
        create_private_dir_all(&dir).unwrap();
        for p in [d.path().join("a"), d.path().join("a/b"), dir.clone()] {
            assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o700, "{}", p.display());
        }
        let f = dir.join("f");
        create_private_file(&f).unwrap();
        assert_eq!(fs::metadata(&f).unwrap().mode() & 0o7777, 0o600);
        let g = dir.join("g");
        fs::write(&g, b"").unwrap();
        fs::set_permissions(&g, fs::Permissions::from_mode(0o644)).unwrap();
        append_private_file(&g).unwrap();
        assert_eq!(fs::metadata(&g).unwrap().mode() & 0o7777, 0o600);
        let old = d.path().join("old");
        fs::create_dir(&old).unwrap();
        fs::set_permissions(&old, fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir_all(&old).unwrap();
        assert_eq!(fs::metadata(&old).unwrap().mode() & 0o7777, 0o755, "left as it was");
        ensure_private_dir(&old).unwrap();
        assert_eq!(fs::metadata(&old).unwrap().mode() & 0o7777, 0o700);
    }
}
