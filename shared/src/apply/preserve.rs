//! Divergence preservation: a file the receiver is about to remove or
//! replace that differs from what the peers last agreed on is moved aside
//! into `diverged/` (by `renameat` between handles), and agreed ones are
//! kept in the undo store.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::sync::Arc;

use rustix::fs::OFlags;

use super::stage::hash_open;
use super::{Applier, Divergence};
use crate::beneath::{self, split};
use crate::manifest::{self, ContentHash};
use crate::proto::UndoWhy;
use crate::undo::NotKept;

/// Moves `name` from the directory open as `from` to the same name in the
/// directory open as `to` (a diverged folder), replacing what is there.
/// Across file systems, a regular file is copied from its open descriptor
/// (and made durable) and a link made again, before the original is removed.
pub(super) fn move_aside(from: &File, name: &str, to: &File) -> io::Result<()> {
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

impl Applier {
    /// Moves every local file at or under `rel` (whose directory is open as
    /// `parent`) whose content is not the one last agreed to the diverged
    /// folder, through handles: from below `parent` to below the diverged
    /// folder. A file that cannot be read is an error (it is not replaced).
    /// Every other file and link there is kept in the undo store (see
    /// [`Applier::keep_undo`]); one it cannot keep fails the change (unless
    /// `undo_when_full = "replace"`).
    pub(super) fn preserve(&mut self, watch: &str, rel: &str, parent: &Arc<File>, why: UndoWhy) -> io::Result<()> {
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
            let below = path_below(&path, pdir);
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
    /// hash recorded is the cached one of that very inode, when known. A
    /// file the store refuses to let go without a copy is an error (a
    /// [`NotKept`]): the change is not made. Files of a tree kept before it
    /// stay in the store, their originals untouched.
    pub(super) fn keep_undo(
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
            let below = path_below(&path, pdir);
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
            undo.keep(&from, file_name, watch, &path, why, |md| cache.cached(&path, md))
                .map_err(NotKept::into_io)?;
        }
        Ok(())
    }

    /// The directory of the diverged folder for `reldir` of `watch`, made
    /// and opened through handles below the state dir's `diverged/` (the
    /// state dir itself is configuration, and trusted).
    pub(super) fn diverged_dir(&mut self, div: &Divergence, watch: &str, reldir: &str) -> io::Result<File> {
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
}

/// `path` relative to its parent directory `pdir` (both relative to the
/// watch root; `pdir` empty for the root itself), or empty when `path` is
/// not below `pdir`.
fn path_below<'a>(path: &'a str, pdir: &str) -> &'a str {
    if pdir.is_empty() {
        path
    } else {
        path.get(pdir.len() + 1..).unwrap_or_default()
    }
}
