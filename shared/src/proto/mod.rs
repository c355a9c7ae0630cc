//! Wire types and framing. Every message that crosses the network is defined
//! here and nowhere else.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of one
//! bincode-2 encoded message. Frames over [`MAX_FRAME`] are refused before a
//! byte of their body is read, so a peer cannot make an agent allocate more
//! than that. File content travels in [`Op::FileData`] chunks of at most
//! [`CHUNK`] bytes: never a whole file in one frame.
//!
//! The messages are in `messages`, what a node reports about itself in
//! `status`, the framing in `frame`, the packed (compressed) frames in
//! `packed`; all of them are used from here.

mod frame;
mod messages;
mod packed;
mod status;
#[cfg(test)]
mod tests;

pub use frame::{
    bound_failures, decode, encode, newest_that_fit, FrameError, FrameReader, FrameWriter, REPLY_LIST_BUDGET,
};
pub use messages::{Hello, Op, Purpose, Reply, Request};
pub use packed::{expand, pack, PACK_MAX};
pub use status::{
    AfterApplyRun, AfterApplyStatus, HookRun, JobKind, JobRun, JobStatus, LinkStatus, LocalChange, LocalChanges,
    NodeStatus, UndoEntry, UndoKind, UndoStatus, UndoWhy, WatchStatus, PROMOTE_HOOK_FAILED,
};

/// The protocol version; peers with another one are refused at hello.
pub const PROTOCOL_VERSION: u32 = 7;

/// The SSH subsystem name the agents speak.
pub const SUBSYSTEM: &str = "warmspare";

/// The largest file-data chunk a sender puts in one frame.
pub const CHUNK: usize = 256 * 1024;

/// The hard cap on one frame's body.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

/// The most manifest entries in one [`Reply::ManifestPart`].
pub const MANIFEST_PART: usize = 2048;
