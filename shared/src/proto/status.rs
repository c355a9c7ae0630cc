//! What a node reports about itself: links, watches, the undo store, hooks
//! and jobs, carried by `Reply::Status` and in part served by `/_status`.

use serde::{Deserialize, Serialize};

use crate::manifest::{ContentHash, Meta};
use crate::state::RoleState;

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
    /// Whether the session to the peer compresses what it sends (the last
    /// session's, while none is up).
    #[serde(default)]
    pub compressed: bool,
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
