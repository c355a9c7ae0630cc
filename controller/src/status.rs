//! `warmsparectl status`: the whole cluster at a glance.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use serde::Serialize;
use warmspare_shared::proto::NodeStatus;

use crate::cli::StatusArgs;
use crate::client::{NodeView, Operator};
use crate::exit;

/// How long status waits for each node.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(5);

/// The JSON form of `status`.
#[derive(Serialize)]
struct ClusterJson<'a> {
    cluster: &'a str,
    config_hash: String,
    nodes: Vec<NodeJson<'a>>,
    warnings: Vec<String>,
    /// The role as etcd holds it, with `[etcd]` configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd: Option<&'a crate::etcd::EtcdView>,
}

#[derive(Serialize)]
struct NodeJson<'a> {
    node: &'a str,
    reachable: bool,
    error: Option<&'a str>,
    config_hash_matches: Option<bool>,
    status: Option<&'a NodeStatus>,
}

/// Runs `status`.
pub async fn run(op: &Operator, args: &StatusArgs) -> Result<()> {
    loop {
        // The nodes and etcd are asked at once, each within its deadline.
        let (views, etcd) = tokio::join!(op.gather(NODE_TIMEOUT), crate::etcd::gather(&op.cluster));
        let text = if args.json {
            let mut json = to_json(op, &views);
            json.etcd = etcd.as_ref();
            format!("{}\n", serde_json::to_string_pretty(&json)?)
        } else {
            let clear = if args.watch && std::io::stdout().is_terminal() {
                "\x1b[2J\x1b[H"
            } else {
                ""
            };
            // Names and messages come from the nodes (file names from a
            // local user's disk): never raw to the terminal.
            format!(
                "{clear}{}",
                warmspare_shared::text::escape_for_terminal(&format!(
                    "{}{}",
                    render(op, &views),
                    etcd.as_ref().map(crate::etcd::render).unwrap_or_default()
                ))
            )
        };
        if !emit(&text)? {
            // The reader went away (`status --watch | head`): done.
            return Ok(());
        }
        if !args.watch {
            return verdict(&views);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Writes `text` to standard output: `Ok(false)` when the reader has gone
/// (a closed pipe), which is no error for a status display.
fn emit(text: &str) -> Result<bool> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("cannot write to standard output"),
    }
}

/// The exit status of a one-shot `status`, for scripts and monitoring:
/// exit 1 when no node answered, when no reachable node acts as the active
/// one, or when more than one does.
fn verdict(views: &[NodeView]) -> Result<()> {
    let up: Vec<&NodeStatus> = views.iter().filter_map(|v| v.status.as_ref().ok()).collect();
    if up.is_empty() {
        return Err(exit::fail(exit::FAILED, "no node could be reached"));
    }
    let acting: Vec<&str> = up
        .iter()
        .filter(|s| s.role.active == s.node && s.held.is_none())
        .map(|s| s.node.as_str())
        .collect();
    match acting.len() {
        1 => Ok(()),
        0 => Err(exit::fail(exit::FAILED, "no reachable node acts as the active node")),
        _ => Err(exit::fail(
            exit::FAILED,
            format!("more than one node acts as the active node: {}", acting.join(", ")),
        )),
    }
}

fn to_json<'a>(op: &'a Operator, views: &'a [NodeView]) -> ClusterJson<'a> {
    let hash = op.cluster.hash();
    ClusterJson {
        cluster: &op.cluster.cluster.name,
        config_hash: hash.clone(),
        nodes: views
            .iter()
            .map(|v| NodeJson {
                node: &v.node.name,
                reachable: v.status.is_ok(),
                error: v.status.as_ref().err().map(String::as_str),
                config_hash_matches: v.status.as_ref().ok().map(|s| s.config_hash == hash),
                status: v.status.as_ref().ok(),
            })
            .collect(),
        warnings: warnings(&hash, views),
        etcd: None,
    }
}

/// What an operator must notice: differing files (against `hash`, this
/// cluster file's), disagreeing epochs, two actives.
pub fn warnings(hash: &str, views: &[NodeView]) -> Vec<String> {
    let mut out = Vec::new();
    let up: Vec<&NodeStatus> = views.iter().filter_map(|v| v.status.as_ref().ok()).collect();
    for s in &up {
        if s.config_hash != hash {
            out.push(format!(
                "{}: its cluster file differs from this one (hash {})",
                s.node,
                short(&s.config_hash)
            ));
        }
    }
    let actives: Vec<&str> = up
        .iter()
        .filter(|s| s.role.active == s.node)
        .map(|s| s.node.as_str())
        .collect();
    if actives.len() > 1 {
        out.push(format!(
            "more than one node believes it is active: {}",
            actives.join(", ")
        ));
    }
    if actives.is_empty() && !up.is_empty() {
        out.push("no reachable node is active".into());
    }
    let epochs: std::collections::BTreeSet<u64> = up.iter().map(|s| s.role.epoch).collect();
    if epochs.len() > 1 {
        out.push(format!(
            "nodes disagree on the epoch: {epochs:?} (the lower ones catch up when the active reaches them)"
        ));
    }
    for s in &up {
        if !s.diverged.is_empty() {
            out.push(format!(
                "{}: {} diverged file(s) preserved under {}/diverged",
                s.node,
                s.diverged.len(),
                "state_dir"
            ));
        }
        if s.paused {
            out.push(format!("{}: replication and jobs are paused", s.node));
        }
        if let Some(why) = &s.held {
            out.push(format!(
                "{} is named active but fenced (503): {why}; retry with `warmsparectl failover --to {} --force` or move the role",
                s.node, s.node
            ));
        }
        for w in &s.watches {
            if let Some(e) = &w.root_error {
                out.push(format!("{}: watch {} is not shipped: {e}", s.node, w.name));
            }
            if let Some(run) = w.after_apply.as_ref().and_then(|a| a.last.as_ref()).filter(|r| !r.ok) {
                out.push(format!(
                    "{}: the last after_apply of watch {} failed: {}",
                    s.node, w.name, run.detail
                ));
            }
            let lc = &w.local_changes;
            if lc.pending > 0 {
                let latest: Vec<String> = lc
                    .latest
                    .iter()
                    .rev()
                    .filter(|c| c.pending)
                    .take(5)
                    .map(|c| format!("{} {}", c.change, c.path))
                    .collect();
                out.push(format!(
                    "{}: local change on a passive, will be replaced: {} path(s) of watch {} (latest: {}); the active's next full comparison replaces them and keeps what it replaces under state_dir/diverged (`warmsparectl resync --watch {}` does it now)",
                    s.node,
                    lc.pending,
                    w.name,
                    latest.join(", "),
                    w.name
                ));
            }
        }
        for l in s.links.iter().filter(|l| l.deletions_held > 0) {
            out.push(format!(
                "{}: deletions held: {} file(s) of watch {} stay on {} (max_delete); after checking, `warmsparectl resync --watch {} --allow-deletes`",
                s.node, l.deletions_held, l.watch, l.peer, l.watch
            ));
        }
    }
    out
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn ago(t: Option<i64>) -> String {
    let now = now_secs();
    match t {
        Some(t) => format!("{}s ago", (now - t).max(0)),
        None => "never".into(),
    }
}

fn render(op: &Operator, views: &[NodeView]) -> String {
    let hash = op.cluster.hash();
    let mut o = String::new();
    let _ = writeln!(o, "cluster {} (config {})", op.cluster.cluster.name, short(&hash));
    let _ = writeln!(
        o,
        "{:<14} {:<10} {:<8} {:>5}  {:<9} {:<14} {:<6}",
        "NODE", "REACHABLE", "ROLE", "EPOCH", "VERSION", "CONFIG", "PAUSED"
    );
    for v in views {
        match &v.status {
            Ok(s) => {
                let role = match (s.role.active == s.node, &s.held) {
                    (true, None) => "active",
                    (true, Some(_)) => "held",
                    _ => "passive",
                };
                let cfg = if s.config_hash == hash {
                    short(&s.config_hash).to_string()
                } else {
                    format!("{} DIFFERS", &s.config_hash[..6.min(s.config_hash.len())])
                };
                let _ = writeln!(
                    o,
                    "{:<14} {:<10} {:<8} {:>5}  {:<9} {:<14} {:<6}",
                    s.node,
                    "yes",
                    role,
                    s.role.epoch,
                    s.version,
                    cfg,
                    if s.paused { "yes" } else { "no" }
                );
            }
            Err(e) => {
                let _ = writeln!(o, "{:<14} {:<10} {e}", v.node.name, "NO");
            }
        }
    }
    let links: Vec<_> = views
        .iter()
        .filter_map(|v| v.status.as_ref().ok())
        .flat_map(|s| s.links.iter().map(move |l| (s, l)))
        .collect();
    if !links.is_empty() {
        let _ = writeln!(
            o,
            "\n{:<10} {:<14} {:>7} {:<10} {:>8} {:>9} {:>11}  LAST SUCCESS",
            "WATCH", "TO", "FILES", "CONNECTED", "PENDING", "LAG", "LAG BYTES"
        );
        for (s, l) in links {
            let files = s.watches.iter().find(|w| w.name == l.watch).map_or(0, |w| w.files);
            let _ = writeln!(
                o,
                "{:<10} {:<14} {:>7} {:<10} {:>8} {:>8.1}s {:>11}  {}{}",
                l.watch,
                l.peer,
                files,
                if l.connected { "yes" } else { "no" },
                l.pending_changes,
                l.lag_seconds,
                l.lag_bytes,
                ago(l.last_success),
                l.last_error
                    .as_deref()
                    .filter(|_| !l.connected)
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
                    + &if l.deletions_held > 0 {
                        format!(" (deletions held: {})", l.deletions_held)
                    } else {
                        String::new()
                    }
                    + if l.compressed && l.connected {
                        " (compressed)"
                    } else {
                        ""
                    }
            );
        }
    }
    for v in views {
        if let Ok(s) = &v.status {
            if s.role.active != s.node {
                for w in &s.watches {
                    let _ = writeln!(
                        o,
                        "{}: watch {} holds {} files, last applied {}",
                        s.node,
                        w.name,
                        w.files,
                        ago(w.last_applied)
                    );
                }
            }
            for d in s.diverged.iter().take(20) {
                let _ = writeln!(o, "{}: diverged {d}", s.node);
            }
        }
    }
    let hooks: Vec<_> = views
        .iter()
        .filter_map(|v| v.status.as_ref().ok())
        .flat_map(|s| s.hooks.iter().map(move |h| (s, h)))
        .collect();
    if !hooks.is_empty() {
        let _ = writeln!(
            o,
            "\n{:<11} {:<14} {:>5}  {:<11} {:<14} {:>9}  DETAIL",
            "HOOK", "NODE", "EPOCH", "RESULT", "WHEN", "DURATION"
        );
        for (s, h) in hooks {
            let (result, duration) = match h.end_ms {
                Some(end) => (
                    if h.ok { "ok" } else { "FAILED" },
                    format!("{:.1}s", (end - h.start_ms) as f64 / 1000.0),
                ),
                None => ("unfinished", "-".into()),
            };
            let detail: String = if h.ok {
                String::new()
            } else {
                h.detail.chars().take(60).collect()
            };
            let _ = writeln!(
                o,
                "{:<11} {:<14} {:>5}  {:<11} {:<14} {:>9}  {detail}",
                h.hook.name(),
                s.node,
                h.epoch,
                result,
                ago(Some(h.start_ms / 1000)),
                duration
            );
        }
    }
    let jobs: Vec<_> = views
        .iter()
        .filter_map(|v| v.status.as_ref().ok())
        .flat_map(|s| s.jobs.iter().map(move |j| (s, j)))
        .collect();
    if !jobs.is_empty() {
        let _ = writeln!(
            o,
            "\n{:<14} {:<14} {:<8} {:<8} {:>6} {:<14} {:<14} DETAIL",
            "JOB", "NODE", "LAST", "RESULT", "GEN", "WHEN", "NEXT"
        );
        for (s, j) in jobs {
            let (kind, result, when, detail) = match &j.last {
                Some(r) => (
                    format!("{:?}", r.kind).to_lowercase(),
                    if r.ok { "ok" } else { "FAILED" },
                    ago(Some(r.end_ms / 1000)),
                    if r.ok {
                        String::new()
                    } else {
                        r.detail.chars().take(60).collect()
                    },
                ),
                None => ("-".into(), "-", "-".into(), String::new()),
            };
            let next = j
                .next
                .map(|n| format!("in {}s", (n - now_secs()).max(0)))
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                o,
                "{:<14} {:<14} {:<8} {:<8} {:>6} {:<14} {:<14} {detail}",
                j.name, s.node, kind, result, j.generation, when, next
            );
        }
    }
    let warn = warnings(&hash, views);
    if !warn.is_empty() {
        let _ = writeln!(o);
        for w in warn {
            let _ = writeln!(o, "WARNING: {w}");
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{cluster, code, link, role, status, views, watch};

    #[test]
    fn verdict_wants_exactly_one_acting_active() {
        let c = cluster();
        let a = status(&c, "a", role(7, "a"));
        let b = status(&c, "b", role(7, "a"));
        let mut held = a.clone();
        held.held = Some("unconfirmed".into());
        let b_active = status(&c, "b", role(7, "b"));
        let cases: Vec<(&str, Vec<NodeStatus>, Option<&str>)> = vec![
            ("one active, one passive", vec![a.clone(), b.clone()], None),
            ("the active alone", vec![a.clone()], None),
            ("nobody answers", vec![], Some("no node could be reached")),
            (
                "the passive alone",
                vec![b.clone()],
                Some("no reachable node acts as the active node"),
            ),
            (
                "the active fenced",
                vec![held, b.clone()],
                Some("no reachable node acts as the active node"),
            ),
            (
                "two actives",
                vec![a, b_active],
                Some("more than one node acts as the active node: a, b"),
            ),
        ];
        for (what, reports, want) in cases {
            match (verdict(&views(&c, reports)), want) {
                (Ok(()), None) => {}
                (Err(e), Some(m)) => assert!(code(&e) == exit::FAILED && e.to_string() == m, "{what}: {e:#}"),
                (got, _) => panic!("{what}: {got:?}"),
            }
        }
    }

    #[test]
    fn warnings_name_what_an_operator_must_notice() {
        type Change = fn(&mut NodeStatus, &mut NodeStatus);
        // What is changed from a healthy pair (a active, b passive) and the
        // one warning it must cause.
        let cases: &[(&str, Change, &str)] = &[
            (
                "cluster file differs",
                |_, b| b.config_hash = "f".repeat(64),
                "b: its cluster file differs from this one (hash ffffffffffff)",
            ),
            (
                "two actives",
                |_, b| b.role = role(7, "b"),
                "more than one node believes it is active: a, b",
            ),
            ("no active", |a, _| a.role = role(7, "b"), "no reachable node is active"),
            (
                "epochs disagree",
                |_, b| b.role = role(6, "a"),
                "nodes disagree on the epoch: {6, 7}",
            ),
            (
                "diverged files",
                |_, b| b.diverged = vec!["ca/x".into(), "ca/y".into()],
                "b: 2 diverged file(s)",
            ),
            ("paused", |a, _| a.paused = true, "a: replication and jobs are paused"),
            (
                "fenced",
                |a, _| a.held = Some("unconfirmed".into()),
                "a is named active but fenced (503): unconfirmed",
            ),
            (
                "root error",
                |a, _| a.watches[0].root_error = Some("missing".into()),
                "a: watch ca is not shipped: missing",
            ),
            (
                "deletions held",
                |a, _| a.links[0].deletions_held = 3,
                "a: deletions held: 3 file(s) of watch ca stay on b",
            ),
            (
                "after_apply failed",
                |_, b| {
                    b.watches[0].after_apply = Some(warmspare_shared::proto::AfterApplyStatus {
                        last: Some(warmspare_shared::proto::AfterApplyRun {
                            start_ms: 0,
                            end_ms: 1,
                            ok: false,
                            detail: "exit 1".into(),
                        }),
                        ..Default::default()
                    })
                },
                "b: the last after_apply of watch ca failed: exit 1",
            ),
            (
                "local change on the passive",
                |_, b| {
                    b.watches[0].local_changes.pending = 1;
                    b.watches[0]
                        .local_changes
                        .latest
                        .push(warmspare_shared::proto::LocalChange {
                            path: "serial".into(),
                            change: "modified".into(),
                            at: 0,
                            pending: true,
                        });
                },
                "b: local change on a passive, will be replaced: 1 path(s) of watch ca (latest: modified serial)",
            ),
        ];
        let c = cluster();
        let healthy = || {
            let mut a = status(&c, "a", role(7, "a"));
            a.links.push(link("b", 0.0));
            a.watches.push(watch());
            let mut b = status(&c, "b", role(7, "a"));
            b.watches.push(watch());
            (a, b)
        };
        let (a, b) = healthy();
        assert_eq!(warnings(&c.hash(), &views(&c, vec![a, b])), Vec::<String>::new());
        for (what, change, want) in cases {
            let (mut a, mut b) = healthy();
            change(&mut a, &mut b);
            let got = warnings(&c.hash(), &views(&c, vec![a, b]));
            assert!(
                got.len() == 1 && got[0].starts_with(want),
                "{what}: {want:?} is not {got:?}"
            );
        }
    }

    #[test]
    fn unreachable_nodes_are_not_warned_about_as_inactive() {
        let c = cluster();
        assert_eq!(warnings(&c.hash(), &views(&c, vec![])), Vec::<String>::new());
        let b = status(&c, "b", role(7, "a"));
        assert_eq!(
            warnings(&c.hash(), &views(&c, vec![b])),
            vec!["no reachable node is active".to_string()]
        );
    }
}
