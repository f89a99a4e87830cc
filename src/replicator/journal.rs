//! The tail read under a write barrier, made durable with a single `fdatasync`.
//!
//! Before a barrier checkpoint lets the WAL restart, what was read must be durable. As an outbox
//! item plus a saved state that is five fsyncs of new files and directories, each waiting for a
//! filesystem journal commit while the app's writers are held off. Instead the tail segment and
//! where it ends go into this file, written in place over zeros laid down once (no allocation, no
//! size change: `fdatasync` then flushes data only), synced while SQLite backfills; the item and
//! the state follow right after the barrier. A start finds a record that continues the saved state exactly (same generation,
//! first transaction = the next one) and turns it into the item the crash prevented.
//!
//! Layout at offset 0: `"ZLTAIL01" meta_len:u32 data_len:u64 sha256(meta ‖ data):[u8;32] meta
//! data`, big-endian; `meta` is JSON ([`TailMeta`]), `data` the uncompressed segment. A torn
//! write fails the digest and is ignored; an older record is ignored because the state moved
//! past it (a record always starts at the first transaction not yet in the outbox).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::cache::{Cache, CacheError, ItemKind, LocalState, StoredCursor};

const MAGIC: &[u8; 8] = b"ZLTAIL01";
const FILE: &str = "tail.journal";
const HEADER: usize = 8 + 4 + 8 + 32;
/// Size of the file; a bigger tail is sealed the slow way.
pub const CAPACITY: u64 = 8 << 20;

/// Failures of the journal; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("tail journal: cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, JournalError>;

/// What the journalled segment is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TailMeta {
    pub generation: String,
    pub first: u64,
    pub last: u64,
    pub first_unix_ns: i64,
    pub last_unix_ns: i64,
    /// The WAL position right after `last`.
    pub cursor: Option<StoredCursor>,
}

/// The journal file of one database's cache.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
}

impl Journal {
    /// Opens the journal in `dir`, laying down [`CAPACITY`] zero bytes (synced) the first time.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(FILE);
        let io = |op| {
            let path = path.clone();
            move |source| JournalError::Io { op, path, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io("open"))?;
        if file.metadata().map_err(io("stat"))?.len() < CAPACITY {
            let zeros = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < CAPACITY {
                file.write_all_at(&zeros, at).map_err(io("fill"))?;
                at += zeros.len() as u64;
            }
            file.sync_all().map_err(io("sync"))?;
            if let Some(parent) = path.parent() {
                File::open(parent)
                    .and_then(|d| d.sync_all())
                    .map_err(io("sync the directory of"))?;
            }
        }
        Ok(Self { file, path })
    }

    /// Records `meta` and the finished segment file `segment`, durable once [`Journal::sync`]
    /// returns (apart so that the sync can run beside SQLite's backfill). `Ok(false)`: too big
    /// for the journal (nothing written).
    pub fn record(&self, meta: &TailMeta, segment: &Path) -> Result<bool> {
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::Io { op, path, source }
        };
        let meta_bytes = serde_json::to_vec(meta).expect("tail meta serializes");
        let data_len = std::fs::metadata(segment)
            .map_err(io("stat", segment))?
            .len();
        if (HEADER + meta_bytes.len()) as u64 + data_len > CAPACITY {
            return Ok(false);
        }
        // The body streams in (a tail can be megabytes); the header, with the digest, last.
        let body_at = (HEADER + meta_bytes.len()) as u64;
        let mut hash = Sha256::new();
        hash.update(&meta_bytes);
        let mut src = File::open(segment).map_err(io("read", segment))?;
        let mut chunk = vec![0u8; 1 << 16];
        let mut done = 0u64;
        loop {
            let n = src.read(&mut chunk).map_err(io("read", segment))?;
            if n == 0 {
                break;
            }
            hash.update(&chunk[..n]);
            self.file
                .write_all_at(&chunk[..n], body_at + done)
                .map_err(io("write", &self.path))?;
            done += n as u64;
        }
        if done != data_len {
            return Err(io("read", segment)(std::io::Error::other(
                "the segment changed while it was journalled",
            )));
        }
        let mut head = Vec::with_capacity(HEADER + meta_bytes.len());
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&u32::try_from(meta_bytes.len()).unwrap_or(0).to_be_bytes());
        head.extend_from_slice(&data_len.to_be_bytes());
        head.extend_from_slice(&hash.finalize());
        head.extend_from_slice(&meta_bytes);
        self.file
            .write_all_at(&head, 0)
            .map_err(io("write", &self.path))?;
        Ok(true)
    }

    /// Makes the last record durable: data only, as the file never changes size.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|source| JournalError::Io {
            op: "sync",
            path: self.path.clone(),
            source,
        })
    }

    /// A tail journalled under a barrier whose outbox item a crash prevented (it continues the saved
    /// state exactly) becomes that item now, and the state moves past it.
    pub fn recover(cache: &Cache, state: &mut LocalState, level: i32) -> Result<bool> {
        let Some((meta, data)) = Self::read(cache.dir())? else {
            return Ok(false);
        };
        if meta.generation != state.generation
            || meta.first != state.next_txid
            || meta.last < meta.first
        {
            return Ok(false);
        }
        let (mut file, path) = cache.scratch("journalled-segment")?;
        std::io::Write::write_all(&mut file, &data).map_err(|source| JournalError::Io {
            op: "write",
            path: path.clone(),
            source,
        })?;
        drop(file);
        let kind = ItemKind::Segment {
            first: meta.first,
            last: meta.last,
            first_unix_ns: meta.first_unix_ns,
            last_unix_ns: meta.last_unix_ns,
        };
        cache.add_item(state.next_item, &state.generation, kind, &path, level)?;
        state.next_item += 1;
        state.next_txid = meta.last + 1;
        state.last_commit_unix_ns = meta.last_unix_ns;
        state.cursor = meta.cursor;
        cache.save_state(state)?;
        tracing::info!(
            first = meta.first,
            last = meta.last,
            "recovered transactions journalled under a write barrier before a crash"
        );
        Ok(true)
    }

    /// The record in `dir`'s journal, if there is an intact one.
    pub fn read(dir: &Path) -> Result<Option<(TailMeta, Vec<u8>)>> {
        let path = dir.join(FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(JournalError::Io {
                    op: "read",
                    path,
                    source,
                });
            }
        };
        Ok(parse(&bytes))
    }
}

fn parse(b: &[u8]) -> Option<(TailMeta, Vec<u8>)> {
    if b.len() < HEADER || &b[..8] != MAGIC {
        return None;
    }
    let meta_len = u32::from_be_bytes(b[8..12].try_into().ok()?) as usize;
    let data_len = usize::try_from(u64::from_be_bytes(b[12..20].try_into().ok()?)).ok()?;
    let end = HEADER.checked_add(meta_len)?.checked_add(data_len)?;
    let body = b.get(HEADER..end)?;
    if Sha256::digest(body).as_slice() != &b[20..52] {
        return None;
    }
    let meta = serde_json::from_slice(&body[..meta_len]).ok()?;
    Some((meta, body[meta_len..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicator::cache::FileId;
    use crate::replicator::manifest;
    use crate::replicator::segment::{SegmentHeader, SegmentWriter};

    fn meta(first: u64) -> TailMeta {
        TailMeta {
            generation: "ab".repeat(16),
            first,
            last: first + 2,
            first_unix_ns: 5,
            last_unix_ns: 9,
            cursor: None,
        }
    }

    #[test]
    fn a_record_reads_back_until_torn_and_a_newer_one_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Journal::read(dir.path()).unwrap(), None);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(
            Journal::read(dir.path()).unwrap(),
            None,
            "zeros are no record"
        );
        let seg = dir.path().join("seg");
        std::fs::write(&seg, b"segment bytes, long enough").unwrap();
        assert!(j.record(&meta(7), &seg).unwrap());
        j.sync().unwrap();
        let (m, data) = Journal::read(dir.path()).unwrap().unwrap();
        assert_eq!(
            (m, data.as_slice()),
            (meta(7), &b"segment bytes, long enough"[..])
        );
        // Reopening keeps the record (the file is filled only once).
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        std::fs::write(&seg, b"short").unwrap();
        assert!(j.record(&meta(10), &seg).unwrap());
        let (m, data) = Journal::read(dir.path()).unwrap().unwrap();
        assert_eq!((m.first, data.as_slice()), (10, &b"short"[..]));
        // A torn record is no record.
        let path = dir.path().join(FILE);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"X", HEADER as u64 + 3).unwrap();
        assert_eq!(Journal::read(dir.path()).unwrap(), None);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), CAPACITY);
    }

    #[test]
    fn a_tail_bigger_than_the_journal_is_refused_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let seg = dir.path().join("seg");
        std::fs::write(&seg, vec![1u8; CAPACITY as usize]).unwrap();
        assert!(!j.record(&meta(1), &seg).unwrap());
        assert_eq!(Journal::read(dir.path()).unwrap(), None);
    }

    /// The crash this guards against: the tail read under a barrier was journalled, the
    /// checkpoint let the WAL restart, and the process died before the outbox item was written.
    #[test]
    fn a_tail_journalled_before_a_crash_becomes_the_next_item_once() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), "app").unwrap();
        let generation = manifest::new_generation_id();
        let mut state = LocalState {
            format: 0,
            generation: generation.clone(),
            page_size: 512,
            next_txid: 5,
            last_commit_unix_ns: 1,
            cursor: None,
            db: FileId { dev: 1, ino: 2 },
            next_item: 3,
            last_snapshot_unix_ms: 0,
        };
        cache.save_state(&state).unwrap();
        let (file, seg) = cache.scratch("tail").unwrap();
        let header = SegmentHeader {
            page_size: 512,
            lineage: manifest::lineage(&generation),
            first_txid: 5,
        };
        let mut w = SegmentWriter::new(file, header).unwrap();
        for t in 0..2u8 {
            w.page(1, &[t; 512]).unwrap();
            w.commit(10 + i64::from(t), 1).unwrap();
        }
        w.finish().unwrap();
        let segment = std::fs::read(&seg).unwrap();
        let meta = TailMeta {
            generation: generation.clone(),
            first: 5,
            last: 6,
            first_unix_ns: 10,
            last_unix_ns: 11,
            cursor: None,
        };
        let journal = Journal::open(cache.dir()).unwrap();
        assert!(journal.record(&meta, &seg).unwrap());
        journal.sync().unwrap();

        // A record that does not continue the state is left alone.
        for other in [
            LocalState {
                next_txid: 4,
                ..state.clone()
            },
            LocalState {
                generation: manifest::new_generation_id(),
                ..state.clone()
            },
        ] {
            let mut s = other.clone();
            assert!(!Journal::recover(&cache, &mut s, 1).unwrap());
            assert_eq!(s, other);
        }

        assert!(Journal::recover(&cache, &mut state, 1).unwrap());
        assert_eq!((state.next_txid, state.next_item), (7, 4));
        assert_eq!(state.last_commit_unix_ns, 11);
        let saved = cache.load_state().unwrap().unwrap();
        assert_eq!(
            (saved.next_txid, saved.next_item),
            (7, 4),
            "saved: {saved:?}"
        );
        let items = cache.items().unwrap();
        let item = items.last().unwrap();
        assert_eq!(item.number, 3);
        assert!(matches!(
            item.kind,
            ItemKind::Segment {
                first: 5,
                last: 6,
                ..
            }
        ));
        let data = zstd::decode_all(std::fs::File::open(cache.item_data(item)).unwrap()).unwrap();
        assert_eq!(data, segment);
        // The state moved past the record: a later start recovers nothing.
        assert!(!Journal::recover(&cache, &mut state, 1).unwrap());
        assert_eq!(cache.items().unwrap().len(), items.len());
    }
}
