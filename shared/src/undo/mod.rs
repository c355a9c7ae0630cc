//! The undo store, `<state_dir>/undo/`: the files a node's receiver removed
//! or replaced while applying replication, kept for a while so that a
//! mistake on the active (a CA file deleted or overwritten by hand) can be
//! undone from a passive.
//!
//! Layout:
//!
//! - `undo/files/<id>`: each kept file under its number, never under its
//!   own name (a name from the watch never becomes a path in the store).
//!   On the same file system as the watch root the file is the old inode
//!   itself, linked there with `linkat` before it is unlinked or renamed
//!   over: no data is copied and its mode, owner and times stay as they
//!   were. Elsewhere it is a bounded copy (at most `undo_max_size`) made
//!   through the descriptor, with the same mode, owner and times. Links are
//!   kept as links.
//! - `undo/index.jsonl`: one JSON line per entry (watch, path, time, epoch,
//!   size, why, kind, content hash when known, mode, owner, mtime), appended
//!   once per commit, and rewritten when entries are pruned.
//!
//! Entries are kept by a [`Recorder`] (one per receiving session) through
//! the directory handle the applier already holds, and recorded in the
//! index at the commit. A file the store cannot hold (larger than
//! `undo_max_size`, an error) is never let go without a copy by default
//! (`undo_when_full = "refuse"`): the change that would remove or replace
//! it fails, the file stays as it is, and the refusal is logged and
//! counted ([`refused_total`]); the sender retries it like any change the
//! receiver could not apply. With `undo_when_full = "replace"` the change
//! goes ahead without a copy, logged and counted ([`skipped_total`]).
//! Pruning old entries to make room is not a refusal. [`Store::prune`]
//! keeps the store within `undo_max_age` and `undo_max_size` (and
//! [`MAX_ENTRIES`] entries), removing the oldest first. A file linked into
//! the store but not yet in the index when the agent stopped is found at
//! the next start and listed as [`UndoWhy::Unindexed`].

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use rustix::fs::{self as rfs, AtFlags, FileType, OFlags};
use rustix::io::Errno;

use crate::beneath;
use crate::diverged::Reason;
use crate::manifest::Meta;
use crate::proto::{UndoEntry, UndoKind, UndoWhy};

mod index;
mod recorder;
#[cfg(test)]
mod tests;

use index::{index_bytes, parse_id, read_index};
pub use recorder::{Kept, NotKept, Recorder};

/// The most entries the store keeps, whatever their size: the index of a
/// node is held in memory (a few dozen bytes per entry) and rewritten when
/// entries are pruned.
pub const MAX_ENTRIES: usize = 250_000;

/// The index's file name under the store.
const INDEX: &str = "index.jsonl";

/// The folder of the kept files under the store.
const FILES: &str = "files";

/// Longer index lines are damaged, and skipped.
const LINE_MAX: u64 = 64 * 1024;

/// How much the store may hold (`undo_max_size`, `undo_max_age`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most bytes of files kept.
    pub max_size: u64,
    /// How long a file is kept.
    pub max_age: Duration,
}

/// Changes refused because the store could not keep the file they would
/// remove or replace, since the process started.
static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Files pruned since the process started (`warmspare_undo_pruned_total`).
static PRUNED: AtomicU64 = AtomicU64::new(0);

/// Files that could not be kept since the process started
/// (`warmspare_undo_skipped_total`).
static SKIPPED: AtomicU64 = AtomicU64::new(0);

/// Files removed from the store by pruning since the process started.
pub fn pruned_total() -> u64 {
    PRUNED.load(Ordering::Relaxed)
}

/// Files replication removed or replaced that the store could not keep
/// (too large, or an error) since the process started, under
/// `undo_when_full = "replace"`.
pub fn skipped_total() -> u64 {
    SKIPPED.load(Ordering::Relaxed)
}

/// Changes refused since the process started because the store could not
/// keep the file they would remove or replace (`undo_when_full = "refuse"`).
pub fn refused_total() -> u64 {
    REFUSED.load(Ordering::Relaxed)
}

/// What the store knows of a live entry without reading the index.
#[derive(Debug, Clone, Copy)]
struct Live {
    time: i64,
    size: u64,
}

struct Inner {
    /// `undo/files`, open.
    files: Arc<File>,
    /// Every entry with a file, by id (oldest first).
    live: BTreeMap<u64, Live>,
    bytes: u64,
    next_id: u64,
    /// The entry last read (a restore reads one entry chunk by chunk).
    last: Option<UndoEntry>,
}

/// A node's undo store. One per process, shared by every session; loaded
/// (and created) on first use.
pub struct Store {
    dir: PathBuf,
    inner: Mutex<Option<Inner>>,
}

/// What [`Store::prune`] did.
#[derive(Debug, Default)]
pub struct PruneReport {
    /// Entries removed, oldest first: id, bytes, why.
    pub pruned: Vec<(u64, u64, Reason)>,
    /// Entries that should have gone but could not be removed.
    pub failed: Vec<(u64, io::Error)>,
    /// Entries left.
    pub files_left: u64,
    /// Bytes left.
    pub bytes_left: u64,
}

fn now_secs(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

fn meta_of(st: &rfs::Stat) -> Meta {
    Meta {
        mode: st.st_mode & 0o7777,
        mtime: st.st_mtime,
        mtime_nsec: (st.st_mtime_nsec as i64).clamp(0, 999_999_999) as u32,
        uid: st.st_uid,
        gid: st.st_gid,
    }
}

impl Store {
    /// The store in `dir` (`<state_dir>/undo`); nothing is read or made yet.
    pub fn new(dir: PathBuf) -> Store {
        Store {
            dir,
            inner: Mutex::new(None),
        }
    }

    /// Where the store is.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, Option<Inner>>> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(self.load()?);
        }
        Ok(g)
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> io::Result<R>) -> io::Result<R> {
        let mut g = self.lock()?;
        match g.as_mut() {
            Some(inner) => f(inner),
            None => Err(io::Error::other("the undo store is not loaded")),
        }
    }

    /// Makes the store's folders, reads its index and looks at its files:
    /// index lines without a file are dropped, files without a line are
    /// adopted as [`UndoWhy::Unindexed`].
    fn load(&self) -> io::Result<Inner> {
        crate::perms::ensure_private_dir(&self.dir)?;
        let files_path = self.dir.join(FILES);
        crate::perms::ensure_private_dir(&files_path)?;
        let files = beneath::open_root(&files_path)?;
        let index_path = self.dir.join(INDEX);
        let mut entries = read_index(&index_path)?;
        let mut on_disk: BTreeMap<u64, rfs::Stat> = BTreeMap::new();
        for item in rfs::Dir::read_from(&files)? {
            let item = item?;
            let Some(id) = parse_id(item.file_name().to_bytes()) else {
                continue;
            };
            if let Ok(st) = rfs::statat(&files, item.file_name(), AtFlags::SYMLINK_NOFOLLOW) {
                on_disk.insert(id, st);
            }
        }
        let before = entries.len();
        entries.retain(|id, _| on_disk.contains_key(id));
        let mut dirty = entries.len() != before;
        for (id, st) in &on_disk {
            if entries.contains_key(id) {
                continue;
            }
            let kind = match FileType::from_raw_mode(st.st_mode) {
                FileType::RegularFile => UndoKind::File,
                FileType::Symlink => UndoKind::Symlink,
                _ => continue,
            };
            tracing::warn!(id, "a file in the undo store had no index entry; listed as unindexed");
            entries.insert(
                *id,
                UndoEntry {
                    id: *id,
                    watch: String::new(),
                    path: String::new(),
                    time: st.st_ctime,
                    epoch: 0,
                    size: st.st_size as u64,
                    why: UndoWhy::Unindexed,
                    kind,
                    hash: None,
                    meta: meta_of(st),
                },
            );
            dirty = true;
        }
        if dirty {
            crate::persist::write_atomic(&index_path, &index_bytes(entries.values())?)?;
        }
        let mut live = BTreeMap::new();
        let mut bytes = 0u64;
        for (id, e) in &entries {
            let size = on_disk.get(id).map_or(e.size, |st| st.st_size as u64);
            bytes = bytes.saturating_add(size);
            live.insert(*id, Live { time: e.time, size });
        }
        let next_id = on_disk
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
            .max(entries.keys().next_back().copied().unwrap_or(0))
            + 1;
        Ok(Inner {
            files: Arc::new(files),
            live,
            bytes,
            next_id,
            last: None,
        })
    }

    /// Files and bytes the store holds.
    pub fn totals(&self) -> io::Result<(u64, u64)> {
        self.with(|i| Ok((i.live.len() as u64, i.bytes)))
    }

    /// A new id, and the folder to put its file in.
    fn alloc(&self) -> io::Result<(u64, Arc<File>)> {
        self.with(|i| {
            let id = i.next_id;
            i.next_id += 1;
            Ok((id, i.files.clone()))
        })
    }

    /// Makes the files of `entries` durable and records them in the index.
    fn record(&self, entries: &[UndoEntry]) -> io::Result<()> {
        self.with(|i| {
            i.files.sync_all()?;
            let mut f = crate::perms::append_private_file(&self.dir.join(INDEX))?;
            f.write_all(&index_bytes(entries.iter())?)?;
            f.sync_data()?;
            for e in entries {
                if i.live
                    .insert(
                        e.id,
                        Live {
                            time: e.time,
                            size: e.size,
                        },
                    )
                    .is_none()
                {
                    i.bytes = i.bytes.saturating_add(e.size);
                }
            }
            Ok(())
        })
    }

    /// Removes entries until the store is within `limits`: every entry
    /// older than `max_age`, then the oldest while the total is over
    /// `max_size` or there are more than [`MAX_ENTRIES`].
    pub fn prune(&self, limits: &Limits, now: SystemTime) -> io::Result<PruneReport> {
        self.with(|i| {
            let cutoff = now_secs(now).saturating_sub(limits.max_age.as_secs().min(i64::MAX as u64) as i64);
            let mut doomed: Vec<(u64, u64, Reason)> = i
                .live
                .iter()
                .filter(|(_, l)| l.time < cutoff)
                .map(|(id, l)| (*id, l.size, Reason::Age))
                .collect();
            let mut bytes = i.bytes.saturating_sub(doomed.iter().map(|d| d.1).sum::<u64>());
            let mut count = i.live.len() - doomed.len();
            for (id, l) in &i.live {
                if bytes <= limits.max_size && count <= MAX_ENTRIES {
                    break;
                }
                if doomed.iter().any(|d| d.0 == *id) {
                    continue;
                }
                doomed.push((*id, l.size, Reason::Size));
                bytes = bytes.saturating_sub(l.size);
                count -= 1;
            }
            doomed.sort_by_key(|d| d.0);
            let mut report = PruneReport::default();
            for (id, size, reason) in doomed {
                match rfs::unlinkat(&*i.files, id.to_string(), AtFlags::empty()) {
                    Ok(()) | Err(Errno::NOENT) => {
                        i.live.remove(&id);
                        i.bytes = i.bytes.saturating_sub(size);
                        report.pruned.push((id, size, reason));
                    }
                    Err(e) => report.failed.push((id, e.into())),
                }
            }
            if !report.pruned.is_empty() {
                PRUNED.fetch_add(report.pruned.len() as u64, Ordering::Relaxed);
                let index_path = self.dir.join(INDEX);
                let mut entries = read_index(&index_path)?;
                entries.retain(|id, _| i.live.contains_key(id));
                crate::persist::write_atomic(&index_path, &index_bytes(entries.values())?)?;
                if i.last.as_ref().is_some_and(|e| !i.live.contains_key(&e.id)) {
                    i.last = None;
                }
            }
            report.files_left = i.live.len() as u64;
            report.bytes_left = i.bytes;
            Ok(report)
        })
    }

    /// The entries, oldest first; with `watch`, only those of that watch.
    pub fn list(&self, watch: Option<&str>) -> io::Result<Vec<UndoEntry>> {
        self.with(|i| {
            let entries = read_index(&self.dir.join(INDEX))?;
            Ok(entries
                .into_values()
                .filter(|e| i.live.contains_key(&e.id))
                .filter(|e| watch.is_none_or(|w| e.watch == w))
                .collect())
        })
    }

    /// The entry `id`, if the store holds it.
    pub fn entry(&self, id: u64) -> io::Result<Option<UndoEntry>> {
        self.with(|i| find(i, &self.dir, id))
    }

    /// Up to `max` bytes of entry `id` from `offset` (a link: its target,
    /// whole, from offset 0), and whether they reach its end. The file is
    /// read through a descriptor opened in the store without following a
    /// link: a file where the entry says link, or the other way round, is
    /// an error.
    pub fn read(&self, id: u64, offset: u64, max: usize) -> io::Result<(UndoEntry, Vec<u8>, bool)> {
        let (entry, files) = self.with(|i| match find(i, &self.dir, id)? {
            Some(e) => Ok((e, i.files.clone())),
            None => Err(io::Error::new(io::ErrorKind::NotFound, format!("no undo entry {id}"))),
        })?;
        let name = id.to_string();
        match entry.kind {
            UndoKind::Symlink => {
                let target = beneath::read_link(&files, &name)?;
                let bytes = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str()).to_vec();
                if offset != 0 {
                    return Err(io::Error::other("a link is read whole, from offset 0"));
                }
                Ok((entry, bytes, true))
            }
            UndoKind::File => {
                let file = beneath::open_in(&files, &name, OFlags::RDONLY)?;
                let md = file.metadata()?;
                if !md.is_file() {
                    return Err(io::Error::other(format!("undo entry {id} is not a regular file")));
                }
                let want = (md.len().saturating_sub(offset)).min(max as u64) as usize;
                let mut buf = vec![0u8; want];
                let mut got = 0;
                while got < want {
                    match file.read_at(&mut buf[got..], offset + got as u64) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                buf.truncate(got);
                let last = offset + got as u64 >= md.len();
                Ok((entry, buf, last))
            }
        }
    }
}

fn find(i: &mut Inner, dir: &Path, id: u64) -> io::Result<Option<UndoEntry>> {
    if !i.live.contains_key(&id) {
        return Ok(None);
    }
    if let Some(e) = i.last.as_ref().filter(|e| e.id == id) {
        return Ok(Some(e.clone()));
    }
    let found = read_index(&dir.join(INDEX))?.remove(&id);
    i.last = found.clone();
    Ok(found)
}
