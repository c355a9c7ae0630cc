//! Manifests: what a watched tree holds, entry by entry.
//!
//! A manifest lists every directory, regular file and symbolic link under a
//! watch root with its metadata and, for files, a BLAKE3 content hash. Hashes
//! are cached by inode, size, mtime and ctime so a rescan (or a restart, the
//! cache is persisted) re-reads only what changed. Temporary files of the
//! applier and excluded paths never enter a manifest.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use serde::{Deserialize, Serialize};

use crate::relpath::{check_rel_path, Refused};
pub use crate::relpath::{is_temp_name, is_under, subtree, TEMP_PREFIX};

/// A BLAKE3 content hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    /// The hash of `data`.
    pub fn of(data: &[u8]) -> ContentHash {
        ContentHash(*blake3::hash(data).as_bytes())
    }

    /// Hashes the file at `path` (its holes without reading them).
    pub fn of_file(path: &Path) -> io::Result<ContentHash> {
        let file = crate::sys::open_for_reading(path, 0)?;
        Ok(crate::sparse::hash_file(&file)?.1)
    }

    /// Hashes what `r` yields up to its end. Small inputs (most replicated
    /// files: certificates, keys, CRLs) are read in one go; larger ones are
    /// read and hashed a buffer at a time, never mapped (a file truncated
    /// by another process while mapped kills the reader with `SIGBUS`).
    pub fn of_reader(mut r: impl Read) -> io::Result<ContentHash> {
        let mut small = [0u8; 32 * 1024];
        let n = crate::delta::read_full(&mut r, &mut small)?;
        if n < small.len() {
            return Ok(ContentHash::of(&small[..n]));
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(&small);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = crate::delta::read_full(&mut r, &mut buf)?;
            hasher.update(&buf[..n]);
            if n < buf.len() {
                return Ok(ContentHash(*hasher.finalize().as_bytes()));
            }
        }
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &hex::encode(self.0)[..16])
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", hex::encode(self.0))
    }
}

/// What kind of thing an entry is, with what identifies its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file of `size` bytes with content `hash`.
    File {
        /// Size in bytes.
        size: u64,
        /// BLAKE3 of the content.
        hash: ContentHash,
    },
    /// A symbolic link to `target` (never followed).
    Symlink {
        /// The link's target, as stored in the link.
        target: String,
    },
}

/// Metadata kept along with content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Meta {
    /// Permission bits (including setuid/setgid/sticky), without the type.
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
}

impl Meta {
    /// Reads the metadata of `md`.
    pub fn from_metadata(md: &fs::Metadata) -> Meta {
        Meta {
            mode: md.mode() & 0o7777,
            mtime: md.mtime(),
            mtime_nsec: md.mtime_nsec().clamp(0, 999_999_999) as u32,
            uid: md.uid(),
            gid: md.gid(),
        }
    }

    /// Whether two metadata agree on what replication keeps. Owners are only
    /// compared when `owners` is set (the receiver can change them); the
    /// mtime of directories is not compared (applying files changes it).
    pub fn same_as(&self, other: &Meta, kind: &EntryKind, owners: bool) -> bool {
        let owner_ok = !owners || (self.uid == other.uid && self.gid == other.gid);
        match kind {
            EntryKind::Symlink { .. } => owner_ok,
            EntryKind::Dir => owner_ok && self.mode == other.mode,
            EntryKind::File { .. } => {
                owner_ok && self.mode == other.mode && self.mtime == other.mtime && self.mtime_nsec == other.mtime_nsec
            }
        }
    }
}

/// One entry of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative path under the watch root, `/`-separated, normalised.
    pub path: String,
    /// What the entry is.
    pub kind: EntryKind,
    /// Its metadata.
    pub meta: Meta,
}

impl Entry {
    /// Whether two entries have the same content (type and bytes or target).
    pub fn same_content(&self, other: &Entry) -> bool {
        self.kind == other.kind
    }

    /// The content hash, for files.
    pub fn hash(&self) -> Option<ContentHash> {
        match &self.kind {
            EntryKind::File { hash, .. } => Some(*hash),
            _ => None,
        }
    }
}

/// Checks a manifest received from a peer: every path must be one the peer
/// itself would accept on the wire (see [`check_rel_path`]).
/// A manifest that fails ends the session.
pub fn check_peer_entries(entries: &[Entry]) -> Result<(), Refused> {
    for e in entries {
        check_rel_path(&e.path)?;
    }
    Ok(())
}

/// Compiled `exclude` globs of one watch (gitignore syntax, relative to the root).
#[derive(Clone)]
pub struct Excludes {
    matcher: Gitignore,
}

impl fmt::Debug for Excludes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Excludes({})", self.matcher.num_ignores())
    }
}

impl Default for Excludes {
    /// Nothing is excluded.
    fn default() -> Excludes {
        Excludes {
            matcher: Gitignore::empty(),
        }
    }
}

impl Excludes {
    /// Compiles `globs`; an invalid glob is an error naming it.
    pub fn new(globs: &[String]) -> Result<Excludes, String> {
        let mut b = GitignoreBuilder::new("/");
        for g in globs {
            Excludes::check_glob(g)?;
            b.add_line(None, g).map_err(|e| format!("invalid glob {g:?}: {e}"))?;
        }
        let matcher = b.build().map_err(|e| format!("invalid exclude globs: {e}"))?;
        Ok(Excludes { matcher })
    }

    /// Checks one glob.
    pub fn check_glob(glob: &str) -> Result<(), String> {
        let pattern = glob.trim_start_matches('!').trim_end_matches('/');
        globset::Glob::new(pattern)
            .map(|_| ())
            .map_err(|e| format!("invalid glob {glob:?}: {e}"))
    }

    /// Whether the relative path `rel` (or a directory above it) is excluded.
    pub fn is_excluded(&self, rel: &str, is_dir: bool) -> bool {
        if rel.is_empty() || self.matcher.is_empty() {
            return false;
        }
        self.matcher
            .matched_path_or_any_parents(Path::new("/").join(rel), is_dir)
            .is_ignore()
    }
}

/// A cached hash, valid while the file's identity and times are unchanged.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Cached {
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    hash: ContentHash,
}

/// Hashes of files by path, valid while inode, size, mtime and ctime hold.
#[derive(Debug)]
pub struct HashCache {
    map: HashMap<Box<str>, Cached>,
    dirty: bool,
    /// Changes more recent than this (in nanoseconds) are not cached.
    racy_ns: i128,
}

impl Default for HashCache {
    fn default() -> HashCache {
        HashCache {
            map: HashMap::new(),
            dirty: false,
            racy_ns: RACY,
        }
    }
}

/// Modification and change times in nanoseconds since the epoch (clamped
/// to what an `i64` holds, the years 1678 to 2262).
fn times(md: &fs::Metadata) -> (i64, i64) {
    let ns = |s: i64, n: i64| (s as i128 * 1_000_000_000 + n as i128).clamp(i64::MIN as i128, i64::MAX as i128) as i64;
    (ns(md.mtime(), md.mtime_nsec()), ns(md.ctime(), md.ctime_nsec()))
}

/// How recent a change must be for its timestamps not to identify the
/// content. Kernels without fine-grained timestamps (before Linux 6.13, so
/// every RHEL 8 and 9 host) stamp files from a clock that ticks every few
/// milliseconds: a file rewritten with the same size within one tick of being
/// hashed keeps inode, size, mtime and ctime, and a cached hash would hide the
/// new content for good. Such files are hashed again until the tick is past.
const RACY: i128 = 1_000_000_000;

/// Whether a file changed at `ctime_ns` could change again without its
/// timestamps showing it, given the window `racy_ns`.
fn is_racy(ctime_ns: i64, racy_ns: i128) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    ctime_ns as i128 > now - racy_ns
}

impl HashCache {
    /// Loads a cache persisted by [`HashCache::save`]; a missing or unreadable
    /// cache is an empty one (it is only an accelerator).
    pub fn load(path: &Path) -> HashCache {
        fs::read(path).map(|b| HashCache::from_bytes(&b)).unwrap_or_default()
    }

    /// Decodes a persisted cache; bytes that do not decode give an empty cache.
    pub fn from_bytes(bytes: &[u8]) -> HashCache {
        let map = crate::persist::decode_persisted::<HashMap<Box<str>, Cached>>(bytes).unwrap_or_default();
        HashCache {
            map,
            ..HashCache::default()
        }
    }

    /// Takes in the entries of `newer`, which win over this cache's own
    /// (a cache loaded from disk absorbing what was learnt since it was
    /// saved).
    pub fn absorb(&mut self, newer: HashCache) {
        self.dirty |= !newer.map.is_empty() || newer.dirty;
        self.map.extend(newer.map);
    }

    /// Whether the cache has changes not yet saved.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// How many files the cache knows.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the cache knows no file.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Persists the cache atomically when it changed.
    pub fn save(&mut self, path: &Path) -> io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let bytes = bincode::serde::encode_to_vec(&self.map, bincode::config::standard()).map_err(io::Error::other)?;
        crate::persist::write_atomic(path, &bytes)?;
        self.dirty = false;
        Ok(())
    }

    /// The hash of the file `abs` (relative name `rel`) with metadata `md`,
    /// from the cache when it is still valid, else by reading the file.
    pub fn hash(&mut self, rel: &str, abs: &Path, md: &fs::Metadata) -> io::Result<ContentHash> {
        if let Some(hash) = self.cached(rel, md) {
            return Ok(hash);
        }
        let hash = ContentHash::of_file(abs)?;
        let after = fs::symlink_metadata(abs)?;
        self.record(rel, md, hash, &after);
        Ok(hash)
    }

    /// The cached hash of `rel` when `md` says the file is unchanged.
    pub fn cached(&self, rel: &str, md: &fs::Metadata) -> Option<ContentHash> {
        let (mtime_ns, ctime_ns) = times(md);
        let c = self.map.get(rel)?;
        (c.ino == md.ino() && c.size == md.size() && c.mtime_ns == mtime_ns && c.ctime_ns == ctime_ns).then_some(c.hash)
    }

    /// Caches `hash`, read from a file that had `md` before the read and
    /// `after` after it, unless the file changed meanwhile (it is hashed
    /// again on its next event) or changed too recently to be trusted.
    pub fn record(&mut self, rel: &str, md: &fs::Metadata, hash: ContentHash, after: &fs::Metadata) {
        let (mtime_ns, ctime_ns) = times(md);
        if times(after) == (mtime_ns, ctime_ns) && after.size() == md.size() && !is_racy(ctime_ns, self.racy_ns) {
            self.insert(rel, md, hash);
        } else {
            self.forget_file(rel);
        }
    }

    /// Records that the file `rel` with metadata `md` has content `hash`.
    pub fn insert(&mut self, rel: &str, md: &fs::Metadata, hash: ContentHash) {
        let (mtime_ns, ctime_ns) = times(md);
        self.map.insert(
            rel.into(),
            Cached {
                ino: md.ino(),
                size: md.size(),
                mtime_ns,
                ctime_ns,
                hash,
            },
        );
        self.dirty = true;
    }

    fn forget_file(&mut self, rel: &str) {
        self.dirty |= self.map.remove(rel).is_some();
    }

    /// Forgets `rel` and everything below it.
    pub fn forget(&mut self, rel: &str) {
        let before = self.map.len();
        let prefix = format!("{rel}/");
        self.map.retain(|k, _| &**k != rel && !k.starts_with(&prefix));
        self.dirty |= self.map.len() != before;
    }

    /// Drops entries for paths no longer present in `keep`.
    pub fn retain_paths(&mut self, keep: &dyn Fn(&str) -> bool) {
        let before = self.map.len();
        self.map.retain(|k, _| keep(k));
        self.dirty |= self.map.len() != before;
    }
}

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
    scan_with(root, prefix, excludes, cache, Hashing::All)
}

/// [`scan`], reading only the files `hashing` asks for.
pub fn scan_with(root: &Path, prefix: &str, excludes: &Excludes, cache: &mut HashCache, hashing: Hashing<'_>) -> Scan {
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
    hash_misses(root, &mut out, misses, cache);
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
fn hash_and_restat(root: &Path, rel: &str) -> Hashed {
    let (file, _) = crate::beneath::open_file_beneath(root, rel)?;
    let hash = ContentHash::of_reader(&file)?;
    Ok((hash, file.metadata()?))
}

/// Hashes the files the cache could not answer for, on up to four threads
/// when there are many, and fills in their entries. A file that cannot be
/// read leaves the scan (and is listed as skipped unless it is gone).
fn hash_misses(root: &Path, out: &mut Scan, misses: Vec<Miss>, cache: &mut HashCache) {
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
                            done.push((i, hash_and_restat(root, &out.entries[m.index].path)));
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
            .map(|m| hash_and_restat(root, &out.entries[m.index].path))
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
    fn excludes_match_gitignore_style() {
        let ex = Excludes::new(&["signed/b.pem".into(), "tmp/".into(), "*.bak".into()]).unwrap();
        assert!(ex.is_excluded("signed/b.pem", false));
        assert!(!ex.is_excluded("signed/a.pem", false));
        assert!(ex.is_excluded("tmp", true));
        assert!(ex.is_excluded("tmp/x/y", false));
        assert!(ex.is_excluded("deep/x.bak", false));
        assert!(Excludes::check_glob("a[").is_err());
    }

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
    fn large_files_hash_as_in_one_piece() {
        let d = tempfile::tempdir().unwrap();
        for len in [0, 1, 32 * 1024 - 1, 32 * 1024, 32 * 1024 + 1, 300_000, 1 << 20] {
            let data: Vec<u8> = (0..len as u32).map(|i| (i * 31 % 255) as u8).collect();
            let p = d.path().join(format!("f{len}"));
            fs::write(&p, &data).unwrap();
            assert_eq!(ContentHash::of_file(&p).unwrap(), ContentHash::of(&data), "{len}");
        }
    }

    #[test]
    fn a_scan_reads_only_the_files_it_is_asked_to() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir_all(root.join("d")).unwrap();
        for name in ["d/a", "d/b", "d/c", "e"] {
            fs::write(root.join(name), name.as_bytes()).unwrap();
        }
        let mut cache = HashCache {
            racy_ns: 0,
            ..HashCache::default()
        };
        let wanted = |path: &str, size: u64| path == "d/b" && size == 3;
        let s = scan_with(root, "", &Excludes::default(), &mut cache, Hashing::Only(&wanted));
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

    #[test]
    fn cache_survives_save_and_load_and_notices_changes() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        fs::write(&f, b"one").unwrap();
        let mut cache = HashCache {
            racy_ns: 0,
            ..HashCache::default()
        };
        let md = fs::symlink_metadata(&f).unwrap();
        let h1 = cache.hash("f", &f, &md).unwrap();
        let cpath = d.path().join("cache");
        cache.save(&cpath).unwrap();
        let mut loaded = HashCache::load(&cpath);
        loaded.racy_ns = 0;
        assert_eq!(loaded.map.len(), 1);
        assert_eq!(loaded.hash("f", &f, &md).unwrap(), h1);
        fs::write(&f, b"two").unwrap();
        let md2 = fs::symlink_metadata(&f).unwrap();
        assert_eq!(loaded.hash("f", &f, &md2).unwrap(), ContentHash::of(b"two"));
    }

    #[test]
    fn a_cache_read_back_from_disk_absorbs_what_was_learnt_since_and_newer_wins() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        fs::write(&a, b"a1").unwrap();
        fs::write(&b, b"b1").unwrap();
        let mut cache = HashCache {
            racy_ns: 0,
            ..HashCache::default()
        };
        for (rel, p) in [("a", &a), ("b", &b)] {
            cache.hash(rel, p, &fs::symlink_metadata(p).unwrap()).unwrap();
        }
        let cpath = d.path().join("cache");
        cache.save(&cpath).unwrap();
        assert!(!cache.is_dirty());
        // Let go of; meanwhile "b" changes and an event hashes it again.
        let mut since = HashCache {
            racy_ns: 0,
            ..HashCache::default()
        };
        fs::write(&b, b"b2 longer").unwrap();
        let md_b = fs::symlink_metadata(&b).unwrap();
        since.hash("b", &b, &md_b).unwrap();
        let mut back = HashCache::load(&cpath);
        back.absorb(since);
        assert!(back.is_dirty());
        assert_eq!(back.len(), 2);
        assert_eq!(back.cached("b", &md_b), Some(ContentHash::of(b"b2 longer")));
        assert_eq!(
            back.cached("a", &fs::symlink_metadata(&a).unwrap()),
            Some(ContentHash::of(b"a1"))
        );
    }

    #[test]
    fn a_file_rewritten_within_the_clock_tick_is_not_mistaken_for_the_old_one() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f.pem");
        fs::write(&f, b"v1 000001").unwrap();
        let mut cache = HashCache::default();
        let md = fs::symlink_metadata(&f).unwrap();
        assert_eq!(cache.hash("f.pem", &f, &md).unwrap(), ContentHash::of(b"v1 000001"));
        // Just written: its timestamps could be shared by the next version.
        assert!(cache.is_empty());
        // Simulate a coarse clock: the same inode, size and times, new content.
        fs::write(&f, b"v2 000001").unwrap();
        assert_eq!(cache.hash("f.pem", &f, &md).unwrap(), ContentHash::of(b"v2 000001"));
        // Once the window is past, the hash is kept.
        cache.racy_ns = 0;
        let md = fs::symlink_metadata(&f).unwrap();
        cache.hash("f.pem", &f, &md).unwrap();
        assert_eq!(cache.len(), 1);
    }
}
