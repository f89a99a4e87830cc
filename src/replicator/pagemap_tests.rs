use super::*;
use crate::replicator::apply::PageFile;

const PS: u32 = 512;

fn gen_id(n: u8) -> String {
    format!("{:032x}", u128::from(n) + 0xabc0)
}

fn page(fill: u32) -> Vec<u8> {
    (0..PS).map(|i| (i.wrapping_mul(31) ^ fill) as u8).collect()
}

/// A database being restored and the map following it, changed the same way; the pages also
/// go into a segment file, as the engine writes them.
struct Twin {
    file: PageFile,
    path: PathBuf,
    map: PageMap,
    spool: PathBuf,
}

/// Appends a page to a segment file; returns where its data is.
fn spool_page(spool: &Path, data: &[u8]) -> u64 {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(spool)
        .unwrap();
    let offset = f.metadata().unwrap().len() + 5;
    f.write_all(b"P1234").unwrap();
    f.write_all(data).unwrap();
    offset
}

impl Twin {
    fn new(dir: &Path, pages: u32) -> Self {
        let path = dir.join("restored.db");
        let mut file = PageFile::create(&path, PS).unwrap();
        for p in 1..=pages {
            file.page(p, &page(p)).unwrap();
        }
        file.commit(pages).unwrap();
        let hashes = hash_file(&path, PS).unwrap();
        let root = Root {
            txid: 0,
            delta: false,
        };
        let map = PageMap::create(dir, &gen_id(1), root, 0, PS, hashes).unwrap();
        let spool = dir.join("segment");
        Self {
            file,
            path,
            map,
            spool,
        }
    }

    fn txn(&mut self, writes: &[(u32, u32)], db_pages: u32) {
        for &(pgno, fill) in writes {
            self.file.page(pgno, &page(fill)).unwrap();
            let offset = spool_page(&self.spool, &page(fill));
            self.map.page(pgno, offset);
        }
        self.file.commit(db_pages).unwrap();
        self.map.commit(db_pages);
    }

    fn seal(&mut self, first: u64, last: u64) {
        self.map.seal(first, last, &self.spool).unwrap();
        std::fs::remove_file(&self.spool).ok();
    }

    fn on_disk(&self) -> Vec<PageHash> {
        hash_file(&self.path, PS).unwrap()
    }
}

#[test]
fn the_map_follows_what_a_restore_builds_through_growth_shrinking_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Twin::new(dir.path(), 8);
    // Overwrite, write past the end (a hole of zeros before it), shrink, grow back unwritten;
    // a page rewritten, cut off and written again within one segment.
    t.txn(&[(2, 100), (12, 101)], 12);
    t.txn(&[(3, 102), (2, 105)], 12);
    t.seal(1, 2);
    t.txn(&[(1, 103), (7, 106)], 5);
    t.txn(&[(9, 104)], 10);
    t.txn(&[(7, 107), (7, 108)], 11);
    t.seal(3, 5);
    assert_eq!(t.map.hashes(), t.on_disk().as_slice());
    assert_eq!(t.map.hashes()[5], hash_page(6, &[0u8; PS as usize]));

    let loaded = PageMap::load(dir.path(), &gen_id(1), 5, PS).expect("loads at 5");
    assert_eq!(loaded.hashes(), t.on_disk().as_slice());
    assert_eq!(loaded.txid(), 5);
}

#[test]
fn a_map_is_used_only_at_exactly_the_saved_transaction_and_drops_records_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Twin::new(dir.path(), 4);
    t.txn(&[(1, 1)], 4);
    t.seal(1, 1);
    let at_one = t.on_disk();
    t.txn(&[(2, 2)], 4);
    t.txn(&[(3, 3)], 4);
    t.seal(2, 3);

    assert!(
        PageMap::load(dir.path(), &gen_id(1), 2, PS).is_none(),
        "2 is inside a record"
    );
    assert!(
        PageMap::load(dir.path(), &gen_id(1), 4, PS).is_none(),
        "4 was never reached"
    );
    assert!(
        PageMap::load(dir.path(), &gen_id(2), 3, PS).is_none(),
        "another generation"
    );
    assert!(
        PageMap::load(dir.path(), &gen_id(1), 3, 1024).is_none(),
        "another page size"
    );

    // The state was saved at 1 (the segment 2..=3 was cut after it): the record goes, and the
    // log goes on from 1.
    let mut m = PageMap::load(dir.path(), &gen_id(1), 1, PS).expect("loads at 1");
    assert_eq!(m.hashes(), at_one.as_slice());
    let spool = dir.path().join("segment2");
    let offset = spool_page(&spool, &page(44));
    m.page(4, offset);
    m.commit(4);
    m.seal(2, 2, &spool).unwrap();
    let m = PageMap::load(dir.path(), &gen_id(1), 2, PS).expect("loads at 2");
    let mut want = at_one;
    want[3] = hash_page(4, &page(44));
    assert_eq!(m.hashes(), want.as_slice());
}

#[test]
fn cut_transactions_and_dropped_segments_leave_the_map_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Twin::new(dir.path(), 4);
    let before = t.on_disk();
    let offset = spool_page(&t.spool, &page(9));
    t.map.page(2, offset);
    t.map.discard_txn();
    t.map.page(3, offset);
    t.map.commit(4);
    t.map.discard_segment();
    t.seal(1, 1);
    assert_eq!(t.map.hashes(), before.as_slice());
    // A segment that does not follow the map is refused.
    assert!(matches!(
        t.map.seal(5, 5, &t.spool),
        Err(PageMapError::OutOfStep {
            at: 1,
            first: 5,
            ..
        })
    ));
}

#[test]
fn damaged_files_are_not_used() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Twin::new(dir.path(), 4);
    t.txn(&[(1, 1)], 4);
    t.seal(1, 1);
    t.txn(&[(2, 2)], 4);
    t.seal(2, 2);
    let log = dir.path().join(LOG_FILE);
    let mut bytes = std::fs::read(&log).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 1;
    std::fs::write(&log, &bytes).unwrap();
    assert!(PageMap::load(dir.path(), &gen_id(1), 2, PS).is_none());
    assert!(
        PageMap::load(dir.path(), &gen_id(1), 1, PS).is_some(),
        "the intact record"
    );

    let base = dir.path().join(BASE_FILE);
    let mut bytes = std::fs::read(&base).unwrap();
    bytes[60] ^= 1;
    std::fs::write(&base, &bytes).unwrap();
    assert!(PageMap::load(dir.path(), &gen_id(1), 0, PS).is_none());
}

#[test]
fn folding_rewrites_the_base_and_empties_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Twin::new(dir.path(), 4);
    t.txn(&[(6, 6)], 6);
    t.seal(1, 1);
    t.map.fold().unwrap();
    let log_len = std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len();
    assert_eq!(log_len, LOG_HEADER as u64);
    let m = PageMap::load(dir.path(), &gen_id(1), 1, PS).expect("loads after a fold");
    assert_eq!(m.hashes(), t.on_disk().as_slice());
    assert!(
        PageMap::load(dir.path(), &gen_id(1), 0, PS).is_none(),
        "the base moved on"
    );
}

#[test]
fn page_one_is_compared_without_the_bytes_a_snapshot_rewrites() {
    let mut p1 = page(1);
    let before = hash_page(1, &p1);
    p1[24..28].copy_from_slice(&[9, 9, 9, 9]);
    p1[92..100].copy_from_slice(&[7; 8]);
    assert_eq!(hash_page(1, &p1), before);
    assert_ne!(hash_page(2, &p1), hash_page(2, &page(1)));
    p1[28] ^= 1;
    assert_ne!(hash_page(1, &p1), before);
}

#[test]
fn changed_lists_page_one_new_pages_and_differences() {
    let dir = tempfile::tempdir().unwrap();
    let t = Twin::new(dir.path(), 4);
    let mut new = t.on_disk();
    assert_eq!(t.map.changed(&new), vec![1]);
    new[2] = hash_page(3, &page(77));
    new.push(hash_page(5, &page(78)));
    assert_eq!(t.map.changed(&new), vec![1, 3, 5]);
    new.truncate(2);
    assert_eq!(t.map.changed(&new), vec![1]);
}
