//! The passive watcher: local changes on a passive node, flagged at once.
//!
//! While this node is not the active one, its watch roots are watched too
//! (inotify through `notify`, links never followed). Every path an event
//! names is looked at once the path has been quiet for [`QUIET`], on this
//! module's own blocking thread (never on the async runtime):
//!
//! - while the receiver is changing that path (or a tree above or below it),
//!   it is looked at again later;
//! - a path the receiver wrote lately is the receiver's own as long as it
//!   is exactly what the receiver left there (type, inode, mode, owner,
//!   size, change time: see [`warmspare_shared::local`]);
//! - anything else is judged against the sync ledger: a file the peers
//!   never agreed on was created, one with other content was modified, an
//!   agreed file that is gone was removed, and an event on a file whose
//!   content is the agreed one changed its metadata.
//!
//! A local change is flagged in status, metrics and the log ("local change
//! on a passive, will be replaced"); the flag stays until the receiver
//! replaces the path or a full comparison that saw the change settles the
//! watch. What the active's version replaces is preserved under
//! `diverged/` by the receiver (see `apply::Applier::preserve`).
//!
//! When a watch starts being watched, and after the kernel's queue
//! overflowed, the whole watch is compared against the ledger instead
//! (files only: the ledger knows no directories or metadata).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result};
use notify::{RecursiveMode, Watcher};
use tokio_util::sync::CancellationToken;
use warmspare_shared::beneath;
use warmspare_shared::local::{self, Change, Flagged, Own, Stamp};
use warmspare_shared::manifest::{self, ContentHash, Excludes, HashCache};
use warmspare_shared::relpath;
use warmspare_shared::text::escape_controls;

use crate::live::Live;

/// How long a path must be quiet before it is looked at.
const QUIET: Duration = Duration::from_millis(100);

/// How long a path the receiver keeps busy is waited for before it is
/// judged anyway.
const BUSY_LIMIT: Duration = Duration::from_secs(120);

/// How often, at most, the waiting paths are looked over for the quiet
/// ones. A passive applying a burst sees an event for every file it
/// writes, and thousands of paths wait at once: looking them all over
/// after every event made the watcher's work grow with the square of the
/// burst. A path judged up to this much after it became quiet is flagged
/// no less surely.
const JUDGE_EVERY: Duration = Duration::from_millis(25);

/// How often roots that are not watched (missing, not directories) are
/// looked at again.
const ROOT_POLL: Duration = Duration::from_secs(2);

/// The most log lines one round of judgements writes; the rest are counted.
const LOG_LINES: usize = 20;

/// The words every flag carries, in the log and in `warmsparectl status`.
pub const FLAG: &str = "local change on a passive, will be replaced";

enum Raw {
    Paths(Vec<PathBuf>),
    Rescan(Option<PathBuf>),
}

struct Target {
    name: String,
    root: PathBuf,
    excludes: Excludes,
    cache: HashCache,
    watched: bool,
    /// Compare the whole watch against the ledger at the next round.
    rescan: bool,
    /// The rescan is after lost events: the watches are renewed first.
    renew: bool,
}

/// A path waiting to be judged.
struct Waiting {
    /// When its first event arrived.
    first: SystemTime,
    /// When it was last touched (an event, or a busy receiver).
    last: Instant,
    /// When it is judged whatever the receiver is doing.
    limit: Instant,
    /// Found by a comparison against the ledger, not by an event.
    rescan: bool,
}

/// What the passive watcher uses of the node: the configuration in force,
/// the ledgers (what the peers last agreed on) and the receiver's record
/// of its own writes, where flagged changes go.
pub struct Handles {
    /// The configuration in force (the watches, the hash-cache paths).
    pub live: Arc<Live>,
    /// The sync ledgers.
    pub ledgers: Arc<std::sync::Mutex<warmspare_shared::ledger::Ledgers>>,
    /// The receiver's record of its own writes and the flagged changes.
    pub local: Arc<local::Tracker>,
}

/// Watches this node's roots for local changes until `cancel` fires.
pub async fn run(node: Handles, cancel: CancellationToken) {
    let c = cancel.clone();
    let done = tokio::task::spawn_blocking(move || watch_loop(&node, &c)).await;
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(
            error = format!("{e:#}"),
            "the passive watcher stopped; local changes are replaced at the next full comparison without being flagged"
        ),
        Err(e) => tracing::error!(error = %e, "the passive watcher failed"),
    }
}

fn watch_loop(node: &Handles, cancel: &CancellationToken) -> Result<()> {
    let mut targets: Vec<Target> = node
        .live
        .local_watches()
        .into_iter()
        // The job spool is the agent's own.
        .filter(|w| w.name != crate::live::SPOOL_WATCH)
        .map(|w| Target {
            cache: HashCache::load(&node.live.cache_path(&w.name, "recv")),
            name: w.name,
            root: w.root,
            excludes: w.excludes,
            watched: false,
            rescan: true,
            renew: false,
        })
        .collect();
    if targets.is_empty() {
        return Ok(());
    }
    let (tx, rx) = mpsc::channel::<Raw>();
    let handler = move |res: notify::Result<notify::Event>| {
        let raw = match res {
            Ok(ev) if ev.need_rescan() => Raw::Rescan(None),
            Ok(ev) if is_read_only(&ev.kind) => return,
            Ok(mut ev) => {
                ev.paths.retain(|p| !is_unnamed_file(&ev.kind, p));
                if ev.paths.is_empty() {
                    return;
                }
                Raw::Paths(ev.paths)
            }
            Err(e) => {
                tracing::warn!(error = %e, "inotify error on a passive; comparing the watch against the ledger");
                Raw::Rescan(e.paths.first().cloned())
            }
        };
        let _ = tx.send(raw);
    };
    let config = notify::Config::default()
        .with_follow_symlinks(false)
        .with_event_kinds(notify::EventKindMask::CORE | notify::EventKindMask::ACCESS_CLOSE);
    let mut watcher = notify::RecommendedWatcher::new(handler, config).context("cannot start inotify")?;
    let mut waiting: HashMap<(usize, String), Waiting> = HashMap::new();
    let mut next_poll = Instant::now();
    let mut next_judge = Instant::now();
    while !cancel.is_cancelled() {
        let now = Instant::now();
        if now >= next_poll {
            next_poll = now + ROOT_POLL;
            for t in targets.iter_mut().filter(|t| !t.watched) {
                if !t.root.is_dir() {
                    continue;
                }
                match watcher.watch(&t.root, RecursiveMode::Recursive) {
                    Ok(()) => {
                        t.watched = true;
                        t.rescan = true;
                        tracing::info!(watch = t.name, root = %t.root.display(), "watching for local changes (passive)");
                    }
                    Err(e) => tracing::warn!(watch = t.name, error = %e, "cannot watch for local changes"),
                }
            }
        }
        let first = match rx.recv_timeout(QUIET / 2) {
            Ok(raw) => Some(raw),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        for raw in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            match raw {
                Raw::Rescan(path) => {
                    for t in &mut targets {
                        if path.as_ref().is_none_or(|p| p.starts_with(&t.root)) {
                            t.rescan = true;
                            t.renew = true;
                        }
                    }
                }
                Raw::Paths(paths) => {
                    let (at, now) = (SystemTime::now(), Instant::now());
                    for p in paths {
                        let Some((i, rel)) = locate(&targets, &p) else { continue };
                        let w = waiting.entry((i, rel)).or_insert(Waiting {
                            first: at,
                            last: now,
                            limit: now + BUSY_LIMIT,
                            rescan: false,
                        });
                        w.last = now;
                        w.rescan = false;
                    }
                }
            }
        }
        for (i, t) in targets.iter_mut().enumerate() {
            if !(t.rescan && t.watched) {
                continue;
            }
            t.rescan = false;
            if std::mem::take(&mut t.renew) {
                tracing::warn!(
                    watch = t.name,
                    "inotify lost events on a passive; watching the tree again and comparing it against the ledger"
                );
                let _ = watcher.unwatch(&t.root);
                if let Err(e) = watcher.watch(&t.root, RecursiveMode::Recursive) {
                    tracing::warn!(watch = t.name, error = %e, "cannot watch for local changes");
                    t.watched = false;
                    continue;
                }
            }
            let (at, now) = (SystemTime::now(), Instant::now());
            for rel in against_ledger(node, t) {
                waiting.entry((i, rel)).or_insert(Waiting {
                    first: at,
                    last: now.checked_sub(QUIET).unwrap_or(now),
                    limit: now + BUSY_LIMIT,
                    rescan: true,
                });
            }
        }
        if Instant::now() >= next_judge {
            judge_due(node, &mut targets, &mut waiting);
            next_judge = Instant::now() + JUDGE_EVERY;
        }
    }
    drop(watcher);
    Ok(())
}

/// Judges every waiting path that has been quiet long enough.
fn judge_due(node: &Handles, targets: &mut [Target], waiting: &mut HashMap<(usize, String), Waiting>) {
    let now = Instant::now();
    let due: Vec<(usize, String)> = waiting
        .iter()
        .filter(|(_, w)| now.duration_since(w.last) >= QUIET)
        .map(|(k, _)| k.clone())
        .collect();
    if due.is_empty() {
        return;
    }
    // One set of directory handles per watch for the pass: the paths a
    // batch of the receiver leaves waiting share a few directories.
    let mut roots: HashMap<usize, Option<beneath::Dirs>> = HashMap::new();
    let mut logged = 0usize;
    let mut unlogged = 0u64;
    for key in due {
        let Some(w) = waiting.get(&key) else { continue };
        let (first, limit, rescan) = (w.first, w.limit, w.rescan);
        let (i, rel) = (&key.0, &key.1);
        let t = &mut targets[*i];
        let root = roots.entry(*i).or_insert_with(|| {
            beneath::open_root(&t.root)
                .ok()
                .map(|r| beneath::Dirs::with_root(&t.root, r))
        });
        let Some(dirs) = root.as_mut() else {
            // The root is gone or replaced: the receiver reports that.
            waiting.remove(&key);
            continue;
        };
        let stamp = match local::stamp_in(dirs, rel) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(watch = t.name, path = rel, error = %e, "cannot look at a changed path");
                waiting.remove(&key);
                continue;
            }
        };
        let own = node.local.own(&t.name, rel, stamp.as_ref());
        if own == Own::Busy && now < limit {
            if let Some(w) = waiting.get_mut(&key) {
                w.last = now;
            }
            continue;
        }
        waiting.remove(&key);
        if own == Own::Yes {
            continue;
        }
        let Some(change) = judge(node, t, rel, stamp.as_ref(), own == Own::Changed, rescan) else {
            continue;
        };
        let flagged = Flagged {
            path: rel.clone(),
            change,
            at: first,
        };
        if node.local.flag(&t.name, flagged) {
            if logged < LOG_LINES {
                logged += 1;
                tracing::warn!(watch = t.name, path = %escape_controls(rel), change = change.name(), "{FLAG}");
            } else {
                unlogged += 1;
            }
        }
    }
    if unlogged > 0 {
        tracing::warn!(
            more = unlogged,
            "{FLAG}: more paths than are logged one by one (see warmsparectl status)"
        );
    }
}

/// What happened at `rel`, now `stamp`, compared with the ledger; `None`
/// when nothing the active will replace. `changed`: the receiver left
/// something else there. `rescan`: found by a comparison, not an event
/// (only content counts then).
fn judge(
    node: &Handles,
    t: &mut Target,
    rel: &str,
    stamp: Option<&Stamp>,
    changed: bool,
    rescan: bool,
) -> Option<Change> {
    let agreed = node
        .ledgers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .watch(&t.name)
        .get(rel);
    let Some(st) = stamp else {
        return (agreed.is_some() || changed).then_some(Change::Removed);
    };
    if t.excludes.is_excluded(rel, st.is_dir()) {
        return None;
    }
    if st.is_file() {
        let Some(agreed) = agreed else {
            return Some(Change::Created);
        };
        return match hash(t, rel) {
            Some(h) if h != agreed => Some(Change::Modified),
            Some(_) if rescan => None,
            Some(_) => Some(Change::Metadata),
            // Gone or not readable now: the next event or comparison tells.
            None => None,
        };
    }
    if rescan {
        return None;
    }
    Some(if st.is_dir() && !changed {
        Change::Created
    } else {
        Change::Metadata
    })
}

/// The content hash of the regular file `rel`, read through a descriptor
/// opened beneath the root (from the cache when it is unchanged).
fn hash(t: &mut Target, rel: &str) -> Option<ContentHash> {
    // Non-blocking, regular files only: a fifo swapped in is never read.
    let (file, md) = beneath::open_file_beneath(&t.root, rel).ok()?;
    if let Some(h) = t.cache.cached(rel, &md) {
        return Some(h);
    }
    let h = ContentHash::of_reader(&file).ok()?;
    let after = file.metadata().ok()?;
    t.cache.record(rel, &md, h, &after);
    Some(h)
}

/// The paths of the watch whose content is not the agreed one: files the
/// ledger does not know or knows with other content, and agreed files that
/// are gone.
fn against_ledger(node: &Handles, t: &mut Target) -> Vec<String> {
    let scan = manifest::scan(&t.root, "", &t.excludes, &mut t.cache);
    let ledgers = node.ledgers.clone();
    let mut ledgers = ledgers.lock().unwrap_or_else(|p| p.into_inner());
    let ledger = ledgers.watch(&t.name);
    let mut out: Vec<String> = Vec::new();
    let mut present = std::collections::HashSet::new();
    for e in &scan.entries {
        if let Some(h) = e.hash() {
            present.insert(e.path.as_str());
            if ledger.get(&e.path) != Some(h) {
                out.push(e.path.clone());
            }
        }
    }
    let unknown: Vec<&str> = scan.skipped.iter().filter_map(|s| s.unknown_path()).collect();
    for (p, _) in ledger.entries() {
        if !present.contains(p) && !unknown.iter().any(|u| relpath::is_under(p, u)) {
            out.push(p.to_string());
        }
    }
    out
}

/// The watch holding `path` and the path relative to its root, unless it
/// is the root itself, one of the applier's temporary files or not UTF-8.
fn locate(targets: &[Target], path: &Path) -> Option<(usize, String)> {
    for (i, t) in targets.iter().enumerate() {
        if let Ok(rel) = path.strip_prefix(&t.root) {
            let rel = rel.to_str()?;
            if rel.is_empty() || rel.split('/').any(relpath::is_temp_name) {
                return None;
            }
            return Some((i, rel.to_string()));
        }
    }
    None
}

/// Whether `path` names a file that has no name yet: the kernel reports the
/// writes to a file made with `O_TMPFILE` (as the receiver stages what it
/// applies) under the name `#<inode>`, which is in no directory. Looking
/// such a name up cost a failed directory lookup per event, about a sixth
/// of a passive's CPU in a large initial sync. Only what such a file can
/// cause is skipped (writes, metadata, closes): a real file of that name
/// created, renamed or removed locally is still seen. An in-place edit of an
/// existing file literally named `#<digits>` is not, until the next
/// comparison against the ledger (when the watcher starts, or after a lost
/// event), and the receiver still preserves it before replacing it.
fn is_unnamed_file(kind: &notify::EventKind, path: &Path) -> bool {
    use notify::event::{AccessKind, ModifyKind};
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let unnamed = name
        .strip_prefix('#')
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    unnamed
        && matches!(
            kind,
            notify::EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Metadata(_) | ModifyKind::Any)
                | notify::EventKind::Access(AccessKind::Close(_))
        )
}

/// Opening, reading and closing without writing change nothing.
fn is_read_only(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    matches!(kind, notify::EventKind::Access(a) if !matches!(a, AccessKind::Close(AccessMode::Write)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_watches() {
        let t = Target {
            name: "ca".into(),
            root: PathBuf::from("/x/ca"),
            excludes: Excludes::default(),
            cache: HashCache::default(),
            watched: true,
            rescan: false,
            renew: false,
        };
        let ts = [t];
        assert_eq!(locate(&ts, Path::new("/x/ca/a/b.pem")), Some((0, "a/b.pem".into())));
        assert_eq!(locate(&ts, Path::new("/x/ca")), None);
        assert_eq!(locate(&ts, Path::new("/x/ca/.warmspare-tmp.a.new.1")), None);
        assert_eq!(locate(&ts, Path::new("/x/cab/a")), None);
    }

    #[test]
    fn writes_to_a_file_without_a_name_are_not_looked_at() {
        use notify::event::{AccessKind, AccessMode, CreateKind, DataChange, MetadataKind, ModifyKind, RemoveKind};
        use notify::EventKind;
        let unnamed = Path::new("/x/ca/signed/#5324826");
        for kind in [
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
        ] {
            assert!(is_unnamed_file(&kind, unnamed), "{kind:?}");
            // A file with a real name is looked at after the same events.
            assert!(!is_unnamed_file(&kind, Path::new("/x/ca/signed/host.pem")), "{kind:?}");
            assert!(!is_unnamed_file(&kind, Path::new("/x/ca/signed/#12a")), "{kind:?}");
            assert!(!is_unnamed_file(&kind, Path::new("/x/ca/signed/#")), "{kind:?}");
        }
        // What only a named file can cause is looked at whatever the name.
        for kind in [
            EventKind::Create(CreateKind::File),
            EventKind::Remove(RemoveKind::File),
            EventKind::Modify(ModifyKind::Name(notify::event::RenameMode::To)),
        ] {
            assert!(!is_unnamed_file(&kind, unnamed), "{kind:?}");
        }
    }
}
