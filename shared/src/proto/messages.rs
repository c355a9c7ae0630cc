//! The messages: the hello each side sends first, the requests, the
//! replies, and the replication operations ([`Op`]).

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::status::{JobRun, NodeStatus, UndoEntry};
use crate::compress::Compress;
use crate::manifest::{ContentHash, Entry, Meta};
use crate::state::{HistoryEntry, RoleState};

/// What the dialing side wants from the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Purpose {
    /// The active node pushes replicated state.
    Replicate,
    /// A node or tool asks questions only (checks, status).
    Probe,
    /// An operator's `warmsparectl`: status and role changes.
    Control,
}

/// The first message each side sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`](super::PROTOCOL_VERSION) of the sender.
    pub protocol: u32,
    /// The sender's software version.
    pub version: String,
    /// The sender's node name (or operator name).
    pub node: String,
    /// The sender's epoch.
    pub epoch: u64,
    /// The active node of that epoch, as the sender knows it.
    pub active: String,
    /// The SHA-256 of the sender's canonical cluster file.
    pub config_hash: String,
    /// What the session is for (meaningful from the dialing side).
    pub purpose: Purpose,
    /// Whether this node applies file owners (it runs as root); a sender
    /// compares owners only with a receiver that does.
    pub owners: bool,
    /// The sender's `compress` setting: the dialing side compresses what it
    /// sends when the two settings agree (see [`crate::compress::negotiate`]).
    /// Protocol version 7 added it.
    pub compress: Compress,
}

/// A change the active asks a receiver to make under one watch root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Make sure a directory exists with this metadata.
    Dir {
        /// The watch.
        watch: String,
        /// Relative path.
        path: String,
        /// Metadata to set.
        meta: Meta,
    },
    /// Make `path` a symbolic link to `target` (replacing what is there).
    Symlink {
        /// The watch.
        watch: String,
        /// Relative path.
        path: String,
        /// The link target, stored as is.
        target: String,
        /// Metadata (owner) to set.
        meta: Meta,
    },
    /// The content is already right; set the metadata only.
    SetMeta {
        /// The watch.
        watch: String,
        /// Relative path.
        path: String,
        /// Metadata to set.
        meta: Meta,
    },
    /// Remove `path` (a file, a link, or a directory with all beneath it).
    Remove {
        /// The watch.
        watch: String,
        /// Relative path.
        path: String,
    },
    /// A file's content follows in [`Op::FileData`] frames, then [`Op::FileEnd`].
    FileBegin {
        /// The watch.
        watch: String,
        /// Relative path.
        path: String,
        /// Metadata of the new file.
        meta: Meta,
        /// Size of the new content.
        size: u64,
        /// BLAKE3 of the new content; the receiver checks it before renaming.
        hash: ContentHash,
        /// When set, the data is a fast_rsync delta against the receiver's
        /// current file, whose content hash must be this one.
        delta_base: Option<ContentHash>,
    },
    /// A chunk of the current file's content (or delta).
    FileData(ByteBuf),
    /// The end of the current file.
    FileEnd,
    /// A full comparison of `watch` was applied: the receiver's tree now
    /// holds the agreed content everywhere but at the `except` paths.
    Settled {
        /// The watch.
        watch: String,
        /// Paths whose operations failed.
        except: Vec<String>,
    },
    /// Within the current whole file (not a delta): this many bytes of
    /// zeros, which the receiver leaves as a hole instead of writing them
    /// (a sparse file stays sparse; see `sparse`). Counts toward the
    /// announced size and is hashed as zeros.
    FileHole(u64),
}

/// What the dialing side sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Opens the session.
    Hello(Hello),
    /// Asks for the receiver's manifest of one watch.
    GetManifest {
        /// The watch.
        watch: String,
    },
    /// Asks for the fast_rsync signature of the receiver's copy of a file.
    GetSignature {
        /// Echoed in the reply.
        id: u64,
        /// The watch.
        watch: String,
        /// Relative path.
        path: String,
        /// Signature block length.
        block_len: u32,
    },
    /// A change to apply.
    Op(Op),
    /// Make everything since the last commit durable and visible, then answer.
    Commit {
        /// Echoed in the reply.
        batch: u64,
    },
    /// Keep-alive; answered with [`Reply::Pong`]. In a replication session
    /// the active sends it only when it has nothing pending for the peer:
    /// the peer counts itself caught up once everything before it is
    /// applied (the lag it publishes with `[etcd]`).
    Ping,
    /// Control: answered with [`Reply::Status`].
    Status,
    /// Control, on the active: ship everything pending and compare every
    /// watch with every peer; answered with [`Reply::Flushed`].
    Flush {
        /// How long to wait for the peers to catch up.
        timeout_ms: u64,
    },
    /// Control: compare-and-swap of the role state; answered with
    /// [`Reply::Role`] (the new state) or [`Reply::Refused`].
    SetRole {
        /// The state the controller expects the node to be in.
        expect: RoleState,
        /// The state to move to (a higher epoch).
        next: RoleState,
        /// Why, for the history.
        reason: String,
    },
    /// Control: adopt `state` if its epoch is higher than the node's (fencing).
    Adopt {
        /// The newer role state.
        state: RoleState,
        /// Why, for the history.
        reason: String,
    },
    /// Control: hold replication and jobs.
    Pause,
    /// Control: release what `Pause` held.
    Resume,
    /// Control: compare whole trees now (one watch or all).
    Resync {
        /// The watch, or every watch.
        watch: Option<String>,
        /// Accept the watch root as it is now (create it when missing, and
        /// record its file system) after a root check stopped shipping.
        accept_root: bool,
        /// Let the comparison remove what the deletion guard held.
        allow_deletes: bool,
    },
    /// Control: answered with [`Reply::History`].
    History,
    /// Control: the recorded runs of a job on this node; answered with
    /// [`Reply::JobHistory`].
    JobHistory {
        /// The job.
        name: String,
    },
    /// Control: run a job now (dump on the active, restore on a passive, or
    /// its command); answered with [`Reply::JobDone`].
    RunJob {
        /// The job.
        name: String,
    },
    /// Control: the entries of this node's undo store (one watch or all);
    /// answered with [`Reply::UndoListPart`]s, the last one marked.
    UndoList {
        /// Only this watch.
        watch: Option<String>,
    },
    /// Control: up to [`CHUNK`](super::CHUNK) bytes of the undo entry `id` from `offset`;
    /// answered with [`Reply::UndoChunk`].
    UndoRead {
        /// The entry.
        id: u64,
        /// Where to read from.
        offset: u64,
    },
    /// Control, on the active: put a file back beneath a watch root (its
    /// content follows in [`Request::UndoPutData`], then
    /// [`Request::UndoPutEnd`]); answered with [`Reply::Done`].
    UndoPutBegin {
        /// The entry, as the node that kept it lists it.
        entry: UndoEntry,
        /// Replace a file that is there (it is kept in this node's undo
        /// store first).
        force: bool,
    },
    /// Control: a chunk of the file being put back (at most [`CHUNK`](super::CHUNK)
    /// bytes); answered with [`Reply::Done`].
    UndoPutData(ByteBuf),
    /// Control: the end of the file being put back; answered with
    /// [`Reply::UndoRestored`] once it is in place.
    UndoPutEnd,
    /// The failsafe probe (`[etcd] failsafe`), on a probe session from the
    /// node that holds etcd's leader key to a passive: asks it to promise
    /// not to take the key (see `etcd::failsafe`); answered with
    /// [`Reply::Promise`]. Protocol version 6 added it.
    Failsafe {
        /// The epoch the sender is active at.
        epoch: u64,
        /// The sender's confirmation window, in milliseconds.
        window_ms: u64,
    },
    /// In a replication session whose hellos agreed on compression: a run
    /// of the requests that follow, as the next piece of the session's zstd
    /// stream (see [`crate::compress`]); the receiver expands it to at most
    /// [`MAX_FRAME`](super::MAX_FRAME) bytes of frames, each a 4-byte
    /// big-endian length and a request's encoding, never a hello or another
    /// packed frame. Protocol version 7 added it.
    Packed(ByteBuf),
}

/// What the receiving side answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// Accepts the session.
    Hello(Hello),
    /// Refuses the session or a request; the session ends after it.
    Refused {
        /// Why, in words.
        reason: String,
    },
    /// Part of a manifest.
    ManifestPart {
        /// The watch.
        watch: String,
        /// Entries, in path order.
        entries: Vec<Entry>,
        /// Whether this is the last part.
        last: bool,
    },
    /// Part of a file signature.
    SignaturePart {
        /// The request's id.
        id: u64,
        /// The hash of the file the signature was computed on.
        base: ContentHash,
        /// Serialized signature bytes.
        data: ByteBuf,
        /// Whether this is the last part.
        last: bool,
    },
    /// There is no regular file to sign (the sender should send it whole).
    NoSignature {
        /// The request's id.
        id: u64,
    },
    /// Everything up to a commit is durable and visible.
    Committed {
        /// The commit's batch number.
        batch: u64,
        /// How many operations were applied.
        applied: u64,
        /// Operations that failed, with the reason (the path stays as it was).
        failed: Vec<(String, String)>,
    },
    /// Answer to [`Request::Ping`].
    Pong,
    /// The sender's epoch is older than the receiver's: this is who is active.
    Stale(RoleState),
    /// Answer to [`Request::Status`].
    Status(Box<NodeStatus>),
    /// Answer to [`Request::Flush`].
    Flushed {
        /// Whether every connected peer caught up in time.
        caught_up: bool,
        /// Per peer, what happened.
        detail: Vec<String>,
    },
    /// The role state after a [`Request::SetRole`] or [`Request::Adopt`].
    Role(RoleState),
    /// A control request was carried out.
    Done,
    /// Answer to [`Request::History`].
    History(Vec<HistoryEntry>),
    /// Answer to [`Request::RunJob`].
    JobDone(JobRun),
    /// Answer to [`Request::JobHistory`], oldest first.
    JobHistory(Vec<JobRun>),
    /// Part of the answer to [`Request::UndoList`], oldest first.
    UndoListPart {
        /// Entries.
        entries: Vec<UndoEntry>,
        /// Whether this is the last part.
        last: bool,
    },
    /// Answer to [`Request::UndoRead`].
    UndoChunk {
        /// The entry.
        entry: UndoEntry,
        /// Its bytes from the offset asked for.
        data: ByteBuf,
        /// Whether they reach its end.
        last: bool,
    },
    /// Answer to [`Request::UndoPutEnd`]: the file is back in place.
    UndoRestored {
        /// The undo entry (on this node) that now holds the file that was
        /// replaced, with `force`.
        replaced: Option<u64>,
    },
    /// Answer to [`Request::Failsafe`].
    Promise {
        /// The epoch of the probe answered.
        epoch: u64,
        /// `None`: promised (this node does not take etcd's leader key for
        /// its `ttl` from the probe's arrival); otherwise why not.
        refused: Option<String>,
    },
}
