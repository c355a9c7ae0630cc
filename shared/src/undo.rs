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
//! index at the commit. Keeping a file never blocks replication: a file the
//! store cannot hold (larger than `undo_max_size`, an error) is logged and
//! counted ([`skipped_total`]), and the change goes ahead. [`Store::prune`]
//! keeps the store within `undo_max_age` and `undo_max_size` (and
//! [`MAX_ENTRIES`] entries), removing the oldest first. A file linked into
//! the store but not yet in the index when the agent stopped is found at
//! the next start and listed as [`UndoWhy::Unindexed`].

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use crate::beneath;
use crate::diverged::Reason;
use crate::manifest::{ContentHash, Meta};
use crate::proto::{UndoEntry, UndoKind, UndoWhy};

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
/// (too large, or an error) since the process started.
pub fn skipped_total() -> u64 {
    SKIPPED.load(Ordering::Relaxed)
}

/// One index line (the hash in hex).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Line {
    id: u64,
    watch: String,
    path: String,
    time: i64,
    epoch: u64,
    size: u64,
    why: UndoWhy,
    kind: UndoKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hash: Option<String>,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    mtime_nsec: u32,
}

impl Line {
    fn of(e: &UndoEntry) -> Line {
        Line {
            id: e.id,
            watch: e.watch.clone(),
            path: e.path.clone(),
            time: e.time,
            epoch: e.epoch,
            size: e.size,
            why: e.why,
            kind: e.kind,
            hash: e.hash.map(|h| h.to_string()),
            mode: e.meta.mode,
            uid: e.meta.uid,
            gid: e.meta.gid,
            mtime: e.meta.mtime,
            mtime_nsec: e.meta.mtime_nsec,
        }
    }

    fn entry(self) -> UndoEntry {
        let hash = self.hash.and_then(|h| {
            let mut b = [0u8; 32];
            hex::decode_to_slice(h, &mut b).ok().map(|()| ContentHash(b))
        });
        UndoEntry {
            id: self.id,
            watch: self.watch,
            path: self.path,
            time: self.time,
            epoch: self.epoch,
            size: self.size,
            why: self.why,
            kind: self.kind,
            hash,
            meta: Meta {
                mode: self.mode,
                mtime: self.mtime,
                mtime_nsec: self.mtime_nsec,
                uid: self.uid,
                gid: self.gid,
            },
        }
    }
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

/// An id as a file name: decimal digits, no leading zero.
fn parse_id(name: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(name).ok()?;
    let id: u64 = s.parse().ok()?;
    (id.to_string() == s).then_some(id)
}

/// Reads the index: every well-formed line, by id (a later line wins).
/// Damaged lines are skipped; a missing index is empty.
fn read_index(path: &Path) -> io::Result<BTreeMap<u64, UndoEntry>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e),
    };
    let mut reader = io::BufReader::new(file);
    let mut out = BTreeMap::new();
    let mut buf = Vec::new();
    let mut damaged = 0u64;
    loop {
        buf.clear();
        let n = (&mut reader).take(LINE_MAX).read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        if buf.last() != Some(&b'\n') && n as u64 == LINE_MAX {
            // Too long: skip to the end of the line, a bounded piece at a time.
            damaged += 1;
            loop {
                buf.clear();
                let m = (&mut reader).take(LINE_MAX).read_until(b'\n', &mut buf)?;
                if m == 0 || buf.last() == Some(&b'\n') {
                    break;
                }
            }
            continue;
        }
        match serde_json::from_slice::<Line>(&buf) {
            Ok(l) => {
                out.insert(l.id, l.entry());
            }
            Err(_) => damaged += 1,
        }
    }
    if damaged > 0 {
        tracing::warn!(index = %path.display(), lines = damaged, "skipped damaged lines of the undo index");
    }
    Ok(out)
}

fn index_bytes<'a>(entries: impl Iterator<Item = &'a UndoEntry>) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for e in entries {
        serde_json::to_writer(&mut out, &Line::of(e)).map_err(io::Error::other)?;
        out.push(b'\n');
    }
    Ok(out)
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

/// What [`Recorder::keep`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// Kept as this entry.
    Kept(u64),
    /// Nothing to keep there (gone, a directory, a special file).
    Nothing,
    /// Not kept (too large, or an error), logged and counted.
    Skipped,
}

/// Keeps files for one receiving session and records them at its commits
/// (and when it is dropped).
pub struct Recorder {
    store: Arc<Store>,
    epoch: u64,
    max_size: u64,
    skip: Vec<String>,
    pending: Vec<UndoEntry>,
    chown: bool,
}

impl Recorder {
    /// A recorder for a session at `epoch`, keeping files up to `max_size`
    /// bytes each.
    pub fn new(store: Arc<Store>, epoch: u64, max_size: u64) -> Recorder {
        Recorder {
            store,
            epoch,
            max_size,
            skip: Vec::new(),
            pending: Vec::new(),
            chown: crate::sys::geteuid() == 0,
        }
    }

    /// Keeps nothing of the watch `name` (an internal one, whose files
    /// are kept elsewhere).
    pub fn skip_watch(mut self, name: &str) -> Recorder {
        self.skip.push(name.to_string());
        self
    }

    /// Whether files of `watch` are kept.
    pub fn wants(&self, watch: &str) -> bool {
        !self.skip.iter().any(|s| s == watch)
    }

    /// Keeps the file or link `name` of the directory open as `dir` (known
    /// as `rel` in `watch`), about to be removed or replaced for `why`:
    /// linked into the store from a descriptor opened without following
    /// it, or copied where the store is on another file system. `hash_of`
    /// gives its content hash when known for exactly that inode (it gets
    /// the descriptor's metadata before anything changes it). Never fails:
    /// what cannot be kept is logged and counted.
    pub fn keep(
        &mut self,
        dir: &File,
        name: &str,
        watch: &str,
        rel: &str,
        why: UndoWhy,
        hash_of: impl FnOnce(&std::fs::Metadata) -> Option<ContentHash>,
    ) -> Kept {
        match self.try_keep(dir, name, watch, rel, why, hash_of) {
            Ok(k) => k,
            Err(e) => {
                SKIPPED.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(watch, path = %crate::text::escape_controls(rel), error = %e, "cannot keep a file in the undo store; it is replaced or removed without a copy");
                Kept::Skipped
            }
        }
    }

    fn try_keep(
        &mut self,
        dir: &File,
        name: &str,
        watch: &str,
        rel: &str,
        why: UndoWhy,
        hash_of: impl FnOnce(&std::fs::Metadata) -> Option<ContentHash>,
    ) -> io::Result<Kept> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(io::Error::other("bad name"));
        }
        let fd = match rfs::openat(
            dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => File::from(fd),
            Err(Errno::NOENT) => return Ok(Kept::Nothing),
            Err(e) => return Err(e.into()),
        };
        let md = fd.metadata()?;
        let kind = if md.file_type().is_file() {
            UndoKind::File
        } else if md.file_type().is_symlink() {
            UndoKind::Symlink
        } else {
            return Ok(Kept::Nothing);
        };
        if md.len() > self.max_size {
            SKIPPED.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                watch,
                path = %crate::text::escape_controls(rel),
                size = md.len(),
                undo_max_size = self.max_size,
                "a file larger than undo_max_size is replaced or removed without a copy in the undo store"
            );
            return Ok(Kept::Skipped);
        }
        let hash = match kind {
            UndoKind::File => hash_of(&md),
            UndoKind::Symlink => None,
        };
        let (id, files) = self.store.alloc()?;
        let id_name = id.to_string();
        let mut size = md.len();
        match crate::sys::link_unnamed(&fd, &files, std::ffi::OsStr::new(&id_name)) {
            Ok(()) => {}
            // Another file system, or a kernel that will not link this
            // file for this process: a copy, within the same bound.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EXDEV | libc::EPERM | libc::EACCES)) => {
                size = copy_into(dir, name, &md, kind, &files, &id_name, self.max_size, self.chown)?;
            }
            Err(e) => return Err(e),
        }
        self.pending.push(UndoEntry {
            id,
            watch: watch.to_string(),
            path: rel.to_string(),
            time: now_secs(SystemTime::now()),
            epoch: self.epoch,
            size,
            why,
            kind,
            hash,
            meta: Meta::from_metadata(&md),
        });
        Ok(Kept::Kept(id))
    }

    /// Records what was kept since the last call in the index (one write
    /// and one sync); returns how many entries.
    pub fn commit(&mut self) -> usize {
        if self.pending.is_empty() {
            return 0;
        }
        let pending = std::mem::take(&mut self.pending);
        match self.store.record(&pending) {
            Ok(()) => pending.len(),
            Err(e) => {
                // The files stay in the store; the next start lists them
                // as unindexed.
                tracing::warn!(error = %e, files = pending.len(), "cannot record kept files in the undo index");
                0
            }
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // Removals happen at once, not at a commit: what they kept is
        // recorded even when the session ends without one.
        self.commit();
    }
}

/// Copies the file or link `name` of `dir` (whose metadata is `md`) into
/// the store as `id_name`, at most `max` bytes, with its mode, owner (when
/// `chown`) and times; returns its size.
#[allow(clippy::too_many_arguments)]
fn copy_into(
    dir: &File,
    name: &str,
    md: &std::fs::Metadata,
    kind: UndoKind,
    files: &File,
    id_name: &str,
    max: u64,
    chown: bool,
) -> io::Result<u64> {
    match kind {
        UndoKind::Symlink => {
            let target = beneath::read_link(dir, name)?;
            let target = target
                .to_str()
                .ok_or_else(|| io::Error::other("a link target that is not UTF-8"))?;
            beneath::symlink(target, files, id_name)?;
            if chown {
                let _ = beneath::lchown(files, id_name, md.uid(), md.gid());
            }
            Ok(target.len() as u64)
        }
        UndoKind::File => {
            let src = beneath::open_in(dir, name, OFlags::RDONLY)?;
            let smd = src.metadata()?;
            if (smd.dev(), smd.ino()) != (md.dev(), md.ino()) {
                return Err(io::Error::other("the file changed while it was being kept"));
            }
            let mut dst = beneath::create_private(files, id_name)?;
            let copied = (|| {
                let n = io::copy(&mut (&src).take(max), &mut dst)?;
                if chown {
                    beneath::fchown(&dst, md.uid(), md.gid())?;
                }
                beneath::fchmod(&dst, md.mode())?;
                beneath::set_times(&dst, md.mtime(), md.mtime_nsec().clamp(0, 999_999_999) as u32)?;
                dst.sync_data()?;
                Ok::<u64, io::Error>(n)
            })();
            if copied.is_err() {
                let _ = beneath::unlink(files, id_name);
            }
            copied
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const DAY: Duration = Duration::from_secs(86_400);

    fn keep_file(r: &mut Recorder, dir: &Path, name: &str, data: &[u8]) -> Kept {
        fs::write(dir.join(name), data).unwrap();
        let d = File::open(dir).unwrap();
        let k = r.keep(&d, name, "ca", &format!("signed/{name}"), UndoWhy::Removed, |_| {
            Some(ContentHash::of(data))
        });
        fs::remove_file(dir.join(name)).unwrap();
        k
    }

    #[test]
    fn keeps_records_lists_and_reads_back_with_metadata() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        fs::create_dir(&root).unwrap();
        let store = Arc::new(Store::new(t.path().join("undo")));
        let mut r = Recorder::new(store.clone(), 7, 1 << 20);
        fs::write(root.join("a.pem"), b"cert a").unwrap();
        let f = File::open(root.join("a.pem")).unwrap();
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o640))
            .unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000))
            .unwrap();
        let d = File::open(&root).unwrap();
        let k = r.keep(&d, "a.pem", "ca", "signed/a.pem", UndoWhy::Replaced, |_| {
            Some(ContentHash::of(b"cert a"))
        });
        let Kept::Kept(id) = k else { panic!("{k:?}") };
        // Replaced after it was kept: the store still has the old content.
        fs::write(root.join("new"), b"other").unwrap();
        fs::rename(root.join("new"), root.join("a.pem")).unwrap();
        std::os::unix::fs::symlink("../elsewhere", root.join("link")).unwrap();
        assert!(matches!(
            r.keep(&d, "link", "ca", "link", UndoWhy::Removed, |_| None),
            Kept::Kept(_)
        ));
        assert_eq!(
            r.keep(&d, "missing", "ca", "missing", UndoWhy::Removed, |_| None),
            Kept::Nothing
        );
        // Nothing is listed before the commit records it.
        assert!(store.list(None).unwrap().is_empty());
        assert_eq!(r.commit(), 2);
        let list = store.list(None).unwrap();
        assert_eq!(list.len(), 2);
        let e = &list[0];
        assert_eq!((e.id, e.watch.as_str(), e.path.as_str()), (id, "ca", "signed/a.pem"));
        assert_eq!(
            (e.epoch, e.size, e.why, e.kind),
            (7, 6, UndoWhy::Replaced, UndoKind::File)
        );
        assert_eq!(e.hash, Some(ContentHash::of(b"cert a")));
        assert_eq!((e.meta.mode, e.meta.mtime), (0o640, 1_600_000_000));
        let (_, data, last) = store.read(id, 0, 4).unwrap();
        assert_eq!((data.as_slice(), last), (&b"cert"[..], false));
        let (_, data, last) = store.read(id, 4, 4).unwrap();
        assert_eq!((data.as_slice(), last), (&b" a"[..], true));
        let (l, data, _) = store.read(list[1].id, 0, 100).unwrap();
        assert_eq!((l.kind, data.as_slice()), (UndoKind::Symlink, &b"../elsewhere"[..]));
        assert_eq!(store.list(Some("other")).unwrap().len(), 0);
        assert_eq!(store.totals().unwrap(), (2, 6 + 12));
        // A fresh store (a restart) finds the same.
        let again = Store::new(t.path().join("undo"));
        assert_eq!(again.list(None).unwrap(), list);
    }

    #[test]
    fn prunes_by_age_then_oldest_first_by_size() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        let store = Arc::new(Store::new(t.path().join("undo")));
        let mut r = Recorder::new(store.clone(), 1, 1 << 20);
        let mut ids = Vec::new();
        for i in 0..5 {
            let Kept::Kept(id) = keep_file(&mut r, &src, &format!("f{i}"), &[b'x'; 100]) else {
                panic!()
            };
            ids.push(id);
        }
        r.commit();
        let before = pruned_total();
        let now = SystemTime::now();
        let limits = Limits {
            max_size: 1 << 30,
            max_age: DAY,
        };
        assert!(store.prune(&limits, now).unwrap().pruned.is_empty());
        let later = store.prune(
            &Limits {
                max_size: 250,
                max_age: 3 * DAY,
            },
            now,
        );
        let rep = later.unwrap();
        // 500 bytes, 250 allowed: the three oldest go.
        let gone: Vec<(u64, Reason)> = rep.pruned.iter().map(|p| (p.0, p.2)).collect();
        assert_eq!(
            gone,
            vec![(ids[0], Reason::Size), (ids[1], Reason::Size), (ids[2], Reason::Size)]
        );
        assert_eq!((rep.files_left, rep.bytes_left), (2, 200));
        assert!(!t.path().join("undo/files").join(ids[0].to_string()).exists());
        assert!(t.path().join("undo/files").join(ids[3].to_string()).exists());
        let left: Vec<u64> = store.list(None).unwrap().iter().map(|e| e.id).collect();
        assert_eq!(left, vec![ids[3], ids[4]]);
        let rep = store.prune(&limits, now + 2 * DAY).unwrap();
        assert_eq!(rep.pruned.iter().map(|p| p.2).collect::<Vec<_>>(), vec![Reason::Age; 2]);
        assert_eq!(store.totals().unwrap(), (0, 0));
        assert!(pruned_total() >= before + 5);
        // The index agrees after a restart.
        assert!(Store::new(t.path().join("undo")).list(None).unwrap().is_empty());
    }

    #[test]
    fn too_large_files_are_skipped_and_counted() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        let store = Arc::new(Store::new(t.path().join("undo")));
        let mut r = Recorder::new(store.clone(), 1, 10);
        let before = skipped_total();
        assert_eq!(keep_file(&mut r, &src, "big", &[0u8; 11]), Kept::Skipped);
        assert!(matches!(keep_file(&mut r, &src, "ok", &[0u8; 10]), Kept::Kept(_)));
        drop(r);
        assert!(skipped_total() > before);
        let list = store.list(None).unwrap();
        assert_eq!(list.len(), 1, "dropping the recorder records what it kept");
        assert_eq!(list[0].path, "signed/ok");
    }

    #[test]
    fn a_restart_adopts_unindexed_files_drops_lost_ones_and_skips_damage() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        let dir = t.path().join("undo");
        let store = Arc::new(Store::new(dir.clone()));
        let mut r = Recorder::new(store.clone(), 3, 1 << 20);
        let Kept::Kept(a) = keep_file(&mut r, &src, "a", b"aaa") else {
            panic!()
        };
        let Kept::Kept(b) = keep_file(&mut r, &src, "b", b"bb") else {
            panic!()
        };
        r.commit();
        // Kept but never recorded (a crash before the commit).
        let Kept::Kept(c) = keep_file(&mut r, &src, "c", b"c") else {
            panic!()
        };
        std::mem::forget(r);
        fs::remove_file(dir.join("files").join(b.to_string())).unwrap();
        let mut idx = fs::OpenOptions::new()
            .append(true)
            .open(dir.join("index.jsonl"))
            .unwrap();
        idx.write_all(b"{not json\n").unwrap();
        idx.write_all(&vec![b'x'; 100_000]).unwrap();
        idx.write_all(b"\n").unwrap();
        fs::write(dir.join("files/not-a-number"), b"?").unwrap();
        let again = Store::new(dir.clone());
        let list = again.list(None).unwrap();
        let ids: Vec<(u64, UndoWhy)> = list.iter().map(|e| (e.id, e.why)).collect();
        assert_eq!(ids, vec![(a, UndoWhy::Removed), (c, UndoWhy::Unindexed)]);
        assert_eq!(again.totals().unwrap(), (2, 4));
        // New ids never reuse an old one.
        let mut r = Recorder::new(Arc::new(again), 3, 1 << 20);
        let Kept::Kept(d) = keep_file(&mut r, &src, "d", b"d") else {
            panic!()
        };
        assert!(d > c);
    }

    #[test]
    fn reading_refuses_an_entry_whose_file_is_not_what_the_index_says() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        let dir = t.path().join("undo");
        let store = Arc::new(Store::new(dir.clone()));
        let mut r = Recorder::new(store.clone(), 3, 1 << 20);
        let Kept::Kept(a) = keep_file(&mut r, &src, "a", b"aaa") else {
            panic!()
        };
        r.commit();
        // Swapped for a link to a file outside the store.
        fs::write(t.path().join("secret"), b"outside").unwrap();
        let p = dir.join("files").join(a.to_string());
        fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink(t.path().join("secret"), &p).unwrap();
        let e = store.read(a, 0, 100);
        assert!(e.is_err(), "{e:?}");
        assert!(store.read(a + 100, 0, 100).is_err());
    }
}
