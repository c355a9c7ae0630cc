//! Directory handles beneath a watch root.
//!
//! The receiver runs as root in directories a local user may write to (the
//! `puppet` user owns a CA directory). A path checked and then used again by
//! name can be changed in between: a directory swapped for a symbolic link
//! sends the second use somewhere else. So the receiver never uses a path by
//! name from `/` once it is past the watch root:
//!
//! - the root itself is opened with `O_DIRECTORY | O_NOFOLLOW` ([`open_root`]):
//!   a root that is a symbolic link, or not a directory, is refused;
//! - a directory below it is opened relative to that handle ([`open_dir`])
//!   with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, or, on kernels
//!   without `openat2`, one `openat(O_NOFOLLOW | O_DIRECTORY)` per component;
//! - everything done in a directory (create, link, rename, remove, change
//!   metadata) is done relative to its handle, on its last component only,
//!   which is never followed when it is a link.
//!
//! A handle stays on the directory it was opened on whatever happens to the
//! names above it later, so what was checked is what is used.

use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

mod dirs;

pub use dirs::{open_file_in, Dirs, DIRS_MAX};

/// How a directory handle is opened: for reading (listing, `fsync`), never
/// through a symbolic link.
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Set once `openat2` turned out to be missing (`ENOSYS`, kernels before 5.6).
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// How deep [`remove_tree`] and [`clean_temps`] go: each level holds a
/// descriptor open.
pub const DEPTH_MAX: usize = 256;

/// Opens the directory `path` (a watch root, or a directory of the state
/// dir): it must be a directory itself, not a symbolic link to one.
pub fn open_root(path: &Path) -> io::Result<File> {
    match rfs::open(path, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => Ok(File::from(fd)),
        Err(e) if e == Errno::LOOP || e == Errno::NOTDIR => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is a symbolic link or not a directory", path.display()),
        )),
        Err(e) => Err(io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot open {}: {e}", path.display()),
        )),
    }
}

/// Checks one component of a relative path: not empty, not `.` or `..`,
/// without `/`.
fn check_component(c: &[u8]) -> io::Result<()> {
    if c.is_empty() || c == b"." || c == b".." || c.contains(&b'/') || c.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad path component {:?}", String::from_utf8_lossy(c)),
        ));
    }
    Ok(())
}

/// Opens the directory `rel` (relative, `/`-separated; `""` is `root`
/// itself) beneath the directory open as `root`, following no symbolic link
/// on the way and never leaving `root`.
pub fn open_dir(root: &File, rel: &str) -> io::Result<File> {
    if rel.is_empty() {
        return Ok(File::from(rfs::openat(root, c".", DIR_FLAGS, Mode::empty())?));
    }
    open_beneath(root, rel, DIR_FLAGS)
}

/// Opens `rel` (relative, `/`-separated, not empty) beneath the directory
/// open as `root` with `flags`, following no symbolic link anywhere on the
/// way (the last component included) and never leaving `root`:
/// `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, or where the kernel
/// lacks it (or the lookup must be retried), an `openat` walk with
/// `O_NOFOLLOW` on every component. A symbolic link on the way fails with
/// `ELOOP` (or `ENOTDIR`).
pub fn open_beneath(root: &File, rel: &str, flags: OFlags) -> io::Result<File> {
    for c in rel.split('/') {
        check_component(c.as_bytes())?;
    }
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY;
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        match rfs::openat2(root, rel, flags, Mode::empty(), how) {
            Ok(fd) => return Ok(File::from(fd)),
            Err(Errno::NOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
            // A rename somewhere on the system during the lookup, or a
            // path longer than the kernel takes at once: the walk below is
            // as strict and minds neither.
            Err(Errno::AGAIN | Errno::NAMETOOLONG) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (dir, name) = split(rel);
    let parent = if dir.is_empty() {
        File::from(rfs::openat(root, c".", DIR_FLAGS, Mode::empty())?)
    } else {
        walk(root, dir, None)?
    };
    Ok(File::from(rfs::openat(&parent, name, flags, Mode::empty())?))
}

/// A file that is not a regular file where one was expected (a fifo, a
/// socket or a device swapped in): never read, since reading one can block
/// for ever or never end.
#[derive(Debug, thiserror::Error)]
#[error("not a regular file")]
pub struct NotRegular;

/// Opens the regular file `rel` beneath the directory `root` for reading
/// (the sender's side): its directory opened beneath the root with no
/// symbolic link followed on the way, then the file as [`open_file_in`]
/// opens it. A caller that opens many files keeps a [`Dirs`] instead.
pub fn open_file_beneath(root: &Path, rel: &str) -> io::Result<(File, std::fs::Metadata)> {
    Dirs::at(root).open_file(rel)
}

/// Opens `rel` beneath `root` one component at a time, each with
/// `O_NOFOLLOW | O_DIRECTORY`; with `make`, creates missing directories with
/// that mode (less the umask) on the way.
fn walk(root: &File, rel: &str, make: Option<u32>) -> io::Result<File> {
    let mut cur: Option<OwnedFd> = None;
    for c in rel.split('/') {
        check_component(c.as_bytes())?;
        let at = cur.as_ref().map_or(root.as_fd(), |f| f.as_fd());
        let next = match (rfs::openat(at, c, DIR_FLAGS, Mode::empty()), make) {
            (Ok(fd), _) => fd,
            (Err(Errno::NOENT), Some(mode)) => {
                match rfs::mkdirat(at, c, Mode::from_raw_mode(mode)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                rfs::openat(at, c, DIR_FLAGS, Mode::empty())?
            }
            (Err(e), _) => return Err(e.into()),
        };
        cur = Some(next);
    }
    match cur {
        Some(fd) => Ok(File::from(fd)),
        None => Ok(File::from(rfs::openat(root, c".", DIR_FLAGS, Mode::empty())?)),
    }
}

/// Opens the directory `rel` beneath `root` like [`open_dir`], creating the
/// missing directories on the way, one level at a time (each new one is
/// then opened with `O_NOFOLLOW`), with mode `mode` less the umask.
pub fn make_dirs(root: &File, rel: &str, mode: u32) -> io::Result<File> {
    match open_dir(root, rel) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENAMETOOLONG)) => walk(root, rel, Some(mode)),
        done => done,
    }
}

/// Splits a relative path into its directory (`""` for the top) and its
/// last component.
pub fn split(rel: &str) -> (&str, &str) {
    rel.rsplit_once('/').unwrap_or(("", rel))
}

/// Opens the entry `name` of `dir` with `flags`, never following it when
/// it is a symbolic link, and without blocking on a FIFO or a device.
pub fn open_in(dir: &File, name: &str, flags: OFlags) -> io::Result<File> {
    check_component(name.as_bytes())?;
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
    Ok(File::from(rfs::openat(dir, name, flags, Mode::empty())?))
}

/// Creates `name` in `dir`, which must not exist, for reading and writing
/// by its owner only.
pub fn create_private(dir: &File, name: &str) -> io::Result<File> {
    check_component(name.as_bytes())?;
    let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(File::from(rfs::openat(dir, name, flags, Mode::from_raw_mode(0o600))?))
}

/// The status of `name` in `dir`, of the link itself when it is one.
pub fn stat(dir: &File, name: &str) -> io::Result<rfs::Stat> {
    check_component(name.as_bytes())?;
    Ok(rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?)
}

/// The metadata of `name` in `dir` (of the link itself when it is one), as
/// std gives it: read from an `O_PATH` handle on the entry.
pub fn metadata(dir: &File, name: &str) -> io::Result<std::fs::Metadata> {
    check_component(name.as_bytes())?;
    let fd = rfs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    File::from(fd).metadata()
}

/// Whether a status is of a directory.
pub fn is_dir(st: &rfs::Stat) -> bool {
    rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Directory
}

/// Whether a status is of a symbolic link.
pub fn is_symlink(st: &rfs::Stat) -> bool {
    rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Symlink
}

/// Removes `name` from `dir`: a file or link with `unlinkat`, a directory
/// with everything in it, walked through handles (never by path). Fails
/// with `ELOOP` on a tree deeper than [`DEPTH_MAX`], having removed what was
/// above that depth.
pub fn remove_tree(dir: &File, name: &str) -> io::Result<()> {
    check_component(name.as_bytes())?;
    match rfs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) => return Ok(()),
        // A directory (EISDIR on Linux, EPERM elsewhere).
        Err(Errno::ISDIR | Errno::PERM) => {}
        Err(e) => return Err(e.into()),
    }
    // Each frame: a directory being emptied and its name in the one above.
    let mut frames: Vec<(OwnedFd, Vec<u8>)> = Vec::new();
    frames.push((
        rfs::openat(dir, name, DIR_FLAGS, Mode::empty())?,
        name.as_bytes().to_vec(),
    ));
    while let Some((top, _)) = frames.last() {
        let mut sub = None;
        for entry in rfs::Dir::read_from(top)? {
            let entry = entry?;
            let n = entry.file_name();
            if n == c"." || n == c".." {
                continue;
            }
            match rfs::unlinkat(top, n, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(Errno::ISDIR | Errno::PERM) => {
                    sub = Some(n.to_bytes().to_vec());
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        match sub {
            Some(n) => {
                if frames.len() >= DEPTH_MAX {
                    return Err(Errno::LOOP.into());
                }
                let fd = rfs::openat(top, n.as_slice(), DIR_FLAGS, Mode::empty())?;
                frames.push((fd, n));
            }
            None => {
                let Some((_, n)) = frames.pop() else { break };
                let parent = frames.last().map_or(dir.as_fd(), |(f, _)| f.as_fd());
                match rfs::unlinkat(parent, n.as_slice(), AtFlags::REMOVEDIR) {
                    Ok(()) | Err(Errno::NOENT) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}

/// Renames `from` in `from_dir` to `to` in `to_dir`, replacing what is there.
pub fn rename(from_dir: &File, from: &str, to_dir: &File, to: &str) -> io::Result<()> {
    check_component(from.as_bytes())?;
    check_component(to.as_bytes())?;
    Ok(rfs::renameat(from_dir, from, to_dir, to)?)
}

/// Renames `from` in `dir` to `to` in the same directory unless `to`
/// exists: fails with `EEXIST` then, and with `EINVAL` on a file system that
/// cannot tell.
pub fn rename_noreplace(dir: &File, from: &str, to: &str) -> io::Result<()> {
    check_component(from.as_bytes())?;
    check_component(to.as_bytes())?;
    Ok(rfs::renameat_with(dir, from, dir, to, rfs::RenameFlags::NOREPLACE)?)
}

/// Removes the file or link `name` from `dir` (never a directory).
pub fn unlink(dir: &File, name: &str) -> io::Result<()> {
    check_component(name.as_bytes())?;
    Ok(rfs::unlinkat(dir, name, AtFlags::empty())?)
}

/// Makes the symbolic link `name` in `dir`, pointing at `target`.
pub fn symlink(target: &str, dir: &File, name: &str) -> io::Result<()> {
    check_component(name.as_bytes())?;
    Ok(rfs::symlinkat(target, dir, name)?)
}

/// Gives the entry `name` of `dir` (a link itself when it is one) the owner
/// `uid` and group `gid`.
pub fn lchown(dir: &File, name: &str, uid: u32, gid: u32) -> io::Result<()> {
    check_component(name.as_bytes())?;
    let (u, g) = (rfs::Uid::from_raw(uid), rfs::Gid::from_raw(gid));
    Ok(rfs::chownat(dir, name, Some(u), Some(g), AtFlags::SYMLINK_NOFOLLOW)?)
}

/// Makes the directory `name` in `dir` with mode `mode` (less the umask).
pub fn mkdir(dir: &File, name: &str, mode: u32) -> io::Result<()> {
    check_component(name.as_bytes())?;
    Ok(rfs::mkdirat(dir, name, Mode::from_raw_mode(mode))?)
}

/// Opens the directory `name` of `dir`, never through a symbolic link.
pub fn open_subdir(dir: &File, name: &str) -> io::Result<File> {
    check_component(name.as_bytes())?;
    Ok(File::from(rfs::openat(dir, name, DIR_FLAGS, Mode::empty())?))
}

/// Reads the target of the symbolic link `name` in `dir`.
pub fn read_link(dir: &File, name: &str) -> io::Result<std::ffi::OsString> {
    check_component(name.as_bytes())?;
    let target = rfs::readlinkat(dir, name, Vec::new())?;
    Ok(OsStr::from_bytes(target.as_bytes()).to_os_string())
}

/// Opens the file `name` of `dir` to change its metadata, never through a
/// link: for reading where the process may, else as an `O_PATH` handle
/// (which [`fchmod`], [`fchown`] and [`set_times`] then reach through its
/// `/proc/self/fd` entry, which names that very file).
pub fn open_for_meta(dir: &File, name: &str) -> io::Result<File> {
    match open_in(dir, name, OFlags::RDONLY) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            let fd = rfs::openat(
                dir,
                name,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            Ok(File::from(fd))
        }
        done => done,
    }
}

/// The `/proc/self/fd` entry of an open file.
fn proc_path(file: &File) -> std::path::PathBuf {
    use std::os::fd::AsRawFd;
    std::path::PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Sets the permission bits of an open file (see [`open_for_meta`]).
pub fn fchmod(file: &File, mode: u32) -> io::Result<()> {
    let mode = Mode::from_raw_mode(mode & 0o7777);
    match rfs::fchmod(file, mode) {
        Err(Errno::BADF) => Ok(rfs::chmod(proc_path(file), mode)?),
        done => Ok(done?),
    }
}

/// Sets the owner and group of an open file (see [`open_for_meta`]).
pub fn fchown(file: &File, uid: u32, gid: u32) -> io::Result<()> {
    let (u, g) = (Some(rfs::Uid::from_raw(uid)), Some(rfs::Gid::from_raw(gid)));
    match rfs::fchown(file, u, g) {
        Err(Errno::BADF) => Ok(rfs::chown(proc_path(file), u, g)?),
        done => Ok(done?),
    }
}

/// Sets the access and modification times of an open file (see
/// [`open_for_meta`]) to `sec` and `nsec`.
pub fn set_times(file: &File, sec: i64, nsec: u32) -> io::Result<()> {
    let t = rfs::Timespec {
        tv_sec: sec,
        tv_nsec: nsec.into(),
    };
    let times = rfs::Timestamps {
        last_access: t,
        last_modification: t,
    };
    match rfs::futimens(file, &times) {
        Err(Errno::BADF) => Ok(rfs::utimensat(rfs::CWD, proc_path(file), &times, AtFlags::empty())?),
        done => Ok(done?),
    }
}

/// What [`clean_temps`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cleaned {
    /// Temporary files removed.
    pub removed: usize,
    /// Directories or files it could not look into or remove (each logged).
    pub skipped: usize,
}

/// Removes the temporary files (see [`crate::relpath::is_temp_name`]) left
/// under the directory open as `root` by an interrupted run, walking through
/// handles (one `openat` per level, so a tree deeper than `PATH_MAX` is no
/// obstacle). What it cannot open or remove is skipped, logged and counted,
/// never fatal; directories deeper than [`DEPTH_MAX`] are skipped so.
pub fn clean_temps_at(root: &File) -> Cleaned {
    let mut done = Cleaned::default();
    // Each frame: an open directory and the subdirectories still to visit in it.
    struct Frame {
        dir: OwnedFd,
        subdirs: Vec<Vec<u8>>,
    }
    let list = |dir: BorrowedFd<'_>, done: &mut Cleaned| -> Vec<Vec<u8>> {
        let mut subdirs = Vec::new();
        let entries = match rfs::Dir::read_from(dir) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list a directory while cleaning temporary files; skipped");
                done.skipped += 1;
                return subdirs;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list a directory while cleaning temporary files; skipped");
                    done.skipped += 1;
                    break;
                }
            };
            let name: &CStr = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            let mut ft = entry.file_type();
            if ft == rfs::FileType::Unknown {
                match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => ft = rfs::FileType::from_raw_mode(st.st_mode),
                    Err(_) => continue,
                }
            }
            if ft == rfs::FileType::Directory {
                subdirs.push(name.to_bytes().to_vec());
            } else if std::str::from_utf8(name.to_bytes()).is_ok_and(crate::relpath::is_temp_name) {
                match rfs::unlinkat(dir, name, AtFlags::empty()) {
                    Ok(()) | Err(Errno::NOENT) => done.removed += 1,
                    Err(e) => {
                        tracing::warn!(name = %String::from_utf8_lossy(name.to_bytes()), error = %e, "cannot remove a temporary file; skipped");
                        done.skipped += 1;
                    }
                }
            }
        }
        subdirs
    };
    let top = match rfs::openat(root, c".", DIR_FLAGS, Mode::empty()) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open a watch root to clean temporary files; skipped");
            done.skipped += 1;
            return done;
        }
    };
    let subdirs = list(top.as_fd(), &mut done);
    let mut frames = vec![Frame { dir: top, subdirs }];
    loop {
        let depth = frames.len();
        let Some(frame) = frames.last_mut() else { break };
        let Some(name) = frame.subdirs.pop() else {
            frames.pop();
            continue;
        };
        if depth >= DEPTH_MAX {
            tracing::warn!(
                depth = frames.len(),
                "a directory too deep to clean temporary files in; skipped"
            );
            done.skipped += 1;
            continue;
        }
        match rfs::openat(&frame.dir, name.as_slice(), DIR_FLAGS, Mode::empty()) {
            Ok(dir) => {
                let subdirs = list(dir.as_fd(), &mut done);
                frames.push(Frame { dir, subdirs });
            }
            // Replaced by a link or a file since it was listed: not ours to enter.
            Err(Errno::LOOP | Errno::NOTDIR | Errno::NOENT) => {}
            Err(e) => {
                tracing::warn!(name = %String::from_utf8_lossy(&name), error = %e, "cannot open a directory to clean temporary files; skipped");
                done.skipped += 1;
            }
        }
    }
    done
}

#[cfg(test)]
mod tests;
