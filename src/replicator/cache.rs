//! The local cache of one replicated database: where reading stands (`state.json`) and the
//! segments and snapshots the store does not have yet (`outbox/`). It survives restarts, so an
//! outage of the store or of this process loses nothing that was read.
//!
//! Order of durability: an outbox item's data, then its description, then the state that moves
//! past it — each written to a temp file, fsynced, renamed, and the directory fsynced. A crash
//! leaves either the old state (the WAL is read again from there, the item is rewritten) or the
//! new one with its items in place.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::wal::{WalCursor, WalHeader};

/// Format of `state.json` written by this version.
const STATE_FORMAT: u32 = 1;

/// Failures of the cache; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("replicator cache: cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("replicator cache: {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
}

type Result<T> = std::result::Result<T, CacheError>;

/// Which database file a history belongs to (a replaced file is another database).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path)?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// A WAL position as stored (mirrors [`WalCursor`], which stays free of serde for the fuzzer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCursor {
    pub big_endian: bool,
    pub page_size: u32,
    pub checkpoint_seq: u32,
    pub salt: (u32, u32),
    pub header_checksum: (u32, u32),
    pub next_frame: u32,
    pub checksum: (u32, u32),
}

impl From<WalCursor> for StoredCursor {
    fn from(c: WalCursor) -> Self {
        Self {
            big_endian: c.header.big_endian,
            page_size: c.header.page_size,
            checkpoint_seq: c.header.checkpoint_seq,
            salt: c.header.salt,
            header_checksum: c.header.checksum,
            next_frame: c.next_frame,
            checksum: c.checksum,
        }
    }
}

impl From<StoredCursor> for WalCursor {
    fn from(c: StoredCursor) -> Self {
        Self {
            header: WalHeader {
                big_endian: c.big_endian,
                page_size: c.page_size,
                checkpoint_seq: c.checkpoint_seq,
                salt: c.salt,
                checksum: c.header_checksum,
            },
            next_frame: c.next_frame,
            checksum: c.checksum,
        }
    }
}

/// Where replication of the database stands locally.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalState {
    pub format: u32,
    pub generation: String,
    pub page_size: u32,
    /// Every transaction before this one is in the outbox or the store.
    pub next_txid: u64,
    /// Commit time of transaction `next_txid - 1`.
    pub last_commit_unix_ns: i64,
    /// The WAL position right after transaction `next_txid - 1`; `None` when the WAL was empty
    /// there (just after a restore or a snapshot of an empty WAL).
    pub cursor: Option<StoredCursor>,
    pub db: FileId,
    /// Number of the next outbox item.
    pub next_item: u64,
    /// When the last snapshot was taken (unix ms).
    pub last_snapshot_unix_ms: i64,
}

/// What an outbox item is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ItemKind {
    /// The database after transaction `txid`; `new_generation` starts the generation with it.
    Snapshot {
        txid: u64,
        committed_unix_ns: i64,
        db_pages: u32,
        new_generation: Option<NewGeneration>,
        /// Set for a delta base (the data holds the changed pages, in the segment format).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent: Option<super::manifest::Parent>,
    },
    /// Transactions `first..=last`.
    Segment {
        first: u64,
        last: u64,
        first_unix_ns: i64,
        last_unix_ns: i64,
    },
}

/// Why a generation starts, for the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewGeneration {
    pub reason: String,
    pub page_size: u32,
    pub created_unix_ms: i64,
}

/// An outbox item's description (`{n:016x}.json`, next to its data `{n:016x}.zst`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub number: u64,
    pub generation: String,
    #[serde(flatten)]
    pub kind: ItemKind,
    /// Size and SHA-256 (hex) of the data file.
    pub size: u64,
    pub sha256: String,
}

/// The cache directory of one database.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// Opens (creating, 0700) `root/name`, and drops what a crash left half written.
    pub fn open(root: &Path, name: &str) -> Result<Self> {
        let dir = root.join(name);
        for d in [
            root.to_path_buf(),
            dir.clone(),
            dir.join("outbox"),
            dir.join("work"),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(io("create", &d))?;
        }
        let cache = Self { dir };
        cache.clean()?;
        if let Some(state) = cache.load_state()? {
            // Items numbered past the saved state were cut after it was last saved (a crash in
            // between) and never shipped (see [`Cache::shippable_below`]): the WAL still holds
            // their transactions unless it restarted meanwhile, which the resume detects. Kept,
            // they would overlap what is read again.
            for orphan in cache
                .items()?
                .iter()
                .filter(|i| i.number >= state.next_item)
            {
                cache.remove_item(orphan)?;
            }
        }
        Ok(cache)
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Scratch space for files being built (emptied at open).
    #[must_use]
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }

    fn outbox(&self) -> PathBuf {
        self.dir.join("outbox")
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Removes scratch files and outbox data whose description never got written.
    fn clean(&self) -> Result<()> {
        let work = self.work();
        for entry in fs::read_dir(&work).map_err(io("read", &work))? {
            let path = entry.map_err(io("read", &work))?.path();
            fs::remove_file(&path).map_err(io("remove", &path))?;
        }
        let outbox = self.outbox();
        for entry in fs::read_dir(&outbox).map_err(io("read", &outbox))? {
            let path = entry.map_err(io("read", &outbox))?.path();
            let orphan = match path.extension().and_then(|e| e.to_str()) {
                Some("zst") => !path.with_extension("json").exists(),
                Some("json") => false,
                _ => true,
            };
            if orphan {
                fs::remove_file(&path).map_err(io("remove", &path))?;
            }
        }
        Ok(())
    }

    pub fn load_state(&self) -> Result<Option<LocalState>> {
        let path = self.state_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("read", &path)(e)),
        };
        let state: LocalState =
            serde_json::from_slice(&bytes).map_err(|e| CacheError::Damaged {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if state.format != STATE_FORMAT {
            return Err(CacheError::Damaged {
                path,
                reason: format!(
                    "format {} (this version writes {STATE_FORMAT})",
                    state.format
                ),
            });
        }
        Ok(Some(state))
    }

    pub fn save_state(&self, state: &LocalState) -> Result<()> {
        let mut state = state.clone();
        state.format = STATE_FORMAT;
        let bytes = serde_json::to_vec_pretty(&state).expect("state serializes");
        write_atomic(&self.state_path(), &bytes, &self.work())
    }

    /// Forgets where reading stood (the next start begins a new generation).
    pub fn drop_state(&self) -> Result<()> {
        let path = self.state_path();
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", &path)(e)),
        }
    }

    /// A new private scratch file.
    pub fn scratch(&self, name: &str) -> Result<(File, PathBuf)> {
        let path = self.work().join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(io("create", &path))?;
        Ok((file, path))
    }

    /// Compresses `src` (a finished scratch file) into the outbox as item `number`, durable
    /// when this returns; `src` is removed.
    pub fn add_item(
        &self,
        number: u64,
        generation: &str,
        kind: ItemKind,
        src: &Path,
        level: i32,
    ) -> Result<Item> {
        use sha2::Digest;
        let data = self.outbox().join(format!("{number:016x}.zst"));
        let tmp = self.work().join(format!("{number:016x}.zst.tmp"));
        let (size, sha256) = (|| -> std::io::Result<(u64, String)> {
            let out = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            let mut hashing = HashingWriter {
                inner: out,
                hash: sha2::Sha256::new(),
                len: 0,
            };
            let mut enc = zstd::stream::Encoder::new(&mut hashing, level)?;
            std::io::copy(&mut File::open(src)?, &mut enc)?;
            enc.finish()?;
            hashing.inner.sync_all()?;
            Ok((hashing.len, hex::encode(hashing.hash.finalize())))
        })()
        .map_err(io("compress into", &tmp))?;
        fs::rename(&tmp, &data).map_err(io("move into the outbox", &data))?;
        let item = Item {
            number,
            generation: generation.to_string(),
            kind,
            size,
            sha256,
        };
        let desc = serde_json::to_vec_pretty(&item).expect("item serializes");
        write_atomic(&data.with_extension("json"), &desc, &self.work())?;
        fs::remove_file(src).map_err(io("remove", src))?;
        Ok(item)
    }

    /// Items waiting for the store, oldest first.
    pub fn items(&self) -> Result<Vec<Item>> {
        let outbox = self.outbox();
        let mut items = Vec::new();
        for entry in fs::read_dir(&outbox).map_err(io("read", &outbox))? {
            let path = entry.map_err(io("read", &outbox))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let bytes = fs::read(&path).map_err(io("read", &path))?;
            let item: Item = serde_json::from_slice(&bytes).map_err(|e| CacheError::Damaged {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            items.push(item);
        }
        items.sort_by_key(|i| i.number);
        Ok(items)
    }

    /// The data file of `item`.
    #[must_use]
    pub fn item_data(&self, item: &Item) -> PathBuf {
        self.outbox().join(format!("{:016x}.zst", item.number))
    }

    /// Removes a shipped item (description first: data without one is dropped at open).
    pub fn remove_item(&self, item: &Item) -> Result<()> {
        let data = self.item_data(item);
        let desc = data.with_extension("json");
        for p in [&desc, &data] {
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", p)(e)),
            }
        }
        Ok(())
    }

    /// Items below this number may be shipped now: the saved state counts them, or there is
    /// no state and they are all an earlier history's.
    pub fn shippable_below(&self) -> Result<u64> {
        Ok(match self.load_state()? {
            Some(s) => s.next_item,
            None => self.items()?.last().map_or(0, |i| i.number + 1),
        })
    }

    /// Bytes the outbox holds.
    pub fn usage(&self) -> Result<u64> {
        let outbox = self.outbox();
        let mut total = 0;
        for entry in fs::read_dir(&outbox).map_err(io("read", &outbox))? {
            let entry = entry.map_err(io("read", &outbox))?;
            total += entry.metadata().map_err(io("stat", &entry.path()))?.len();
        }
        Ok(total)
    }
}

struct HashingWriter<W> {
    inner: W,
    hash: sha2::Sha256,
    len: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `dest` through a temp file in `work` (same filesystem), fsync, rename, fsync dir.
fn write_atomic(dest: &Path, bytes: &[u8], work: &Path) -> Result<()> {
    let name = dest
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy());
    let tmp = work.join(format!("{name}.tmp"));
    (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })()
    .map_err(io("write", &tmp))?;
    fs::rename(&tmp, dest).map_err(io("replace", dest))?;
    sync_dir(dest.parent().expect("a file in a directory"))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync directory", dir))
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + use<> {
    let path = path.to_path_buf();
    move |source| CacheError::Io { op, path, source }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn items_are_durable_private_ordered_and_half_written_ones_are_dropped() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::open(root.path(), "app").unwrap();
        for n in [3u64, 1, 2] {
            let (mut f, path) = cache.scratch("seg").unwrap();
            f.write_all(&vec![u8::try_from(n).unwrap(); 5000]).unwrap();
            drop(f);
            let kind = ItemKind::Segment {
                first: n,
                last: n,
                first_unix_ns: 0,
                last_unix_ns: 0,
            };
            let item = cache.add_item(n, "g", kind, &path, 3).unwrap();
            assert!(!path.exists());
            let data = cache.item_data(&item);
            assert_eq!(fs::metadata(&data).unwrap().len(), item.size);
            assert_eq!(
                fs::metadata(&data).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let numbers: Vec<u64> = cache.items().unwrap().iter().map(|i| i.number).collect();
        assert_eq!(numbers, [1, 2, 3]);
        assert!(cache.usage().unwrap() > 0);
        // A crash between an item's data and its description: the data goes at the next open.
        let half = cache.outbox().join(format!("{:016x}.zst", 9));
        fs::write(&half, b"x").unwrap();
        fs::write(cache.work().join("leftover"), b"x").unwrap();
        let cache = Cache::open(root.path(), "app").unwrap();
        assert!(!half.exists());
        assert_eq!(fs::read_dir(cache.work()).unwrap().count(), 0);
        assert_eq!(cache.items().unwrap().len(), 3);
        let first = cache.items().unwrap().remove(0);
        cache.remove_item(&first).unwrap();
        assert_eq!(cache.items().unwrap().len(), 2);
        assert_eq!(
            fs::metadata(cache.dir()).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn items_cut_after_the_last_saved_state_are_dropped_at_open_and_never_shippable() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::open(root.path(), "app").unwrap();
        for n in 0..4u64 {
            let (mut f, path) = cache.scratch("seg").unwrap();
            f.write_all(b"pages").unwrap();
            let kind = ItemKind::Segment {
                first: n + 1,
                last: n + 1,
                first_unix_ns: 0,
                last_unix_ns: 0,
            };
            cache.add_item(n, "g", kind, &path, 3).unwrap();
        }
        assert_eq!(
            cache.shippable_below().unwrap(),
            4,
            "no state: an earlier history's"
        );
        let state = LocalState {
            format: STATE_FORMAT,
            generation: "g".into(),
            page_size: 4096,
            next_txid: 3,
            last_commit_unix_ns: 0,
            cursor: None,
            db: FileId { dev: 1, ino: 2 },
            next_item: 2,
            last_snapshot_unix_ms: 0,
        };
        cache.save_state(&state).unwrap();
        assert_eq!(cache.shippable_below().unwrap(), 2);
        // A crash after items 2 and 3 were cut but before the state counted them.
        let cache = Cache::open(root.path(), "app").unwrap();
        let left: Vec<u64> = cache.items().unwrap().iter().map(|i| i.number).collect();
        assert_eq!(left, [0, 1]);
    }

    #[test]
    fn the_state_round_trips_and_a_damaged_one_is_named() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::open(root.path(), "app").unwrap();
        assert_eq!(cache.load_state().unwrap(), None);
        let state = LocalState {
            format: STATE_FORMAT,
            generation: "ab".repeat(16),
            page_size: 4096,
            next_txid: 12,
            last_commit_unix_ns: 99,
            cursor: None,
            db: FileId { dev: 1, ino: 2 },
            next_item: 4,
            last_snapshot_unix_ms: 5,
        };
        cache.save_state(&state).unwrap();
        assert_eq!(cache.load_state().unwrap(), Some(state));
        fs::write(cache.state_path(), b"{").unwrap();
        let err = cache.load_state().unwrap_err();
        assert!(err.to_string().contains("state.json"), "{err}");
        cache.drop_state().unwrap();
        assert_eq!(cache.load_state().unwrap(), None);
    }
}
