//! The operations that change the tree without file content: directories,
//! symbolic links, metadata, removals, and the settling of a watch.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use super::handles::Gone;
use super::temps::temp_name;
use super::{Applier, Refused};
use crate::beneath::{self, split};
use crate::local;
use crate::manifest::{self, ContentHash, Meta};
use crate::proto::UndoWhy;

impl Applier {
    pub(super) fn make_dir(&mut self, watch: &str, rel: &str, meta: Meta) -> io::Result<()> {
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
                self.forget(watch, rel, Gone::Leaf);
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
            h.insert(rel, dir);
        }
        Ok(())
    }

    pub(super) fn make_symlink(&mut self, watch: &str, rel: &str, link: &str, meta: Meta) -> io::Result<()> {
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
        self.forget(watch, rel, Gone::Tree);
        self.note_dir(watch, pdir, &parent);
        Ok(())
    }

    pub(super) fn set_meta(&mut self, watch: &str, rel: &str, meta: Meta) -> io::Result<()> {
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

    pub(super) fn remove(&mut self, watch: &str, rel: &str) -> io::Result<()> {
        let (pdir, name) = split(rel);
        let parent = match self.dir(watch, pdir, false) {
            Ok(p) => Some(p),
            // No directory there: nothing to remove.
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        // Nothing there (or no directory above): entries below it may still
        // be remembered, so the whole tree is forgotten.
        let mut gone = Gone::Tree;
        if let Some(parent) = parent {
            self.preserve(watch, rel, &parent, UndoWhy::Removed)?;
            match beneath::stat(&parent, name) {
                Ok(st) => {
                    if !beneath::is_dir(&st) {
                        gone = Gone::Leaf;
                    }
                    beneath::remove_tree(&parent, name)?
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.note_dir(watch, pdir, &parent);
        }
        if let Some(w) = self.watches.get_mut(watch) {
            match gone {
                Gone::Leaf => w.cache.forget_file(rel),
                Gone::Tree => w.cache.forget(rel),
            }
        }
        self.forget(watch, rel, gone);
        Ok(())
    }

    /// After a full comparison: everything under `watch` but `except` now
    /// holds the agreed content.
    pub(super) fn settled(&mut self, watch: &str, except: &[String]) -> Result<(), Refused> {
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
}
