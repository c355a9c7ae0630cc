//! The HTTP listener: health checks for load balancers, status and metrics.
//!
//! `GET|HEAD /_status/check` is 200 on the active node and 503 elsewhere
//! (and on an active held until a peer confirms its epoch), so
//! a load balancer (HAProxy `option httpchk HEAD /_status/check`) sends
//! clients to the active node only, and follows every role change.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
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

use crate::node::Shared;
use crate::status;

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
pub async fn run(shared: Arc<Shared>, listener: TcpListener, cancel: CancellationToken) {
    let app = Router::new()
        .route("/_status/check", get(check))
        .route("/_status/ping", get(ping))
        .route("/_status", get(detail))
        .route("/metrics", get(metrics))
        .with_state(shared);
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    let (mut crowded, mut failing) = (crate::server::Complaint::default(), crate::server::Complaint::default());
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
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

async fn check(State(shared): State<Arc<Shared>>) -> Response {
    let role = shared.role();
    if shared.is_active() {
        (StatusCode::OK, format!("active at epoch {}\n", role.epoch)).into_response()
    } else if let Some(why) = shared.held() {
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
async fn detail(State(shared): State<Arc<Shared>>) -> Response {
    let s = tokio::task::spawn_blocking(move || status::node_status(&shared)).await;
    match s {
        Ok(s) => Json(status::PublicStatus::from(s)).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let sent = shared.bytes_sent.load(Ordering::Relaxed);
    let counts: Vec<(warmspare_shared::config::Hook, bool, u64)> = warmspare_shared::config::Hook::ALL
        .iter()
        .flat_map(|h| [(*h, true), (*h, false)])
        .map(|(h, ok)| (h, ok, shared.hooks.count(h, ok)))
        .collect();
    let s = match tokio::task::spawn_blocking(move || status::node_status(&shared)).await {
        Ok(s) => s,
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    let mut out = String::new();
    let active = u8::from(s.role.active == s.node && s.held.is_none());
    let _ = writeln!(out, "# HELP warmspare_is_active 1 on the active node, 0 elsewhere.\n# TYPE warmspare_is_active gauge\nwarmspare_is_active {active}");
    let _ = writeln!(
        out,
        "# HELP warmspare_epoch The role epoch this node is at.\n# TYPE warmspare_epoch gauge\nwarmspare_epoch {}",
        s.role.epoch
    );
    let _ = writeln!(out, "# HELP warmspare_active_held 1 while this node's role state names it active but it does not act as active (no peer has confirmed its epoch, or on_promote is running or failed).\n# TYPE warmspare_active_held gauge\nwarmspare_active_held {}", u8::from(s.held.is_some()));
    let _ = writeln!(out, "# HELP warmspare_paused 1 while replication and jobs are held.\n# TYPE warmspare_paused gauge\nwarmspare_paused {}", u8::from(s.paused));
    let _ = writeln!(out, "# HELP warmspare_build_info The software and protocol version.\n# TYPE warmspare_build_info gauge\nwarmspare_build_info{{version=\"{}\",protocol=\"{}\"}} 1", s.version, s.protocol);
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
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for l in &s.links {
            let _ = writeln!(out, "{name}{{watch=\"{}\",peer=\"{}\"}} {}", l.watch, l.peer, value(l));
        }
    }
    let _ = writeln!(out, "# HELP warmspare_peer_connected 1 while the replication connection to a peer is up.\n# TYPE warmspare_peer_connected gauge");
    let mut seen = std::collections::BTreeSet::new();
    for l in &s.links {
        if seen.insert(&l.peer) {
            let _ = writeln!(
                out,
                "warmspare_peer_connected{{peer=\"{}\"}} {}",
                l.peer,
                u8::from(l.connected)
            );
        }
    }
    let _ = writeln!(out, "# HELP warmspare_last_success_timestamp_seconds When a watch last replicated (active: acknowledged by a peer; passive: applied, or found in step by a full comparison).\n# TYPE warmspare_last_success_timestamp_seconds gauge");
    for l in &s.links {
        if let Some(t) = l.last_success {
            let _ = writeln!(
                out,
                "warmspare_last_success_timestamp_seconds{{watch=\"{}\",peer=\"{}\"}} {t}",
                l.watch, l.peer
            );
        }
    }
    for w in &s.watches {
        if let Some(t) = w.last_applied {
            let _ = writeln!(
                out,
                "warmspare_last_success_timestamp_seconds{{watch=\"{}\"}} {t}",
                w.name
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP warmspare_watch_files Regular files under a watch root.\n# TYPE warmspare_watch_files gauge"
    );
    for w in &s.watches {
        let _ = writeln!(out, "warmspare_watch_files{{watch=\"{}\"}} {}", w.name, w.files);
    }
    let _ = writeln!(
        out,
        "# HELP warmspare_watch_root_ok 0 while a watch root fails its check (missing, not a directory, another file system) and nothing of it ships.\n# TYPE warmspare_watch_root_ok gauge"
    );
    for w in &s.watches {
        let _ = writeln!(
            out,
            "warmspare_watch_root_ok{{watch=\"{}\"}} {}",
            w.name,
            u8::from(w.root_error.is_none())
        );
    }
    let _ = writeln!(
        out,
        "# HELP warmspare_passive_local_changes On a passive: paths under a watch changed by anything but the receiver, waiting to be replaced by the active's version.\n# TYPE warmspare_passive_local_changes gauge"
    );
    for w in &s.watches {
        let _ = writeln!(
            out,
            "warmspare_passive_local_changes{{watch=\"{}\"}} {}",
            w.name, w.local_changes.pending
        );
    }
    let _ = writeln!(
        out,
        "# HELP warmspare_passive_local_changes_total On a passive: local changes flagged under a watch since the agent started.\n# TYPE warmspare_passive_local_changes_total counter"
    );
    for w in &s.watches {
        let _ = writeln!(
            out,
            "warmspare_passive_local_changes_total{{watch=\"{}\"}} {}",
            w.name, w.local_changes.total
        );
    }
    let _ = writeln!(
        out,
        "# HELP warmspare_deletions_held Files the deletion guard keeps on a peer until an operator allows their removal.\n# TYPE warmspare_deletions_held gauge"
    );
    for l in &s.links {
        let _ = writeln!(
            out,
            "warmspare_deletions_held{{watch=\"{}\",peer=\"{}\"}} {}",
            l.watch, l.peer, l.deletions_held
        );
    }
    let _ = writeln!(out, "# HELP warmspare_after_apply_runs_total Runs of a watch's after_apply hook on this node since the agent started.\n# TYPE warmspare_after_apply_runs_total counter");
    for w in &s.watches {
        if let Some(a) = &w.after_apply {
            let _ = writeln!(
                out,
                "warmspare_after_apply_runs_total{{watch=\"{}\",result=\"ok\"}} {}\nwarmspare_after_apply_runs_total{{watch=\"{}\",result=\"failed\"}} {}",
                w.name, a.runs_ok, w.name, a.runs_failed
            );
        }
    }
    let _ = writeln!(out, "# HELP warmspare_after_apply_failed 1 while the last run of a watch's after_apply hook failed or timed out.\n# TYPE warmspare_after_apply_failed gauge");
    for w in &s.watches {
        if let Some(a) = &w.after_apply {
            let failed = a.last.as_ref().is_some_and(|r| !r.ok);
            let _ = writeln!(
                out,
                "warmspare_after_apply_failed{{watch=\"{}\"}} {}",
                w.name,
                u8::from(failed)
            );
        }
    }
    let _ = writeln!(out, "# HELP warmspare_after_apply_running 1 while a watch's after_apply hook runs.\n# TYPE warmspare_after_apply_running gauge");
    for w in &s.watches {
        if let Some(a) = &w.after_apply {
            let _ = writeln!(
                out,
                "warmspare_after_apply_running{{watch=\"{}\"}} {}",
                w.name,
                u8::from(a.running)
            );
        }
    }
    let _ = writeln!(out, "# HELP warmspare_bytes_sent_total Bytes sent to peers, framing included.\n# TYPE warmspare_bytes_sent_total counter\nwarmspare_bytes_sent_total {sent}");
    let _ = writeln!(out, "# HELP warmspare_job_runs_total Job runs on this node since the agent started.\n# TYPE warmspare_job_runs_total counter");
    for j in &s.jobs {
        let _ = writeln!(
            out,
            "warmspare_job_runs_total{{job=\"{}\",result=\"ok\"}} {}",
            j.name, j.runs_ok
        );
        let _ = writeln!(
            out,
            "warmspare_job_runs_total{{job=\"{}\",result=\"failed\"}} {}",
            j.name, j.runs_failed
        );
    }
    let _ = writeln!(out, "# HELP warmspare_job_last_run_timestamp_seconds When the last run of a job ended.\n# TYPE warmspare_job_last_run_timestamp_seconds gauge");
    for j in &s.jobs {
        if let Some(r) = &j.last {
            let result = if r.ok { "ok" } else { "failed" };
            let _ = writeln!(
                out,
                "warmspare_job_last_run_timestamp_seconds{{job=\"{}\",result=\"{result}\"}} {}",
                j.name,
                r.end_ms / 1000
            );
        }
    }
    let _ = writeln!(out, "# HELP warmspare_job_next_run_timestamp_seconds When a job is next due on this node, where it is scheduled here.\n# TYPE warmspare_job_next_run_timestamp_seconds gauge");
    for j in &s.jobs {
        if let Some(next) = j.next {
            let _ = writeln!(
                out,
                "warmspare_job_next_run_timestamp_seconds{{job=\"{}\"}} {next}",
                j.name
            );
        }
    }
    let _ = writeln!(out, "# HELP warmspare_hook_runs_total Role hook runs on this node since the agent started.\n# TYPE warmspare_hook_runs_total counter");
    let _ = writeln!(
        out,
        "# HELP warmspare_hook_failed 1 while the last run of a role hook failed.\n# TYPE warmspare_hook_failed gauge"
    );
    for hook in warmspare_shared::config::Hook::ALL {
        for (ok, result) in [(true, "ok"), (false, "failed")] {
            let _ = writeln!(
                out,
                "warmspare_hook_runs_total{{hook=\"{hook}\",result=\"{result}\"}} {}",
                hooks_counts(&counts, hook, ok)
            );
        }
        let failed = s.hooks.iter().any(|r| r.hook == hook && r.end_ms.is_some() && !r.ok);
        let _ = writeln!(out, "warmspare_hook_failed{{hook=\"{hook}\"}} {}", u8::from(failed));
    }
    let _ = writeln!(out, "# HELP warmspare_diverged_files_total Files preserved under diverged/.\n# TYPE warmspare_diverged_files_total gauge\nwarmspare_diverged_files_total {}", s.diverged.len());
    let _ = writeln!(out, "# HELP warmspare_diverged_pruned_total Preserved files removed from diverged/ to keep it within diverged_max_size and diverged_max_age.\n# TYPE warmspare_diverged_pruned_total counter\nwarmspare_diverged_pruned_total {}", warmspare_shared::diverged::pruned_total());
    let _ = writeln!(out, "# HELP warmspare_undo_files Files kept in the undo store (files replication removed or replaced on this node).\n# TYPE warmspare_undo_files gauge\nwarmspare_undo_files {}", s.undo.files);
    let _ = writeln!(out, "# HELP warmspare_undo_bytes Bytes kept in the undo store.\n# TYPE warmspare_undo_bytes gauge\nwarmspare_undo_bytes {}", s.undo.bytes);
    let _ = writeln!(out, "# HELP warmspare_undo_pruned_total Files removed from the undo store to keep it within undo_max_size and undo_max_age.\n# TYPE warmspare_undo_pruned_total counter\nwarmspare_undo_pruned_total {}", s.undo.pruned);
    let _ = writeln!(out, "# HELP warmspare_undo_skipped_total Files removed or replaced without a copy in the undo store (larger than undo_max_size, or an error).\n# TYPE warmspare_undo_skipped_total counter\nwarmspare_undo_skipped_total {}", s.undo.skipped);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
