//! Directory handles of one batch beneath a watch root (at most
//! `DIR_CACHE_MAX` per watch), opened or made without following a link,
//! and forgotten when the batch removes or replaces a path and at each
//! commit.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::Arc;

use super::{local_ancestors, Applier};
use crate::beneath;
use crate::local;

/// A watch's root and the directories below it, open for one batch.
pub(super) struct Handles {
    /// The root, opened without following a link.
    pub(super) root: Arc<File>,
    /// Directories opened beneath it in this batch, by relative path.
    pub(super) dirs: HashMap<String, Arc<File>>,
}

/// At most this many directories are kept open per watch and batch; more,
/// and the cache starts over (files arrive directory by directory).
pub(super) const DIR_CACHE_MAX: usize = 256;

impl Applier {
    /// The directory `reldir` of `watch` (`""` for the root), open beneath
    /// the watch's root with no symbolic link followed; with `make`, missing
    /// directories are created on the way. Handles are kept for the batch.
    pub(super) fn dir(&mut self, watch: &str, reldir: &str, make: bool) -> io::Result<Arc<File>> {
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

    /// Remembers that the directory `reldir` of `watch`, open as `dir`, is
    /// to be made durable at the commit.
    pub(super) fn note_dir(&mut self, watch: &str, reldir: &str, dir: &Arc<File>) {
        let key = (watch.to_string(), reldir.to_string());
        self.dirs_to_sync.entry(key).or_insert_with(|| dir.clone());
    }

    pub(super) fn forget(&mut self, watch: &str, rel: &str) {
        if let Some(div) = &self.divergence {
            div.ledgers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .watch(watch)
                .forget_tree(rel);
        }
    }
}
