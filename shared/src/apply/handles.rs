//! Directory handles of one batch beneath a watch root (at most
//! `beneath::DIRS_MAX` per watch, kept in a `beneath::Dirs`), opened or
//! made without following a link, and forgotten when the batch removes or
//! replaces a path and at each commit.

use std::fs::File;
use std::io;
use std::sync::Arc;

use super::{local_ancestors, Applier};
use crate::beneath::{self, Dirs};
use crate::local;

/// A watch's root, opened without following a link, and the directories
/// below it opened in this batch (at most [`beneath::DIRS_MAX`]).
pub(super) type Handles = Dirs;

impl Applier {
    /// The directory `reldir` of `watch` (`""` for the root), open beneath
    /// the watch's root with no symbolic link followed; with `make`, missing
    /// directories are created on the way. Handles are kept for the batch.
    pub(super) fn dir(&mut self, watch: &str, reldir: &str, make: bool) -> io::Result<Arc<File>> {
        if let Some(d) = self.handles.get(watch).and_then(|h| h.get(reldir)) {
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
                v.insert(Dirs::with_root(&w.root, root))
            }
        };
        let mut created = false;
        let root = h.root()?;
        let d = if reldir.is_empty() {
            root
        } else if let (true, Some(t)) = (make, &self.tracker) {
            // Directories made on the way are the receiver's own: recorded
            // for the passive watcher, each as it is once made.
            match beneath::open_dir(&root, reldir) {
                Ok(d) => Arc::new(d),
                Err(_) => {
                    t.begin(watch, reldir);
                    let made = beneath::make_dirs(&root, reldir, 0o755);
                    let mut up: Vec<&str> = local_ancestors(reldir).collect();
                    up.reverse();
                    for a in up {
                        let st = local::stamp_at(&root, a).ok().flatten();
                        t.end(watch, a, st, false);
                    }
                    Arc::new(made?)
                }
            }
        } else if make {
            match beneath::open_dir(&root, reldir) {
                Ok(d) => Arc::new(d),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENAMETOOLONG)) => {
                    created = true;
                    Arc::new(beneath::make_dirs(&root, reldir, 0o755)?)
                }
                Err(e) => return Err(e),
            }
        } else {
            Arc::new(beneath::open_dir(&root, reldir)?)
        };
        h.insert(reldir, d.clone());
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

    /// Remembers that the directory `reldir` of `watch`, open as `dir`, is
    /// to be made durable at the commit.
    pub(super) fn note_dir(&mut self, watch: &str, reldir: &str, dir: &Arc<File>) {
        let key = (watch.to_string(), reldir.to_string());
        self.dirs_to_sync.entry(key).or_insert_with(|| dir.clone());
    }

    /// Forgets what the ledger of `watch` holds at `rel`: only its own
    /// entry when `gone` says nothing was below it, else the whole tree (a
    /// pass over the ledger, which a batch removing thousands of files
    /// must not pay for each).
    pub(super) fn forget(&mut self, watch: &str, rel: &str, gone: Gone) {
        if let Some(div) = &self.divergence {
            let mut ledgers = div.ledgers.lock().unwrap_or_else(|p| p.into_inner());
            let ledger = ledgers.watch(watch);
            match gone {
                Gone::Leaf => ledger.forget_path(rel),
                Gone::Tree => ledger.forget_tree(rel),
            }
        }
    }
}

/// What left a path, for what the ledger and the hash cache forget there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gone {
    /// A file or a link: nothing was below it.
    Leaf,
    /// A directory, or what was there is not known: everything at and below
    /// the path goes.
    Tree,
}
