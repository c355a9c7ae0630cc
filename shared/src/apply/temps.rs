//! The receiver's temporary files: the writer that starts write-back as it
//! goes (`Output`), the hashing writer, temporary names, and the clean-up of
//! temporaries a crash left behind.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use crate::beneath;
use crate::relpath::TEMP_PREFIX;

/// Write-back of a file being received starts every this many bytes.
pub(super) const WRITEBACK_STEP: u64 = 8 << 20;

/// A new temporary file being written, at its own position, to be made
/// durable: it starts the kernel writing back each [`WRITEBACK_STEP`]
/// bytes as they arrive, without waiting, so that the commit's fsync finds
/// little left to write; otherwise a large file is written back only at
/// that fsync, after the last byte has arrived.
///
/// It is written sparse, as `rsync --sparse` does: a whole
/// aligned block of zeros ([`crate::sparse::ZERO_BLOCK`]) is stepped over
/// instead of written, and so is a hole ([`Output::skip`]); [`Output::end`]
/// gives the file its full length when it ends in a hole.
pub(super) struct Output {
    pub(super) file: File,
    /// Where the next byte goes (the bytes written and stepped over).
    pub(super) written: u64,
    /// Where write-back has been started up to.
    pub(super) started: u64,
}

impl Output {
    pub(super) fn durable(file: File) -> Output {
        Output {
            file,
            written: 0,
            started: 0,
        }
    }

    /// Steps over `len` bytes of zeros, leaving a hole.
    pub(super) fn skip(&mut self, len: u64) -> io::Result<()> {
        self.written = self
            .written
            .checked_add(len)
            .ok_or_else(|| io::Error::other("a file longer than 2^64 bytes"))?;
        Ok(())
    }

    /// The file, as long as everything written and stepped over (a hole at
    /// the end has no block to give the file its length).
    pub(super) fn end(self) -> io::Result<File> {
        if self.file.metadata()?.len() < self.written {
            self.file.set_len(self.written)?;
        }
        Ok(self.file)
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let zeros = crate::sparse::zero_run(buf, self.written);
        if zeros > 0 {
            self.skip(zeros as u64)?;
            return Ok(zeros);
        }
        let data = crate::sparse::before_zeros(buf, self.written);
        let n = self.file.write_at(&buf[..data], self.written)?;
        self.written += n as u64;
        if self.written - self.started >= WRITEBACK_STEP {
            // Only a hint: the commit's fsync reports any real failure.
            let _ = crate::sys::start_writeback(&self.file, self.started, self.written - self.started);
            self.started = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

pub(super) struct HashingWriter<W> {
    pub(super) inner: W,
    pub(super) hasher: blake3::Hasher,
    pub(super) written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A temporary name (see [`TEMP_PREFIX`]) for a file `what` beside `name`.
pub(super) fn temp_name(name: &str, what: &str) -> String {
    let short: String = name.chars().take(100).collect();
    format!("{TEMP_PREFIX}{short}.{what}.{:08x}", rand::random::<u32>())
}

/// Removes the temporary files left under the watch root `root` by an
/// interrupted run, through directory handles (see
/// [`beneath::clean_temps_at`]): what it cannot open or remove is skipped,
/// logged and counted, never fatal. A missing root has nothing to clean; a
/// root that is a symbolic link or not a directory is an error (and is not
/// entered).
pub fn clean_temps(root: &Path) -> io::Result<beneath::Cleaned> {
    match beneath::open_root(root) {
        Ok(dir) => Ok(beneath::clean_temps_at(&dir)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(beneath::Cleaned::default()),
        Err(e) => Err(e),
    }
}
