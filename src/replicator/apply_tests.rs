//! WAL → segment → restored database, with SQLite producing the WAL and checking the result.

use std::fs;
use std::io::Read;

use super::*;
use crate::replicator::segment::{self, Flow, SegmentEvent, SegmentHeader, SegmentWriter};
use crate::replicator::wal::tests::Db;
use crate::replicator::wal::{self, WalCursor, WalEvent};

const PS: u32 = 4096;

fn header() -> SegmentHeader {
    SegmentHeader {
        page_size: PS,
        lineage: [1; 16],
        first_txid: 1,
    }
}

/// Ships the WAL up to the published end into a segment (commit time = txid, for the test).
fn ship(db: &Db) -> Vec<u8> {
    let end = db.published();
    let h = wal::read_header(&db.wal).unwrap().unwrap();
    let mut cursor = WalCursor::start(h);
    let spool = db.dir.path().join("segment.spool");
    let mut w = SegmentWriter::new(File::create(&spool).unwrap(), header()).unwrap();
    let file = File::open(&db.wal).unwrap();
    wal::scan(&file, &db.wal, &mut cursor, end, &mut |e| {
        match e {
            WalEvent::Page { pgno, data } => w.page(pgno, data).map(drop),
            WalEvent::Commit { db_pages, .. } => {
                let txid = w.next_txid();
                w.commit(i64::try_from(txid).unwrap(), db_pages).map(|_| ())
            }
        }
        .map_err(|e| e.to_string())
    })
    .unwrap();
    w.finish().unwrap();
    fs::read(spool).unwrap()
}

/// Restores base + segment up to `last_txid` (all when `None`) into `dest`.
fn restore(
    db: &Db,
    seg: &[u8],
    last_txid: Option<u64>,
    dest: &Path,
) -> std::result::Result<(), String> {
    let tmp = dest.with_extension("restore-tmp");
    let mut out = PageFile::create(&tmp, PS).map_err(|e| e.to_string())?;
    let mut base = Vec::new();
    File::open(&db.base)
        .unwrap()
        .read_to_end(&mut base)
        .unwrap();
    for (i, page) in base.chunks(PS as usize).enumerate() {
        out.page(u32::try_from(i + 1).unwrap(), page).unwrap();
    }
    out.commit(u32::try_from(base.len() / PS as usize).unwrap())
        .unwrap();
    let mut failed = None;
    let decoded = segment::decode(seg, header(), &mut |e| {
        let r = match e {
            SegmentEvent::Begin { txid } if last_txid.is_some_and(|l| txid > l) => {
                return Ok(Flow::Stop);
            }
            SegmentEvent::Begin { .. } => Ok(()),
            SegmentEvent::Page { pgno, data } => out.page(pgno, data),
            SegmentEvent::Commit(info) => out.commit(info.db_pages),
        };
        r.map(|()| Flow::Continue).map_err(|e| {
            failed = Some(e.to_string());
            e.to_string()
        })
    });
    if let Err(e) = decoded {
        let _ = fs::remove_file(&tmp);
        return Err(e.to_string());
    }
    assert!(failed.is_none());
    out.install(dest, true, false).map_err(|e| e.to_string())
}

#[test]
fn a_restore_equals_the_source_at_the_end_and_at_every_transaction() {
    let db = Db::new(PS);
    let mut states = vec![Db::rows(&db.path)];
    for (rows, size) in [(1, 10), (1, 30_000), (20, 500), (1, 10)] {
        db.commit(rows, size);
        states.push(Db::rows(&db.path));
    }
    db.conn.execute("DELETE FROM t WHERE id < 10", []).unwrap();
    db.conn.execute_batch("VACUUM").unwrap();
    states.push(Db::rows(&db.path));
    let seg = ship(&db);

    let out = db.dir.path().join("restored.db");
    restore(&db, &seg, None, &out).unwrap();
    assert_eq!(Db::rows(&out), *states.last().unwrap());
    let mode: String = rusqlite::Connection::open(&out)
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");

    for (txid, state) in states.iter().enumerate() {
        let out = db.dir.path().join(format!("at-{txid}.db"));
        restore(&db, &seg, Some(txid as u64), &out).unwrap();
        assert_eq!(Db::rows(&out), *state, "as of transaction {txid}");
    }
}

#[test]
fn a_damaged_segment_or_an_existing_target_leaves_the_target_alone() {
    let db = Db::new(PS);
    db.commit(3, 100);
    db.commit(1, 9000);
    let mut seg = ship(&db);
    let out = db.dir.path().join("restored.db");

    let at = seg.len() - 100;
    seg[at] ^= 1;
    let err = restore(&db, &seg, None, &out).unwrap_err();
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(!out.exists(), "nothing installed");
    assert!(!out.with_extension("restore-tmp").exists());
    seg[at] ^= 1;

    fs::write(&out, b"the app's own data").unwrap();
    let err = restore(&db, &seg, None, &out).unwrap_err();
    assert!(err.contains("refuses to overwrite"), "{err}");
    assert_eq!(fs::read(&out).unwrap(), b"the app's own data");
}

#[test]
fn a_database_sqlite_finds_corrupt_is_refused_naming_it() {
    let db = Db::new(PS);
    db.commit(200, 100);
    let dir = db.dir.path();
    let tmp = dir.join("x.restore-tmp");
    let mut out = PageFile::create(&tmp, PS).unwrap();
    let source = fs::read(&db.base).unwrap();
    let pages = source.len() / PS as usize;
    for (i, page) in source.chunks(PS as usize).enumerate() {
        out.page(u32::try_from(i + 1).unwrap(), page).unwrap();
    }
    // The table's root page overwritten with garbage.
    out.page(2, &vec![0x5a; PS as usize]).unwrap();
    out.commit(u32::try_from(pages).unwrap()).unwrap();
    let err = out.install(&dir.join("x.db"), true, false).unwrap_err();
    assert!(
        matches!(
            &err,
            ApplyError::Integrity { .. } | ApplyError::Sqlite { .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("x.restore-tmp"), "{err}");
    assert!(!dir.join("x.db").exists());
    assert!(!tmp.exists(), "the temporary file is removed");
}
