//! A delta applied as it arrives: its frames go to a thread that patches
//! the base into the new temporary file while the rest of the delta is
//! still computed and sent, so that writing the result (and starting its
//! write-back) overlaps the sender's diff instead of following it.

use std::fs::File;
use std::io::{self, BufWriter, Read};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::temps::{HashingWriter, Output};
use super::FailReason;
use crate::delta;

/// Frames of a delta that may wait for the patching thread; the receiver's
/// thread waits (for local disk work only) when they are all taken.
const QUEUED_FRAMES: usize = 16;

/// What a finished patch gives back: the patched file, the hash and the
/// length of what was written to it.
pub(super) struct Patched {
    pub(super) file: File,
    pub(super) hasher: blake3::Hasher,
    pub(super) written: u64,
}

/// A delta being applied on a thread of its own, or one that cannot be
/// (its frames are then dropped, and its end reports why).
pub(super) enum Patcher {
    /// The thread, and the way to hand it frames.
    Running {
        /// Closed (dropped) to tell the thread that the delta is complete.
        frames: Option<SyncSender<Vec<u8>>>,
        thread: Option<JoinHandle<Result<Patched, FailReason>>>,
    },
    /// The delta cannot be applied (its base changed, say).
    Failed(FailReason),
}

impl Patcher {
    /// Starts patching `base` into `out` with the delta whose frames are
    /// then given to [`Patcher::feed`], writing at most `limit` bytes.
    pub(super) fn start(base: File, out: File, limit: u64) -> Patcher {
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUED_FRAMES);
        let spawned = std::thread::Builder::new()
            .name("warmspare-patch".into())
            .spawn(move || patch(&base, out, rx, limit));
        match spawned {
            Ok(thread) => Patcher::Running {
                frames: Some(tx),
                thread: Some(thread),
            },
            Err(e) => Patcher::Failed(FailReason::Io(Arc::new(e))),
        }
    }

    /// Hands the thread the next frame of the delta. A thread that has
    /// stopped (a malformed delta, a full disk) takes nothing more, and
    /// says why at [`Patcher::finish`].
    pub(super) fn feed(&mut self, data: &[u8]) {
        if let Patcher::Running { frames, .. } = self {
            // A thread that ended has its outcome collected at the end.
            if frames.as_ref().is_some_and(|tx| tx.send(data.to_vec()).is_err()) {
                *frames = None;
            }
        }
    }

    /// Tells the thread that the delta is complete and waits for its result.
    pub(super) fn finish(mut self) -> Result<Patched, FailReason> {
        match &mut self {
            Patcher::Running { frames, thread } => {
                *frames = None;
                match thread.take().map(JoinHandle::join) {
                    Some(Ok(result)) => result,
                    Some(Err(_)) => Err(FailReason::Io(Arc::new(io::Error::other(
                        "the patching thread panicked",
                    )))),
                    None => Err(FailReason::NoOpenFile),
                }
            }
            Patcher::Failed(why) => Err(why.clone()),
        }
    }
}

impl Drop for Patcher {
    /// An abandoned delta: the thread sees its input end, fails, and is
    /// waited for, so that nothing writes to the temporary file after its
    /// removal.
    fn drop(&mut self) {
        if let Patcher::Running { frames, thread } = self {
            *frames = None;
            if let Some(t) = thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// The thread's work: `base` patched with the delta read from `frames` into
/// `out` (a durable output, which starts write-back as it goes).
fn patch(base: &File, out: File, frames: Receiver<Vec<u8>>, limit: u64) -> Result<Patched, FailReason> {
    let mut hw = HashingWriter {
        inner: BufWriter::with_capacity(256 * 1024, Output::durable(out)),
        hasher: blake3::Hasher::new(),
        written: 0,
    };
    let input = Frames {
        rx: frames,
        current: Vec::new(),
        at: 0,
    };
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    delta::apply_file(base, input, &mut hw, limit).map_err(|e| FailReason::Delta(Arc::new(e)))?;
    let file = hw.inner.into_inner().map_err(|e| e.into_error())?.end()?;
    Ok(Patched {
        file,
        hasher: hw.hasher,
        written: hw.written,
    })
}

/// The delta's frames as one stream; it ends when the sender is dropped.
struct Frames {
    rx: Receiver<Vec<u8>>,
    current: Vec<u8>,
    at: usize,
}

impl Read for Frames {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.current.len() {
            match self.rx.recv() {
                Ok(next) => (self.current, self.at) = (next, 0),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
