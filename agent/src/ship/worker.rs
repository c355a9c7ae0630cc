//! The shipper's worker, on a blocking thread for the length of a
//! session: work from the inbox, full comparisons against the model of the
//! peer, the deletion guard, retries of failed paths, and the agreement
//! recorded after a clean full comparison.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::Result;
use warmspare_shared::beneath::Dirs;
use warmspare_shared::manifest::{ContentHash, EntryKind, HashCache};
use warmspare_shared::proto::{Op, Request};
use warmspare_shared::relpath;

use crate::events::{Inbox, Work};

use super::handles::Handles;
use super::plan::{compact, plan_prefix, remote_remove_tree, top_most, Model, Plan, Remote};
use super::session::{fetch_manifest, flush_commit, wait_ack, BatchStats, Closed, Retry, SessionIo};
use super::transfer::{ship_above, ship_prefix};

/// How often a connected shipper compares whole trees even without events.
const FULL_RESYNC: Duration = Duration::from_secs(600);
/// The first and the longest wait before changes the peer could not apply
/// (a full disk, say) are sent again.
const RETRY_MIN: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// The deletion guard counts the removals of this long together.
const DELETE_WINDOW: Duration = Duration::from_secs(60);
/// How often a watch root that failed its check is looked at again.
const ROOT_RECHECK: Duration = Duration::from_secs(2);

pub(super) fn sync_loop(handles: &Handles, peer: &str, mut io: SessionIo, inbox: &Inbox, owners: bool) -> Result<()> {
    let watches = handles.live.local_watches();
    let mut caches: HashMap<String, HashCache> = watches
        .iter()
        .map(|w| {
            (
                w.name.clone(),
                HashCache::load(&handles.live.cache_path(&w.name, "send")),
            )
        })
        .collect();
    let mut model: Model = HashMap::new();
    // Watches whose hash cache waits on disk between full comparisons (see
    // below); their in-memory cache holds only what was learnt since.
    let mut on_disk: std::collections::HashSet<String> = std::collections::HashSet::new();
    for w in &watches {
        inbox.add_full(&w.name);
    }
    let mut retry = Retry {
        paths: BTreeSet::new(),
        at: None,
        backoff: RETRY_MIN,
    };
    let mut next_full = Instant::now() + FULL_RESYNC;
    // Watches whose root failed its check: nothing of theirs ships until it
    // passes again (looked at every ROOT_RECHECK), then they are compared whole.
    let mut bad_roots: BTreeSet<String> = BTreeSet::new();
    let mut root_recheck: Option<Instant> = None;
    // Removals the deletion guard holds, per watch: path, files under it.
    let mut held: HashMap<String, BTreeMap<String, u64>> = HashMap::new();
    // Files removed on the peer per watch in the last DELETE_WINDOW: an `rm
    // -r` arrives in several batches (what is removed while one is in flight
    // ships as the next), and the guard counts them together.
    let mut removed_lately: HashMap<String, Vec<(Instant, u64)>> = HashMap::new();
    let mut unreadable = Unreadable::default();
    let stamp = io.stamp.clone();
    let tick = || stamp.stamp();
    loop {
        // Every round stamps the shipper's progress; so do the waits and
        // the work below (see `crate::progress`).
        stamp.stamp();
        if handles.pause.is_paused() || test_hold(peer) {
            inbox.wait_interrupt(Duration::from_secs(1));
            if io.frames.is_closed() {
                return Err(Closed.into());
            }
            continue;
        }
        if retry.at.is_some_and(|at| Instant::now() >= at) {
            retry.at = None;
            for (watch, path) in std::mem::take(&mut retry.paths) {
                if path.is_empty() {
                    // The peer left failures out of an acknowledgement (see
                    // `proto::bound_failures`): compare the whole watch,
                    // with a fresh manifest of the peer.
                    inbox.add_full(&watch);
                } else {
                    inbox.add_paths(&watch, [path]);
                }
            }
        }
        if root_recheck.is_some_and(|at| Instant::now() >= at) {
            root_recheck = None;
            bad_roots.retain(|name| {
                let Some(w) = watches.iter().find(|w| &w.name == name) else {
                    return false;
                };
                if handles.roots.verify(&w.name, &w.root).is_ok() {
                    inbox.add_full(&w.name);
                    return false;
                }
                true
            });
            if !bad_roots.is_empty() {
                root_recheck = Some(Instant::now() + ROOT_RECHECK);
            }
        }
        let wake = retry.at.map_or(next_full, |at| at.min(next_full));
        let wake = root_recheck.map_or(wake, |at| at.min(wake));
        // At most a second at a time: an interrupt that came while the
        // worker was busy is not seen by `take`, and a closed connection
        // must end the worker (or the agent could not stop).
        if io.frames.is_closed() {
            return Err(Closed.into());
        }
        let wait = wake
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(1));
        let work = match inbox.take(wait) {
            Some(w) => w,
            None if io.frames.is_closed() => return Err(Closed.into()),
            None if crate::progress::test_hang("shipper") => crate::progress::hang_thread("the shipper"),
            None if handles.pause.is_paused() => continue,
            None if Instant::now() < next_full => {
                // Idle: the peer is caught up (about every second).
                mark_caught_up(&mut io, inbox, &retry, &bad_roots)?;
                continue;
            }
            None => {
                // Periodic safety net: compare everything.
                let mut w = Work::default();
                w.full.extend(watches.iter().map(|w| w.name.clone()));
                w
            }
        };
        if test_hold(peer) {
            // Held while it waited for this work: it waits in the inbox.
            inbox.put_back(work);
            continue;
        }
        if !work.full.is_empty() {
            next_full = Instant::now() + FULL_RESYNC;
        }
        handles.telemetry.link(peer, |l| l.in_progress = Some(work.clone()));
        let started = Instant::now();
        let mut stats = BatchStats::default();
        let mut settled: Vec<(String, Vec<(String, ContentHash)>)> = Vec::new();
        // Files a full comparison left on the peer because the guard held their removal.
        let mut held_except: Vec<(String, Vec<String>)> = Vec::new();
        let result = (|| -> Result<()> {
            for w in &watches {
                let full = work.full.contains(&w.name);
                let paths = work.paths.get(&w.name);
                if !full && paths.is_none() {
                    continue;
                }
                if w.verify_root && handles.roots.verify(&w.name, &w.root).is_err() {
                    // Never ship a tree from a root that failed its check:
                    // it would look empty and empty the peer. The error is
                    // logged, and shown in status, metrics and `check`.
                    bad_roots.insert(w.name.clone());
                    root_recheck.get_or_insert_with(|| Instant::now() + ROOT_RECHECK);
                    continue;
                }
                let cache = caches.entry(w.name.clone()).or_default();
                if full && on_disk.remove(&w.name) {
                    let since = std::mem::take(cache);
                    *cache = HashCache::load(&handles.live.cache_path(&w.name, "send"));
                    cache.absorb(since);
                }
                if full || !model.contains_key(&w.name) {
                    let remote = fetch_manifest(&mut io, &w.name)?;
                    model.insert(w.name.clone(), Remote::from_manifest(remote));
                }
                let prefixes: Vec<String> = if full {
                    vec![String::new()]
                } else {
                    top_most(paths.into_iter().flatten())
                };
                let remote = model.entry(w.name.clone()).or_default();
                // One set of directory handles for the batch: its scans and
                // the files it sends open each directory once, not once per
                // path (see `beneath::Dirs` for what a directory renamed
                // meanwhile does: the rename is an event of its own).
                let mut dirs = Dirs::at(&w.root);
                let plans: Vec<Plan> = prefixes
                    .iter()
                    .map(|p| plan_prefix(w, &mut dirs, p, cache, remote, &tick))
                    .collect();
                // The deletion guard: counted against the peer's files in
                // this watch, over the whole batch.
                let deleting: u64 = plans
                    .iter()
                    .flat_map(|p| &p.removals)
                    .filter(|r| r.deletion)
                    .map(|r| r.files)
                    .sum();
                let peer_files = remote
                    .values()
                    .filter(|h| matches!(h.kind, EntryKind::File { .. }))
                    .count() as u64;
                let allowed = full && handles.allow_deletes.take(peer, &w.name);
                let lately = removed_lately.entry(w.name.clone()).or_default();
                lately.retain(|(at, _)| at.elapsed() < DELETE_WINDOW);
                let before: u64 = lately.iter().map(|(_, n)| n).sum();
                let hold = !allowed && deleting > 0 && w.max_delete.holds(before + deleting, peer_files + before);
                if !hold && deleting > 0 {
                    lately.push((Instant::now(), deleting));
                }
                let held_here = held.entry(w.name.clone()).or_default();
                if full {
                    held_here.clear();
                } else {
                    held_here.retain(|path, _| !prefixes.iter().any(|p| relpath::is_under(path, p)));
                }
                if hold {
                    tracing::error!(
                        peer,
                        watch = w.name,
                        files = deleting,
                        of = peer_files,
                        limit = %w.max_delete,
                        "deletions held: this would remove more of the peer's files than max_delete allows; \
                         nothing is removed until `warmsparectl resync --watch {} --allow-deletes`",
                        w.name
                    );
                } else if allowed && deleting > 0 {
                    tracing::warn!(
                        peer,
                        watch = w.name,
                        files = deleting,
                        "removing what the deletion guard held, as the operator allowed"
                    );
                }
                let mut except: Vec<String> = Vec::new();
                let mut above = BTreeSet::new();
                for mut plan in plans {
                    if hold {
                        plan.removals.retain(|r| {
                            if r.deletion {
                                held_here.insert(r.path.clone(), r.files);
                                except.extend(
                                    remote
                                        .subtree(&r.path)
                                        .filter(|(_, h)| matches!(h.kind, EntryKind::File { .. }))
                                        .map(|(p, _)| p.to_string()),
                                );
                            }
                            !r.deletion
                        });
                    }
                    let local = ship_prefix(
                        &mut io, w, &mut dirs, plan, cache, remote, &mut stats, owners, &mut above,
                    )?;
                    if full {
                        settled.push((w.name.clone(), local));
                    }
                }
                ship_above(&mut io, w, &mut dirs, above, remote, &mut stats)?;
                if full {
                    held_except.push((w.name.clone(), except));
                }
                let count: u64 = held_here.values().sum();
                handles.telemetry.link(peer, |l| {
                    if count == 0 {
                        l.deletions_held.remove(&w.name);
                    } else {
                        l.deletions_held.insert(w.name.clone(), count);
                    }
                });
                flush_commit(&mut io, &mut stats, &w.name)?;
            }
            while !io.outstanding.is_empty() {
                wait_ack(&mut io, peer)?;
            }
            // Full comparisons applied: both sides agree on every file but
            // the failures and what this node could not read.
            for (watch, _) in &settled {
                let except: Vec<String> = io
                    .failures
                    .iter()
                    .filter(|(w, _)| w == watch)
                    .map(|(_, p)| p.clone())
                    .chain(
                        held_except
                            .iter()
                            .filter(|(w, _)| w == watch)
                            .flat_map(|(_, e)| e.iter().cloned()),
                    )
                    .chain(
                        stats
                            .unreadable
                            .iter()
                            .filter(|(w, _, _)| w == watch)
                            .map(|(_, p, _)| p.clone()),
                    )
                    .collect();
                io.send(&Request::Op(Op::Settled {
                    watch: watch.clone(),
                    except,
                }))?;
            }
            // The loop waits for the next work after this: nothing may stay queued.
            io.flush()
        })();
        for (name, cache) in caches.iter_mut() {
            stamp.stamp();
            // A partial cache must not replace the whole one on disk.
            if on_disk.contains(name) {
                continue;
            }
            if let Err(e) = cache.save(&handles.live.cache_path(name, "send")) {
                tracing::warn!(watch = name, error = %e, "cannot save the hash cache");
            }
        }
        let failures: Vec<(String, String)> = io.failures.drain(..).collect();
        // What the peer could not apply is forgotten, so the next comparison resends it.
        for (watch, path) in &failures {
            if let Some(m) = model.get_mut(watch) {
                remote_remove_tree(m, path);
            }
        }
        if let Err(e) = result {
            inbox.put_back(work);
            handles.telemetry.link(peer, |l| l.in_progress = None);
            return Err(e);
        }
        unreadable.update(&stats);
        let unread: Vec<(String, String)> = stats
            .unreadable
            .iter()
            .map(|(w, p, _)| (w.clone(), p.clone()))
            .collect();
        record_agreement(
            handles,
            &stats.touched,
            &settled,
            &[&failures[..], &unread[..]].concat(),
        );
        if !work.full.is_empty() {
            // A full comparison's scans and manifests are gone: give the memory back.
            drop(settled);
            for name in &work.full {
                if let Some(remote) = model.get_mut(name) {
                    compact(remote);
                }
                // The hash cache is only read in bulk by the next full
                // comparison (events hash the files they name, which
                // changed): it waits on disk, just saved, until then. With
                // 100,000 files that is 15 MB less while idle.
                if let Some(cache) = caches.get_mut(name) {
                    if !cache.is_dirty() {
                        *cache = HashCache::default();
                        on_disk.insert(name.clone());
                    }
                }
            }
        }
        if stats.ops > 0 {
            tracing::info!(
                peer,
                ops = stats.ops,
                files = stats.files,
                wire_bytes = stats.wire_bytes,
                ms = started.elapsed().as_millis() as u64,
                "batch replicated"
            );
        }
        if !work.full.is_empty() {
            tracing::info!(
                peer,
                watches = work.full.len(),
                ms = started.elapsed().as_millis() as u64,
                "compared in full"
            );
            // Only once the batch's own records are gone too: after an
            // initial sync of 100,000 files, `stats` alone holds two strings
            // per file shipped. Freed after the trim, they left 35 MiB of
            // free pages resident in the worker's arena (62.1 MiB idle
            // against 27.6 MiB once trimmed again).
            drop(stats);
            drop(unread);
            warmspare_shared::sys::release_free_memory();
        }
        let unapplied = if failures.is_empty() {
            retry.backoff = RETRY_MIN;
            unreadable.summary()
        } else {
            let wait = retry.backoff;
            retry.paths.extend(failures.iter().cloned());
            retry.at = Some(Instant::now() + wait);
            retry.backoff = (wait * 2).min(RETRY_MAX);
            let (watch, path) = &failures[0];
            Some(format!(
                "{} change(s) not applied on {peer}, first {watch}/{path}: {}; retrying in {} s",
                failures.len(),
                io.failure_reason.take().unwrap_or_default(),
                wait.as_secs()
            ))
        };
        let now = std::time::SystemTime::now();
        handles.telemetry.link(peer, |l| {
            l.in_progress = None;
            l.last_error = unapplied;
            l.done_generation = l.done_generation.max(work.generation);
            for w in work.full.iter().chain(work.paths.keys()) {
                // A watch whose root failed its check shipped nothing.
                if !bad_roots.contains(w) {
                    l.last_success.insert(w.clone(), now);
                }
            }
        });
        mark_caught_up(&mut io, inbox, &retry, &bad_roots)?;
    }
}

/// Tells the peer it is caught up (a `Ping` in the replication session,
/// see `lag`) when nothing is pending for it: the inbox empty, nothing to
/// retry, no watch held by a failed root check. Every batch before it has
/// been acknowledged (the worker waits for that before it finishes one).
fn mark_caught_up(io: &mut SessionIo, inbox: &Inbox, retry: &Retry, bad_roots: &BTreeSet<String>) -> Result<()> {
    if !inbox.is_idle() || !retry.paths.is_empty() || !bad_roots.is_empty() {
        return Ok(());
    }
    io.send(&Request::Ping)?;
    io.flush()
}

/// For tests only: while the file `<dir>/<peer>` exists, where `dir` is
/// what `WARMSPARE_TEST_HOLD_SHIP` names, the shipper to `peer` ships
/// nothing, as if paused (a passive falling behind while its probe still
/// answers). Unset (always, outside tests), this costs one look at a
/// cached variable.
fn test_hold(peer: &str) -> bool {
    static DIR: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| std::env::var_os("WARMSPARE_TEST_HOLD_SHIP").map(std::path::PathBuf::from))
        .as_ref()
        .is_some_and(|dir| dir.join(peer).exists())
}

/// Records in the ledger what the peer acknowledged (for divergence checks
/// after a role change).
fn record_agreement(
    handles: &Handles,
    touched: &[(String, String, Option<ContentHash>)],
    settled: &[(String, Vec<(String, ContentHash)>)],
    failures: &[(String, String)],
) {
    let failed = |w: &str, p: &str| failures.iter().any(|(fw, fp)| fw == w && relpath::is_under(p, fp));
    let mut ledgers = handles.ledgers.lock().unwrap_or_else(|p| p.into_inner());
    for (watch, local) in settled {
        let entries = local
            .iter()
            .filter(|(p, _)| !failed(watch, p))
            .map(|(p, h)| (p.as_str(), *h));
        ledgers.agree(watch, entries);
    }
    // What was removed goes first, in one pass over each ledger (a pass per
    // removed path cost a burst that deleted 6,700 files 2.3% of the active's
    // CPU), then what was sent: the same as in order, since within a prefix
    // every removal is sent before anything else and a batch's prefixes
    // are disjoint.
    let mut removed: HashMap<&str, Vec<&str>> = HashMap::new();
    for (watch, path, hash) in touched {
        if hash.is_none() && !failed(watch, path) {
            removed.entry(watch.as_str()).or_default().push(path.as_str());
        }
    }
    for (watch, paths) in removed {
        ledgers.watch(watch).forget_trees(&paths);
    }
    for (watch, path, hash) in touched {
        if let Some(h) = hash.filter(|_| !failed(watch, path)) {
            ledgers.watch(watch).set(path, h);
        }
    }
    if let Err(e) = ledgers.save_if_due(Duration::from_secs(2)) {
        tracing::warn!(error = %e, "cannot save the sync ledger");
    }
}

/// The paths of this node that could not be read, as last seen, per watch
/// and path: reported in the link's status until a comparison reads them.
#[derive(Default)]
struct Unreadable {
    paths: BTreeMap<(String, String), String>,
}

impl Unreadable {
    /// Takes in a batch's findings: what it compared is replaced by what it
    /// found there.
    fn update(&mut self, stats: &BatchStats) {
        for (watch, prefix) in &stats.scanned {
            self.paths
                .retain(|(w, p), _| w != watch || !relpath::is_under(p, prefix));
        }
        for (watch, path, why) in &stats.unreadable {
            self.paths.insert((watch.clone(), path.clone()), why.clone());
        }
    }

    /// A line for the link's `last_error`, when anything is unreadable.
    fn summary(&self) -> Option<String> {
        let ((watch, path), why) = self.paths.iter().next()?;
        Some(format!(
            "{} path(s) cannot be read on this node, first {watch}/{path}: {why}; the peer's copies are kept",
            self.paths.len()
        ))
    }
}
