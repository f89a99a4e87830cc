//! What every entry of an upper dir looked like when a version of it was captured, so that the
//! next capture can tell what changed without reading any data.
//!
//! An entry is unchanged when its token — inode, ctime, mtime, size, mode, owner, link count,
//! device — is equal. ctime is the witness: the kernel moves it on every change of content,
//! metadata, xattrs or link count, and nobody can set it. It moves in steps of the coarse clock
//! (a few ms), so a change in the same step as the capture could leave it equal: an entry whose
//! ctime is within [`RACY_MARGIN_NS`] of the capture's start is marked *racy* and counts as changed
//! next time (git's "racily clean" rule).
//!
//! The index describes what a restore of the version builds, not only what a walk saw: an entry
//! a capture did not reach keeps its previous token, so it is looked at again next time.
//!
//! File layout: `"ZLIDX001" version_len:u32 version count:u64` then per entry `path_len:u32 path
//! racy:u8 token:12×u64`, then the sha256 of everything before it; big-endian.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::error::{ArchiveError, Result, io_err};
use super::walk::{ItemKind, Meta, Walker};

const MAGIC: &[u8; 8] = b"ZLIDX001";
/// A ctime this close to (or after) the start of a capture may hide a change made in the same
/// clock step. Local filesystems stamp ctime from the coarse clock, one tick (1–10 ms) apart;
/// ten times that keeps freshly written files from being sent twice in most captures.
pub const RACY_MARGIN_NS: i128 = 100_000_000;

/// The fields that change whenever an entry changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub dev: u64,
    pub ino: u64,
    pub ctime: (i64, u32),
    pub mtime: (i64, u32),
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    pub rdev: u64,
}

impl Token {
    pub(super) fn of(m: &Meta) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            ctime: (m.ctime(), m.ctime_nsec()),
            mtime: (m.mtime(), m.mtime_nsec()),
            size: m.size(),
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            nlink: m.nlink(),
            rdev: m.rdev(),
        }
    }

    fn ctime_ns(&self) -> i128 {
        i128::from(self.ctime.0) * 1_000_000_000 + i128::from(self.ctime.1)
    }
}

/// One entry: its token and whether it must count as changed next time regardless.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub token: Token,
    pub racy: bool,
}

/// The index of one version of an upper dir, keyed by tar path (`./dir/`, `./dir/.wh.gone`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TreeIndex {
    /// The version (content address of the chain's last archive) this index describes; set by
    /// whoever stored that version.
    pub version: String,
    pub entries: BTreeMap<Vec<u8>, Entry>,
}

/// Records entries as a capture sees them, marking those too close to its start as racy.
#[derive(Debug)]
pub struct IndexBuilder {
    started_ns: i128,
    pub(super) index: TreeIndex,
}

impl IndexBuilder {
    /// A capture starting now.
    #[must_use]
    pub fn new() -> Self {
        Self::starting_at(now_ns())
    }

    pub(super) fn starting_at(started_ns: i128) -> Self {
        Self {
            started_ns,
            index: TreeIndex::default(),
        }
    }

    /// Whether a token seen by this capture might hide a change in the same clock step.
    pub(super) fn is_racy(&self, token: &Token) -> bool {
        token.ctime_ns() >= self.started_ns - RACY_MARGIN_NS
    }

    /// Records what this capture saw at `tar_path`.
    pub(super) fn record(&mut self, tar_path: &[u8], meta: &Meta) {
        let token = Token::of(meta);
        let racy = self.is_racy(&token);
        self.index
            .entries
            .insert(tar_path.to_vec(), Entry { token, racy });
    }

    #[must_use]
    pub fn finish(self) -> TreeIndex {
        self.index
    }
}

impl Default for IndexBuilder {
    fn default() -> Self {
        Self::new()
    }
}

fn now_ns() -> i128 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i128::try_from(d.as_nanos()).unwrap_or(i128::MAX)
}

impl TreeIndex {
    /// Indexes the tree at `root` as it is now (a restore just built it, so it is exactly the
    /// restored version). Blocking.
    pub fn of_tree(root: &Path) -> Result<Self> {
        let mut b = IndexBuilder::new();
        let mut walker = Walker::new(root);
        while let Some(item) = walker.next_item()? {
            if !matches!(item.kind, ItemKind::Node | ItemKind::Whiteout) {
                continue;
            }
            if let Some(meta) = &item.meta {
                b.record(&item.tar_path, meta);
            }
            if item.is_dir() {
                let fd = walker.open_dir(&item)?;
                walker.descend(&item, fd, false)?;
            }
        }
        Ok(b.finish())
    }

    /// Whether the entry at `tar_path` must go into a delta: new, racy, or its token differs.
    #[must_use]
    pub fn changed(&self, tar_path: &[u8], token: &Token) -> bool {
        self.entries
            .get(tar_path)
            .is_none_or(|e| e.racy || e.token != *token)
    }

    /// Writes the index to `path` (private, through a synced temp file and a rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut out = Vec::with_capacity(64 + self.entries.len() * 120);
        out.extend_from_slice(MAGIC);
        put_bytes(&mut out, self.version.as_bytes());
        out.extend_from_slice(&(self.entries.len() as u64).to_be_bytes());
        for (tar_path, e) in &self.entries {
            put_bytes(&mut out, tar_path);
            out.push(u8::from(e.racy));
            let t = &e.token;
            for v in [
                t.dev,
                t.ino,
                t.ctime.0 as u64,
                u64::from(t.ctime.1),
                t.mtime.0 as u64,
                u64::from(t.mtime.1),
                t.size,
                u64::from(t.mode),
                u64::from(t.uid),
                u64::from(t.gid),
                t.nlink,
                t.rdev,
            ] {
                out.extend_from_slice(&v.to_be_bytes());
            }
        }
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = crate::util::private::file_options()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(&out)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(io_err("save the index", path))
    }

    /// Reads an index saved by [`TreeIndex::save`]; `Ok(None)` when there is none. A damaged
    /// one is an error naming the file (the caller then captures a full version).
    pub fn load(path: &Path) -> Result<Option<Self>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read the index", path)(e)),
        };
        parse(&bytes)
            .map(Some)
            .ok_or_else(|| ArchiveError::DamagedIndex {
                path: path.to_path_buf(),
            })
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(b);
}

/// Reads big-endian fields off the front of a slice.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = u32::from_be_bytes(self.take(4)?.try_into().ok()?);
        self.take(n as usize)
    }
}

fn parse(bytes: &[u8]) -> Option<TreeIndex> {
    let body_len = bytes.len().checked_sub(32)?;
    let (body, digest) = bytes.split_at(body_len);
    if Sha256::digest(body).as_slice() != digest {
        return None;
    }
    let mut c = Cursor(body);
    if c.take(8)? != MAGIC {
        return None;
    }
    let version = String::from_utf8(c.bytes()?.to_vec()).ok()?;
    let count = c.u64()?;
    let mut entries = BTreeMap::new();
    for _ in 0..count {
        let path = c.bytes()?.to_vec();
        let racy = c.take(1)?[0] != 0;
        let mut v = [0u64; 12];
        for slot in &mut v {
            *slot = c.u64()?;
        }
        let token = Token {
            dev: v[0],
            ino: v[1],
            ctime: (v[2] as i64, u32::try_from(v[3]).ok()?),
            mtime: (v[4] as i64, u32::try_from(v[5]).ok()?),
            size: v[6],
            mode: u32::try_from(v[7]).ok()?,
            uid: u32::try_from(v[8]).ok()?,
            gid: u32::try_from(v[9]).ok()?,
            nlink: v[10],
            rdev: v[11],
        };
        entries.insert(path, Entry { token, racy });
    }
    if !c.0.is_empty() {
        return None;
    }
    Some(TreeIndex { version, entries })
}
