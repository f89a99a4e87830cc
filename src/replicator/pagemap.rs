//! A hash of every page of the database as a restore of the last saved transaction builds it.
//!
//! When the WAL restarted while nobody read it (the app checkpointed while the replicator was
//! down), the transactions in between are gone and a new generation must start. With this map
//! its base is only the pages that differ from what the store already restores (a delta on the
//! previous generation), not the whole database.
//!
//! The map follows exactly what a restore does: a snapshot's pages, then each transaction's pages
//! written in place and the file cut or zero-extended to its size. Only a segment's net effect
//! is hashed, at its seal: the sizes it went through and the last version of each page it left
//! (a hot page rewritten by thousands of transactions is hashed once). The map is kept in memory
//! and on disk in the cache as a base file (`pagemap.bin`, rewritten at each snapshot) plus a
//! log of each sealed segment's net changes (`pagemap.log`, appended at each seal, not synced). Both are
//! checked on load; a map that does not reach exactly the saved transaction is not used, and the
//! next break costs a full snapshot instead: the map only ever saves uploads, never decides what
//! a restore contains.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// A page's hash: the first 128 bits of its SHA-256.
pub type PageHash = [u8; 16];

const BASE_MAGIC: &[u8; 8] = b"ZLPMAP01";
const LOG_MAGIC: &[u8; 8] = b"ZLPLOG01";
const BASE_FILE: &str = "pagemap.bin";
const LOG_FILE: &str = "pagemap.log";
const LOG_HEADER: usize = 8 + 16 + 8;
/// The log is folded into a new base once it is this big, or twice the base, whichever is more.
const LOG_FOLD: u64 = 4 << 20;

/// Failures writing the map; each names the file. (A map that fails to load is just not used.)
#[derive(Debug, thiserror::Error)]
pub enum PageMapError {
    #[error("page map: cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "page map of generation {generation} is at transaction {at}; a segment starts at {first}"
    )]
    OutOfStep {
        generation: String,
        at: u64,
        first: u64,
    },
}

type Result<T> = std::result::Result<T, PageMapError>;

/// One change, in the order a restore makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Page(u32, PageHash),
    Size(u32),
}

/// Where the hashes start from: the snapshot a restore of this generation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Root {
    /// The snapshot's transaction.
    pub txid: u64,
    /// The snapshot is itself a delta on another generation.
    pub delta: bool,
}

/// The map (see the module documentation).
#[derive(Debug)]
pub struct PageMap {
    dir: PathBuf,
    generation: String,
    root: Root,
    /// The hashes are of the database after this transaction.
    txid: u64,
    page_size: u32,
    zero: PageHash,
    hashes: Vec<PageHash>,
    /// Net effect of the committed transactions of the segment being written.
    segment: Pending,
    /// Pages of the transaction being read: number and where its data is in the segment file.
    txn: Vec<(u32, u64)>,
    log: File,
    log_len: u64,
}

/// What the committed transactions of an unsealed segment did, net.
#[derive(Debug, Default)]
struct Pending {
    /// The smallest and the last database size among its commits (pages above the smallest
    /// were cut off at some point: zeros unless written again after).
    sizes: Option<(u32, u32)>,
    /// Pages whose last version is in the segment file (offset of the data), not cut off since.
    pages: HashMap<u32, u64>,
}

/// Hashes page `pgno`. Page 1 is hashed without the header bytes a snapshot (SQLite's backup)
/// rewrites, 24..28 and 92..100, so that a database equal to the map's compares equal.
#[must_use]
pub fn hash_page(pgno: u32, data: &[u8]) -> PageHash {
    let full = if pgno == 1 && data.len() >= 100 {
        let mut masked = data.to_vec();
        masked[24..28].fill(0);
        masked[92..100].fill(0);
        Sha256::digest(&masked)
    } else {
        Sha256::digest(data)
    };
    let mut h = [0u8; 16];
    h.copy_from_slice(&full[..16]);
    h
}

/// Hashes every page of a database file (its length must be whole pages).
pub fn hash_file(path: &Path, page_size: u32) -> std::io::Result<Vec<PageHash>> {
    let mut input = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut page = vec![0u8; page_size as usize];
    let mut out = Vec::new();
    loop {
        match input.read_exact(&mut page) {
            Ok(()) => {
                let pgno = u32::try_from(out.len() + 1).unwrap_or(u32::MAX);
                out.push(hash_page(pgno, &page));
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

impl PageMap {
    /// A new map of `db` (a snapshot of `generation` after `txid`, which restores start from),
    /// written to `dir` at once.
    pub fn create(
        dir: &Path,
        generation: &str,
        root: Root,
        txid: u64,
        page_size: u32,
        hashes: Vec<PageHash>,
    ) -> Result<Self> {
        let zero = hash_page(2, &vec![0u8; page_size as usize]);
        let (log, log_len) = write_files(dir, generation, root, txid, page_size, &hashes)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            generation: generation.to_string(),
            root,
            txid,
            page_size,
            zero,
            hashes,
            segment: Pending::default(),
            txn: Vec::new(),
            log,
            log_len,
        })
    }

    /// Loads the map from `dir` if it is of `generation` and `page_size` and reaches exactly
    /// `txid`; a log record past `txid` (cut after the state was last saved) is dropped.
    pub fn load(dir: &Path, generation: &str, txid: u64, page_size: u32) -> Option<Self> {
        match Self::try_load(dir, generation, txid, page_size) {
            Ok(map) => map,
            Err(e) => {
                tracing::debug!(error = %e, "page map not usable");
                None
            }
        }
    }

    fn try_load(dir: &Path, generation: &str, txid: u64, page_size: u32) -> Result<Option<Self>> {
        let base_path = dir.join(BASE_FILE);
        let base = match std::fs::read(&base_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(io("read", &base_path)(source)),
        };
        let lineage = super::manifest::lineage(generation);
        let Some((root, base_txid, base_page_size, hashes)) = parse_base(&base, lineage) else {
            return Ok(None);
        };
        if base_page_size != page_size || base_txid > txid {
            return Ok(None);
        }
        let log_path = dir.join(LOG_FILE);
        let mut log = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&log_path)
            .map_err(io("open", &log_path))?;
        let mut bytes = Vec::new();
        log.read_to_end(&mut bytes).map_err(io("read", &log_path))?;
        let zero = hash_page(2, &vec![0u8; page_size as usize]);
        let mut map = Self {
            dir: dir.to_path_buf(),
            generation: generation.to_string(),
            root,
            txid: base_txid,
            page_size,
            zero,
            hashes,
            segment: Pending::default(),
            txn: Vec::new(),
            log: log.try_clone().map_err(io("open", &log_path))?,
            log_len: 0,
        };
        if bytes.len() < LOG_HEADER
            || &bytes[..8] != LOG_MAGIC
            || bytes[8..24] != lineage
            || u64::from_be_bytes(bytes[24..32].try_into().expect("8 bytes")) != base_txid
        {
            return Ok(None);
        }
        let mut at = LOG_HEADER;
        while map.txid < txid {
            let Some((first, last, ops, len)) = parse_record(&bytes[at..]) else {
                break;
            };
            if first != map.txid + 1 || last > txid {
                break;
            }
            for op in ops {
                map.apply(op);
            }
            map.txid = last;
            at += len;
        }
        if map.txid != txid {
            return Ok(None);
        }
        // Whatever follows belongs to transactions the saved state does not count.
        log.set_len(at as u64).map_err(io("truncate", &log_path))?;
        map.log_len = at as u64;
        Ok(Some(map))
    }

    #[must_use]
    pub fn generation(&self) -> &str {
        &self.generation
    }

    #[must_use]
    pub fn root(&self) -> Root {
        self.root
    }

    #[must_use]
    pub fn txid(&self) -> u64 {
        self.txid
    }

    #[must_use]
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    #[must_use]
    pub fn hashes(&self) -> &[PageHash] {
        &self.hashes
    }

    /// A page of the transaction being read, whose data is at `offset` in the segment file.
    pub fn page(&mut self, pgno: u32, offset: u64) {
        self.txn.push((pgno, offset));
    }

    /// The transaction being read committed; the database is `db_pages` long after it.
    pub fn commit(&mut self, db_pages: u32) {
        let seg = &mut self.segment;
        seg.pages.extend(self.txn.drain(..));
        seg.pages.retain(|&p, _| p <= db_pages);
        seg.sizes = Some(match seg.sizes {
            Some((min, _)) => (min.min(db_pages), db_pages),
            None => (db_pages, db_pages),
        });
    }

    /// The transaction being read was cut off.
    pub fn discard_txn(&mut self) {
        self.txn.clear();
    }

    /// The whole segment being written was dropped.
    pub fn discard_segment(&mut self) {
        self.txn.clear();
        self.segment = Pending::default();
    }

    /// The segment of transactions `first..=last`, written to `file` (complete, before it is
    /// compressed away), is going into the outbox: its net changes join the map and its log
    /// (folded into a new base once the log is big). Call before the state counting it is saved.
    pub fn seal(&mut self, first: u64, last: u64, file: &Path) -> Result<()> {
        if first != self.txid + 1 || !self.txn.is_empty() {
            return Err(PageMapError::OutOfStep {
                generation: self.generation.clone(),
                at: self.txid,
                first,
            });
        }
        let pending = std::mem::take(&mut self.segment);
        let mut ops = Vec::with_capacity(pending.pages.len() + 2);
        if let Some((min, last_size)) = pending.sizes {
            ops.extend([Op::Size(min), Op::Size(last_size)]);
        }
        let mut pages: Vec<(u32, u64)> = pending.pages.into_iter().collect();
        pages.sort_unstable();
        if !pages.is_empty() {
            let spool = File::open(file).map_err(io("open", file))?;
            let mut data = vec![0u8; self.page_size as usize];
            for (pgno, offset) in pages {
                spool
                    .read_exact_at(&mut data, offset)
                    .map_err(io("read", file))?;
                ops.push(Op::Page(pgno, hash_page(pgno, &data)));
            }
        }
        let record = encode_record(first, last, &ops);
        for op in ops {
            self.apply(op);
        }
        self.txid = last;
        let log_path = self.dir.join(LOG_FILE);
        self.log
            .write_all(&record)
            .map_err(io("append to", &log_path))?;
        self.log_len += record.len() as u64;
        let base_len = (self.hashes.len() * 16) as u64;
        if self.log_len > LOG_FOLD.max(2 * base_len) {
            self.fold()?;
        }
        Ok(())
    }

    /// Rewrites the base as the map stands and empties the log.
    fn fold(&mut self) -> Result<()> {
        let (log, log_len) = write_files(
            &self.dir,
            &self.generation,
            self.root,
            self.txid,
            self.page_size,
            &self.hashes,
        )?;
        self.log = log;
        self.log_len = log_len;
        Ok(())
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Page(0, _) => {}
            Op::Page(pgno, h) => {
                let i = pgno as usize;
                if i > self.hashes.len() {
                    self.hashes.resize(i, self.zero);
                }
                self.hashes[i - 1] = h;
            }
            Op::Size(pages) => self.hashes.resize(pages as usize, self.zero),
        }
    }

    /// Pages (1-based) of a database with hashes `new` that differ from the map's, beyond its
    /// end included. Page 1 is always listed: a snapshot rewrites some of its header bytes.
    #[must_use]
    pub fn changed(&self, new: &[PageHash]) -> Vec<u32> {
        new.iter()
            .enumerate()
            .filter(|&(i, h)| i == 0 || self.hashes.get(i) != Some(h))
            .map(|(i, _)| u32::try_from(i + 1).unwrap_or(u32::MAX))
            .collect()
    }
}

/// Writes a new base and an empty log for it (each to a temporary name, synced, renamed).
fn write_files(
    dir: &Path,
    generation: &str,
    root: Root,
    txid: u64,
    page_size: u32,
    hashes: &[PageHash],
) -> Result<(File, u64)> {
    let lineage = super::manifest::lineage(generation);
    let mut base = Vec::with_capacity(8 + 16 + 8 + 1 + 8 + 4 + 4 + hashes.len() * 16 + 32);
    base.extend_from_slice(BASE_MAGIC);
    base.extend_from_slice(&lineage);
    base.extend_from_slice(&root.txid.to_be_bytes());
    base.push(u8::from(root.delta));
    base.extend_from_slice(&txid.to_be_bytes());
    base.extend_from_slice(&page_size.to_be_bytes());
    let n = u32::try_from(hashes.len()).unwrap_or(u32::MAX);
    base.extend_from_slice(&n.to_be_bytes());
    for h in hashes {
        base.extend_from_slice(h);
    }
    let sum = Sha256::digest(&base);
    base.extend_from_slice(&sum);
    let mut log = Vec::with_capacity(LOG_HEADER);
    log.extend_from_slice(LOG_MAGIC);
    log.extend_from_slice(&lineage);
    log.extend_from_slice(&txid.to_be_bytes());
    replace(&dir.join(BASE_FILE), &base)?;
    replace(&dir.join(LOG_FILE), &log)?;
    let path = dir.join(LOG_FILE);
    let file = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(io("open", &path))?;
    Ok((file, log.len() as u64))
}

fn replace(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    let mut w = BufWriter::new(&mut f);
    w.write_all(bytes).map_err(io("write", &tmp))?;
    w.flush().map_err(io("write", &tmp))?;
    drop(w);
    f.sync_data().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename", path))
}

fn parse_base(b: &[u8], lineage: [u8; 16]) -> Option<(Root, u64, u32, Vec<PageHash>)> {
    const FIXED: usize = 8 + 16 + 8 + 1 + 8 + 4 + 4;
    if b.len() < FIXED + 32 || &b[..8] != BASE_MAGIC || b[8..24] != lineage {
        return None;
    }
    let (body, sum) = b.split_at(b.len() - 32);
    if Sha256::digest(body).as_slice() != sum {
        return None;
    }
    let u64_at = |at: usize| u64::from_be_bytes(body[at..at + 8].try_into().expect("8 bytes"));
    let u32_at = |at: usize| u32::from_be_bytes(body[at..at + 4].try_into().expect("4 bytes"));
    let root = Root {
        txid: u64_at(24),
        delta: body[32] != 0,
    };
    let (txid, page_size, n) = (u64_at(33), u32_at(41), u32_at(45) as usize);
    let hashes = &body[FIXED..];
    if hashes.len() != n * 16 {
        return None;
    }
    let hashes = hashes
        .chunks_exact(16)
        .map(|c| c.try_into().expect("16 bytes"))
        .collect();
    Some((root, txid, page_size, hashes))
}

/// `'R' first:u64 last:u64 n:u32 ops… sum:[u8;16]`, op = `'P' pgno:u32 hash:[u8;16]` or
/// `'S' pages:u32`; `sum` is the first 16 bytes of the SHA-256 of the record before it.
fn encode_record(first: u64, last: u64, ops: &[Op]) -> Vec<u8> {
    let mut r = Vec::with_capacity(21 + ops.len() * 21 + 16);
    r.push(b'R');
    r.extend_from_slice(&first.to_be_bytes());
    r.extend_from_slice(&last.to_be_bytes());
    let n = u32::try_from(ops.len()).unwrap_or(u32::MAX);
    r.extend_from_slice(&n.to_be_bytes());
    for op in ops {
        match op {
            Op::Page(pgno, h) => {
                r.push(b'P');
                r.extend_from_slice(&pgno.to_be_bytes());
                r.extend_from_slice(h);
            }
            Op::Size(pages) => {
                r.push(b'S');
                r.extend_from_slice(&pages.to_be_bytes());
            }
        }
    }
    let sum = Sha256::digest(&r);
    r.extend_from_slice(&sum[..16]);
    r
}

/// A whole, intact record at the start of `b`: its range, changes and length.
fn parse_record(b: &[u8]) -> Option<(u64, u64, Vec<Op>, usize)> {
    if b.len() < 21 || b[0] != b'R' {
        return None;
    }
    let first = u64::from_be_bytes(b[1..9].try_into().ok()?);
    let last = u64::from_be_bytes(b[9..17].try_into().ok()?);
    let n = u32::from_be_bytes(b[17..21].try_into().ok()?) as usize;
    let mut at = 21;
    let mut ops = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        match *b.get(at)? {
            b'P' => {
                let pgno = u32::from_be_bytes(b.get(at + 1..at + 5)?.try_into().ok()?);
                let h: PageHash = b.get(at + 5..at + 21)?.try_into().ok()?;
                if pgno == 0 {
                    return None;
                }
                ops.push(Op::Page(pgno, h));
                at += 21;
            }
            b'S' => {
                let pages = u32::from_be_bytes(b.get(at + 1..at + 5)?.try_into().ok()?);
                ops.push(Op::Size(pages));
                at += 5;
            }
            _ => return None,
        }
    }
    let sum = b.get(at..at + 16)?;
    if Sha256::digest(&b[..at])[..16] != *sum || last < first {
        return None;
    }
    Some((first, last, ops, at + 16))
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PageMapError + use<> {
    let path = path.to_path_buf();
    move |source| PageMapError::Io { op, path, source }
}

#[cfg(test)]
#[path = "pagemap_tests.rs"]
mod tests;
