//! Sparse files: where a file's data is, so that holes are neither read,
//! sent nor written as zeros.
//!
//! The sender maps an open file's data and holes with `lseek(SEEK_DATA)` and
//! `lseek(SEEK_HOLE)` on the descriptor it opened beneath the watch root
//! ([`regions`]); where the file system cannot tell, the whole file is data.
//! Holes travel as [`crate::proto::Op::FileHole`], and runs of zeros inside
//! data as well ([`zero_run`]). The receiver writes data at its position and
//! steps over whole zero blocks ([`ZERO_BLOCK`]) instead of writing them, as
//! `rsync --sparse` does, so a hole stays a hole even when it arrives as data
//! (a delta's copies of the old file's holes).
//!
//! Content hashes do not change: a hole is hashed as the zeros it reads as
//! ([`hash_file`]), without reading it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use rustix::fs::SeekFrom;

/// The block a receiver steps over instead of writing when it is all zeros:
/// the page and block size of common file systems.
pub const ZERO_BLOCK: u64 = 4096;

/// Runs of zeros inside a file's data at least this long are sent as holes;
/// shorter ones go as data (a hole costs a frame of its own).
pub const ZERO_RUN_MIN: usize = 64 * 1024;

/// A part of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Region {
    /// Data from `start`, `len` bytes long.
    Data {
        /// Offset of the first byte.
        start: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A hole (reads as zeros) from `start`, `len` bytes long.
    Hole {
        /// Offset of the first byte.
        start: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// The data and holes of the first `size` bytes of `file`, in order, found
/// one at a time (a file with a million extents costs no memory here).
///
/// `file`'s offset is moved: read it with positioned reads. A file that
/// changes meanwhile yields regions that may be out of date, never past
/// `size`; whoever reads the data finds out (a short read), and the
/// receiver's hash check refuses what does not match.
pub fn regions(file: &File, size: u64) -> Regions<'_> {
    Regions {
        file,
        pos: 0,
        size,
        map: true,
    }
}

/// The iterator [`regions`] returns.
pub struct Regions<'a> {
    file: &'a File,
    pos: u64,
    size: u64,
    /// False once the file system said it cannot map holes: the rest is data.
    map: bool,
}

impl Regions<'_> {
    fn step(&mut self) -> io::Result<Region> {
        let pos = self.pos;
        let rest = self.size - pos;
        if !self.map {
            return Ok(Region::Data { start: pos, len: rest });
        }
        let data = match rustix::fs::seek(self.file, SeekFrom::Data(pos)) {
            Ok(at) => at.min(self.size),
            // No data from here to the end of the file: one hole.
            Err(rustix::io::Errno::NXIO) => self.size,
            Err(e) if unsupported(e) => {
                self.map = false;
                return Ok(Region::Data { start: pos, len: rest });
            }
            Err(e) => return Err(e.into()),
        };
        if data > pos {
            return Ok(Region::Hole {
                start: pos,
                len: data - pos,
            });
        }
        let hole = match rustix::fs::seek(self.file, SeekFrom::Hole(pos)) {
            // A file always ends in a hole: past its end if nowhere else.
            Ok(at) => at.min(self.size),
            // It shrank under us: the rest is data as far as we know.
            Err(rustix::io::Errno::NXIO) => self.size,
            Err(e) if unsupported(e) => {
                self.map = false;
                self.size
            }
            Err(e) => return Err(e.into()),
        };
        // Never an empty region: without progress the walk would not end.
        let end = if hole > pos { hole } else { self.size };
        Ok(Region::Data {
            start: pos,
            len: end - pos,
        })
    }
}

/// Whether `lseek` failed because this file system does not map holes.
fn unsupported(e: rustix::io::Errno) -> bool {
    e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOTSUP || e == rustix::io::Errno::OPNOTSUPP
}

impl Iterator for Regions<'_> {
    type Item = io::Result<Region>;

    fn next(&mut self) -> Option<io::Result<Region>> {
        if self.pos >= self.size {
            return None;
        }
        let region = self.step();
        match &region {
            Ok(Region::Data { start, len } | Region::Hole { start, len }) => self.pos = start + len,
            // An error ends the walk.
            Err(_) => self.pos = self.size,
        }
        Some(region)
    }
}

/// The bytes of data (not holes) in the first `size` bytes of `file`.
pub fn data_len(file: &File, size: u64) -> io::Result<u64> {
    let mut n = 0;
    for r in regions(file, size) {
        if let Region::Data { len, .. } = r? {
            n += len;
        }
    }
    Ok(n)
}

/// Zeros to hash holes with.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Feeds `len` zeros to `hasher`.
pub fn hash_zeros(hasher: &mut blake3::Hasher, mut len: u64) {
    while len > 0 {
        let k = len.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..k]);
        len -= k as u64;
    }
}

/// The size and BLAKE3 hash of the open regular file `file` (see
/// `ContentHash::of_open_file`): the same hash
/// as reading it to its end, but its holes are not read (they are hashed as
/// the zeros they read as). The file is read with positioned reads as it is
/// now; one that shrinks meanwhile ends at the short read, one that grows
/// is hashed up to the size it had at the start. `tick` is called before
/// every read of up to 256 KiB (a caller that must show progress on a
/// large file stamps it there; others pass `&|| {}`).
pub fn hash_file(file: &File, tick: &dyn Fn()) -> io::Result<(u64, blake3::Hash)> {
    let size = file.metadata()?.len();
    let mut hasher = blake3::Hasher::new();
    let mut buf = Vec::new();
    let mut total = 0;
    'walk: for r in regions(file, size) {
        match r? {
            Region::Hole { len, .. } => {
                hash_zeros(&mut hasher, len);
                total += len;
            }
            Region::Data { start, len } => {
                if buf.is_empty() {
                    buf = vec![0u8; (256 * 1024).min(size as usize)];
                }
                let mut at = start;
                while at < start + len {
                    let want = buf.len().min((start + len - at) as usize);
                    tick();
                    let n = read_at_full(file, &mut buf[..want], at)?;
                    hasher.update(&buf[..n]);
                    at += n as u64;
                    total += n as u64;
                    if n < want {
                        break 'walk;
                    }
                }
            }
        }
    }
    Ok((total, hasher.finalize()))
}

/// What [`walk`] found in a file.
pub trait Pieces {
    /// The next bytes of data.
    fn data(&mut self, data: &[u8]) -> io::Result<()>;
    /// The next `len` bytes are zeros (a hole, or a long run of zeros).
    fn hole(&mut self, len: u64) -> io::Result<()>;
}

/// Reads the first `size` bytes of `file` as data and holes, in order, and
/// hands them to `to`: holes are not read, runs of at least
/// [`ZERO_RUN_MIN`] zeros inside the data are handed over as holes too, and
/// consecutive holes as one. Data comes in pieces of at most `chunk` bytes.
/// Returns how many bytes were handed over: fewer than `size` when the file
/// shrank meanwhile (the walk stops at the short read).
pub fn walk(file: &File, size: u64, chunk: usize, to: &mut impl Pieces) -> io::Result<u64> {
    let mut buf = vec![0u8; chunk.max(ZERO_BLOCK as usize).min(size.max(1) as usize)];
    let mut hole = 0u64;
    let mut done = 0u64;
    // A file that shrank since `size` was learned ends where it ends now
    // (past its end, `SEEK_DATA` would call the rest a hole).
    let size = size.min(file.metadata()?.len());
    'walk: for r in regions(file, size) {
        match r? {
            Region::Hole { len, .. } => {
                hole += len;
                done += len;
            }
            Region::Data { start, len } => {
                let end = start + len;
                let mut at = start;
                while at < end {
                    let want = buf.len().min((end - at) as usize);
                    let n = read_at_full(file, &mut buf[..want], at)?;
                    let mut rest = &buf[..n];
                    let mut pos = at;
                    while !rest.is_empty() {
                        let zeros = zero_run(rest, pos);
                        let k = if zeros >= ZERO_RUN_MIN {
                            hole += zeros as u64;
                            zeros
                        } else {
                            let k = if zeros > 0 { zeros } else { before_zeros(rest, pos) };
                            flush_hole(&mut hole, to)?;
                            to.data(&rest[..k])?;
                            k
                        };
                        rest = &rest[k..];
                        pos += k as u64;
                    }
                    at += n as u64;
                    done += n as u64;
                    if n < want {
                        break 'walk;
                    }
                }
            }
        }
    }
    flush_hole(&mut hole, to)?;
    Ok(done)
}

/// Hands over the hole of `hole` bytes collected so far, if any.
fn flush_hole(hole: &mut u64, to: &mut impl Pieces) -> io::Result<()> {
    if *hole > 0 {
        to.hole(*hole)?;
        *hole = 0;
    }
    Ok(())
}

/// Reads at `at` until `buf` is full or the file ends; returns how many
/// bytes were read.
pub fn read_at_full(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], at + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The length of the run of zeros that starts `buf`, in whole
/// [`ZERO_BLOCK`]s counted from file offset `pos` (where `buf` starts):
/// 0 unless `pos` is a block boundary and the first block is all zeros.
pub fn zero_run(buf: &[u8], pos: u64) -> usize {
    if !pos.is_multiple_of(ZERO_BLOCK) {
        return 0;
    }
    let block = ZERO_BLOCK as usize;
    buf.chunks_exact(block).take_while(|b| is_zero(b)).count() * block
}

/// How many bytes of `buf` (which starts at file offset `pos`) come before
/// the first whole [`ZERO_BLOCK`] of zeros in it (all of `buf` when none).
pub fn before_zeros(buf: &[u8], pos: u64) -> usize {
    let block = ZERO_BLOCK as usize;
    let first = ((ZERO_BLOCK - pos % ZERO_BLOCK) % ZERO_BLOCK) as usize;
    let mut at = first;
    while at + block <= buf.len() {
        if is_zero(&buf[at..at + block]) {
            return at;
        }
        at += block;
    }
    buf.len()
}

/// Whether `b` holds only zeros.
fn is_zero(b: &[u8]) -> bool {
    // A piece at a time: data mostly has a non-zero byte in its first
    // piece, and within a piece the optimiser compares words at once.
    b.chunks(64).all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek};

    /// A file with data at these offsets (`len` bytes of 0x5a each) and the
    /// given size; the rest is holes.
    fn sparse_file(size: u64, data: &[(u64, usize)]) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        for &(at, len) in data {
            f.write_all_at(&vec![0x5a; len], at).unwrap();
        }
        f
    }

    /// The whole content of `f`, read from its start.
    fn read_all(f: &File) -> Vec<u8> {
        let mut all = Vec::new();
        (&*f).seek(io::SeekFrom::Start(0)).unwrap();
        (&*f).read_to_end(&mut all).unwrap();
        all
    }

    fn hash_by_reading(f: &File) -> blake3::Hash {
        blake3::hash(&read_all(f))
    }

    /// Whether the file system of the temporary directory maps holes.
    fn maps_holes() -> bool {
        let f = sparse_file(1 << 20, &[]);
        regions(&f, 1 << 20).count() == 1 && data_len(&f, 1 << 20).unwrap() == 0
    }

    #[test]
    fn regions_cover_the_file_in_order_and_find_the_holes() {
        let size = 64 << 20;
        let mib = 1 << 20;
        let f = sparse_file(size, &[(0, 4096), (10 * mib, 100_000), (size - 4096, 4096)]);
        let all: Vec<Region> = regions(&f, size).map(Result::unwrap).collect();
        // Every byte is covered once, in order, with no empty region.
        let mut pos = 0;
        for r in &all {
            let (Region::Data { start, len } | Region::Hole { start, len }) = *r;
            assert_eq!(start, pos);
            assert!(len > 0);
            pos += len;
        }
        assert_eq!(pos, size);
        if !maps_holes() {
            eprintln!("this file system does not map holes; regions are all data");
            return;
        }
        let data = data_len(&f, size).unwrap();
        assert!((4096 + 100_000 + 4096..1 << 20).contains(&data), "{data} bytes of data");
        assert!(matches!(all[0], Region::Data { start: 0, .. }));
        assert!(matches!(all.last(), Some(Region::Data { .. })));
        assert!(all.iter().filter(|r| matches!(r, Region::Hole { .. })).count() >= 2);
        // No data at all, and a trailing hole.
        let empty = sparse_file(size, &[]);
        assert_eq!(
            regions(&empty, size).map(Result::unwrap).collect::<Vec<_>>(),
            [Region::Hole { start: 0, len: size }]
        );
        let trailing = sparse_file(size, &[(0, 4096)]);
        assert!(matches!(
            regions(&trailing, size).last(),
            Some(Ok(Region::Hole { len, .. })) if len > size / 2
        ));
    }

    #[test]
    fn hashing_skips_holes_and_gives_the_same_hash() {
        let mib = 1 << 20;
        for f in [
            sparse_file(8 * mib, &[(0, 10), (3 * mib + 7, 5000), (8 * mib - 1, 1)]),
            sparse_file(8 * mib, &[]),
            sparse_file(3 * mib + 5, &[(mib, 300_000)]),
            sparse_file(0, &[]),
            sparse_file(100, &[(0, 100)]),
        ] {
            let size = f.metadata().unwrap().len();
            assert_eq!(hash_file(&f, &|| {}).unwrap(), (size, hash_by_reading(&f)));
        }
        // A file shorter than the regions say (it shrank): the short read ends it.
        let f = sparse_file(2 * mib, &[(0, 4096), (mib, 4096)]);
        f.set_len(mib + 100).unwrap();
        assert_eq!(hash_file(&f, &|| {}).unwrap(), (mib + 100, hash_by_reading(&f)));
    }

    /// Puts a file together again from what [`walk`] hands over.
    #[derive(Default)]
    struct Rebuilt {
        bytes: Vec<u8>,
        data: u64,
        holes: Vec<u64>,
        last_was_hole: bool,
    }

    impl Pieces for Rebuilt {
        fn data(&mut self, data: &[u8]) -> io::Result<()> {
            assert!(!data.is_empty());
            self.bytes.extend_from_slice(data);
            self.data += data.len() as u64;
            self.last_was_hole = false;
            Ok(())
        }
        fn hole(&mut self, len: u64) -> io::Result<()> {
            assert!(len > 0 && !self.last_was_hole, "holes are merged");
            self.bytes.resize(self.bytes.len() + len as usize, 0);
            self.holes.push(len);
            self.last_was_hole = true;
            Ok(())
        }
    }

    #[test]
    fn a_walk_hands_over_the_content_with_holes_and_zero_runs_left_out() {
        let mib = 1 << 20;
        let size = 16 * mib;
        // Data at the start, in the middle (with a run of written zeros in
        // it), and near the end; a trailing hole.
        let f = sparse_file(size, &[(0, 5000), (5 * mib, 300_000), (size - 2 * mib, 4096)]);
        f.write_all_at(&vec![0u8; 200_000], 5 * mib + 50_000).unwrap();
        let mut got = Rebuilt::default();
        assert_eq!(walk(&f, size, 256 * 1024, &mut got).unwrap(), size);
        let want = read_all(&f);
        assert!(got.bytes == want, "the rebuilt content differs");
        // Whether or not the file system maps holes, the zeros are not data:
        // at most the data written, less the run of zeros, plus a block on
        // each side of each region.
        assert!(
            got.data <= 5000 + 300_000 - 200_000 + 4096 + 8 * ZERO_BLOCK,
            "{} bytes handed over as data",
            got.data
        );
        assert!(matches!(got.holes.last(), Some(&h) if h >= 2 * mib - 4096));
        // A file with no data at all: one hole. A file that shrank: a short walk.
        let empty = sparse_file(size, &[]);
        let mut got = Rebuilt::default();
        assert_eq!(walk(&empty, size, 256 * 1024, &mut got).unwrap(), size);
        assert_eq!((got.data, got.holes.as_slice()), (0, &[size][..]));
        let mut got = Rebuilt::default();
        let short = sparse_file(mib, &[(0, mib as usize)]);
        assert_eq!(walk(&short, 2 * mib, 64 * 1024, &mut got).unwrap(), mib);
        assert_eq!(got.data, mib);
    }

    #[test]
    fn zero_runs_are_whole_aligned_blocks() {
        let b = ZERO_BLOCK as usize;
        let mut buf = vec![0u8; 4 * b];
        buf[2 * b + 5] = 1;
        assert_eq!(zero_run(&buf, 0), 2 * b);
        assert_eq!(zero_run(&buf, 8192), 2 * b);
        // Not on a block boundary: nothing is a hole.
        assert_eq!(zero_run(&buf, 1), 0);
        assert_eq!(zero_run(&buf[..b - 1], 0), 0);
        assert_eq!(zero_run(&buf[2 * b..], 0), 0);
        // Data first: the zeros start at the next whole zero block.
        assert_eq!(before_zeros(&buf[2 * b..], 0), b);
        assert_eq!(before_zeros(&buf[2 * b..3 * b], 0), b);
        let mut data_then_zeros = vec![0u8; 3 * b];
        data_then_zeros[..10].fill(7);
        assert_eq!(before_zeros(&data_then_zeros, 0), b);
        // Starting 100 bytes before a boundary, the first whole block is at 100.
        assert_eq!(before_zeros(&data_then_zeros[..2 * b], ZERO_BLOCK - 100), 100);
        assert_eq!(before_zeros(&[0u8; 10], 0), 10);
    }
}
