//! Packed frames ([`Request::Packed`]): a run of requests through the
//! session's zstd stream on the sender ([`pack`]), and expanded back into
//! requests on the receiver ([`expand`]), within [`MAX_FRAME`].

use bytes::Bytes;
use serde_bytes::ByteBuf;

use super::frame::{decode, encode, FrameError};
use super::{Request, MAX_FRAME};
use crate::compress::{Packer, Unpacker};

/// The most bytes of frames (lengths included) the sender puts in one
/// packed frame: half of what a receiver accepts. A larger frame is sent as
/// it is.
pub const PACK_MAX: usize = MAX_FRAME / 2;

/// Encodes frame bodies (requests) as one [`Request::Packed`] frame body;
/// at most [`PACK_MAX`] bytes of them, lengths included.
pub fn pack(packer: &mut Packer, frames: &[Bytes]) -> Result<Bytes, FrameError> {
    let data = packer.pack(frames)?;
    encode(&Request::Packed(ByteBuf::from(data)))
}

/// Replaces each [`Request::Packed`] of `batch` with the requests it holds.
/// A packed frame when the session did not agree on compression (`None`),
/// one that expands beyond [`MAX_FRAME`], or one that holds a hello or
/// another packed frame is an error (the session ends).
pub fn expand(unpacker: Option<&mut Unpacker>, batch: Vec<Request>) -> Result<Vec<Request>, FrameError> {
    if !batch.iter().any(|r| matches!(r, Request::Packed(_))) {
        return Ok(batch);
    }
    let Some(unpacker) = unpacker else {
        return Err(FrameError::Packed(
            "a compressed frame in a session that did not agree on compression".into(),
        ));
    };
    let mut out = Vec::with_capacity(batch.len());
    for r in batch {
        let Request::Packed(data) = r else {
            out.push(r);
            continue;
        };
        for body in unpacker.unpack(&data, MAX_FRAME)? {
            match decode::<Request>(&body)? {
                Request::Packed(_) | Request::Hello(_) => {
                    return Err(FrameError::Packed(
                        "a compressed frame holds a hello or another compressed frame".into(),
                    ))
                }
                inner => out.push(inner),
            }
        }
    }
    Ok(out)
}
