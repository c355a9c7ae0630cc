//! Framing: a 4-byte big-endian length, then one bincode-2 message of at
//! most [`MAX_FRAME`] bytes; the bounds that keep a reply's lists within a
//! frame.

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use super::{Request, CHUNK, MAX_FRAME, PROTOCOL_VERSION};

/// A framing or decoding failure.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The transport failed, or a frame was over the cap.
    #[error("transport: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes of a frame are not a valid message.
    #[error("bad frame: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// A message could not be encoded.
    #[error("cannot encode a frame: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// A packed frame could not be made or expanded (see [`crate::compress`]).
    #[error("compressed frame: {0}")]
    Compress(#[from] crate::compress::CompressError),
    /// A packed frame where none may be, or holding what it may not.
    #[error("{0}")]
    Packed(String),
    /// A first frame that does not decode as this version's hello but
    /// starts as a hello of another protocol version (protocol 7 changed
    /// the hello's layout).
    #[error("the peer speaks protocol {0}")]
    OtherProtocol(u32),
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// The most bytes of one reply's list (failures, history) before the rest
/// is left out with a marker: a quarter of [`MAX_FRAME`].
pub const REPLY_LIST_BUDGET: usize = MAX_FRAME / 4;

/// Bounds the failures of a [`Reply::Committed`] so that the reply fits a
/// frame: what does not fit becomes one last entry with the empty path (the
/// watch's root), which the sender takes as "compare the whole watch"
/// (never as a success).
pub fn bound_failures(failed: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut used = 0usize;
    let mut kept = Vec::new();
    let total = failed.len();
    for (path, why) in failed {
        used += path.len() + why.len() + 16;
        if used > REPLY_LIST_BUDGET {
            break;
        }
        kept.push((path, why));
    }
    let left = total - kept.len();
    if left > 0 {
        kept.push((
            String::new(),
            format!("{left} more change(s) failed and were left out of this acknowledgement; the whole watch is compared again"),
        ));
    }
    kept
}

/// Keeps the newest entries of `items` (oldest first) whose encodings fit
/// [`REPLY_LIST_BUDGET`]; when some are left out, `marker(n)` goes first.
pub fn newest_that_fit<T: Serialize>(items: Vec<T>, marker: impl FnOnce(usize) -> T) -> Vec<T> {
    let mut used = 0usize;
    let mut keep_from = items.len();
    for (i, item) in items.iter().enumerate().rev() {
        let n = bincode::serde::encode_to_vec(item, bincode_config()).map_or(MAX_FRAME, |v| v.len());
        if used + n > REPLY_LIST_BUDGET {
            break;
        }
        used += n;
        keep_from = i;
    }
    if keep_from == 0 {
        return items;
    }
    let mut out = Vec::with_capacity(items.len() - keep_from + 1);
    out.push(marker(keep_from));
    out.extend(items.into_iter().skip(keep_from));
    out
}

/// Encodes one message as a frame body.
pub fn encode<T: Serialize>(msg: &T) -> Result<Bytes, FrameError> {
    let v = bincode::serde::encode_to_vec(msg, bincode_config())?;
    if v.len() > MAX_FRAME {
        return Err(FrameError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {} bytes is over the cap of {MAX_FRAME}", v.len()),
        )));
    }
    Ok(Bytes::from(v))
}

/// Decodes one frame body; trailing bytes are an error.
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, FrameError> {
    let (msg, used) = bincode::serde::decode_from_slice(body, bincode_config())?;
    if used != body.len() {
        return Err(FrameError::Decode(bincode::error::DecodeError::OtherString(format!(
            "{} trailing bytes after the message",
            body.len() - used
        ))));
    }
    Ok(msg)
}

/// The protocol version a hello of any version starts with: the variant of
/// `Request::Hello`, then the version (every version keeps both first).
fn hello_protocol(body: &[u8]) -> Option<u32> {
    #[derive(Deserialize)]
    enum Head {
        Hello(u32),
    }
    match bincode::serde::decode_from_slice::<Head, _>(body, bincode_config()) {
        Ok((Head::Hello(p), _)) => Some(p),
        Err(_) => None,
    }
}

/// The reading half of a framed stream.
pub struct FrameReader<R> {
    inner: FramedRead<R, LengthDelimitedCodec>,
    /// An error met while a batch was being gathered, for the next call.
    deferred: Option<FrameError>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a byte stream.
    pub fn new(r: R) -> Self {
        FrameReader {
            inner: FramedRead::new(r, codec()),
            deferred: None,
        }
    }

    /// The next message, or `None` at a clean end of stream.
    pub async fn recv<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<T>, FrameError> {
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        match self.inner.next().await {
            None => Ok(None),
            Some(frame) => {
                let frame: BytesMut = frame?;
                decode(&frame).map(Some)
            }
        }
    }

    /// The first request of a session, which should be a hello; `None` at
    /// a clean end of stream. A frame that does not decode but starts as a
    /// hello of another protocol version is [`FrameError::OtherProtocol`],
    /// so that the peer can be told why it is refused.
    pub async fn recv_hello(&mut self) -> Result<Option<Request>, FrameError> {
        let Some(frame) = self.inner.next().await else {
            return Ok(None);
        };
        let frame: BytesMut = frame?;
        decode(&frame).map(Some).map_err(|e| match hello_protocol(&frame) {
            Some(p) if p != PROTOCOL_VERSION => FrameError::OtherProtocol(p),
            _ => e,
        })
    }

    /// The next messages: waits for one, then takes those already received
    /// after it, up to `max` messages or about `max_bytes` of frames after
    /// the first. Empty at
    /// a clean end of stream. Handing a consumer a batch instead of one
    /// message at a time saves a thread wake-up per message.
    pub async fn recv_batch<T: for<'de> Deserialize<'de>>(
        &mut self,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<T>, FrameError> {
        let Some(first) = self.recv().await? else {
            return Ok(Vec::new());
        };
        let mut batch = vec![first];
        let mut bytes = 0;
        while batch.len() < max && bytes < max_bytes {
            match self.inner.next().now_or_never() {
                Some(Some(frame)) => {
                    // The messages before a bad frame are delivered first, as
                    // one at a time would have delivered them.
                    match frame.map_err(FrameError::from).and_then(|f| {
                        bytes += f.len();
                        decode(&f)
                    }) {
                        Ok(msg) => batch.push(msg),
                        Err(e) => {
                            self.deferred = Some(e);
                            break;
                        }
                    }
                }
                // The end of the stream is seen again by the next call.
                Some(None) | None => break,
            }
        }
        Ok(batch)
    }
}

/// The writing half of a framed stream.
pub struct FrameWriter<W> {
    inner: FramedWrite<W, LengthDelimitedCodec>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Wraps a byte stream.
    pub fn new(w: W) -> Self {
        let mut inner = FramedWrite::new(w, codec());
        // Queued frames are written out in one go once this much is buffered
        // (the default, 8 KiB, means a write, and an SSH packet, every few
        // small files).
        inner.set_backpressure_boundary(CHUNK);
        FrameWriter { inner }
    }

    /// Sends one message and flushes.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        self.inner.send(encode(msg)?).await?;
        Ok(())
    }

    /// Queues an already-encoded frame body without flushing.
    pub async fn feed(&mut self, body: Bytes) -> Result<(), FrameError> {
        self.inner.feed(body).await?;
        Ok(())
    }

    /// Flushes queued frames.
    pub async fn flush(&mut self) -> Result<(), FrameError> {
        SinkExt::<Bytes>::flush(&mut self.inner).await?;
        Ok(())
    }

    /// Closes the stream (sends EOF).
    pub async fn close(&mut self) -> Result<(), FrameError> {
        SinkExt::<Bytes>::close(&mut self.inner).await?;
        Ok(())
    }
}
