//! The cluster file: parsing, validation and the canonical form.
//!
//! One TOML file is identical on every node. Parsing rejects unknown keys and
//! bad values with the key, the line and the column; validation checks the
//! cross-references (the preferred active names a node, names are unique,
//! paths are absolute, globs and cron expressions parse, addresses parse).
//! The canonical form (what `config show` prints) is a re-serialisation of
//! the validated structure, so two files that differ only in layout or
//! comments hash the same.
//!
//! The file is read into its raw, spanned form (`raw`), checked one section
//! at a time (`validate`), and every problem is a located [`ConfigError`]
//! (`error`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::compress::Compress;
use crate::keys::PublicKey;

mod error;
mod etcd;
mod raw;
#[cfg(test)]
mod tests;
mod validate;

pub use error::ConfigError;
use error::{key_on_line, line_col, Locator};
pub use etcd::{
    Endpoint, Etcd, DEFAULT_ETCD_LOOP_WAIT, DEFAULT_ETCD_RETRY_TIMEOUT, DEFAULT_ETCD_TTL, DEFAULT_MAX_LAG_ON_FAILOVER,
};
use raw::RawFile;

/// The default location of the cluster file.
pub const DEFAULT_CLUSTER_PATH: &str = "/etc/warmspare/cluster.toml";

/// The validated cluster file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cluster {
    /// The `[cluster]` table.
    pub cluster: ClusterSection,
    /// The `[etcd]` table: when present, the role lives in etcd and
    /// failover is automatic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd: Option<Etcd>,
    /// Every `[[node]]`, in file order.
    pub node: Vec<Node>,
    /// Every `[[operator]]`, in file order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub operator: Vec<Operator>,
    /// Every `[[watch]]`, in file order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub watch: Vec<Watch>,
    /// Every `[[job]]`, in file order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub job: Vec<Job>,
}

/// The `[cluster]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterSection {
    /// The cluster's name, shown in status and logs.
    pub name: String,
    /// The node that is active at epoch 1 and where `failback` returns.
    pub preferred_active: String,
    /// Where each agent keeps its state (role, epoch, caches, dumps).
    pub state_dir: PathBuf,
    /// This node's ed25519 private key.
    pub key_file: PathBuf,
    /// A shell command run on a node being promoted, before it acts as active.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_promote: Option<String>,
    /// A shell command run on a node once its active side has stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_demote: Option<String>,
    /// How long one run of a role hook may take.
    #[serde(
        serialize_with = "serialize_duration",
        skip_serializing_if = "is_default_hook_timeout"
    )]
    pub hook_timeout: Duration,
    /// The most bytes kept under `diverged/`; older folders are pruned first.
    #[serde(skip_serializing_if = "is_default_diverged_size", serialize_with = "serialize_size")]
    pub diverged_max_size: u64,
    /// How long a folder under `diverged/` is kept after its last preserved file.
    #[serde(
        skip_serializing_if = "is_default_diverged_age",
        serialize_with = "serialize_duration"
    )]
    pub diverged_max_age: Duration,
    /// The most bytes a node keeps under `undo/` (files replication removed
    /// or replaced there); the oldest are pruned first.
    #[serde(skip_serializing_if = "is_default_undo_size", serialize_with = "serialize_size")]
    pub undo_max_size: u64,
    /// How long a file is kept under `undo/`.
    #[serde(skip_serializing_if = "is_default_undo_age", serialize_with = "serialize_duration")]
    pub undo_max_age: Duration,
    /// What the receiver does with a file it would remove or replace when
    /// no copy of it can be kept under `undo/`.
    #[serde(skip_serializing_if = "UndoWhenFull::is_default")]
    pub undo_when_full: UndoWhenFull,
    /// Whether replication streams are compressed, for every node without a
    /// `compress` of its own (see [`crate::compress::negotiate`]).
    #[serde(skip_serializing_if = "Compress::is_default")]
    pub compress: Compress,
}

/// `undo_when_full`: what a receiver does with a file it is about to remove
/// or replace when the undo store cannot keep a copy of it (the file is
/// larger than `undo_max_size`, or keeping it failed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UndoWhenFull {
    /// The change is not made: the file stays as it is, and the change
    /// fails (and is retried) like any change the receiver cannot apply.
    #[default]
    Refuse,
    /// The change is made without a copy (logged and counted).
    Replace,
}

impl UndoWhenFull {
    /// The value as the cluster file spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            UndoWhenFull::Refuse => "refuse",
            UndoWhenFull::Replace => "replace",
        }
    }

    fn is_default(&self) -> bool {
        *self == UndoWhenFull::default()
    }
}

/// The default of `undo_max_size`: 1 GiB.
pub const DEFAULT_UNDO_MAX_SIZE: u64 = 1 << 30;
/// The default of `undo_max_age`: 7 days.
pub const DEFAULT_UNDO_MAX_AGE: Duration = Duration::from_secs(7 * 86_400);

fn is_default_undo_size(v: &u64) -> bool {
    *v == DEFAULT_UNDO_MAX_SIZE
}

fn is_default_undo_age(v: &Duration) -> bool {
    *v == DEFAULT_UNDO_MAX_AGE
}

/// The default of `diverged_max_size`: 1 GiB.
pub const DEFAULT_DIVERGED_MAX_SIZE: u64 = 1 << 30;
/// The default of `diverged_max_age`: 30 days.
pub const DEFAULT_DIVERGED_MAX_AGE: Duration = Duration::from_secs(30 * 86_400);

fn is_default_diverged_size(v: &u64) -> bool {
    *v == DEFAULT_DIVERGED_MAX_SIZE
}

fn is_default_diverged_age(v: &Duration) -> bool {
    *v == DEFAULT_DIVERGED_MAX_AGE
}

/// Sizes in the canonical form: a whole number of bytes.
fn serialize_size<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v}B"))
}

/// Parses a size such as `1GiB`, `500MB`, `64 KiB` or `1048576` (bytes).
/// Decimal units (`KB`, `MB`, `GB`, `TB`) are powers of 1000, binary ones
/// (`KiB`, `MiB`, `GiB`, `TiB`, and the one-letter `K`, `M`, `G`, `T`)
/// powers of 1024.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn is_default_hook_timeout(d: &Duration) -> bool {
    *d == DEFAULT_HOOK_TIMEOUT
}

fn is_default_after_apply_timeout(d: &Duration) -> bool {
    *d == DEFAULT_AFTER_APPLY_TIMEOUT
}

/// One `[[node]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    /// The node's name; `--node` selects it.
    pub name: String,
    /// The agent's SSH endpoint, `host:port`: peers and operators dial it.
    pub ssh: String,
    /// The address the agent's SSH server binds; none means every IPv4
    /// address on the port of `ssh` (see [`Node::listen_addr`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// The health and metrics listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<SocketAddr>,
    /// The node's pinned public key (`ssh-ed25519 ...`).
    pub public_key: String,
    /// A prefix for every local path of this node (labs, tests, containers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// Extra environment for this node's job and hook commands.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// This node's own `on_promote` (instead of the `[cluster]` one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_promote: Option<String>,
    /// This node's own `on_demote` (instead of the `[cluster]` one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_demote: Option<String>,
    /// Whether this node may be promoted automatically (with `[etcd]`);
    /// `failover = false` leaves it to an operator.
    #[serde(skip_serializing_if = "is_true")]
    pub failover: bool,
    /// This node's own `compress` (instead of the `[cluster]` one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compress: Option<Compress>,
}

fn is_true(v: &bool) -> bool {
    *v
}

/// One `[[operator]]`: a key allowed to run `warmsparectl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Operator {
    /// The operator's name, recorded in history.
    pub name: String,
    /// The operator's public key (`ssh-ed25519 ...`).
    pub public_key: String,
}

/// One `[[watch]]`: a directory replicated from the active to the passives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Watch {
    /// The watch's name, used on the wire and in status.
    pub name: String,
    /// The watched directory (absolute; prefixed by a node's `root`).
    pub path: PathBuf,
    /// Gitignore-style globs relative to `path`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// Zero (the default): a complete change (a close after writing, a
    /// rename into place) ships at once, and what arrives while a batch is
    /// in flight ships as the next batch. More: every change waits until
    /// the watch has been quiet this long (for writers that close files
    /// before they are whole).
    pub debounce_ms: u64,
    /// A shell command run on the receiver after applied batches (one run
    /// at a time per watch, off the acknowledgement path).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_apply: Option<String>,
    /// How long one run of `after_apply` may take before its process group
    /// is killed.
    #[serde(
        serialize_with = "serialize_duration",
        skip_serializing_if = "is_default_after_apply_timeout"
    )]
    pub after_apply_timeout: Duration,
    /// The deletion guard: the most of a peer's files one comparison may
    /// remove before its removals are held for an operator.
    #[serde(skip_serializing_if = "DeleteLimit::is_default")]
    pub max_delete: DeleteLimit,
}

/// A watch's `max_delete`: how much of a peer's copy one comparison may
/// remove before the removals are held (see docs/operations.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteLimit {
    /// `"N%"`: more than this share of the peer's files (and at least
    /// [`DeleteLimit::MIN_HELD`] files) is held.
    Share(u8),
    /// `N`: more than this many files is held.
    Count(u64),
}

impl DeleteLimit {
    /// The default: half of the peer's files.
    pub const DEFAULT: DeleteLimit = DeleteLimit::Share(50);
    /// Removals of fewer files than this are never held by a share.
    pub const MIN_HELD: u64 = 10;

    /// Whether removing `removed` of the `peer_files` files a peer holds
    /// must wait for an operator.
    pub fn holds(&self, removed: u64, peer_files: u64) -> bool {
        match *self {
            DeleteLimit::Share(p) => {
                removed >= Self::MIN_HELD && u128::from(removed) * 100 > u128::from(p) * u128::from(peer_files)
            }
            DeleteLimit::Count(n) => removed > n,
        }
    }

    fn is_default(&self) -> bool {
        *self == Self::DEFAULT
    }

    pub(crate) fn parse(text: &str) -> Result<DeleteLimit, String> {
        let t = text.trim();
        let bad = || format!("{text:?} is not a share (\"50%\") or a number of files (\"200\")");
        if let Some(p) = t.strip_suffix('%') {
            let p: u8 = p.trim().parse().map_err(|_| bad())?;
            if p > 100 {
                return Err(format!("{text:?}: a share is at most 100%"));
            }
            Ok(DeleteLimit::Share(p))
        } else {
            t.parse().map(DeleteLimit::Count).map_err(|_| bad())
        }
    }
}

impl Default for DeleteLimit {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for DeleteLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeleteLimit::Share(p) => write!(f, "{p}%"),
            DeleteLimit::Count(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for DeleteLimit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// Where a `run` job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunOn {
    /// Only on the active node.
    Active,
    /// Only on passive nodes.
    Passive,
    /// On every node.
    All,
}

/// One `[[job]]`: a scheduled dump and restore, or a plain command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Job {
    /// The job's name.
    pub name: String,
    /// When the job runs (cron with a seconds field); none means on demand only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// The dump command, run on the active.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dump: Option<String>,
    /// The restore command, run on each passive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<String>,
    /// A command with no dump (for example a code deploy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// Where a `run` command runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on: Option<RunOn>,
    /// Restore on this schedule instead of on arrival.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_schedule: Option<String>,
    /// Dump generations kept on each side.
    pub keep: u32,
    /// How long one run may take.
    #[serde(serialize_with = "serialize_duration")]
    pub timeout: Duration,
}

impl Job {
    /// How long one run may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// Durations in the canonical form read as they are written: "15m".
fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// The default number of dump generations kept.
pub const DEFAULT_KEEP: u32 = 24;
/// The default time limit of one job run.
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// The default time limit of one role hook run.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// The default of a watch's `after_apply_timeout`: five minutes.
pub const DEFAULT_AFTER_APPLY_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// The two role hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    /// Run on a node being promoted, before it acts as active.
    OnPromote,
    /// Run on a node once its active side has stopped.
    OnDemote,
}

impl Hook {
    /// Both hooks.
    pub const ALL: [Hook; 2] = [Hook::OnPromote, Hook::OnDemote];

    /// The key that configures it (`on_promote`, `on_demote`).
    pub fn name(self) -> &'static str {
        match self {
            Hook::OnPromote => "on_promote",
            Hook::OnDemote => "on_demote",
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Cluster {
    /// Reads and validates the cluster file at `path`.
    ///
    /// The file names commands the agent runs, so one that another user
    /// could have written (writable by group or others, or owned by a user
    /// other than this one or root) is refused before it is parsed.
    pub fn load(path: &Path) -> Result<Cluster, ConfigError> {
        let read = || -> Result<String, crate::perms::TrustError> {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut crate::perms::open_trusted(path, false)?, &mut text)?;
            Ok(text)
        };
        let text = read().map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            column: None,
            key: None,
            message: match e {
                crate::perms::TrustError::Unsafe(why) => {
                    format!("the cluster file is refused: {why}; its commands run as this user")
                }
                crate::perms::TrustError::Io(e) => format!("cannot read the cluster file: {e}"),
            },
        })?;
        Cluster::parse(&text, path)
    }

    /// Parses and validates cluster file text; `file` is only used in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Cluster, ConfigError> {
        let locate = Locator { text, file };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|s| line_col(text, s.start))
                .map_or((None, None), |(l, c)| (Some(l), Some(c)));
            ConfigError {
                file: file.to_path_buf(),
                line,
                column,
                key: e.span().and_then(|s| key_on_line(text, s.start)),
                message: e.message().trim().to_string(),
            }
        })?;
        validate::validate(raw, &locate)
    }

    /// The canonical TOML form: what `config show` prints and `config hash` hashes.
    pub fn canonical(&self) -> String {
        // Serialising plain structs of strings, numbers and tables cannot fail.
        toml::to_string(self).unwrap_or_default()
    }

    /// The SHA-256 of the canonical form, as lowercase hex.
    pub fn hash(&self) -> String {
        hex::encode(Sha256::digest(self.canonical().as_bytes()))
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.node.iter().find(|n| n.name == name)
    }

    /// The `compress` setting in force on `node`: its own, else the
    /// `[cluster]` one.
    pub fn compress_of(&self, node: &Node) -> Compress {
        node.compress.unwrap_or(self.cluster.compress)
    }

    /// The watch called `name`.
    pub fn watch(&self, name: &str) -> Option<&Watch> {
        self.watch.iter().find(|w| w.name == name)
    }

    /// Every node but `name`.
    pub fn peers_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.node.iter().filter(move |n| n.name != name)
    }

    /// The state directory as seen on `node` (with its `root` prefix).
    pub fn state_dir(&self, node: &Node) -> PathBuf {
        node.local_path(&self.cluster.state_dir)
    }

    /// The private key file as seen on `node` (with its `root` prefix).
    pub fn key_file(&self, node: &Node) -> PathBuf {
        node.local_path(&self.cluster.key_file)
    }

    /// The command of `hook` on `node`: the node's own, else the `[cluster]` one.
    pub fn hook<'a>(&'a self, node: &'a Node, hook: Hook) -> Option<&'a str> {
        let (own, shared) = match hook {
            Hook::OnPromote => (&node.on_promote, &self.cluster.on_promote),
            Hook::OnDemote => (&node.on_demote, &self.cluster.on_demote),
        };
        own.as_deref().or(shared.as_deref())
    }
}

impl Node {
    /// The address the agent's SSH server binds: `listen` when set, else
    /// `0.0.0.0` on the port of `ssh` (the name in `ssh` is for dialing: on
    /// Debian a host's own name often resolves to 127.0.1.1).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen.unwrap_or_else(|| {
            let port = split_host_port(&self.ssh).map_or(0, |(_, p)| p);
            SocketAddr::from(([0, 0, 0, 0], port))
        })
    }

    /// `path` as seen on this node: under its `root` when one is set.
    pub fn local_path(&self, path: &Path) -> PathBuf {
        match &self.root {
            Some(root) => {
                let rel: PathBuf = path
                    .components()
                    .filter(|c| !matches!(c, Component::RootDir | Component::Prefix(_)))
                    .collect();
                root.join(rel)
            }
            None => path.to_path_buf(),
        }
    }

    /// The node's public key, parsed (validation guarantees it parses).
    pub fn key(&self) -> Result<PublicKey, crate::keys::KeyError> {
        PublicKey::parse(&self.public_key)
    }
}

/// Splits `host:port` (or `[v6]:port`) and checks the port.
pub fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() || host.contains(char::is_whitespace) {
        return None;
    }
    Some((host, port))
}
