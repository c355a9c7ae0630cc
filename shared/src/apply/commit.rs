//! The commit: in-memory files made, data made durable (per file, or one
//! `syncfs` per file system), files linked or renamed into place,
//! directories restored and made durable, the ledger and trackers updated.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Arc;

use rustix::fs::OFlags;

use super::handles::Gone;
use super::temps::temp_name;
use super::{Applier, CommitReport, FailReason, Failure, NotDurable, Pending, Staged};
use crate::beneath;
use crate::local::Stamp;
use crate::manifest::{ContentHash, Meta};
use crate::proto::UndoWhy;

/// One durability call of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SyncCall {
    /// `fdatasync` of a staged file.
    FileData,
    /// `fsync` of a directory.
    Dir,
    /// `syncfs` of the file system holding the handle.
    FileSystem,
}

/// The sync step of a commit: makes `file` durable as `call` says.
pub(super) type SyncFn = fn(SyncCall, &File) -> io::Result<()>;

/// The real sync step.
pub(super) fn system_sync(call: SyncCall, file: &File) -> io::Result<()> {
    match call {
        SyncCall::FileData => file.sync_data(),
        SyncCall::Dir => file.sync_all(),
        SyncCall::FileSystem => crate::sys::syncfs(file),
    }
}

/// How many files a commit may fsync one by one before it syncs the
/// filesystem instead.
pub(super) const FSYNC_EACH_MAX: usize = 8;

/// How many files a batch writes before the [`Flusher`] is asked to start
/// writing them back.
pub(super) const FLUSH_EVERY_FILES: usize = 1000;

/// A thread that syncs a filesystem when asked, so that the files of a large
/// batch go to the disk while the rest of the batch still arrives; the
/// commit's own sync then finds little left to write. It only ever starts
/// work early: durability comes from the commit's sync. A request made
/// while a sync runs is dropped. The thread starts with the first request.
#[derive(Default)]
pub(super) struct Flusher {
    pub(super) requests: Option<std::sync::mpsc::SyncSender<Arc<File>>>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    /// Asks for the filesystem holding the directory open as `dir` to be synced.
    pub(super) fn start(&mut self, dir: Arc<File>) {
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
pub(super) fn link_one(file: &File, dir: &File, name: &str) -> io::Result<fs::Metadata> {
    crate::sys::link_unnamed(file, dir, std::ffi::OsStr::new(name)).and_then(|()| file.metadata())
}

/// Below this many files a commit links them on its own thread.
pub(super) const LINK_AHEAD_MIN: usize = 256;

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
pub(super) fn link_ahead(pending: &[Pending]) -> Vec<Option<io::Result<fs::Metadata>>> {
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
pub(super) fn on_two_threads<T: Send, R: Send>(items: &mut [T], work: impl Fn(&mut [T]) -> Vec<R> + Sync) -> Vec<R> {
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

/// Gives a received file, written whole, its mode, owner (with `chown`)
/// and modification time.
pub(super) fn give_meta(file: &File, meta: Meta, chown: bool) -> io::Result<()> {
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
pub(super) fn make_in_memory(data: &[u8], dir: Arc<File>, meta: Meta, name: &str, chown: bool) -> io::Result<Staged> {
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
pub(super) const IN_MEMORY_AHEAD_MIN: usize = 64;

/// Makes the in-memory files of `pending` (see [`make_in_memory`]), the two halves of
/// the list on two threads when there are many; a file that cannot be made
/// is taken out of the list and returned with why.
pub(super) fn make_all_in_memory(mut pending: Vec<Pending>, chown: bool) -> (Vec<Pending>, Vec<Failure>) {
    // For each file, why it could not be made.
    let make = |part: &mut [Pending]| -> Vec<Option<io::Error>> {
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
                    Err(e) => Some(e),
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
                failed.push(Failure::new(p.rel, why));
                None
            }
        })
        .collect();
    (made, failed)
}

/// Makes the content of `pending` durable: each file on its own when there
/// are few, else every file system they are on at once.
pub(super) fn sync_files(sync: SyncFn, pending: &[Pending]) -> io::Result<()> {
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
pub(super) fn one_per_file_system<'a>(dirs: impl Iterator<Item = &'a File>) -> io::Result<Vec<&'a File>> {
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
pub(super) fn sync_file_systems<'a>(sync: SyncFn, dirs: impl Iterator<Item = &'a File>) -> io::Result<()> {
    for d in one_per_file_system(dirs)? {
        sync(SyncCall::FileSystem, d)?;
    }
    Ok(())
}

/// Gives the unnamed file `file`, made in `dir`, a temporary name beside
/// its target `name`; returns that name.
pub(super) fn name_beside(file: &File, dir: &File, name: &str) -> io::Result<String> {
    let tmp = temp_name(name, "new");
    crate::sys::link_unnamed(file, dir, std::ffi::OsStr::new(&tmp))?;
    Ok(tmp)
}

/// Makes the directories open in `dirs` durable: each on its own when there
/// are few, else every file system they are on at once.
pub(super) fn sync_dirs(sync: SyncFn, dirs: &BTreeMap<(String, String), Arc<File>>) -> io::Result<()> {
    if dirs.len() <= FSYNC_EACH_MAX {
        for d in dirs.values() {
            sync(SyncCall::Dir, d)?;
        }
        Ok(())
    } else {
        sync_file_systems(sync, dirs.values().map(|d| &**d))
    }
}

impl Applier {
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
        for f in failed {
            tracing::warn!(path = f.path, error = %f.why, "cannot write a received file");
            self.report.applied = self.report.applied.saturating_sub(1);
            self.report.failed.push(f);
        }
        // 1. The new contents are durable before any of them is placed.
        if let Err(e) = sync_files(self.sync, &pending) {
            let e = Arc::new(e);
            for p in pending {
                self.report
                    .failed
                    .push(Failure::new(p.rel.clone(), FailReason::NotDurable(e.clone())));
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
                        self.report.failed.push(Failure::new(rel, e));
                        continue;
                    }
                }
                // Something is in the way. An unnamed file gets a temporary
                // name first, to be renamed over it. All of it happens in
                // the directory the file was staged in, through its handle.
                let (tmp, dir) = match staged {
                    Staged::InMemory { .. } => {
                        self.report.failed.push(Failure::new(rel, FailReason::NotWritten));
                        continue;
                    }
                    Staged::Named { tmp, dir } => (tmp, dir),
                    Staged::Unnamed { file, dir } => match name_beside(&file, &dir, &name) {
                        Ok(tmp) => (tmp, dir),
                        Err(e) => {
                            self.report.failed.push(Failure::new(rel, e));
                            continue;
                        }
                    },
                };
                let existing = beneath::stat(&dir, &name).ok();
                if existing.is_some() {
                    if let Err(e) = self.preserve(&watch, &rel, &dir, UndoWhy::Replaced) {
                        let _ = beneath::unlink(&dir, &tmp);
                        self.report.failed.push(Failure::new(rel, FailReason::not_preserved(e)));
                        continue;
                    }
                }
                if existing.is_some_and(|st| beneath::is_dir(&st)) {
                    trees.insert((watch.clone(), rel.clone()));
                    // What the ledger held below the directory goes with it
                    // (the file's own entry is set once it is placed).
                    self.forget(&watch, &rel, Gone::Tree);
                    if let Err(e) = beneath::remove_tree(&dir, &name) {
                        let _ = beneath::unlink(&dir, &tmp);
                        self.report.failed.push(Failure::new(rel, e));
                        continue;
                    }
                }
                match beneath::rename(&dir, &tmp, &dir, &name).and_then(|()| beneath::metadata(&dir, &name)) {
                    Ok(md) => self.placed(&watch, &rel, &md, hash),
                    Err(e) => {
                        let _ = beneath::unlink(&dir, &tmp);
                        self.report.failed.push(Failure::new(rel, e));
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
        // long burst: at most every few seconds (longer on a large tree, see
        // `save_wait`), and when the session ends.
        // Losing the last seconds of them to a crash is safe: hashes are
        // recomputed, and files are preserved rather than lost.
        if self.saved_at.elapsed() >= self.save_wait {
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
    pub(super) fn placed(&mut self, watch: &str, rel: &str, md: &fs::Metadata, hash: ContentHash) {
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
}
