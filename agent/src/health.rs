//! The HTTP listener: health checks for load balancers, status and metrics.
//!
//! `GET|HEAD /_status/check` is 200 on the active node and 503 elsewhere
//! (and on an active held until a peer confirms its epoch), so
//! a load balancer (HAProxy `option httpchk HEAD /_status/check`) sends
//! clients to the active node only, and follows every role change.

mod view;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use warmspare_shared::config::Hook;
use warmspare_shared::proto::NodeStatus;

use crate::progress::Loops;
use crate::status;

pub use self::view::View;

/// The most HTTP connections served at once; more are closed as soon as
/// they are accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send a request's headers.
pub const HEADER_DEADLINE: Duration = Duration::from_secs(5);
/// The longest one connection may last (one request each: no keep-alive).
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);

/// Serves health, status and metrics on `listener` until `cancel` fires.
///
/// Each connection carries one request, which must arrive within
/// [`HEADER_DEADLINE`] and be answered within [`CONNECTION_DEADLINE`]; at most
/// [`MAX_CONNECTIONS`] are served at once. Half-sent requests (600 of them
/// once took every descriptor the agent had) are closed at their deadline.
/// The endpoints see the node through `view` only; the accept loop stamps
/// its progress in `loops`.
pub async fn run(view: View, loops: Arc<Loops>, listener: TcpListener, cancel: CancellationToken) {
    let stamp = loops.register("the HTTP accept loop", crate::server::ACCEPT_LIMIT);
    let app = Router::new()
        .route("/_status/check", get(check))
        .route("/_status/ping", get(ping))
        .route("/_status", get(detail))
        .route("/metrics", get(metrics))
        .with_state(view);
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    let (mut crowded, mut failing) = (crate::server::Complaint::default(), crate::server::Complaint::default());
    loop {
        stamp.stamp();
        if crate::progress::test_hang("http-accept") {
            crate::progress::hang_task("the HTTP accept loop").await;
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            // Idle, the loop still comes round (and stamps) every second.
            _ = tokio::time::sleep(crate::server::ACCEPT_ROUND) => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        if let Some(n) = crowded.due() {
                            tracing::warn!(%peer, closed = n, "{MAX_CONNECTIONS} HTTP connections are open: closing new ones at once");
                        }
                        drop(tcp);
                        continue;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(app.clone());
                    connections.spawn(async move {
                        let _permit = permit;
                        let conn = hyper::server::conn::http1::Builder::new()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(HEADER_DEADLINE)
                            .keep_alive(false)
                            .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
                        match tokio::time::timeout(CONNECTION_DEADLINE, conn).await {
                            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "http connection ended"),
                            Err(_) => tracing::debug!(%peer, "http connection cut at its deadline"),
                            Ok(Ok(())) => {}
                        }
                    });
                }
                Err(e) => {
                    if let Some(n) = failing.due() {
                        tracing::warn!(error = %e, times = n, "the HTTP listener cannot accept a connection");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
}

async fn check(State(node): State<View>) -> Response {
    let role = node.role();
    if node.is_active() {
        (StatusCode::OK, format!("active at epoch {}\n", role.epoch)).into_response()
    } else if let Some(why) = node.held() {
        // Without the detail: a failed hook's output stays behind SSH.
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("held at epoch {}: {}\n", role.epoch, status::public_held(&why)),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("passive at epoch {} ({} is active)\n", role.epoch, role.active),
        )
            .into_response()
    }
}

fn hooks_counts(
    counts: &[(warmspare_shared::config::Hook, bool, u64)],
    hook: warmspare_shared::config::Hook,
    ok: bool,
) -> u64 {
    counts
        .iter()
        .find(|(h, o, _)| *h == hook && *o == ok)
        .map_or(0, |(_, _, n)| *n)
}

async fn ping() -> &'static str {
    "ok\n"
}

/// `GET /_status`: states, timestamps and counters only (no job detail, no
/// error text, no file names), since anyone who reaches the port reads it.
async fn detail(State(node): State<View>) -> Response {
    match node.status().await {
        Ok(s) => Json(status::PublicStatus::from(s)).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn metrics(State(node): State<View>) -> Response {
    let sent = (node.bytes_sent(), node.bytes_uncompressed());
    let counts: Vec<(warmspare_shared::config::Hook, bool, u64)> = warmspare_shared::config::Hook::ALL
        .iter()
        .flat_map(|h| [(*h, true), (*h, false)])
        .map(|(h, ok)| (h, ok, node.hook_runs(h, ok)))
        .collect();
    let s = match node.status().await {
        Ok(s) => s,
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    let out = render(&s, sent, &counts);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// The Prometheus text format, written one family at a time.
struct Exposition(String);

impl Exposition {
    /// A family's `HELP` and `TYPE` lines (`kind`: gauge or counter).
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample: `name{label="value",...} value` (no braces without labels).
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                let _ = write!(self.0, "{}{k}=\"{v}\"", if i == 0 { "" } else { "," });
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// A family of one sample without labels.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// The Prometheus text exposition of a node's status (`/metrics`): `sent`
/// is the bytes sent to peers, `counts` the role hooks' runs by outcome.
/// `sent`: the bytes sent to peers, and what they stand for uncompressed.
fn render(s: &NodeStatus, sent: (u64, u64), counts: &[(Hook, bool, u64)]) -> String {
    const GAUGE: &str = "gauge";
    const COUNTER: &str = "counter";
    let mut out = Exposition(String::new());
    let active = u8::from(s.role.active == s.node && s.held.is_none());
    out.single(
        "warmspare_is_active",
        GAUGE,
        "1 on the active node, 0 elsewhere.",
        active,
    );
    out.single(
        "warmspare_epoch",
        GAUGE,
        "The role epoch this node is at.",
        s.role.epoch,
    );
    out.single(
        "warmspare_active_held",
        GAUGE,
        "1 while this node's role state names it active but it does not act as active (no peer has confirmed its epoch, or on_promote is running or failed).",
        u8::from(s.held.is_some()),
    );
    out.single(
        "warmspare_paused",
        GAUGE,
        "1 while replication and jobs are held.",
        u8::from(s.paused),
    );
    out.family("warmspare_build_info", GAUGE, "The software and protocol version.");
    let protocol = s.protocol.to_string();
    out.sample(
        "warmspare_build_info",
        &[("version", &s.version), ("protocol", &protocol)],
        1,
    );
    type Lag = fn(&warmspare_shared::proto::LinkStatus) -> f64;
    let lag: [(&str, &str, Lag); 2] = [
        (
            "warmspare_replication_lag_seconds",
            "Age of the oldest change not yet acknowledged by a peer.",
            |l| l.lag_seconds,
        ),
        (
            "warmspare_replication_lag_bytes",
            "Bytes of the files not yet acknowledged by a peer.",
            |l| l.lag_bytes as f64,
        ),
    ];
    for (name, help, value) in lag {
        out.family(name, GAUGE, help);
        for l in &s.links {
            out.sample(name, &[("watch", &l.watch), ("peer", &l.peer)], value(l));
        }
    }
    out.family(
        "warmspare_peer_connected",
        GAUGE,
        "1 while the replication connection to a peer is up.",
    );
    let mut seen = std::collections::BTreeSet::new();
    for l in &s.links {
        if seen.insert(&l.peer) {
            out.sample("warmspare_peer_connected", &[("peer", &l.peer)], u8::from(l.connected));
        }
    }
    out.family(
        "warmspare_last_success_timestamp_seconds",
        GAUGE,
        "When a watch last replicated (active: acknowledged by a peer; passive: applied, or found in step by a full comparison).",
    );
    for l in &s.links {
        if let Some(t) = l.last_success {
            out.sample(
                "warmspare_last_success_timestamp_seconds",
                &[("watch", &l.watch), ("peer", &l.peer)],
                t,
            );
        }
    }
    for w in &s.watches {
        if let Some(t) = w.last_applied {
            out.sample("warmspare_last_success_timestamp_seconds", &[("watch", &w.name)], t);
        }
    }
    type PerWatch = fn(&warmspare_shared::proto::WatchStatus) -> u64;
    let per_watch: [(&str, &str, &str, PerWatch); 4] = [
        ("warmspare_watch_files", GAUGE, "Regular files under a watch root.", |w| w.files),
        (
            "warmspare_watch_root_ok",
            GAUGE,
            "0 while a watch root fails its check (missing, not a directory, another file system) and nothing of it ships.",
            |w| u64::from(w.root_error.is_none()),
        ),
        (
            "warmspare_passive_local_changes",
            GAUGE,
            "On a passive: paths under a watch changed by anything but the receiver, waiting to be replaced by the active's version.",
            |w| w.local_changes.pending,
        ),
        (
            "warmspare_passive_local_changes_total",
            COUNTER,
            "On a passive: local changes flagged under a watch since the agent started.",
            |w| w.local_changes.total,
        ),
    ];
    for (name, kind, help, value) in per_watch {
        out.family(name, kind, help);
        for w in &s.watches {
            out.sample(name, &[("watch", &w.name)], value(w));
        }
    }
    out.family(
        "warmspare_deletions_held",
        GAUGE,
        "Files the deletion guard keeps on a peer until an operator allows their removal.",
    );
    for l in &s.links {
        out.sample(
            "warmspare_deletions_held",
            &[("watch", &l.watch), ("peer", &l.peer)],
            l.deletions_held,
        );
    }
    out.family(
        "warmspare_after_apply_runs_total",
        COUNTER,
        "Runs of a watch's after_apply hook on this node since the agent started.",
    );
    for w in &s.watches {
        if let Some(a) = &w.after_apply {
            let name = "warmspare_after_apply_runs_total";
            out.sample(name, &[("watch", &w.name), ("result", "ok")], a.runs_ok);
            out.sample(name, &[("watch", &w.name), ("result", "failed")], a.runs_failed);
        }
    }
    type PerHook = fn(&warmspare_shared::proto::AfterApplyStatus) -> bool;
    let per_hook: [(&str, &str, PerHook); 2] = [
        (
            "warmspare_after_apply_failed",
            "1 while the last run of a watch's after_apply hook failed or timed out.",
            |a| a.last.as_ref().is_some_and(|r| !r.ok),
        ),
        (
            "warmspare_after_apply_running",
            "1 while a watch's after_apply hook runs.",
            |a| a.running,
        ),
    ];
    for (name, help, value) in per_hook {
        out.family(name, GAUGE, help);
        for w in &s.watches {
            if let Some(a) = &w.after_apply {
                out.sample(name, &[("watch", &w.name)], u8::from(value(a)));
            }
        }
    }
    out.single(
        "warmspare_bytes_sent_total",
        COUNTER,
        "Bytes sent to peers, framing included.",
        sent.0,
    );
    out.single(
        "warmspare_bytes_sent_uncompressed_total",
        COUNTER,
        "What the bytes sent to peers stand for before compression, framing included.",
        sent.1,
    );
    out.family(
        "warmspare_job_runs_total",
        COUNTER,
        "Job runs on this node since the agent started.",
    );
    for j in &s.jobs {
        out.sample(
            "warmspare_job_runs_total",
            &[("job", &j.name), ("result", "ok")],
            j.runs_ok,
        );
        out.sample(
            "warmspare_job_runs_total",
            &[("job", &j.name), ("result", "failed")],
            j.runs_failed,
        );
    }
    out.family(
        "warmspare_job_last_run_timestamp_seconds",
        GAUGE,
        "When the last run of a job ended.",
    );
    for j in &s.jobs {
        if let Some(r) = &j.last {
            let result = if r.ok { "ok" } else { "failed" };
            out.sample(
                "warmspare_job_last_run_timestamp_seconds",
                &[("job", &j.name), ("result", result)],
                r.end_ms / 1000,
            );
        }
    }
    out.family(
        "warmspare_job_next_run_timestamp_seconds",
        GAUGE,
        "When a job is next due on this node, where it is scheduled here.",
    );
    for j in &s.jobs {
        if let Some(next) = j.next {
            out.sample("warmspare_job_next_run_timestamp_seconds", &[("job", &j.name)], next);
        }
    }
    out.family(
        "warmspare_hook_runs_total",
        COUNTER,
        "Role hook runs on this node since the agent started.",
    );
    out.family(
        "warmspare_hook_failed",
        GAUGE,
        "1 while the last run of a role hook failed.",
    );
    for hook in Hook::ALL {
        let name = hook.to_string();
        for (ok, result) in [(true, "ok"), (false, "failed")] {
            out.sample(
                "warmspare_hook_runs_total",
                &[("hook", &name), ("result", result)],
                hooks_counts(counts, hook, ok),
            );
        }
        let failed = s.hooks.iter().any(|r| r.hook == hook && r.end_ms.is_some() && !r.ok);
        out.sample("warmspare_hook_failed", &[("hook", &name)], u8::from(failed));
    }
    out.single(
        "warmspare_diverged_files_total",
        GAUGE,
        "Files preserved under diverged/.",
        s.diverged.len(),
    );
    out.single(
        "warmspare_diverged_pruned_total",
        COUNTER,
        "Preserved files removed from diverged/ to keep it within diverged_max_size and diverged_max_age.",
        warmspare_shared::diverged::pruned_total(),
    );
    out.single(
        "warmspare_undo_files",
        GAUGE,
        "Files kept in the undo store (files replication removed or replaced on this node).",
        s.undo.files,
    );
    out.single(
        "warmspare_undo_bytes",
        GAUGE,
        "Bytes kept in the undo store.",
        s.undo.bytes,
    );
    out.single(
        "warmspare_undo_pruned_total",
        COUNTER,
        "Files removed from the undo store to keep it within undo_max_size and undo_max_age.",
        s.undo.pruned,
    );
    out.single(
        "warmspare_undo_skipped_total",
        COUNTER,
        "Files removed or replaced without a copy in the undo store (larger than undo_max_size, or an error) under undo_when_full = replace.",
        s.undo.skipped,
    );
    out.0
}

#[cfg(test)]
mod tests;
