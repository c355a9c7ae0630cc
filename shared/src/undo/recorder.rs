//! Keeping files for one receiving session: linked into the store, or
//! copied within bounds across file systems, and recorded at each commit.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use rustix::fs::{self as rfs, Mode, OFlags};
use rustix::io::Errno;

use super::{now_secs, Store, REFUSED, SKIPPED};
use crate::beneath;
use crate::config::UndoWhenFull;
use crate::manifest::{ContentHash, Meta};
use crate::proto::{UndoEntry, UndoKind, UndoWhy};

/// What [`Recorder::keep`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// Kept as this entry.
    Kept(u64),
    /// Nothing to keep there (gone, a directory, a special file).
    Nothing,
    /// Not kept (too large, or an error), logged and counted; the change
    /// goes ahead without a copy (`undo_when_full = "replace"`).
    Skipped,
}

/// Why a file cannot be kept in the undo store. Under the default
/// `undo_when_full = "refuse"` the change that would remove or replace it
/// is not made.
#[derive(Debug, thiserror::Error)]
pub enum NotKept {
    /// The file is larger than the whole store may hold.
    #[error("no copy can be kept in the undo store: the file has {size} bytes, undo_max_size is {max}; it is left as it is (undo_when_full = \"refuse\")")]
    TooLarge {
        /// The file's size.
        size: u64,
        /// `undo_max_size`.
        max: u64,
    },
    /// Keeping it failed.
    #[error("no copy can be kept in the undo store: {0}; it is left as it is (undo_when_full = \"refuse\")")]
    Failed(#[source] io::Error),
}

impl NotKept {
    /// The refusal as an I/O error, for the applier's error paths (see
    /// [`NotKept::of_io`]).
    pub fn into_io(self) -> io::Error {
        io::Error::other(self)
    }

    /// The refusal `e` carries, when it is one.
    pub fn of_io(e: &io::Error) -> Option<&NotKept> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<NotKept>())
    }
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
    when_full: UndoWhenFull,
}

impl Recorder {
    /// A recorder for a session at `epoch`, keeping files up to `max_size`
    /// bytes each, and refusing to let go of a file it cannot keep (see
    /// [`Recorder::when_full`]).
    pub fn new(store: Arc<Store>, epoch: u64, max_size: u64) -> Recorder {
        Recorder {
            store,
            epoch,
            max_size,
            skip: Vec::new(),
            pending: Vec::new(),
            chown: crate::sys::geteuid() == 0,
            when_full: UndoWhenFull::Refuse,
        }
    }

    /// What [`Recorder::keep`] does with a file it cannot keep: refuse (an
    /// error, the default), or let the change go ahead without a copy.
    pub fn when_full(mut self, when_full: UndoWhenFull) -> Recorder {
        self.when_full = when_full;
        self
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
    /// the descriptor's metadata before anything changes it). What cannot
    /// be kept (larger than `max_size`, an error) is logged and counted,
    /// and is an error unless the recorder lets such changes go ahead
    /// ([`UndoWhenFull::Replace`]): then it is [`Kept::Skipped`].
    pub fn keep(
        &mut self,
        dir: &File,
        name: &str,
        watch: &str,
        rel: &str,
        why: UndoWhy,
        hash_of: impl FnOnce(&std::fs::Metadata) -> Option<ContentHash>,
    ) -> Result<Kept, NotKept> {
        let not_kept = match self.try_keep(dir, name, watch, rel, why, hash_of) {
            Ok(k) => return Ok(k),
            Err(e) => e,
        };
        let path = crate::text::escape_controls(rel);
        match self.when_full {
            UndoWhenFull::Refuse => {
                REFUSED.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(watch, path = %path, error = %not_kept, "a file the undo store cannot keep is not removed or replaced");
                Err(not_kept)
            }
            UndoWhenFull::Replace => {
                SKIPPED.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(watch, path = %path, error = %not_kept, "a file the undo store cannot keep is removed or replaced without a copy (undo_when_full = \"replace\")");
                Ok(Kept::Skipped)
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
    ) -> Result<Kept, NotKept> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(NotKept::Failed(io::Error::other("bad name")));
        }
        let fd = match rfs::openat(
            dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => File::from(fd),
            Err(Errno::NOENT) => return Ok(Kept::Nothing),
            Err(e) => return Err(NotKept::Failed(e.into())),
        };
        let md = fd.metadata().map_err(NotKept::Failed)?;
        let kind = if md.file_type().is_file() {
            UndoKind::File
        } else if md.file_type().is_symlink() {
            UndoKind::Symlink
        } else {
            return Ok(Kept::Nothing);
        };
        if md.len() > self.max_size {
            return Err(NotKept::TooLarge {
                size: md.len(),
                max: self.max_size,
            });
        }
        let hash = match kind {
            UndoKind::File => hash_of(&md),
            UndoKind::Symlink => None,
        };
        let (id, files) = self.store.alloc().map_err(NotKept::Failed)?;
        let id_name = id.to_string();
        let mut size = md.len();
        match crate::sys::link_unnamed(&fd, &files, std::ffi::OsStr::new(&id_name)) {
            Ok(()) => {}
            // Another file system, or a kernel that will not link this
            // file for this process: a copy, within the same bound.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EXDEV | libc::EPERM | libc::EACCES)) => {
                size = copy_into(dir, name, &md, kind, &files, &id_name, self.max_size, self.chown)
                    .map_err(NotKept::Failed)?;
            }
            Err(e) => return Err(NotKept::Failed(e)),
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
