//! The watcher: inotify events, batched per watch (see [`batch`]: on their
//! leading edge by default), into every shipper's inbox.
//!
//! inotify only makes replication fast; correctness comes from the state-based
//! comparison the shippers run. So the watcher errs on the side of more work:
//! a queue overflow or a watch that cannot be added asks for a full
//! comparison, and a created directory is compared whole (whatever was made
//! inside it before its watch landed is found by that scan).
//!
//! An overflow also loses the creation events of directories, and with them
//! the watches the recursive watcher would have added: after one, the roots
//! are watched again from the top (which adds what is missing) before the
//! full comparison is asked for, so later changes in those directories are
//! seen too.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use warmspare_shared::relpath;

use crate::events::Inbox;
use crate::progress::Stamp;

mod batch;

use batch::{Batcher, Edge};

/// How long lost events are gathered before the watches are renewed and a
/// full comparison is asked for: an overflowing burst reports many losses.
const RESCAN_GATHER: Duration = Duration::from_millis(100);

/// One watched directory.
pub struct Target {
    /// The watch's name.
    pub name: String,
    /// Its local root.
    pub root: PathBuf,
    /// Quiet time that ends a batch (`debounce_ms`); zero ships complete
    /// changes on their leading edge (see [`batch`]).
    pub debounce: Duration,
}

enum Raw {
    Paths(Vec<PathBuf>, Edge),
    /// A directory was made: its paths ship only once notify watches it
    /// (see [`settle_new_watches`]).
    NewDir(Vec<PathBuf>),
    Rescan(Option<PathBuf>),
}

/// Events from notify's thread waiting for the watcher task.
const RAW_QUEUE: usize = 8192;
/// Distinct paths one watch's batch gathers before it becomes "compare the
/// whole watch" (the inbox has the same limit).
const MAX_PENDING: usize = 50_000;

/// The bounded hand-off from notify's thread to the watcher task: an event
/// that finds it full is dropped and the overflow flagged, which the task
/// answers like a kernel queue overflow (watch again, compare everything).
/// Nothing is lost, and memory stays bounded when the task falls behind.
struct RawQueue {
    tx: mpsc::Sender<Raw>,
    overflow: Arc<tokio::sync::Notify>,
}

impl RawQueue {
    fn new(capacity: usize) -> (RawQueue, mpsc::Receiver<Raw>) {
        let (tx, rx) = mpsc::channel(capacity);
        (
            RawQueue {
                tx,
                overflow: Arc::new(tokio::sync::Notify::new()),
            },
            rx,
        )
    }

    /// Never blocks (notify's thread calls it).
    fn push(&self, raw: Raw) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(raw) {
            // A stored permit: the task sees it even if it is busy now.
            self.overflow.notify_one();
        }
    }
}

/// Returns once notify has watched every directory whose creation it has
/// delivered. notify reads a round of inotify events, hands them over, and
/// only then adds the watches of the directories those events made; a file
/// put into a new directory before its watch is added makes no event, and
/// if the batch the directory's event started had listed the directory
/// before that file came, the file waited for the periodic comparison (seen
/// in the failover bench: a directory made, a file renamed into it a moment
/// later, never shipped). notify's thread answers requests only between two
/// such rounds, so the answer to one (the list of watched roots, small)
/// comes after those watches are in place, and the batch lists the new
/// directory after that: what came before is listed, what comes after
/// makes events.
fn settle_new_watches(watcher: &notify::RecommendedWatcher) {
    if let Err(e) = watcher.watched_paths() {
        tracing::debug!(error = %e, "notify did not answer; a new directory's batch goes on without waiting");
    }
}

/// A hidden switch for the tests: while the file that
/// `WARMSPARE_TEST_HOLD_WATCH` names exists (at most 20 s), the watcher
/// waits before it watches its roots, as the first watch of a large tree
/// keeps it busy while the shippers already compare.
async fn test_hold_watch() {
    let Some(hold) = std::env::var_os("WARMSPARE_TEST_HOLD_WATCH") else {
        return;
    };
    let until = Instant::now() + Duration::from_secs(20);
    while std::path::Path::new(&hold).exists() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How often a root that is not a directory is looked at again.
const UNWATCHED_POLL: Duration = Duration::from_secs(2);

/// The longest the watcher waits before it comes round (and stamps its
/// progress for the watchdog) when nothing happens.
const ROUND: Duration = Duration::from_secs(1);
/// How long the watcher may go without coming round before the watchdog
/// stops being fed: its rounds take [`ROUND`], and watching a root again
/// (inotify watches added for every directory of the tree) is one step.
pub const LIMIT: Duration = Duration::from_secs(30);

/// Watches `targets` until `cancel` fires, feeding `inboxes`; `rewatch`
/// renews every root's watch. Stamps `stamp` at every round.
pub async fn run(
    targets: Vec<Target>,
    inboxes: Vec<Arc<Inbox>>,
    rewatch: Arc<tokio::sync::Notify>,
    stamp: Arc<Stamp>,
    cancel: CancellationToken,
) -> Result<()> {
    let (queue, mut rx) = RawQueue::new(RAW_QUEUE);
    let overflow = queue.overflow.clone();
    let handler = move |res: notify::Result<notify::Event>| {
        let raw = match res {
            Ok(ev) if ev.need_rescan() => Raw::Rescan(None),
            // Reads (our own shipping among them) change nothing.
            Ok(ev) if is_read_only(&ev.kind) => return,
            Ok(ev) if matches!(ev.kind, notify::EventKind::Create(notify::event::CreateKind::Folder)) => {
                Raw::NewDir(ev.paths)
            }
            Ok(ev) => Raw::Paths(ev.paths, Edge::of(&ev.kind)),
            Err(e) => {
                report_watch_error(&e);
                Raw::Rescan(e.paths.first().cloned())
            }
        };
        queue.push(raw);
    };
    // Links are replicated as links, never followed: following them would
    // also make notify stat every file of a tree when it adds its watches.
    // Opens and read-only closes are not asked for: shipping opens every file
    // it sends, and those events cost the kernel and the watcher thread a
    // fifth of the active's CPU during an initial sync.
    let config = notify::Config::default()
        .with_follow_symlinks(false)
        .with_event_kinds(notify::EventKindMask::CORE | notify::EventKindMask::ACCESS_CLOSE);
    let mut watcher = notify::RecommendedWatcher::new(handler, config).context("cannot start inotify")?;
    // Roots are never created here (see `roots`): a root that is not a
    // directory now is watched once it is one, and once the shipper finds it
    // fine again (`rewatch`).
    let mut unwatched: Vec<bool> = vec![false; targets.len()];
    test_hold_watch().await;
    for (i, t) in targets.iter().enumerate() {
        stamp.stamp();
        if !t.root.is_dir() {
            tracing::warn!(watch = t.name, root = %t.root.display(), "watch root is not a directory; not watching it until it is");
            unwatched[i] = true;
            continue;
        }
        if let Err(e) = tokio::task::block_in_place(|| watcher.watch(&t.root, RecursiveMode::Recursive)) {
            report_watch_error(&e);
            // Without a complete watch, periodic and reconnect comparisons still converge.
        }
        tracing::info!(watch = t.name, root = %t.root.display(), "watching");
        // The shippers compare every watch when their sessions start, and
        // they start beside this task: a session can list a tree before
        // its watch is in place (notify walks the whole tree first), and a
        // change in between would wait for the periodic comparison. One
        // more comparison once the watch is in place closes that gap; it
        // merges with a session's first while that one still waits.
        for inbox in &inboxes {
            inbox.add_full(&t.name);
        }
    }

    let mut pending = Batcher::default();
    // Watches that lost events, and when to renew them.
    let mut lost: Vec<bool> = vec![false; targets.len()];
    let mut rescan_at: Option<Instant> = None;
    let mut unwatched_at = unwatched.contains(&true).then(|| Instant::now() + UNWATCHED_POLL);
    loop {
        stamp.stamp();
        if crate::progress::test_hang("watcher") {
            crate::progress::hang_task("the watcher").await;
        }
        // Idle, the loop still comes round (and stamps) every second.
        let next = pending
            .next()
            .into_iter()
            .chain(rescan_at)
            .chain(unwatched_at)
            .chain([Instant::now() + ROUND])
            .min();
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = rewatch.notified() => {
                // A root came back (remounted, recreated, accepted): watch
                // every root anew; the shipper compares it whole.
                for (i, t) in targets.iter().enumerate() {
                    stamp.stamp();
                    if !t.root.is_dir() {
                        continue;
                    }
                    let renewed = tokio::task::block_in_place(|| {
                        let _ = watcher.unwatch(&t.root);
                        watcher.watch(&t.root, RecursiveMode::Recursive)
                    });
                    match renewed {
                        Ok(()) => unwatched[i] = false,
                        Err(e) => report_watch_error(&e),
                    }
                }
                for i in &inboxes {
                    for t in &targets {
                        i.add_full(&t.name);
                    }
                }
            }
            () = overflow.notified() => {
                // The watcher fell behind the kernel's events and some were
                // dropped here: the same as a kernel queue overflow.
                tracing::warn!("the watcher fell behind its events; watching every tree again and comparing it whole");
                lost.iter_mut().for_each(|l| *l = true);
                rescan_at.get_or_insert_with(|| Instant::now() + RESCAN_GATHER);
            }
            raw = rx.recv() => {
                let Some(raw) = raw else { break };
                // What else has arrived goes into the same round: a close
                // and the rename that follows it often come together.
                let mut raws = vec![raw];
                while raws.len() < RAW_QUEUE {
                    match rx.try_recv() {
                        Ok(raw) => raws.push(raw),
                        Err(_) => break,
                    }
                }
                let now = Instant::now();
                let mut new_dir = false;
                for raw in raws {
                    match raw {
                        Raw::Rescan(path) => {
                            for (i, t) in targets.iter().enumerate() {
                                if path.as_ref().is_none_or(|p| p.starts_with(&t.root)) {
                                    lost[i] = true;
                                }
                            }
                            rescan_at.get_or_insert_with(|| Instant::now() + RESCAN_GATHER);
                        }
                        Raw::Paths(paths, edge) => {
                            for p in paths {
                                let Some((idx, rel)) = locate(&targets, &p) else { continue };
                                pending.add(idx, rel, edge, targets[idx].debounce, now, MAX_PENDING);
                            }
                        }
                        Raw::NewDir(paths) => {
                            new_dir = true;
                            for p in paths {
                                let Some((idx, rel)) = locate(&targets, &p) else { continue };
                                pending.add(idx, rel, Edge::Complete, targets[idx].debounce, now, MAX_PENDING);
                            }
                        }
                    }
                }
                if new_dir {
                    stamp.stamp();
                    tokio::task::block_in_place(|| settle_new_watches(&watcher));
                }
                hand_over(&mut pending, now, &targets, &inboxes);
            }
            _ = sleep_until(next) => {
                let now = Instant::now();
                if unwatched_at.is_some_and(|at| at <= now) {
                    unwatched_at = None;
                    for (i, t) in targets.iter().enumerate() {
                        stamp.stamp();
                        if !unwatched[i] || !t.root.is_dir() {
                            continue;
                        }
                        match tokio::task::block_in_place(|| watcher.watch(&t.root, RecursiveMode::Recursive)) {
                            Ok(()) => {
                                unwatched[i] = false;
                                tracing::info!(watch = t.name, root = %t.root.display(), "watching");
                                for i in &inboxes {
                                    i.add_full(&t.name);
                                }
                            }
                            Err(e) => report_watch_error(&e),
                        }
                    }
                    if unwatched.contains(&true) {
                        unwatched_at = Some(now + UNWATCHED_POLL);
                    }
                }
                if rescan_at.is_some_and(|at| at <= now) {
                    rescan_at = None;
                    for (i, t) in targets.iter().enumerate() {
                        stamp.stamp();
                        if !std::mem::take(&mut lost[i]) {
                            continue;
                        }
                        tracing::warn!(watch = t.name, "inotify lost events; watching the tree again and comparing it whole");
                        // Adds watches for directories whose creation was lost:
                        // notify answers a second watch of the same root with
                        // "already watched", so the root is unwatched first.
                        // What changes in between is found by the comparison
                        // below, which starts after the new watches are in place.
                        // The watcher walks the tree before it answers.
                        let renewed = tokio::task::block_in_place(|| {
                            let _ = watcher.unwatch(&t.root);
                            watcher.watch(&t.root, RecursiveMode::Recursive)
                        });
                        if let Err(e) = renewed {
                            report_watch_error(&e);
                        }
                        for i in &inboxes {
                            i.add_full(&t.name);
                        }
                    }
                }
                hand_over(&mut pending, now, &targets, &inboxes);
            }
        }
    }
    drop(watcher);
    Ok(())
}

/// Gives every shipper's inbox what `pending` has due at `now`.
fn hand_over(pending: &mut Batcher, now: Instant, targets: &[Target], inboxes: &[Arc<Inbox>]) {
    for (idx, paths) in pending.due(now) {
        tracing::debug!(watch = targets[idx].name, paths = paths.len(), "batch of changes");
        for i in inboxes {
            i.add_paths(&targets[idx].name, paths.iter().cloned());
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The watch holding `path` and the path relative to its root, unless the
/// path is the root itself or one of the applier's temporary files.
fn locate(targets: &[Target], path: &Path) -> Option<(usize, String)> {
    for (i, t) in targets.iter().enumerate() {
        if let Ok(rel) = path.strip_prefix(&t.root) {
            let rel = rel.to_str()?;
            if rel.is_empty() {
                // An event on the root itself: compare everything under it.
                return Some((i, String::new()));
            }
            if rel.split('/').any(relpath::is_temp_name) {
                return None;
            }
            return Some((i, rel.to_string()));
        }
    }
    None
}

/// Opening, reading and closing without writing change nothing to replicate.
fn is_read_only(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    matches!(kind, notify::EventKind::Access(a) if !matches!(a, AccessKind::Close(AccessMode::Write)))
}

fn report_watch_error(e: &notify::Error) {
    if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) {
        tracing::error!(
            paths = ?e.paths,
            "inotify watch limit reached: raise it with `sysctl fs.inotify.max_user_watches=524288` \
             (and persist it in /etc/sysctl.d); until then changes are found by periodic comparison"
        );
    } else {
        tracing::warn!(error = %e, "inotify error; comparing the whole tree");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_flags_an_overflow_and_never_blocks() {
        let (q, mut rx) = RawQueue::new(2);
        for i in 0..10 {
            q.push(Raw::Paths(vec![PathBuf::from(format!("/w/{i}"))], Edge::Complete));
        }
        // The first two wait; the rest were dropped and flagged.
        assert!(matches!(rx.try_recv(), Ok(Raw::Paths(..))));
        assert!(matches!(rx.try_recv(), Ok(Raw::Paths(..))));
        assert!(rx.try_recv().is_err());
        tokio::time::timeout(Duration::from_secs(1), q.overflow.notified())
            .await
            .expect("the overflow was not flagged");
    }
}
