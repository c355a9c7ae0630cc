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
pub use hash::{ContentHash, HashCache};
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
        Meta {
            mode: md.mode() & 0o7777,
            mtime: md.mtime(),
            mtime_nsec: md.mtime_nsec().clamp(0, 999_999_999) as u32,
            uid: md.uid(),
            gid: md.gid(),
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
