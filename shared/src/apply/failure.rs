//! Why a change was not made: the failures a commit reports. A failure
//! leaves its path as it was; it never ends the session (that is
//! [`Refused`](super::Refused)).

use std::io;
use std::sync::Arc;

use crate::delta::DeltaError;
use crate::manifest::ContentHash;
use crate::undo::NotKept;

/// A change the receiver could not make; its path was left as it was.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The path in its watch.
    pub path: String,
    /// Why the change was not made.
    pub why: FailReason,
}

impl Failure {
    /// The failure of the change to `path`, for `why`.
    pub fn new(path: impl Into<String>, why: impl Into<FailReason>) -> Failure {
        Failure {
            path: path.into(),
            why: why.into(),
        }
    }

    /// The failure as [`Reply::Committed`](crate::proto::Reply::Committed)
    /// carries it: the path and the text of the reason.
    pub fn into_wire(self) -> (String, String) {
        (self.path, self.why.to_string())
    }
}

/// Why a change was not made. The text of each reason is what the sender
/// sees in its acknowledgement and logs.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FailReason {
    /// The path is excluded on this node.
    #[error("excluded on the receiver")]
    Excluded,
    /// A system call failed (a full disk, a permission, a path in the way).
    #[error(transparent)]
    Io(Arc<io::Error>),
    /// A file did not have the size it was announced with.
    #[error("got {got} bytes, {announced} were announced")]
    Size {
        /// The bytes received.
        got: u64,
        /// The size announced.
        announced: u64,
    },
    /// A file did not have the content hash it was announced with.
    #[error("content hash mismatch: got {got}, announced {announced}")]
    Hash {
        /// The hash of what was received.
        got: ContentHash,
        /// The hash announced.
        announced: ContentHash,
    },
    /// The base of a delta (the receiver's copy) cannot be opened.
    #[error("cannot open the delta base: {0}")]
    DeltaBaseUnreadable(#[source] Arc<io::Error>),
    /// The base of a delta is not a regular file.
    #[error("the delta base is not a regular file")]
    DeltaBaseNotFile,
    /// The base of a delta is not the content the delta was made against.
    #[error("the delta base changed on the receiver")]
    DeltaBaseChanged,
    /// A delta arrived for a file staged without a named temporary file.
    #[error("no temporary file for a delta")]
    NoTempForDelta,
    /// A file ended that had no open output.
    #[error("no open file")]
    NoOpenFile,
    /// The file's watch is not one of this applier's.
    #[error("unknown watch")]
    UnknownWatch,
    /// The delta could not be applied.
    #[error(transparent)]
    Delta(Arc<DeltaError>),
    /// The staged content could not be made durable before its commit.
    #[error("cannot make the data durable: {0}")]
    NotDurable(#[source] Arc<io::Error>),
    /// The local version, which differs from what the peers agreed on,
    /// could not be moved aside, so it was not replaced.
    #[error("cannot preserve the local version: {0}")]
    NotPreserved(#[source] Arc<io::Error>),
    /// The undo store could not keep a copy of the file the change would
    /// remove or replace (`undo_when_full = "refuse"`): it was left as it
    /// was. The error is a [`NotKept`] (see [`NotKept::of_io`]).
    #[error("{0}")]
    NotKept(Arc<io::Error>),
    /// A file kept in memory was not written before its commit.
    #[error("not written")]
    NotWritten,
}

impl FailReason {
    /// The failure to preserve what a file would replace: a refusal of the
    /// undo store, or a divergence that could not be moved aside.
    pub fn not_preserved(e: io::Error) -> FailReason {
        FailReason::unless_not_kept(e, FailReason::NotPreserved)
    }

    /// [`FailReason::NotKept`] when `e` is the undo store's refusal, else
    /// `other` of it.
    fn unless_not_kept(e: io::Error, other: fn(Arc<io::Error>) -> FailReason) -> FailReason {
        if NotKept::of_io(&e).is_some() {
            FailReason::NotKept(Arc::new(e))
        } else {
            other(Arc::new(e))
        }
    }
}

impl From<io::Error> for FailReason {
    fn from(e: io::Error) -> FailReason {
        FailReason::unless_not_kept(e, FailReason::Io)
    }
}

impl From<DeltaError> for FailReason {
    fn from(e: DeltaError) -> FailReason {
        FailReason::Delta(Arc::new(e))
    }
}
