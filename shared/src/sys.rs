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
