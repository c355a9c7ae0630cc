//! The raw, spanned form the cluster file is read into (serde + toml): every
//! value keeps its place in the text, so validation can name the line.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::RunOn;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub(super) cluster: Spanned<RawCluster>,
    pub(super) etcd: Option<Spanned<RawEtcd>>,
    #[serde(default)]
    pub(super) node: Vec<Spanned<RawNode>>,
    #[serde(default)]
    pub(super) operator: Vec<Spanned<RawOperator>>,
    #[serde(default)]
    pub(super) watch: Vec<Spanned<RawWatch>>,
    #[serde(default)]
    pub(super) job: Vec<Spanned<RawJob>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) name: Spanned<String>,
    pub(super) preferred_active: Spanned<String>,
    #[serde(default = "default_state_dir")]
    pub(super) state_dir: Spanned<PathBuf>,
    #[serde(default = "default_key_file")]
    pub(super) key_file: Spanned<PathBuf>,
    pub(super) on_promote: Option<Spanned<String>>,
    pub(super) on_demote: Option<Spanned<String>>,
    pub(super) hook_timeout: Option<Spanned<String>>,
    pub(super) diverged_max_size: Option<Spanned<String>>,
    pub(super) diverged_max_age: Option<Spanned<String>>,
    pub(super) undo_max_size: Option<Spanned<String>>,
    pub(super) undo_max_age: Option<Spanned<String>>,
    pub(super) undo_when_full: Option<Spanned<String>>,
    pub(super) compress: Option<Spanned<String>>,
}

fn default_state_dir() -> Spanned<PathBuf> {
    Spanned::new(0..0, PathBuf::from("/var/lib/warmspare"))
}

fn default_key_file() -> Spanned<PathBuf> {
    Spanned::new(0..0, PathBuf::from("/etc/warmspare/node.key"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    pub(super) name: Spanned<String>,
    pub(super) ssh: Spanned<String>,
    pub(super) listen: Option<Spanned<String>>,
    pub(super) http: Option<Spanned<String>>,
    pub(super) public_key: Spanned<String>,
    pub(super) root: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub(super) env: BTreeMap<String, String>,
    pub(super) on_promote: Option<Spanned<String>>,
    pub(super) on_demote: Option<Spanned<String>>,
    pub(super) failover: Option<bool>,
    pub(super) compress: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEtcd {
    pub(super) endpoints: Spanned<Vec<Spanned<String>>>,
    pub(super) prefix: Option<Spanned<String>>,
    pub(super) ttl: Option<Spanned<String>>,
    pub(super) loop_wait: Option<Spanned<String>>,
    pub(super) retry_timeout: Option<Spanned<String>>,
    pub(super) ca: Option<Spanned<PathBuf>>,
    pub(super) cert: Option<Spanned<PathBuf>>,
    pub(super) key: Option<Spanned<PathBuf>>,
    pub(super) max_lag_on_failover: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) failsafe: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOperator {
    pub(super) name: Spanned<String>,
    pub(super) public_key: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWatch {
    pub(super) name: Spanned<String>,
    pub(super) path: Spanned<PathBuf>,
    #[serde(default)]
    pub(super) exclude: Vec<Spanned<String>>,
    #[serde(default = "default_debounce")]
    pub(super) debounce_ms: u64,
    pub(super) after_apply: Option<String>,
    pub(super) after_apply_timeout: Option<Spanned<String>>,
    pub(super) max_delete: Option<Spanned<RawLimit>>,
}

/// `max_delete` as written: `"50%"`, `"200"` or `200`.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawLimit {
    Count(u64),
    Text(String),
}

/// No trailing debounce: complete changes ship on their leading edge.
fn default_debounce() -> u64 {
    0
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJob {
    pub(super) name: Spanned<String>,
    pub(super) schedule: Option<Spanned<String>>,
    pub(super) dump: Option<String>,
    pub(super) restore: Option<String>,
    pub(super) run: Option<String>,
    pub(super) on: Option<RunOn>,
    pub(super) restore_schedule: Option<Spanned<String>>,
    pub(super) keep: Option<Spanned<i64>>,
    pub(super) timeout: Option<Spanned<String>>,
}
