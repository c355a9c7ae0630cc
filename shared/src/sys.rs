//! The few system calls std does not wrap.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

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
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
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
