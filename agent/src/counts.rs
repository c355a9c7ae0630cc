//! The watches' file counts for status and metrics: one walk of the trees
//! at a time, on a thread of its own, shared by every request for a few
//! seconds ([`TreeCounts`]). A request waits for a walk at most
//! [`WALK_WAIT`]; past that it answers with the counts of the walk before,
//! so that a tree of a million files (a walk of many seconds) does not make
//! every status, and every operator's command that asks for one, time out.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::live::LocalWatch;

/// How old the file counts of the watches in a status may be before a
/// request starts a new walk: a walk of a large tree is shared by every
/// status and metrics request for this long.
const COUNT_MAX_AGE: Duration = Duration::from_secs(5);

/// The longest a status request waits for a walk under way. A small tree
/// is counted within it, so its status is exact; a larger one answers with
/// the counts of the walk before (none, as zeros, before the first ends).
/// `warmsparectl` waits 5 s for a node's whole status.
const WALK_WAIT: Duration = Duration::from_secs(1);

/// Files and bytes per watch.
pub type Counts = BTreeMap<String, (u64, u64)>;

/// The last counts, and whether a walk is under way.
#[derive(Default)]
struct State {
    /// The last counts and when they were taken.
    last: Option<(Instant, Counts)>,
    /// A walk is under way: a request that finds the counts stale waits
    /// for it (at most [`WALK_WAIT`]) instead of starting another.
    walking: bool,
}

/// The files and bytes of each watch, counted at most once per
/// [`COUNT_MAX_AGE`] whatever the number of pollers, one walk at a time.
#[derive(Default)]
pub struct TreeCounts {
    state: Mutex<State>,
    /// Signalled when a walk ends.
    walked: Condvar,
}

impl TreeCounts {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The counts of `watches`: fresh ones, or those a walk gives within
    /// [`WALK_WAIT`], or else the last ones there are (a watch never
    /// counted has zeros). Starts a walk when the counts are stale and none
    /// is under way. Blocking: call it from a blocking thread.
    pub fn get(self: &Arc<Self>, watches: &[LocalWatch]) -> Counts {
        let covers = |c: &Counts| watches.iter().all(|w| c.contains_key(&w.name));
        let mut g = self.lock();
        if let Some((at, counts)) = &g.last {
            if at.elapsed() < COUNT_MAX_AGE && covers(counts) {
                return counts.clone();
            }
        }
        if !g.walking {
            g.walking = true;
            let roots: Vec<(String, PathBuf)> = watches.iter().map(|w| (w.name.clone(), w.root.clone())).collect();
            let me = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("warmspare-count".into())
                .spawn(move || me.walk(&roots));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a walk of the watches for their file counts");
                g.walking = false;
            }
        }
        let until = Instant::now() + WALK_WAIT;
        while g.walking {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            g = self.walked.wait_timeout(g, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        g.last.as_ref().map(|(_, c)| c.clone()).unwrap_or_default()
    }

    /// The walk's thread: counts `roots` and publishes the counts.
    fn walk(&self, roots: &[(String, PathBuf)]) {
        hold_for_tests();
        let counts: Counts = roots.iter().map(|(name, root)| (name.clone(), count(root))).collect();
        let mut g = self.lock();
        g.last = Some((Instant::now(), counts));
        g.walking = false;
        drop(g);
        self.walked.notify_all();
    }
}

/// The longest a walk waits in [`hold_for_tests`].
const HOLD_LIMIT: Duration = Duration::from_secs(600);

/// For tests only: while the file that `WARMSPARE_TEST_HOLD_STATUS_WALK`
/// names exists, a walk waits before it starts (at most [`HOLD_LIMIT`]), and
/// a file of that name plus `.held` shows that one is waiting. A test holds
/// a walk open for as long as it likes, as a walk of a tree of any size
/// would, and sees that neither replication nor the status waits for it.
/// Unset (always, outside tests), this costs one look at a cached
/// variable.
fn hold_for_tests() {
    static GATE: OnceLock<Option<PathBuf>> = OnceLock::new();
    let Some(gate) = GATE.get_or_init(|| std::env::var_os("WARMSPARE_TEST_HOLD_STATUS_WALK").map(PathBuf::from)) else {
        return;
    };
    if !gate.exists() {
        return;
    }
    let mut held = gate.clone().into_os_string();
    held.push(".held");
    let held = PathBuf::from(held);
    if let Err(e) = fs::write(&held, b"") {
        tracing::warn!(path = %held.display(), error = %e, "cannot mark the status walk held");
    }
    let until = Instant::now() + HOLD_LIMIT;
    while gate.exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = fs::remove_file(&held);
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
                    .is_some_and(warmspare_shared::relpath::is_temp_name)
            {
                files += 1;
                bytes += de.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    (files, bytes)
}
