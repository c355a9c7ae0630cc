//! The agent's side of the undo store (`warmspare_shared::undo`): its
//! bounds (`undo_max_size`, `undo_max_age`) applied at start and after each
//! commit that kept files, its status, and putting a kept file back on the
//! active (`warmsparectl undo restore`).
//!
//! A restore writes beneath the watch root through directory handles, as the
//! receiver does: the root opened without following a link, its directories
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, the content into a
//! private temporary file in the target's directory, checked (size, hash)
//! and given its mode, owner and times before it is renamed into place. A
//! file already there is never replaced unless the operator says `--force`,
//! and then it is kept in this node's own undo store first. The restored
//! file then replicates to the passives as any change does.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::time::SystemTime;

use warmspare_shared::beneath;
use warmspare_shared::config::UndoWhenFull;
use warmspare_shared::manifest::ContentHash;
use warmspare_shared::proto::{UndoEntry, UndoKind, UndoStatus, UndoWhy};
use warmspare_shared::relpath::check_rel_path;
use warmspare_shared::undo::{self, Kept, Limits, Recorder, Store};

use crate::live::Live;
use crate::role::Role;
use crate::roots::Roots;

/// What the agent's side of the undo store uses of the node: the bounds
/// come from the cluster file in force, the files from the store.
#[derive(Clone)]
pub struct Handles {
    /// The configuration in force (the bounds, the watches).
    pub live: Arc<Live>,
    /// The undo store (`state_dir/undo`).
    pub store: Arc<Store>,
}

impl Handles {
    /// The bounds in force.
    pub fn limits(&self) -> Limits {
        let c = self.live.cluster();
        Limits {
            max_size: c.cluster.undo_max_size,
            max_age: c.cluster.undo_max_age,
        }
    }

    /// A recorder for a session at `epoch` (nothing of the internal job
    /// spool is kept: its dumps keep their own generations), refusing or
    /// letting go a file it cannot keep as `undo_when_full` says.
    pub fn recorder(&self, epoch: u64) -> Recorder {
        let when_full = self.live.cluster().cluster.undo_when_full;
        Recorder::new(self.store.clone(), epoch, self.limits().max_size)
            .when_full(when_full)
            .skip_watch(crate::live::SPOOL_WATCH)
    }

    /// Prunes the store to its bounds, with a log line for what went.
    pub fn prune(&self) {
        prune(&self.store, &self.limits());
    }

    /// The store's status.
    pub fn status(&self) -> UndoStatus {
        let limits = self.limits();
        let (files, bytes) = self.store.totals().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the undo store");
            (0, 0)
        });
        UndoStatus {
            files,
            bytes,
            max_size: limits.max_size,
            max_age_s: limits.max_age.as_secs(),
            pruned: undo::pruned_total(),
            skipped: undo::skipped_total(),
        }
    }
}

/// Prunes `store` to `limits`, with a log line for what went.
fn prune(store: &Store, limits: &Limits) {
    match store.prune(limits, SystemTime::now()) {
        Ok(report) => {
            if !report.pruned.is_empty() {
                let bytes: u64 = report.pruned.iter().map(|p| p.1).sum();
                let by_age = report
                    .pruned
                    .iter()
                    .filter(|p| p.2 == warmspare_shared::diverged::Reason::Age)
                    .count();
                tracing::info!(
                    files = report.pruned.len(),
                    bytes,
                    by_age,
                    by_size = report.pruned.len() - by_age,
                    files_left = report.files_left,
                    bytes_left = report.bytes_left,
                    max_size = limits.max_size,
                    max_age_s = limits.max_age.as_secs(),
                    "pruned the oldest files of the undo store"
                );
            }
            for (id, e) in &report.failed {
                tracing::error!(id, error = %e, "cannot prune an entry of the undo store");
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot prune the undo store"),
    }
}

/// A file being put back on the active, between `UndoPutBegin` and `UndoPutEnd`.
pub struct Restore {
    entry: UndoEntry,
    force: bool,
    /// The target's directory, open beneath the root.
    dir: File,
    /// The target's name in it.
    name: String,
    /// The temporary file (its name in `dir`) and the file, for a file.
    tmp: String,
    file: Option<File>,
    /// A link's target, as it arrives.
    target: Vec<u8>,
    written: u64,
}

impl Restore {
    /// Checks that this node may take `entry` back (it is the active one,
    /// the watch is one of its own, the path stays beneath the root) and
    /// opens its directory beneath the root, making missing ones.
    /// `role` and `roots` are read only.
    pub fn begin(undo: &Handles, role: &Role, roots: &Roots, entry: UndoEntry, force: bool) -> Result<Restore, String> {
        if !role.is_active() {
            return Err(format!(
                "{} is not the active node: restore onto the active one, from which the file replicates",
                undo.live.me.name
            ));
        }
        if entry.watch == crate::live::SPOOL_WATCH {
            return Err("the job spool is not restored by hand".into());
        }
        let Some(w) = undo.live.local_watches().into_iter().find(|w| w.name == entry.watch) else {
            return Err(format!("there is no watch {:?} here", entry.watch));
        };
        check_rel_path(&entry.path).map_err(|e| format!("{e}"))?;
        if w.excludes.is_excluded(&entry.path, false) {
            return Err(format!("{:?} is excluded from the watch", entry.path));
        }
        if let Some(p) = roots.problems().get(&w.name) {
            return Err(format!("the root of watch {} cannot be used: {p}", w.name));
        }
        let root = beneath::open_root(&w.root).map_err(|e| format!("watch root: {e}"))?;
        let (reldir, name) = beneath::split(&entry.path);
        let dir = if reldir.is_empty() {
            root
        } else {
            beneath::make_dirs(&root, reldir, 0o755)
                .map_err(|e| format!("cannot open {reldir:?} beneath the root: {e}"))?
        };
        let tmp = format!(
            "{}{}.restore.{:x}",
            warmspare_shared::relpath::TEMP_PREFIX,
            name.chars().take(100).collect::<String>(),
            unique()
        );
        let file = match entry.kind {
            UndoKind::File => {
                Some(beneath::create_private(&dir, &tmp).map_err(|e| format!("cannot write beside the target: {e}"))?)
            }
            UndoKind::Symlink => None,
        };
        Ok(Restore {
            force,
            name: name.to_string(),
            dir,
            tmp,
            file,
            target: Vec::new(),
            written: 0,
            entry,
        })
    }

    /// Takes a chunk of the content.
    pub fn data(&mut self, chunk: &[u8]) -> Result<(), String> {
        self.written += chunk.len() as u64;
        if self.written > self.entry.size {
            return Err(format!("more data than the entry's {} bytes", self.entry.size));
        }
        match &mut self.file {
            Some(f) => f.write_all(chunk).map_err(|e| format!("cannot write: {e}")),
            None => {
                self.target.extend_from_slice(chunk);
                Ok(())
            }
        }
    }

    /// Checks the content, gives it its metadata and puts it in place;
    /// returns the undo entry that holds what it replaced (with `force`),
    /// kept under the epoch `role` is at then (read only).
    pub fn end(mut self, undo: &Handles, role: &Role) -> Result<Option<u64>, String> {
        if self.written != self.entry.size {
            return Err(format!("got {} bytes of {}", self.written, self.entry.size));
        }
        if let (Some(f), Some(want)) = (&self.file, self.entry.hash) {
            // Read back through the descriptor written: what is checked is
            // what is placed.
            let mut r = f;
            let got = std::io::Seek::rewind(&mut r)
                .and_then(|()| ContentHash::of_reader(r))
                .map_err(|e| format!("cannot read the file back: {e}"))?;
            if got != want {
                return Err("the content does not match the entry's hash".into());
            }
        }
        let meta = self.entry.meta;
        let chown = warmspare_shared::apply::can_chown();
        match self.file.take() {
            Some(f) => {
                (|| {
                    beneath::fchmod(&f, meta.mode)?;
                    if chown {
                        beneath::fchown(&f, meta.uid, meta.gid)?;
                        // Giving a file away clears set-user-ID and set-group-ID.
                        beneath::fchmod(&f, meta.mode)?;
                    }
                    beneath::set_times(&f, meta.mtime, meta.mtime_nsec)?;
                    f.sync_all()
                })()
                .map_err(|e| format!("cannot give the file its metadata: {e}"))?;
            }
            None => {
                let target = String::from_utf8(std::mem::take(&mut self.target))
                    .map_err(|_| "a link target that is not UTF-8".to_string())?;
                beneath::symlink(&target, &self.dir, &self.tmp).map_err(|e| format!("cannot make the link: {e}"))?;
                if chown {
                    let _ = beneath::lchown(&self.dir, &self.tmp, meta.uid, meta.gid);
                }
            }
        }
        // Not there: put in place without replacing anything (a file that
        // appears meanwhile is refused like one that was there).
        match beneath::rename_noreplace(&self.dir, &self.tmp, &self.name) {
            Ok(()) => {
                let _ = self.dir.sync_all();
                self.tmp.clear();
                return Ok(None);
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(format!("cannot put the file in place: {e}")),
        }
        let st = match beneath::stat(&self.dir, &self.name) {
            Ok(st) => st,
            Err(e) => return Err(format!("cannot look at the target: {e}")),
        };
        if beneath::is_dir(&st) {
            return Err(format!("{:?} is a directory here; it is not replaced", self.entry.path));
        }
        if !self.force {
            return Err(format!(
                "{:?} exists in watch {}; pass --force to replace it (the file there is kept in this node's undo store)",
                self.entry.path, self.entry.watch
            ));
        }
        // A forced restore never replaces a file without a copy, whatever
        // `undo_when_full` says.
        let mut rec = undo.recorder(role.current().epoch).when_full(UndoWhenFull::Refuse);
        let kept = rec.keep(
            &self.dir,
            &self.name,
            &self.entry.watch,
            &self.entry.path,
            UndoWhy::Replaced,
            |_| None,
        );
        let replaced = match kept {
            Ok(Kept::Kept(id)) => Some(id),
            Ok(Kept::Nothing) => None,
            Ok(Kept::Skipped) => {
                return Err("the file there cannot be kept in the undo store; it is not replaced".into());
            }
            Err(e) => return Err(format!("the file there is not replaced: {e}")),
        };
        rec.commit();
        beneath::rename(&self.dir, &self.tmp, &self.dir, &self.name)
            .map_err(|e| format!("cannot put the file in place: {e}"))?;
        let _ = self.dir.sync_all();
        self.tmp.clear();
        Ok(replaced)
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        if !self.tmp.is_empty() {
            let _ = beneath::unlink(&self.dir, &self.tmp);
        }
    }
}

/// A number for a temporary name, not the same twice in this process.
fn unique() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    (nanos << 16) ^ N.fetch_add(1, std::sync::atomic::Ordering::Relaxed) ^ u64::from(std::process::id())
}
