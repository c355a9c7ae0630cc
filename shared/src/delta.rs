//! Signatures, deltas and patching, on top of `fast_rsync`.
//!
//! fast_rsync's signatures use MD4; callers always check the patched result
//! against the sender's BLAKE3 hash, and patching is limited to the size the
//! sender announced, because a delta from the wire is untrusted input.
//!
//! Files are never memory-mapped: a watched file can be truncated by another
//! process at any moment, and touching a mapped page past the new end kills
//! the process with `SIGBUS`. Large files are read instead, in rounds of at
//! most [`Split::round_len`] bytes (signatures, diffs), in probes (the
//! rewrite check), or with positioned reads of the base as a delta asks for
//! it ([`apply_file`]); a file that shrinks while read is only a short read.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;

use fast_rsync::{Signature, SignatureOptions};

/// Files at least this large that exist on the receiver go as deltas.
pub const DELTA_MIN_SIZE: u64 = 64 * 1024;

/// Whether a file of `new` bytes should go as a delta against the receiver's
/// copy of `old` bytes: both large enough, and of comparable size (a delta
/// against a much smaller or larger base is mostly literal data, and the
/// rolling search over it costs more than sending it whole).
pub fn worth_a_delta(old: u64, new: u64) -> bool {
    old >= DELTA_MIN_SIZE && new >= DELTA_MIN_SIZE && new <= old.saturating_mul(2) && old <= new.saturating_mul(2)
}

/// Bytes of the MD4 strong hash kept per block.
const STRONG_LEN: u32 = 8;

/// The signature block length for a file of `size` bytes: rsync's rule
/// (the square root, a multiple of 8, between 700 and 128 KiB).
pub fn block_len(size: u64) -> u32 {
    if size <= 700 * 700 {
        return 700;
    }
    let root = (size as f64).sqrt() as u64;
    (root & !7).clamp(700, 128 * 1024) as u32
}

/// A delta operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// The signature bytes are not a valid signature.
    #[error("bad signature: {0}")]
    Signature(String),
    /// Computing the delta failed.
    #[error("cannot compute the delta: {0}")]
    Diff(String),
    /// The delta is malformed or would exceed the announced size.
    #[error("cannot apply the delta: {0}")]
    Apply(String),
}

/// Inputs smaller than this are signed and diffed on the calling thread.
const PARALLEL_MIN: usize = 8 << 20;

/// The most data one thread diffs in one piece. Each piece's delta is held in
/// memory until the pieces before it are written, so this bounds the memory a
/// diff of mostly new content can take (one piece per thread).
const PIECE_MAX: usize = 32 << 20;

/// How a large signature or diff is split across threads.
#[derive(Clone, Copy, Debug)]
pub struct Split {
    /// Threads working at once, the caller's included.
    pub threads: usize,
    /// The largest piece one thread takes.
    pub piece_max: usize,
}

impl Split {
    /// The machine's cores, up to four, for inputs of at least 8 MiB; one
    /// thread otherwise.
    pub fn for_len(len: usize) -> Split {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Split {
            threads: if len < PARALLEL_MIN { 1 } else { cores.min(4) },
            piece_max: PIECE_MAX,
        }
    }

    /// The length of each piece of `len` bytes: a whole number of blocks.
    fn piece_len(self, len: usize, block: usize) -> usize {
        let share = len.div_ceil(self.threads.max(1)).min(self.piece_max).max(1);
        share.div_ceil(block) * block
    }

    /// The most bytes of an input of `len` bytes that are held in memory at
    /// once when it is read in rounds: one piece per thread, a whole number
    /// of blocks of `block` bytes (at most four pieces of 32 MiB).
    pub fn round_len(self, len: usize, block: usize) -> usize {
        self.piece_len(len, block.max(1)).saturating_mul(self.threads.max(1))
    }
}

/// Reads from `r` until `buf` is full or the input ends; returns how many
/// bytes were read.
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The serialized signature of the first `len` bytes read from `r` (fewer
/// if it ends sooner), read in rounds of whole blocks: the same bytes as
/// [`signature`] of the whole input, with at most [`Split::round_len`] bytes
/// in memory.
pub fn signature_of_reader(r: impl Read, len: u64, block_len: u32) -> io::Result<Vec<u8>> {
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    signature_of_reader_with(r, len, block_len, Split::for_len(len))
}

/// [`signature_of_reader`], split as given.
fn signature_of_reader_with(mut r: impl Read, len: usize, block_len: u32, split: Split) -> io::Result<Vec<u8>> {
    let block = block_len.max(1);
    let round = split.round_len(len, block as usize).min(len).max(1);
    let mut buf = vec![0u8; round];
    let mut out: Vec<u8> = Vec::new();
    let mut left = len;
    loop {
        let want = round.min(left);
        let n = read_full(&mut r, &mut buf[..want])?;
        // The first round gives the header (an empty input too).
        if n == 0 && !out.is_empty() {
            break;
        }
        let part = signature_with(&buf[..n], block, split);
        let body = if out.is_empty() { 0 } else { SIGNATURE_HEADER };
        out.extend_from_slice(part.get(body..).unwrap_or_default());
        left -= n;
        if n < want || left == 0 {
            break;
        }
    }
    Ok(out)
}

/// The serialized signature of `base`.
pub fn signature(base: &[u8], block_len: u32) -> Vec<u8> {
    signature_with(base, block_len, Split::for_len(base.len()))
}

/// [`signature`], split as given. Each block's entry depends on that block
/// alone, so pieces that are whole numbers of blocks are signed on their own
/// and their entries joined: the result is the same bytes.
pub fn signature_with(base: &[u8], block_len: u32, split: Split) -> Vec<u8> {
    let opts = SignatureOptions {
        block_size: block_len.max(1),
        crypto_hash_size: STRONG_LEN,
    };
    if split.threads <= 1 {
        return Signature::calculate(base, opts).into_serialized();
    }
    let piece = split.piece_len(base.len(), opts.block_size as usize);
    let mut out = Vec::new();
    for round in base.chunks(piece * split.threads) {
        let parts: Vec<Vec<u8>> = std::thread::scope(|s| {
            let workers: Vec<_> = round
                .chunks(piece)
                .skip(1)
                .map(|p| s.spawn(move || Signature::calculate(p, opts).into_serialized()))
                .collect();
            let first = Signature::calculate(&round[..piece.min(round.len())], opts).into_serialized();
            std::iter::once(first)
                .chain(
                    workers
                        .into_iter()
                        .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
                )
                .collect()
        });
        for part in parts {
            let body = if out.is_empty() { 0 } else { SIGNATURE_HEADER };
            out.extend_from_slice(part.get(body..).unwrap_or_default());
        }
    }
    out
}

/// Bytes before the first block entry of a serialized signature: magic,
/// block length, strong hash length.
const SIGNATURE_HEADER: usize = 12;

/// The first four bytes of a delta.
const DELTA_MAGIC: [u8; 4] = [0x72, 0x73, 0x02, 0x36];

/// The command that ends a delta.
const DELTA_END: u8 = 0;

/// Writes to `out` the delta that turns the signed file into `data`.
pub fn diff(signature_bytes: &[u8], data: &[u8], out: impl Write) -> Result<(), DeltaError> {
    diff_with(signature_bytes, data, out, Split::for_len(data.len()))
}

/// [`diff`], split as given. Large inputs are cut into pieces of whole blocks,
/// diffed on several threads, and the pieces' commands are joined in order
/// into one delta (a delta's commands carry no position of their own). A
/// match that would straddle two pieces is lost, so each cut costs at most
/// about one block of literal data.
pub fn diff_with(signature_bytes: &[u8], data: &[u8], mut out: impl Write, split: Split) -> Result<(), DeltaError> {
    let (sig, block) = parse_signature(signature_bytes)?;
    let index = sig.index();
    let one = |piece: &[u8], out: &mut dyn Write| {
        fast_rsync::diff(&index, piece, out).map_err(|e| DeltaError::Diff(e.to_string()))
    };
    if split.threads <= 1 {
        return one(data, &mut out);
    }
    let piece = split.piece_len(data.len(), block);
    let io = |e: io::Error| DeltaError::Diff(e.to_string());
    out.write_all(&DELTA_MAGIC).map_err(io)?;
    for round in data.chunks(piece * split.threads) {
        std::thread::scope(|s| {
            let workers: Vec<_> = round
                .chunks(piece)
                .skip(1)
                .map(|p| {
                    s.spawn(move || {
                        let mut buf = Vec::new();
                        one(p, &mut buf).map(|()| buf)
                    })
                })
                .collect();
            // The first piece of each round streams straight out.
            let mut first = Commands::new(&mut out);
            one(&round[..piece.min(round.len())], &mut first)?;
            first.finish()?;
            for w in workers {
                let buf = w
                    .join()
                    .map_err(|_| DeltaError::Diff("a diff thread panicked".into()))??;
                let mut rest = Commands::new(&mut out);
                rest.write_all(&buf).map_err(io)?;
                rest.finish()?;
            }
            Ok::<(), DeltaError>(())
        })?;
    }
    out.write_all(&[DELTA_END]).map_err(io)
}

/// Writes to `out` the delta that turns the signed file into the first `len`
/// bytes read from `r` (fewer if it ends sooner). Inputs larger than one
/// round ([`Split::round_len`]) are read and diffed a round at a time and
/// the rounds' commands joined, so at most one round is held in memory.
pub fn diff_reader(signature_bytes: &[u8], r: impl Read, len: u64, out: impl Write) -> Result<(), DeltaError> {
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    diff_reader_with(signature_bytes, r, len, out, Split::for_len(len))
}

/// [`diff_reader`], split as given.
fn diff_reader_with(
    signature_bytes: &[u8],
    mut r: impl Read,
    len: usize,
    mut out: impl Write,
    split: Split,
) -> Result<(), DeltaError> {
    let (_, block) = parse_signature(signature_bytes)?;
    let round = split.round_len(len, block).min(len).max(1);
    let read_err = |e: io::Error| DeltaError::Diff(format!("cannot read the new content: {e}"));
    let mut buf = vec![0u8; round];
    if len <= round {
        let n = read_full(&mut r, &mut buf[..len]).map_err(read_err)?;
        return diff_with(signature_bytes, &buf[..n], out, split);
    }
    let io = |e: io::Error| DeltaError::Diff(e.to_string());
    out.write_all(&DELTA_MAGIC).map_err(io)?;
    let mut left = len;
    while left > 0 {
        let want = round.min(left);
        let n = read_full(&mut r, &mut buf[..want]).map_err(read_err)?;
        if n == 0 {
            break;
        }
        let mut part = Commands::new(&mut out);
        diff_with(signature_bytes, &buf[..n], &mut part, split)?;
        part.finish()?;
        left -= n;
        if n < want {
            break;
        }
    }
    out.write_all(&[DELTA_END]).map_err(io)
}

/// Passes on the commands of one complete delta: drops its magic and holds
/// back its last byte, which must be the end command.
struct Commands<W> {
    out: W,
    skip: usize,
    held: Option<u8>,
}

impl<W: Write> Commands<W> {
    fn new(out: W) -> Commands<W> {
        Commands {
            out,
            skip: DELTA_MAGIC.len(),
            held: None,
        }
    }

    fn finish(self) -> Result<(), DeltaError> {
        if self.skip != 0 || self.held != Some(DELTA_END) {
            return Err(DeltaError::Diff("a piece's delta is not complete".into()));
        }
        Ok(())
    }
}

impl<W: Write> Write for Commands<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let skip = self.skip.min(buf.len());
        self.skip -= skip;
        let rest = &buf[skip..];
        if let Some((&last, body)) = rest.split_last() {
            if let Some(held) = self.held.replace(last) {
                self.out.write_all(&[held])?;
            }
            self.out.write_all(body)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Whether a delta of `data` against the signed file is likely to save
/// anything. Computing a delta over content that matches nothing costs far
/// more than sending it (the diff rolls byte by byte), so for large inputs
/// three probes (start, middle, end) are diffed first; when every probe comes
/// out almost all literal data, the content was rewritten and goes whole.
pub fn worth_diffing(signature_bytes: &[u8], data: &[u8]) -> Result<bool, DeltaError> {
    worth_diffing_at(signature_bytes, data.len() as u64, |at, buf| {
        let at = usize::try_from(at).map_err(io::Error::other)?;
        let src = data
            .get(at..at + buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    })
}

/// [`worth_diffing`] for an input of `len` bytes that `read_at(offset, buf)`
/// fills in, probe by probe (a file read with `pread`: only the three
/// probes are read). A probe that cannot be read is an error.
pub fn worth_diffing_at(
    signature_bytes: &[u8],
    len: u64,
    mut read_at: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> Result<bool, DeltaError> {
    const PROBE: usize = 256 * 1024;
    if len < 16 * PROBE as u64 {
        return Ok(true);
    }
    let (sig, _) = parse_signature(signature_bytes)?;
    let index = sig.index();
    let mid = len / 2 - PROBE as u64 / 2;
    let mut probe = vec![0u8; PROBE];
    for at in [0, mid, len - PROBE as u64] {
        read_at(at, &mut probe).map_err(|e| DeltaError::Diff(format!("cannot read the new content: {e}")))?;
        let mut out = Vec::with_capacity(PROBE + 1024);
        fast_rsync::diff(&index, &probe, &mut out).map_err(|e| DeltaError::Diff(e.to_string()))?;
        if out.len() < PROBE / 10 * 9 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Parses a signature from the peer, with its block length. fast_rsync
/// trusts the header's block and hash sizes, so they are checked first.
fn parse_signature(signature_bytes: &[u8]) -> Result<(Signature, usize), DeltaError> {
    let field = |at: usize| {
        signature_bytes
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let block = match (field(4), field(8)) {
        (Some(block), Some(strong)) if block > 0 && block <= 1 << 24 && (1..=16).contains(&strong) => block,
        _ => return Err(DeltaError::Signature("bad block or hash size".into())),
    };
    let sig = Signature::deserialize(signature_bytes.to_vec()).map_err(|e| DeltaError::Signature(e.to_string()))?;
    Ok((sig, block as usize))
}

/// Applies `delta` to `base`, writing at most `limit` bytes to `out`.
pub fn apply(base: &[u8], delta: &[u8], out: &mut impl Write, limit: usize) -> Result<(), DeltaError> {
    fast_rsync::apply_limited(base, delta, out, limit).map_err(|e| DeltaError::Apply(e.to_string()))
}

/// Applies `delta` (read from a reader: the frames as they arrive) to the file
/// `base`, writing at most `limit` bytes to `out`. The base is read with
/// positioned reads as the delta's copy commands ask for it, never mapped
/// nor read whole: a base that shrinks meanwhile fails the apply (the
/// result's hash check would refuse it anyway), it cannot harm the process.
/// The same format and checks as [`apply`].
pub fn apply_file(base: &File, mut delta: impl Read, out: &mut impl Write, limit: usize) -> Result<(), DeltaError> {
    let err = |m: String| DeltaError::Apply(m);
    let base_len = base
        .metadata()
        .map_err(|e| err(format!("cannot stat the base: {e}")))?
        .len();
    let mut left = limit as u64;
    let mut magic = [0u8; 4];
    delta
        .read_exact(&mut magic)
        .map_err(|e| err(format!("no delta magic: {e}")))?;
    if magic != DELTA_MAGIC {
        return Err(err(format!("incorrect magic: {}", hex::encode(magic))));
    }
    let mut buf = vec![0u8; 256 * 1024];
    let mut spend = |n: u64, what: &str| -> Result<(), DeltaError> {
        if n > left {
            return Err(err(format!("the {what} of {n} bytes exceeds the announced size")));
        }
        left -= n;
        Ok(())
    };
    loop {
        let mut cmd = [0u8; 1];
        delta
            .read_exact(&mut cmd)
            .map_err(|e| err(format!("unexpected end of the delta reading a command: {e}")))?;
        let cmd = cmd[0];
        match cmd {
            DELTA_END => break,
            OP_LITERAL_1..=OP_LITERAL_N8 => {
                let n = if cmd <= OP_LITERAL_64 {
                    u64::from(cmd - OP_LITERAL_1 + 1)
                } else {
                    read_be(&mut delta, 1 << (cmd - OP_LITERAL_N1), "a literal length")?
                };
                spend(n, "literal")?;
                let mut rest = n;
                while rest > 0 {
                    let k = (buf.len() as u64).min(rest) as usize;
                    delta
                        .read_exact(&mut buf[..k])
                        .map_err(|e| err(format!("unexpected end of the delta reading a literal: {e}")))?;
                    out.write_all(&buf[..k]).map_err(|e| err(e.to_string()))?;
                    rest -= k as u64;
                }
            }
            OP_COPY_N1_N1..=OP_COPY_N8_N8 => {
                let mode = cmd - OP_COPY_N1_N1;
                let offset = read_be(&mut delta, 1 << (mode / 4), "a copy offset")?;
                let len = read_be(&mut delta, 1 << (mode % 4), "a copy length")?;
                if len == 0 {
                    return Err(err("copy length is empty".into()));
                }
                match offset.checked_add(len) {
                    Some(end) if end <= base_len => {}
                    _ => {
                        return Err(err(format!(
                            "requested copy is out of bounds (offset={offset}, len={len}, data_len={base_len})"
                        )))
                    }
                }
                spend(len, "copy")?;
                let (mut at, mut rest) = (offset, len);
                while rest > 0 {
                    let k = (buf.len() as u64).min(rest) as usize;
                    base.read_exact_at(&mut buf[..k], at)
                        .map_err(|e| err(format!("cannot read the base (it changed?): {e}")))?;
                    out.write_all(&buf[..k]).map_err(|e| err(e.to_string()))?;
                    at += k as u64;
                    rest -= k as u64;
                }
            }
            _ => return Err(err(format!("unexpected command byte: 0x{cmd:02x}"))),
        }
    }
    let mut trailing = [0u8; 1];
    match delta.read(&mut trailing) {
        Ok(0) => Ok(()),
        Ok(_) => Err(err("unexpected data after end command".into())),
        Err(e) => Err(err(format!("cannot read the delta: {e}"))),
    }
}

/// Reads a big-endian integer of `width` bytes (1 to 8) from a delta.
fn read_be(delta: &mut impl Read, width: usize, what: &str) -> Result<u64, DeltaError> {
    let mut b = [0u8; 8];
    delta
        .read_exact(&mut b[8 - width.min(8)..])
        .map_err(|e| DeltaError::Apply(format!("unexpected end of the delta reading {what}: {e}")))?;
    Ok(u64::from_be_bytes(b))
}

/// Delta commands (librsync's format, as fast_rsync writes it): literals of
/// 1 to 64 bytes whose length is the command, literals whose length follows
/// in 1, 2, 4 or 8 bytes, and copies whose offset and length follow in 1,
/// 2, 4 or 8 bytes each.
const OP_LITERAL_1: u8 = 0x01;
const OP_LITERAL_64: u8 = 0x40;
const OP_LITERAL_N1: u8 = 0x41;
const OP_LITERAL_N8: u8 = 0x44;
const OP_COPY_N1_N1: u8 = 0x45;
const OP_COPY_N8_N8: u8 = 0x54;

#[cfg(test)]
mod tests;
