//! Tests of the `health` module.

use super::*;

/// A status with one of everything a metric is made from.
fn sample() -> NodeStatus {
    serde_json::from_value(serde_json::json!({
        "node": "a", "version": "1.2.3", "protocol": 4, "config_hash": "h",
        "role": {"epoch": 7, "active": "a"}, "paused": false,
        "watches": [
            {"name": "ca", "files": 3, "bytes": 30, "last_applied": 1700000000,
             "root_error": null,
             "after_apply": {"running": true, "queued": false, "runs_ok": 2, "runs_failed": 1,
                             "last": {"start_ms": 1, "end_ms": 2, "ok": false, "detail": "x"}},
             "local_changes": {"pending": 1, "total": 4, "latest": []}},
            {"name": "www", "files": 0, "bytes": 0, "last_applied": null,
             "root_error": "missing", "after_apply": null,
             "local_changes": {"pending": 0, "total": 0, "latest": []}}
        ],
        "links": [
            {"peer": "b", "watch": "ca", "connected": true, "pending_changes": 2, "lag_bytes": 10,
             "lag_seconds": 1.5, "last_success": 1700000001, "last_error": null, "deletions_held": 3},
            {"peer": "b", "watch": "www", "connected": true, "pending_changes": 0, "lag_bytes": 0,
             "lag_seconds": 0.0, "last_success": null, "last_error": null, "deletions_held": 0}
        ],
        "diverged": ["x/1"],
        "started": 1,
        "jobs": [
            {"name": "dump", "last": {"job": "dump", "kind": "Dump", "start_ms": 1000, "end_ms": 5000,
             "ok": true, "detail": "", "bytes": 1, "generation": 2},
             "next": 1700000100, "runs_ok": 5, "runs_failed": 0, "generation": 2}
        ],
        "held": null,
        "hooks": [
            {"hook": "on_promote", "epoch": 7, "from": "b", "start_ms": 1, "end_ms": 2, "ok": false, "detail": "x"}
        ],
        "undo": {"files": 1, "bytes": 2, "max_size": 3, "max_age_s": 4, "pruned": 5, "skipped": 6}
    }))
    .expect("the sample status")
}

/// Every family and sample, byte for byte as before.
#[test]
fn the_exposition_is_unchanged() {
    let counts = [
        (Hook::OnPromote, true, 2),
        (Hook::OnPromote, false, 1),
        (Hook::OnDemote, true, 0),
    ];
    assert_eq!(render(&sample(), (1234, 5678), &counts), EXPECTED);
}

/// What the hand-written lines of each family gave for [`sample`]
/// before they shared one writer.
const EXPECTED: &str = r#"# HELP warmspare_is_active 1 on the active node, 0 elsewhere.
# TYPE warmspare_is_active gauge
warmspare_is_active 1
# HELP warmspare_epoch The role epoch this node is at.
# TYPE warmspare_epoch gauge
warmspare_epoch 7
# HELP warmspare_active_held 1 while this node's role state names it active but it does not act as active (no peer has confirmed its epoch, or on_promote is running or failed).
# TYPE warmspare_active_held gauge
warmspare_active_held 0
# HELP warmspare_paused 1 while replication and jobs are held.
# TYPE warmspare_paused gauge
warmspare_paused 0
# HELP warmspare_build_info The software and protocol version.
# TYPE warmspare_build_info gauge
warmspare_build_info{version="1.2.3",protocol="4"} 1
# HELP warmspare_replication_lag_seconds Age of the oldest change not yet acknowledged by a peer.
# TYPE warmspare_replication_lag_seconds gauge
warmspare_replication_lag_seconds{watch="ca",peer="b"} 1.5
warmspare_replication_lag_seconds{watch="www",peer="b"} 0
# HELP warmspare_replication_lag_bytes Bytes of the files not yet acknowledged by a peer.
# TYPE warmspare_replication_lag_bytes gauge
warmspare_replication_lag_bytes{watch="ca",peer="b"} 10
warmspare_replication_lag_bytes{watch="www",peer="b"} 0
# HELP warmspare_peer_connected 1 while the replication connection to a peer is up.
# TYPE warmspare_peer_connected gauge
warmspare_peer_connected{peer="b"} 1
# HELP warmspare_last_success_timestamp_seconds When a watch last replicated (active: acknowledged by a peer; passive: applied, or found in step by a full comparison).
# TYPE warmspare_last_success_timestamp_seconds gauge
warmspare_last_success_timestamp_seconds{watch="ca",peer="b"} 1700000001
warmspare_last_success_timestamp_seconds{watch="ca"} 1700000000
# HELP warmspare_watch_files Regular files under a watch root.
# TYPE warmspare_watch_files gauge
warmspare_watch_files{watch="ca"} 3
warmspare_watch_files{watch="www"} 0
# HELP warmspare_watch_root_ok 0 while a watch root fails its check (missing, not a directory, another file system) and nothing of it ships.
# TYPE warmspare_watch_root_ok gauge
warmspare_watch_root_ok{watch="ca"} 1
warmspare_watch_root_ok{watch="www"} 0
# HELP warmspare_passive_local_changes On a passive: paths under a watch changed by anything but the receiver, waiting to be replaced by the active's version.
# TYPE warmspare_passive_local_changes gauge
warmspare_passive_local_changes{watch="ca"} 1
warmspare_passive_local_changes{watch="www"} 0
# HELP warmspare_passive_local_changes_total On a passive: local changes flagged under a watch since the agent started.
# TYPE warmspare_passive_local_changes_total counter
warmspare_passive_local_changes_total{watch="ca"} 4
warmspare_passive_local_changes_total{watch="www"} 0
# HELP warmspare_deletions_held Files the deletion guard keeps on a peer until an operator allows their removal.
# TYPE warmspare_deletions_held gauge
warmspare_deletions_held{watch="ca",peer="b"} 3
warmspare_deletions_held{watch="www",peer="b"} 0
# HELP warmspare_after_apply_runs_total Runs of a watch's after_apply hook on this node since the agent started.
# TYPE warmspare_after_apply_runs_total counter
warmspare_after_apply_runs_total{watch="ca",result="ok"} 2
warmspare_after_apply_runs_total{watch="ca",result="failed"} 1
# HELP warmspare_after_apply_failed 1 while the last run of a watch's after_apply hook failed or timed out.
# TYPE warmspare_after_apply_failed gauge
warmspare_after_apply_failed{watch="ca"} 1
# HELP warmspare_after_apply_running 1 while a watch's after_apply hook runs.
# TYPE warmspare_after_apply_running gauge
warmspare_after_apply_running{watch="ca"} 1
# HELP warmspare_bytes_sent_total Bytes sent to peers, framing included.
# TYPE warmspare_bytes_sent_total counter
warmspare_bytes_sent_total 1234
# HELP warmspare_bytes_sent_uncompressed_total What the bytes sent to peers stand for before compression, framing included.
# TYPE warmspare_bytes_sent_uncompressed_total counter
warmspare_bytes_sent_uncompressed_total 5678
# HELP warmspare_job_runs_total Job runs on this node since the agent started.
# TYPE warmspare_job_runs_total counter
warmspare_job_runs_total{job="dump",result="ok"} 5
warmspare_job_runs_total{job="dump",result="failed"} 0
# HELP warmspare_job_last_run_timestamp_seconds When the last run of a job ended.
# TYPE warmspare_job_last_run_timestamp_seconds gauge
warmspare_job_last_run_timestamp_seconds{job="dump",result="ok"} 5
# HELP warmspare_job_next_run_timestamp_seconds When a job is next due on this node, where it is scheduled here.
# TYPE warmspare_job_next_run_timestamp_seconds gauge
warmspare_job_next_run_timestamp_seconds{job="dump"} 1700000100
# HELP warmspare_hook_runs_total Role hook runs on this node since the agent started.
# TYPE warmspare_hook_runs_total counter
# HELP warmspare_hook_failed 1 while the last run of a role hook failed.
# TYPE warmspare_hook_failed gauge
warmspare_hook_runs_total{hook="on_promote",result="ok"} 2
warmspare_hook_runs_total{hook="on_promote",result="failed"} 1
warmspare_hook_failed{hook="on_promote"} 1
warmspare_hook_runs_total{hook="on_demote",result="ok"} 0
warmspare_hook_runs_total{hook="on_demote",result="failed"} 0
warmspare_hook_failed{hook="on_demote"} 0
# HELP warmspare_diverged_files_total Files preserved under diverged/.
# TYPE warmspare_diverged_files_total gauge
warmspare_diverged_files_total 1
# HELP warmspare_diverged_pruned_total Preserved files removed from diverged/ to keep it within diverged_max_size and diverged_max_age.
# TYPE warmspare_diverged_pruned_total counter
warmspare_diverged_pruned_total 0
# HELP warmspare_undo_files Files kept in the undo store (files replication removed or replaced on this node).
# TYPE warmspare_undo_files gauge
warmspare_undo_files 1
# HELP warmspare_undo_bytes Bytes kept in the undo store.
# TYPE warmspare_undo_bytes gauge
warmspare_undo_bytes 2
# HELP warmspare_undo_pruned_total Files removed from the undo store to keep it within undo_max_size and undo_max_age.
# TYPE warmspare_undo_pruned_total counter
warmspare_undo_pruned_total 5
# HELP warmspare_undo_skipped_total Files removed or replaced without a copy in the undo store (larger than undo_max_size, or an error) under undo_when_full = replace.
# TYPE warmspare_undo_skipped_total counter
warmspare_undo_skipped_total 6
"#;
