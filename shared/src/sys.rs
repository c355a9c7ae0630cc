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
