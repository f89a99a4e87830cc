//! WAL reading against WAL files written by SQLite itself.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rusqlite::Connection;

use super::*;

/// A database in WAL mode with autocheckpoint off, its WAL emptied and the database file copied
/// to `base` (what the WAL's frames apply to).
pub(crate) struct Db {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) path: PathBuf,
    pub(crate) wal: PathBuf,
    pub(crate) base: PathBuf,
    pub(crate) conn: Connection,
}

impl Db {
    pub(crate) fn new(page_size: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&format!(
            "PRAGMA page_size={page_size}; PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
             CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);"
        ))
        .unwrap();
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        let base = dir.path().join("base.db");
        fs::copy(&path, &base).unwrap();
        Self {
            wal: dir.path().join("app.db-wal"),
            base,
            path,
            conn,
            dir,
        }
    }

    /// Commits one transaction inserting `rows` rows of `size` bytes.
    pub(crate) fn commit(&self, rows: usize, size: usize) {
        self.conn.execute_batch("BEGIN").unwrap();
        for _ in 0..rows {
            self.conn
                .execute(
                    "INSERT INTO t(v) VALUES (randomblob(?1))",
                    [i64::try_from(size).unwrap()],
                )
                .unwrap();
        }
        self.conn.execute_batch("COMMIT").unwrap();
    }

    /// The frame count SQLite has published.
    pub(crate) fn published(&self) -> u32 {
        self.conn
            .query_row("PRAGMA wal_checkpoint(NOOP)", [], |r| r.get::<_, i64>(1))
            .map(|n| u32::try_from(n).unwrap())
            .unwrap()
    }

    pub(crate) fn rows(path: &Path) -> Vec<(i64, Vec<u8>)> {
        let c = Connection::open(path).unwrap();
        let ok: String = c
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok", "{}", path.display());
        let mut s = c.prepare("SELECT id, v FROM t ORDER BY id").unwrap();
        s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(std::result::Result::unwrap)
            .collect()
    }
}

/// Applies scanned transactions to a database file the way a restore does.
pub(crate) struct Apply {
    file: File,
    page_size: u64,
    pub(crate) pending: BTreeMap<u32, Vec<u8>>,
    /// Commit frame of each transaction applied.
    pub(crate) commits: Vec<u32>,
}

impl Apply {
    pub(crate) fn new(path: &Path, page_size: u32) -> Self {
        Self {
            file: OpenOptions::new().write(true).open(path).unwrap(),
            page_size: u64::from(page_size),
            pending: BTreeMap::new(),
            commits: Vec::new(),
        }
    }

    pub(crate) fn event(&mut self, e: WalEvent<'_>) -> std::result::Result<(), String> {
        match e {
            WalEvent::Page { pgno, data } => {
                self.pending.insert(pgno, data.to_vec());
            }
            WalEvent::Commit { db_pages, frame } => {
                for (pgno, data) in std::mem::take(&mut self.pending) {
                    self.file
                        .write_all_at(&data, u64::from(pgno - 1) * self.page_size)
                        .unwrap();
                }
                self.file
                    .set_len(u64::from(db_pages) * self.page_size)
                    .unwrap();
                self.commits.push(frame);
            }
        }
        Ok(())
    }
}

fn scan_all(db: &Db, cursor: &mut WalCursor, end: u32, apply: &mut Apply) -> Result<u32> {
    let file = File::open(&db.wal).unwrap();
    scan(&file, &db.wal, cursor, end, &mut |e| apply.event(e))
}

#[test]
fn replaying_what_sqlite_published_rebuilds_the_database_exactly() {
    for page_size in [4096, 8192, 512] {
        let db = Db::new(page_size);
        // Small rows, one row bigger than many pages, and a multi-row transaction.
        db.commit(1, 10);
        db.commit(1, 5 * page_size as usize);
        db.commit(50, 300);
        db.conn
            .execute("DELETE FROM t WHERE id % 3 = 0", [])
            .unwrap();
        db.commit(1, 10);
        let end = db.published();

        let header = read_header(&db.wal).unwrap().expect("a WAL header");
        assert_eq!(header.page_size, page_size);
        assert!(
            !header.big_endian,
            "x86/arm64 write little-endian checksums"
        );
        let mut cursor = WalCursor::start(header);
        let mut apply = Apply::new(&db.base, page_size);
        let txns = scan_all(&db, &mut cursor, end, &mut apply).unwrap();
        assert_eq!(txns, 5, "page size {page_size}");
        assert_eq!(cursor.next_frame, end + 1);
        assert_eq!(apply.commits.last(), Some(&end));
        assert_eq!(
            Db::rows(&db.base),
            Db::rows(&db.path),
            "page size {page_size}"
        );
    }
}

#[test]
fn a_scan_resumes_from_its_cursor_and_only_reads_whole_transactions() {
    let db = Db::new(4096);
    db.commit(1, 100);
    let first_end = db.published();
    db.commit(1, 20_000);
    db.commit(3, 100);
    let end = db.published();

    let header = read_header(&db.wal).unwrap().unwrap();
    let mut cursor = WalCursor::start(header);
    let mut apply = Apply::new(&db.base, 4096);
    assert_eq!(
        scan_all(&db, &mut cursor, first_end, &mut apply).unwrap(),
        1
    );
    assert_eq!(cursor.next_frame, first_end + 1);
    // Nothing new: a scan to the same bound reads nothing.
    assert_eq!(
        scan_all(&db, &mut cursor, first_end, &mut apply).unwrap(),
        0
    );
    assert_eq!(scan_all(&db, &mut cursor, end, &mut apply).unwrap(), 2);
    assert_eq!(Db::rows(&db.base), Db::rows(&db.path));

    // A bound inside the multi-page transaction is refused, and the cursor stays at its start.
    let mut cursor = WalCursor::start(header);
    let mut apply = Apply::new(&db.base, 4096);
    let err = scan_all(&db, &mut cursor, first_end + 2, &mut apply).unwrap_err();
    assert!(
        matches!(err, WalError::NotACommit { frame, .. } if frame == first_end + 2),
        "{err}"
    );
    assert_eq!(cursor.next_frame, first_end + 1);
    let err = scan_all(&db, &mut cursor, end + 100, &mut apply).unwrap_err();
    assert!(matches!(err, WalError::Short { .. }), "{err}");
}

#[test]
fn a_damaged_or_foreign_frame_is_named_and_stops_the_scan_before_its_commit() {
    let db = Db::new(4096);
    db.commit(1, 100);
    db.commit(1, 20_000);
    let end = db.published();
    let header = read_header(&db.wal).unwrap().unwrap();
    let frame_offset = |frame: u32| HEADER_LEN + u64::from(frame - 1) * header.frame_len();
    let wal = OpenOptions::new().write(true).open(&db.wal).unwrap();

    // One flipped byte in the page of frame 3 (inside the second transaction).
    let original = fs::read(&db.wal).unwrap();
    wal.write_all_at(&[0xff], frame_offset(3) + FRAME_HEADER_LEN + 100)
        .unwrap();
    let mut cursor = WalCursor::start(header);
    let mut apply = Apply::new(&db.base, 4096);
    let err = scan_all(&db, &mut cursor, end, &mut apply).unwrap_err();
    assert!(matches!(err, WalError::BadFrame { frame: 3, .. }), "{err}");
    assert!(err.to_string().contains("app.db-wal"), "{err}");
    assert_eq!(
        apply.commits,
        vec![1],
        "only the first transaction committed"
    );
    assert_eq!(cursor.next_frame, 2);

    // A frame of an older WAL lifetime (other salts) is not part of this one.
    wal.write_all_at(&original, 0).unwrap();
    wal.write_all_at(&[0xab], frame_offset(2) + 8).unwrap();
    let mut cursor = WalCursor::start(header);
    let err = scan_all(&db, &mut cursor, end, &mut Apply::new(&db.base, 4096)).unwrap_err();
    assert!(
        matches!(&err, WalError::BadFrame { frame: 2, reason, .. } if reason.contains("salts")),
        "{err}"
    );
}

#[test]
fn headers_are_verified_and_a_missing_or_empty_wal_has_none() {
    let db = Db::new(4096);
    assert_eq!(read_header(&db.wal).unwrap(), None, "truncated WAL");
    assert_eq!(read_header(&db.path.with_extension("nope")).unwrap(), None);
    db.commit(1, 1);
    let mut bytes: [u8; 32] = fs::read(&db.wal).unwrap()[..32].try_into().unwrap();
    let good = WalHeader::parse(&bytes, &db.wal).unwrap();
    assert_eq!(
        good.frames_in(fs::metadata(&db.wal).unwrap().len()),
        db.published()
    );

    bytes[19] ^= 1; // salt-1
    let err = WalHeader::parse(&bytes, &db.wal).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    bytes[19] ^= 1;
    bytes[3] = 0x99;
    let err = WalHeader::parse(&bytes, &db.wal).unwrap_err();
    assert!(err.to_string().contains("magic"), "{err}");
}

#[test]
fn big_endian_checksums_follow_the_magic() {
    // A header written by a big-endian host: same fields, magic 0x377f0683, checksum over
    // big-endian words.
    let mut bytes = [0u8; 32];
    for (i, w) in [0x377f_0683u32, 3_007_000, 4096, 7, 0x1234_5678, 0x9abc_def0]
        .into_iter()
        .enumerate()
    {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
    }
    let (a, b) = wal_checksum((0, 0), &bytes[..24], true);
    bytes[24..28].copy_from_slice(&a.to_be_bytes());
    bytes[28..32].copy_from_slice(&b.to_be_bytes());
    let h = WalHeader::parse(&bytes, Path::new("be-wal")).unwrap();
    assert!(h.big_endian);
    assert_eq!((h.checkpoint_seq, h.salt), (7, (0x1234_5678, 0x9abc_def0)));
    assert_ne!(
        wal_checksum((0, 0), &bytes[..24], false),
        (a, b),
        "the byte order matters"
    );
}
