//! Tree scans: every directory opened beneath the root with no link
//! followed, listed and stat'ed through its descriptor; files hashed through
//! the cache, on up to four threads when many miss it.

use std::fs;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{ContentHash, Entry, EntryKind, Excludes, HashCache, Meta};
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
    scan_with(root, prefix, excludes, cache, Hashing::All, &|| {})
}

/// [`scan`], reading only the files `hashing` asks for, and calling `tick`
/// as it goes: for every directory listed, every file hashed, and every
/// 256 KiB of a file read (a caller that must show progress, such as the
/// shipper under the service manager's watchdog, stamps it there).
pub fn scan_with(
    root: &Path,
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
    // followed on the way, and listed and stat'ed through that descriptor:
    // a directory swapped for a link to elsewhere is never listed.
    let root_dir = match open_dir(root) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return out,
        Err(e) => {
            out.skipped.push(Skipped::Unreadable(prefix.to_string(), e.to_string()));
            return out;
        }
    };
    if prefix.is_empty() {
        stack.push(String::new());
    } else {
        let (parent, name) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let found = dir_beneath(&root_dir, parent).and_then(|d| {
            let md = fs::symlink_metadata(by_fd(&d, &join(root, parent)).join(name))?;
            Ok((d, md))
        });
        match found {
            Ok((parent_dir, md)) => {
                if excludes.is_excluded(prefix, md.is_dir()) {
                    return out;
                }
                if let Some((e, unhashed)) = entry_for(prefix, (&parent_dir, name), &md, cache, &mut out.skipped) {
                    if e.kind == EntryKind::Dir {
                        stack.push(prefix.to_string());
                    }
                    push_entry(&mut out, &mut misses, e, unhashed.then_some(md));
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
        let dir_abs = join(root, &dir_rel);
        let dir = match dir_beneath(&root_dir, &dir_rel) {
            Ok(d) => d,
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    out.skipped.push(Skipped::Unreadable(dir_rel.clone(), e.to_string()));
                }
                continue;
            }
        };
        let rd = match fs::read_dir(by_fd(&dir, &dir_abs)) {
            Ok(rd) => rd,
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
            let name = de.file_name();
            let Some(name) = name.to_str() else {
                out.skipped.push(Skipped::NotUtf8(dir_abs.join(&name)));
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
            let md = match de.metadata() {
                Ok(md) => md,
                Err(e) => {
                    if e.kind() != io::ErrorKind::NotFound {
                        out.skipped.push(Skipped::Unreadable(rel, e.to_string()));
                    }
                    continue;
                }
            };
            if excludes.is_excluded(&rel, md.is_dir()) {
                continue;
            }
            if let Some((e, unhashed)) = entry_for(&rel, (&dir, name), &md, cache, &mut out.skipped) {
                if e.kind == EntryKind::Dir {
                    stack.push(rel);
                }
                push_entry(&mut out, &mut misses, e, unhashed.then_some(md));
            }
        }
    }
    let mut unread: Vec<String> = Vec::new();
    if let Hashing::Only(wanted) = hashing {
        misses.retain(|m| {
            let e = &out.entries[m.index];
            let want = wanted(&e.path, m.md.size());
            if !want {
                unread.push(e.path.clone());
            }
            want
        });
    }
    hash_misses(root, &mut out, misses, cache, tick);
    out.entries.sort_by(|a, b| a.path.cmp(&b.path));
    out.unhashed = unread
        .iter()
        .filter_map(|p| out.entries.binary_search_by(|e| e.path.as_str().cmp(p)).ok())
        .collect();
    out.unhashed.sort_unstable();
    out
}

/// Adds `e` to the scan; `unhashed` (its path and metadata) when its hash is
/// still to be read.
fn push_entry(out: &mut Scan, misses: &mut Vec<Miss>, e: Entry, unhashed: Option<fs::Metadata>) {
    if let Some(md) = unhashed {
        misses.push(Miss {
            index: out.entries.len(),
            md,
        });
    }
    out.entries.push(e);
}

/// A file of a scan whose hash the cache did not hold.
struct Miss {
    /// Its entry in the scan.
    index: usize,
    /// Its metadata when the walk saw it.
    md: fs::Metadata,
}

/// From how many files on, a scan hashes on more than one thread (a cold
/// cache: the first start, or a restore of the whole tree).
const PARALLEL_HASH_MIN: usize = 64;

/// A file's content hash and its metadata after the read.
type Hashed = io::Result<(ContentHash, fs::Metadata)>;

/// Reads the content hash of the file `rel` beneath `root`, then its
/// metadata again (to notice a change during the read). The file is opened
/// beneath the root with no symbolic link followed on the way, without
/// blocking, and read only when it is a regular file (a directory swapped
/// for a link, or a fifo swapped in, between the walk and the read is an
/// error, never an outside file read nor a reader blocked for good).
fn hash_and_restat(root: &Path, rel: &str, tick: &(dyn Fn() + Sync)) -> Hashed {
    tick();
    let (file, _) = crate::beneath::open_file_beneath(root, rel)?;
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
fn hash_misses(root: &Path, out: &mut Scan, misses: Vec<Miss>, cache: &mut HashCache, tick: &(dyn Fn() + Sync)) {
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
                            done.push((i, hash_and_restat(root, &out.entries[m.index].path, tick)));
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
            .map(|m| hash_and_restat(root, &out.entries[m.index].path, tick))
            .collect()
    };
    let mut failed = vec![false; out.entries.len()];
    for (m, r) in misses.iter().zip(results) {
        let e = &mut out.entries[m.index];
        match r {
            Ok((hash, after)) => {
                cache.record(&e.path, &m.md, hash, &after);
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

/// Opens the directory `path` (the watch root) for a walk beneath it.
fn open_dir(path: &Path) -> io::Result<fs::File> {
    use rustix::fs::{Mode, OFlags};
    Ok(fs::File::from(rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?))
}

/// Opens the directory `rel` beneath the watch root open as `root`, with
/// no symbolic link followed on the way (the root itself for `""`).
fn dir_beneath(root: &fs::File, rel: &str) -> io::Result<fs::File> {
    if rel.is_empty() {
        return root.try_clone();
    }
    crate::beneath::open_beneath(root, rel, rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY)
}

/// A path that names the directory open as `dir` itself, not whatever its
/// path names by now: `/proc/self/fd/N`, a link to the open directory
/// (std lists and stats entries only by path). Where `/proc` is missing,
/// `fallback`, its path.
fn by_fd(dir: &fs::File, fallback: &Path) -> PathBuf {
    use std::os::fd::AsRawFd;
    static PROC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *PROC.get_or_init(|| Path::new("/proc/self/fd").is_dir()) {
        PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()))
    } else {
        fallback.to_path_buf()
    }
}

/// The entry for `rel`, whose name is `at.1` in the directory open as
/// `at.0`, with metadata `md`; `true` with it when its hash is still to be
/// read.
fn entry_for(
    rel: &str,
    at: (&fs::File, &str),
    md: &fs::Metadata,
    cache: &mut HashCache,
    skipped: &mut Vec<Skipped>,
) -> Option<(Entry, bool)> {
    let ft = md.file_type();
    let meta = Meta::from_metadata(md);
    let mut unhashed = false;
    let kind = if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_symlink() {
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
    } else if ft.is_file() {
        // A miss is hashed after the walk (see `hash_misses`).
        let hash = cache.cached(rel, md);
        unhashed = hash.is_none();
        EntryKind::File {
            size: md.size(),
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
            root,
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
