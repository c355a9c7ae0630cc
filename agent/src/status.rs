//! What an agent reports about itself to `warmsparectl status` and `/_status`.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::SystemTime;

use warmspare_shared::manifest::join;
use warmspare_shared::proto::{LinkStatus, NodeStatus, WatchStatus, PROTOCOL_VERSION};

use crate::daemon::{unix, Shared};

/// The most pending paths whose sizes are added up for the byte lag.
const LAG_STAT_LIMIT: usize = 10_000;
/// The most diverged files listed.
const DIVERGED_LIST_LIMIT: usize = 1_000;

/// This node's status now.
pub fn node_status(shared: &Shared) -> NodeStatus {
    let now = SystemTime::now();
    let rt = shared.runtime();
    let watches: Vec<WatchStatus> = shared
        .local_watches()
        .iter()
        .map(|w| {
            let (files, bytes) = count(&w.root);
            WatchStatus {
                name: w.name.clone(),
                files,
                bytes,
                last_applied: rt.last_applied.get(&w.name).map(|t| unix(*t)),
            }
        })
        .collect();
    let mut links = Vec::new();
    for (peer, inbox) in &rt.inboxes {
        let waiting = inbox.peek();
        let link = rt.links.get(peer).cloned().unwrap_or_default();
        for w in shared.local_watches() {
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
            });
        }
    }
    drop(rt);
    NodeStatus {
        node: shared.me.name.clone(),
        version: warmspare_shared::VERSION.to_string(),
        protocol: PROTOCOL_VERSION,
        config_hash: shared.config_hash().clone(),
        role: shared.role(),
        paused: shared.is_paused(),
        watches,
        links,
        diverged: diverged(&shared.state_dir.join("diverged")),
        started: unix(shared.started),
        jobs: shared.jobs.statuses(&shared.cluster().job),
    }
}

/// Regular files under `root` and their total size (links are not followed).
fn count(root: &Path) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for de in rd.flatten() {
            let Ok(ft) = de.file_type() else { continue };
            if ft.is_dir() {
                stack.push(de.path());
            } else if ft.is_file()
                && !de
                    .file_name()
                    .to_str()
                    .is_some_and(warmspare_shared::manifest::is_temp_name)
            {
                files += 1;
                bytes += de.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    (files, bytes)
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
                out.push(rel.to_string_lossy().to_string());
                if out.len() >= DIVERGED_LIST_LIMIT {
                    return out;
                }
            }
        }
    }
    out.sort();
    out
}
