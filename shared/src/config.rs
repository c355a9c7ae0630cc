//! The cluster file: parsing, validation and the canonical form.
//!
//! One TOML file is identical on every node. Parsing rejects unknown keys and
//! bad values with the key, the line and the column; validation checks the
//! cross-references (the preferred active names a node, names are unique,
//! paths are absolute, globs and cron expressions parse, addresses parse).
//! The canonical form (what `config show` prints) is a re-serialisation of
//! the validated structure, so two files that differ only in layout or
//! comments hash the same.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::keys::PublicKey;

/// The default location of the cluster file.
pub const DEFAULT_CLUSTER_PATH: &str = "/etc/warmspare/cluster.toml";

/// A problem with the cluster file, located as precisely as the file allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in.
    pub file: PathBuf,
    /// The 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// The 1-based column, when the problem has a place in the file.
    pub column: Option<usize>,
    /// The dotted key the problem is about, e.g. `node[1].name`.
    pub key: Option<String>,
    /// What is wrong, in words.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, ":{line}:{column}")?;
        }
        write!(f, ": ")?;
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The validated cluster file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cluster {
    /// The `[cluster]` table.
    pub cluster: ClusterSection,
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
    /// Changes closer together than this ship as one batch.
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

    fn parse(text: &str) -> Result<DeleteLimit, String> {
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

// ---------------------------------------------------------------------------
// The raw, spanned form the file is read into.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    cluster: Spanned<RawCluster>,
    #[serde(default)]
    node: Vec<Spanned<RawNode>>,
    #[serde(default)]
    operator: Vec<Spanned<RawOperator>>,
    #[serde(default)]
    watch: Vec<Spanned<RawWatch>>,
    #[serde(default)]
    job: Vec<Spanned<RawJob>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Spanned<String>,
    preferred_active: Spanned<String>,
    #[serde(default = "default_state_dir")]
    state_dir: Spanned<PathBuf>,
    #[serde(default = "default_key_file")]
    key_file: Spanned<PathBuf>,
    on_promote: Option<Spanned<String>>,
    on_demote: Option<Spanned<String>>,
    hook_timeout: Option<Spanned<String>>,
    diverged_max_size: Option<Spanned<String>>,
    diverged_max_age: Option<Spanned<String>>,
    undo_max_size: Option<Spanned<String>>,
    undo_max_age: Option<Spanned<String>>,
}

fn default_state_dir() -> Spanned<PathBuf> {
    Spanned::new(0..0, PathBuf::from("/var/lib/warmspare"))
}

fn default_key_file() -> Spanned<PathBuf> {
    Spanned::new(0..0, PathBuf::from("/etc/warmspare/node.key"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Spanned<String>,
    ssh: Spanned<String>,
    listen: Option<Spanned<String>>,
    http: Option<Spanned<String>>,
    public_key: Spanned<String>,
    root: Option<Spanned<PathBuf>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    on_promote: Option<Spanned<String>>,
    on_demote: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperator {
    name: Spanned<String>,
    public_key: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWatch {
    name: Spanned<String>,
    path: Spanned<PathBuf>,
    #[serde(default)]
    exclude: Vec<Spanned<String>>,
    #[serde(default = "default_debounce")]
    debounce_ms: u64,
    after_apply: Option<String>,
    after_apply_timeout: Option<Spanned<String>>,
    max_delete: Option<Spanned<RawLimit>>,
}

/// `max_delete` as written: `"50%"`, `"200"` or `200`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawLimit {
    Count(u64),
    Text(String),
}

fn default_debounce() -> u64 {
    10
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    name: Spanned<String>,
    schedule: Option<Spanned<String>>,
    dump: Option<String>,
    restore: Option<String>,
    run: Option<String>,
    on: Option<RunOn>,
    restore_schedule: Option<Spanned<String>>,
    keep: Option<Spanned<i64>>,
    timeout: Option<Spanned<String>>,
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
        raw.validate(&locate)
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

struct Locator<'a> {
    text: &'a str,
    file: &'a Path,
}

impl Locator<'_> {
    fn err<T>(&self, span: std::ops::Range<usize>, key: String, message: String) -> ConfigError {
        let _ = std::marker::PhantomData::<T>;
        let (line, column) = if span.end == 0 {
            (None, None)
        } else {
            let (l, c) = line_col(self.text, span.start);
            (Some(l), Some(c))
        };
        ConfigError {
            file: self.file.to_path_buf(),
            line,
            column,
            key: Some(key),
            message,
        }
    }

    fn at<T>(&self, value: &Spanned<T>, key: String, message: String) -> ConfigError {
        self.err::<T>(value.span(), key, message)
    }
}

/// The key a `key = value` line assigns, when byte offset `pos` is in that
/// line's value: a wrong type (`keep = "3"`) is then reported with its key.
fn key_on_line(text: &str, pos: usize) -> Option<String> {
    let pos = pos.min(text.len());
    let start = text[..pos].rfind('\n').map_or(0, |nl| nl + 1);
    let line = &text[start..];
    let line = line.split('\n').next().unwrap_or(line);
    let (key, _) = line.split_once('=')?;
    if start + key.len() >= pos {
        return None;
    }
    let key = key.trim().trim_matches('"');
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    bare.then(|| key.to_string())
}

/// 1-based line and column of byte offset `pos` in `text`.
fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let pos = pos.min(text.len());
    let before = &text[..pos];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(pos, |nl| pos - nl - 1) + 1;
    (line, column)
}

fn check_name(loc: &Locator<'_>, name: &Spanned<String>, key: String) -> Result<String, ConfigError> {
    let n = name.get_ref();
    let ok = !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(loc.at(
            name,
            key,
            format!("{n:?} is not a valid name (letters, digits, '-', '_', '.'; at most 64)"),
        ));
    }
    Ok(n.clone())
}

fn check_absolute(loc: &Locator<'_>, path: &Spanned<PathBuf>, key: String) -> Result<PathBuf, ConfigError> {
    let p = path.get_ref();
    if !p.is_absolute() {
        return Err(loc.at(path, key, format!("{} must be an absolute path", p.display())));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(loc.at(path, key, format!("{} must not contain '..'", p.display())));
    }
    Ok(p.clone())
}

fn check_key(loc: &Locator<'_>, key_text: &Spanned<String>, key: String) -> Result<String, ConfigError> {
    PublicKey::parse(key_text.get_ref())
        .map(|k| k.to_openssh())
        .map_err(|e| loc.at(key_text, key, e.to_string()))
}

fn check_cron(loc: &Locator<'_>, expr: &Spanned<String>, key: String) -> Result<String, ConfigError> {
    let text = expr.get_ref();
    let fields = text.split_whitespace().count();
    if fields == 5 {
        return Err(loc.at(
            expr,
            key,
            format!(
                "cron expression {text:?} has 5 fields; warmspare's have 6 or 7, seconds first \
                 (for example \"0 {}\")",
                text.trim()
            ),
        ));
    }
    cron::Schedule::from_str(text).map(|_| text.clone()).map_err(|e| {
        loc.at(
            expr,
            key,
            format!("invalid cron expression {text:?} (6 or 7 fields, seconds first): {e}"),
        )
    })
}

fn check_command(loc: &Locator<'_>, cmd: Option<&Spanned<String>>, key: String) -> Result<Option<String>, ConfigError> {
    match cmd {
        Some(c) if c.get_ref().trim().is_empty() => Err(loc.at(c, key, "the command is empty".into())),
        Some(c) if c.get_ref().contains('\0') => Err(loc.at(c, key, "the command contains a NUL byte".into())),
        Some(c) => Ok(Some(c.get_ref().clone())),
        None => Ok(None),
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

impl RawFile {
    fn validate(self, loc: &Locator<'_>) -> Result<Cluster, ConfigError> {
        let cluster_span = self.cluster.span();
        let c = self.cluster.into_inner();
        let hook_timeout = match &c.hook_timeout {
            Some(t) => {
                let d = humantime::parse_duration(t.get_ref()).map_err(|e| {
                    loc.at(
                        t,
                        "cluster.hook_timeout".into(),
                        format!("{:?} is not a duration like \"5m\": {e}", t.get_ref()),
                    )
                })?;
                if d.as_secs() == 0 {
                    return Err(loc.at(t, "cluster.hook_timeout".into(), "must be at least one second".into()));
                }
                Duration::from_secs(d.as_secs())
            }
            None => DEFAULT_HOOK_TIMEOUT,
        };
        let cluster = ClusterSection {
            name: check_name(loc, &c.name, "cluster.name".into())?,
            preferred_active: c.preferred_active.get_ref().clone(),
            state_dir: check_absolute(loc, &c.state_dir, "cluster.state_dir".into())?,
            key_file: check_absolute(loc, &c.key_file, "cluster.key_file".into())?,
            on_promote: check_command(loc, c.on_promote.as_ref(), "cluster.on_promote".into())?,
            on_demote: check_command(loc, c.on_demote.as_ref(), "cluster.on_demote".into())?,
            hook_timeout,
            diverged_max_size: match &c.diverged_max_size {
                Some(s) => parse_size(s.get_ref()).ok_or_else(|| {
                    loc.at(
                        s,
                        "cluster.diverged_max_size".into(),
                        format!("{:?} is not a size like \"1GiB\" or \"500MB\"", s.get_ref()),
                    )
                })?,
                None => DEFAULT_DIVERGED_MAX_SIZE,
            },
            diverged_max_age: match &c.diverged_max_age {
                Some(t) => humantime::parse_duration(t.get_ref()).map_err(|e| {
                    loc.at(
                        t,
                        "cluster.diverged_max_age".into(),
                        format!("{:?} is not a duration like \"30d\": {e}", t.get_ref()),
                    )
                })?,
                None => DEFAULT_DIVERGED_MAX_AGE,
            },
            undo_max_size: match &c.undo_max_size {
                Some(s) => parse_size(s.get_ref()).ok_or_else(|| {
                    loc.at(
                        s,
                        "cluster.undo_max_size".into(),
                        format!("{:?} is not a size like \"1GiB\" or \"500MB\"", s.get_ref()),
                    )
                })?,
                None => DEFAULT_UNDO_MAX_SIZE,
            },
            undo_max_age: match &c.undo_max_age {
                Some(t) => humantime::parse_duration(t.get_ref()).map_err(|e| {
                    loc.at(
                        t,
                        "cluster.undo_max_age".into(),
                        format!("{:?} is not a duration like \"7d\": {e}", t.get_ref()),
                    )
                })?,
                None => DEFAULT_UNDO_MAX_AGE,
            },
        };

        let mut nodes: Vec<Node> = Vec::new();
        for (i, n) in self.node.iter().enumerate() {
            let n = n.get_ref();
            let name = check_name(loc, &n.name, format!("node[{i}].name"))?;
            if nodes.iter().any(|o| o.name == name) {
                return Err(loc.at(
                    &n.name,
                    format!("node[{i}].name"),
                    format!("duplicate node name {name:?}"),
                ));
            }
            if split_host_port(n.ssh.get_ref()).is_none() {
                return Err(loc.at(
                    &n.ssh,
                    format!("node[{i}].ssh"),
                    format!("{:?} is not a host:port address", n.ssh.get_ref()),
                ));
            }
            let listen = match &n.listen {
                Some(l) => Some(l.get_ref().parse::<SocketAddr>().map_err(|e| {
                    loc.at(
                        l,
                        format!("node[{i}].listen"),
                        format!("{:?} is not an ip:port address: {e}", l.get_ref()),
                    )
                })?),
                None => None,
            };
            let http = match &n.http {
                Some(h) => Some(h.get_ref().parse::<SocketAddr>().map_err(|e| {
                    loc.at(
                        h,
                        format!("node[{i}].http"),
                        format!("{:?} is not an ip:port address: {e}", h.get_ref()),
                    )
                })?),
                None => None,
            };
            let public_key = check_key(loc, &n.public_key, format!("node[{i}].public_key"))?;
            if nodes.iter().any(|o| o.public_key == public_key) {
                return Err(loc.at(
                    &n.public_key,
                    format!("node[{i}].public_key"),
                    "the same key is pinned for two nodes".into(),
                ));
            }
            let root = match &n.root {
                Some(r) => Some(check_absolute(loc, r, format!("node[{i}].root"))?),
                None => None,
            };
            nodes.push(Node {
                name,
                ssh: n.ssh.get_ref().clone(),
                listen,
                http,
                public_key,
                root,
                env: n.env.clone(),
                on_promote: check_command(loc, n.on_promote.as_ref(), format!("node[{i}].on_promote"))?,
                on_demote: check_command(loc, n.on_demote.as_ref(), format!("node[{i}].on_demote"))?,
            });
        }
        if nodes.is_empty() {
            return Err(loc.err::<()>(
                cluster_span,
                "node".into(),
                "the cluster needs at least one [[node]]".into(),
            ));
        }
        if !nodes.iter().any(|n| n.name == cluster.preferred_active) {
            return Err(loc.at(
                &c.preferred_active,
                "cluster.preferred_active".into(),
                format!("{:?} is not the name of a [[node]]", cluster.preferred_active),
            ));
        }

        let mut operators: Vec<Operator> = Vec::new();
        for (i, o) in self.operator.iter().enumerate() {
            let o = o.get_ref();
            let name = check_name(loc, &o.name, format!("operator[{i}].name"))?;
            if operators.iter().any(|p| p.name == name) {
                return Err(loc.at(
                    &o.name,
                    format!("operator[{i}].name"),
                    format!("duplicate operator name {name:?}"),
                ));
            }
            let public_key = check_key(loc, &o.public_key, format!("operator[{i}].public_key"))?;
            operators.push(Operator { name, public_key });
        }

        let mut watches: Vec<Watch> = Vec::new();
        for (i, w) in self.watch.iter().enumerate() {
            let w = w.get_ref();
            let name = check_name(loc, &w.name, format!("watch[{i}].name"))?;
            if name.starts_with('_') {
                return Err(loc.at(
                    &w.name,
                    format!("watch[{i}].name"),
                    "names starting with '_' are reserved for warmspare's own watches".into(),
                ));
            }
            if watches.iter().any(|o| o.name == name) {
                return Err(loc.at(
                    &w.name,
                    format!("watch[{i}].name"),
                    format!("duplicate watch name {name:?}"),
                ));
            }
            let path = check_absolute(loc, &w.path, format!("watch[{i}].path"))?;
            if let Some(other) = watches
                .iter()
                .find(|o| o.path.starts_with(&path) || path.starts_with(&o.path))
            {
                return Err(loc.at(
                    &w.path,
                    format!("watch[{i}].path"),
                    format!("overlaps the path of watch {:?}", other.name),
                ));
            }
            let mut exclude = Vec::new();
            for (j, g) in w.exclude.iter().enumerate() {
                crate::manifest::Excludes::check_glob(g.get_ref())
                    .map_err(|e| loc.at(g, format!("watch[{i}].exclude[{j}]"), e))?;
                exclude.push(g.get_ref().clone());
            }
            let max_delete = match &w.max_delete {
                None => DeleteLimit::DEFAULT,
                Some(v) => match v.get_ref() {
                    RawLimit::Count(n) => DeleteLimit::Count(*n),
                    RawLimit::Text(t) => {
                        DeleteLimit::parse(t).map_err(|e| loc.at(v, format!("watch[{i}].max_delete"), e))?
                    }
                },
            };
            let after_apply_timeout = match &w.after_apply_timeout {
                Some(t) => {
                    let key = format!("watch[{i}].after_apply_timeout");
                    let d = humantime::parse_duration(t.get_ref()).map_err(|e| {
                        loc.at(
                            t,
                            key.clone(),
                            format!("{:?} is not a duration like \"5m\": {e}", t.get_ref()),
                        )
                    })?;
                    if d.as_secs() == 0 {
                        return Err(loc.at(t, key, "must be at least one second".into()));
                    }
                    Duration::from_secs(d.as_secs())
                }
                None => DEFAULT_AFTER_APPLY_TIMEOUT,
            };
            watches.push(Watch {
                name,
                path,
                exclude,
                debounce_ms: w.debounce_ms,
                after_apply: w.after_apply.clone(),
                after_apply_timeout,
                max_delete,
            });
        }

        let mut jobs: Vec<Job> = Vec::new();
        for (i, j) in self.job.iter().enumerate() {
            let span = j.span();
            let j = j.get_ref();
            let name = check_name(loc, &j.name, format!("job[{i}].name"))?;
            if jobs.iter().any(|o| o.name == name) {
                return Err(loc.at(
                    &j.name,
                    format!("job[{i}].name"),
                    format!("duplicate job name {name:?}"),
                ));
            }
            let schedule = match &j.schedule {
                Some(s) => Some(check_cron(loc, s, format!("job[{i}].schedule"))?),
                None => None,
            };
            let restore_schedule = match &j.restore_schedule {
                Some(s) => Some(check_cron(loc, s, format!("job[{i}].restore_schedule"))?),
                None => None,
            };
            if j.dump.is_none() && j.run.is_none() {
                return Err(loc.err::<()>(
                    span,
                    format!("job[{i}]"),
                    "a job needs a `dump` or a `run` command".into(),
                ));
            }
            if j.dump.is_some() && j.run.is_some() {
                return Err(loc.err::<()>(
                    span,
                    format!("job[{i}]"),
                    "a job has either `dump` (with `restore`) or `run`, not both".into(),
                ));
            }
            if j.run.is_some() && j.restore.is_some() {
                return Err(loc.err::<()>(span, format!("job[{i}].restore"), "a `run` job has no `restore`".into()));
            }
            if j.restore_schedule.is_some() && j.restore.is_none() {
                return Err(loc.err::<()>(
                    span,
                    format!("job[{i}].restore_schedule"),
                    "`restore_schedule` needs a `restore` command".into(),
                ));
            }
            if j.on.is_some() && j.run.is_none() {
                return Err(loc.err::<()>(span, format!("job[{i}].on"), "`on` only applies to `run` jobs".into()));
            }
            let keep = match &j.keep {
                Some(k) if *k.get_ref() < 1 || *k.get_ref() > 10_000 => {
                    return Err(loc.at(k, format!("job[{i}].keep"), "must be between 1 and 10000".into()));
                }
                Some(k) => *k.get_ref() as u32,
                None => DEFAULT_KEEP,
            };
            let timeout = match &j.timeout {
                Some(t) => humantime::parse_duration(t.get_ref()).map_err(|e| {
                    loc.at(
                        t,
                        format!("job[{i}].timeout"),
                        format!("{:?} is not a duration like \"15m\": {e}", t.get_ref()),
                    )
                })?,
                None => DEFAULT_JOB_TIMEOUT,
            };
            if timeout.is_zero() {
                if let Some(t) = &j.timeout {
                    return Err(loc.at(t, format!("job[{i}].timeout"), "must be more than zero".into()));
                }
            }
            jobs.push(Job {
                name,
                schedule,
                dump: j.dump.clone(),
                restore: j.restore.clone(),
                run: j.run.clone(),
                on: j.on,
                restore_schedule,
                keep,
                timeout: Duration::from_secs(timeout.as_secs().max(1)),
            });
        }

        Ok(Cluster {
            cluster,
            node: nodes,
            operator: operators,
            watch: watches,
            job: jobs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> String {
        use std::sync::OnceLock;
        static KEYS: OnceLock<(String, String)> = OnceLock::new();
        let (key_a, key_b) = KEYS.get_or_init(|| {
            (
                crate::keys::SecretKey::generate().public().to_openssh(),
                crate::keys::SecretKey::generate().public().to_openssh(),
            )
        });
        format!(
            r#"
[cluster]
name = "pe-prod"
preferred_active = "a"
state_dir = "/var/lib/warmspare"
key_file = "/etc/warmspare/node.key"

[[node]]
name = "a"
ssh = "127.0.0.1:7422"
http = "127.0.0.1:7480"
public_key = "{key_a}"

[[node]]
name = "b"
ssh = "localhost:7423"
public_key = "{key_b}"
root = "/srv/lab/b"

[[watch]]
name = "ca"
path = "/etc/puppetlabs/puppet/ssl/ca"
exclude = ["signed/b.pem"]

[[job]]
name = "rbac"
schedule = "0 10 * * * *"
dump = "pg_dump"
restore = "psql"
timeout = "10m"
"#
        )
    }

    fn parse(text: &str) -> Result<Cluster, ConfigError> {
        Cluster::parse(text, Path::new("cluster.toml"))
    }

    #[test]
    fn max_delete_parses_shares_and_counts() {
        let with = |v: &str| parse(&sample().replace("exclude = [", &format!("max_delete = {v}\nexclude = [")));
        assert_eq!(parse(&sample()).unwrap().watch[0].max_delete, DeleteLimit::Share(50));
        assert_eq!(with("\"25%\"").unwrap().watch[0].max_delete, DeleteLimit::Share(25));
        assert_eq!(with("\"200\"").unwrap().watch[0].max_delete, DeleteLimit::Count(200));
        assert_eq!(with("7").unwrap().watch[0].max_delete, DeleteLimit::Count(7));
        assert!(with("\"101%\"").is_err());
        assert!(with("\"half\"").is_err());
        assert!(with("-3").is_err());
        // The default is not written in the canonical form (hashes stay as they were).
        assert!(!parse(&sample()).unwrap().canonical().contains("max_delete"));
        assert!(with("\"25%\"").unwrap().canonical().contains("max_delete = \"25%\""));
        let d = DeleteLimit::DEFAULT;
        assert!(!d.holds(9, 10), "fewer than ten files are never held by a share");
        assert!(d.holds(10, 10));
        assert!(!d.holds(50, 100));
        assert!(d.holds(51, 100));
        assert!(!DeleteLimit::Share(100).holds(1000, 1000));
        assert!(DeleteLimit::Count(3).holds(4, 1_000_000));
        assert!(!DeleteLimit::Count(3).holds(3, 3));
    }

    #[test]
    fn parses_the_sample() {
        let c = parse(&sample()).unwrap();
        assert_eq!(c.node.len(), 2);
        assert_eq!(c.watch[0].debounce_ms, 10);
        assert_eq!(c.job[0].timeout(), Duration::from_secs(600));
        assert_eq!(c.job[0].keep, DEFAULT_KEEP);
        let b = c.node("b").unwrap();
        assert_eq!(c.state_dir(b), PathBuf::from("/srv/lab/b/var/lib/warmspare"));
    }

    #[test]
    fn diverged_bounds_parse_with_defaults() {
        let c = parse(&sample()).unwrap();
        assert_eq!(c.cluster.diverged_max_size, 1 << 30);
        assert_eq!(c.cluster.diverged_max_age, Duration::from_secs(30 * 86_400));
        assert!(!c.canonical().contains("diverged"), "defaults change the hash");
        for (size, want) in [
            ("1GiB", Some(1u64 << 30)),
            ("500MB", Some(500_000_000)),
            ("64 KiB", Some(65_536)),
            ("10", Some(10)),
            ("1PB", None),
            ("x", None),
            ("-1", None),
        ] {
            assert_eq!(parse_size(size), want, "{size}");
        }
        let bad = sample().replacen("\n\n[[node]]", "\ndiverged_max_size = \"lots\"\n\n[[node]]", 1);
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("cluster.diverged_max_size"), "{e}");
        let good = sample().replacen(
            "\n\n[[node]]",
            "\ndiverged_max_size = \"300MB\"\ndiverged_max_age = \"12h\"\n\n[[node]]",
            1,
        );
        let c = parse(&good).unwrap();
        assert_eq!(c.cluster.diverged_max_size, 300_000_000);
        assert_eq!(c.cluster.diverged_max_age, Duration::from_secs(12 * 3600));
        assert!(c.canonical().contains("diverged_max_size"), "{}", c.canonical());
    }

    #[test]
    fn undo_bounds_parse_with_defaults_and_spanned_errors() {
        let c = parse(&sample()).unwrap();
        assert_eq!(c.cluster.undo_max_size, 1 << 30);
        assert_eq!(c.cluster.undo_max_age, Duration::from_secs(7 * 86_400));
        assert!(!c.canonical().contains("undo"), "defaults change the hash");
        let bad = sample().replacen("\n\n[[node]]", "\nundo_max_size = \"lots\"\n\n[[node]]", 1);
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("cluster.undo_max_size"), "{e}");
        assert!(e.line.is_some_and(|l| l > 0), "{e}");
        let bad = sample().replacen("\n\n[[node]]", "\nundo_max_age = \"soon\"\n\n[[node]]", 1);
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("cluster.undo_max_age"), "{e}");
        let good = sample().replacen(
            "\n\n[[node]]",
            "\nundo_max_size = \"64MiB\"\nundo_max_age = \"2d\"\n\n[[node]]",
            1,
        );
        let c = parse(&good).unwrap();
        assert_eq!(c.cluster.undo_max_size, 64 << 20);
        assert_eq!(c.cluster.undo_max_age, Duration::from_secs(2 * 86_400));
        assert!(c.canonical().contains("undo_max_size"), "{}", c.canonical());
    }

    #[test]
    fn load_refuses_a_file_others_can_write() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cluster.toml");
        std::fs::write(&p, sample()).unwrap();
        for mode in [0o666, 0o664, 0o646, 0o620] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = Cluster::load(&p).unwrap_err().to_string();
            assert!(
                e.contains("cluster.toml") && e.contains(&format!("{mode:04o}")) && e.contains("refused"),
                "{e}"
            );
        }
        for mode in [0o644, 0o640, 0o600] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            assert!(Cluster::load(&p).is_ok(), "{mode:o}");
        }
    }

    #[test]
    fn hash_ignores_layout_and_comments() {
        let a = parse(&sample()).unwrap();
        let text = sample()
            .replace("[[watch]]", "# a comment\n[[watch]]")
            .replace(" = ", "=");
        let b = parse(&text).unwrap();
        assert_eq!(a.hash(), b.hash());
        let changed = parse(&sample().replace("signed/b.pem", "signed/c.pem")).unwrap();
        assert_ne!(a.hash(), changed.hash());
    }

    #[test]
    fn canonical_form_parses_back_to_the_same_cluster() {
        let a = parse(&sample()).unwrap();
        let b = parse(&a.canonical()).unwrap();
        assert_eq!(a, b);
        assert!(a.canonical().contains("timeout = \"10m\""), "{}", a.canonical());
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = sample()
            .replace("debounce", "x")
            .replace("exclude = [", "colour = 3\nexclude = [");
        let err = parse(&text).unwrap_err();
        let line = text.lines().position(|l| l.starts_with("colour")).unwrap() + 1;
        assert_eq!(err.line, Some(line), "{err}");
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn duplicate_node_is_refused_with_line() {
        let text = sample().replace("name = \"b\"", "name = \"a\"");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("node[1].name"));
        let line = text
            .match_indices("name = \"a\"")
            .nth(1)
            .map(|(p, _)| line_col(&text, p).0);
        assert_eq!(err.line, line, "{err}");
    }

    #[test]
    fn bad_cron_and_glob_are_refused() {
        let err = parse(&sample().replace("0 10 * * * *", "every hour")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("job[0].schedule"), "{err}");
        assert!(err.line.is_some());
        let err = parse(&sample().replace("signed/b.pem", "signed/[b.pem")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("watch[0].exclude[0]"), "{err}");
    }

    #[test]
    fn hooks_parse_with_node_overrides_and_bad_values_name_key_and_line() {
        let text = sample().replace(
            "key_file = \"/etc/warmspare/node.key\"\n",
            "key_file = \"/etc/warmspare/node.key\"\non_promote = \"enable-ca\"\non_demote = \"disable-ca\"\nhook_timeout = \"90s\"\n",
        );
        let text = text.replace(
            "root = \"/srv/lab/b\"",
            "root = \"/srv/lab/b\"\non_promote = \"b-promote\"",
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.cluster.hook_timeout, Duration::from_secs(90));
        let (a, b) = (c.node("a").unwrap(), c.node("b").unwrap());
        assert_eq!(c.hook(a, Hook::OnPromote), Some("enable-ca"));
        assert_eq!(c.hook(b, Hook::OnPromote), Some("b-promote"));
        assert_eq!(c.hook(b, Hook::OnDemote), Some("disable-ca"));
        assert_eq!(parse(&c.canonical()).unwrap(), c);
        let plain = parse(&sample()).unwrap();
        assert_eq!(plain.cluster.hook_timeout, DEFAULT_HOOK_TIMEOUT);
        assert_eq!(plain.hook(a, Hook::OnPromote), None);
        assert!(!plain.canonical().contains("hook_timeout"), "{}", plain.canonical());

        let bad = text.replace("\"90s\"", "\"soon\"");
        let err = parse(&bad).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("cluster.hook_timeout"), "{err}");
        let line = bad.lines().position(|l| l.starts_with("hook_timeout")).unwrap() + 1;
        assert_eq!(err.line, Some(line), "{err}");
        let err = parse(&text.replace("\"b-promote\"", "\"  \"")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("node[1].on_promote"), "{err}");
        let err = parse(&text.replace("\"90s\"", "\"0s\"")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("cluster.hook_timeout"), "{err}");
    }

    #[test]
    fn after_apply_timeout_defaults_to_five_minutes_and_bad_values_name_the_key() {
        let plain = parse(&sample()).unwrap();
        assert_eq!(plain.watch[0].after_apply_timeout, DEFAULT_AFTER_APPLY_TIMEOUT);
        assert!(
            !plain.canonical().contains("after_apply_timeout"),
            "{}",
            plain.canonical()
        );
        let text = sample().replace(
            "exclude = [\"signed/b.pem\"]",
            "exclude = [\"signed/b.pem\"]\nafter_apply_timeout = \"90s\"",
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.watch[0].after_apply_timeout, Duration::from_secs(90));
        assert_eq!(parse(&c.canonical()).unwrap(), c);
        for bad in ["\"soon\"", "\"0s\""] {
            let err = parse(&text.replace("\"90s\"", bad)).unwrap_err();
            assert_eq!(err.key.as_deref(), Some("watch[0].after_apply_timeout"), "{err}");
            assert!(err.line.is_some(), "{err}");
        }
    }

    #[test]
    fn preferred_active_must_be_a_node() {
        let err = parse(&sample().replace("preferred_active = \"a\"", "preferred_active = \"zz\"")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("cluster.preferred_active"), "{err}");
    }

    #[test]
    fn relative_paths_and_bad_addresses_are_refused() {
        let err = parse(&sample().replace("\"/etc/puppetlabs/puppet/ssl/ca\"", "\"ssl/ca\"")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("watch[0].path"));
        let err = parse(&sample().replace("localhost:7423", "localhost")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("node[1].ssh"));
    }
}
