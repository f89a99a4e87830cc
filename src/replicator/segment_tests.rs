//! Segment encoding: round trip, cut-off transactions, and every kind of damage named.

use std::fs;

use super::*;

const PS: u32 = 512;

fn header(first_txid: u64) -> SegmentHeader {
    SegmentHeader {
        page_size: PS,
        lineage: [7; 16],
        first_txid,
    }
}

fn page(fill: u8) -> Vec<u8> {
    vec![fill; PS as usize]
}

/// Writes transactions of (pgno, fill) pages; returns the segment's bytes.
fn segment(first: u64, txns: &[&[(u32, u8)]]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seg");
    let mut w = SegmentWriter::new(File::create(&path).unwrap(), header(first)).unwrap();
    for (i, pages) in txns.iter().enumerate() {
        for (pgno, fill) in *pages {
            w.page(*pgno, &page(*fill)).unwrap();
        }
        w.commit(1_000 + i as i64, 10 + i as u32).unwrap();
    }
    w.finish().unwrap();
    fs::read(path).unwrap()
}

/// A committed transaction and its pages as (pgno, fill byte).
type Decoded = (TxnInfo, Vec<(u32, u8)>);

/// Decodes into (txid, committed, db_pages, pages) per committed transaction.
fn read_all(bytes: &[u8], expected: SegmentHeader) -> (Result<Option<TxnInfo>>, Vec<Decoded>) {
    let mut out = Vec::new();
    let mut pages = Vec::new();
    let r = decode(bytes, expected, &mut |e| {
        match e {
            SegmentEvent::Begin { .. } => pages.clear(),
            SegmentEvent::Page { pgno, data } => pages.push((pgno, data[0])),
            SegmentEvent::Commit(info) => out.push((info, std::mem::take(&mut pages))),
        }
        Ok(Flow::Continue)
    });
    (r, out)
}

#[test]
fn transactions_round_trip_with_their_pages_times_and_sizes() {
    let bytes = segment(41, &[&[(1, 1), (2, 2), (1, 3)], &[(5, 5)], &[]]);
    let (r, txns) = read_all(&bytes, header(41));
    assert_eq!(r.unwrap().unwrap().txid, 43);
    assert_eq!(txns.len(), 3);
    assert_eq!(
        txns[0],
        (
            TxnInfo {
                txid: 41,
                committed_unix_ns: 1000,
                db_pages: 10
            },
            vec![(1, 1), (2, 2), (1, 3)]
        )
    );
    assert_eq!(txns[1].1, vec![(5, 5)]);
    assert!(txns[2].1.is_empty());
}

#[test]
fn a_discarded_transaction_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seg");
    let mut w = SegmentWriter::new(File::create(&path).unwrap(), header(1)).unwrap();
    w.page(1, &page(1)).unwrap();
    w.commit(5, 1).unwrap();
    let after_first = w.len();
    w.page(2, &page(2)).unwrap();
    w.page(3, &page(3)).unwrap();
    w.discard().unwrap();
    assert_eq!(w.len(), after_first);
    w.page(4, &page(4)).unwrap();
    w.commit(6, 4).unwrap();
    w.page(9, &page(9)).unwrap(); // open at finish: dropped
    w.finish().unwrap();
    let (r, txns) = read_all(&fs::read(&path).unwrap(), header(1));
    assert_eq!(r.unwrap().unwrap().txid, 2);
    assert_eq!(txns[1].1, vec![(4, 4)]);
    assert_eq!(txns.len(), 2);
}

#[test]
fn stopping_at_a_transaction_reads_none_of_its_pages() {
    let bytes = segment(1, &[&[(1, 1)], &[(2, 2)], &[(3, 3)]]);
    let mut seen = Vec::new();
    let last = decode(&bytes[..], header(1), &mut |e| {
        Ok(match e {
            SegmentEvent::Begin { txid: 3 } => Flow::Stop,
            SegmentEvent::Page { pgno, .. } => {
                seen.push(pgno);
                Flow::Continue
            }
            _ => Flow::Continue,
        })
    })
    .unwrap();
    assert_eq!(last.unwrap().txid, 2);
    assert_eq!(seen, vec![1, 2]);
}

#[test]
fn damage_is_detected_and_named() {
    let bytes = segment(1, &[&[(1, 1)], &[(2, 2)]]);

    // A flipped byte in the second transaction's page: the first still applies, the second not.
    let mut bad = bytes.clone();
    let at = bad.len() - 60;
    bad[at] ^= 0x40;
    let (r, txns) = read_all(&bad, header(1));
    let err = r.unwrap_err();
    assert!(
        matches!(&err, SegmentError::Corrupt { txid: 2, .. }),
        "{err}"
    );
    assert_eq!(txns.len(), 1);

    // Cut anywhere: truncated, naming the last whole transaction.
    for cut in [bytes.len() - 1, bytes.len() - 33, 40] {
        let (r, _) = read_all(&bytes[..cut], header(1));
        let err = r.unwrap_err();
        assert!(
            matches!(err, SegmentError::Truncated { .. }),
            "cut {cut}: {err}"
        );
    }

    // Another lineage, page size, or a gap before it.
    let (r, _) = read_all(
        &bytes,
        SegmentHeader {
            lineage: [8; 16],
            ..header(1)
        },
    );
    assert!(matches!(r.unwrap_err(), SegmentError::Lineage { .. }));
    let (r, _) = read_all(
        &bytes,
        SegmentHeader {
            page_size: 1024,
            ..header(1)
        },
    );
    assert!(matches!(r.unwrap_err(), SegmentError::PageSize { .. }));
    let (r, _) = read_all(&bytes, header(2));
    let err = r.unwrap_err();
    assert!(err.to_string().contains("expected 2"), "{err}");
    let (r, _) = read_all(b"not a segment at all", header(1));
    assert!(matches!(r.unwrap_err(), SegmentError::Magic(_)));
}
