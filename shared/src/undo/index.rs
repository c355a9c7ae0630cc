//! The index, `undo/index.jsonl`: one JSON line per entry, read leniently
//! (damaged lines skipped) and written whole when entries are pruned.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::LINE_MAX;
use crate::manifest::{ContentHash, Meta};
use crate::proto::{UndoEntry, UndoKind, UndoWhy};

/// One index line (the hash in hex).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Line {
    id: u64,
    watch: String,
    path: String,
    time: i64,
    epoch: u64,
    size: u64,
    why: UndoWhy,
    kind: UndoKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hash: Option<String>,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    mtime_nsec: u32,
}

impl Line {
    fn of(e: &UndoEntry) -> Line {
        Line {
            id: e.id,
            watch: e.watch.clone(),
            path: e.path.clone(),
            time: e.time,
            epoch: e.epoch,
            size: e.size,
            why: e.why,
            kind: e.kind,
            hash: e.hash.map(|h| h.to_string()),
            mode: e.meta.mode,
            uid: e.meta.uid,
            gid: e.meta.gid,
            mtime: e.meta.mtime,
            mtime_nsec: e.meta.mtime_nsec,
        }
    }

    fn entry(self) -> UndoEntry {
        let hash = self.hash.and_then(|h| {
            let mut b = [0u8; 32];
            hex::decode_to_slice(h, &mut b).ok().map(|()| ContentHash(b))
        });
        UndoEntry {
            id: self.id,
            watch: self.watch,
            path: self.path,
            time: self.time,
            epoch: self.epoch,
            size: self.size,
            why: self.why,
            kind: self.kind,
            hash,
            meta: Meta {
                mode: self.mode,
                mtime: self.mtime,
                mtime_nsec: self.mtime_nsec,
                uid: self.uid,
                gid: self.gid,
            },
        }
    }
}

/// An id as a file name: decimal digits, no leading zero.
pub(super) fn parse_id(name: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(name).ok()?;
    let id: u64 = s.parse().ok()?;
    (id.to_string() == s).then_some(id)
}

/// Reads the index: every well-formed line, by id (a later line wins).
/// Damaged lines are skipped; a missing index is empty.
pub(super) fn read_index(path: &Path) -> io::Result<BTreeMap<u64, UndoEntry>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e),
    };
    let mut reader = io::BufReader::new(file);
    let mut out = BTreeMap::new();
    let mut buf = Vec::new();
    let mut damaged = 0u64;
    loop {
        buf.clear();
        let n = (&mut reader).take(LINE_MAX).read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        if buf.last() != Some(&b'\n') && n as u64 == LINE_MAX {
            // Too long: skip to the end of the line, a bounded piece at a time.
            damaged += 1;
            loop {
                buf.clear();
                let m = (&mut reader).take(LINE_MAX).read_until(b'\n', &mut buf)?;
                if m == 0 || buf.last() == Some(&b'\n') {
                    break;
                }
            }
            continue;
        }
        match serde_json::from_slice::<Line>(&buf) {
            Ok(l) => {
                out.insert(l.id, l.entry());
            }
            Err(_) => damaged += 1,
        }
    }
    if damaged > 0 {
        tracing::warn!(index = %path.display(), lines = damaged, "skipped damaged lines of the undo index");
    }
    Ok(out)
}

pub(super) fn index_bytes<'a>(entries: impl Iterator<Item = &'a UndoEntry>) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for e in entries {
        serde_json::to_writer(&mut out, &Line::of(e)).map_err(io::Error::other)?;
        out.push(b'\n');
    }
    Ok(out)
}
