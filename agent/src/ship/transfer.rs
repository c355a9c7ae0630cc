//! Sending one planned prefix: the steps `plan::steps` orders (removals,
//! directories, links and files, metadata fixes, and the metadata of every
//! parent touched), carried out: files are sent whole, sparse or as deltas,
//! read through a descriptor opened beneath the root.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{self, Read, Seek, Write};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_bytes::ByteBuf;
use warmspare_shared::beneath::Dirs;
use warmspare_shared::manifest::{ContentHash, Entry, EntryKind, HashCache, Meta, Status};
use warmspare_shared::proto::{Op, Reply, Request, CHUNK};
use warmspare_shared::{compress, delta};

use crate::live::LocalWatch;

use super::plan::{remote_remove_tree, steps, Held, Plan, Remote, Step};
use super::session::{emit, maybe_commit, BatchStats, SessionIo};

/// Sends one planned prefix: the steps [`steps`] orders, carried out one by
/// one, each recorded in the model of the peer (`remote`) as it is sent.
/// The directories above the prefix whose metadata it asks for are added
/// to `above` instead, for [`ship_above`] to send once after every prefix
/// of the batch: a batch of 8,000 new files in 64 directories then sends
/// 64 directories, not 8,000. Returns the content hash of every file of the
/// scan that has one now (for the agreement recorded after a full
/// comparison).
#[allow(clippy::too_many_arguments)]
pub(super) fn ship_prefix(
    io: &mut SessionIo,
    w: &LocalWatch,
    dirs: &mut Dirs,
    plan: Plan,
    cache: &mut HashCache,
    remote: &mut Remote,
    stats: &mut BatchStats,
    owners: bool,
    above: &mut BTreeSet<String>,
) -> Result<Vec<(String, ContentHash)>> {
    let Plan {
        prefix,
        scan,
        removals,
        unreadable,
    } = plan;
    stats.scanned.push((w.name.clone(), prefix));
    for (path, why) in unreadable {
        stats.unreadable.push((w.name.clone(), path, why));
    }
    let entries = &scan.entries;
    // The hashes of files sent without being read first, by position.
    let mut learned: HashMap<usize, ContentHash> = HashMap::new();
    for step in steps(&removals, entries, remote, owners) {
        match step {
            Step::Remove(i) => {
                let path = &removals[i].path;
                stats.touched.push((w.name.clone(), path.clone(), None));
                emit(
                    io,
                    stats,
                    &w.name,
                    Op::Remove {
                        watch: w.name.clone(),
                        path: path.clone(),
                    },
                )?;
                remote_remove_tree(remote, path);
            }
            Step::Dir(i) => send_dir(io, stats, &w.name, &entries[i], remote)?,
            Step::Symlink(i) => {
                let l = &entries[i];
                let EntryKind::Symlink { target } = &l.kind else {
                    bail!("the plan sends {} as a link and the scan has no link there", l.path);
                };
                emit(
                    io,
                    stats,
                    &w.name,
                    Op::Symlink {
                        watch: w.name.clone(),
                        path: l.path.clone(),
                        target: target.clone(),
                        meta: l.meta,
                    },
                )?;
                remote.insert(l.path.as_str().into(), Held::of(l));
            }
            Step::SetMeta(i) => {
                let l = &entries[i];
                emit(
                    io,
                    stats,
                    &w.name,
                    Op::SetMeta {
                        watch: w.name.clone(),
                        path: l.path.clone(),
                        meta: l.meta,
                    },
                )?;
                remote.insert(l.path.as_str().into(), Held::of(l));
            }
            Step::File { entry: i, base } => {
                let l = &entries[i];
                let EntryKind::File { size, hash } = &l.kind else {
                    bail!("the plan sends {} as a file and the scan has no file there", l.path);
                };
                let known = (!scan.is_unhashed(i)).then_some(*hash);
                let out = Outgoing {
                    entry: l,
                    size: *size,
                    hash: known,
                    remote_size: base,
                };
                let Some((size, hash, meta)) = ship_file(io, w, dirs, cache, out, stats)? else {
                    continue; // Gone since the scan, or unreadable.
                };
                if known.is_none() {
                    learned.insert(i, hash);
                }
                stats.touched.push((w.name.clone(), l.path.clone(), Some(hash)));
                remote.insert(
                    l.path.as_str().into(),
                    Held {
                        kind: EntryKind::File { size, hash },
                        meta,
                    },
                );
                stats.files += 1;
                maybe_commit(io, stats, &w.name)?;
            }
            Step::Parent { entry: Some(i), .. } => send_dir(io, stats, &w.name, &entries[i], remote)?,
            // A directory above the prefix: after the batch's last prefix.
            Step::Parent { path, entry: None } => {
                above.insert(path);
            }
        }
    }
    // The scan's paths move into what the caller keeps (the settled list,
    // with 100,000 files as many strings not copied).
    let warmspare_shared::manifest::Scan { entries, unhashed, .. } = scan;
    Ok(entries
        .into_iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let hash = if unhashed.binary_search(&i).is_ok() {
                *learned.get(&i)?
            } else {
                e.hash()?
            };
            Some((e.path, hash))
        })
        .collect())
}

/// Sends the metadata of the directories `above` the prefixes of a batch
/// (see [`ship_prefix`]), each read now, after every change in it; one gone
/// since is left as the peer has it. No prefix of a batch lies at or under
/// another, so none of these directories is itself sent by a prefix.
pub(super) fn ship_above(
    io: &mut SessionIo,
    w: &LocalWatch,
    dirs: &mut Dirs,
    above: BTreeSet<String>,
    remote: &mut Remote,
    stats: &mut BatchStats,
) -> Result<()> {
    for path in above {
        if let Some(l) = stat_dir(dirs, &path) {
            send_dir(io, stats, &w.name, &l, remote)?;
        }
    }
    Ok(())
}

/// Sends a directory's metadata ([`Op::Dir`], which also creates it on the
/// peer when it is not there) and records it in the model.
fn send_dir(io: &mut SessionIo, stats: &mut BatchStats, watch: &str, dir: &Entry, remote: &mut Remote) -> Result<()> {
    emit(
        io,
        stats,
        watch,
        Op::Dir {
            watch: watch.to_string(),
            path: dir.path.clone(),
            meta: dir.meta,
        },
    )?;
    remote.insert(dir.path.as_str().into(), Held::of(dir));
    Ok(())
}

/// The directory `rel` beneath the root of `dirs` as it is now (looked at
/// with no link followed), or `None` when it is not a directory (any more).
fn stat_dir(dirs: &mut Dirs, rel: &str) -> Option<Entry> {
    let st = Status::from(&dirs.stat(rel).ok()?);
    st.is_dir().then(|| Entry {
        path: rel.to_string(),
        kind: EntryKind::Dir,
        meta: Meta::from_status(&st),
    })
}

/// A file to send, as the scan saw it.
pub(super) struct Outgoing<'a> {
    pub(super) entry: &'a Entry,
    pub(super) size: u64,
    /// Its hash, unless the scan left it unread (it is learned here).
    pub(super) hash: Option<ContentHash>,
    /// The size of the peer's file there, when a delta against it may pay.
    pub(super) remote_size: Option<u64>,
}

/// A file's size and content hash as read now, and its content when it is
/// small enough to keep for sending.
pub(super) struct Learned {
    pub(super) size: u64,
    pub(super) hash: ContentHash,
    pub(super) content: Option<Vec<u8>>,
}

/// Reads `file` to learn its hash (and, for one chunk or less, keeps its
/// content), and caches the hash unless the file changed during the read;
/// `tick` is called at every read of a large file.
pub(super) fn learn(file: &fs::File, rel: &str, cache: &mut HashCache, tick: &dyn Fn()) -> io::Result<Learned> {
    let before = file.metadata()?;
    let mut learned = None;
    if before.len() <= CHUNK as u64 {
        let mut buf = Vec::with_capacity(before.len() as usize);
        file.take(CHUNK as u64 + 1).read_to_end(&mut buf)?;
        if buf.len() <= CHUNK {
            learned = Some(Learned {
                size: buf.len() as u64,
                hash: ContentHash::of(&buf),
                content: Some(buf),
            });
        }
    }
    let learned = match learned {
        Some(l) => l,
        // Large, or it grew past a chunk while read: hashed as it is read
        // (never mapped: another process may truncate it meanwhile), its
        // holes without reading them.
        None => {
            let (size, hash) = warmspare_shared::manifest::ContentHash::of_open_file(file, tick)?;
            Learned {
                size,
                hash,
                content: None,
            }
        }
    };
    cache.record(rel, &before, learned.hash, &file.metadata()?);
    Ok(learned)
}

/// `file`, positioned at its start.
pub(super) fn rewound(file: &fs::File) -> io::Result<&fs::File> {
    let mut f = file;
    f.seek(io::SeekFrom::Start(0))?;
    Ok(file)
}

/// Sends one file whole or as a delta. Returns the size, hash and metadata
/// it was announced with, or `None` when the file is gone or cannot be read
/// (recorded in `stats.unreadable`: the peer's copy stays).
///
/// The file is opened beneath the watch root with no symbolic link followed
/// anywhere on the way, without blocking, and only a regular file is read;
/// the metadata sent (mode, owner, mtime) and the size come from `fstat` of
/// that descriptor, never from the earlier scan, so what arrives is always
/// what was read with the metadata it had (a file moved in, or a directory
/// swapped for a link, after the scan cannot borrow another's metadata).
pub(super) fn ship_file(
    io: &mut SessionIo,
    w: &LocalWatch,
    dirs: &mut Dirs,
    cache: &mut HashCache,
    out: Outgoing<'_>,
    stats: &mut BatchStats,
) -> Result<Option<(u64, ContentHash, Meta)>> {
    let l = out.entry;
    // A file cut short by an error leaves nothing behind for the next one.
    io.plain = false;
    let (file, md) = match dirs.open_file(&l.path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            tracing::warn!(watch = w.name, path = l.path, error = %e, "not replicated: cannot open it; the peer's copy is kept");
            stats.unreadable.push((w.name.clone(), l.path.clone(), e.to_string()));
            return Ok(None);
        }
    };
    let meta = Meta::from_metadata(&md);
    // A file mostly of holes goes whole, its holes as holes: cheaper than
    // reading its zeros on both sides for a delta. (A file of one chunk or
    // less is read whole to learn its hash, and never has holes to save.)
    let sparse = md.len() > CHUNK as u64
        && out.remote_size.is_some()
        && warmspare_shared::sparse::data_len(&file, md.len()).is_ok_and(|d| d < md.len() / 2);
    // The peer's signature is asked for first, so that the peer reads and
    // signs its copy while this side hashes the new content (the hash
    // goes with the file's announcement): the two reads of a large file
    // overlap instead of following each other.
    let asked = out.remote_size.filter(|_| !sparse);
    // Where a large file's time goes, for its log line.
    let started = std::time::Instant::now();
    if let Some(rsize) = asked {
        io.send(&Request::GetSignature {
            id: 0,
            watch: w.name.clone(),
            path: l.path.clone(),
            block_len: delta::block_len(rsize),
        })?;
        // Out now, not with the next group of frames: the peer cannot
        // start on what it has not been sent.
        io.flush()?;
    }
    // The scan's hash is of the file the scan saw: trusted only while the
    // open file has its size and mtime (the receiver's hash check catches
    // the rest), otherwise learned again from this descriptor.
    let seen = md.len() == out.size && meta.mtime == l.meta.mtime && meta.mtime_nsec == l.meta.mtime_nsec;
    let (mut size, mut hash, mut content) = (md.len(), out.hash.filter(|_| seen), None);
    if hash.is_none() {
        let stamp = io.stamp.clone();
        match learn(&file, &l.path, cache, &|| stamp.stamp()) {
            Ok(learned) => (size, hash, content) = (learned.size, Some(learned.hash), learned.content),
            // As when a scan cannot read a file: it is left out, and the
            // next comparison tries again; the rest of the batch goes on.
            Err(e) => {
                tracing::warn!(watch = w.name, path = l.path, error = %e, "not replicated: cannot read it; the peer's copy is kept");
                stats.unreadable.push((w.name.clone(), l.path.clone(), e.to_string()));
                if asked.is_some() {
                    // The answer is on its way: read before anything else.
                    signature_reply(io, &l.path)?;
                }
                return Ok(None);
            }
        }
    }
    let hash = hash.ok_or_else(|| anyhow!("{}: no content hash", l.path))?;
    let hashed = started.elapsed();
    let before = stats.wire_bytes;
    let mut sent_as_delta = false;
    let mut signed = hashed;
    if asked.is_some() {
        let (sig, base) = signature_reply(io, &l.path)?;
        signed = started.elapsed();
        if let Some(base) = base {
            // Read, never mapped: another process may truncate the file
            // while it is diffed. A file that changed size since its hash
            // was learned goes whole (the receiver's checks refuse a stale
            // announcement either way).
            use std::os::unix::fs::FileExt;
            let now = file
                .metadata()
                .with_context(|| format!("cannot stat {}", w.root.join(&l.path).display()))?;
            let worth = now.len() == size
                && match delta::worth_diffing_at(&sig, size, |at, buf| file.read_exact_at(buf, at)) {
                    Ok(worth) => worth,
                    // Cut short under the probes, or a signature that does
                    // not parse: sent whole (the receiver checks it).
                    Err(e) => {
                        tracing::debug!(watch = w.name, path = l.path, error = %e, "no delta");
                        false
                    }
                };
            if !worth {
                tracing::debug!(
                    watch = w.name,
                    path = l.path,
                    "no delta worth computing (rewritten, or changed while read); sending it whole"
                );
            } else {
                stats.wire_bytes += io.send(&Request::Op(Op::FileBegin {
                    watch: w.name.clone(),
                    path: l.path.clone(),
                    meta,
                    size,
                    hash,
                    delta_base: Some(base),
                }))?;
                io.plain = plain(io, &file, content.as_deref());
                let mut sink = FrameSink {
                    io,
                    buf: Vec::with_capacity(CHUNK),
                    sent: 0,
                };
                let reader =
                    rewound(&file).with_context(|| format!("cannot read {}", w.root.join(&l.path).display()))?;
                // Much of a large file may match the peer's copy and send
                // nothing: every read stamps the shipper's progress.
                let stamp = sink.io.stamp.clone();
                let reader = Ticking {
                    inner: reader,
                    tick: &|| stamp.stamp(),
                };
                delta::diff_reader(&sig, reader, size, &mut sink).map_err(|e| anyhow!("{}: {e}", l.path))?;
                sink.flush_chunk()?;
                stats.wire_bytes += sink.sent;
                io.plain = false;
                stats.wire_bytes += io.send(&Request::Op(Op::FileEnd))?;
                sent_as_delta = true;
            }
        }
    }
    if !sent_as_delta {
        stats.wire_bytes += io.send(&Request::Op(Op::FileBegin {
            watch: w.name.clone(),
            path: l.path.clone(),
            meta,
            size,
            hash,
            delta_base: None,
        }))?;
        io.plain = plain(io, &file, content.as_deref());
        match content {
            // Read already, to learn its hash: one frame.
            Some(data) => {
                if !data.is_empty() {
                    stats.wire_bytes += io.send(&Request::Op(Op::FileData(ByteBuf::from(data))))?;
                }
            }
            // Read in order, holes and runs of zeros sent as holes (a file
            // that shrinks meanwhile ends short: the receiver's size check
            // refuses it).
            None => {
                let mut sink = FrameSink {
                    io,
                    buf: Vec::with_capacity(CHUNK.min(size as usize + 1)),
                    sent: 0,
                };
                warmspare_shared::sparse::walk(&file, size, CHUNK, &mut sink)
                    .with_context(|| format!("cannot read {}", w.root.join(&l.path).display()))?;
                sink.flush_chunk()?;
                stats.wire_bytes += sink.sent;
            }
        }
        io.plain = false;
        stats.wire_bytes += io.send(&Request::Op(Op::FileEnd))?;
    }
    stats.pending_bytes += stats.wire_bytes - before;
    let wire_bytes = stats.wire_bytes - before;
    // Large files get a line at info (their cost is worth seeing), the rest at debug.
    if size >= delta::DELTA_MIN_SIZE {
        // Milliseconds from the open: until its hash was known, until the
        // peer's signature was (when asked for), until the last byte went.
        let ms = |d: std::time::Duration| d.as_millis() as u64;
        tracing::info!(
            watch = w.name,
            path = l.path,
            size,
            wire_bytes,
            delta = sent_as_delta,
            hashed_ms = ms(hashed),
            signed_ms = ms(signed),
            sent_ms = ms(started.elapsed()),
            "large file shipped"
        );
    } else {
        tracing::debug!(
            watch = w.name,
            path = l.path,
            size,
            wire_bytes,
            delta = sent_as_delta,
            "file shipped"
        );
    }
    Ok(Some((size, hash, meta)))
}

/// Whether a file's content goes past the session's compressor: only when
/// the session compresses and the probe (on the content read already, or
/// on the file's first bytes) finds it not worth it, e.g. a gzip archive.
/// A file that cannot be read here is left to the read that follows.
fn plain(io: &SessionIo, file: &fs::File, content: Option<&[u8]>) -> bool {
    if io.packer.is_none() {
        return false;
    }
    if let Some(data) = content {
        return !compress::worth_compressing(&data[..data.len().min(compress::SAMPLE)]);
    }
    use std::os::unix::fs::FileExt;
    let mut sample = vec![0; compress::SAMPLE];
    let mut got = 0;
    while got < sample.len() {
        match file.read_at(&mut sample[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    !compress::worth_compressing(&sample[..got])
}

/// Reads the peer's answer to a [`Request::GetSignature`] for `path`: the
/// signature and the hash of the content it signs, or `None` as the hash
/// when the peer has no file to sign there. A signature larger than any
/// the peer may send ends the session.
fn signature_reply(io: &mut SessionIo, path: &str) -> Result<(Vec<u8>, Option<ContentHash>)> {
    let mut sig = Vec::new();
    let mut base = None;
    loop {
        match io.reply()? {
            Reply::SignaturePart {
                data, last, base: b, ..
            } => {
                sig.extend_from_slice(&data);
                if sig.len() > SIGNATURE_MAX {
                    bail!("the peer's signature of {path} is too large");
                }
                base = Some(b);
                if last {
                    break;
                }
            }
            Reply::NoSignature { .. } => break,
            other => bail!("expected a signature, got {other:?}"),
        }
    }
    Ok((sig, base))
}

/// The largest signature a peer may send: far more than the signature of
/// any file with [`delta::block_len`]'s block lengths.
const SIGNATURE_MAX: usize = 64 * 1024 * 1024;

/// Writes bytes as [`Op::FileData`] frames of at most [`CHUNK`] bytes.
pub(super) struct FrameSink<'a> {
    pub(super) io: &'a mut SessionIo,
    pub(super) buf: Vec<u8>,
    pub(super) sent: u64,
}

impl FrameSink<'_> {
    pub(super) fn flush_chunk(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        // The next chunk's buffer is allocated when it is first written: a
        // fresh 256 KiB buffer after the last chunk of every small file would
        // cost an mmap and munmap per file.
        let data = std::mem::take(&mut self.buf);
        self.sent += self.io.send(&Request::Op(Op::FileData(ByteBuf::from(data))))?;
        Ok(())
    }
}

impl warmspare_shared::sparse::Pieces for FrameSink<'_> {
    fn data(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_all(data)
    }

    fn hole(&mut self, len: u64) -> io::Result<()> {
        self.flush_chunk().map_err(io::Error::other)?;
        self.sent += self
            .io
            .send(&Request::Op(Op::FileHole(len)))
            .map_err(io::Error::other)?;
        Ok(())
    }
}

impl Write for FrameSink<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(CHUNK);
        }
        let room = CHUNK - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.flush_chunk().map_err(io::Error::other)?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A reader that calls `tick` at every read.
struct Ticking<'a, R> {
    inner: R,
    tick: &'a dyn Fn(),
}

impl<R: Read> Read for Ticking<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (self.tick)();
        self.inner.read(buf)
    }
}
