//! The few system calls std does not wrap.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A system call's return code as a result: 0 is success, anything else
/// failed and left its reason in `errno`.
fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The effective user id of this process.
pub fn geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid()
    }
}

/// Flushes the filesystem that holds `file` to stable storage.
pub fn syncfs(file: &File) -> io::Result<()> {
    // SAFETY: the descriptor is valid for the lifetime of `file`.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::syncfs(file.as_raw_fd()) };
    check(rc)
}

/// Starts writing back `len` bytes of `file` from `offset` to stable storage
/// without waiting for it (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`).
/// Durability still needs an fsync; this only gets the writing under way.
pub fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: the descriptor is valid for the lifetime of `file`; the call
    // only reads its arguments.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
    check(rc)
}

/// Opens a new regular file without a name in the directory open as `dir`
/// (`O_TMPFILE`), for reading and writing, with permission bits `mode`. It
/// disappears when closed unless [`link_unnamed`] gives it a name first.
/// Filesystems without `O_TMPFILE` fail with `EOPNOTSUPP` (or `EISDIR` or
/// `EINVAL` on old kernels).
pub fn open_unnamed(dir: &File, mode: u32) -> io::Result<File> {
    use std::os::fd::FromRawFd;
    // SAFETY: the descriptor is valid for the lifetime of `dir`; the path
    // is a NUL-terminated literal.
    #[allow(unsafe_code)]
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c".".as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    #[allow(unsafe_code)]
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Gives the file `file`, opened by [`open_unnamed`], the name `name` in the
/// directory open as `dir`. Fails with `EEXIST` when that name exists: it
/// never replaces.
pub fn link_unnamed(file: &File, dir: &File, name: &std::ffi::OsStr) -> io::Result<()> {
    let name = CString::new(name.as_bytes()).map_err(io::Error::other)?;
    // SAFETY: the descriptors are valid for the lifetimes of `file` and
    // `dir`; both strings are NUL-terminated and live across the call.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::linkat(
            file.as_raw_fd(),
            c"".as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    match check(rc) {
        // Linking a descriptor needs CAP_DAC_READ_SEARCH (the kernel answers
        // ENOENT without it); its /proc link does not.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        done => return done,
    }
    let from = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(io::Error::other)?;
    // SAFETY: as above.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    check(rc)
}

/// Opens `path` for reading, with `flags` (such as `O_NOFOLLOW`) added, and
/// without updating its access time where the process may ask for that (it
/// owns the file, or has `CAP_FOWNER`, as a root agent does).
///
/// Under `relatime`, the first read of a file changed since it was last
/// read writes its inode again: a sender reading a tree it has not read
/// before (the initial sync, a full comparison after a restart) would dirty
/// every inode of it, which was a tenth of the shipping thread's time on
/// ext4 with a journal. Files the process may not open so are opened
/// without the flag.
pub fn open_for_reading(path: &Path, flags: libc::c_int) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |flags| std::fs::OpenOptions::new().read(true).custom_flags(flags).open(path);
    match open(flags | libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(flags),
        done => done,
    }
}

/// How many files this process may hold open (the soft `RLIMIT_NOFILE`).
pub fn open_files_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into `lim`, which outlives the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc == 0 {
        lim.rlim_cur
    } else {
        1024
    }
}

/// Renames `from` to `to` unless `to` exists (`renameat2` with
/// `RENAME_NOREPLACE`). Fails with `EEXIST` when it exists, and with `EINVAL`
/// on a filesystem that cannot do it.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let from = CString::new(from.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let to = CString::new(to.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: both strings are NUL-terminated and live across the call.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    check(rc)
}

/// How many malloc arenas the agent uses (glibc's default is eight per core).
const MALLOC_ARENAS: i32 = 2;

/// Allocations from this size up get pages of their own (glibc's starting
/// value, kept fixed).
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Sets glibc's allocator up for a long-running agent whose memory is a few
/// large per-file tables between peaks of transient work.
///
/// - At most [`MALLOC_ARENAS`] arenas. Each thread that allocates otherwise
///   gets an arena of its own, up to eight per core, and pages freed in one
///   arena are not reused by another: with 100,000 watched files the idle
///   agent held 13 MiB more (102.8 against 89.4 MiB, `bench all 5`). The
///   agent's threads mostly wait on I/O, so two arenas cost nothing
///   measurable.
/// - A fixed mmap threshold. glibc raises it to the size of any large block
///   freed (up to 32 MiB), after which a full comparison's manifests, scans
///   and table resizes come from the heap, where the long-lived tables are
///   then built around their holes. Kept at 128 KiB, those blocks are
///   mapped and unmapped on their own and leave nothing behind.
///
/// Call first in `main`, before any thread starts; a no-op elsewhere than
/// glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; both take any
    // positive value and are safe to set before threads exist.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Hands memory the allocator holds but no longer uses back to the system.
///
/// A full comparison of a large tree builds and drops manifests of hundreds
/// of thousands of entries; glibc keeps the freed pages, so an idle agent
/// would stay at its peak size. Called after such peaks; a no-op elsewhere
/// than glibc.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it has
    // no preconditions and is safe to call from any thread at any time.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Whether `openat2` is known to be missing (Linux before 5.6): the walk of
/// [`open_beneath`] then opens one component at a time instead.
static NO_OPENAT2: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Opens `rel` (a relative, `/`-separated path) beneath the directory open
/// as `dir` with `flags`, following no symbolic link anywhere on the way
/// (the last component included) and never leaving `dir`: `openat2` with
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, or where the kernel lacks it,
/// an `openat` walk with `O_NOFOLLOW` on every component. A symbolic link
/// on the way fails with `ELOOP` (or `ENOTDIR`), a way out with `EXDEV`.
pub fn open_beneath(dir: &File, rel: &str, flags: rustix::fs::OFlags) -> io::Result<File> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    use std::sync::atomic::Ordering;
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY;
    if rel.is_empty() || rel.starts_with('/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a relative path"));
    }
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        match rustix::fs::openat2(dir, rel, flags, Mode::empty(), resolve) {
            Ok(fd) => return Ok(File::from(fd)),
            Err(rustix::io::Errno::NOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
            Err(e) => return Err(e.into()),
        }
    }
    let mut parts = rel.split('/').peekable();
    let mut cur: Option<File> = None;
    while let Some(part) = parts.next() {
        if part.is_empty() || part == "." || part == ".." {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a normalised path"));
        }
        let at = cur.as_ref().unwrap_or(dir);
        let f = if parts.peek().is_some() {
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
        } else {
            flags
        };
        cur = Some(File::from(rustix::fs::openat(at, part, f, Mode::empty())?));
    }
    cur.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "an empty path"))
}

/// A file that is not a regular file where one was expected (a fifo, a
/// socket or a device swapped in): never read, since reading one can block
/// for ever or never end.
#[derive(Debug, thiserror::Error)]
#[error("not a regular file")]
pub struct NotRegular;

/// Opens the regular file `rel` beneath the directory `root` for reading:
/// [`open_beneath`] with `O_NONBLOCK` (opening a fifo swapped in must not
/// block) and `O_NOATIME` where allowed, then `fstat` of that descriptor,
/// which must be a regular file ([`NotRegular`] otherwise). The metadata
/// returned is that of the file the descriptor reads, whatever the path
/// names by now.
pub fn open_file_beneath(root: &Path, rel: &str) -> io::Result<(File, std::fs::Metadata)> {
    use rustix::fs::{Mode, OFlags};
    let dir = File::from(rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?);
    let flags = OFlags::RDONLY | OFlags::NONBLOCK;
    let file = match open_beneath(&dir, rel, flags | OFlags::NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open_beneath(&dir, rel, flags)?,
        done => done?,
    };
    let md = file.metadata()?;
    if !md.is_file() {
        return Err(io::Error::other(NotRegular));
    }
    // O_NONBLOCK means nothing to a regular file's reads; it is cleared all
    // the same, so that nothing later relies on it.
    rustix::fs::fcntl_setfl(&file, rustix::fs::fcntl_getfl(&file)? - OFlags::NONBLOCK)?;
    Ok((file, md))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_beneath_follows_no_link_and_reads_only_regular_files() {
        let d = tempfile::tempdir().unwrap();
        let (root, outside) = (d.path().join("root"), d.path().join("outside"));
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("sub/f"), b"inside").unwrap();
        std::fs::write(outside.join("f"), b"outside").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        std::os::unix::fs::symlink("sub/f", root.join("flink")).unwrap();
        let (f, md) = open_file_beneath(&root, "sub/f").unwrap();
        assert_eq!(md.len(), 6);
        assert_eq!(std::io::read_to_string(f).unwrap(), "inside");
        // A link anywhere on the way, a way out, a directory: refused.
        assert!(open_file_beneath(&root, "link/f").is_err());
        assert!(open_file_beneath(&root, "flink").is_err());
        assert!(open_file_beneath(&root, "../outside/f").is_err());
        assert!(open_file_beneath(&root, "sub").is_err());
        // A fifo: refused at once, not waited on for a writer.
        let fifo = root.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        let err = open_file_beneath(&root, "fifo").unwrap_err();
        assert!(err.get_ref().is_some_and(|e| e.is::<NotRegular>()), "{err}");
        // The walk used without openat2 refuses the same.
        let dir = File::open(&root).unwrap();
        NO_OPENAT2.store(true, std::sync::atomic::Ordering::Relaxed);
        let flags = rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NONBLOCK;
        let walked = open_beneath(&dir, "sub/f", flags);
        let through_link = open_beneath(&dir, "link/f", flags);
        let last_link = open_beneath(&dir, "flink", flags);
        let up = open_beneath(&dir, "../outside/f", flags);
        NO_OPENAT2.store(false, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(std::io::read_to_string(walked.unwrap()).unwrap(), "inside");
        assert!(through_link.is_err() && last_link.is_err() && up.is_err());
    }
}
