//! Per-link compression of the replication stream: the `compress` setting
//! and how two nodes' settings combine ([`negotiate`]), the probe that keeps
//! already-compressed content out of the compressor ([`worth_compressing`]),
//! and the two ends of the stream ([`Packer`] on the sender, [`Unpacker`] on
//! the receiver).
//!
//! A session that compresses keeps one zstd stream for its whole life: each
//! [`Packer::pack`] feeds a run of frame bodies (each as a 4-byte
//! big-endian length and the body) into it and flushes, so what it returns
//! decodes completely on arrival while the window (the history) carries over
//! from one run to the next. Many small files that look alike (PEM
//! certificates) compress together, which a context per frame would lose.
//!
//! The receiver bounds what one packed frame may expand to (a caller's
//! limit, [`MAX_FRAME`](crate::proto::MAX_FRAME) in the agent) and the window
//! the peer may ask for ([`WINDOW_LOG`]): a small hostile frame that would
//! expand beyond either is an error for that session, never an allocation.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use zstd::zstd_safe::{self, CCtx, CParameter, DCtx, DParameter, InBuffer, OutBuffer};

/// The `compress` setting of a node (`[cluster]` default, `[[node]]`
/// override): whether the replication stream it takes part in is
/// compressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compress {
    /// Compressed on a link that does not stay on this machine (the peer's
    /// address is not a loopback one), not on a loopback link.
    #[default]
    Auto,
    /// Compressed on every link, unless the other side says never.
    Always,
    /// Never compressed, whatever the other side says.
    Never,
}

impl Compress {
    /// The value as the cluster file spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Compress::Auto => "auto",
            Compress::Always => "always",
            Compress::Never => "never",
        }
    }

    /// Parses the cluster file's spelling.
    pub fn parse(text: &str) -> Option<Compress> {
        match text {
            "auto" => Some(Compress::Auto),
            "always" => Some(Compress::Always),
            "never" => Some(Compress::Never),
            _ => None,
        }
    }

    /// Whether this is the default (`auto`).
    pub fn is_default(&self) -> bool {
        *self == Compress::default()
    }
}

impl fmt::Display for Compress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the sender compresses a session, from its own setting, the
/// receiver's (from its hello) and whether the link is a loopback one (as
/// the sender dialed it): `never` on either side wins, then `always` on
/// either side, and two `auto` compress exactly when the link is not
/// loopback.
pub fn negotiate(sender: Compress, receiver: Compress, loopback: bool) -> bool {
    match (sender, receiver) {
        (Compress::Never, _) | (_, Compress::Never) => false,
        (Compress::Always, _) | (_, Compress::Always) => true,
        (Compress::Auto, Compress::Auto) => !loopback,
    }
}

/// Whether a receiver accepts packed frames in a session: not when either
/// side says `never` (the sender then has no business sending them).
pub fn accepted(receiver: Compress, sender: Compress) -> bool {
    receiver != Compress::Never && sender != Compress::Never
}

/// The zstd level of the stream: fast (see docs/benchmarks.md, scenario 6).
pub const LEVEL: i32 = 1;

/// The base-2 log of the stream's window (4 MiB), which is also the largest
/// window a receiver accepts: a peer that declares a larger one is refused
/// before any memory is taken for it.
pub const WINDOW_LOG: u32 = 22;

/// How much of a file the probe looks at.
pub const SAMPLE: usize = 32 * 1024;

/// The smallest sample the probe compresses to measure; smaller files are
/// judged by their first bytes alone (a lone certificate compresses poorly
/// but well in the stream's history).
const SAMPLE_MIN: usize = 4096;

/// The first bytes of formats that are compressed already: gzip, zstd, xz,
/// bzip2, zip (and jar, docx...), 7z, lz4, PNG, JPEG, GIF, WebP's RIFF.
const MAGIC: &[&[u8]] = &[
    b"\x1f\x8b",
    b"\x28\xb5\x2f\xfd",
    b"\xfd7zXZ\x00",
    b"BZh",
    b"PK\x03\x04",
    b"7z\xbc\xaf\x27\x1c",
    b"\x04\x22\x4d\x18",
    b"\x89PNG",
    b"\xff\xd8\xff",
    b"GIF8",
    b"RIFF",
];

/// The probe: whether a file whose first bytes are `sample` (up to
/// [`SAMPLE`] of them) is worth compressing. A known compressed format is
/// not; a sample of [`SAMPLE_MIN`] bytes or more is compressed alone at
/// level 1 and must shrink by at least a sixteenth; a smaller one is.
pub fn worth_compressing(sample: &[u8]) -> bool {
    if MAGIC.iter().any(|m| sample.starts_with(m)) {
        return false;
    }
    if sample.len() < SAMPLE_MIN {
        return true;
    }
    let sample = &sample[..sample.len().min(SAMPLE)];
    match zstd::bulk::compress(sample, 1) {
        Ok(out) => out.len() < sample.len() - sample.len() / 16,
        Err(_) => false,
    }
}

/// A compression failure, or a packed frame the receiver refuses.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    /// zstd reported an error (a corrupt stream, a window over the bound).
    #[error("zstd: {0}")]
    Zstd(&'static str),
    /// The frame expands beyond what one packed frame may hold.
    #[error("a compressed frame expands beyond {limit} bytes")]
    TooLarge {
        /// The bound it went over.
        limit: usize,
    },
    /// The expanded bytes end inside a frame (a length or a body).
    #[error("a compressed frame ends inside a frame it holds")]
    Truncated,
}

fn zstd_error(code: usize) -> CompressError {
    CompressError::Zstd(zstd_safe::get_error_name(code))
}

/// The sending end of a session's compressed stream.
pub struct Packer {
    cctx: CCtx<'static>,
}

impl Packer {
    /// A new stream at [`LEVEL`] with a window of [`WINDOW_LOG`].
    pub fn new() -> Result<Packer, CompressError> {
        let mut cctx = CCtx::try_create().ok_or(CompressError::Zstd("cannot allocate a compression context"))?;
        cctx.set_parameter(CParameter::CompressionLevel(LEVEL))
            .map_err(zstd_error)?;
        cctx.set_parameter(CParameter::WindowLog(WINDOW_LOG))
            .map_err(zstd_error)?;
        Ok(Packer { cctx })
    }

    /// Feeds `frames` (frame bodies) into the stream and flushes it: the
    /// bytes returned, sent as one packed frame, expand on the receiver to
    /// exactly these frames.
    pub fn pack(&mut self, frames: &[Bytes]) -> Result<Vec<u8>, CompressError> {
        let raw: usize = frames.iter().map(|f| f.len() + 4).sum();
        let mut out = Vec::with_capacity(zstd_safe::compress_bound(raw) + 64);
        for frame in frames {
            let len = u32::try_from(frame.len()).map_err(|_| CompressError::TooLarge {
                limit: u32::MAX as usize,
            })?;
            self.feed(&len.to_be_bytes(), &mut out)?;
            self.feed(frame, &mut out)?;
        }
        loop {
            out.reserve(64 * 1024);
            let pos = out.len();
            let mut output = OutBuffer::around_pos(&mut out, pos);
            let left = self
                .cctx
                .compress_stream2(
                    &mut output,
                    &mut InBuffer::around(&[]),
                    zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_flush,
                )
                .map_err(zstd_error)?;
            if left == 0 {
                return Ok(out);
            }
        }
    }

    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), CompressError> {
        let mut input = InBuffer::around(data);
        while input.pos() < data.len() {
            if out.capacity() - out.len() < 64 * 1024 {
                out.reserve(64 * 1024);
            }
            let pos = out.len();
            let mut output = OutBuffer::around_pos(out, pos);
            self.cctx
                .compress_stream2(
                    &mut output,
                    &mut input,
                    zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_continue,
                )
                .map_err(zstd_error)?;
        }
        Ok(())
    }
}

/// The receiving end of a session's compressed stream.
pub struct Unpacker {
    dctx: DCtx<'static>,
}

/// How much the receiver's output grows at a time while it expands a frame.
const GROW: usize = 128 * 1024;

impl Unpacker {
    /// A new stream that accepts windows of at most [`WINDOW_LOG`].
    pub fn new() -> Result<Unpacker, CompressError> {
        let mut dctx = DCtx::try_create().ok_or(CompressError::Zstd("cannot allocate a decompression context"))?;
        dctx.set_parameter(DParameter::WindowLogMax(WINDOW_LOG))
            .map_err(zstd_error)?;
        Ok(Unpacker { dctx })
    }

    /// Expands one packed frame into the frame bodies it holds; more than
    /// `limit` bytes expanded is an error (the memory taken stays within
    /// `limit` and one step of growth).
    pub fn unpack(&mut self, packed: &[u8], limit: usize) -> Result<Vec<Bytes>, CompressError> {
        let mut out: Vec<u8> = Vec::new();
        let mut input = InBuffer::around(packed);
        loop {
            if out.len() > limit {
                return Err(CompressError::TooLarge { limit });
            }
            out.reserve_exact(GROW.min(limit + 1 - out.len()));
            let pos = out.len();
            let room = out.capacity() - pos;
            let mut output = OutBuffer::around_pos(&mut out, pos);
            self.dctx
                .decompress_stream(&mut output, &mut input)
                .map_err(zstd_error)?;
            let wrote = output.pos() - pos;
            // Everything the frame holds is out once its input is used up
            // and the output was not filled (the sender flushed).
            if input.pos() == packed.len() && wrote < room {
                break;
            }
        }
        if out.len() > limit {
            return Err(CompressError::TooLarge { limit });
        }
        split(Bytes::from(out))
    }
}

/// Splits expanded bytes into the frame bodies they hold.
fn split(mut all: Bytes) -> Result<Vec<Bytes>, CompressError> {
    let mut frames = Vec::new();
    while !all.is_empty() {
        let head: [u8; 4] = all
            .get(..4)
            .and_then(|h| h.try_into().ok())
            .ok_or(CompressError::Truncated)?;
        let len = u32::from_be_bytes(head) as usize;
        if all.len() - 4 < len {
            return Err(CompressError::Truncated);
        }
        frames.push(all.slice(4..4 + len));
        all = all.slice(4 + len..);
    }
    Ok(frames)
}

#[cfg(test)]
mod tests;
