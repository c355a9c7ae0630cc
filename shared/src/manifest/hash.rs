//! Content hashes (BLAKE3, read a buffer at a time, never mapped) and the
//! persisted hash cache, keyed by path and valid while inode, size, mtime and
//! ctime hold (and the change is older than the clock's tick).

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Status;

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
        Ok(ContentHash::of_open_file(&file, &|| {})?.1)
    }

    /// The size and content hash of the open regular file `file`, its holes
    /// hashed as zeros without being read (see `sparse::hash_file`),
    /// calling `tick` before every read of up to 256 KiB (a caller with no
    /// progress to show passes `&|| {}`).
    pub fn of_open_file(file: &std::fs::File, tick: &dyn Fn()) -> io::Result<(u64, ContentHash)> {
        let (size, hash) = crate::sparse::hash_file(file, tick)?;
        Ok((size, ContentHash(*hash.as_bytes())))
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

/// The hasher of the agent's large maps keyed by path (the hash cache, the
/// sync ledger): foldhash, seeded at random once per process and per map.
///
/// Chosen over the standard library's SipHash because a full comparison
/// of 100,000 files inserts every path in both maps as they are read from
/// disk and looks every path up in both (SipHash alone was about 3% of
/// the active's CPU there, more with the rehashes of growing maps). foldhash
/// is what `hashbrown` (the table under `std`'s `HashMap`) uses by default,
/// a few times faster than SipHash on short keys such as paths, and keeps
/// a random per-process seed (`rustc-hash`, as fast, has a fixed one).
///
/// Hash flooding: the keys are paths of this node's own watch trees (the
/// cache, the active's ledger) or paths the authenticated active sent (a
/// passive's ledger), never an anonymous party's. To make every path fall
/// in one bucket, whoever can create files there would have to know the
/// seed, which never leaves the process (no hash is shown, and the maps are
/// persisted as lists of their entries); even then the cost is bounded by
/// the number of files in the tree, which the same writer could grow anyway.
pub type PathHasher = foldhash::fast::RandomState;

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
    map: HashMap<Box<str>, Cached, PathHasher>,
    dirty: bool,
    /// Changes more recent than this (in nanoseconds) are not cached.
    racy_ns: i128,
}

impl Default for HashCache {
    fn default() -> HashCache {
        HashCache {
            map: HashMap::default(),
            dirty: false,
            racy_ns: RACY,
        }
    }
}

/// Modification and change times in nanoseconds since the epoch (clamped
/// to what an `i64` holds, the years 1678 to 2262).
fn times(st: &Status) -> (i64, i64) {
    let ns = |s: i64, n: i64| (s as i128 * 1_000_000_000 + n as i128).clamp(i64::MIN as i128, i64::MAX as i128) as i64;
    (ns(st.mtime, st.mtime_nsec), ns(st.ctime, st.ctime_nsec))
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
    /// A cache with no racy window: a hash it learns holds at once, even for
    /// a file changed just now (for tests, which write and scan in one tick).
    #[cfg(test)]
    pub(super) fn trusting_every_change() -> HashCache {
        HashCache {
            racy_ns: 0,
            ..HashCache::default()
        }
    }

    /// Loads a cache persisted by [`HashCache::save`]; a missing or unreadable
    /// cache is an empty one (it is only an accelerator).
    pub fn load(path: &Path) -> HashCache {
        fs::read(path).map(|b| HashCache::from_bytes(&b)).unwrap_or_default()
    }

    /// Decodes a persisted cache; bytes that do not decode give an empty cache.
    pub fn from_bytes(bytes: &[u8]) -> HashCache {
        let map = crate::persist::decode_persisted::<HashMap<Box<str>, Cached, PathHasher>>(bytes).unwrap_or_default();
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

    /// The cached hash of `rel` when `md` (std's metadata or a
    /// [`Status`]) says the file is unchanged.
    pub fn cached(&self, rel: &str, md: impl Into<Status>) -> Option<ContentHash> {
        let md: Status = md.into();
        let (mtime_ns, ctime_ns) = times(&md);
        let c = self.map.get(rel)?;
        (c.ino == md.ino && c.size == md.size && c.mtime_ns == mtime_ns && c.ctime_ns == ctime_ns).then_some(c.hash)
    }

    /// Caches `hash`, read from a file that had `md` before the read and
    /// `after` after it, unless the file changed meanwhile (it is hashed
    /// again on its next event) or changed too recently to be trusted.
    pub fn record(&mut self, rel: &str, md: impl Into<Status>, hash: ContentHash, after: impl Into<Status>) {
        let (md, after): (Status, Status) = (md.into(), after.into());
        let (mtime_ns, ctime_ns) = times(&md);
        if times(&after) == (mtime_ns, ctime_ns) && after.size == md.size && !is_racy(ctime_ns, self.racy_ns) {
            self.insert(rel, md, hash);
        } else {
            self.forget_file(rel);
        }
    }

    /// Records that the file `rel` with metadata `md` has content `hash`.
    pub fn insert(&mut self, rel: &str, md: impl Into<Status>, hash: ContentHash) {
        let md: Status = md.into();
        let (mtime_ns, ctime_ns) = times(&md);
        self.map.insert(
            rel.into(),
            Cached {
                ino: md.ino,
                size: md.size,
                mtime_ns,
                ctime_ns,
                hash,
            },
        );
        self.dirty = true;
    }

    /// Forgets `rel` alone (a file or a link, with nothing below it).
    pub fn forget_file(&mut self, rel: &str) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
