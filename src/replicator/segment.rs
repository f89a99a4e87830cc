//! WAL segments: a run of consecutive transactions of one lineage, as stored (zstd over the
//! encoding below).
//!
//! ```text
//! "ZLWSEG01" page_size:u32 lineage:[u8;16] first_txid:u64
//! per transaction: 'T' txid:u64
//!                  ('P' pgno:u32 page)*                       a later copy of a page wins
//!                  'C' committed_unix_ns:i64 db_pages:u32 chain:[u8;32]
//! end:             'E' last_txid:u64 chain:[u8;32]
//! ```
//! All integers are big-endian. `chain` is the SHA-256 of every byte of the segment before it.
//! Pages stream through in both directions (a transaction can be bigger than memory): a restore
//! writes them into its temporary file as they come and fails as a whole when a chain does not
//! match; a point-in-time restore stops at a transaction's `T` before reading any of its pages.
//! The end record tells a truncated segment from a complete one.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};

use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"ZLWSEG01";
const TXN: u8 = b'T';
const PAGE: u8 = b'P';
const COMMIT: u8 = b'C';
const END: u8 = b'E';

/// Failures decoding a segment; the caller adds the object key.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("segment read failed")]
    Io(#[source] std::io::Error),
    #[error("not a WAL segment (magic {0:02x?})")]
    Magic([u8; 8]),
    #[error("segment is for page size {found}, expected {expected}")]
    PageSize { found: u32, expected: u32 },
    #[error("segment belongs to lineage {found}, expected {expected}")]
    Lineage { found: String, expected: String },
    #[error("segment starts at transaction {found}, expected {expected}")]
    Gap { found: u64, expected: u64 },
    #[error("transaction {txid}: {reason}")]
    Corrupt { txid: u64, reason: String },
    #[error("segment ends without its end record after transaction {last}")]
    Truncated { last: u64 },
    /// Returned by the consumer; decoding stops.
    #[error("applying transaction {txid} failed: {message}")]
    Sink { txid: u64, message: String },
}

type Result<T> = std::result::Result<T, SegmentError>;

/// What a segment is about, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub page_size: u32,
    pub lineage: [u8; 16],
    pub first_txid: u64,
}

/// One transaction's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnInfo {
    pub txid: u64,
    pub committed_unix_ns: i64,
    /// Database size in pages after the transaction.
    pub db_pages: u32,
}

/// Encodes transactions into an uncompressed spool file (compressed when uploaded), so a
/// transaction whose WAL scan fails can be cut off again.
#[derive(Debug)]
pub struct SegmentWriter {
    out: std::io::BufWriter<File>,
    hash: Sha256,
    header: SegmentHeader,
    next_txid: u64,
    /// Where the open transaction started (offset, hash), if one is open.
    open: Option<(u64, Sha256)>,
    len: u64,
}

impl SegmentWriter {
    /// Starts a segment in `file` (empty, positioned at 0).
    pub fn new(file: File, header: SegmentHeader) -> std::io::Result<Self> {
        let mut w = Self {
            out: std::io::BufWriter::with_capacity(1 << 16, file),
            hash: Sha256::new(),
            header,
            next_txid: header.first_txid,
            open: None,
            len: 0,
        };
        w.emit(MAGIC)?;
        w.emit(&header.page_size.to_be_bytes())?;
        w.emit(&header.lineage)?;
        w.emit(&header.first_txid.to_be_bytes())?;
        Ok(w)
    }

    /// Adds a page to the open transaction (opening it if needed); returns where its data is
    /// in the (uncompressed) file.
    pub fn page(&mut self, pgno: u32, data: &[u8]) -> std::io::Result<u64> {
        debug_assert_eq!(data.len(), self.header.page_size as usize);
        if pgno == 0 {
            // The decoder refuses page 0; never write what cannot be read back.
            return Err(std::io::Error::other("page number 0"));
        }
        if self.open.is_none() {
            self.open = Some((self.len, self.hash.clone()));
            self.emit(&[TXN])?;
            self.emit(&self.next_txid.to_be_bytes())?;
        }
        self.emit(&[PAGE])?;
        self.emit(&pgno.to_be_bytes())?;
        let offset = self.len;
        self.emit(data)?;
        Ok(offset)
    }

    /// Cuts off the open transaction (its WAL scan failed).
    pub fn discard(&mut self) -> std::io::Result<()> {
        if let Some((offset, hash)) = self.open.take() {
            self.out.flush()?;
            self.out.get_ref().set_len(offset)?;
            self.out.seek(SeekFrom::Start(offset))?;
            self.hash = hash;
            self.len = offset;
        }
        Ok(())
    }

    /// Closes the open transaction as `next_txid()`.
    pub fn commit(&mut self, committed_unix_ns: i64, db_pages: u32) -> std::io::Result<TxnInfo> {
        if self.open.take().is_none() {
            // A transaction writes at least one page; keep the record shape regardless.
            self.emit(&[TXN])?;
            self.emit(&self.next_txid.to_be_bytes())?;
        }
        self.emit(&[COMMIT])?;
        self.emit(&committed_unix_ns.to_be_bytes())?;
        self.emit(&db_pages.to_be_bytes())?;
        let chain = self.hash.clone().finalize();
        self.emit(&chain)?;
        let info = TxnInfo {
            txid: self.next_txid,
            committed_unix_ns,
            db_pages,
        };
        self.next_txid = self
            .next_txid
            .checked_add(1)
            .ok_or_else(|| std::io::Error::other("transaction id overflows"))?;
        Ok(info)
    }

    /// The transaction id the next commit gets.
    #[must_use]
    pub fn next_txid(&self) -> u64 {
        self.next_txid
    }

    /// Transactions committed so far.
    #[must_use]
    pub fn txns(&self) -> u64 {
        self.next_txid - self.header.first_txid
    }

    /// Bytes written so far.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no transaction was committed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.txns() == 0
    }

    /// Drops an open transaction, writes the end record and returns the file (not synced).
    pub fn finish(mut self) -> std::io::Result<File> {
        self.discard()?;
        self.emit(&[END])?;
        self.emit(&self.next_txid.saturating_sub(1).to_be_bytes())?;
        let chain = self.hash.clone().finalize();
        self.emit(&chain)?;
        self.out
            .into_inner()
            .map_err(std::io::IntoInnerError::into_error)
    }

    fn emit(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hash.update(bytes);
        self.len += bytes.len() as u64;
        self.out.write_all(bytes)
    }
}

/// What decoding hands its consumer. Pages come before their transaction is verified: the
/// consumer must treat them as provisional until `Commit` (and discard everything on error).
#[derive(Debug)]
pub enum SegmentEvent<'a> {
    /// A transaction starts; answering [`Flow::Stop`] ends decoding before any of its pages.
    Begin {
        txid: u64,
    },
    Page {
        pgno: u32,
        data: &'a [u8],
    },
    /// The transaction's chain hash matched.
    Commit(TxnInfo),
}

/// Whether to go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Decodes `input` (uncompressed), checking it continues `expected` (page size, lineage, first
/// txid). Returns the last transaction committed to `sink`, or `None` if none was.
pub fn decode(
    input: impl Read,
    expected: SegmentHeader,
    sink: &mut dyn FnMut(SegmentEvent<'_>) -> std::result::Result<Flow, String>,
) -> Result<Option<TxnInfo>> {
    let mut r = Hashing {
        inner: input,
        hash: Sha256::new(),
    };
    check_header(&mut r, expected)?;
    let (mut next, mut last) = (expected.first_txid, None);
    let mut page = vec![0u8; expected.page_size as usize];
    loop {
        let done = next.saturating_sub(1);
        let eof = |e: SegmentError| match e {
            SegmentError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                SegmentError::Truncated { last: done }
            }
            e => e,
        };
        match r.byte().map_err(eof)? {
            END => {
                let end = r.u64().map_err(eof)?;
                check_chain(&mut r, done).map_err(eof)?;
                if end != done {
                    return Err(corrupt(end, format!("end record after transaction {done}")));
                }
                return Ok(last);
            }
            TXN => {}
            other => return Err(corrupt(next, format!("record type {other:#04x}"))),
        }
        let txid = r.u64().map_err(eof)?;
        if txid != next {
            return Err(corrupt(txid, format!("expected transaction {next}")));
        }
        let sink_err = |message| SegmentError::Sink { txid, message };
        if sink(SegmentEvent::Begin { txid }).map_err(sink_err)? == Flow::Stop {
            return Ok(last);
        }
        loop {
            match r.byte().map_err(eof)? {
                PAGE => {
                    let pgno = r.u32().map_err(eof)?;
                    if pgno == 0 {
                        return Err(corrupt(txid, "page number 0".into()));
                    }
                    r.read(&mut page).map_err(eof)?;
                    sink(SegmentEvent::Page { pgno, data: &page }).map_err(sink_err)?;
                }
                COMMIT => break,
                other => return Err(corrupt(txid, format!("record type {other:#04x}"))),
            }
        }
        let committed_unix_ns = i64::from_be_bytes(r.u64().map_err(eof)?.to_be_bytes());
        let db_pages = r.u32().map_err(eof)?;
        check_chain(&mut r, txid).map_err(eof)?;
        let info = TxnInfo {
            txid,
            committed_unix_ns,
            db_pages,
        };
        last = Some(info);
        next = next
            .checked_add(1)
            .ok_or_else(|| corrupt(txid, "transaction id overflows".to_string()))?;
        if sink(SegmentEvent::Commit(info)).map_err(sink_err)? == Flow::Stop {
            return Ok(last);
        }
    }
}

fn check_header<R: Read>(r: &mut Hashing<R>, expected: SegmentHeader) -> Result<()> {
    let mut magic = [0u8; 8];
    r.read(&mut magic)?;
    if &magic != MAGIC {
        return Err(SegmentError::Magic(magic));
    }
    let page_size = r.u32()?;
    if page_size != expected.page_size {
        return Err(SegmentError::PageSize {
            found: page_size,
            expected: expected.page_size,
        });
    }
    let mut lineage = [0u8; 16];
    r.read(&mut lineage)?;
    if lineage != expected.lineage {
        return Err(SegmentError::Lineage {
            found: hex::encode(lineage),
            expected: hex::encode(expected.lineage),
        });
    }
    let first = r.u64()?;
    if first != expected.first_txid {
        return Err(SegmentError::Gap {
            found: first,
            expected: expected.first_txid,
        });
    }
    Ok(())
}

fn corrupt(txid: u64, reason: String) -> SegmentError {
    SegmentError::Corrupt { txid, reason }
}

/// Reads a stored chain hash and compares it with the hash of everything read before it.
fn check_chain<R: Read>(r: &mut Hashing<R>, txid: u64) -> Result<()> {
    let expected = r.hash.clone().finalize();
    let mut stored = [0u8; 32];
    r.inner.read_exact(&mut stored).map_err(SegmentError::Io)?;
    r.hash.update(stored);
    if stored[..] != expected[..] {
        return Err(SegmentError::Corrupt {
            txid,
            reason: "checksum mismatch".into(),
        });
    }
    Ok(())
}

/// A reader that hashes what it reads.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> Result<()> {
        self.inner.read_exact(buf).map_err(SegmentError::Io)?;
        self.hash.update(&*buf);
        Ok(())
    }

    fn byte(&mut self) -> Result<u8> {
        let mut b = [0u8; 1];
        self.read(&mut b)?;
        Ok(b[0])
    }

    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
}

#[cfg(test)]
#[path = "segment_tests.rs"]
mod tests;
