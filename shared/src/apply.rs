//! The receiving side of replication: confined, atomic application of [`Op`]s.
//!
//! [`Applier`] is synchronous; the agent runs it on a blocking worker, and
//! its only thread of its own starts write-back early (see `Flusher`).
//! Every path from the wire is checked ([`check_rel_path`]) and then used only
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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustix::fs::OFlags;

use crate::beneath::{self, split};
use crate::delta;
use crate::ledger::Ledgers;
use crate::local::{self, Stamp, Tracker};
use crate::manifest::{self, ContentHash, Entry, Excludes, HashCache, Meta};
use crate::proto::{Op, UndoWhy};
use crate::relpath::TEMP_PREFIX;
pub use crate::relpath::{check_rel_path, confine, BadPath};

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
    /// A path breaks the rules of [`check_rel_path`].
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
    writer: Option<BufWriter<Output>>,
    /// The data of a file staged in memory ([`Stage::InMemory`]).
    in_memory: Vec<u8>,
    hasher: blake3::Hasher,
    written: u64,
    size: u64,
    hash: ContentHash,
    meta: Meta,
    /// For deltas: the spool file (its name in `dir`) that collects the
    /// delta, and the base hash.
    delta: Option<(String, ContentHash)>,
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
    /// None for a file kept in memory.
    writer: Option<BufWriter<Output>>,
    /// A delta's spool file, and the hash of its base.
    delta: Option<(String, ContentHash)>,
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

/// A watch's root and the directories below it, open for one batch.
struct Handles {
    /// The root, opened without following a link.
    root: Arc<File>,
    /// Directories opened beneath it in this batch, by relative path.
    dirs: HashMap<String, Arc<File>>,
}

/// At most this many directories are kept open per watch and batch; more,
/// and the cache starts over (files arrive directory by directory).
const DIR_CACHE_MAX: usize = 256;

/// The outcome of one commit.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CommitReport {
    /// Operations applied since the previous commit.
    pub applied: u64,
    /// Operations that failed, with why; their paths were left as they were.
    pub failed: Vec<(String, String)>,
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
    /// Per watch, its root and directories open for this batch; forgotten
    /// whenever something applied could change what a path is (a link made,
    /// a path removed, a commit's renames), and at every commit, so that
    /// each batch opens its roots again.
    handles: HashMap<String, Handles>,
    /// This session's diverged folder, open.
    diverged: Option<Arc<File>>,
    /// Keeps what is removed or replaced and agreed (see [`crate::undo`]).
    undo: Option<crate::undo::Recorder>,
    /// Starts write-back while a large batch still arrives.
    flusher: Flusher,
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
    sync: SyncFn,
    /// Where this receiver records what it changes, for the passive
    /// watcher (see [`crate::local`]).
    tracker: Option<Arc<Tracker>>,
    /// The state of the files the current commit placed, for the tracker.
    placed_now: HashMap<(String, String), Stamp>,
}

/// One durability call of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncCall {
    /// `fdatasync` of a staged file.
    FileData,
    /// `fsync` of a directory.
    Dir,
    /// `syncfs` of the file system holding the handle.
    FileSystem,
}

/// The sync step of a commit: makes `file` durable as `call` says.
type SyncFn = fn(SyncCall, &File) -> io::Result<()>;

/// The real sync step.
fn system_sync(call: SyncCall, file: &File) -> io::Result<()> {
    match call {
        SyncCall::FileData => file.sync_data(),
        SyncCall::Dir => file.sync_all(),
        SyncCall::FileSystem => crate::sys::syncfs(file),
    }
}

/// How often, at most, a busy applier rewrites its caches and ledgers.
const STATE_SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// How many files a commit may fsync one by one before it syncs the
/// filesystem instead.
const FSYNC_EACH_MAX: usize = 8;

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
            handles: HashMap::new(),
            diverged: None,
            undo: None,
            flusher: Flusher::default(),
            unflushed: 0,
            // A quarter of what the process may open, and no more than a
            // large batch holds; the rest of a batch gets named files.
            unnamed_max: (crate::sys::open_files_limit() / 4).min(UNNAMED_MAX) as usize,
            unnamed: 0,
            in_memory_bytes: 0,
            sync: system_sync,
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
        let present: std::collections::HashSet<&str> = scan.entries.iter().map(|e| e.path.as_str()).collect();
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
        let hash = match hash_open(&mut w.cache, rel, &file) {
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
                h.dirs.clear();
            }
        }
        let is_dir_op = matches!(op, Op::Dir { .. });
        if w.excludes.is_excluded(&rel, is_dir_op) {
            tracing::warn!(watch, path = rel, "refused a change to a path excluded on this node");
            if matches!(op, Op::FileBegin { .. }) {
                self.discarding = true;
            }
            self.report.failed.push((rel, "excluded on the receiver".into()));
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
                self.report.failed.push((rel, e.to_string()));
            }
        }
        Ok(())
    }

    /// The directory `reldir` of `watch` (`""` for the root), open beneath
    /// the watch's root with no symbolic link followed; with `make`, missing
    /// directories are created on the way. Handles are kept for the batch.
    fn dir(&mut self, watch: &str, reldir: &str, make: bool) -> io::Result<Arc<File>> {
        if let Some(d) = self.handles.get(watch).and_then(|h| h.dirs.get(reldir)) {
            return Ok(d.clone());
        }
        let h = match self.handles.entry(watch.to_string()) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let w = self
                    .watches
                    .get(watch)
                    .ok_or_else(|| io::Error::other(format!("unknown watch {watch:?}")))?;
                let root =
                    beneath::open_root(&w.root).map_err(|e| io::Error::new(e.kind(), format!("watch root: {e}")))?;
                v.insert(Handles {
                    root: Arc::new(root),
                    dirs: HashMap::new(),
                })
            }
        };
        let mut created = false;
        let d = if reldir.is_empty() {
            h.root.clone()
        } else if let (true, Some(t)) = (make, &self.tracker) {
            // Directories made on the way are the receiver's own: recorded
            // for the passive watcher, each as it is once made.
            match beneath::open_dir(&h.root, reldir) {
                Ok(d) => Arc::new(d),
                Err(_) => {
                    t.begin(watch, reldir);
                    let made = beneath::make_dirs(&h.root, reldir, 0o755);
                    let mut up: Vec<&str> = local_ancestors(reldir).collect();
                    up.reverse();
                    for a in up {
                        let st = local::stamp_at(&h.root, a).ok().flatten();
                        t.end(watch, a, st, false);
                    }
                    Arc::new(made?)
                }
            }
        } else if make {
            match beneath::open_dir(&h.root, reldir) {
                Ok(d) => Arc::new(d),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENAMETOOLONG)) => {
                    created = true;
                    Arc::new(beneath::make_dirs(&h.root, reldir, 0o755)?)
                }
                Err(e) => return Err(e),
            }
        } else {
            Arc::new(beneath::open_dir(&h.root, reldir)?)
        };
        if h.dirs.len() >= DIR_CACHE_MAX {
            h.dirs.clear();
        }
        h.dirs.insert(reldir.to_string(), d.clone());
        if created {
            // A directory made on the way exists for good only once the
            // directory holding its entry is durable: every ancestor joins
            // the commit's sync (those that existed already cost one fsync).
            let mut at = reldir;
            while let Some((parent, _)) = at.rsplit_once('/') {
                let pd = self.dir(watch, parent, false)?;
                self.note_dir(watch, parent, &pd);
                at = parent;
            }
            let root = self.dir(watch, "", false)?;
            self.note_dir(watch, "", &root);
        }
        Ok(d)
    }

    /// The state of `rel` of `watch` now, for the tracker (`None`: nothing
    /// there, or it cannot be told).
    fn stamp(&mut self, watch: &str, rel: &str) -> Option<Stamp> {
        let (pdir, name) = split(rel);
        let parent = self.dir(watch, pdir, false).ok()?;
        beneath::stat(&parent, name).ok().map(|st| Stamp::of_stat(&st))
    }

    /// Remembers that the directory `reldir` of `watch`, open as `dir`, is
    /// to be made durable at the commit.
    fn note_dir(&mut self, watch: &str, reldir: &str, dir: &Arc<File>) {
        let key = (watch.to_string(), reldir.to_string());
        self.dirs_to_sync.entry(key).or_insert_with(|| dir.clone());
    }

    fn make_dir(&mut self, watch: &str, rel: &str, meta: Meta) -> io::Result<()> {
        let (pdir, name) = split(rel);
        let parent = self.dir(watch, pdir, true)?;
        match beneath::stat(&parent, name) {
            Ok(st) if beneath::is_dir(&st) => {}
            Ok(_) => {
                self.preserve(watch, rel, &parent, UndoWhy::Replaced)?;
                match beneath::unlink(&parent, name) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
                self.forget(watch, rel);
                beneath::mkdir(&parent, name, 0o700)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => match beneath::mkdir(&parent, name, 0o700) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            },
            Err(e) => return Err(e),
        }
        // Opened without following a link: what gets the mode and owner is
        // the directory just checked or made, whatever its name is now.
        let dir = Arc::new(beneath::open_subdir(&parent, name)?);
        self.note_dir(watch, pdir, &parent);
        dir.set_permissions(fs::Permissions::from_mode(meta.mode))?;
        if self.can_chown {
            std::os::unix::fs::fchown(&*dir, Some(meta.uid), Some(meta.gid))?;
        }
        self.dir_meta.push((dir.clone(), meta));
        if let Some(h) = self.handles.get_mut(watch) {
            if h.dirs.len() < DIR_CACHE_MAX {
                h.dirs.insert(rel.to_string(), dir);
            }
        }
        Ok(())
    }

    fn make_symlink(&mut self, watch: &str, rel: &str, link: &str, meta: Meta) -> io::Result<()> {
        let (pdir, name) = split(rel);
        let parent = self.dir(watch, pdir, true)?;
        let tmp = temp_name(name, "link");
        beneath::symlink(link, &parent, &tmp)?;
        if self.can_chown {
            if let Err(e) = beneath::lchown(&parent, &tmp, meta.uid, meta.gid) {
                let _ = beneath::unlink(&parent, &tmp);
                return Err(e);
            }
        }
        let replaced = (|| {
            self.preserve(watch, rel, &parent, UndoWhy::Replaced)?;
            if let Ok(st) = beneath::stat(&parent, name) {
                if beneath::is_dir(&st) {
                    beneath::remove_tree(&parent, name)?;
                }
            }
            beneath::rename(&parent, &tmp, &parent, name)
        })();
        if let Err(e) = replaced {
            let _ = beneath::unlink(&parent, &tmp);
            return Err(e);
        }
        self.forget(watch, rel);
        self.note_dir(watch, pdir, &parent);
        Ok(())
    }

    fn set_meta(&mut self, watch: &str, rel: &str, meta: Meta) -> io::Result<()> {
        let (pdir, name) = split(rel);
        let parent = self.dir(watch, pdir, false)?;
        let st = beneath::stat(&parent, name)?;
        if beneath::is_symlink(&st) {
            if self.can_chown {
                beneath::lchown(&parent, name, meta.uid, meta.gid)?;
            }
            return Ok(());
        }
        // The mode, owner and times go to an open descriptor, never to a name.
        let file = if beneath::is_dir(&st) {
            beneath::open_subdir(&parent, name)?
        } else {
            beneath::open_for_meta(&parent, name)?
        };
        let md = file.metadata()?;
        if !md.is_dir() && !md.is_file() {
            return Err(io::Error::other("not a file or a directory"));
        }
        beneath::fchmod(&file, meta.mode)?;
        if self.can_chown {
            beneath::fchown(&file, meta.uid, meta.gid)?;
        }
        if md.is_dir() {
            self.dir_meta.push((Arc::new(file), meta));
        } else {
            beneath::set_times(&file, meta.mtime, meta.mtime_nsec)?;
        }
        Ok(())
    }

    fn remove(&mut self, watch: &str, rel: &str) -> io::Result<()> {
        let (pdir, name) = split(rel);
        let parent = match self.dir(watch, pdir, false) {
            Ok(p) => Some(p),
            // No directory there: nothing to remove.
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if let Some(parent) = parent {
            self.preserve(watch, rel, &parent, UndoWhy::Removed)?;
            match beneath::stat(&parent, name) {
                Ok(_) => beneath::remove_tree(&parent, name)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.note_dir(watch, pdir, &parent);
        }
        if let Some(w) = self.watches.get_mut(watch) {
            w.cache.forget(rel);
        }
        self.forget(watch, rel);
        Ok(())
    }

    /// Moves every local file at or under `rel` (whose directory is open as
    /// `parent`) whose content is not the one last agreed to the diverged
    /// folder, through handles: from below `parent` to below the diverged
    /// folder. A file that cannot be read is an error (it is not replaced).
    /// Every other file and link there is kept in the undo store (see
    /// [`Applier::keep_undo`]), which never fails the change.
    fn preserve(&mut self, watch: &str, rel: &str, parent: &Arc<File>, why: UndoWhy) -> io::Result<()> {
        let undo = self.undo.as_ref().is_some_and(|u| u.wants(watch));
        let Some(div) = self.divergence.clone() else {
            if undo {
                self.keep_undo(watch, rel, parent, why, &[])?;
            }
            return Ok(());
        };
        let (pdir, name) = split(rel);
        let Ok(st) = beneath::stat(parent, name) else {
            return Ok(());
        };
        let Some(w) = self.watches.get_mut(watch) else {
            return Ok(());
        };
        // The files there, with their content hashes: a single file through
        // its descriptor; a tree from a scan (which decides only what to
        // keep: what is moved is found through `parent` again).
        let found: Vec<(String, ContentHash)> = if beneath::is_dir(&st) {
            let scan = manifest::scan(&w.root, rel, &w.excludes, &mut w.cache);
            scan.entries
                .into_iter()
                .filter_map(|e| Some((e.hash()?, e.path)))
                .map(|(h, p)| (p, h))
                .collect()
        } else if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile {
            match beneath::open_in(parent, name, OFlags::RDONLY) {
                Ok(f) => vec![(rel.to_string(), hash_open(&mut w.cache, rel, &f)?)],
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(e),
            }
        } else {
            Vec::new()
        };
        let differing: Vec<String> = {
            let mut ledgers = div.ledgers.lock().unwrap_or_else(|p| p.into_inner());
            let ledger = ledgers.watch(watch);
            found
                .into_iter()
                .filter(|(p, h)| ledger.get(p) != Some(*h))
                .map(|(p, _)| p)
                .collect()
        };
        for path in differing.iter().cloned() {
            // The path relative to `parent`.
            let below = if pdir.is_empty() {
                path.as_str()
            } else {
                path.get(pdir.len() + 1..).unwrap_or_default()
            };
            let (sub, file_name) = split(below);
            let from = if sub.is_empty() {
                parent.clone()
            } else {
                Arc::new(beneath::open_dir(parent, sub)?)
            };
            let to = self.diverged_dir(&div, watch, split(&path).0)?;
            move_aside(&from, file_name, &to)?;
            let dest = div.dir.join(watch).join(&path);
            tracing::warn!(watch, path, to = %dest.display(), "preserved a local file that differs from the last synced content");
            self.report.diverged.push((watch.to_string(), path, dest));
        }
        if undo {
            self.keep_undo(watch, rel, parent, why, &differing)?;
        }
        Ok(())
    }

    /// Keeps every file and link at or under `rel` (whose directory is open
    /// as `parent`) in the undo store, but the paths in `moved` (gone to
    /// the diverged folder), through handles: each one's directory is
    /// opened beneath `parent`, the entry without following it. The content
    /// hash recorded is the cached one of that very inode, when known.
    fn keep_undo(
        &mut self,
        watch: &str,
        rel: &str,
        parent: &Arc<File>,
        why: UndoWhy,
        moved: &[String],
    ) -> io::Result<()> {
        let (pdir, name) = split(rel);
        let Ok(st) = beneath::stat(parent, name) else {
            return Ok(());
        };
        let Some(w) = self.watches.get_mut(watch) else {
            return Ok(());
        };
        let Some(undo) = self.undo.as_mut() else {
            return Ok(());
        };
        let paths: Vec<String> = if beneath::is_dir(&st) {
            let scan = manifest::scan(&w.root, rel, &w.excludes, &mut w.cache);
            scan.entries
                .into_iter()
                .filter(|e| !matches!(e.kind, manifest::EntryKind::Dir))
                .map(|e| e.path)
                .filter(|p| !moved.contains(p))
                .collect()
        } else if moved.iter().any(|m| m == rel) {
            Vec::new()
        } else {
            vec![rel.to_string()]
        };
        // The directories of a tree, opened once each.
        let mut dirs: HashMap<String, Arc<File>> = HashMap::new();
        for path in paths {
            let below = if pdir.is_empty() {
                path.as_str()
            } else {
                path.get(pdir.len() + 1..).unwrap_or_default()
            };
            let (sub, file_name) = split(below);
            let from = if sub.is_empty() {
                parent.clone()
            } else if let Some(d) = dirs.get(sub) {
                d.clone()
            } else {
                match beneath::open_dir(parent, sub) {
                    Ok(d) => {
                        let d = Arc::new(d);
                        dirs.insert(sub.to_string(), d.clone());
                        d
                    }
                    // Gone meanwhile: nothing there to keep.
                    Err(_) => continue,
                }
            };
            let cache = &w.cache;
            undo.keep(&from, file_name, watch, &path, why, |md| cache.cached(&path, md));
        }
        Ok(())
    }

    /// The directory of the diverged folder for `reldir` of `watch`, made
    /// and opened through handles below the state dir's `diverged/` (the
    /// state dir itself is configuration, and trusted).
    fn diverged_dir(&mut self, div: &Divergence, watch: &str, reldir: &str) -> io::Result<File> {
        let session = match &self.diverged {
            Some(d) => d.clone(),
            None => {
                let (Some(base), Some(session)) = (div.dir.parent(), div.dir.file_name().and_then(|n| n.to_str()))
                else {
                    return Err(io::Error::other("bad diverged folder"));
                };
                fs::create_dir_all(base)?;
                let base = beneath::open_root(base)?;
                let d = Arc::new(beneath::make_dirs(&base, session, 0o700)?);
                self.diverged = Some(d.clone());
                d
            }
        };
        let rel = if reldir.is_empty() {
            watch.to_string()
        } else {
            format!("{watch}/{reldir}")
        };
        beneath::make_dirs(&session, &rel, 0o700)
    }

    fn forget(&mut self, watch: &str, rel: &str) {
        if let Some(div) = &self.divergence {
            div.ledgers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .watch(watch)
                .forget_tree(rel);
        }
    }

    /// After a full comparison: everything under `watch` but `except` now
    /// holds the agreed content.
    fn settled(&mut self, watch: &str, except: &[String]) -> Result<(), Refused> {
        // Local changes flagged after the tree was listed for this
        // comparison were never seen by the active: not agreed on.
        let (unseen, listed) = match &self.tracker {
            Some(t) => (t.settled(watch, except), t.listed_at(watch)),
            None => (Vec::new(), None),
        };
        let Some(div) = self.divergence.clone() else {
            return Ok(());
        };
        let w = self
            .watches
            .get_mut(watch)
            .ok_or_else(|| Refused::UnknownWatch(watch.to_string()))?;
        let scan = manifest::scan(&w.root, "", &w.excludes, &mut w.cache);
        let skip: std::collections::HashSet<&str> = except.iter().chain(&unseen).map(String::as_str).collect();
        let entries: Vec<(String, ContentHash)> = scan
            .entries
            .into_iter()
            .filter(|e| !skip.contains(e.path.as_str()))
            .filter_map(|e| Some((e.path.clone(), e.hash()?)))
            .collect();
        let mut ledgers = div.ledgers.lock().unwrap_or_else(|p| p.into_inner());
        let ledger = ledgers.watch(watch);
        // A file not agreed before that changed after the tree was listed
        // for this comparison (its ctime says so, whether or not the
        // passive watcher has flagged it yet) was never seen by the
        // active: it is not agreed on either.
        let listed_ns = listed
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i128);
        let root = listed_ns.and_then(|_| beneath::open_root(&w.root).ok());
        let mut later: Vec<String> = unseen.clone();
        let entries: Vec<(String, ContentHash)> = entries
            .into_iter()
            .filter(|(p, h)| {
                let (Some(listed), Some(root)) = (listed_ns, &root) else {
                    return true;
                };
                if ledger.get(p) == Some(*h) {
                    return true;
                }
                // Timestamps may be a clock tick coarse: a second of slack.
                let fresh = local::stamp_at(root, p)
                    .ok()
                    .flatten()
                    .is_none_or(|st| st.ctime_ns >= listed - 1_000_000_000);
                if fresh {
                    later.push(p.clone());
                }
                !fresh
            })
            .collect();
        // What was agreed for those paths stays agreed.
        let kept: Vec<(String, ContentHash)> = later.iter().filter_map(|p| Some((p.clone(), ledger.get(p)?))).collect();
        ledger.reset(entries.into_iter().chain(kept));
        if let Err(e) = ledgers.save() {
            tracing::warn!(error = %e, "cannot save the sync ledger");
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn file_begin(
        &mut self,
        watch: &str,
        rel: &str,
        meta: Meta,
        size: u64,
        hash: ContentHash,
        delta_base: Option<ContentHash>,
    ) -> io::Result<()> {
        let (pdir, name) = split(rel);
        let dir = self.dir(watch, pdir, true)?;
        let Opened { stage, writer, delta } = self.open_stage(&dir, name, meta, size, delta_base)?;
        let in_memory = match stage {
            Stage::InMemory => Vec::with_capacity(size as usize),
            _ => Vec::new(),
        };
        self.incoming = Some(Incoming {
            watch: watch.to_string(),
            rel: rel.to_string(),
            dir,
            name: name.to_string(),
            stage,
            writer,
            in_memory,
            hasher: blake3::Hasher::new(),
            written: 0,
            size,
            hash,
            meta,
            delta,
        });
        Ok(())
    }

    /// Where an incoming file goes: in memory, an unnamed file or a named
    /// one, with its writer and, for a delta, its spool.
    fn open_stage(
        &mut self,
        dir: &Arc<File>,
        name: &str,
        meta: Meta,
        size: u64,
        delta_base: Option<ContentHash>,
    ) -> io::Result<Opened> {
        // A small whole file is written to an unnamed file while the batch
        // has room for one, and a smaller one still is kept in memory until
        // the commit makes it. A large one gets a name: its directory
        // entries cost nothing next to its data, and the name shows a
        // transfer under way. So does a delta's result, which replaces a file.
        let mut unnamed = None;
        if delta_base.is_none() && size <= UNNAMED_SIZE_MAX && self.unnamed < self.unnamed_max {
            if size <= IN_MEMORY_SIZE_MAX && self.in_memory_bytes + size <= IN_MEMORY_BYTES_MAX {
                self.unnamed += 1;
                self.in_memory_bytes += size;
                return Ok(Opened {
                    stage: Stage::InMemory,
                    writer: None,
                    delta: None,
                });
            }
            // No name, so nobody can open it before the commit links it:
            // it can have its final permissions (less the umask) at once,
            // and `give_meta` mostly has no `fchmod` left to do.
            match crate::sys::open_unnamed(dir, meta.mode & 0o777) {
                Ok(file) => unnamed = Some(file),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)) => {
                    tracing::debug!(error = %e, "no unnamed temporary files here; using named ones");
                    self.unnamed_max = 0;
                }
                Err(e) => return Err(e),
            }
        }
        let mut delta = None;
        let (file, stage) = match unnamed {
            Some(file) => {
                self.unnamed += 1;
                (file, Stage::Unnamed)
            }
            None => {
                let tmp = temp_name(name, "new");
                let file = match delta_base {
                    // The delta is spooled; its end writes the patched file to `tmp`.
                    Some(base) => {
                        let spool = temp_name(name, "delta");
                        let f = beneath::create_private(dir, &spool)?;
                        delta = Some((spool, base));
                        f
                    }
                    None => beneath::create_private(dir, &tmp)?,
                };
                (file, Stage::Named(tmp))
            }
        };
        // Data arrives in frames of up to 256 KiB; a small file needs no more
        // buffer than its size (a 256 KiB buffer per file would be an mmap
        // and a munmap per file).
        let writer = if delta_base.is_some() {
            BufWriter::with_capacity(256 * 1024, Output::scratch(file))
        } else {
            BufWriter::with_capacity((size as usize).clamp(1, 256 * 1024), Output::durable(file))
        };
        Ok(Opened {
            stage,
            writer: Some(writer),
            delta,
        })
    }

    /// Gives back what an incoming file's stage took: its temporary file,
    /// its place among the unnamed files, its memory.
    fn release(&mut self, stage: &Stage, dir: &File, size: u64) {
        match stage {
            Stage::Named(tmp) => {
                let _ = beneath::unlink(dir, tmp);
            }
            Stage::Unnamed => self.unnamed -= 1,
            Stage::InMemory => {
                self.unnamed -= 1;
                self.in_memory_bytes -= size;
            }
        }
    }

    fn file_data(&mut self, data: &[u8]) -> Result<(), Refused> {
        if self.discarding {
            return Ok(());
        }
        let Some(inc) = self.incoming.as_mut() else {
            return Err(Refused::DataOutsideFile);
        };
        inc.written += data.len() as u64;
        let cap = match inc.delta {
            None => inc.size,
            // A delta of entirely new content is a little larger than the content.
            Some(_) => inc.size + inc.size / 8 + 64 * 1024,
        };
        if inc.written > cap {
            let (watch, path) = (inc.watch.clone(), inc.rel.clone());
            self.abort_incoming();
            return Err(Refused::TooMuchData { watch, path });
        }
        if inc.delta.is_none() {
            inc.hasher.update(data);
        }
        if matches!(inc.stage, Stage::InMemory) {
            inc.in_memory.extend_from_slice(data);
            return Ok(());
        }
        let result = inc.writer.as_mut().map(|w| w.write_all(data));
        if let Some(Err(e)) = result {
            let rel = inc.rel.clone();
            tracing::warn!(path = rel, error = %e, "cannot write a received file");
            self.report.failed.push((rel, e.to_string()));
            self.abort_incoming();
            self.discarding = true;
        }
        Ok(())
    }

    /// A hole of `len` bytes in the current whole file: counted and hashed
    /// as zeros, and stepped over in the file instead of written.
    fn file_hole(&mut self, len: u64) -> Result<(), Refused> {
        if self.discarding {
            return Ok(());
        }
        let Some(inc) = self.incoming.as_mut() else {
            return Err(Refused::HoleOutsideFile);
        };
        let (watch, path) = (inc.watch.clone(), inc.rel.clone());
        if inc.delta.is_some() {
            self.abort_incoming();
            return Err(Refused::HoleInDelta { watch, path });
        }
        match inc.written.checked_add(len) {
            Some(n) if n <= inc.size => inc.written = n,
            _ => {
                self.abort_incoming();
                return Err(Refused::TooMuchData { watch, path });
            }
        }
        crate::sparse::hash_zeros(&mut inc.hasher, len);
        if matches!(inc.stage, Stage::InMemory) {
            // In-memory files are small: the zeros are kept as they are.
            inc.in_memory.resize(inc.in_memory.len() + len as usize, 0);
            return Ok(());
        }
        let result = inc.writer.as_mut().map(|w| w.flush().map(|()| w.get_mut().skip(len)));
        if let Some(Err(e)) = result {
            tracing::warn!(path = path, error = %e, "cannot write a received file");
            self.report.failed.push((path, e.to_string()));
            self.abort_incoming();
            self.discarding = true;
        }
        Ok(())
    }

    fn abort_incoming(&mut self) {
        if let Some(inc) = self.incoming.take() {
            drop(inc.writer);
            self.release(&inc.stage, &inc.dir, inc.size);
            if let Some((spool, _)) = inc.delta {
                let _ = beneath::unlink(&inc.dir, &spool);
            }
        }
    }

    fn file_end(&mut self) -> Result<(), Refused> {
        if self.discarding {
            self.discarding = false;
            return Ok(());
        }
        let Some(mut inc) = self.incoming.take() else {
            return Err(Refused::EndNotBegun);
        };
        let outcome = if let Stage::InMemory = &inc.stage {
            check_content(&inc).map(|()| Staged::InMemory {
                data: std::mem::take(&mut inc.in_memory),
                dir: inc.dir.clone(),
                meta: inc.meta,
            })
        } else {
            let result = self.finish(&mut inc);
            if let Some((spool, _)) = &inc.delta {
                let _ = beneath::unlink(&inc.dir, spool);
            }
            result.map(|file| match &inc.stage {
                Stage::Named(tmp) => Staged::Named {
                    tmp: tmp.clone(),
                    dir: inc.dir.clone(),
                },
                Stage::Unnamed | Stage::InMemory => Staged::Unnamed {
                    file,
                    dir: inc.dir.clone(),
                },
            })
        };
        match outcome {
            Ok(staged) => {
                self.report.applied += 1;
                self.report.touched.insert(inc.watch.clone());
                self.note_dir(&inc.watch, split(&inc.rel).0, &inc.dir);
                // In-memory files are written by the commit, right before its sync.
                if !matches!(staged, Staged::InMemory { .. }) {
                    self.unflushed += 1;
                    if self.unflushed >= FLUSH_EVERY_FILES {
                        self.unflushed = 0;
                        self.flusher.start(inc.dir.clone());
                    }
                }
                self.pending.push(Pending {
                    watch: inc.watch,
                    rel: inc.rel,
                    name: inc.name,
                    staged,
                    hash: inc.hash,
                });
            }
            Err(e) => {
                self.release(&inc.stage, &inc.dir, inc.size);
                tracing::warn!(watch = inc.watch, path = inc.rel, error = %e, "cannot apply a received file");
                self.report.failed.push((inc.rel, e));
            }
        }
        Ok(())
    }

    /// Checks a received file and sets its metadata; returns it, open.
    fn finish(&mut self, inc: &mut Incoming) -> Result<File, String> {
        let writer = inc.writer.take().ok_or("no open file")?;
        let file = writer
            .into_inner()
            .map_err(|e| e.error().to_string())?
            .end()
            .map_err(|e| e.to_string())?;
        if let Some((spool, base_hash)) = &inc.delta {
            // Patch: base (the current target) + delta (the spool) -> tmp.
            let mut delta_file = file;
            std::io::Seek::rewind(&mut delta_file).map_err(|e| e.to_string())?;
            let base_file = beneath::open_in(&inc.dir, &inc.name, OFlags::RDONLY)
                .map_err(|e| format!("cannot open the delta base: {e}"))?;
            let base_md = base_file.metadata().map_err(|e| e.to_string())?;
            if !base_md.is_file() {
                return Err("the delta base is not a regular file".into());
            }
            let w = self.watches.get_mut(&inc.watch).ok_or("unknown watch")?;
            let actual = hash_open(&mut w.cache, &inc.rel, &base_file).map_err(|e| e.to_string())?;
            if actual != *base_hash {
                return Err("the delta base changed on the receiver".into());
            }
            let Stage::Named(tmp) = &inc.stage else {
                return Err("no temporary file for a delta".into());
            };
            let out = beneath::create_private(&inc.dir, tmp).map_err(|e| e.to_string())?;
            let mut hw = HashingWriter {
                inner: BufWriter::with_capacity(256 * 1024, Output::durable(out)),
                hasher: blake3::Hasher::new(),
                written: 0,
            };
            // The base is read as the delta asks for it, never mapped: a
            // local writer may truncate it meanwhile.
            let spooled = std::io::BufReader::with_capacity(256 * 1024, &delta_file);
            delta::apply_file(&base_file, spooled, &mut hw, inc.size as usize).map_err(|e| e.to_string())?;
            let _ = spool;
            inc.hasher = hw.hasher;
            inc.written = hw.written;
            let out = hw
                .inner
                .into_inner()
                .map_err(|e| e.error().to_string())?
                .end()
                .map_err(|e| e.to_string())?;
            self.finish_file(inc, &out)?;
            Ok(out)
        } else {
            self.finish_file(inc, &file)?;
            Ok(file)
        }
    }

    fn finish_file(&self, inc: &Incoming, file: &File) -> Result<(), String> {
        check_content(inc)?;
        give_meta(file, inc.meta, self.can_chown).map_err(|e| e.to_string())
    }

    /// Makes everything applied since the last commit durable and visible.
    ///
    /// `Err` when the directories could not be made durable: the changes
    /// may be visible but lost at a crash, so the batch must not be
    /// acknowledged (the receiver ends the session with the error).
    pub fn commit(&mut self) -> Result<CommitReport, NotDurable> {
        if self.incoming.is_some() {
            self.abort_incoming();
        }
        self.discarding = false;
        // The renames below may replace directories.
        self.handles.clear();
        self.unflushed = 0;
        self.unnamed = 0;
        let pending = std::mem::take(&mut self.pending);
        self.in_memory_bytes = 0;
        // The passive watcher waits for these paths until the commit is done.
        let tracked: Vec<(String, String, Arc<File>, String)> = match &self.tracker {
            Some(t) => pending
                .iter()
                .map(|p| {
                    t.begin(&p.watch, &p.rel);
                    (p.watch.clone(), p.rel.clone(), p.staged.dir().clone(), p.name.clone())
                })
                .collect(),
            None => Vec::new(),
        };
        let mut trees: std::collections::HashSet<(String, String)> = std::collections::HashSet::new();
        // 0. The files kept in memory are made and written.
        let (pending, failed) = make_all_in_memory(pending, self.can_chown);
        for (rel, why) in failed {
            tracing::warn!(path = rel, error = why, "cannot write a received file");
            self.report.applied = self.report.applied.saturating_sub(1);
            self.report.failed.push((rel, why));
        }
        // 1. The new contents are durable before any of them is placed.
        if let Err(e) = sync_files(self.sync, &pending) {
            for p in pending {
                self.report
                    .failed
                    .push((p.rel.clone(), format!("cannot make the data durable: {e}")));
                p.staged.discard();
            }
        } else {
            // 2. Into place: most new files linked ahead, on two threads.
            let mut linked = link_ahead(&pending).into_iter();
            for p in pending {
                let Pending {
                    watch,
                    rel,
                    name,
                    staged,
                    hash,
                } = p;
                // Most targets of a large batch are new: a link or a rename
                // that refuses to replace anything settles those in one call.
                let placed = match (linked.next().flatten(), &staged) {
                    (Some(done), _) => done,
                    (None, Staged::Unnamed { file, dir }) => link_one(file, dir, &name),
                    // Made by step 0; never left in memory.
                    (None, Staged::InMemory { .. }) => Err(io::Error::other("not written")),
                    (None, Staged::Named { tmp, dir }) => {
                        beneath::rename_noreplace(dir, tmp, &name).and_then(|()| beneath::metadata(dir, &name))
                    }
                };
                match placed {
                    Ok(md) => {
                        self.placed(&watch, &rel, &md, hash);
                        continue;
                    }
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::EINVAL | libc::ENOSYS)) => {}
                    Err(e) => {
                        staged.discard();
                        self.report.failed.push((rel, e.to_string()));
                        continue;
                    }
                }
                // Something is in the way. An unnamed file gets a temporary
                // name first, to be renamed over it. All of it happens in
                // the directory the file was staged in, through its handle.
                let (tmp, dir) = match staged {
                    Staged::InMemory { .. } => {
                        self.report.failed.push((rel, "not written".into()));
                        continue;
                    }
                    Staged::Named { tmp, dir } => (tmp, dir),
                    Staged::Unnamed { file, dir } => match name_beside(&file, &dir, &name) {
                        Ok(tmp) => (tmp, dir),
                        Err(e) => {
                            self.report.failed.push((rel, e.to_string()));
                            continue;
                        }
                    },
                };
                let existing = beneath::stat(&dir, &name).ok();
                if existing.is_some() {
                    if let Err(e) = self.preserve(&watch, &rel, &dir, UndoWhy::Replaced) {
                        let _ = beneath::unlink(&dir, &tmp);
                        self.report
                            .failed
                            .push((rel, format!("cannot preserve the local version: {e}")));
                        continue;
                    }
                }
                if existing.is_some_and(|st| beneath::is_dir(&st)) {
                    trees.insert((watch.clone(), rel.clone()));
                    if let Err(e) = beneath::remove_tree(&dir, &name) {
                        let _ = beneath::unlink(&dir, &tmp);
                        self.report.failed.push((rel, e.to_string()));
                        continue;
                    }
                }
                match beneath::rename(&dir, &tmp, &dir, &name).and_then(|()| beneath::metadata(&dir, &name)) {
                    Ok(md) => self.placed(&watch, &rel, &md, hash),
                    Err(e) => {
                        let _ = beneath::unlink(&dir, &tmp);
                        self.report.failed.push((rel, e.to_string()));
                    }
                }
            }
        }
        // 3. Directory metadata last (renames change directory mtimes).
        for (dir, meta) in std::mem::take(&mut self.dir_meta).into_iter().rev() {
            let _ = beneath::set_times(&dir, meta.mtime, meta.mtime_nsec);
        }
        // 4. The directories are durable before the commit is acknowledged,
        // and so is what the undo store kept.
        let dirs = std::mem::take(&mut self.dirs_to_sync);
        let synced = sync_dirs(self.sync, &dirs);
        if let Some(u) = self.undo.as_mut() {
            self.report.undo_kept = u.commit();
        }
        // Caches and ledgers are rewritten whole, so not at every commit of a
        // long burst: at most every few seconds, and when the session ends.
        // Losing the last seconds of them to a crash is safe: hashes are
        // recomputed, and files are preserved rather than lost.
        if self.saved_at.elapsed() >= STATE_SAVE_INTERVAL {
            self.save_state();
        }
        if let Some(t) = self.tracker.clone() {
            for (watch, rel, dir, name) in tracked {
                let key = (watch, rel);
                let stamp = self
                    .placed_now
                    .remove(&key)
                    .or_else(|| beneath::stat(&dir, &name).ok().map(|st| Stamp::of_stat(&st)));
                t.end(&key.0, &key.1, stamp, trees.contains(&key));
            }
            self.placed_now.clear();
        }
        // The next batch opens its roots again: a root replaced meanwhile
        // (by a link, say) is then refused.
        self.handles.clear();
        self.diverged = None;
        let report = std::mem::take(&mut self.report);
        match synced {
            Ok(()) => Ok(report),
            Err(e) => {
                tracing::error!(error = %e, applied = report.applied, "cannot make the directories of a batch durable; it is not acknowledged");
                Err(NotDurable(e))
            }
        }
    }

    /// Records a file just placed, with metadata `md` (read after it was
    /// placed: placing changes its ctime), in the hash cache and the ledger.
    fn placed(&mut self, watch: &str, rel: &str, md: &fs::Metadata, hash: ContentHash) {
        if self.tracker.is_some() {
            self.placed_now
                .insert((watch.to_string(), rel.to_string()), Stamp::of_metadata(md));
        }
        if let Some(w) = self.watches.get_mut(watch) {
            w.cache.insert(rel, md, hash);
        }
        if let Some(div) = &self.divergence {
            div.ledgers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .watch(watch)
                .set(rel, hash);
        }
    }

    /// Persists the hash caches and the ledgers.
    pub fn save_state(&mut self) {
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

/// At most this many unnamed files are held open by one batch.
const UNNAMED_MAX: u64 = 4096;

/// Files up to this size are received into unnamed files.
const UNNAMED_SIZE_MAX: u64 = 1 << 20;

/// Files up to this size are kept in memory until their commit, which makes
/// them (see [`Staged::InMemory`]) ...
const IN_MEMORY_SIZE_MAX: u64 = 64 << 10;

/// ... while the batch holds no more than this in all.
const IN_MEMORY_BYTES_MAX: u64 = 16 << 20;

/// How many files a batch writes before the [`Flusher`] is asked to start
/// writing them back.
const FLUSH_EVERY_FILES: usize = 1000;

/// A thread that syncs a filesystem when asked, so that the files of a large
/// batch go to the disk while the rest of the batch still arrives; the
/// commit's own sync then finds little left to write. It only ever starts
/// work early: durability comes from the commit's sync. A request made
/// while a sync runs is dropped. The thread starts with the first request.
#[derive(Default)]
struct Flusher {
    requests: Option<std::sync::mpsc::SyncSender<Arc<File>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    /// Asks for the filesystem holding the directory open as `dir` to be synced.
    fn start(&mut self, dir: Arc<File>) {
        if self.requests.is_none() {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<File>>(0);
            let spawned = std::thread::Builder::new()
                .name("warmspare-flush".into())
                .spawn(move || {
                    for dir in rx {
                        // Only a head start: the commit's sync reports failures.
                        let _ = crate::sys::syncfs(&dir);
                    }
                });
            match spawned {
                Ok(thread) => {
                    self.requests = Some(tx);
                    self.thread = Some(thread);
                }
                // No thread, no head start: the commit syncs everything.
                Err(_) => return,
            }
        }
        if let Some(tx) = &self.requests {
            // A rendezvous channel: this fails unless the thread is idle.
            let _ = tx.try_send(dir);
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.requests = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Links an unnamed file into place as `name` in `dir`, never replacing
/// anything; returns its metadata after the link (which changes its ctime).
fn link_one(file: &File, dir: &File, name: &str) -> io::Result<fs::Metadata> {
    crate::sys::link_unnamed(file, dir, std::ffi::OsStr::new(name)).and_then(|()| file.metadata())
}

/// Below this many files a commit links them on its own thread.
const LINK_AHEAD_MIN: usize = 256;

/// Links a commit's unnamed files into place before the commit walks its
/// list in order, the two halves of the list on two threads, and returns
/// each file's outcome by position (`None`: left to the walk).
///
/// Linking is the largest part of a commit (a fifth of the receiver's time
/// in an initial sync), and once the sender has sent everything the
/// receiver's thread is the only busy one: the second half goes to the other
/// core. Files arrive directory by directory, so the halves mostly link into
/// different directories and do not wait for each other's directory lock.
/// Only files whose target no other file of the batch has are linked ahead:
/// for those, when each is linked does not matter, while two versions of
/// one path must be placed in the order they came, and a later one replaces
/// an earlier (the walk, which preserves what is in the way, does that).
fn link_ahead(pending: &[Pending]) -> Vec<Option<io::Result<fs::Metadata>>> {
    if pending.len() < LINK_AHEAD_MIN {
        return Vec::new();
    }
    let mut seen = std::collections::HashSet::with_capacity(pending.len());
    fn key(p: &Pending) -> (&str, &str) {
        (p.watch.as_str(), p.rel.as_str())
    }
    let twice: std::collections::HashSet<(&str, &str)> =
        pending.iter().filter(|p| !seen.insert(key(p))).map(key).collect();
    let mut items: Vec<&Pending> = pending.iter().collect();
    on_two_threads(&mut items, |part| {
        part.iter()
            .map(|p| match &p.staged {
                Staged::Unnamed { file, dir } if !twice.contains(&key(p)) => Some(link_one(file, dir, &p.name)),
                _ => None,
            })
            .collect()
    })
}

/// Runs `work` on the two halves of `items`, the second on a thread of its
/// own (on this one when no thread can be started), and returns the
/// results in order. A panic there is a bug, and is raised again here: it
/// ends the session, which acknowledges nothing.
fn on_two_threads<T: Send, R: Send>(items: &mut [T], work: impl Fn(&mut [T]) -> Vec<R> + Sync) -> Vec<R> {
    let mid = items.len() / 2;
    let work = &work;
    let (mut out, second_done) = std::thread::scope(|scope| {
        let (first, second) = items.split_at_mut(mid);
        let other = std::thread::Builder::new()
            .name("warmspare-commit".into())
            .spawn_scoped(scope, move || work(second));
        let mut out = work(first);
        match other {
            Ok(t) => match t.join() {
                Ok(rest) => {
                    out.extend(rest);
                    (out, true)
                }
                Err(panic) => std::panic::resume_unwind(panic),
            },
            Err(_) => (out, false),
        }
    });
    if !second_done {
        out.extend(work(&mut items[mid..]));
    }
    out
}

/// Checks that a received file has the size and content hash it was
/// announced with.
fn check_content(inc: &Incoming) -> Result<(), String> {
    if inc.written != inc.size {
        return Err(format!("got {} bytes, {} were announced", inc.written, inc.size));
    }
    let got = ContentHash(*inc.hasher.finalize().as_bytes());
    if got != inc.hash {
        return Err(format!("content hash mismatch: got {got}, announced {}", inc.hash));
    }
    Ok(())
}

/// Gives a received file, written whole, its mode, owner (with `chown`)
/// and modification time.
fn give_meta(file: &File, meta: Meta, chown: bool) -> io::Result<()> {
    // A new file usually has the wanted mode (see `file_begin`) and owner
    // (the agent's) already: an `fstat` costs less than `fchmod` and
    // `fchown`, which each rewrite the inode.
    let have = file.metadata()?;
    if have.mode() & 0o7777 != meta.mode & 0o7777 {
        file.set_permissions(fs::Permissions::from_mode(meta.mode))?;
    }
    if chown && (have.uid(), have.gid()) != (meta.uid, meta.gid) {
        std::os::unix::fs::fchown(file, Some(meta.uid), Some(meta.gid))?;
        // Giving a file away clears its set-user-ID and set-group-ID bits.
        if meta.mode & 0o6000 != 0 {
            file.set_permissions(fs::Permissions::from_mode(meta.mode))?;
        }
    }
    filetime::set_file_handle_times(
        file,
        None,
        Some(filetime::FileTime::from_unix_time(meta.mtime, meta.mtime_nsec)),
    )
}

/// Makes a file kept in memory: unnamed in `dir` where the file system
/// has such files, else with a temporary name beside its target `name`;
/// writes `data` and gives it `meta`.
fn make_in_memory(data: &[u8], dir: Arc<File>, meta: Meta, name: &str, chown: bool) -> io::Result<Staged> {
    let (mut file, staged_name) = match crate::sys::open_unnamed(&dir, meta.mode & 0o777) {
        Ok(file) => (file, None),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)) => {
            let tmp = temp_name(name, "new");
            (beneath::create_private(&dir, &tmp)?, Some(tmp))
        }
        Err(e) => return Err(e),
    };
    match file.write_all(data).and_then(|()| give_meta(&file, meta, chown)) {
        Ok(()) => Ok(match staged_name {
            Some(tmp) => Staged::Named { tmp, dir },
            None => Staged::Unnamed { file, dir },
        }),
        Err(e) => {
            if let Some(tmp) = staged_name {
                let _ = beneath::unlink(&dir, &tmp);
            }
            Err(e)
        }
    }
}

/// Below this many in-memory files a commit makes them on its own thread.
const IN_MEMORY_AHEAD_MIN: usize = 64;

/// Makes the in-memory files of `pending` (see [`make_in_memory`]), the two halves of
/// the list on two threads when there are many; a file that cannot be made
/// is taken out of the list and returned with why.
fn make_all_in_memory(mut pending: Vec<Pending>, chown: bool) -> (Vec<Pending>, Vec<(String, String)>) {
    // For each file, why it could not be made.
    let make = |part: &mut [Pending]| -> Vec<Option<String>> {
        part.iter_mut()
            .map(|p| {
                let Staged::InMemory { data, dir, meta } = &p.staged else {
                    return None;
                };
                match make_in_memory(data, dir.clone(), *meta, &p.name, chown) {
                    Ok(staged) => {
                        p.staged = staged;
                        None
                    }
                    Err(e) => Some(e.to_string()),
                }
            })
            .collect()
    };
    let in_memory = pending
        .iter()
        .filter(|p| matches!(p.staged, Staged::InMemory { .. }))
        .count();
    let outcomes = if in_memory < IN_MEMORY_AHEAD_MIN {
        make(&mut pending)
    } else {
        on_two_threads(&mut pending, make)
    };
    let mut failed = Vec::new();
    let made = pending
        .into_iter()
        .zip(outcomes)
        .filter_map(|(p, why)| match why {
            None => Some(p),
            Some(why) => {
                failed.push((p.rel, why));
                None
            }
        })
        .collect();
    (made, failed)
}

/// Moves `name` from the directory open as `from` to the same name in the
/// directory open as `to` (a diverged folder), replacing what is there.
/// Across file systems, a regular file is copied from its open descriptor
/// (and made durable) and a link made again, before the original is removed.
fn move_aside(from: &File, name: &str, to: &File) -> io::Result<()> {
    match beneath::rename(from, name, to, name) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {}
        done => return done,
    }
    let st = beneath::stat(from, name)?;
    if beneath::is_symlink(&st) {
        let target = beneath::read_link(from, name)?;
        let target = target
            .to_str()
            .ok_or_else(|| io::Error::other("a link target that is not UTF-8"))?;
        match beneath::unlink(to, name) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        beneath::symlink(target, to, name)?;
    } else {
        let mut src = beneath::open_in(from, name, OFlags::RDONLY)?;
        if !src.metadata()?.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        match beneath::unlink(to, name) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut dst = beneath::create_private(to, name)?;
        io::copy(&mut src, &mut dst)?;
        dst.sync_all()?;
    }
    to.sync_all()?;
    beneath::unlink(from, name)
}

/// Write-back of a file being received starts every this many bytes.
const WRITEBACK_STEP: u64 = 8 << 20;

/// A new temporary file being written, at its own position. One that will
/// be made durable starts the kernel writing back each [`WRITEBACK_STEP`]
/// bytes as they arrive, without waiting, so that the commit's fsync finds
/// little left to write; otherwise a large file is written back only at
/// that fsync, after the last byte has arrived.
///
/// A durable file is written sparse, as `rsync --sparse` does: a whole
/// aligned block of zeros ([`crate::sparse::ZERO_BLOCK`]) is stepped over
/// instead of written, and so is a hole ([`Output::skip`]); [`Output::end`]
/// gives the file its full length when it ends in a hole.
struct Output {
    file: File,
    /// Where the next byte goes (the bytes written and stepped over).
    written: u64,
    /// Where write-back has been started up to; `None` for scratch files
    /// (spooled deltas), which are never made durable.
    started: Option<u64>,
}

impl Output {
    fn durable(file: File) -> Output {
        Output {
            file,
            written: 0,
            started: Some(0),
        }
    }

    fn scratch(file: File) -> Output {
        Output {
            file,
            written: 0,
            started: None,
        }
    }

    /// Steps over `len` bytes of zeros, leaving a hole.
    fn skip(&mut self, len: u64) -> io::Result<()> {
        self.written = self
            .written
            .checked_add(len)
            .ok_or_else(|| io::Error::other("a file longer than 2^64 bytes"))?;
        Ok(())
    }

    /// The file, as long as everything written and stepped over (a hole at
    /// the end has no block to give the file its length).
    fn end(self) -> io::Result<File> {
        if self.file.metadata()?.len() < self.written {
            self.file.set_len(self.written)?;
        }
        Ok(self.file)
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = if self.started.is_some() {
            let zeros = crate::sparse::zero_run(buf, self.written);
            if zeros > 0 {
                self.skip(zeros as u64)?;
                return Ok(zeros);
            }
            let data = crate::sparse::before_zeros(buf, self.written);
            self.file.write_at(&buf[..data], self.written)?
        } else {
            self.file.write_at(buf, self.written)?
        };
        self.written += n as u64;
        if let Some(started) = self.started.filter(|s| self.written - s >= WRITEBACK_STEP) {
            // Only a hint: the commit's fsync reports any real failure.
            let _ = crate::sys::start_writeback(&self.file, started, self.written - started);
            self.started = Some(self.written);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

struct HashingWriter<W> {
    inner: W,
    hasher: blake3::Hasher,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
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

/// A temporary name (see [`TEMP_PREFIX`]) for a file `what` beside `name`.
fn temp_name(name: &str, what: &str) -> String {
    let short: String = name.chars().take(100).collect();
    format!("{TEMP_PREFIX}{short}.{what}.{:08x}", rand::random::<u32>())
}

/// The content hash of the open regular file `file`, known as `rel`: from
/// the cache when its metadata says it is unchanged, else read through the
/// descriptor (never by name) and cached.
fn hash_open(cache: &mut HashCache, rel: &str, file: &File) -> io::Result<ContentHash> {
    let md = file.metadata()?;
    if let Some(hash) = cache.cached(rel, &md) {
        return Ok(hash);
    }
    // Holes are hashed without being read.
    let (_, hash) = crate::sparse::hash_file(file)?;
    cache.record(rel, &md, hash, &file.metadata()?);
    Ok(hash)
}

/// Makes the content of `pending` durable: each file on its own when there
/// are few, else every file system they are on at once.
fn sync_files(sync: SyncFn, pending: &[Pending]) -> io::Result<()> {
    if pending.len() <= FSYNC_EACH_MAX {
        for p in pending {
            match &p.staged {
                Staged::Named { tmp, dir } => sync(SyncCall::FileData, &beneath::open_in(dir, tmp, OFlags::RDONLY)?)?,
                Staged::Unnamed { file, .. } => sync(SyncCall::FileData, file)?,
                Staged::InMemory { .. } => {}
            }
        }
        Ok(())
    } else {
        sync_file_systems(sync, pending.iter().map(|p| &**p.staged.dir()))
    }
}

/// One handle on each file system the handles `dirs` are on, in order of
/// first appearance (watch roots may be on different file systems).
fn one_per_file_system<'a>(dirs: impl Iterator<Item = &'a File>) -> io::Result<Vec<&'a File>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for d in dirs {
        if seen.insert(d.metadata()?.dev()) {
            out.push(d);
        }
    }
    Ok(out)
}

/// `syncfs` of every file system the handles `dirs` are on.
fn sync_file_systems<'a>(sync: SyncFn, dirs: impl Iterator<Item = &'a File>) -> io::Result<()> {
    for d in one_per_file_system(dirs)? {
        sync(SyncCall::FileSystem, d)?;
    }
    Ok(())
}

/// Gives the unnamed file `file`, made in `dir`, a temporary name beside
/// its target `name`; returns that name.
fn name_beside(file: &File, dir: &File, name: &str) -> io::Result<String> {
    let tmp = temp_name(name, "new");
    crate::sys::link_unnamed(file, dir, std::ffi::OsStr::new(&tmp))?;
    Ok(tmp)
}

/// Makes the directories open in `dirs` durable: each on its own when there
/// are few, else every file system they are on at once.
fn sync_dirs(sync: SyncFn, dirs: &BTreeMap<(String, String), Arc<File>>) -> io::Result<()> {
    if dirs.len() <= FSYNC_EACH_MAX {
        for d in dirs.values() {
            sync(SyncCall::Dir, d)?;
        }
        Ok(())
    } else {
        sync_file_systems(sync, dirs.values().map(|d| &**d))
    }
}

/// Removes the temporary files left under the watch root `root` by an
/// interrupted run, through directory handles (see
/// [`beneath::clean_temps_at`]): what it cannot open or remove is skipped,
/// logged and counted, never fatal. A missing root has nothing to clean; a
/// root that is a symbolic link or not a directory is an error (and is not
/// entered).
pub fn clean_temps(root: &Path) -> io::Result<beneath::Cleaned> {
    match beneath::open_root(root) {
        Ok(dir) => Ok(beneath::clean_temps_at(&dir)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(beneath::Cleaned::default()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_bytes::ByteBuf;
    use std::os::unix::fs::MetadataExt;

    fn applier(root: &Path) -> Applier {
        Applier::new(
            vec![WatchRoot {
                name: "w".into(),
                root: root.to_path_buf(),
                excludes: Excludes::new(&["ex/".into()]).unwrap(),
                cache: HashCache::default(),
                cache_path: None,
            }],
            None,
        )
        .unwrap()
    }

    fn meta() -> Meta {
        Meta {
            mode: 0o640,
            mtime: 1_600_000_000,
            mtime_nsec: 5,
            uid: 0,
            gid: 0,
        }
    }

    fn send_file(a: &mut Applier, rel: &str, data: &[u8]) {
        send_file_with(a, rel, data, meta());
    }

    fn send_file_with(a: &mut Applier, rel: &str, data: &[u8], meta: Meta) {
        a.apply(Op::FileBegin {
            watch: "w".into(),
            path: rel.into(),
            meta,
            size: data.len() as u64,
            hash: ContentHash::of(data),
            delta_base: None,
        })
        .unwrap();
        // Small files in tiny frames (to test reassembly), large ones in 64.
        for c in data.chunks(3.max(data.len() / 64)) {
            a.apply(Op::FileData(ByteBuf::from(c.to_vec()))).unwrap();
        }
        a.apply(Op::FileEnd).unwrap();
    }

    /// Files, directories, metadata and removals through a link below the
    /// root are refused, and nothing outside is touched.
    #[test]
    fn nothing_goes_through_a_link_below_the_root() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("victim"), b"keep").unwrap();
        fs::set_permissions(outside.path().join("victim"), fs::Permissions::from_mode(0o600)).unwrap();
        let before = fs::metadata(outside.path().join("victim")).unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("link")).unwrap();
        let mut a = applier(d.path());
        send_file(&mut a, "link/new", b"x");
        send_file(&mut a, "link/victim", b"replaced");
        a.apply(Op::Dir {
            watch: "w".into(),
            path: "link/dir".into(),
            meta: Meta { mode: 0o755, ..meta() },
        })
        .unwrap();
        a.apply(Op::SetMeta {
            watch: "w".into(),
            path: "link/victim".into(),
            meta: Meta { mode: 0o666, ..meta() },
        })
        .unwrap();
        a.apply(Op::Remove {
            watch: "w".into(),
            path: "link/victim".into(),
        })
        .unwrap();
        let r = a.commit().unwrap();
        assert_eq!(r.failed.len(), 5, "{:?}", r.failed);
        let names: Vec<_> = fs::read_dir(outside.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("victim")]);
        let after = fs::metadata(outside.path().join("victim")).unwrap();
        assert_eq!(fs::read(outside.path().join("victim")).unwrap(), b"keep");
        assert_eq!(after.mode(), before.mode());
        assert_eq!(after.mtime(), before.mtime());
        // The link itself may be replaced: it is a name in the root.
        send_file(&mut a, "link", b"now a file");
        assert!(a.commit().unwrap().failed.is_empty());
        assert_eq!(fs::read(d.path().join("link")).unwrap(), b"now a file");
        assert_eq!(fs::read(outside.path().join("victim")).unwrap(), b"keep");
    }

    /// A watch root replaced by a link to another directory: nothing is
    /// written there, and the manifest is refused.
    #[test]
    fn a_root_replaced_by_a_link_is_not_used() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("victim"), b"keep").unwrap();
        let root = d.path().join("root");
        fs::create_dir(&root).unwrap();
        let mut a = applier(&root);
        send_file(&mut a, "before", b"x");
        assert!(a.commit().unwrap().failed.is_empty());
        fs::rename(&root, d.path().join("root.old")).unwrap();
        std::os::unix::fs::symlink(outside.path(), &root).unwrap();
        send_file(&mut a, "victim", b"replaced");
        send_file(&mut a, "new", b"x");
        a.apply(Op::Remove {
            watch: "w".into(),
            path: "victim".into(),
        })
        .unwrap();
        let r = a.commit().unwrap();
        assert_eq!(r.failed.len(), 3, "{:?}", r.failed);
        assert!(r.failed[0].1.contains("symbolic link"), "{:?}", r.failed);
        assert!(a.manifest("w").is_err());
        let names: Vec<_> = fs::read_dir(outside.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("victim")]);
        assert_eq!(fs::read(outside.path().join("victim")).unwrap(), b"keep");
        // And a fresh applier refuses it from the start.
        drop(a);
        let mut a = applier(&root);
        send_file(&mut a, "new", b"x");
        assert_eq!(a.commit().unwrap().failed.len(), 1);
        assert!(!outside.path().join("new").exists());
    }

    #[test]
    fn a_directory_replaced_by_a_link_in_the_same_batch_is_checked_again() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let mut a = applier(d.path());
        fs::create_dir(d.path().join("sub")).unwrap();
        // The first file makes `sub` an open directory of the batch.
        send_file(&mut a, "sub/one", b"1");
        a.apply(Op::Remove {
            watch: "w".into(),
            path: "sub".into(),
        })
        .unwrap();
        a.apply(Op::Symlink {
            watch: "w".into(),
            path: "sub".into(),
            target: outside.path().display().to_string(),
            meta: meta(),
        })
        .unwrap();
        send_file(&mut a, "sub/two", b"2");
        let r = a.commit().unwrap();
        assert!(r.failed.iter().any(|(rel, _)| rel == "sub/two"), "{:?}", r.failed);
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn whole_file_is_invisible_until_commit() {
        let d = tempfile::tempdir().unwrap();
        let mut a = applier(d.path());
        send_file(&mut a, "f", b"hello world");
        assert!(!d.path().join("f").exists());
        let r = a.commit().unwrap();
        assert_eq!(r.applied, 1);
        assert!(r.failed.is_empty());
        assert_eq!(fs::read(d.path().join("f")).unwrap(), b"hello world");
        let md = fs::metadata(d.path().join("f")).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o640);
        assert_eq!(md.mtime(), 1_600_000_000);
        assert_eq!(clean_temps(d.path()).unwrap(), beneath::Cleaned::default());
    }

    #[test]
    fn a_large_commit_places_every_file_and_the_last_version_of_a_path_sent_twice() {
        let d = tempfile::tempdir().unwrap();
        let mut a = applier(d.path());
        // Enough files for the commit to link on two threads; "d3/again"
        // comes early and late, so one copy is in each half.
        let n = LINK_AHEAD_MIN * 2;
        send_file(&mut a, "d3/again", b"first");
        for i in 0..n {
            send_file(&mut a, &format!("d{}/f{i}", i % 7), format!("file {i}").as_bytes());
        }
        send_file(&mut a, "d3/again", b"second");
        let r = a.commit().unwrap();
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        assert!(r.diverged.is_empty(), "{:?}", r.diverged);
        for i in 0..n {
            let got = fs::read(d.path().join(format!("d{}/f{i}", i % 7))).unwrap();
            assert_eq!(got, format!("file {i}").as_bytes());
        }
        assert_eq!(fs::read(d.path().join("d3/again")).unwrap(), b"second");
        assert_eq!(clean_temps(d.path()).unwrap(), beneath::Cleaned::default());
    }

    #[test]
    fn in_memory_files_that_cannot_be_made_at_commit_are_reported_and_the_rest_placed() {
        let d = tempfile::tempdir().unwrap();
        let mut a = applier(d.path());
        // Enough in-memory files for two threads; the second half's directory
        // disappears before the commit makes them.
        let n = IN_MEMORY_AHEAD_MIN * 2;
        for i in 0..n {
            let dir = if i < n / 2 { "kept" } else { "gone" };
            send_file(&mut a, &format!("{dir}/f{i}"), format!("file {i}").as_bytes());
        }
        fs::remove_dir(d.path().join("gone")).unwrap();
        let r = a.commit().unwrap();
        assert_eq!(r.failed.len(), n / 2, "{:?}", r.failed);
        assert!(r.failed.iter().all(|(rel, _)| rel.starts_with("gone/")));
        assert_eq!(r.applied, (n / 2) as u64);
        for i in 0..n / 2 {
            assert_eq!(
                fs::read(d.path().join(format!("kept/f{i}"))).unwrap(),
                format!("file {i}").as_bytes()
            );
        }
        assert!(!d.path().join("gone").exists());
    }

    #[test]
    fn a_batch_flushed_early_still_appears_only_at_commit() {
        let d = tempfile::tempdir().unwrap();
        let mut a = applier(d.path());
        // Files too large to be kept in memory are written as they arrive.
        let n = FLUSH_EVERY_FILES + 3;
        let body = |i: usize| {
            let mut b = format!("content {i}").into_bytes();
            b.resize(IN_MEMORY_SIZE_MAX as usize + 1, b'.');
            b
        };
        for i in 0..n {
            send_file(&mut a, &format!("f{i}"), &body(i));
        }
        assert!(a.flusher.thread.is_some(), "the flusher was never asked to start");
        assert!(!d.path().join("f0").exists());
        let r = a.commit().unwrap();
        assert_eq!(r.applied, n as u64);
        assert!(r.failed.is_empty());
        for i in 0..n {
            assert_eq!(fs::read(d.path().join(format!("f{i}"))).unwrap(), body(i));
        }
        assert_eq!(clean_temps(d.path()).unwrap(), beneath::Cleaned::default());
    }

    #[test]
    fn received_files_get_their_mode_and_owner_whatever_the_new_file_had() {
        let d = tempfile::tempdir().unwrap();
        let mut a = applier(d.path());
        // Write bits the usual umask (022) takes off a new file, another
        // owner when this process may give files away, and set-user-ID,
        // which giving a file away clears.
        let wanted = [
            ("plain", 0o640, 0, 0),
            ("group-writable", 0o666, 0, 0),
            ("setuid", 0o4755, 0, 0),
            ("given-away", 0o4750, 1234, 5678),
        ];
        for (name, mode, uid, gid) in wanted {
            send_file_with(
                &mut a,
                name,
                name.as_bytes(),
                Meta {
                    mode,
                    uid,
                    gid,
                    ..meta()
                },
            );
        }
        let r = a.commit().unwrap();
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        for (name, mode, uid, gid) in wanted {
            let md = fs::metadata(d.path().join(name)).unwrap();
            assert_eq!(md.mode() & 0o7777, mode, "{name}");
            if a.can_chown() {
                assert_eq!((md.uid(), md.gid()), (uid, gid), "{name}");
            }
        }
    }

    #[test]
    fn small_files_wait_unnamed_and_large_ones_named() {
        let d = tempfile::tempdir().unwrap();
        let mut a = applier(d.path());
        let temps = || {
            fs::read_dir(d.path())
                .unwrap()
                .filter(|e| manifest::is_temp_name(e.as_ref().unwrap().file_name().to_str().unwrap()))
                .count()
        };
        fs::write(d.path().join("old"), b"local").unwrap();
        // Directories alternate, so the open directory kept for the last
        // file is not the one the next file needs.
        send_file(&mut a, "sub/a", b"in sub");
        send_file(&mut a, "new", b"small and new");
        send_file(&mut a, "sub/b", b"in sub too");
        send_file(&mut a, "old", b"small, replacing");
        assert_eq!(temps(), 0, "small files are staged without a name");
        let big = vec![7u8; (UNNAMED_SIZE_MAX + 1) as usize];
        send_file(&mut a, "big", &big);
        assert_eq!(temps(), 1, "a large file is staged under a temporary name");
        let r = a.commit().unwrap();
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        assert_eq!(fs::read(d.path().join("new")).unwrap(), b"small and new");
        assert_eq!(fs::read(d.path().join("old")).unwrap(), b"small, replacing");
        assert_eq!(fs::read(d.path().join("big")).unwrap(), big);
        assert_eq!(fs::read(d.path().join("sub/a")).unwrap(), b"in sub");
        assert_eq!(fs::read(d.path().join("sub/b")).unwrap(), b"in sub too");
        assert_eq!(fs::metadata(d.path().join("new")).unwrap().mode() & 0o7777, 0o640);
        assert_eq!(temps(), 0);
    }

    #[test]
    fn bad_hash_and_oversize_are_caught() {
        let d = tempfile::tempdir().unwrap();
        let mut a = applier(d.path());
        a.apply(Op::FileBegin {
            watch: "w".into(),
            path: "f".into(),
            meta: meta(),
            size: 3,
            hash: ContentHash::of(b"abc"),
            delta_base: None,
        })
        .unwrap();
        a.apply(Op::FileData(ByteBuf::from(b"abd".to_vec()))).unwrap();
        a.apply(Op::FileEnd).unwrap();
        let r = a.commit().unwrap();
        assert_eq!(r.failed.len(), 1);
        assert!(!d.path().join("f").exists());
        a.apply(Op::FileBegin {
            watch: "w".into(),
            path: "g".into(),
            meta: meta(),
            size: 2,
            hash: ContentHash::of(b"ab"),
            delta_base: None,
        })
        .unwrap();
        assert!(a.apply(Op::FileData(ByteBuf::from(b"abc".to_vec()))).is_err());
        drop(a);
        assert_eq!(clean_temps(d.path()).unwrap(), beneath::Cleaned::default());
    }

    /// Bytes allocated to the file at `p`.
    fn allocated(p: &Path) -> u64 {
        fs::metadata(p).unwrap().blocks() * 512
    }

    #[test]
    fn holes_and_blocks_of_zeros_are_not_written() {
        let d = tempfile::tempdir().unwrap();
        let mut a = applier(d.path());
        let mib = 1 << 20;
        // 16 MiB: 10 bytes, a 6 MiB hole, 1 MiB of zeros sent as data with a
        // byte at its end, then a trailing hole.
        let mut content = vec![0u8; 16 * mib];
        content[..10].copy_from_slice(b"0123456789");
        content[7 * mib + 10 - 1] = 1;
        a.apply(Op::FileBegin {
            watch: "w".into(),
            path: "sparse".into(),
            meta: meta(),
            size: content.len() as u64,
            hash: ContentHash::of(&content),
            delta_base: None,
        })
        .unwrap();
        a.apply(Op::FileData(ByteBuf::from(content[..10].to_vec()))).unwrap();
        a.apply(Op::FileHole(6 * mib as u64)).unwrap();
        for part in content[6 * mib + 10..7 * mib + 10].chunks(crate::proto::CHUNK) {
            a.apply(Op::FileData(ByteBuf::from(part.to_vec()))).unwrap();
        }
        a.apply(Op::FileHole((9 * mib - 10) as u64)).unwrap();
        a.apply(Op::FileEnd).unwrap();
        let r = a.commit().unwrap();
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        let path = d.path().join("sparse");
        assert!(fs::read(&path).unwrap() == content, "the content differs");
        // A block or two for each end of data, however the file system counts.
        assert!(allocated(&path) <= 64 * 1024, "{} bytes allocated", allocated(&path));

        // A delta against that file whose copies are mostly zeros: written sparse too.
        let mut new = content.clone();
        new[12 * mib..12 * mib + 5].copy_from_slice(b"hello");
        let (base, sig) = a.signature("w", "sparse", 64 * 1024).unwrap().unwrap();
        let mut dl = Vec::new();
        delta::diff(&sig, &new, &mut dl).unwrap();
        a.apply(Op::FileBegin {
            watch: "w".into(),
            path: "sparse".into(),
            meta: meta(),
            size: new.len() as u64,
            hash: ContentHash::of(&new),
            delta_base: Some(base),
        })
        .unwrap();
        a.apply(Op::FileData(ByteBuf::from(dl))).unwrap();
        a.apply(Op::FileEnd).unwrap();
        let r = a.commit().unwrap();
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        assert!(fs::read(&path).unwrap() == new, "the delta's result differs");
        assert!(allocated(&path) <= 256 * 1024, "{} bytes allocated", allocated(&path));
    }

    #[test]
    fn holes_past_the_announced_size_or_in_a_delta_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut a = applier(d.path());
        let begin = |size: u64, delta_base| Op::FileBegin {
            watch: "w".into(),
            path: "f".into(),
            meta: meta(),
            size,
            hash: ContentHash::of(&vec![0u8; size as usize]),
            delta_base,
        };
        assert!(a.apply(Op::FileHole(1)).is_err(), "a hole outside a file");
        a.apply(begin(100, None)).unwrap();
        a.apply(Op::FileHole(60)).unwrap();
        assert!(a.apply(Op::FileHole(41)).is_err());
        a.commit().unwrap();
        a.apply(begin(100, None)).unwrap();
        assert!(a.apply(Op::FileHole(u64::MAX)).is_err());
        a.commit().unwrap();
        send_file(&mut a, "f", &[0u8; 100_000]);
        a.commit().unwrap();
        let (base, _) = a.signature("w", "f", 700).unwrap().unwrap();
        a.apply(begin(100_000, Some(base))).unwrap();
        assert!(a.apply(Op::FileHole(10)).is_err());
        a.commit().unwrap();
        drop(a);
        assert_eq!(clean_temps(d.path()).unwrap(), beneath::Cleaned::default());
        assert_eq!(fs::read(d.path().join("f")).unwrap(), vec![0u8; 100_000]);
    }

    #[test]
    fn delta_applies_against_current_file() {
        let d = tempfile::tempdir().unwrap();
        let mut a = applier(d.path());
        let old: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        send_file(&mut a, "big", &old);
        a.commit().unwrap();
        let mut new = old.clone();
        new[1000..1010].copy_from_slice(b"ABCDEFGHIJ");
        let (base, sig) = a.signature("w", "big", 700).unwrap().unwrap();
        assert_eq!(base, ContentHash::of(&old));
        let mut dl = Vec::new();
        delta::diff(&sig, &new, &mut dl).unwrap();
        a.apply(Op::FileBegin {
            watch: "w".into(),
            path: "big".into(),
            meta: meta(),
            size: new.len() as u64,
            hash: ContentHash::of(&new),
            delta_base: Some(base),
        })
        .unwrap();
        a.apply(Op::FileData(ByteBuf::from(dl))).unwrap();
        a.apply(Op::FileEnd).unwrap();
        let r = a.commit().unwrap();
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        assert_eq!(fs::read(d.path().join("big")).unwrap(), new);
    }

    #[test]
    fn differing_local_files_are_preserved_before_replacement() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let div = Divergence {
            ledgers: Arc::new(Mutex::new(Ledgers::new(d.path().join("ledger")))),
            dir: d.path().join("diverged/2-now"),
        };
        let mut a = Applier::new(
            vec![WatchRoot {
                name: "w".into(),
                root: root.clone(),
                excludes: Excludes::new(&[]).unwrap(),
                cache: HashCache::default(),
                cache_path: None,
            }],
            Some(div.clone()),
        )
        .unwrap();
        fs::write(root.join("f"), b"signed while cut off").unwrap();
        fs::write(root.join("gone"), b"local only").unwrap();
        send_file(&mut a, "f", b"from the active");
        a.apply(Op::Remove {
            watch: "w".into(),
            path: "gone".into(),
        })
        .unwrap();
        let r = a.commit().unwrap();
        assert_eq!(r.diverged.len(), 2, "{:?}", r.diverged);
        assert_eq!(fs::read(div.dir.join("w/f")).unwrap(), b"signed while cut off");
        assert_eq!(fs::read(div.dir.join("w/gone")).unwrap(), b"local only");
        assert_eq!(fs::read(root.join("f")).unwrap(), b"from the active");
        // What the active shipped is agreed: replacing it again preserves nothing.
        send_file(&mut a, "f", b"newer");
        assert!(a.commit().unwrap().diverged.is_empty());
        // After a settled full comparison, files present are agreed too.
        fs::write(root.join("other"), b"same on both").unwrap();
        a.apply(Op::Settled {
            watch: "w".into(),
            except: vec![],
        })
        .unwrap();
        a.apply(Op::Remove {
            watch: "w".into(),
            path: "other".into(),
        })
        .unwrap();
        assert!(a.commit().unwrap().diverged.is_empty());
    }

    #[test]
    fn agreed_files_removed_or_replaced_are_kept_in_the_undo_store_and_diverged_ones_are_not() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let div = Divergence {
            ledgers: Arc::new(Mutex::new(Ledgers::new(d.path().join("ledger")))),
            dir: d.path().join("diverged/2-now"),
        };
        let store = Arc::new(crate::undo::Store::new(d.path().join("undo")));
        let mut a = Applier::new(
            vec![WatchRoot {
                name: "w".into(),
                root: root.clone(),
                excludes: Excludes::new(&[]).unwrap(),
                cache: HashCache::default(),
                cache_path: None,
            }],
            Some(div.clone()),
        )
        .unwrap()
        .with_undo(crate::undo::Recorder::new(store.clone(), 2, 1 << 20));
        // Agreed content: shipped by the active.
        send_file(&mut a, "f", b"version 1");
        send_file(&mut a, "tree/x", b"x1");
        send_file(&mut a, "tree/sub/y", b"y1");
        a.apply(Op::Symlink {
            watch: "w".into(),
            path: "l".into(),
            target: "f".into(),
            meta: meta(),
        })
        .unwrap();
        let r = a.commit().unwrap();
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        assert_eq!(r.undo_kept, 0, "new files replace nothing");
        // A local change the ledger does not know: diverged, not undo.
        fs::write(root.join("tree/x"), b"local edit").unwrap();
        send_file(&mut a, "f", b"version 2");
        a.apply(Op::Remove {
            watch: "w".into(),
            path: "tree".into(),
        })
        .unwrap();
        a.apply(Op::Remove {
            watch: "w".into(),
            path: "l".into(),
        })
        .unwrap();
        let r = a.commit().unwrap();
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        assert_eq!(r.diverged.len(), 1, "{:?}", r.diverged);
        assert_eq!(fs::read(div.dir.join("w/tree/x")).unwrap(), b"local edit");
        assert_eq!(r.undo_kept, 3);
        let list = store.list(Some("w")).unwrap();
        let got: Vec<(&str, UndoWhy, crate::proto::UndoKind)> =
            list.iter().map(|e| (e.path.as_str(), e.why, e.kind)).collect();
        assert_eq!(
            got,
            vec![
                ("tree/sub/y", UndoWhy::Removed, crate::proto::UndoKind::File),
                ("l", UndoWhy::Removed, crate::proto::UndoKind::Symlink),
                ("f", UndoWhy::Replaced, crate::proto::UndoKind::File),
            ]
        );
        for e in &list {
            assert_eq!(e.epoch, 2);
        }
        let f = list.iter().find(|e| e.path == "f").unwrap();
        assert_eq!(f.hash, Some(ContentHash::of(b"version 1")));
        assert_eq!((f.meta.mode, f.meta.mtime), (0o640, 1_600_000_000));
        assert_eq!(store.read(f.id, 0, 100).unwrap().1, b"version 1");
        let y = list.iter().find(|e| e.path == "tree/sub/y").unwrap();
        assert_eq!(store.read(y.id, 0, 100).unwrap().1, b"y1");
        assert_eq!(fs::read(root.join("f")).unwrap(), b"version 2");
        assert!(!root.join("tree").exists());
    }

    /// A measurement, not a check: the undo store's cost when a commit
    /// replaces or removes many small files.
    #[test]
    #[ignore = "a measurement: cargo test --release -p warmspare-shared --lib -- --ignored undo_cost --nocapture"]
    fn undo_cost_of_replacing_and_removing_20000_small_files() {
        const N: usize = 20_000;
        let send = |a: &mut Applier, rel: &str, data: &[u8]| {
            a.apply(Op::FileBegin {
                watch: "w".into(),
                path: rel.into(),
                meta: meta(),
                size: data.len() as u64,
                hash: ContentHash::of(data),
                delta_base: None,
            })
            .unwrap();
            a.apply(Op::FileData(ByteBuf::from(data.to_vec()))).unwrap();
            a.apply(Op::FileEnd).unwrap();
        };
        for with_undo in [false, true, false, true] {
            let d = tempfile::tempdir().unwrap();
            let root = d.path().join("root");
            let div = Divergence {
                ledgers: Arc::new(Mutex::new(Ledgers::new(d.path().join("ledger")))),
                dir: d.path().join("diverged/1-now"),
            };
            let mut a = Applier::new(
                vec![WatchRoot {
                    name: "w".into(),
                    root: root.clone(),
                    excludes: Excludes::new(&[]).unwrap(),
                    cache: HashCache::default(),
                    cache_path: None,
                }],
                Some(div),
            )
            .unwrap();
            let store = Arc::new(crate::undo::Store::new(d.path().join("undo")));
            if with_undo {
                a = a.with_undo(crate::undo::Recorder::new(store.clone(), 1, 1 << 30));
            }
            let path = |i: usize| format!("d{:03}/cert{i:05}.pem", i % 100);
            let body = |i: usize, v: u8| format!("certificate {i} version {v} {}", "x".repeat(1500)).into_bytes();
            for i in 0..N {
                send(&mut a, &path(i), &body(i, 1));
                if i % 4000 == 3999 {
                    assert!(a.commit().unwrap().failed.is_empty());
                }
            }
            a.commit().unwrap();
            let t = std::time::Instant::now();
            for i in 0..N {
                send(&mut a, &path(i), &body(i, 2));
                if i % 4000 == 3999 {
                    assert!(a.commit().unwrap().failed.is_empty());
                }
            }
            a.commit().unwrap();
            let replaced = t.elapsed();
            let t = std::time::Instant::now();
            for dir in 0..100 {
                a.apply(Op::Remove {
                    watch: "w".into(),
                    path: format!("d{dir:03}"),
                })
                .unwrap();
            }
            assert!(a.commit().unwrap().failed.is_empty());
            let removed = t.elapsed();
            let kept = store.totals().unwrap().0;
            eprintln!(
                "undo {}: {N} files replaced in {replaced:.2?}, then removed (100 trees) in {removed:.2?}; {kept} kept",
                if with_undo { "on " } else { "off" }
            );
        }
    }

    #[test]
    fn excluded_paths_are_not_written_and_remove_works() {
        let d = tempfile::tempdir().unwrap();
        let mut a = applier(d.path());
        send_file(&mut a, "ex/secret", b"x");
        a.apply(Op::Dir {
            watch: "w".into(),
            path: "dir".into(),
            meta: Meta { mode: 0o755, ..meta() },
        })
        .unwrap();
        send_file(&mut a, "dir/f", b"y");
        a.apply(Op::Symlink {
            watch: "w".into(),
            path: "l".into(),
            target: "dir/f".into(),
            meta: meta(),
        })
        .unwrap();
        let r = a.commit().unwrap();
        assert_eq!(r.failed.len(), 1);
        assert!(!d.path().join("ex/secret").exists());
        assert_eq!(fs::read_link(d.path().join("l")).unwrap(), PathBuf::from("dir/f"));
        a.apply(Op::Remove {
            watch: "w".into(),
            path: "dir".into(),
        })
        .unwrap();
        a.commit().unwrap();
        assert!(!d.path().join("dir").exists());
        assert!(a
            .apply(Op::Remove {
                watch: "nope".into(),
                path: "dir".into()
            })
            .is_err());
    }

    /// A sync step whose directory and file-system syncs fail, as a disk
    /// that reports a write-back error would.
    fn failing_sync(call: SyncCall, file: &File) -> io::Result<()> {
        match call {
            SyncCall::FileData => system_sync(call, file),
            SyncCall::Dir | SyncCall::FileSystem => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }

    #[test]
    fn a_failed_directory_sync_fails_the_commit() {
        // A few files: each directory is fsynced on its own.
        let d = tempfile::tempdir().unwrap();
        let mut a = applier(d.path());
        a.sync = failing_sync;
        send_file(&mut a, "signed/a.pem", b"a");
        let err = a.commit().expect_err("a commit whose directory sync failed");
        let text = format!("{err}");
        assert!(text.contains("cannot make the batch durable"), "{text}");
        assert_eq!(err.0.raw_os_error(), Some(libc::EIO), "{err:?}");
        // Many directories: one syncfs per file system, which fails too.
        let mut a = applier(d.path());
        a.sync = failing_sync;
        for i in 0..(FSYNC_EACH_MAX + 2) {
            send_file(&mut a, &format!("d{i}/x.pem"), b"x");
        }
        assert!(a.commit().is_err(), "a failed syncfs must fail the commit");
        // The same batch with a working disk commits.
        let mut a = applier(d.path());
        send_file(&mut a, "signed/b.pem", b"b");
        assert!(a.commit().unwrap().failed.is_empty());
    }

    #[test]
    fn directories_made_on_the_way_put_their_parents_in_the_sync_set() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("old")).unwrap();
        let mut a = applier(d.path());
        send_file(&mut a, "old/new/deeper/f.pem", b"f");
        let set: Vec<&str> = a.dirs_to_sync.keys().map(|(_, rel)| rel.as_str()).collect();
        // Each new directory's entry lives in its parent: the root's and
        // old's entries for the new ones, and the file's own directory.
        for want in ["", "old", "old/new", "old/new/deeper"] {
            assert!(set.contains(&want), "{want:?} missing from {set:?}");
        }
        // A file in a directory that exists adds only that directory.
        a.commit().unwrap();
        send_file(&mut a, "old/g.pem", b"g");
        let set: Vec<&str> = a.dirs_to_sync.keys().map(|(_, rel)| rel.as_str()).collect();
        assert_eq!(set, vec!["old"]);
        a.commit().unwrap();
    }

    thread_local! {
        /// The devices the recording sync step was asked to `syncfs`.
        static SYNCED_FS: std::cell::RefCell<BTreeSet<u64>> = const { std::cell::RefCell::new(BTreeSet::new()) };
    }

    fn recording_sync(call: SyncCall, file: &File) -> io::Result<()> {
        if call == SyncCall::FileSystem {
            SYNCED_FS.with(|s| s.borrow_mut().insert(file.metadata().unwrap().dev()));
        }
        system_sync(call, file)
    }

    #[test]
    fn a_large_commit_syncs_every_file_system_it_touched() {
        // Two watches on two file systems (a temp dir and /dev/shm).
        let disk = tempfile::tempdir().unwrap();
        let shm = tempfile::tempdir_in("/dev/shm").expect("/dev/shm (tmpfs) for a second file system");
        let devs: BTreeSet<u64> = [disk.path(), shm.path()]
            .iter()
            .map(|p| fs::metadata(p).unwrap().dev())
            .collect();
        assert_eq!(devs.len(), 2, "the two roots must be on different file systems");
        let root = |name: &str, path: &Path| WatchRoot {
            name: name.into(),
            root: path.to_path_buf(),
            excludes: Excludes::default(),
            cache: HashCache::default(),
            cache_path: None,
        };
        // Named so that the files and the directories of the batch list the
        // disk first: a sync of the first file system alone misses /dev/shm.
        let mut a = Applier::new(vec![root("a", disk.path()), root("b", shm.path())], None).unwrap();
        a.sync = recording_sync;
        for watch in ["a", "b"] {
            for i in 0..(FSYNC_EACH_MAX + 2) {
                let data = format!("{watch}{i}").into_bytes();
                a.apply(Op::FileBegin {
                    watch: watch.into(),
                    path: format!("d{i}/f"),
                    meta: meta(),
                    size: data.len() as u64,
                    hash: ContentHash::of(&data),
                    delta_base: None,
                })
                .unwrap();
                a.apply(Op::FileData(ByteBuf::from(data))).unwrap();
                a.apply(Op::FileEnd).unwrap();
            }
        }
        SYNCED_FS.with(|s| s.borrow_mut().clear());
        let r = a.commit().unwrap();
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        assert_eq!(SYNCED_FS.with(|s| s.borrow().clone()), devs);
        assert_eq!(fs::read(shm.path().join("d0/f")).unwrap(), b"b0");
    }
}
