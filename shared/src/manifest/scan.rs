//! Tree scans: every directory opened beneath the root with no link
//! followed (through the handles of a [`Dirs`], which a caller may keep
//! for many prefixes), listed and stat'ed through its descriptor; files
//! hashed through the cache, on up to four threads when many miss it.

use std::fs;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::AtFlags;

use super::{ContentHash, Entry, EntryKind, Excludes, HashCache, Meta, Status};
use crate::beneath::Dirs;
use crate::relpath::is_temp_name;

/// Something in the tree that is not replicated, reported to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// A socket, fifo or device node.
    Special(String),
    /// A name that is not UTF-8.
    NotUtf8(PathBuf),
    /// An entry that could not be read while scanning (with why): a file
    /// whose content, or a directory whose listing, is unknown. Nothing at
    /// or below that path may be taken as gone. (Entries that vanished are
    /// simply left out.)
    Unreadable(String, String),
}

impl Skipped {
    /// The path at and below which the scan does not know what the tree
    /// holds: a special file or an unreadable entry. A sender must leave
    /// its peer's copies there alone (a read error is never a deletion).
    pub fn unknown_path(&self) -> Option<&str> {
        match self {
            Skipped::Special(p) | Skipped::Unreadable(p, _) => Some(p),
            Skipped::NotUtf8(_) => None,
        }
    }
}

/// The result of scanning (part of) a tree.
#[derive(Debug, Default)]
pub struct Scan {
    /// The entries, sorted by path.
    pub entries: Vec<Entry>,
    /// What was passed over, and why.
    pub skipped: Vec<Skipped>,
    /// The positions in `entries`, in order, of the files that
    /// [`Hashing::Only`] left unread: their hash is not known (its bytes are
    /// all zero) and must not be used. Empty with [`Hashing::All`].
    pub unhashed: Vec<usize>,
}

impl Scan {
    /// Whether the entry at `index` is a file whose hash was left unread.
    pub fn is_unhashed(&self, index: usize) -> bool {
        self.unhashed.binary_search(&index).is_ok()
    }
}

/// Which files a scan reads to learn their content hash, when its cache
/// cannot answer.
#[derive(Clone, Copy)]
pub enum Hashing<'a> {
    /// Every file.
    All,
    /// Only the files for which this returns true, given the path and the
    /// size. A sender uses it to leave unread the files it will send anyway
    /// (the peer has nothing of that size there), and hashes them as it
    /// reads them to send.
    Only(&'a dyn Fn(&str, u64) -> bool),
}

/// Joins a relative manifest path onto a root.
pub fn join(root: &Path, rel: &str) -> PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    }
}

/// Scans `prefix` (a relative path; empty for the whole tree) under `root`.
///
/// When `prefix` names a file or a link, the scan holds that one entry; when
/// it names a directory, the directory and everything below it; when it does
/// not exist, nothing.
pub fn scan(root: &Path, prefix: &str, excludes: &Excludes, cache: &mut HashCache) -> Scan {
    scan_with(&mut Dirs::at(root), prefix, excludes, cache, Hashing::All, &|| {})
}

/// [`scan`] beneath the root of `dirs`, through its directory handles (a
/// caller that scans many prefixes in one pass keeps one [`Dirs`] for all
/// of them, and each directory is opened once), reading only the files
/// `hashing` asks for, and calling `tick` as it goes: for every directory
/// listed, every file hashed, and every 256 KiB of a file read (a caller
/// that must show progress, such as the shipper under the service
/// manager's watchdog, stamps it there).
pub fn scan_with(
    dirs: &mut Dirs,
    prefix: &str,
    excludes: &Excludes,
    cache: &mut HashCache,
    hashing: Hashing<'_>,
    tick: &(dyn Fn() + Sync),
) -> Scan {
    let mut out = Scan::default();
    let mut stack: Vec<String> = Vec::new();
    let mut misses: Vec<Miss> = Vec::new();
    // Every directory is opened beneath the root with no symbolic link
    // followed on the way (see `Dirs`), and listed and stat'ed through that
    // handle: a directory swapped for a link to elsewhere is never listed.
    if let Err(e) = dirs.root() {
        if e.kind() != io::ErrorKind::NotFound {
            out.skipped.push(Skipped::Unreadable(prefix.to_string(), e.to_string()));
        }
        return out;
    }
    if prefix.is_empty() {
        stack.push(String::new());
    } else {
        let found = dirs.parent(prefix).and_then(|(d, name)| {
            let st = rustix::fs::statat(&*d, name, AtFlags::SYMLINK_NOFOLLOW)?;
            Ok((d, name, Status::from(&st)))
        });
        match found {
            Ok((parent_dir, name, st)) => {
                if excludes.is_excluded(prefix, st.is_dir()) {
                    return out;
                }
                if let Some((e, unhashed)) = entry_for(prefix, (&parent_dir, name), &st, cache, &mut out.skipped) {
                    if e.kind == EntryKind::Dir {
                        stack.push(prefix.to_string());
                    }
                    push_entry(&mut out, &mut misses, e, unhashed.then_some((st, parent_dir)));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return out,
            Err(e) => {
                out.skipped.push(Skipped::Unreadable(prefix.to_string(), e.to_string()));
                return out;
            }
        }
    }
    while let Some(dir_rel) = stack.pop() {
        tick();
        let listed = dirs
            .dir(&dir_rel)
            .and_then(|dir| Ok((rustix::fs::Dir::read_from(&*dir)?, dir)));
        let (rd, dir) = match listed {
            Ok(l) => l,
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    out.skipped.push(Skipped::Unreadable(dir_rel.clone(), e.to_string()));
                }
                continue;
            }
        };
        for de in rd {
            // An entry the listing could not give (an I/O error part way)
            // leaves the rest of the directory unknown, not absent.
            let de = match de {
                Ok(de) => de,
                Err(e) => {
                    out.skipped.push(Skipped::Unreadable(dir_rel.clone(), e.to_string()));
                    break;
                }
            };
            let raw = de.file_name();
            if raw == c"." || raw == c".." {
                continue;
            }
            let Ok(name) = raw.to_str() else {
                let name = std::ffi::OsStr::from_bytes(raw.to_bytes());
                out.skipped
                    .push(Skipped::NotUtf8(join(dirs.path(), &dir_rel).join(name)));
                continue;
            };
            if is_temp_name(name) {
                continue;
            }
            let rel = if dir_rel.is_empty() {
                name.to_string()
            } else {
                format!("{dir_rel}/{name}")
            };
            // `fstatat` of the name in the directory read, never following it.
            let st = match rustix::fs::statat(&*dir, raw, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => Status::from(&st),
                Err(e) => {
                    if e != rustix::io::Errno::NOENT {
                        out.skipped
                            .push(Skipped::Unreadable(rel, io::Error::from(e).to_string()));
                    }
                    continue;
                }
            };
            if excludes.is_excluded(&rel, st.is_dir()) {
                continue;
            }
            if let Some((e, unhashed)) = entry_for(&rel, (&dir, name), &st, cache, &mut out.skipped) {
                if e.kind == EntryKind::Dir {
                    stack.push(rel);
                }
                push_entry(&mut out, &mut misses, e, unhashed.then(|| (st, dir.clone())));
            }
        }
    }
    let mut unread: Vec<String> = Vec::new();
    if let Hashing::Only(wanted) = hashing {
        misses.retain(|m| {
            let e = &out.entries[m.index];
            let want = wanted(&e.path, m.st.size);
            if !want {
                unread.push(e.path.clone());
            }
            want
        });
    }
    hash_misses(&mut out, misses, cache, tick);
    out.entries.sort_by(|a, b| a.path.cmp(&b.path));
    out.unhashed = unread
        .iter()
        .filter_map(|p| out.entries.binary_search_by(|e| e.path.as_str().cmp(p)).ok())
        .collect();
    out.unhashed.sort_unstable();
    out
}

/// Adds `e` to the scan; `unhashed` (its status and the handle of its
/// directory) when its hash is still to be read.
fn push_entry(out: &mut Scan, misses: &mut Vec<Miss>, e: Entry, unhashed: Option<(Status, Arc<fs::File>)>) {
    if let Some((st, dir)) = unhashed {
        misses.push(Miss {
            index: out.entries.len(),
            st,
            dir,
        });
    }
    out.entries.push(e);
}

/// A file of a scan whose hash the cache did not hold.
struct Miss {
    /// Its entry in the scan.
    index: usize,
    /// Its status when the walk saw it.
    st: Status,
    /// The directory it was seen in, as the walk opened it.
    dir: Arc<fs::File>,
}

/// From how many files on, a scan hashes on more than one thread (a cold
/// cache: the first start, or a restore of the whole tree).
const PARALLEL_HASH_MIN: usize = 64;

/// A file's content hash and its metadata after the read.
type Hashed = io::Result<(ContentHash, fs::Metadata)>;

/// Reads the content hash of the file `rel` seen in the directory open as
/// `dir`, then its metadata again (to notice a change during the read). The
/// file is opened in that handle, never through a link, without blocking,
/// and read only when it is a regular file (a fifo swapped in between the
/// walk and the read is an error, never a reader blocked for good).
fn hash_and_restat(dir: &fs::File, rel: &str, tick: &(dyn Fn() + Sync)) -> Hashed {
    tick();
    let (file, _) = crate::beneath::open_file_in(dir, crate::beneath::split(rel).1)?;
    let hash = ContentHash::of_reader(Ticking { inner: &file, tick })?;
    Ok((hash, file.metadata()?))
}

/// A reader that calls `tick` at every read (see [`scan_with`]).
struct Ticking<'a, R> {
    inner: R,
    tick: &'a (dyn Fn() + Sync),
}

impl<R: io::Read> io::Read for Ticking<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (self.tick)();
        self.inner.read(buf)
    }
}

/// Hashes the files the cache could not answer for, on up to four threads
/// when there are many, and fills in their entries. A file that cannot be
/// read leaves the scan (and is listed as skipped unless it is gone).
fn hash_misses(out: &mut Scan, misses: Vec<Miss>, cache: &mut HashCache, tick: &(dyn Fn() + Sync)) {
    if misses.is_empty() {
        return;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
    let results: Vec<Hashed> = if threads > 1 && misses.len() >= PARALLEL_HASH_MIN {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let parts: Vec<Vec<(usize, Hashed)>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(m) = misses.get(i) else { break };
                            done.push((i, hash_and_restat(&m.dir, &out.entries[m.index].path, tick)));
                        }
                        done
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let mut all: Vec<_> = parts.into_iter().flatten().collect();
        all.sort_unstable_by_key(|(i, _)| *i);
        all.into_iter().map(|(_, r)| r).collect()
    } else {
        misses
            .iter()
            .map(|m| hash_and_restat(&m.dir, &out.entries[m.index].path, tick))
            .collect()
    };
    let mut failed = vec![false; out.entries.len()];
    for (m, r) in misses.iter().zip(results) {
        let e = &mut out.entries[m.index];
        match r {
            Ok((hash, after)) => {
                cache.record(&e.path, m.st, hash, &after);
                if let EntryKind::File { hash: h, .. } = &mut e.kind {
                    *h = hash;
                }
            }
            Err(err) => {
                if err.kind() != io::ErrorKind::NotFound {
                    out.skipped.push(Skipped::Unreadable(e.path.clone(), err.to_string()));
                }
                failed[m.index] = true;
            }
        }
    }
    if failed.contains(&true) {
        let mut i = 0;
        out.entries.retain(|_| {
            i += 1;
            !failed[i - 1]
        });
    }
}

/// The entry for `rel`, whose name is `at.1` in the directory open as
/// `at.0`, with status `st`; `true` with it when its hash is still to be
/// read.
fn entry_for(
    rel: &str,
    at: (&fs::File, &str),
    st: &Status,
    cache: &mut HashCache,
    skipped: &mut Vec<Skipped>,
) -> Option<(Entry, bool)> {
    let meta = Meta::from_status(st);
    let mut unhashed = false;
    let kind = if st.is_dir() {
        EntryKind::Dir
    } else if st.is_symlink() {
        match rustix::fs::readlinkat(at.0, at.1, Vec::new()) {
            Ok(t) => match t.into_string() {
                Ok(target) => EntryKind::Symlink { target },
                Err(e) => {
                    skipped.push(Skipped::NotUtf8(PathBuf::from(std::ffi::OsString::from_vec(
                        e.into_cstring().into_bytes(),
                    ))));
                    return None;
                }
            },
            Err(e) => {
                skipped.push(Skipped::Unreadable(rel.to_string(), e.to_string()));
                return None;
            }
        }
    } else if st.is_file() {
        // A miss is hashed after the walk (see `hash_misses`).
        let hash = cache.cached(rel, *st);
        unhashed = hash.is_none();
        EntryKind::File {
            size: st.size,
            hash: hash.unwrap_or(ContentHash([0; 32])),
        }
    } else {
        skipped.push(Skipped::Special(rel.to_string()));
        return None;
    };
    Some((
        Entry {
            path: rel.to_string(),
            kind,
            meta,
        },
        unhashed,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_lists_tree_and_skips_temp_and_excluded() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/b/f"), b"hello").unwrap();
        fs::write(root.join("a/.warmspare-tmp.x"), b"junk").unwrap();
        fs::write(root.join("skip.bak"), b"junk").unwrap();
        std::os::unix::fs::symlink("b/f", root.join("a/l")).unwrap();
        let ex = Excludes::new(&["*.bak".into()]).unwrap();
        let mut cache = HashCache::default();
        let s = scan(root, "", &ex, &mut cache);
        let paths: Vec<_> = s.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a", "a/b", "a/b/f", "a/l"]);
        assert_eq!(s.entries[2].hash(), Some(ContentHash::of(b"hello")));
        assert_eq!(s.entries[3].kind, EntryKind::Symlink { target: "b/f".into() });
        let sub = scan(root, "a/b", &ex, &mut cache);
        assert_eq!(sub.entries.len(), 2);
        assert!(scan(root, "nope", &ex, &mut cache).entries.is_empty());
    }

    #[test]
    fn a_scan_never_lists_through_a_link() {
        let d = tempfile::tempdir().unwrap();
        let (root, outside) = (d.path().join("root"), d.path().join("outside"));
        fs::create_dir_all(root.join("real")).unwrap();
        fs::create_dir_all(outside.join("deeper")).unwrap();
        fs::write(outside.join("secret"), b"outside").unwrap();
        fs::write(root.join("real/f"), b"inside").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("sub")).unwrap();
        let mut cache = HashCache::default();
        // A path below a link (a directory swapped for one since the event).
        for prefix in ["sub/secret", "sub/deeper"] {
            let s = scan(&root, prefix, &Excludes::default(), &mut cache);
            assert!(s.entries.is_empty(), "{prefix}: {:?}", s.entries);
            assert_eq!(s.skipped.len(), 1, "{prefix}: {:?}", s.skipped);
            assert_eq!(s.skipped[0].unknown_path(), Some(prefix));
        }
        let all = scan(&root, "", &Excludes::default(), &mut cache);
        let paths: Vec<_> = all.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["real", "real/f", "sub"]);
        assert_eq!(all.entries[1].hash(), Some(ContentHash::of(b"inside")));
        // A fifo is passed over, and known to be there.
        let made = std::process::Command::new("mkfifo")
            .arg(root.join("real/fifo"))
            .status()
            .unwrap();
        assert!(made.success());
        let s = scan(&root, "real", &Excludes::default(), &mut cache);
        assert_eq!(s.entries.len(), 2);
        assert_eq!(s.skipped, [Skipped::Special("real/fifo".into())]);
        assert_eq!(s.skipped[0].unknown_path(), Some("real/fifo"));
    }

    #[test]
    fn a_scan_reads_only_the_files_it_is_asked_to() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir_all(root.join("d")).unwrap();
        for name in ["d/a", "d/b", "d/c", "e"] {
            fs::write(root.join(name), name.as_bytes()).unwrap();
        }
        let mut cache = HashCache::trusting_every_change();
        let wanted = |path: &str, size: u64| path == "d/b" && size == 3;
        let s = scan_with(
            &mut Dirs::at(root),
            "",
            &Excludes::default(),
            &mut cache,
            Hashing::Only(&wanted),
            &|| {},
        );
        let paths: Vec<_> = s.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["d", "d/a", "d/b", "d/c", "e"]);
        assert_eq!(s.unhashed, [1, 3, 4]);
        assert!(s.is_unhashed(1) && !s.is_unhashed(2) && !s.is_unhashed(0));
        assert_eq!(s.entries[2].hash(), Some(ContentHash::of(b"d/b")));
        // Only what was read is cached; the same scan with everything
        // wanted now reads the other three.
        assert_eq!(cache.len(), 1);
        let all = scan(root, "", &Excludes::default(), &mut cache);
        assert!(all.unhashed.is_empty());
        assert_eq!(all.entries[4].hash(), Some(ContentHash::of(b"e")));
        assert_eq!(cache.len(), 4);
    }
}
