//! The watches' file counts for status and metrics: a walk of a large
//! tree is shared by every request for a few seconds ([`TreeCounts`]).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::live::LocalWatch;

/// How old the file counts of the watches in a status may be: a walk of a
/// large tree is shared by every status and metrics request for this long.
const COUNT_MAX_AGE: Duration = Duration::from_secs(5);

/// Files and bytes per watch.
pub type Counts = BTreeMap<String, (u64, u64)>;

/// The files and bytes of each watch, counted at most once per
/// [`COUNT_MAX_AGE`] whatever the number of pollers.
#[derive(Default)]
pub struct TreeCounts {
    /// The last counts and when they were taken.
    last: Mutex<Option<(Instant, Counts)>>,
    /// Held by the walk under way (on a blocking thread): requests that find
    /// the counts stale meanwhile wait for its result instead of walking too.
    /// Only status requests ever take it.
    walk: Mutex<()>,
}

impl TreeCounts {
    fn fresh(&self, watches: &[LocalWatch]) -> Option<Counts> {
        let g = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let (at, counts) = g.as_ref()?;
        (at.elapsed() < COUNT_MAX_AGE && watches.iter().all(|w| counts.contains_key(&w.name))).then(|| counts.clone())
    }

    /// The counts of `watches`, walking their trees when the last counts
    /// are stale. Blocking: call it from a blocking thread.
    pub fn get(&self, watches: &[LocalWatch]) -> Counts {
        if let Some(c) = self.fresh(watches) {
            return c;
        }
        let _walk = self.walk.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = self.fresh(watches) {
            return c;
        }
        hold_for_tests();
        let counts: Counts = watches.iter().map(|w| (w.name.clone(), count(&w.root))).collect();
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), counts.clone()));
        counts
    }
}

/// The longest a walk waits in [`hold_for_tests`].
const HOLD_LIMIT: Duration = Duration::from_secs(600);

/// For tests only: while the file that `WARMSPARE_TEST_HOLD_STATUS_WALK`
/// names exists, a walk waits before it starts (at most [`HOLD_LIMIT`]), and
/// a file of that name plus `.held` shows that one is waiting. A test holds
/// a status request in the middle of its walk for as long as it likes, as
/// a walk of a tree of any size would, and sees that nothing else waits
/// for it. Unset (always, outside tests), this costs one look at a cached
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
