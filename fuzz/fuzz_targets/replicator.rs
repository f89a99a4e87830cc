//! Fuzzes the SQLite replication readers: the WAL scan (`replicator::wal`), and the segment
//! decoder with its writer (`replicator::segment`).
//!
//! Both modules are compiled from the library's own source (they use no other module of the
//! crate), as in the archive target, so this build instruments them and sha2/hex/thiserror
//! instead of the whole daemon.
//!
//! The input's first bytes pick what it is (the other readers would reject it at once anyway):
//! - a WAL magic: a WAL file. Scanned up to its last whole frame; bytes of a partial trailing
//!   frame, if any, are knobs: the first ends a second scan earlier (which is then resumed from
//!   its cursor and must give what the single scan gave), the second makes the sink refuse that
//!   event.
//! - `ZLWSEG01`: a segment, decoded against the header it claims (an invalid page size is
//!   replaced by 512, which the decoder must then refuse).
//! - anything else: a writer program ([`Program`]). Its segment must decode to exactly what was
//!   committed, and with one byte flipped, cut short, or stopped at a transaction, to exactly the
//!   transactions before that point (SHA-256 chain).
//!
//! Every event is checked as it comes (page numbers, page sizes, transaction order); any
//! violation panics, which libFuzzer reports as a crash.

#![no_main]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/replicator/segment.rs"]
mod segment;
#[allow(dead_code)]
#[path = "../../src/replicator/wal.rs"]
mod wal;

use segment::{Flow, SegmentError, SegmentEvent, SegmentHeader, SegmentWriter, TxnInfo};
use wal::{WalCursor, WalError, WalEvent};

const SEGMENT_MAGIC: &[u8] = b"ZLWSEG01";
/// Bytes of a segment's header (magic, page size, lineage, first txid).
const SEGMENT_HEADER_LEN: usize = 8 + 4 + 16 + 8;
/// Bytes of a segment's end record ('E', last txid, chain).
const SEGMENT_END_LEN: u64 = 1 + 8 + 32;
/// Page bytes a writer program may write: pages are opaque to the format, so more only slows
/// every execution down (and grows the ASan heap).
const MAX_PROGRAM_PAGE_BYTES: usize = 256 << 10;

fuzz_target!(|data: &[u8]| {
    if data.starts_with(&[0x37, 0x7f, 0x06, 0x82]) || data.starts_with(&[0x37, 0x7f, 0x06, 0x83]) {
        wal_file(data);
    } else if data.starts_with(SEGMENT_MAGIC) {
        segment_bytes(data);
    } else {
        round_trip(data);
    }
});

/// A file reused by every input of the process. Unnamed (`tempfile::tempfile`), so nothing is
/// left behind however libFuzzer exits; the WAL functions that want a path get
/// `/proc/self/fd/N`.
struct Scratch {
    file: File,
    path: PathBuf,
}

static WAL_FILE: OnceLock<Scratch> = OnceLock::new();
static SEGMENT_FILE: OnceLock<Scratch> = OnceLock::new();

fn scratch(cell: &'static OnceLock<Scratch>) -> &'static Scratch {
    let s = cell.get_or_init(|| {
        let file = tempfile::tempfile().expect("scratch file");
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        Scratch { file, path }
    });
    s.file.set_len(0).expect("truncate the scratch file");
    (&s.file)
        .seek(SeekFrom::Start(0))
        .expect("rewind the scratch file");
    s
}

/// One page as a sink received it.
type Page = (u32, Vec<u8>);

/// A committed WAL transaction as the sink accepted it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WalTxn {
    frame: u32,
    db_pages: u32,
    pages: Vec<Page>,
}

struct WalRun {
    result: Result<u32, WalError>,
    txns: Vec<WalTxn>,
    /// Events the sink accepted.
    events: usize,
    cursor: WalCursor,
}

fn wal_file(data: &[u8]) {
    let s = scratch(&WAL_FILE);
    s.file.write_all_at(data, 0).expect("write the WAL");
    let header = match wal::header_of(&s.file, &s.path) {
        Ok(Some(h)) => h,
        Ok(None) => {
            assert!(data.len() < 32, "a whole header read as none");
            return;
        }
        Err(e) => {
            assert!(matches!(e, WalError::BadHeader { .. }), "{e}");
            return;
        }
    };
    let by_path = wal::read_header(&s.path).expect("read_header where header_of read one");
    assert_eq!(by_path, Some(header));
    assert!(header.page_size.is_power_of_two() && (512..=65536).contains(&header.page_size));

    let frames = header.frames_in(data.len() as u64);
    let whole = 32 + usize::try_from(u64::from(frames) * header.frame_len()).unwrap();
    let trailer = &data[whole..];
    assert!((trailer.len() as u64) < header.frame_len());
    let full = wal_scan(s, WalCursor::start(header), frames, None);

    if let Some(&b) = trailer.first() {
        let mid = u32::from(b) % (frames + 1);
        let first = wal_scan(s, WalCursor::start(header), mid, None);
        assert!(
            full.txns.starts_with(&first.txns),
            "a scan to frame {mid} committed what the full scan did not"
        );
        if let Ok(n) = first.result {
            let second = wal_scan(s, first.cursor, frames, None);
            let mut joined = first.txns;
            joined.extend(second.txns);
            assert_eq!(joined, full.txns, "scan resumed at frame {mid}");
            assert_eq!(second.cursor, full.cursor, "cursor after resuming at {mid}");
            match (&full.result, &second.result) {
                (Ok(all), Ok(rest)) => assert_eq!(*all, n + rest),
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
                (a, b) => panic!("one scan gave {a:?}, resumed at {mid}: {b:?}"),
            }
        }
    }
    if let Some(&refuse) = trailer.get(1) {
        let refuse = usize::from(refuse);
        let refused = wal_scan(s, WalCursor::start(header), frames, Some(refuse));
        assert!(full.txns.starts_with(&refused.txns));
        if full.events > refuse {
            assert!(
                matches!(refused.result, Err(WalError::Sink { .. })),
                "{:?}",
                refused.result
            );
            assert_eq!(refused.events, refuse);
        } else {
            assert_eq!(refused.txns, full.txns);
            assert_eq!(refused.cursor, full.cursor);
        }
    }
}

/// Scans to `end` (never beyond the file's whole frames), checking every event and the result;
/// with `refuse`, the sink fails that event (0-based).
fn wal_scan(s: &Scratch, start: WalCursor, end: u32, refuse: Option<usize>) -> WalRun {
    let page_size = start.header.page_size as usize;
    let mut cursor = start;
    let (mut txns, mut open, mut events) = (Vec::new(), Vec::<Page>::new(), 0);
    // The last accepted commit frame (the one before the cursor until then).
    let mut last = start.next_frame - 1;
    let result = wal::scan(&s.file, &s.path, &mut cursor, end, &mut |e| {
        if refuse == Some(events) {
            return Err("refused".to_string());
        }
        events += 1;
        match e {
            WalEvent::Page { pgno, data } => {
                assert!(pgno >= 1, "page number 0 handed on");
                assert_eq!(data.len(), page_size);
                open.push((pgno, data.to_vec()));
            }
            WalEvent::Commit { db_pages, frame } => {
                assert!(db_pages >= 1, "a commit frame with no database size");
                assert!(
                    last < frame && frame <= end,
                    "commit frame {frame} after {last}"
                );
                assert_eq!(
                    open.len() as u64,
                    u64::from(frame - last),
                    "one page per frame"
                );
                txns.push(WalTxn {
                    frame,
                    db_pages,
                    pages: std::mem::take(&mut open),
                });
                last = frame;
            }
        }
        Ok(())
    });
    assert_eq!(cursor.header, start.header);
    assert_eq!(
        cursor.next_frame,
        last + 1,
        "cursor not just after the last commit"
    );
    if txns.is_empty() {
        assert_eq!(cursor, start, "the cursor moved without a commit");
    }
    // Frames after the last commit that were handed on as pages.
    let pending = open.len() as u64;
    match &result {
        Ok(n) => {
            assert_eq!(*n as usize, txns.len());
            assert_eq!(pending, 0, "a successful scan ended inside a transaction");
            if end >= start.next_frame {
                assert_eq!(last, end, "a successful scan did not end at its bound");
            } else {
                assert_eq!(events, 0);
            }
        }
        Err(WalError::BadFrame { frame, .. }) => {
            assert!(last < *frame && *frame <= end, "{result:?}");
            assert_eq!(pending, u64::from(frame - last - 1), "{result:?}");
        }
        Err(WalError::NotACommit { frame, .. }) => {
            assert_eq!(*frame, end);
            assert_eq!(pending, u64::from(end - last));
        }
        Err(WalError::Sink { frame, .. }) => {
            assert!(refuse.is_some(), "{result:?}");
            assert!(last < *frame && *frame <= end, "{result:?}");
        }
        Err(e) => panic!("scanning whole frames 1..={end}: {e}"),
    }
    WalRun {
        result,
        txns,
        events,
        cursor,
    }
}

/// A committed segment transaction as the sink saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SegTxn {
    info: TxnInfo,
    pages: Vec<Page>,
}

/// Where a decoding sink answers [`Flow::Stop`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopAt {
    Never,
    Begin(u64),
    Commit(u64),
}

fn segment_bytes(data: &[u8]) {
    let mut head = [0u8; SEGMENT_HEADER_LEN];
    let n = data.len().min(head.len());
    head[..n].copy_from_slice(&data[..n]);
    let claimed = u32::from_be_bytes(head[8..12].try_into().unwrap());
    let valid = claimed.is_power_of_two() && (512..=65536).contains(&claimed);
    let expected = SegmentHeader {
        page_size: if valid { claimed } else { 512 },
        lineage: head[12..28].try_into().unwrap(),
        first_txid: u64::from_be_bytes(head[28..36].try_into().unwrap()),
    };
    let (result, _) = decode_all(data, expected, StopAt::Never);
    if !valid && data.len() >= 12 {
        assert!(
            matches!(result, Err(SegmentError::PageSize { .. })),
            "{result:?}"
        );
    }
}

/// Decodes, checking the events' order; returns the result and the committed transactions.
fn decode_all(
    bytes: &[u8],
    expected: SegmentHeader,
    stop: StopAt,
) -> (Result<Option<TxnInfo>, SegmentError>, Vec<SegTxn>) {
    let (mut txns, mut open) = (Vec::new(), None::<Vec<Page>>);
    let (mut next, mut stopped) = (expected.first_txid, false);
    let result = segment::decode(bytes, expected, &mut |e| {
        assert!(!stopped, "an event after Flow::Stop");
        match e {
            SegmentEvent::Begin { txid } => {
                assert!(open.is_none(), "a transaction began inside another");
                assert_eq!(txid, next, "transaction ids not contiguous");
                if stop == StopAt::Begin(txid) {
                    stopped = true;
                    return Ok(Flow::Stop);
                }
                open = Some(Vec::new());
            }
            SegmentEvent::Page { pgno, data } => {
                let pages = open.as_mut().expect("a page outside a transaction");
                assert!(pgno >= 1, "page number 0 handed on");
                assert_eq!(data.len(), expected.page_size as usize);
                pages.push((pgno, data.to_vec()));
            }
            SegmentEvent::Commit(info) => {
                let pages = open.take().expect("a commit outside a transaction");
                assert_eq!(info.txid, next, "commit of another transaction");
                next += 1;
                txns.push(SegTxn { info, pages });
                if stop == StopAt::Commit(info.txid) {
                    stopped = true;
                    return Ok(Flow::Stop);
                }
            }
        }
        Ok(Flow::Continue)
    });
    if let Ok(last) = &result {
        assert_eq!(
            *last,
            txns.last().map(|t| t.info),
            "returned another last commit"
        );
        assert!(open.is_none(), "decoding ended inside a transaction");
    }
    (result, txns)
}

/// A writer program, from the input's bytes (missing header bytes read as 0):
///
/// ```text
/// page_exp:u8 first_txid:u32 lineage:u8 flip:u16 mask:u8 cut:u16 stop:u8   then ops until the
/// input runs out: op%4 = 0|1: page pgno:u16 fill:u8 | 2: commit ns:i64 db_pages:u32 | 3: discard
/// ```
/// Page numbers are 1 + the u16 (SQLite has no page 0, and the WAL reader never hands one on).
#[derive(Debug)]
struct Program {
    header: SegmentHeader,
    /// Offset (modulo the segment's length) and xor mask of the flipped byte.
    flip: (usize, u8),
    /// Length (modulo the segment's) of the cut-short copy.
    cut: usize,
    /// Transaction (modulo their number + 1) to stop at; the high bit stops at its commit.
    stop: u8,
    ops: Vec<Op>,
}

#[derive(Debug)]
enum Op {
    Page(u32, u8),
    Commit(i64, u32),
    Discard,
}

impl Program {
    const HEADER: usize = 12;

    fn parse(data: &[u8]) -> Self {
        let mut head = [0u8; Self::HEADER];
        let n = data.len().min(Self::HEADER);
        head[..n].copy_from_slice(&data[..n]);
        let u16_at = |i: usize| usize::from(u16::from_be_bytes([head[i], head[i + 1]]));
        let header = SegmentHeader {
            page_size: 512 << (head[0] % 8),
            lineage: [head[5]; 16],
            first_txid: u64::from(u32::from_be_bytes(head[1..5].try_into().unwrap())),
        };
        let mut rest = &data[n..];
        let mut take = |len: usize| {
            let (bytes, tail) = rest.split_at_checked(len)?;
            rest = tail;
            Some(bytes)
        };
        let (mut ops, mut page_bytes) = (Vec::new(), 0);
        while let Some(&[op]) = take(1) {
            let op = match op % 4 {
                0 | 1 => {
                    let Some(&[a, b, fill]) = take(3) else { break };
                    page_bytes += header.page_size as usize;
                    if page_bytes > MAX_PROGRAM_PAGE_BYTES {
                        break;
                    }
                    Op::Page(u32::from(u16::from_be_bytes([a, b])) + 1, fill)
                }
                2 => {
                    let Some(b) = take(12) else { break };
                    Op::Commit(
                        i64::from_be_bytes(b[..8].try_into().unwrap()),
                        u32::from_be_bytes(b[8..].try_into().unwrap()),
                    )
                }
                _ => Op::Discard,
            };
            ops.push(op);
        }
        Self {
            header,
            flip: (u16_at(6), head[8]),
            cut: u16_at(9),
            stop: head[11],
            ops,
        }
    }
}

fn round_trip(data: &[u8]) {
    let p = Program::parse(data);
    let first = p.header.first_txid;
    let s = scratch(&SEGMENT_FILE);
    let file = s.file.try_clone().expect("dup the scratch file");
    let mut w = SegmentWriter::new(file, p.header).expect("segment header");
    assert_eq!(w.len(), SEGMENT_HEADER_LEN as u64);
    // What must decode; the byte offset after each commit record.
    let (mut model, mut open, mut ends) = (Vec::<SegTxn>::new(), Vec::new(), Vec::new());
    let mut committed_len = w.len();
    for op in &p.ops {
        match *op {
            Op::Page(pgno, fill) => {
                let page = vec![fill; p.header.page_size as usize];
                w.page(pgno, &page).expect("write a page");
                open.push((pgno, page));
            }
            Op::Commit(ns, db_pages) => {
                let info = w.commit(ns, db_pages).expect("write a commit");
                let want = TxnInfo {
                    txid: first + model.len() as u64,
                    committed_unix_ns: ns,
                    db_pages,
                };
                assert_eq!(info, want);
                let pages = std::mem::take(&mut open);
                model.push(SegTxn { info, pages });
                committed_len = w.len();
                ends.push(committed_len);
            }
            Op::Discard => {
                w.discard().expect("discard");
                open.clear();
                assert_eq!(w.len(), committed_len, "discard left bytes behind");
            }
        }
        assert_eq!(w.txns(), model.len() as u64);
        assert_eq!(w.next_txid(), first + model.len() as u64);
        assert_eq!(w.is_empty(), model.is_empty());
    }
    // An open transaction is dropped by finish.
    let mut file = w.finish().expect("finish");
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0)).expect("rewind");
    file.read_to_end(&mut bytes).expect("read the segment back");
    assert_eq!(bytes.len() as u64, committed_len + SEGMENT_END_LEN);

    let (result, txns) = decode_all(&bytes, p.header, StopAt::Never);
    assert_eq!(
        result.expect("decode what was written"),
        model.last().map(|t| t.info)
    );
    assert_eq!(
        txns, model,
        "decoded transactions differ from the written ones"
    );
    // Transactions whose records end at or before `offset`.
    let before = |offset: usize| ends.iter().filter(|&&e| e <= offset as u64).count();

    // One flipped byte: everything before it still commits, nothing from its transaction on.
    let (at, mask) = (p.flip.0 % bytes.len(), p.flip.1.max(1));
    let mut flipped = bytes.clone();
    flipped[at] ^= mask;
    let (result, txns) = decode_all(&flipped, p.header, StopAt::Never);
    assert!(result.is_err(), "byte {at} ^ {mask:#04x} went unnoticed");
    assert_eq!(txns, model[..before(at)], "byte {at} ^ {mask:#04x}");

    // Cut short: the transactions before the cut, and a truncation naming the last of them.
    let cut = p.cut % bytes.len();
    let (result, txns) = decode_all(&bytes[..cut], p.header, StopAt::Never);
    let k = before(cut);
    assert_eq!(txns, model[..k], "cut at {cut}");
    match result {
        Err(SegmentError::Truncated { last }) if cut >= SEGMENT_HEADER_LEN => {
            assert_eq!(last, (first + k as u64).saturating_sub(1), "cut at {cut}");
        }
        Err(_) if cut < SEGMENT_HEADER_LEN => {}
        other => panic!("cut at {cut} of {}: {other:?}", bytes.len()),
    }

    // Stopped at a transaction's begin (none of its pages) or its commit.
    let k = usize::from(p.stop & 0x7f) % (model.len() + 1);
    let (stop, upto) = if p.stop & 0x80 != 0 && k < model.len() {
        (StopAt::Commit(first + k as u64), k + 1)
    } else {
        (StopAt::Begin(first + k as u64), k)
    };
    let (result, txns) = decode_all(&bytes, p.header, stop);
    assert_eq!(
        result.expect("a stopped decode"),
        model[..upto].last().map(|t| t.info),
        "{stop:?}"
    );
    assert_eq!(txns, model[..upto], "{stop:?}");
}
