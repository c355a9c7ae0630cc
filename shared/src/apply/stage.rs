//! Staging of incoming files: small ones kept in memory, larger ones
//! written as they arrive to a temporary file beside their target (unnamed
//! where the file system allows), each checked against its announced size
//! and BLAKE3 hash at its end (deltas patched against their base first).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::sync::Arc;

use rustix::fs::OFlags;

use super::commit::{give_meta, FLUSH_EVERY_FILES};
use super::patch::Patcher;
use super::temps::{temp_name, Output};
use super::{Applier, FailReason, Failure, Incoming, Opened, Pending, Refused, Stage, Staged};
use crate::beneath::{self, split};
use crate::manifest::{ContentHash, HashCache, Meta};

/// At most this many unnamed files are held open by one batch.
pub(super) const UNNAMED_MAX: u64 = 4096;

/// Files up to this size are received into unnamed files.
pub(super) const UNNAMED_SIZE_MAX: u64 = 1 << 20;

/// Files up to this size are kept in memory until their commit, which makes
/// them (see [`Staged::InMemory`]) ...
pub(super) const IN_MEMORY_SIZE_MAX: u64 = 64 << 10;

/// ... while the batch holds no more than this in all.
pub(super) const IN_MEMORY_BYTES_MAX: u64 = 16 << 20;

/// Checks that a received file has the size and content hash it was
/// announced with.
pub(super) fn check_content(inc: &Incoming) -> Result<(), FailReason> {
    if inc.written != inc.size {
        return Err(FailReason::Size {
            got: inc.written,
            announced: inc.size,
        });
    }
    let got = ContentHash(*inc.hasher.finalize().as_bytes());
    if got != inc.hash {
        return Err(FailReason::Hash {
            got,
            announced: inc.hash,
        });
    }
    Ok(())
}

/// The content hash of the open regular file `file`, known as `rel`: from
/// the cache when its metadata says it is unchanged, else read through the
/// descriptor (never by name) and cached.
pub(super) fn hash_open(cache: &mut HashCache, rel: &str, file: &File) -> io::Result<ContentHash> {
    let md = file.metadata()?;
    if let Some(hash) = cache.cached(rel, &md) {
        return Ok(hash);
    }
    // Holes are hashed without being read.
    let (_, hash) = ContentHash::of_open_file(file, &|| {})?;
    cache.record(rel, &md, hash, &file.metadata()?);
    Ok(hash)
}

impl Applier {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn file_begin(
        &mut self,
        watch: &str,
        rel: &str,
        meta: Meta,
        size: u64,
        hash: ContentHash,
        delta_base: Option<ContentHash>,
    ) -> io::Result<()> {
        let (pdir, name) = split(rel);
        let dir = self.dir(watch, pdir, true)?;
        let Opened { stage, writer, delta } = self.open_stage(&dir, name, meta, size, delta_base)?;
        // A delta is applied as it arrives, against the base it was made
        // for; against any other it is not applied (its frames are dropped
        // and its end reports why).
        let delta = match (delta, delta_base) {
            (Some(out), Some(base_hash)) => Some(match self.open_base(watch, rel, &dir, name, base_hash) {
                Ok(base) => Patcher::start(base, out, size),
                Err(why) => Patcher::Failed(why),
            }),
            _ => None,
        };
        let in_memory = match stage {
            Stage::InMemory => Vec::with_capacity(size as usize),
            _ => Vec::new(),
        };
        self.incoming = Some(Incoming {
            watch: watch.to_string(),
            rel: rel.to_string(),
            dir,
            name: name.to_string(),
            stage,
            writer,
            in_memory,
            hasher: blake3::Hasher::new(),
            written: 0,
            size,
            hash,
            meta,
            delta,
        });
        Ok(())
    }

    /// The base of a delta for `rel` (`name` in `dir`): the receiver's copy,
    /// open, when it is a regular file with the content `base_hash`.
    fn open_base(
        &mut self,
        watch: &str,
        rel: &str,
        dir: &File,
        name: &str,
        base_hash: ContentHash,
    ) -> Result<File, FailReason> {
        let base =
            beneath::open_in(dir, name, OFlags::RDONLY).map_err(|e| FailReason::DeltaBaseUnreadable(Arc::new(e)))?;
        if !base.metadata()?.is_file() {
            return Err(FailReason::DeltaBaseNotFile);
        }
        let w = self.watches.get_mut(watch).ok_or(FailReason::UnknownWatch)?;
        if hash_open(&mut w.cache, rel, &base)? != base_hash {
            return Err(FailReason::DeltaBaseChanged);
        }
        Ok(base)
    }

    /// Where an incoming file goes: in memory, an unnamed file or a named
    /// one, with its writer or, for a delta, the file its patch writes to.
    pub(super) fn open_stage(
        &mut self,
        dir: &Arc<File>,
        name: &str,
        meta: Meta,
        size: u64,
        delta_base: Option<ContentHash>,
    ) -> io::Result<Opened> {
        // A small whole file is written to an unnamed file while the batch
        // has room for one, and a smaller one still is kept in memory until
        // the commit makes it. A large one gets a name: its directory
        // entries cost nothing next to its data, and the name shows a
        // transfer under way. So does a delta's result, which replaces a file.
        let mut unnamed = None;
        if delta_base.is_none() && size <= UNNAMED_SIZE_MAX && self.unnamed < self.unnamed_max {
            if size <= IN_MEMORY_SIZE_MAX && self.in_memory_bytes + size <= IN_MEMORY_BYTES_MAX {
                self.unnamed += 1;
                self.in_memory_bytes += size;
                return Ok(Opened {
                    stage: Stage::InMemory,
                    writer: None,
                    delta: None,
                });
            }
            // No name, so nobody can open it before the commit links it:
            // it can have its final permissions (less the umask) at once,
            // and `give_meta` mostly has no `fchmod` left to do.
            match crate::sys::open_unnamed(dir, meta.mode & 0o777) {
                Ok(file) => unnamed = Some(file),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)) => {
                    tracing::debug!(error = %e, "no unnamed temporary files here; using named ones");
                    self.unnamed_max = 0;
                }
                Err(e) => return Err(e),
            }
        }
        let (file, stage) = match unnamed {
            Some(file) => {
                self.unnamed += 1;
                (file, Stage::Unnamed)
            }
            None => {
                let tmp = temp_name(name, "new");
                (beneath::create_private(dir, &tmp)?, Stage::Named(tmp))
            }
        };
        if delta_base.is_some() {
            return Ok(Opened {
                stage,
                writer: None,
                delta: Some(file),
            });
        }
        // Data arrives in frames of up to 256 KiB; a small file needs no more
        // buffer than its size (a 256 KiB buffer per file would be an mmap
        // and a munmap per file).
        let writer = BufWriter::with_capacity((size as usize).clamp(1, 256 * 1024), Output::durable(file));
        Ok(Opened {
            stage,
            writer: Some(writer),
            delta: None,
        })
    }

    /// Gives back what an incoming file's stage took: its temporary file,
    /// its place among the unnamed files, its memory.
    pub(super) fn release(&mut self, stage: &Stage, dir: &File, size: u64) {
        match stage {
            Stage::Named(tmp) => {
                let _ = beneath::unlink(dir, tmp);
            }
            Stage::Unnamed => self.unnamed -= 1,
            Stage::InMemory => {
                self.unnamed -= 1;
                self.in_memory_bytes -= size;
            }
        }
    }

    pub(super) fn file_data(&mut self, data: &[u8]) -> Result<(), Refused> {
        if self.discarding {
            return Ok(());
        }
        let Some(inc) = self.incoming.as_mut() else {
            return Err(Refused::DataOutsideFile);
        };
        inc.written += data.len() as u64;
        let cap = match inc.delta {
            None => inc.size,
            // A delta of entirely new content is a little larger than the content.
            Some(_) => inc.size + inc.size / 8 + 64 * 1024,
        };
        if inc.written > cap {
            let (watch, path) = (inc.watch.clone(), inc.rel.clone());
            self.abort_incoming();
            return Err(Refused::TooMuchData { watch, path });
        }
        if let Some(patcher) = inc.delta.as_mut() {
            patcher.feed(data);
            return Ok(());
        }
        inc.hasher.update(data);
        if matches!(inc.stage, Stage::InMemory) {
            inc.in_memory.extend_from_slice(data);
            return Ok(());
        }
        let result = inc.writer.as_mut().map(|w| w.write_all(data));
        if let Some(Err(e)) = result {
            let rel = inc.rel.clone();
            tracing::warn!(path = rel, error = %e, "cannot write a received file");
            self.report.failed.push(Failure::new(rel, e));
            self.abort_incoming();
            self.discarding = true;
        }
        Ok(())
    }

    /// A hole of `len` bytes in the current whole file: counted and hashed
    /// as zeros, and stepped over in the file instead of written.
    pub(super) fn file_hole(&mut self, len: u64) -> Result<(), Refused> {
        if self.discarding {
            return Ok(());
        }
        let Some(inc) = self.incoming.as_mut() else {
            return Err(Refused::HoleOutsideFile);
        };
        let (watch, path) = (inc.watch.clone(), inc.rel.clone());
        if inc.delta.is_some() {
            self.abort_incoming();
            return Err(Refused::HoleInDelta { watch, path });
        }
        match inc.written.checked_add(len) {
            Some(n) if n <= inc.size => inc.written = n,
            _ => {
                self.abort_incoming();
                return Err(Refused::TooMuchData { watch, path });
            }
        }
        crate::sparse::hash_zeros(&mut inc.hasher, len);
        if matches!(inc.stage, Stage::InMemory) {
            // In-memory files are small: the zeros are kept as they are.
            inc.in_memory.resize(inc.in_memory.len() + len as usize, 0);
            return Ok(());
        }
        let result = inc.writer.as_mut().map(|w| w.flush().map(|()| w.get_mut().skip(len)));
        if let Some(Err(e)) = result {
            tracing::warn!(path = path, error = %e, "cannot write a received file");
            self.report.failed.push(Failure::new(path, e));
            self.abort_incoming();
            self.discarding = true;
        }
        Ok(())
    }

    pub(super) fn abort_incoming(&mut self) {
        if let Some(inc) = self.incoming.take() {
            drop(inc.writer);
            // The patching thread stops before its file is removed.
            drop(inc.delta);
            self.release(&inc.stage, &inc.dir, inc.size);
        }
    }

    pub(super) fn file_end(&mut self) -> Result<(), Refused> {
        if self.discarding {
            self.discarding = false;
            return Ok(());
        }
        let Some(mut inc) = self.incoming.take() else {
            return Err(Refused::EndNotBegun);
        };
        let outcome = if let Stage::InMemory = &inc.stage {
            check_content(&inc).map(|()| Staged::InMemory {
                data: std::mem::take(&mut inc.in_memory),
                dir: inc.dir.clone(),
                meta: inc.meta,
            })
        } else {
            let result = self.finish(&mut inc);
            result.map(|file| match &inc.stage {
                Stage::Named(tmp) => Staged::Named {
                    tmp: tmp.clone(),
                    dir: inc.dir.clone(),
                },
                Stage::Unnamed | Stage::InMemory => Staged::Unnamed {
                    file,
                    dir: inc.dir.clone(),
                },
            })
        };
        match outcome {
            Ok(staged) => {
                self.report.applied += 1;
                self.report.touched.insert(inc.watch.clone());
                self.note_dir(&inc.watch, split(&inc.rel).0, &inc.dir);
                // In-memory files are written by the commit, right before its sync.
                if !matches!(staged, Staged::InMemory { .. }) {
                    self.unflushed += 1;
                    if self.unflushed >= FLUSH_EVERY_FILES {
                        self.unflushed = 0;
                        self.flusher.start(inc.dir.clone());
                    }
                }
                self.pending.push(Pending {
                    watch: inc.watch,
                    rel: inc.rel,
                    name: inc.name,
                    staged,
                    hash: inc.hash,
                });
            }
            Err(e) => {
                self.release(&inc.stage, &inc.dir, inc.size);
                tracing::warn!(watch = inc.watch, path = inc.rel, error = %e, "cannot apply a received file");
                self.report.failed.push(Failure::new(inc.rel, e));
            }
        }
        Ok(())
    }

    /// Checks a received file and sets its metadata; returns it, open.
    pub(super) fn finish(&mut self, inc: &mut Incoming) -> Result<File, FailReason> {
        let file = match inc.delta.take() {
            Some(patcher) => {
                let t = std::time::Instant::now();
                let patched = patcher.finish()?;
                // How far the patch was behind the delta's last frame.
                tracing::debug!(
                    path = inc.rel,
                    waited_ms = t.elapsed().as_millis() as u64,
                    "delta applied"
                );
                inc.hasher = patched.hasher;
                inc.written = patched.written;
                patched.file
            }
            None => {
                let writer = inc.writer.take().ok_or(FailReason::NoOpenFile)?;
                writer.into_inner().map_err(|e| e.into_error())?.end()?
            }
        };
        self.finish_file(inc, &file)?;
        Ok(file)
    }

    pub(super) fn finish_file(&self, inc: &Incoming, file: &File) -> Result<(), FailReason> {
        check_content(inc)?;
        Ok(give_meta(file, inc.meta, self.can_chown)?)
    }
}
