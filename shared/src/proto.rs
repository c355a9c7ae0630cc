//! Wire types and framing. Every message that crosses the network is defined
//! here and nowhere else.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of one
//! bincode-2 encoded message. Frames over [`MAX_FRAME`] are refused before a
//! byte of their body is read, so a peer cannot make an agent allocate more
//! than that. File content travels in [`Op::FileData`] chunks of at most
//! [`CHUNK`] bytes: never a whole file in one frame.

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::manifest::{ContentHash, Entry, Meta};
use crate::state::{HistoryEntry, RoleState};

/// The protocol version; peers with another one are refused at hello.
pub const PROTOCOL_VERSION: u32 = 5;

/// The SSH subsystem name the agents speak.
pub const SUBSYSTEM: &str = "warmspare";

/// The largest file-data chunk a sender puts in one frame.
pub const CHUNK: usize = 256 * 1024;

/// The hard cap on one frame's body.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

/// The most manifest entries in one [`Reply::ManifestPart`].
pub const MANIFEST_PART: usize = 2048;

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

/// Replication towards one peer, for one watch, as the active sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// The peer.
    pub peer: String,
    /// The watch.
    pub watch: String,
    /// Whether the connection to the peer is up.
    pub connected: bool,
    /// Changed paths not yet acknowledged by the peer (a full comparison
    /// counts as the number of files in the watch).
    pub pending_changes: u64,
    /// Bytes of the pending files, as they are now.
    pub lag_bytes: u64,
    /// Age of the oldest change not yet acknowledged; 0 when caught up.
    pub lag_seconds: f64,
    /// When the peer last acknowledged a complete batch (Unix seconds).
    pub last_success: Option<i64>,
    /// The last error towards this peer, if the link is not healthy.
    pub last_error: Option<String>,
    /// Files the last comparison would have removed on the peer and the
    /// deletion guard held (`max_delete`); 0 when none are held.
    #[serde(default)]
    pub deletions_held: u64,
}

/// One watch on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchStatus {
    /// The watch.
    pub name: String,
    /// Regular files under its root.
    pub files: u64,
    /// Their total size.
    pub bytes: u64,
    /// On a passive: when a batch was last applied (Unix seconds).
    pub last_applied: Option<i64>,
    /// Why the watch root cannot be shipped from (missing, not a directory,
    /// another file system than last seen); nothing ships for the watch
    /// until it is fixed or accepted.
    #[serde(default)]
    pub root_error: Option<String>,
    /// On a receiver: the watch's `after_apply` hook, when it has one.
    #[serde(default)]
    pub after_apply: Option<AfterApplyStatus>,
    /// On a passive: changes made under the root by anything but the
    /// receiver, which the active's version will replace.
    #[serde(default)]
    pub local_changes: LocalChanges,
}

/// A watch's `after_apply` hook on a receiving node, since the agent started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AfterApplyStatus {
    /// Whether a run is under way now.
    pub running: bool,
    /// Whether another run is due once the current one ends (batches
    /// arrived while it ran).
    pub queued: bool,
    /// Runs that succeeded.
    pub runs_ok: u64,
    /// Runs that failed, timed out or could not start.
    pub runs_failed: u64,
    /// The last run that ended.
    pub last: Option<AfterApplyRun>,
}

/// One ended run of an `after_apply` hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AfterApplyRun {
    /// Start, Unix milliseconds.
    pub start_ms: i64,
    /// End, Unix milliseconds.
    pub end_ms: i64,
    /// Whether it succeeded.
    pub ok: bool,
    /// Exit status (or `timed out after ...; killed`) and, for a failure,
    /// the tail of its output.
    pub detail: String,
}

/// Local changes on a passive under one watch: written, removed or
/// chmod'ed by anything but the receiver; the active's next full comparison
/// replaces them (and preserves what it replaces under `diverged/`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalChanges {
    /// Changed paths not yet replaced by the active's version.
    pub pending: u64,
    /// Local changes flagged since the agent started.
    pub total: u64,
    /// The latest ones (at most 20), newest last.
    pub latest: Vec<LocalChange>,
}

/// One local change on a passive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalChange {
    /// The path under the watch root (control characters escaped).
    pub path: String,
    /// `created`, `modified`, `removed` or `metadata`.
    pub change: String,
    /// When it was seen (Unix seconds).
    pub at: i64,
    /// Whether it is still waiting to be replaced.
    pub pending: bool,
}

/// A node's own account of itself, for `warmsparectl status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node.
    pub node: String,
    /// Its software version.
    pub version: String,
    /// Its protocol version.
    pub protocol: u32,
    /// The hash of its cluster file.
    pub config_hash: String,
    /// Its role state.
    pub role: RoleState,
    /// Whether replication and jobs are held.
    pub paused: bool,
    /// Its watches.
    pub watches: Vec<WatchStatus>,
    /// On the active: replication per peer and watch.
    pub links: Vec<LinkStatus>,
    /// Files preserved under `diverged/`, relative to that folder.
    pub diverged: Vec<String>,
    /// When the agent started (Unix seconds).
    pub started: i64,
    /// Its jobs.
    pub jobs: Vec<JobStatus>,
    /// Why this node, though named active, does not act as active: no peer
    /// has confirmed its epoch since it started, or its `on_promote` hook is
    /// running or failed; `None` otherwise.
    #[serde(default)]
    pub held: Option<String>,
    /// The last run of each role hook on this node.
    #[serde(default)]
    pub hooks: Vec<HookRun>,
    /// The undo store: what it holds and its bounds.
    #[serde(default)]
    pub undo: UndoStatus,
}

/// A node's undo store (`state_dir/undo/`) at a glance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndoStatus {
    /// Files kept.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// `undo_max_size`.
    pub max_size: u64,
    /// `undo_max_age`, in seconds.
    pub max_age_s: u64,
    /// Files pruned since the agent started.
    pub pruned: u64,
    /// Files that could not be kept (larger than the store, an error) since
    /// the agent started.
    pub skipped: u64,
}

/// Why a node kept a file in its undo store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UndoWhy {
    /// Replication removed it (a removal, or the removal of a tree).
    Removed,
    /// Replication replaced it (new content, a delta, another type).
    Replaced,
    /// Found in the store with no index entry (the agent stopped between
    /// keeping it and recording it): where it came from is not known.
    Unindexed,
}

impl UndoWhy {
    /// The reason as a word.
    pub fn as_str(self) -> &'static str {
        match self {
            UndoWhy::Removed => "removed",
            UndoWhy::Replaced => "replaced",
            UndoWhy::Unindexed => "unindexed",
        }
    }
}

/// What an undo entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UndoKind {
    /// A regular file.
    File,
    /// A symbolic link (its target is its content).
    Symlink,
}

/// One file kept in a node's undo store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndoEntry {
    /// Its number in the store (the name of its copy there).
    pub id: u64,
    /// The watch it was in (empty when unknown).
    pub watch: String,
    /// Its path relative to the watch root (empty when unknown).
    pub path: String,
    /// When it was kept, Unix seconds.
    pub time: i64,
    /// The epoch of the replication session that removed or replaced it.
    pub epoch: u64,
    /// Its size in bytes (a link: the length of its target).
    pub size: u64,
    /// Why it was kept.
    pub why: UndoWhy,
    /// A file or a link.
    pub kind: UndoKind,
    /// Its BLAKE3 content hash, when it was known.
    pub hash: Option<ContentHash>,
    /// Its mode, owner and modification time.
    pub meta: Meta,
}

/// The start of a refusal that means "the role moved, but this node's
/// `on_promote` hook failed": the node holds the epoch and stays fenced.
pub const PROMOTE_HOOK_FAILED: &str = "on_promote failed";

/// One run of a role hook (`on_promote`, `on_demote`), as recorded under the
/// state dir when it starts and again when it ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookRun {
    /// The hook.
    pub hook: crate::config::Hook,
    /// The epoch the run was for.
    pub epoch: u64,
    /// The previous active node (`WARMSPARE_FROM`).
    pub from: String,
    /// Start, Unix milliseconds.
    pub start_ms: i64,
    /// End, Unix milliseconds; `None` while running or when the run was cut
    /// off (the agent stopped), in which case it runs again at start-up.
    pub end_ms: Option<i64>,
    /// Whether it succeeded (meaningful once it ended).
    pub ok: bool,
    /// Exit status and the tail of its output, or why it failed.
    pub detail: String,
}

/// What a job run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobKind {
    /// A dump on the active.
    Dump,
    /// A restore on a passive.
    Restore,
    /// A plain command.
    Run,
}

/// One run of a job, as recorded in its history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRun {
    /// The job.
    pub job: String,
    /// What ran.
    pub kind: JobKind,
    /// Start, Unix milliseconds.
    pub start_ms: i64,
    /// End, Unix milliseconds.
    pub end_ms: i64,
    /// Whether it succeeded.
    pub ok: bool,
    /// Exit status and the tail of stderr, or why it failed.
    pub detail: String,
    /// Bytes of the dump (dumps and restores).
    pub bytes: u64,
    /// The dump generation (dumps and restores).
    pub generation: u64,
}

/// One job on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    /// The job.
    pub name: String,
    /// The last run on this node.
    pub last: Option<JobRun>,
    /// When it runs next on this node (Unix seconds), if scheduled here.
    pub next: Option<i64>,
    /// Successful runs since the agent started.
    pub runs_ok: u64,
    /// Failed runs since the agent started.
    pub runs_failed: u64,
    /// The newest dump generation this node holds.
    pub generation: u64,
}

/// The first message each side sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
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
    /// Keep-alive; answered with [`Reply::Pong`].
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
    /// Control: up to [`CHUNK`] bytes of the undo entry `id` from `offset`;
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
    /// Control: a chunk of the file being put back (at most [`CHUNK`]
    /// bytes); answered with [`Reply::Done`].
    UndoPutData(ByteBuf),
    /// Control: the end of the file being put back; answered with
    /// [`Reply::UndoRestored`] once it is in place.
    UndoPutEnd,
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
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_long_failures_fit_a_frame_and_ask_for_the_whole_watch() {
        // 4,000 failed ops (a whole commit) with 4 KiB paths: 16 MiB, four
        // times the frame cap, which ended the session and so replication.
        let failed: Vec<(String, String)> = (0..4000)
            .map(|i| {
                (
                    format!("{i}/{}", "p".repeat(4096)),
                    "No space left on device (os error 28)".to_string(),
                )
            })
            .collect();
        assert!(encode(&Reply::Committed {
            batch: 1,
            applied: 0,
            failed: failed.clone()
        })
        .is_err());
        let bounded = bound_failures(failed);
        let reply = Reply::Committed {
            batch: 1,
            applied: 0,
            failed: bounded.clone(),
        };
        assert!(encode(&reply).is_ok());
        let (root, why) = bounded.last().unwrap();
        assert!(root.is_empty() && why.contains("more change(s) failed"), "{why}");
        assert!(bounded.len() > 100);
        // Few failures pass as they are.
        let few = vec![("a".to_string(), "x".to_string())];
        assert_eq!(bound_failures(few.clone()), few);
    }

    #[test]
    fn long_histories_keep_their_newest_entries() {
        let entry = |i: i64| HistoryEntry {
            time: i,
            epoch: i as u64,
            from: "a".into(),
            to: "b".into(),
            reason: "r".repeat(1000),
            by: "operator".into(),
        };
        let all: Vec<HistoryEntry> = (0..10_000).map(entry).collect();
        assert!(encode(&Reply::History(all.clone())).is_err());
        let kept = newest_that_fit(all, |n| HistoryEntry {
            reason: format!("{n} older entries left out"),
            ..entry(0)
        });
        assert!(encode(&Reply::History(kept.clone())).is_ok());
        assert!(kept[0].reason.ends_with("older entries left out"), "{}", kept[0].reason);
        assert_eq!(kept.last().unwrap().time, 9_999);
        let short: Vec<HistoryEntry> = (0..3).map(entry).collect();
        assert_eq!(newest_that_fit(short.clone(), |_| entry(-1)), short);
    }

    #[test]
    fn roundtrip_and_trailing_bytes() {
        let r = Request::GetManifest { watch: "ca".into() };
        let body = encode(&r).unwrap();
        assert_eq!(decode::<Request>(&body).unwrap(), r);
        let mut longer = body.to_vec();
        longer.push(0);
        assert!(decode::<Request>(&longer).is_err());
        assert!(decode::<Request>(&body[..body.len() - 1]).is_err());
    }

    #[tokio::test]
    async fn oversized_frame_is_refused() {
        let (a, b) = tokio::io::duplex(64);
        let mut w = tokio::io::BufWriter::new(a);
        let mut rd = FrameReader::new(b);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = w.write_all(&((MAX_FRAME as u32) + 1).to_be_bytes()).await;
            let _ = w.flush().await;
        });
        assert!(rd.recv::<Request>().await.is_err());
    }

    #[tokio::test]
    async fn frames_cross_a_stream() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut w = FrameWriter::new(a);
        let mut r = FrameReader::new(b);
        let op = Request::Op(Op::FileData(ByteBuf::from(vec![7u8; 1000])));
        w.send(&op).await.unwrap();
        w.send(&Request::Ping).await.unwrap();
        assert_eq!(r.recv::<Request>().await.unwrap(), Some(op));
        assert_eq!(r.recv::<Request>().await.unwrap(), Some(Request::Ping));
        drop(w);
        assert_eq!(r.recv::<Request>().await.unwrap(), None);
    }
}
