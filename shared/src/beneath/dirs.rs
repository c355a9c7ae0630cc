//! A bounded cache of directory handles beneath one root, for one pass
//! (a batch of the shipper, a commit of the receiver, a look of the passive
//! watcher over its waiting paths): a pass that touches thousands of paths
//! in a few dozen directories opens each directory once instead of once
//! per path.
//!
//! Every directory is opened beneath the root by its whole relative path,
//! with no symbolic link followed anywhere on the way ([`open_dir`]), and
//! kept by that path; never through another cached handle, so a directory
//! swapped for a link is refused whenever a path below it is looked up for
//! the first time in the pass. Only the last component of a path is then
//! looked at in its directory's handle, never followed when it is a link.
//!
//! A handle stays on the directory it was opened on: when that directory
//! is renamed (or removed) during the pass, later lookups in the pass see
//! it where it went (or find nothing there). That is what the pass would
//! have seen had it come a moment earlier, nothing outside what the root
//! held when the handle was opened (anything put into the moved directory
//! could have been put into the root as well), and never a link followed;
//! the rename itself is an event, and the next pass over those paths looks
//! again from the root.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{self as rfs, Mode, OFlags};

use super::{check_component, open_dir, split, NotRegular};

/// How many directories a cache keeps open unless told otherwise; more,
/// and it starts over (a pass goes directory by directory).
pub const DIRS_MAX: usize = 256;

/// The directory handles of one pass beneath a root (see the module).
pub struct Dirs {
    /// The root's path, for messages and for opening it.
    path: PathBuf,
    /// The root, once opened.
    root: Option<Arc<File>>,
    /// Directories below the root opened in this pass, by relative path.
    open: HashMap<String, Arc<File>>,
    /// At most this many are kept.
    max: usize,
}

impl Dirs {
    /// A cache beneath the directory `path`, opened at the first lookup
    /// (following a link there: the active's watch root, which its caller
    /// verifies; an error is reported at each lookup until it opens).
    pub fn at(path: &Path) -> Dirs {
        Dirs {
            path: path.to_path_buf(),
            root: None,
            open: HashMap::new(),
            max: DIRS_MAX,
        }
    }

    /// A cache beneath `root`, already open (the receiver opens its roots
    /// without following a link), whose path is `path`.
    pub fn with_root(path: &Path, root: File) -> Dirs {
        Dirs {
            root: Some(Arc::new(root)),
            ..Dirs::at(path)
        }
    }

    /// The same cache keeping at most `max` directories open (at least one).
    pub fn bounded(mut self, max: usize) -> Dirs {
        self.max = max.max(1);
        self
    }

    /// The root's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The root, opened now if it was not yet.
    pub fn root(&mut self) -> io::Result<Arc<File>> {
        if let Some(r) = &self.root {
            return Ok(r.clone());
        }
        let fd = rfs::open(
            &self.path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let root = Arc::new(File::from(fd));
        self.root = Some(root.clone());
        Ok(root)
    }

    /// The directory `rel` (`""` for the root) when this pass has it open.
    pub fn get(&self, rel: &str) -> Option<&Arc<File>> {
        if rel.is_empty() {
            self.root.as_ref()
        } else {
            self.open.get(rel)
        }
    }

    /// The directory `rel` (relative, `/`-separated; `""` for the root),
    /// from the cache or opened beneath the root with no symbolic link
    /// followed on the way (and kept).
    pub fn dir(&mut self, rel: &str) -> io::Result<Arc<File>> {
        if rel.is_empty() {
            return self.root();
        }
        if let Some(d) = self.open.get(rel) {
            return Ok(d.clone());
        }
        let root = self.root()?;
        let d = Arc::new(open_dir(&root, rel)?);
        self.insert(rel, d.clone());
        Ok(d)
    }

    /// Keeps `dir`, open as the directory `rel` beneath the root by the
    /// caller (with no link followed), for the rest of the pass; when the
    /// cache is full it starts over.
    pub fn insert(&mut self, rel: &str, dir: Arc<File>) {
        if rel.is_empty() {
            self.root = Some(dir);
            return;
        }
        if self.open.len() >= self.max && !self.open.contains_key(rel) {
            self.open.clear();
        }
        self.open.insert(rel.to_string(), dir);
    }

    /// Forgets every directory below the root (the root stays open).
    pub fn clear(&mut self) {
        self.open.clear();
    }

    /// How many directories below the root are open.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Whether no directory below the root is open.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// The directory holding `rel` (not empty) and the last component of
    /// `rel`, checked.
    pub fn parent<'r>(&mut self, rel: &'r str) -> io::Result<(Arc<File>, &'r str)> {
        let (dir, name) = split(rel);
        check_component(name.as_bytes())?;
        Ok((self.dir(dir)?, name))
    }

    /// The status of `rel` (not empty), of the link itself when it is one.
    pub fn stat(&mut self, rel: &str) -> io::Result<rfs::Stat> {
        let (dir, name) = self.parent(rel)?;
        Ok(rfs::statat(&*dir, name, rfs::AtFlags::SYMLINK_NOFOLLOW)?)
    }

    /// Opens the regular file `rel` for reading, as
    /// [`super::open_file_beneath`] does, in its directory's handle.
    pub fn open_file(&mut self, rel: &str) -> io::Result<(File, std::fs::Metadata)> {
        let (dir, name) = self.parent(rel)?;
        open_file_in(&dir, name)
    }
}

/// Opens the regular file `name` of the directory `dir` for reading (the
/// sender's side), never following it when it is a link: with `O_NONBLOCK`
/// (opening a fifo swapped in must not block) and `O_NOATIME` where
/// allowed, then `fstat` of that descriptor, which must be a regular file
/// ([`NotRegular`] otherwise). The metadata returned is that of the file
/// the descriptor reads, whatever the name names by now.
pub fn open_file_in(dir: &File, name: &str) -> io::Result<(File, std::fs::Metadata)> {
    check_component(name.as_bytes())?;
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY;
    let fd = match rfs::openat(dir, name, flags | OFlags::NOATIME, Mode::empty()) {
        Err(rustix::io::Errno::PERM) => rfs::openat(dir, name, flags, Mode::empty())?,
        done => done?,
    };
    let file = File::from(fd);
    let md = file.metadata()?;
    if !md.is_file() {
        return Err(io::Error::other(NotRegular));
    }
    // O_NONBLOCK means nothing to a regular file's reads; it is cleared all
    // the same, so that nothing later relies on it.
    rfs::fcntl_setfl(&file, rfs::fcntl_getfl(&file)? - OFlags::NONBLOCK)?;
    Ok((file, md))
}

#[cfg(test)]
mod tests;
