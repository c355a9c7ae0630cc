//! What an agent reports about itself to `warmsparectl status` and `/_status`.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use warmspare_shared::manifest::join;
use warmspare_shared::proto::{LinkStatus, LocalChange, LocalChanges, NodeStatus, WatchStatus, PROTOCOL_VERSION};

use crate::after::AfterApply;
use crate::clock::unix;
use crate::counts::TreeCounts;
use crate::job_state::Jobs;
use crate::live::Live;
use crate::pause::Pause;
use crate::role::Role;
use crate::roots::Roots;
use crate::telemetry::Telemetry;

/// What a node's status is read from: the handles it looks at, none of
/// which it changes (only the watches' file counts, a cache, are refreshed).
#[derive(Clone)]
pub struct Sources {
    /// The configuration in force and this node's identity.
    pub live: Arc<Live>,
    /// The role (current state, the hold).
    pub role: Arc<Role>,
    /// The runtime reports: inboxes, links, last applied.
    pub telemetry: Arc<Telemetry>,
    /// The operator's hold.
    pub pause: Arc<Pause>,
    /// The jobs' statuses.
    pub jobs: Arc<Jobs>,
    /// The `after_apply` hooks' counters and outcomes.
    pub after: Arc<AfterApply>,
    /// The watches' file counts.
    pub tree_counts: Arc<TreeCounts>,
    /// What is wrong with the watch roots.
    pub roots: Arc<Roots>,
    /// The local changes flagged on a passive.
    pub local: Arc<warmspare_shared::local::Tracker>,
    /// The undo store's totals and bounds.
    pub undo: crate::undo::Handles,
    /// When the agent started.
    pub started: SystemTime,
}

/// The most pending paths whose sizes are added up for the byte lag.
const LAG_STAT_LIMIT: usize = 10_000;
/// The most diverged files listed.
const DIVERGED_LIST_LIMIT: usize = 1_000;

/// This node's status now. Blocking (it reads the disk): call it from a
/// blocking thread, never from async code.
///
/// The runtime reports are copied under their lock and the lock released
/// before anything touches the disk: shippers and receivers take that lock
/// on every batch, and a status request must never make them wait.
pub fn node_status(node: &Sources) -> NodeStatus {
    let now = SystemTime::now();
    let root_problems = node.roots.problems();
    let flags = node.local.flags();
    let local = node.live.local_watches();
    let (inboxes, links_now, last_applied) = {
        let rt = node.telemetry.runtime();
        (rt.inboxes.clone(), rt.links.clone(), rt.last_applied.clone())
    };
    let counts = node.tree_counts.get(&local);
    let watches: Vec<WatchStatus> = local
        .iter()
        .map(|w| {
            let (files, bytes) = counts.get(&w.name).copied().unwrap_or_default();
            WatchStatus {
                name: w.name.clone(),
                files,
                bytes,
                last_applied: last_applied.get(&w.name).map(|t| unix(*t)),
                root_error: root_problems.get(&w.name).cloned(),
                after_apply: node.after.status(&w.name, has_after_apply(node, &w.name)),
                local_changes: flags
                    .get(&w.name)
                    .map(|(f, untracked)| local_changes(f, *untracked))
                    .unwrap_or_default(),
            }
        })
        .collect();
    let mut links = Vec::new();
    for (peer, inbox) in &inboxes {
        let waiting = inbox.peek();
        let link = links_now.get(peer).cloned().unwrap_or_default();
        for w in &local {
            let mut paths: BTreeSet<&String> = BTreeSet::new();
            let mut full = waiting.full.contains(&w.name);
            let mut since = waiting.since.get(&w.name).copied();
            paths.extend(waiting.paths.get(&w.name).into_iter().flatten());
            if let Some(p) = &link.in_progress {
                full |= p.full.contains(&w.name);
                paths.extend(p.paths.get(&w.name).into_iter().flatten());
                since = match (since, p.since.get(&w.name)) {
                    (Some(a), Some(b)) => Some(a.min(*b)),
                    (a, b) => a.or(b.copied()),
                };
            }
            let stats = watches.iter().find(|s| s.name == w.name);
            let (pending_changes, lag_bytes) = if full {
                (stats.map_or(0, |s| s.files), stats.map_or(0, |s| s.bytes))
            } else {
                let bytes = paths
                    .iter()
                    .take(LAG_STAT_LIMIT)
                    .filter_map(|p| fs::symlink_metadata(join(&w.root, p)).ok())
                    .map(|m| m.len())
                    .sum();
                (paths.len() as u64, bytes)
            };
            let lag_seconds = if pending_changes == 0 {
                0.0
            } else {
                since
                    .and_then(|s| now.duration_since(s).ok())
                    .map_or(0.0, |d| d.as_secs_f64())
            };
            links.push(LinkStatus {
                peer: peer.clone(),
                watch: w.name.clone(),
                connected: link.connected,
                pending_changes,
                lag_bytes,
                lag_seconds,
                last_success: link.last_success.get(&w.name).map(|t| unix(*t)),
                last_error: link.last_error.clone(),
                deletions_held: link.deletions_held.get(&w.name).copied().unwrap_or(0),
                compressed: link.compressed,
            });
        }
    }
    NodeStatus {
        node: node.live.me.name.clone(),
        version: warmspare_shared::VERSION.to_string(),
        protocol: PROTOCOL_VERSION,
        config_hash: node.live.config_hash().clone(),
        role: node.role.current(),
        paused: node.pause.is_paused(),
        watches,
        links,
        diverged: diverged(&node.live.state_dir.join("diverged")),
        started: unix(node.started),
        jobs: node.jobs.statuses(&node.live.cluster().job),
        held: node.role.held(),
        hooks: crate::hooks::last_runs(&node.live.state_dir),
        undo: node.undo.status(),
    }
}

/// [`node_status`] on a blocking thread, for async code.
pub async fn node_status_off_runtime(node: &Sources) -> anyhow::Result<NodeStatus> {
    let s = node.clone();
    tokio::task::spawn_blocking(move || node_status(&s))
        .await
        .map_err(|e| anyhow::anyhow!("the status task failed: {e}"))
}

/// Whether `watch` has an `after_apply` command in the cluster file in force.
fn has_after_apply(node: &Sources, watch: &str) -> bool {
    node.live
        .cluster()
        .watch(watch)
        .is_some_and(|w| w.after_apply.is_some())
}

/// A watch's local changes as status shows them: counts, and the latest
/// paths with control characters escaped (names are a local user's to choose).
fn local_changes(f: &warmspare_shared::local::WatchFlags, untracked: u64) -> LocalChanges {
    LocalChanges {
        pending: f.pending.len() as u64 + untracked,
        total: f.total,
        latest: f
            .latest
            .iter()
            .map(|c| LocalChange {
                path: warmspare_shared::text::escape_controls(&c.path).into_owned(),
                change: c.change.name().to_string(),
                at: unix(c.at),
                pending: f.pending.contains_key(&c.path),
            })
            .collect(),
    }
}

/// Files preserved under the diverged folder, relative to it.
fn diverged(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for de in rd.flatten() {
            let p = de.path();
            if de.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(dir) {
                // Names are a local user's to choose: escaped, never raw.
                out.push(warmspare_shared::text::escape_path(rel));
                if out.len() >= DIVERGED_LIST_LIMIT {
                    return out;
                }
            }
        }
    }
    out.sort();
    out
}

/// What the unauthenticated `GET /_status` serves: states, timestamps and
/// counters only.
///
/// Anyone who can reach the `http` port reads it, so it carries nothing that
/// can hold command output or file names: no job detail (a failed dump's
/// stderr can hold a connection string with a password), no error text, no
/// diverged file names. `warmsparectl status`, over SSH with an operator
/// key, keeps all of it. The fields are listed one by one on purpose: a field
/// added to [`NodeStatus`] stays off this endpoint until it is added here.
#[derive(Debug, serde::Serialize)]
pub struct PublicStatus {
    node: String,
    version: String,
    protocol: u32,
    config_hash: String,
    role: warmspare_shared::state::RoleState,
    paused: bool,
    started: i64,
    watches: Vec<PublicWatch>,
    links: Vec<PublicLink>,
    diverged_files: usize,
    jobs: Vec<PublicJob>,
    /// Whether the node is named active but held (no peer has confirmed its
    /// epoch, or its on_promote is running or failed).
    held: bool,
    hooks: Vec<PublicHook>,
}

/// A hold reason as the unauthenticated port may show it: the words before
/// the first `:`, where the detail (a failed hook's output) would follow.
pub fn public_held(why: &str) -> String {
    why.split(':').next().unwrap_or_default().trim().to_string()
}

#[derive(Debug, serde::Serialize)]
struct PublicHook {
    hook: warmspare_shared::config::Hook,
    epoch: u64,
    start_ms: i64,
    end_ms: Option<i64>,
    ok: bool,
}

#[derive(Debug, serde::Serialize)]
struct PublicWatch {
    name: String,
    files: u64,
    bytes: u64,
    last_applied: Option<i64>,
    /// Whether the watch root passed its check; the reason is shown by
    /// `warmsparectl status` (it names a path).
    root_ok: bool,
    /// The `after_apply` hook's counters (its output stays behind SSH).
    after_apply: Option<PublicAfterApply>,
    /// On a passive: local changes waiting to be replaced (counts only: the
    /// paths are shown by `warmsparectl status`).
    local_changes: u64,
    /// Local changes flagged since the agent started.
    local_changes_total: u64,
}

#[derive(Debug, serde::Serialize)]
struct PublicAfterApply {
    running: bool,
    runs_ok: u64,
    runs_failed: u64,
    /// Whether the last run that ended succeeded.
    last_ok: Option<bool>,
    last_end_ms: Option<i64>,
}

#[derive(Debug, serde::Serialize)]
struct PublicLink {
    peer: String,
    watch: String,
    connected: bool,
    pending_changes: u64,
    lag_bytes: u64,
    lag_seconds: f64,
    last_success: Option<i64>,
    /// Whether the link has an error; its text is shown by `warmsparectl status`.
    error: bool,
    /// Files the deletion guard keeps on the peer.
    deletions_held: u64,
}

#[derive(Debug, serde::Serialize)]
struct PublicJob {
    name: String,
    last: Option<PublicRun>,
    next: Option<i64>,
    runs_ok: u64,
    runs_failed: u64,
    generation: u64,
}

#[derive(Debug, serde::Serialize)]
struct PublicRun {
    kind: warmspare_shared::proto::JobKind,
    start_ms: i64,
    end_ms: i64,
    ok: bool,
    bytes: u64,
    generation: u64,
}

impl From<NodeStatus> for PublicStatus {
    fn from(s: NodeStatus) -> PublicStatus {
        PublicStatus {
            node: s.node,
            version: s.version,
            protocol: s.protocol,
            config_hash: s.config_hash,
            role: s.role,
            paused: s.paused,
            started: s.started,
            watches: s
                .watches
                .into_iter()
                .map(|w| PublicWatch {
                    name: w.name,
                    files: w.files,
                    bytes: w.bytes,
                    last_applied: w.last_applied,
                    root_ok: w.root_error.is_none(),
                    after_apply: w.after_apply.map(|a| PublicAfterApply {
                        running: a.running,
                        runs_ok: a.runs_ok,
                        runs_failed: a.runs_failed,
                        last_ok: a.last.as_ref().map(|r| r.ok),
                        last_end_ms: a.last.as_ref().map(|r| r.end_ms),
                    }),
                    local_changes: w.local_changes.pending,
                    local_changes_total: w.local_changes.total,
                })
                .collect(),
            links: s
                .links
                .into_iter()
                .map(|l| PublicLink {
                    peer: l.peer,
                    watch: l.watch,
                    connected: l.connected,
                    pending_changes: l.pending_changes,
                    lag_bytes: l.lag_bytes,
                    lag_seconds: l.lag_seconds,
                    last_success: l.last_success,
                    error: l.last_error.is_some(),
                    deletions_held: l.deletions_held,
                })
                .collect(),
            diverged_files: s.diverged.len(),
            jobs: s
                .jobs
                .into_iter()
                .map(|j| PublicJob {
                    name: j.name,
                    last: j.last.map(|r| PublicRun {
                        kind: r.kind,
                        start_ms: r.start_ms,
                        end_ms: r.end_ms,
                        ok: r.ok,
                        bytes: r.bytes,
                        generation: r.generation,
                    }),
                    next: j.next,
                    runs_ok: j.runs_ok,
                    runs_failed: j.runs_failed,
                    generation: j.generation,
                })
                .collect(),
            held: s.held.is_some(),
            hooks: s
                .hooks
                .into_iter()
                .map(|h| PublicHook {
                    hook: h.hook,
                    epoch: h.epoch,
                    start_ms: h.start_ms,
                    end_ms: h.end_ms,
                    ok: h.ok,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warmspare_shared::proto::{JobKind, JobRun, JobStatus, LinkStatus, WatchStatus};
    use warmspare_shared::state::RoleState;

    #[test]
    fn the_public_status_carries_no_detail() {
        let secret = "postgres://app:hunter2@db/app";
        let s = NodeStatus {
            node: "a".into(),
            version: "1".into(),
            protocol: PROTOCOL_VERSION,
            config_hash: "h".into(),
            role: RoleState {
                epoch: 3,
                active: "a".into(),
            },
            paused: false,
            watches: vec![WatchStatus {
                name: "ca".into(),
                files: 1,
                bytes: 1,
                last_applied: None,
                root_error: Some(format!("watch root /{secret} is missing")),
                after_apply: Some(warmspare_shared::proto::AfterApplyStatus {
                    running: false,
                    queued: false,
                    runs_ok: 2,
                    runs_failed: 1,
                    last: Some(warmspare_shared::proto::AfterApplyRun {
                        start_ms: 1,
                        end_ms: 2,
                        ok: false,
                        detail: format!("exit status: 1; output: {secret}"),
                    }),
                }),
                local_changes: warmspare_shared::proto::LocalChanges {
                    pending: 1,
                    total: 2,
                    latest: vec![warmspare_shared::proto::LocalChange {
                        path: format!("{secret}.pem"),
                        change: "created".into(),
                        at: 1,
                        pending: true,
                    }],
                },
            }],
            links: vec![LinkStatus {
                peer: "b".into(),
                watch: "ca".into(),
                connected: false,
                pending_changes: 1,
                lag_bytes: 2,
                lag_seconds: 0.5,
                last_success: Some(7),
                last_error: Some(format!("hook said {secret}")),
                deletions_held: 12,
                compressed: false,
            }],
            diverged: vec![format!("3-1/ca/{secret}")],
            started: 1,
            jobs: vec![JobStatus {
                name: "db".into(),
                last: Some(JobRun {
                    job: "db".into(),
                    kind: JobKind::Dump,
                    start_ms: 1,
                    end_ms: 2,
                    ok: false,
                    detail: format!("exit status: 3; stderr: {secret}"),
                    bytes: 0,
                    generation: 0,
                }),
                next: None,
                runs_ok: 0,
                runs_failed: 1,
                generation: 0,
            }],
            held: Some(format!("on_promote failed: {secret}")),
            hooks: vec![warmspare_shared::proto::HookRun {
                hook: warmspare_shared::config::Hook::OnPromote,
                epoch: 3,
                from: "b".into(),
                start_ms: 1,
                end_ms: Some(2),
                ok: false,
                detail: format!("exit status: 1; output: {secret}"),
            }],
            undo: Default::default(),
        };
        let text = serde_json::to_string(&PublicStatus::from(s)).unwrap();
        assert!(!text.contains("hunter2"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["jobs"][0]["runs_failed"], 1);
        assert_eq!(v["jobs"][0]["last"]["ok"], false);
        assert_eq!(v["links"][0]["error"], true);
        assert_eq!(v["links"][0]["deletions_held"], 12);
        assert_eq!(v["watches"][0]["root_ok"], false);
        assert_eq!(v["watches"][0]["after_apply"]["runs_failed"], 1);
        assert_eq!(v["watches"][0]["after_apply"]["last_ok"], false);
        assert_eq!(v["watches"][0]["local_changes"], 1);
        assert_eq!(v["watches"][0]["local_changes_total"], 2);
        assert_eq!(v["diverged_files"], 1);
        assert_eq!(v["role"]["epoch"], 3);
        assert_eq!(v["held"], true);
        assert_eq!(v["hooks"][0]["hook"], "on_promote");
        assert_eq!(v["hooks"][0]["ok"], false);
        assert_eq!(
            public_held("on_promote failed: exit status: 1; stderr: hunter2"),
            "on_promote failed"
        );
        assert_eq!(public_held("on_promote is running"), "on_promote is running");
    }
}
