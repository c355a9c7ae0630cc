//! What happens under a passive node's watch roots: the receiver's record of
//! its own writes, and the local changes the passive watcher flags.
//!
//! The receiver ([`crate::apply::Applier`]) tells the [`Tracker`] which paths
//! it is about to change ([`Tracker::begin`]) and what each one looked like
//! once it was done ([`Tracker::end`], a [`Stamp`]: type, inode, mode,
//! owner, size, times). The agent's passive watcher asks, for every path an
//! inotify event names, whether the receiver is still at work there
//! ([`Tracker::busy`]: ask again later) and what the receiver left there
//! ([`Tracker::own`]). A path whose state is not what the receiver left is a
//! local change; one the receiver never touched is judged against the sync
//! ledger. Flags ([`Tracker::flag`]) stay until the receiver replaces the
//! path or a full comparison that listed the tree after the change settles
//! the watch ([`Tracker::settled`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::beneath;
use crate::relpath::is_under;

/// What a path looked like: enough to tell whether anybody changed it since.
/// A change of content, mode, owner or times changes the ctime, and a file
/// replaced by another has another inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The file type bits of the mode (`S_IFMT`).
    pub kind: u32,
    /// The inode.
    pub ino: u64,
    /// The permission bits.
    pub mode: u32,
    /// The owner.
    pub uid: u32,
    /// The group.
    pub gid: u32,
    /// The size.
    pub size: u64,
    /// The change time, nanoseconds since the Unix epoch.
    pub ctime_ns: i128,
}

const S_IFMT: u32 = 0o170_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;

impl Stamp {
    /// The stamp of a status from `statat`.
    pub fn of_stat(st: &rustix::fs::Stat) -> Stamp {
        Stamp {
            kind: st.st_mode & S_IFMT,
            ino: st.st_ino,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            ctime_ns: i128::from(st.st_ctime) * 1_000_000_000 + i128::from(st.st_ctime_nsec),
        }
    }

    /// The stamp of std metadata.
    pub fn of_metadata(md: &std::fs::Metadata) -> Stamp {
        Stamp {
            kind: md.mode() & S_IFMT,
            ino: md.ino(),
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            size: md.size(),
            ctime_ns: i128::from(md.ctime()) * 1_000_000_000 + i128::from(md.ctime_nsec()),
        }
    }

    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        self.kind == S_IFDIR
    }

    /// Whether this is a regular file.
    pub fn is_file(&self) -> bool {
        self.kind == S_IFREG
    }

    /// Whether `now` is still what was recorded. A directory's times and
    /// size change with its entries (and the receiver sets its times at
    /// the commit, after its record): only its inode, mode and owner count.
    pub fn unchanged(&self, now: &Stamp) -> bool {
        if self.is_dir() {
            self.kind == now.kind
                && self.ino == now.ino
                && self.mode == now.mode
                && (self.uid, self.gid) == (now.uid, now.gid)
        } else {
            self == now
        }
    }
}

/// The stamp of `rel` beneath the directory open as `root`, of a link
/// itself when it is one; `None` when nothing is there (or a component on
/// the way is not a directory).
pub fn stamp_at(root: &File, rel: &str) -> io::Result<Option<Stamp>> {
    let (dir, name) = beneath::split(rel);
    if dir.is_empty() {
        stamped(beneath::stat(root, name))
    } else {
        stamped(beneath::open_dir(root, dir).and_then(|d| beneath::stat(&d, name)))
    }
}

/// [`stamp_at`] through the directory handles of a pass, `dirs`.
pub fn stamp_in(dirs: &mut beneath::Dirs, rel: &str) -> io::Result<Option<Stamp>> {
    stamped(dirs.stat(rel))
}

/// The stamp of a status looked up by [`stamp_at`] or [`stamp_in`];
/// `None` when nothing is there (or a component on the way is not a
/// directory).
fn stamped(st: io::Result<rustix::fs::Stat>) -> io::Result<Option<Stamp>> {
    match st {
        Ok(st) => Ok(Some(Stamp::of_stat(&st))),
        Err(e)
            if e.kind() == io::ErrorKind::NotFound || matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// What a local change did, as the passive watcher judged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    /// Something is there that the peers never agreed on.
    Created,
    /// A file's content is not the agreed one.
    Modified,
    /// Something agreed on is gone.
    Removed,
    /// Only the mode, owner or times changed (or a directory or a link).
    Metadata,
}

impl Change {
    /// The word used in status and logs.
    pub fn name(self) -> &'static str {
        match self {
            Change::Created => "created",
            Change::Modified => "modified",
            Change::Removed => "removed",
            Change::Metadata => "metadata",
        }
    }
}

/// One flagged local change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flagged {
    /// The path, relative to the watch root.
    pub path: String,
    /// What happened.
    pub change: Change,
    /// When the first event about it arrived.
    pub at: SystemTime,
}

/// The local changes of one watch.
#[derive(Debug, Default, Clone)]
pub struct WatchFlags {
    /// Flagged paths not yet replaced, with what happened and when.
    pub pending: BTreeMap<String, (Change, SystemTime)>,
    /// Changes flagged since the agent started (replaced or not).
    pub total: u64,
    /// The latest flagged changes, newest last (at most [`LATEST_MAX`]).
    pub latest: VecDeque<Flagged>,
}

/// How many of the latest changes a watch keeps for status.
pub const LATEST_MAX: usize = 20;

/// How many pending paths a watch keeps one by one; more are only counted.
pub const PENDING_MAX: usize = 10_000;

/// How long the receiver's records are kept after it wrote a path: far
/// longer than the watcher takes to look at an event.
const RECORD_KEEP: Duration = Duration::from_secs(120);

/// The most records kept (the oldest go first).
const RECORDS_MAX: usize = 500_000;

/// What the receiver left at one path.
#[derive(Debug, Clone, Copy)]
struct Done {
    /// The path's state after the receiver's operation (`None`: nothing there).
    stamp: Option<Stamp>,
    /// When an operation last removed a whole tree there (a removal, or a
    /// directory replaced): whatever was below the path then went with it.
    /// Kept when later operations write the path again.
    tree: Option<Instant>,
    /// When it was recorded.
    at: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    /// Paths the receiver is changing now, per watch, with a count.
    busy: HashMap<String, BTreeMap<String, u32>>,
    /// What the receiver left, per watch and path.
    done: HashMap<String, HashMap<String, Done>>,
    /// When each record was made, oldest first (for pruning).
    order: VecDeque<(Instant, String, String)>,
    /// Flags per watch.
    flags: BTreeMap<String, WatchFlags>,
    /// Paths flagged beyond [`PENDING_MAX`], per watch.
    untracked: BTreeMap<String, u64>,
    /// When the receiver last listed each watch for a full comparison.
    listed: HashMap<String, SystemTime>,
}

/// The receiver's record of its own writes and the local changes flagged on
/// a passive (see the module documentation). Shared by the receiver's
/// sessions and the passive watcher.
#[derive(Debug, Default)]
pub struct Tracker {
    inner: Mutex<Inner>,
}

/// What the receiver's records say about a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Own {
    /// The receiver is changing it (or something above or below it) now.
    Busy,
    /// Its state is what the receiver left there.
    Yes,
    /// The receiver left something else there: somebody changed it since.
    Changed,
    /// The receiver did not touch it lately.
    Unknown,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The receiver starts changing `rel` of `watch`.
    pub fn begin(&self, watch: &str, rel: &str) {
        let mut g = self.lock();
        *g.busy
            .entry(watch.to_string())
            .or_default()
            .entry(rel.to_string())
            .or_default() += 1;
    }

    /// The receiver is done with `rel` of `watch`, which now looks like
    /// `stamp`; `tree` when the operation removed what was below it. Flags
    /// at and below `rel` are cleared: the receiver replaced them.
    pub fn end(&self, watch: &str, rel: &str, stamp: Option<Stamp>, tree: bool) {
        let mut g = self.lock();
        if let Some(b) = g.busy.get_mut(watch) {
            if let Some(n) = b.get_mut(rel) {
                *n -= 1;
                if *n == 0 {
                    b.remove(rel);
                }
            }
        }
        let now = Instant::now();
        let done = g.done.entry(watch.to_string()).or_default();
        let before = done.get(rel).and_then(|d| d.tree);
        let tree = if tree { Some(now) } else { before };
        done.insert(rel.to_string(), Done { stamp, tree, at: now });
        g.order.push_back((now, watch.to_string(), rel.to_string()));
        while let Some((at, _, _)) = g.order.front() {
            if now.duration_since(*at) < RECORD_KEEP && g.order.len() <= RECORDS_MAX {
                break;
            }
            if let Some((at, w, p)) = g.order.pop_front() {
                // A path written again has a newer record: that one stays.
                if let Some(m) = g.done.get_mut(&w) {
                    if m.get(&p).is_some_and(|d| d.at == at) {
                        m.remove(&p);
                    }
                }
            }
        }
        if let Some(f) = g.flags.get_mut(watch) {
            let gone: Vec<String> = f
                .pending
                .range(rel.to_string()..)
                .take_while(|(p, _)| p.starts_with(rel))
                .filter(|(p, _)| is_under(p, rel))
                .map(|(p, _)| p.clone())
                .collect();
            for p in gone {
                f.pending.remove(&p);
            }
        }
    }

    /// What the receiver's records say about `rel` of `watch`, whose state
    /// now is `now`.
    pub fn own(&self, watch: &str, rel: &str, now: Option<&Stamp>) -> Own {
        let g = self.lock();
        if let Some(b) = g.busy.get(watch) {
            // The path itself, an ancestor (a tree being removed or made),
            // or a descendant (directories made on the way to it).
            let below = b
                .range(format!("{rel}/")..)
                .next()
                .is_some_and(|(p, _)| is_under(p, rel));
            if below || ancestors(rel).any(|a| b.contains_key(a)) {
                return Own::Busy;
            }
        }
        let Some(done) = g.done.get(watch) else {
            return Own::Unknown;
        };
        // The latest tree the receiver removed above the path: what was
        // below went with it, whatever the receiver had written there before.
        let tree = ancestors(rel)
            .skip(1)
            .filter_map(|a| done.get(a).and_then(|d| d.tree))
            .max();
        match done.get(rel) {
            Some(d) if tree.is_none_or(|t| t < d.at) => match (d.stamp, now) {
                (None, None) => Own::Yes,
                (Some(a), Some(b)) if a.unchanged(b) => Own::Yes,
                _ => Own::Changed,
            },
            _ if tree.is_some() && now.is_none() => Own::Yes,
            _ => Own::Unknown,
        }
    }

    /// Flags a local change; returns whether it is news (not already pending).
    pub fn flag(&self, watch: &str, change: Flagged) -> bool {
        let mut g = self.lock();
        let Inner { flags, untracked, .. } = &mut *g;
        let f = flags.entry(watch.to_string()).or_default();
        if let Some(p) = f.pending.get_mut(&change.path) {
            p.0 = change.change;
            return false;
        }
        f.total += 1;
        if f.pending.len() < PENDING_MAX {
            f.pending.insert(change.path.clone(), (change.change, change.at));
        } else {
            *untracked.entry(watch.to_string()).or_default() += 1;
        }
        f.latest.push_back(change);
        while f.latest.len() > LATEST_MAX {
            f.latest.pop_front();
        }
        true
    }

    /// The flags of every watch, and how many pending changes each has
    /// beyond those listed.
    pub fn flags(&self) -> BTreeMap<String, (WatchFlags, u64)> {
        let g = self.lock();
        g.flags
            .iter()
            .map(|(w, f)| (w.clone(), (f.clone(), g.untracked.get(w).copied().unwrap_or(0))))
            .collect()
    }

    /// Forgets every pending flag (the node became active: its tree is now
    /// the one that counts). Totals stay.
    pub fn clear_pending(&self) {
        let mut g = self.lock();
        for f in g.flags.values_mut() {
            f.pending.clear();
        }
        g.untracked.clear();
    }

    /// The receiver lists `watch` for a full comparison.
    pub fn listed(&self, watch: &str) {
        self.lock().listed.insert(watch.to_string(), SystemTime::now());
    }

    /// When the receiver last listed `watch` for a full comparison.
    pub fn listed_at(&self, watch: &str) -> Option<SystemTime> {
        self.lock().listed.get(watch).copied()
    }

    /// A full comparison of `watch` settled: every path but `except` holds
    /// the agreed content. Flags from before the receiver listed the tree
    /// for that comparison are cleared (the active saw those changes and
    /// replaced them, or found them equal to its own); the paths flagged
    /// since are returned: the active never saw them, so they must not be
    /// recorded as agreed.
    pub fn settled(&self, watch: &str, except: &[String]) -> Vec<String> {
        let mut g = self.lock();
        let listed = g.listed.get(watch).copied();
        let Some(f) = g.flags.get_mut(watch) else {
            return Vec::new();
        };
        let mut later = Vec::new();
        f.pending.retain(|p, (_, at)| {
            if except.iter().any(|e| is_under(p, e)) {
                return true;
            }
            if listed.is_some_and(|l| *at >= l) {
                later.push(p.clone());
                return true;
            }
            false
        });
        if later.is_empty() {
            g.untracked.remove(watch);
        }
        later
    }
}

/// `rel` and its ancestors, deepest first (`a/b/c`, `a/b`, `a`).
fn ancestors(rel: &str) -> impl Iterator<Item = &str> {
    let mut next = Some(rel);
    std::iter::from_fn(move || {
        let cur = next?;
        next = cur.rfind('/').map(|i| &cur[..i]);
        Some(cur)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(ino: u64, ctime: i128) -> Stamp {
        Stamp {
            kind: S_IFREG,
            ino,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 1,
            ctime_ns: ctime,
        }
    }

    #[test]
    fn own_writes_busy_paths_and_trees() {
        let t = Tracker::default();
        assert_eq!(t.own("ca", "a/b", None), Own::Unknown);
        t.begin("ca", "a/b");
        assert_eq!(t.own("ca", "a/b", None), Own::Busy);
        // Directories made on the way, and what is below, wait too.
        assert_eq!(t.own("ca", "a", None), Own::Busy);
        assert_eq!(t.own("ca", "a/b/c", None), Own::Busy);
        assert_eq!(t.own("ca", "ab", None), Own::Unknown);
        t.end("ca", "a/b", Some(stamp(1, 5)), false);
        assert_eq!(t.own("ca", "a/b", Some(&stamp(1, 5))), Own::Yes);
        assert_eq!(t.own("ca", "a/b", Some(&stamp(1, 6))), Own::Changed);
        assert_eq!(t.own("ca", "a/b", None), Own::Changed);
        t.end("ca", "d/x", Some(stamp(3, 1)), false);
        t.begin("ca", "d");
        t.end("ca", "d", None, true);
        // Written before, removed with its tree since, even once a file
        // took the tree's place.
        assert_eq!(t.own("ca", "d/x", None), Own::Yes);
        t.end("ca", "d", Some(stamp(4, 1)), false);
        assert_eq!(t.own("ca", "d/x", None), Own::Yes);
        // Written after the tree went: a record of its own.
        t.end("ca", "d/y", Some(stamp(5, 1)), false);
        assert_eq!(t.own("ca", "d/y", None), Own::Changed);
        assert_eq!(t.own("ca", "d/x", Some(&stamp(2, 1))), Own::Unknown);
        assert_eq!(ancestors("a/b/c").collect::<Vec<_>>(), ["a/b/c", "a/b", "a"]);
    }

    #[test]
    fn flags_clear_when_replaced_or_settled() {
        let t = Tracker::default();
        let at = SystemTime::now();
        let f = |p: &str| Flagged {
            path: p.into(),
            change: Change::Created,
            at,
        };
        assert!(t.flag("ca", f("x")));
        assert!(!t.flag("ca", f("x")));
        assert!(t.flag("ca", f("d/y")));
        assert!(t.flag("ca", f("z")));
        t.end("ca", "d", None, true);
        let flags = t.flags();
        assert_eq!(flags["ca"].0.total, 3);
        assert_eq!(flags["ca"].0.pending.keys().collect::<Vec<_>>(), ["x", "z"]);
        // Listed after the changes: the active saw them.
        t.listed("ca");
        assert!(t.settled("ca", &["z".to_string()]).is_empty());
        assert_eq!(t.flags()["ca"].0.pending.keys().collect::<Vec<_>>(), ["z"]);
        // A change flagged after the listing is not agreed on.
        let mut late = f("w");
        late.at = SystemTime::now() + Duration::from_secs(1);
        t.flag("ca", late);
        assert_eq!(t.settled("ca", &[]), ["w"]);
        assert_eq!(t.flags()["ca"].0.latest.len(), 4);
    }
}
