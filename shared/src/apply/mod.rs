//! The receiving side of replication: confined, atomic application of [`Op`]s.
//!
//! [`Applier`] is synchronous; the agent runs it on a blocking worker, and
//! its only thread of its own starts write-back early (see `Flusher`).
//! Every path from the wire is checked ([`check_rel_path`](crate::relpath::check_rel_path)) and then used only
//! beneath its watch root, through directory handles (see [`crate::beneath`]):
//! the root is opened without following a link, each directory below it with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` (or an `O_NOFOLLOW` walk),
//! and every change is made relative to such a handle. File content is
//! written to a temporary file in its target's directory (without a name,
//! `O_TMPFILE`, for small files; `.warmspare-tmp.*` for large ones and where
//! the filesystem has no unnamed files), checked against the announced
//! BLAKE3 hash, and only linked or renamed into place at
//! [`Applier::commit`], after the data is durable; the directories are made
//! durable before the commit is acknowledged. A reader therefore sees the old
//! file or the new one, never a part of one.
//!
//! This file holds the types, the set-up and the dispatch of operations;
//! `handles` the directory handles of a batch, `ops` the operations without
//! content, `stage` the incoming files, `temps` their temporary files,
//! `preserve` moving aside and keeping what is replaced, `commit` the commit
//! and its durability. The submodules import the types they share from
//! here, by name; this file imports nothing from them and names what it
//! uses of them by path (`temps::Output`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustix::fs::OFlags;

use crate::beneath::{self, split};
use crate::delta;
use crate::ledger::Ledgers;
use crate::local::{Stamp, Tracker};
use crate::manifest::{self, ContentHash, Entry, Excludes, HashCache, Meta};
use crate::proto::Op;
use crate::relpath::{check_rel_path, BadPath};

mod commit;
mod failure;
mod handles;
mod ops;
mod patch;
mod preserve;
mod stage;
mod temps;
#[cfg(test)]
mod tests;

pub use failure::{FailReason, Failure};
pub use temps::clean_temps;

/// Whether this process can give files away (it runs as root), and so
/// replicates owners.
pub fn can_chown() -> bool {
    crate::sys::geteuid() == 0
}

/// A commit whose changes could not be made durable: it must not be
/// acknowledged (the changes may be visible now and gone after a crash).
#[derive(Debug, thiserror::Error)]
#[error("cannot make the batch durable: {0}")]
pub struct NotDurable(pub io::Error);

/// An [`Op`] or a request that must end the session: the peer broke the
/// protocol or tried to leave its root.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// A path breaks the rules of [`check_rel_path`](crate::relpath::check_rel_path).
    #[error(transparent)]
    Path(#[from] BadPath),
    /// The request names a watch this node does not have.
    #[error("refused: unknown watch {0:?}")]
    UnknownWatch(String),
    /// The watch's root cannot be opened as a directory (it was replaced by
    /// a link, or is gone).
    #[error("refused: watch {watch:?}: the root cannot be used: {source}")]
    RootUnusable {
        /// The watch.
        watch: String,
        /// Why the root cannot be opened.
        source: io::Error,
    },
    /// An operation other than file data arrived while a file was open.
    #[error("refused: an operation arrived in the middle of a file")]
    InMiddleOfFile,
    /// File data or a file's end arrived where no file was begun.
    #[error("refused: an operation arrived out of place")]
    OutOfPlace,
    /// File data arrived while no file was open.
    #[error("refused: file data outside a file")]
    DataOutsideFile,
    /// A file sent more data than it announced.
    #[error("refused: {watch}/{path}: more data than the announced size")]
    TooMuchData {
        /// The watch.
        watch: String,
        /// The file's path in the watch.
        path: String,
    },
    /// A hole arrived while no file was open.
    #[error("refused: a hole outside a file")]
    HoleOutsideFile,
    /// A hole arrived in a delta (deltas carry no holes).
    #[error("refused: {watch}/{path}: a hole in a delta")]
    HoleInDelta {
        /// The watch.
        watch: String,
        /// The file's path in the watch.
        path: String,
    },
    /// A file's end arrived while no file was open.
    #[error("refused: end of a file that was not begun")]
    EndNotBegun,
}

/// One replicated directory as the receiver sees it.
pub struct WatchRoot {
    /// The watch's name.
    pub name: String,
    /// Its local root directory.
    pub root: PathBuf,
    /// Its exclusions (honoured on the receiver too).
    pub excludes: Excludes,
    /// Hashes of the files under the root.
    pub cache: HashCache,
    /// Where the cache is persisted.
    pub cache_path: Option<PathBuf>,
}

struct Incoming {
    watch: String,
    rel: String,
    /// The target's directory, open beneath the root.
    dir: Arc<File>,
    /// The target's name in `dir`.
    name: String,
    stage: Stage,
    writer: Option<BufWriter<temps::Output>>,
    /// The data of a file staged in memory ([`Stage::InMemory`]).
    in_memory: Vec<u8>,
    hasher: blake3::Hasher,
    written: u64,
    size: u64,
    hash: ContentHash,
    meta: Meta,
    /// For deltas: the thread that applies the delta as it arrives.
    delta: Option<patch::Patcher>,
}

/// Where an incoming file is written (the file itself is in its writer), in
/// the target's directory.
enum Stage {
    /// A temporary file with this name beside the target.
    Named(String),
    /// A file without a name, open.
    Unnamed,
    /// Nothing yet: the data is kept in memory (in `Incoming::in_memory`), and
    /// the commit makes the file (see `Staged::InMemory`).
    InMemory,
}

/// Where [`Applier::open_stage`] put an incoming file.
struct Opened {
    stage: Stage,
    /// None for a file kept in memory, and for a delta (which has `delta`).
    writer: Option<BufWriter<temps::Output>>,
    /// For a delta: its new temporary file, for the patch to write to.
    delta: Option<File>,
}

struct Pending {
    watch: String,
    rel: String,
    /// The target's name in its directory (which `staged` holds).
    name: String,
    staged: Staged,
    hash: ContentHash,
}

/// Where a received file waits for its commit.
enum Staged {
    /// A temporary file with a name beside the target.
    Named {
        /// Its name.
        tmp: String,
        /// The target's directory, open.
        dir: Arc<File>,
    },
    /// A file without a name (`O_TMPFILE`) in the target's directory, held
    /// open until it is linked into place. New files take no temporary
    /// name, so a commit does not rename them: the directory gets one
    /// entry instead of an entry added, looked up and removed again.
    Unnamed {
        /// The file.
        file: File,
        /// The directory it was made in, open.
        dir: Arc<File>,
    },
    /// A small file whose content is checked and kept in memory: the commit
    /// makes it (unnamed, in `dir`), writes it and gives it `meta`, for many
    /// files on two threads, before it syncs (see [`make_all_in_memory`]).
    InMemory {
        /// The content.
        data: Vec<u8>,
        /// The target's directory, open.
        dir: Arc<File>,
        /// The metadata to give it.
        meta: Meta,
    },
}

impl Staged {
    /// Removes what is staged.
    fn discard(self) {
        if let Staged::Named { tmp, dir } = self {
            let _ = beneath::unlink(&dir, &tmp);
        }
    }

    /// The target's directory, open.
    fn dir(&self) -> &Arc<File> {
        match self {
            Staged::Named { dir, .. } | Staged::Unnamed { dir, .. } | Staged::InMemory { dir, .. } => dir,
        }
    }
}

/// The outcome of one commit.
#[derive(Debug, Default, Clone)]
pub struct CommitReport {
    /// Operations applied since the previous commit.
    pub applied: u64,
    /// Operations that failed, with why; their paths were left as they were.
    pub failed: Vec<Failure>,
    /// Watches that had something applied (for `after_apply`).
    pub touched: BTreeSet<String>,
    /// Local files that differed from the last agreed content and were moved
    /// to the diverged folder before being replaced: `(watch, path, moved to)`.
    pub diverged: Vec<(String, String, PathBuf)>,
    /// Files kept in the undo store and recorded by this commit.
    pub undo_kept: usize,
}

/// Where a receiver keeps what it must not lose.
#[derive(Debug, Clone)]
pub struct Divergence {
    /// The agreed content of every file, per watch.
    pub ledgers: Arc<Mutex<Ledgers>>,
    /// This session's folder for preserved files: `diverged/<epoch>-<time>`.
    pub dir: PathBuf,
}

/// Applies [`Op`]s to watch roots.
pub struct Applier {
    watches: HashMap<String, WatchRoot>,
    incoming: Option<Incoming>,
    /// Set while the data of a refused-but-harmless file is being skipped.
    discarding: bool,
    pending: Vec<Pending>,
    /// Directories changed in this batch, by watch and relative path.
    dirs_to_sync: BTreeMap<(String, String), Arc<File>>,
    /// Directories whose times are set at the commit, open.
    dir_meta: Vec<(Arc<File>, Meta)>,
    report: CommitReport,
    can_chown: bool,
    divergence: Option<Divergence>,
    saved_at: std::time::Instant,
    /// How long after `saved_at` the next save may come (see [`save_wait`]).
    save_wait: std::time::Duration,
    /// Per watch, its root and directories open for this batch; forgotten
    /// whenever something applied could change what a path is (a link made,
    /// a path removed, a commit's renames), and at every commit, so that
    /// each batch opens its roots again.
    handles: HashMap<String, handles::Handles>,
    /// This session's diverged folder, open.
    diverged: Option<Arc<File>>,
    /// Keeps what is removed or replaced and agreed (see [`crate::undo`]).
    undo: Option<crate::undo::Recorder>,
    /// Starts write-back while a large batch still arrives.
    flusher: commit::Flusher,
    /// Files written since the flusher was last asked to start.
    unflushed: usize,
    /// How many unnamed files a batch may hold open; 0 once the filesystem
    /// turned out not to have them.
    unnamed_max: usize,
    /// Unnamed files held open by this batch, or to be made at its commit.
    unnamed: usize,
    /// Bytes of file content this batch holds in memory.
    in_memory_bytes: u64,
    /// The sync step of the commit: the system calls (tests put a failing
    /// one in its place).
    sync: commit::SyncFn,
    /// Where this receiver records what it changes, for the passive
    /// watcher (see [`crate::local`]).
    tracker: Option<Arc<Tracker>>,
    /// The state of the files the current commit placed, for the tracker.
    placed_now: HashMap<(String, String), Stamp>,
}

/// How often, at most, a busy applier rewrites its caches and ledgers.
const STATE_SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// The wait before the next save of the caches and ledgers, given that the
/// last one took `took`. They are rewritten whole, so a save grows with the
/// tree, and at a fixed [`STATE_SAVE_INTERVAL`] the initial sync of a large
/// tree would spend a growing share of its time rewriting state (time
/// quadratic in the files). Waiting ten times the last save's length keeps
/// saving under a tenth of the applier's time at any size; what a crash
/// loses meanwhile is safe to lose (hashes are recomputed, files are
/// preserved rather than lost).
fn save_wait(took: std::time::Duration) -> std::time::Duration {
    took.saturating_mul(10).max(STATE_SAVE_INTERVAL)
}

impl Applier {
    /// An applier for `watches`; it creates missing roots. With `divergence`,
    /// local files that differ from the last agreed content are preserved
    /// before they are replaced or removed, and agreement is recorded.
    ///
    /// A root that exists but is a symbolic link or not a directory is not
    /// an error here: each operation on that watch fails (and its manifest
    /// is refused) until it is a directory again.
    pub fn new(watches: Vec<WatchRoot>, divergence: Option<Divergence>) -> io::Result<Applier> {
        let mut map = HashMap::new();
        for w in watches {
            if matches!(fs::symlink_metadata(&w.root), Err(e) if e.kind() == io::ErrorKind::NotFound) {
                fs::create_dir_all(&w.root)?;
            }
            map.insert(w.name.clone(), w);
        }
        // Only root can give files away; others keep their own ownership.
        let can_chown = can_chown();
        Ok(Applier {
            watches: map,
            incoming: None,
            discarding: false,
            pending: Vec::new(),
            dirs_to_sync: BTreeMap::new(),
            dir_meta: Vec::new(),
            report: CommitReport::default(),
            can_chown,
            divergence,
            saved_at: std::time::Instant::now(),
            save_wait: STATE_SAVE_INTERVAL,
            handles: HashMap::new(),
            diverged: None,
            undo: None,
            flusher: commit::Flusher::default(),
            unflushed: 0,
            // A quarter of what the process may open, and no more than a
            // large batch holds; the rest of a batch gets named files.
            unnamed_max: (crate::sys::open_files_limit() / 4).min(stage::UNNAMED_MAX) as usize,
            unnamed: 0,
            in_memory_bytes: 0,
            sync: commit::system_sync,
            tracker: None,
            placed_now: HashMap::new(),
        })
    }

    /// Records every path this applier changes, and what it left there, in
    /// `tracker`, so that the passive watcher can tell the receiver's own
    /// writes from local changes; a full comparison's settlement asks it
    /// which local changes the active has not seen.
    pub fn with_tracker(mut self, tracker: Arc<Tracker>) -> Applier {
        self.tracker = Some(tracker);
        self
    }

    /// Keeps every file this applier removes or replaces (and does not
    /// move to the diverged folder) in an undo store, through `recorder`.
    pub fn with_undo(mut self, recorder: crate::undo::Recorder) -> Applier {
        self.undo = Some(recorder);
        self
    }

    /// Whether owners are replicated (the receiver runs as root).
    pub fn can_chown(&self) -> bool {
        self.can_chown
    }

    /// The manifest of one watch, from a fresh scan.
    pub fn manifest(&mut self, watch: &str) -> Result<Vec<Entry>, Refused> {
        let w = self
            .watches
            .get_mut(watch)
            .ok_or_else(|| Refused::UnknownWatch(watch.to_string()))?;
        if let Some(t) = &self.tracker {
            t.listed(watch);
        }
        // A root replaced by a link is not listed (its target would be).
        if let Err(e) = beneath::open_root(&w.root) {
            return Err(Refused::RootUnusable {
                watch: watch.into(),
                source: e,
            });
        }
        let scan = manifest::scan(&w.root, "", &w.excludes, &mut w.cache);
        for s in &scan.skipped {
            tracing::warn!(watch, skipped = ?s, "not replicated");
        }
        let present: std::collections::HashSet<&str, manifest::PathHasher> =
            scan.entries.iter().map(|e| e.path.as_str()).collect();
        w.cache.retain_paths(&|p| present.contains(p));
        if let Some(p) = &w.cache_path {
            if let Err(e) = w.cache.save(p) {
                tracing::warn!(watch, error = %e, "cannot save the hash cache");
            }
        }
        Ok(scan.entries)
    }

    /// The signature of the receiver's copy of `rel`, with its content hash,
    /// or `None` when there is no regular file there.
    pub fn signature(
        &mut self,
        watch: &str,
        rel: &str,
        block_len: u32,
    ) -> Result<Option<(ContentHash, Vec<u8>)>, Refused> {
        if !self.watches.contains_key(watch) {
            return Err(Refused::UnknownWatch(watch.to_string()));
        }
        check_rel_path(rel)?;
        let (dir, name) = split(rel);
        let Ok(dir) = self.dir(watch, dir, false) else {
            return Ok(None);
        };
        let Ok(file) = beneath::open_in(&dir, name, OFlags::RDONLY) else {
            return Ok(None);
        };
        let Ok(md) = file.metadata() else { return Ok(None) };
        if !md.is_file() {
            return Ok(None);
        }
        let Some(w) = self.watches.get_mut(watch) else {
            return Ok(None);
        };
        let hash = match stage::hash_open(&mut w.cache, rel, &file) {
            Ok(h) => h,
            Err(_) => return Ok(None),
        };
        // Read, never mapped: a local writer may truncate it meanwhile.
        if std::io::Seek::rewind(&mut &file).is_err() {
            return Ok(None);
        }
        let Ok(sig) = delta::signature_of_reader(&file, md.len(), block_len.clamp(64, 1 << 20)) else {
            return Ok(None);
        };
        Ok(Some((hash, sig)))
    }

    /// Applies one operation. An `Err` means the session must end; ordinary
    /// failures (a full disk, a base that changed) are recorded for the next
    /// commit's report instead.
    pub fn apply(&mut self, op: Op) -> Result<(), Refused> {
        match op {
            Op::FileData(data) => return self.file_data(&data),
            Op::FileHole(len) => return self.file_hole(len),
            Op::FileEnd => return self.file_end(),
            _ if self.incoming.is_some() || self.discarding => {
                return Err(Refused::InMiddleOfFile);
            }
            _ => {}
        }
        if let Op::Settled { watch, except } = op {
            return self.settled(&watch, &except);
        }
        let (watch, rel) = match &op {
            Op::Dir { watch, path, .. }
            | Op::Symlink { watch, path, .. }
            | Op::SetMeta { watch, path, .. }
            | Op::Remove { watch, path }
            | Op::FileBegin { watch, path, .. } => (watch.clone(), path.clone()),
            Op::FileData(_) | Op::FileHole(_) | Op::FileEnd | Op::Settled { .. } => {
                return Err(Refused::OutOfPlace);
            }
        };
        check_rel_path(&rel)?;
        let w = self
            .watches
            .get(&watch)
            .ok_or_else(|| Refused::UnknownWatch(watch.to_string()))?;
        if matches!(op, Op::Symlink { .. } | Op::Remove { .. }) {
            // Either can change what a directory path is.
            if let Some(h) = self.handles.get_mut(&watch) {
                h.clear();
            }
        }
        let is_dir_op = matches!(op, Op::Dir { .. });
        if w.excludes.is_excluded(&rel, is_dir_op) {
            tracing::warn!(watch, path = rel, "refused a change to a path excluded on this node");
            if matches!(op, Op::FileBegin { .. }) {
                self.discarding = true;
            }
            self.report.failed.push(Failure::new(rel, FailReason::Excluded));
            return Ok(());
        }
        // The passive watcher waits while the path changes, then finds what
        // this operation left there (see `local`).
        let tracked = match (&self.tracker, &op) {
            (Some(t), Op::Dir { .. } | Op::Symlink { .. } | Op::SetMeta { .. } | Op::Remove { .. }) => {
                t.begin(&watch, &rel);
                Some(self.stamp(&watch, &rel).is_some_and(|s| s.is_dir()))
            }
            _ => None,
        };
        let removes = matches!(op, Op::Remove { .. });
        let result = match op {
            Op::Dir { meta, .. } => self.make_dir(&watch, &rel, meta),
            Op::Symlink { target: link, meta, .. } => self.make_symlink(&watch, &rel, &link, meta),
            Op::SetMeta { meta, .. } => self.set_meta(&watch, &rel, meta),
            Op::Remove { .. } => self.remove(&watch, &rel),
            Op::FileBegin {
                meta,
                size,
                hash,
                delta_base,
                ..
            } => {
                match self.file_begin(&watch, &rel, meta, size, hash, delta_base) {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        // The data frames that follow are skipped.
                        self.discarding = true;
                        Err(e)
                    }
                }
            }
            Op::FileData(_) | Op::FileHole(_) | Op::FileEnd | Op::Settled { .. } => Ok(()),
        };
        if let (Some(was_dir), Some(t)) = (tracked, self.tracker.clone()) {
            let now = self.stamp(&watch, &rel);
            let tree = removes || (was_dir && !now.is_some_and(|s| s.is_dir()));
            t.end(&watch, &rel, now, tree);
        }
        match result {
            Ok(()) => {
                self.report.applied += 1;
                self.report.touched.insert(watch);
            }
            Err(e) => {
                tracing::warn!(watch, path = rel, error = %e, "cannot apply a change");
                self.report.failed.push(Failure::new(rel, e));
            }
        }
        Ok(())
    }

    /// The state of `rel` of `watch` now, for the tracker (`None`: nothing
    /// there, or it cannot be told).
    fn stamp(&mut self, watch: &str, rel: &str) -> Option<Stamp> {
        let (pdir, name) = split(rel);
        let parent = self.dir(watch, pdir, false).ok()?;
        beneath::stat(&parent, name).ok().map(|st| Stamp::of_stat(&st))
    }

    /// Persists the hash caches and the ledgers.
    pub fn save_state(&mut self) {
        let started = std::time::Instant::now();
        for w in self.watches.values_mut() {
            if let Some(p) = &w.cache_path {
                if let Err(e) = w.cache.save(p) {
                    tracing::warn!(watch = w.name, error = %e, "cannot save the hash cache");
                }
            }
        }
        if let Some(div) = &self.divergence {
            if let Err(e) = div.ledgers.lock().unwrap_or_else(|p| p.into_inner()).save() {
                tracing::warn!(error = %e, "cannot save the sync ledger");
            }
        }
        self.saved_at = std::time::Instant::now();
        let took = started.elapsed();
        self.save_wait = save_wait(took);
        tracing::debug!(took_ms = took.as_millis() as u64, "caches and ledgers saved");
    }

    /// The local root of `watch`.
    pub fn root(&self, watch: &str) -> Option<&Path> {
        self.watches.get(watch).map(|w| w.root.as_path())
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        self.abort_incoming();
        for p in self.pending.drain(..) {
            p.staged.discard();
        }
        self.save_state();
    }
}

/// `rel` and its ancestors, deepest first (`a/b/c`, `a/b`, `a`).
fn local_ancestors(rel: &str) -> impl Iterator<Item = &str> {
    let mut next = Some(rel);
    std::iter::from_fn(move || {
        let cur = next?;
        next = cur.rfind('/').map(|i| &cur[..i]);
        Some(cur)
    })
}
