//! Manifests: what a watched tree holds, entry by entry.
//!
//! A manifest lists every directory, regular file and symbolic link under a
//! watch root with its metadata and, for files, a BLAKE3 content hash. Hashes
//! are cached by inode, size, mtime and ctime so a rescan (or a restart, the
//! cache is persisted) re-reads only what changed. Temporary files of the
//! applier and excluded paths never enter a manifest.
//!
//! Content hashes and their cache are in `hash`, the `exclude` globs in
//! `exclude`, the walk of a tree in `scan`.

use std::fs;
use std::os::unix::fs::MetadataExt;

use serde::{Deserialize, Serialize};

use crate::relpath::{check_rel_path, BadPath};

mod exclude;
mod hash;
mod scan;

pub use exclude::{ExcludeError, Excludes};
pub use hash::{ContentHash, HashCache, PathHasher};
pub use scan::{join, scan, scan_with, Hashing, Scan, Skipped};

/// What kind of thing an entry is, with what identifies its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file of `size` bytes with content `hash`.
    File {
        /// Size in bytes.
        size: u64,
        /// BLAKE3 of the content.
        hash: ContentHash,
    },
    /// A symbolic link to `target` (never followed).
    Symlink {
        /// The link's target, as stored in the link.
        target: String,
    },
}

/// Metadata kept along with content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Meta {
    /// Permission bits (including setuid/setgid/sticky), without the type.
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
}

impl Meta {
    /// Reads the metadata of `md`.
    pub fn from_metadata(md: &fs::Metadata) -> Meta {
        Meta::from_status(&Status::from(md))
    }

    /// Reads the metadata of a status.
    pub fn from_status(st: &Status) -> Meta {
        Meta {
            mode: st.mode & 0o7777,
            mtime: st.mtime,
            mtime_nsec: st.mtime_nsec.clamp(0, 999_999_999) as u32,
            uid: st.uid,
            gid: st.gid,
        }
    }

    /// Whether two metadata agree on what replication keeps. Owners are only
    /// compared when `owners` is set (the receiver can change them); the
    /// mtime of directories is not compared (applying files changes it).
    pub fn same_as(&self, other: &Meta, kind: &EntryKind, owners: bool) -> bool {
        let owner_ok = !owners || (self.uid == other.uid && self.gid == other.gid);
        match kind {
            EntryKind::Symlink { .. } => owner_ok,
            EntryKind::Dir => owner_ok && self.mode == other.mode,
            EntryKind::File { .. } => {
                owner_ok && self.mode == other.mode && self.mtime == other.mtime && self.mtime_nsec == other.mtime_nsec
            }
        }
    }
}

/// What a scan reads of an entry's status: from std's metadata or from
/// an `fstatat` of a name in a directory handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Type and permission bits (`st_mode`).
    pub mode: u32,
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: i64,
    /// Status change time, seconds since the epoch.
    pub ctime: i64,
    /// Nanoseconds of the status change time.
    pub ctime_nsec: i64,
}

impl Status {
    fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }

    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        self.kind() == libc::S_IFDIR
    }

    /// Whether this is a regular file.
    pub fn is_file(&self) -> bool {
        self.kind() == libc::S_IFREG
    }

    /// Whether this is a symbolic link.
    pub fn is_symlink(&self) -> bool {
        self.kind() == libc::S_IFLNK
    }
}

impl From<&fs::Metadata> for Status {
    fn from(md: &fs::Metadata) -> Status {
        Status {
            mode: md.mode(),
            ino: md.ino(),
            size: md.size(),
            uid: md.uid(),
            gid: md.gid(),
            mtime: md.mtime(),
            mtime_nsec: md.mtime_nsec(),
            ctime: md.ctime(),
            ctime_nsec: md.ctime_nsec(),
        }
    }
}

impl From<&rustix::fs::Stat> for Status {
    fn from(st: &rustix::fs::Stat) -> Status {
        Status {
            mode: st.st_mode,
            ino: st.st_ino,
            size: st.st_size as u64,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: st.st_mtime,
            mtime_nsec: st.st_mtime_nsec as i64,
            ctime: st.st_ctime,
            ctime_nsec: st.st_ctime_nsec as i64,
        }
    }
}

/// One entry of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative path under the watch root, `/`-separated, normalised.
    pub path: String,
    /// What the entry is.
    pub kind: EntryKind,
    /// Its metadata.
    pub meta: Meta,
}

impl Entry {
    /// Whether two entries have the same content (type and bytes or target).
    pub fn same_content(&self, other: &Entry) -> bool {
        self.kind == other.kind
    }

    /// The content hash, for files.
    pub fn hash(&self) -> Option<ContentHash> {
        match &self.kind {
            EntryKind::File { hash, .. } => Some(*hash),
            _ => None,
        }
    }
}

/// Checks a manifest received from a peer: every path must be one the peer
/// itself would accept on the wire (see [`check_rel_path`]).
/// A manifest that fails ends the session.
pub fn check_peer_entries(entries: &[Entry]) -> Result<(), BadPath> {
    for e in entries {
        check_rel_path(&e.path)?;
    }
    Ok(())
}
