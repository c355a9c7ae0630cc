//! The bounds of the preserved store, `<state_dir>/diverged/`.
//!
//! A passive moves a local file that differs from the last synced content
//! there before replacing it, one folder per receiving session
//! (`<epoch>-<time>/<watch>/<path>`). Without a bound, a local user who can
//! write under a watch root on the passive fills the state dir's file
//! system by writing files for the receiver to preserve. [`prune`] keeps
//! the store within `diverged_max_size` and `diverged_max_age`, removing
//! whole session folders, oldest first. The folder the receiver is writing
//! into now is never removed, however large.
//!
//! A folder's age runs from the last time something was preserved in it:
//! the newest modification time of its directories (a move into a
//! directory updates it; the preserved files keep their own times).

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// How much the store may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most bytes of files kept.
    pub max_size: u64,
    /// How long a folder is kept after its last preserved file.
    pub max_age: Duration,
}

/// Why a folder was removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Nothing was preserved in it for longer than the age limit.
    Age,
    /// The store was over its size limit and it was the oldest.
    Size,
}

impl Reason {
    /// The reason as a word for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Age => "age",
            Reason::Size => "size",
        }
    }
}

/// One folder removed by [`prune`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pruned {
    /// The folder's name under `diverged/`, escaped for printing.
    pub folder: String,
    /// Files it held.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Why it went.
    pub reason: Reason,
}

/// What [`prune`] did.
#[derive(Debug, Default)]
pub struct Report {
    /// The folders removed, oldest first.
    pub pruned: Vec<Pruned>,
    /// Folders that should have gone but could not be removed.
    pub failed: Vec<(String, io::Error)>,
    /// Bytes the store holds afterwards.
    pub bytes_left: u64,
}

/// Files removed by pruning since the process started (the
/// `warmspare_diverged_pruned_total` metric).
static PRUNED_FILES: AtomicU64 = AtomicU64::new(0);

/// Files removed from `diverged/` by pruning since the process started.
pub fn pruned_total() -> u64 {
    PRUNED_FILES.load(Ordering::Relaxed)
}

struct Folder {
    path: PathBuf,
    name: OsString,
    files: u64,
    bytes: u64,
    last: SystemTime,
}

/// Files, bytes and the newest directory modification time under `path`
/// (itself included), without following links. What cannot be read counts
/// as nothing: measuring never fails a prune.
fn measure(path: &Path) -> (u64, u64, SystemTime) {
    let (mut files, mut bytes, mut last) = (0, 0, SystemTime::UNIX_EPOCH);
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(md) = fs::symlink_metadata(&p) else { continue };
        if md.is_dir() {
            if let Ok(t) = md.modified() {
                last = last.max(t);
            }
            if let Ok(rd) = fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        } else {
            files += 1;
            bytes += md.len();
            if p == path {
                // A stray file at the top: its own time is all there is.
                if let Ok(t) = md.modified() {
                    last = last.max(t);
                }
            }
        }
    }
    (files, bytes, last)
}

/// Removes folders under `dir` (the `diverged/` folder) until what is left
/// is within `limits`: first every folder nothing was preserved in for
/// longer than `max_age`, then the oldest ones while the total is over
/// `max_size`. `keep`, the folder being written into now, is never removed.
/// A missing `dir` is an empty store.
pub fn prune(dir: &Path, limits: &Limits, keep: Option<&Path>, now: SystemTime) -> io::Result<Report> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Report::default()),
        Err(e) => return Err(e),
    };
    let mut folders: Vec<Folder> = rd
        .flatten()
        .map(|e| {
            let path = e.path();
            let (files, bytes, last) = measure(&path);
            Folder {
                path,
                name: e.file_name(),
                files,
                bytes,
                last,
            }
        })
        .collect();
    // Oldest first; the name (epoch, then time) breaks ties.
    folders.sort_by(|a, b| a.last.cmp(&b.last).then_with(|| a.name.cmp(&b.name)));
    let mut total: u64 = folders.iter().map(|f| f.bytes).sum();
    let mut report = Report::default();
    let is_kept = |f: &Folder| keep.is_some_and(|k| k == f.path);
    let remove = |f: &Folder, reason: Reason, report: &mut Report| -> bool {
        let name = crate::text::escape_bytes(std::os::unix::ffi::OsStrExt::as_bytes(f.name.as_os_str()));
        let md = fs::symlink_metadata(&f.path);
        let removed = match md {
            Ok(md) if md.is_dir() => fs::remove_dir_all(&f.path),
            Ok(_) => fs::remove_file(&f.path),
            Err(e) => Err(e),
        };
        match removed {
            Ok(()) => {
                PRUNED_FILES.fetch_add(f.files, Ordering::Relaxed);
                report.pruned.push(Pruned {
                    folder: name,
                    files: f.files,
                    bytes: f.bytes,
                    reason,
                });
                true
            }
            Err(e) => {
                report.failed.push((name, e));
                false
            }
        }
    };
    let mut left = Vec::new();
    for f in folders {
        let old = now.duration_since(f.last).is_ok_and(|age| age > limits.max_age);
        if old && !is_kept(&f) && remove(&f, Reason::Age, &mut report) {
            total = total.saturating_sub(f.bytes);
        } else {
            left.push(f);
        }
    }
    for f in &left {
        if total <= limits.max_size {
            break;
        }
        if !is_kept(f) && remove(f, Reason::Size, &mut report) {
            total = total.saturating_sub(f.bytes);
        }
    }
    report.bytes_left = total;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(dir: &Path, name: &str, files: &[(&str, usize)], age: Duration, now: SystemTime) -> PathBuf {
        let f = dir.join(name);
        for (rel, len) in files {
            let p = f.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, vec![b'x'; *len]).unwrap();
        }
        // Every directory in it last changed `age` ago.
        let t = now - age;
        let mut stack = vec![f.clone()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                }
            }
            fs::File::open(&d).unwrap().set_modified(t).unwrap();
        }
        f
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn prunes_by_age_then_oldest_first_by_size_and_keeps_the_current_folder() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("diverged");
        let now = SystemTime::now();
        let before = pruned_total();
        let ancient = folder(
            &dir,
            "3-20250101T000000Z",
            &[("ca/a.pem", 100), ("ca/b.pem", 100)],
            40 * DAY,
            now,
        );
        let old = folder(&dir, "4-20250301T000000Z", &[("ca/big", 5_000)], 20 * DAY, now);
        let mid = folder(&dir, "5-20250401T000000Z", &[("ca/mid", 3_000)], 10 * DAY, now);
        let recent = folder(&dir, "5-20250410T000000Z", &[("ca/x/y", 2_000)], DAY, now);
        let current = folder(&dir, "6-20250411T000000Z", &[("ca/fresh", 4_000)], Duration::ZERO, now);
        let limits = Limits {
            max_size: 7_000,
            max_age: 30 * DAY,
        };
        let r = prune(&dir, &limits, Some(&current), now).unwrap();
        let gone: Vec<(&str, Reason)> = r.pruned.iter().map(|p| (p.folder.as_str(), p.reason)).collect();
        // 40 days: age. Then 5000+3000+2000+4000 = 14000 > 7000: the oldest
        // go until 6000 is left.
        assert_eq!(
            gone,
            vec![
                ("3-20250101T000000Z", Reason::Age),
                ("4-20250301T000000Z", Reason::Size),
                ("5-20250401T000000Z", Reason::Size),
            ]
        );
        assert!(!ancient.exists() && !old.exists() && !mid.exists());
        assert!(recent.exists() && current.exists());
        assert_eq!(r.bytes_left, 6_000);
        assert!(pruned_total() >= before + 4, "the counter counts files");

        // The current folder stays even when it alone is over the limit.
        let tiny = Limits {
            max_size: 10,
            max_age: 30 * DAY,
        };
        let r = prune(&dir, &tiny, Some(&current), now).unwrap();
        assert_eq!(r.pruned.len(), 1, "{:?}", r.pruned);
        assert!(!recent.exists() && current.exists());
        assert_eq!(r.bytes_left, 4_000);

        // Within limits: nothing goes.
        let r = prune(&dir, &limits, None, now).unwrap();
        assert!(r.pruned.is_empty());
        // A missing store is empty.
        assert!(prune(&d.path().join("none"), &limits, None, now)
            .unwrap()
            .pruned
            .is_empty());
    }

    #[test]
    fn links_in_the_store_are_removed_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("diverged");
        let outside = d.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("keep"), b"not in the store").unwrap();
        let now = SystemTime::now();
        let f = folder(&dir, "1-20250101T000000Z", &[("ca/a", 10)], 40 * DAY, now);
        std::os::unix::fs::symlink(&outside, f.join("ca/link")).unwrap();
        fs::File::open(f.join("ca"))
            .unwrap()
            .set_modified(now - 40 * DAY)
            .unwrap();
        let limits = Limits {
            max_size: 1 << 30,
            max_age: 30 * DAY,
        };
        let r = prune(&dir, &limits, None, now).unwrap();
        assert_eq!(r.pruned.len(), 1);
        assert!(!f.exists());
        assert!(outside.join("keep").exists());
    }
}
