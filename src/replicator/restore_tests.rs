//! Restores from a store built by hand out of real WALs: a base snapshot, segments shipped from
//! SQLite's own WAL, later snapshots taken with the backup API and index chunks, all in a
//! `LocalStore`; SQLite checks every result.

use std::fs;
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;

use std::fs::File;

use sha2::{Digest, Sha256};

use super::*;
use crate::replicator::manifest::Snapshot;
use crate::replicator::segment::{SegmentHeader, SegmentWriter};
use crate::replicator::wal::tests::Db;
use crate::replicator::wal::{self, WalCursor, WalEvent};
use crate::store::{LocalStore, PutCondition};

const PS: u32 = 4096;

type Rows = Vec<(i64, Vec<u8>)>;

/// The fixture's segments; each statement is one transaction (txids 1..=11).
const SEGMENTS: &[&[&str]] = &[
    &[
        "INSERT INTO t(v) VALUES (randomblob(10)), (randomblob(20)), (randomblob(30))",
        "INSERT INTO t(v) VALUES (randomblob(30000))",
    ],
    &[
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20)
         INSERT INTO t(v) SELECT randomblob(3000) FROM c",
        "UPDATE t SET v = randomblob(3000) WHERE id > 4",
    ],
    &[
        "INSERT INTO t(v) VALUES (randomblob(10))",
        "UPDATE t SET v = randomblob(3000) WHERE id > 4",
    ],
    &[
        "INSERT INTO t(v) VALUES (randomblob(200)), (randomblob(200))",
        "DELETE FROM t WHERE id < 4",
    ],
    &[
        "INSERT INTO t(v) VALUES (randomblob(50))",
        "VACUUM",
        "INSERT INTO t(v) VALUES (randomblob(60))",
    ],
];
const LAST: u64 = 11;
/// Snapshots besides the base: one at a segment boundary, one inside the last segment (9..=11).
const SNAPSHOTS: [u64; 2] = [6, 10];
/// Segments moved into index chunks (1..=4 and 5..=8); the last stays in the manifest.
const CHUNKED: [Range<usize>; 2] = [0..2, 2..4];

/// Commit time of a transaction (the base snapshot's for 0).
fn time(txid: u64) -> i64 {
    1_000_000 + i64::try_from(txid).unwrap() * 1000
}

struct Fixture {
    db: Db,
    _store_dir: tempfile::TempDir,
    /// The local store's directory (to damage objects).
    objects: PathBuf,
    store: Arc<dyn ObjectStore>,
    manifest: Manifest,
    /// The source's rows after each transaction (index: txid).
    states: Vec<Rows>,
    /// Every segment, oldest first.
    segments: Vec<SegmentEntry>,
    /// Where restores download.
    work: PathBuf,
}

impl Fixture {
    /// The manifest's page size stays [`PS`]; the generation's is `page_size`.
    async fn new(page_size: u32) -> Self {
        let db = Db::new(page_size);
        let store_dir = tempfile::tempdir().unwrap();
        let local = LocalStore::new(store_dir.path(), "sqlite/app").unwrap();
        let objects = local.base().to_path_buf();
        let store: Arc<dyn ObjectStore> = Arc::new(local);
        let id = manifest::new_generation_id();

        let mut states = vec![Db::rows(&db.base)];
        let base = fs::read(&db.base).unwrap();
        let mut snapshots = vec![put_snapshot(&*store, &id, 0, &base, page_size).await];
        let (mut cursor, mut segments, mut txid) = (None, Vec::new(), 0);
        for statements in SEGMENTS {
            let first = txid + 1;
            for sql in *statements {
                db.conn.execute_batch(sql).unwrap();
                txid += 1;
                states.push(Db::rows(&db.path));
                if SNAPSHOTS.contains(&txid) {
                    let copy = db.dir.path().join(format!("snapshot-{txid}.db"));
                    let mut out = rusqlite::Connection::open(&copy).unwrap();
                    rusqlite::backup::Backup::new(&db.conn, &mut out)
                        .unwrap()
                        .step(-1)
                        .unwrap();
                    drop(out);
                    let bytes = fs::read(&copy).unwrap();
                    snapshots.push(put_snapshot(&*store, &id, txid, &bytes, page_size).await);
                }
            }
            let data = zstd::encode_all(
                &ship(&db, &mut cursor, &id, first, statements.len(), page_size)[..],
                3,
            )
            .unwrap();
            segments.push(SegmentEntry {
                first,
                last: txid,
                last_unix_ns: time(txid),
                size: data.len() as u64,
            });
            put(&*store, &manifest::segment_key(&id, first, txid), data).await;
        }
        assert_eq!(txid, LAST);

        let mut g = Generation {
            id: id.clone(),
            created_unix_ms: 1,
            page_size,
            reason: "test".into(),
            snapshots,
            chunks: Vec::new(),
            segments: segments[CHUNKED[1].end..].to_vec(),
        };
        for range in CHUNKED {
            let entries = segments[range].to_vec();
            let last = entries[entries.len() - 1];
            let chunk = ChunkRef {
                first: entries[0].first,
                last: last.last,
                last_unix_ns: last.last_unix_ns,
            };
            let index = serde_json::to_vec(&IndexChunk { segments: entries }).unwrap();
            put(&*store, &manifest::chunk_key(&id, chunk.first), index).await;
            g.chunks.push(chunk);
        }
        let mut manifest = Manifest::new("app", PS);
        manifest.generations.push(g);
        let manifest = Manifest::parse(&manifest.to_bytes(), MANIFEST_KEY).unwrap();
        put(&*store, MANIFEST_KEY, manifest.to_bytes()).await;
        Self {
            work: db.dir.path().join("work"),
            db,
            _store_dir: store_dir,
            objects,
            store,
            manifest,
            states,
            segments,
        }
    }

    fn generation(&self) -> &Generation {
        &self.manifest.generations[0]
    }

    fn snapshot(&self, txid: u64) -> &Snapshot {
        self.generation()
            .snapshots
            .iter()
            .find(|s| s.txid == txid)
            .unwrap()
    }

    fn segment_key(&self, i: usize) -> String {
        let e = self.segments[i];
        manifest::segment_key(&self.generation().id, e.first, e.last)
    }

    fn chunk_key(&self, i: usize) -> String {
        manifest::chunk_key(&self.generation().id, self.generation().chunks[i].first)
    }

    fn chunk_bytes(&self, i: usize) -> u64 {
        fs::metadata(self.objects.join(self.chunk_key(i)))
            .unwrap()
            .len()
    }

    async fn restore(&self, target: Target, dest: &Path) -> Result<Restored> {
        let opts = RestoreOptions {
            target,
            ..RestoreOptions::default()
        };
        restore(self.store.clone(), &self.manifest, dest, &self.work, &opts).await
    }

    /// The restore must have left no file of its own: next to `dest` or in the work directory.
    fn assert_nothing_left(&self, out: &Path) {
        let left: Vec<_> = fs::read_dir(out).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        if self.work.exists() {
            let left: Vec<_> = fs::read_dir(&self.work).unwrap().collect();
            assert!(left.is_empty(), "{left:?}");
        }
    }
}

async fn put(store: &dyn ObjectStore, key: &str, data: Vec<u8>) {
    store
        .put_bytes(key, data, PutCondition::None)
        .await
        .unwrap();
}

async fn put_snapshot(
    store: &dyn ObjectStore,
    id: &str,
    txid: u64,
    db: &[u8],
    page_size: u32,
) -> Snapshot {
    let data = zstd::encode_all(db, 3).unwrap();
    let snapshot = Snapshot {
        txid,
        committed_unix_ns: time(txid),
        db_pages: u32::try_from(db.len() / page_size as usize).unwrap(),
        size: data.len() as u64,
        sha256: hex::encode(Sha256::digest(&data)),
        parent: None,
    };
    put(store, &manifest::snapshot_key(id, txid), data).await;
    snapshot
}

/// Ships the WAL from `cursor` to its published end as one segment starting at `first`.
fn ship(
    db: &Db,
    cursor: &mut Option<WalCursor>,
    id: &str,
    first: u64,
    txns: usize,
    page_size: u32,
) -> Vec<u8> {
    let end = db.published();
    let cursor =
        cursor.get_or_insert_with(|| WalCursor::start(wal::read_header(&db.wal).unwrap().unwrap()));
    let spool = db.dir.path().join(format!("segment-{first}.spool"));
    let header = SegmentHeader {
        page_size,
        lineage: manifest::lineage(id),
        first_txid: first,
    };
    let mut w = SegmentWriter::new(File::create(&spool).unwrap(), header).unwrap();
    let wal_file = File::open(&db.wal).unwrap();
    let shipped = wal::scan(&wal_file, &db.wal, cursor, end, &mut |e| {
        match e {
            WalEvent::Page { pgno, data } => w.page(pgno, data).map(drop),
            WalEvent::Commit { db_pages, .. } => {
                w.commit(time(w.next_txid()), db_pages).map(|_| ())
            }
        }
        .map_err(|e| e.to_string())
    })
    .unwrap();
    assert_eq!(shipped as usize, txns, "one transaction per statement");
    w.finish().unwrap();
    fs::read(spool).unwrap()
}

fn flip(path: &Path, at: usize) {
    let mut bytes = fs::read(path).unwrap();
    bytes[at] ^= 0x40;
    fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn the_latest_state_is_restored_from_the_closest_snapshot() {
    let f = Fixture::new(PS).await;
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("app.db");
    let restored = f.restore(Target::Latest, &dest).await.unwrap();

    assert_eq!(Db::rows(&dest), Db::rows(&f.db.path));
    assert_eq!(Db::rows(&dest), f.states[LAST as usize]);
    let source_pages: u32 =
        f.db.conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
    // The snapshot at 10 lies inside the last segment (9..=11): 9 and 10 are skipped.
    let expected_bytes = f.snapshot(10).size + f.segments[4].size;
    assert_eq!(
        restored,
        Restored {
            generation: f.generation().id.clone(),
            txid: LAST,
            committed_unix_ns: time(LAST),
            db_pages: source_pages,
            snapshot_txid: 10,
            downloaded_bytes: expected_bytes,
            at_end: true,
        }
    );
    let conn = rusqlite::Connection::open(&dest).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dest), 0o600);
    assert_eq!(mode(&f.work), 0o700);
    assert!(fs::read_dir(&f.work).unwrap().next().is_none());
    let names: Vec<_> = fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| n.to_str().unwrap().starts_with("app.db")),
        "{names:?}"
    );

    let (manifest, etag) = load_manifest(&*f.store).await.unwrap().unwrap();
    assert_eq!(manifest, f.manifest);
    assert!(etag.is_some());
    let empty = LocalStore::new(out.path(), "nothing").unwrap();
    assert!(load_manifest(&empty).await.unwrap().is_none());
}

#[tokio::test]
async fn a_generation_restores_with_its_own_page_size() {
    let f = Fixture::new(1024).await;
    assert_eq!(f.manifest.page_size, PS);
    let out = tempfile::tempdir().unwrap();
    for (target, txid) in [(Target::Latest, LAST), (Target::Time(time(7) + 1), 7)] {
        let dest = out.path().join(format!("at-{txid}.db"));
        let restored = f.restore(target, &dest).await.unwrap();
        assert_eq!(restored.txid, txid);
        assert_eq!(Db::rows(&dest), f.states[txid as usize]);
        let page_size: u32 = rusqlite::Connection::open(&dest)
            .unwrap()
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap();
        assert_eq!(page_size, 1024);
    }
}

#[tokio::test]
async fn every_transaction_restores_the_source_as_it_was_then() {
    let f = Fixture::new(PS).await;
    let out = tempfile::tempdir().unwrap();
    for txid in 0..=LAST {
        let dest = out.path().join(format!("at-{txid}.db"));
        let generation = (txid % 2 == 0).then(|| f.generation().id.clone());
        let restored = f
            .restore(Target::Txid { generation, txid }, &dest)
            .await
            .unwrap();
        assert_eq!(Db::rows(&dest), f.states[txid as usize], "as of {txid}");
        assert_eq!(restored.txid, txid);
        assert_eq!(restored.committed_unix_ns, time(txid));
        assert_eq!(restored.at_end, txid == LAST);
        let from = match txid {
            0..6 => 0,
            6..10 => 6,
            _ => 10,
        };
        assert_eq!(restored.snapshot_txid, from, "start of {txid}");
    }
}

#[tokio::test]
async fn a_point_in_time_restores_the_last_transaction_committed_by_then() {
    let f = Fixture::new(PS).await;
    let out = tempfile::tempdir().unwrap();
    for (at, txid, from) in [
        (time(0), 0, 0),
        (time(3) + 500, 3, 0),
        (time(5), 5, 0),
        // Snapshot 6 is the start, and the next segment's first transaction is already too late.
        (time(6) + 999, 6, 6),
        (time(9) + 1, 9, 6),
        (time(10) + 1, 10, 10),
        (time(LAST), LAST, 10),
        (i64::MAX, LAST, 10),
    ] {
        let dest = out.path().join(format!("at-{at}.db"));
        let restored = f.restore(Target::Time(at), &dest).await.unwrap();
        assert_eq!(restored.txid, txid, "at {at}");
        assert_eq!(restored.snapshot_txid, from, "at {at}");
        assert_eq!(restored.committed_unix_ns, time(txid));
        assert_eq!(Db::rows(&dest), f.states[txid as usize], "at {at}");
    }
    // The stop is in the chunk's first segment: the second one is not read.
    let dest = out.path().join("early.db");
    let restored = f.restore(Target::Time(time(1) + 500), &dest).await.unwrap();
    assert_eq!(restored.txid, 1);
    assert_eq!(
        restored.downloaded_bytes,
        f.snapshot(0).size + f.segments[0].size + f.chunk_bytes(0)
    );
    assert_eq!(Db::rows(&dest), f.states[1]);

    let dest = out.path().join("before.db");
    let err = f
        .restore(Target::Time(time(0) - 1), &dest)
        .await
        .unwrap_err();
    assert!(matches!(err, RestoreError::NothingAt { .. }), "{err}");
    assert!(
        err.to_string().contains(&(time(0) - 1).to_string()),
        "{err}"
    );
    assert!(!dest.exists());
}

#[tokio::test]
async fn a_later_snapshot_saves_downloading_the_history_before_it() {
    let f = Fixture::new(PS).await;
    let out = tempfile::tempdir().unwrap();
    let target = || Target::Txid {
        generation: None,
        txid: 8,
    };
    let restored = f.restore(target(), &out.path().join("a.db")).await.unwrap();
    assert_eq!(restored.snapshot_txid, 6);
    // Snapshot 6, the one segment after it, and the index chunk listing that segment.
    assert_eq!(
        restored.downloaded_bytes,
        f.snapshot(6).size + f.segments[3].size + f.chunk_bytes(1)
    );
    let from_base = f.snapshot(0).size
        + f.segments[..4].iter().map(|s| s.size).sum::<u64>()
        + f.chunk_bytes(0)
        + f.chunk_bytes(1);
    assert!(
        restored.downloaded_bytes < from_base,
        "{} >= {from_base}",
        restored.downloaded_bytes
    );
    assert_eq!(Db::rows(&out.path().join("a.db")), f.states[8]);
}

#[tokio::test]
async fn damaged_or_missing_objects_fail_naming_them_and_leave_nothing_behind() {
    let f = Fixture::new(PS).await;
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("app.db");
    let txid = |txid| Target::Txid {
        generation: None,
        txid,
    };
    let segment_e = f.segment_key(4);
    let segment_b = f.segment_key(1);
    let base = manifest::snapshot_key(&f.generation().id, 0);
    let chunk = f.chunk_key(0);
    let wrong_chunk = serde_json::to_vec(&IndexChunk {
        segments: f.segments[..1].to_vec(),
    })
    .unwrap();
    type Damage<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: Vec<(&str, &String, Target, Damage<'_>, &str)> = vec![
        (
            "flipped segment",
            &segment_e,
            Target::Latest,
            Box::new(|p| flip(p, fs::metadata(p).unwrap().len() as usize / 2)),
            "is corrupt",
        ),
        (
            "missing segment",
            &segment_b,
            txid(5),
            Box::new(|p| fs::remove_file(p).unwrap()),
            "does not exist",
        ),
        (
            "flipped snapshot",
            &base,
            txid(3),
            Box::new(|p| flip(p, 20)),
            "sha256",
        ),
        (
            "index chunk with a range other than its reference",
            &chunk,
            txid(3),
            Box::new(|p| fs::write(p, &wrong_chunk).unwrap()),
            "ends at transaction 2",
        ),
        (
            "index chunk that is not JSON",
            &chunk,
            txid(3),
            Box::new(|p| fs::write(p, b"{").unwrap()),
            "is corrupt",
        ),
    ];
    for (case, key, target, damage, reason) in cases {
        let path = f.objects.join(key);
        let original = fs::read(&path).unwrap();
        damage(&path);
        let err = f.restore(target, &dest).await.unwrap_err();
        match &err {
            RestoreError::Corrupt { key: k, .. } | RestoreError::Missing { key: k } => {
                assert_eq!(k, key, "{case}: {err}");
            }
            _ => panic!("{case}: {err}"),
        }
        let message = err.to_string();
        assert!(message.contains(key.as_str()), "{case}: {message}");
        assert!(message.contains(reason), "{case}: {message}");
        assert!(!dest.exists(), "{case}");
        f.assert_nothing_left(out.path());
        fs::write(&path, original).unwrap();
    }
    f.restore(Target::Latest, &dest).await.unwrap();
}

#[tokio::test]
async fn an_existing_database_or_wal_is_replaced_only_with_force() {
    let f = Fixture::new(PS).await;
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("app.db");
    let wal = out.path().join("app.db-wal");

    fs::write(&dest, b"the app's own data").unwrap();
    let err = f.restore(Target::Latest, &dest).await.unwrap_err();
    assert!(
        matches!(&err, RestoreError::Exists { path } if *path == dest),
        "{err}"
    );
    assert!(err.to_string().contains("app.db"), "{err}");
    assert_eq!(fs::read(&dest).unwrap(), b"the app's own data");
    fs::remove_file(&dest).unwrap();

    fs::write(&wal, b"a WAL of another database").unwrap();
    let err = f.restore(Target::Latest, &dest).await.unwrap_err();
    assert!(
        matches!(&err, RestoreError::Exists { path } if *path == wal),
        "{err}"
    );
    assert!(!dest.exists());

    fs::write(&dest, b"the app's own data").unwrap();
    let opts = RestoreOptions {
        force: true,
        parallelism: 1,
        ..RestoreOptions::default()
    };
    let restored = restore(f.store.clone(), &f.manifest, &dest, &f.work, &opts)
        .await
        .unwrap();
    assert_eq!(restored.txid, LAST);
    assert!(!wal.exists(), "the replaced database's WAL is gone");
    assert_eq!(Db::rows(&dest), f.states[LAST as usize]);
}

#[tokio::test]
async fn a_target_outside_the_generation_is_refused_naming_it() {
    let f = Fixture::new(PS).await;
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("app.db");
    let err = f
        .restore(
            Target::Txid {
                generation: None,
                txid: LAST + 1,
            },
            &dest,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RestoreError::PastEnd {
                txid: 12,
                last: LAST,
                ..
            }
        ),
        "{err}"
    );
    let message = err.to_string();
    assert!(message.contains("transaction 12"), "{message}");
    assert!(message.contains("is 11"), "{message}");
    assert!(message.contains(&f.generation().id), "{message}");

    let err = f
        .restore(
            Target::Txid {
                generation: Some("0".repeat(32)),
                txid: 1,
            },
            &dest,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&"0".repeat(32)), "{err}");
    f.assert_nothing_left(out.path());
}

// The pure core: choosing generation, snapshot and stop.

fn snapshot(txid: u64, at: i64) -> Snapshot {
    Snapshot {
        txid,
        committed_unix_ns: at,
        db_pages: 1,
        size: 1,
        sha256: "00".repeat(32),
        parent: None,
    }
}

fn entry(first: u64, last: u64, at: i64) -> SegmentEntry {
    SegmentEntry {
        first,
        last,
        last_unix_ns: at,
        size: 1,
    }
}

fn generation(
    snapshots: Vec<Snapshot>,
    chunks: Vec<ChunkRef>,
    segments: Vec<SegmentEntry>,
) -> Generation {
    Generation {
        id: manifest::new_generation_id(),
        created_unix_ms: 0,
        page_size: PS,
        reason: "test".into(),
        snapshots,
        chunks,
        segments,
    }
}

/// Generation 1: base 0 at 100, snapshot 5 at 600, a chunk 1..=4 (last commit at 500), then
/// segments 5..=7 (800) and 8..=9 (1000). Generation 2 (a restore elsewhere): base 3 at 2000,
/// segment 4..=6 (2300).
fn two_generations() -> Manifest {
    let mut m = Manifest::new("app", PS);
    m.generations.push(generation(
        vec![snapshot(0, 100), snapshot(5, 600)],
        vec![ChunkRef {
            first: 1,
            last: 4,
            last_unix_ns: 500,
        }],
        vec![entry(5, 7, 800), entry(8, 9, 1000)],
    ));
    m.generations.push(generation(
        vec![snapshot(3, 2000)],
        Vec::new(),
        vec![entry(4, 6, 2300)],
    ));
    Manifest::parse(&m.to_bytes(), MANIFEST_KEY).unwrap()
}

#[test]
fn plans_pick_the_generation_the_snapshot_and_the_stop() {
    let m = two_generations();
    let (g1, g2) = (m.generations[0].id.clone(), m.generations[1].id.clone());
    let txid = |generation: Option<&String>, txid| Target::Txid {
        generation: generation.cloned(),
        txid,
    };
    for (target, generation, from, stop, end) in [
        (Target::Latest, &g2, 3, Stop::Txid(6), 6),
        (txid(None, 5), &g2, 3, Stop::Txid(5), 6),
        (txid(None, 3), &g2, 3, Stop::Txid(3), 6),
        (txid(Some(&g1), 4), &g1, 0, Stop::Txid(4), 9),
        (txid(Some(&g1), 6), &g1, 5, Stop::Txid(6), 9),
        (
            Target::Time(100),
            &g1,
            0,
            Stop::Time {
                unix_ns: 100,
                bound: 4,
            },
            9,
        ),
        (
            Target::Time(550),
            &g1,
            0,
            Stop::Time {
                unix_ns: 550,
                bound: 7,
            },
            9,
        ),
        (
            Target::Time(650),
            &g1,
            5,
            Stop::Time {
                unix_ns: 650,
                bound: 7,
            },
            9,
        ),
        (Target::Time(1000), &g1, 5, Stop::Txid(9), 9),
        (Target::Time(1999), &g1, 5, Stop::Txid(9), 9),
        (
            Target::Time(2100),
            &g2,
            3,
            Stop::Time {
                unix_ns: 2100,
                bound: 6,
            },
            6,
        ),
        (Target::Time(i64::MAX), &g2, 3, Stop::Txid(6), 6),
    ] {
        let p = plan(&m, &target).unwrap();
        assert_eq!(&p.generation, generation, "{target:?}");
        assert_eq!(p.snapshot.txid, from, "{target:?}");
        assert_eq!(p.stop, stop, "{target:?}");
        assert_eq!(p.end, end, "{target:?}");
    }

    let err = plan(&m, &Target::Time(99)).unwrap_err();
    assert!(
        matches!(err, RestoreError::NothingAt { unix_ns: 99 }),
        "{err}"
    );
    let err = plan(&m, &txid(None, 7)).unwrap_err();
    assert!(
        matches!(
            err,
            RestoreError::PastEnd {
                txid: 7,
                last: 6,
                ..
            }
        ),
        "{err}"
    );
    let err = plan(&m, &txid(None, 2)).unwrap_err();
    assert!(
        matches!(
            err,
            RestoreError::BeforeStart {
                txid: 2,
                base: 3,
                ..
            }
        ),
        "{err}"
    );
    let unknown = "f".repeat(32);
    let err = plan(&m, &txid(Some(&unknown), 1)).unwrap_err();
    assert!(
        matches!(err, RestoreError::UnknownGeneration { .. }),
        "{err}"
    );
    let err = plan(&Manifest::new("app", PS), &Target::Latest).unwrap_err();
    assert!(matches!(err, RestoreError::NoGeneration), "{err}");
}

#[test]
fn a_snapshot_past_the_segments_is_an_end_but_the_gap_before_it_is_not_stored() {
    let mut m = Manifest::new("app", PS);
    m.generations.push(generation(
        vec![snapshot(0, 100), snapshot(5, 500)],
        Vec::new(),
        vec![entry(1, 3, 300)],
    ));
    let p = plan(&m, &Target::Latest).unwrap();
    assert_eq!((p.snapshot.txid, p.stop, p.end), (5, Stop::Txid(5), 5));
    let target = |txid| Target::Txid {
        generation: None,
        txid,
    };
    assert_eq!(plan(&m, &target(5)).unwrap().snapshot.txid, 5);
    assert_eq!(plan(&m, &target(3)).unwrap().snapshot.txid, 0);
    let err = plan(&m, &target(4)).unwrap_err();
    assert!(
        matches!(
            err,
            RestoreError::NotStored {
                txid: 4,
                last: 3,
                ..
            }
        ),
        "{err}"
    );
    // Between the last segment and the later snapshot: the segments are all there is.
    let p = plan(&m, &Target::Time(400)).unwrap();
    assert_eq!((p.snapshot.txid, p.stop), (0, Stop::Txid(3)));
}

#[test]
fn segments_are_picked_to_cover_the_plan_without_gaps() {
    let m = two_generations();
    let g = &m.generations[0];
    let all = [
        entry(1, 2, 200),
        entry(3, 4, 500),
        entry(5, 7, 800),
        entry(8, 9, 1000),
    ];
    let p = plan(
        &m,
        &Target::Txid {
            generation: Some(g.id.clone()),
            txid: 3,
        },
    )
    .unwrap();
    assert_eq!(covering(&p, all).unwrap(), all[..2]);
    let p = plan(
        &m,
        &Target::Txid {
            generation: Some(g.id.clone()),
            txid: 8,
        },
    )
    .unwrap();
    assert_eq!(covering(&p, all).unwrap(), all[2..]);
    // Exactly at a snapshot: nothing to read.
    let p = plan(
        &m,
        &Target::Txid {
            generation: Some(g.id.clone()),
            txid: 5,
        },
    )
    .unwrap();
    assert_eq!(covering(&p, all).unwrap(), []);
    assert!(!wanted(&p, 5, 7));

    let p = plan(
        &m,
        &Target::Txid {
            generation: Some(g.id.clone()),
            txid: 4,
        },
    )
    .unwrap();
    let err = covering(&p, [all[0], entry(4, 4, 500)]).unwrap_err();
    assert!(err.contains("segment 4..=4 where transaction 3"), "{err}");
    let err = covering(&p, [all[0]]).unwrap_err();
    assert!(err.contains("end at transaction 2"), "{err}");

    // A time inside the chunk's range: its first segment already ends later.
    let p = plan(&m, &Target::Time(150)).unwrap();
    assert_eq!(
        p.stop,
        Stop::Time {
            unix_ns: 150,
            bound: 4
        }
    );
    assert_eq!(covering(&p, all).unwrap(), all[..1]);
    let p = plan(&m, &Target::Time(650)).unwrap();
    assert_eq!(covering(&p, all).unwrap(), all[2..3]);
    let err = covering(&p, []).unwrap_err();
    assert!(err.contains("before 7"), "{err}");
}

#[test]
fn an_index_chunk_must_hold_exactly_its_range() {
    let chunk = ChunkRef {
        first: 1,
        last: 4,
        last_unix_ns: 500,
    };
    let index = |segments: &[SegmentEntry]| IndexChunk {
        segments: segments.to_vec(),
    };
    check_chunk(&chunk, &index(&[entry(1, 2, 200), entry(3, 4, 500)])).unwrap();
    for bad in [
        index(&[]),
        index(&[entry(1, 2, 200)]),
        index(&[entry(1, 2, 200), entry(4, 4, 500)]),
        index(&[entry(2, 4, 500)]),
        index(&[entry(1, 4, 499)]),
    ] {
        assert!(check_chunk(&chunk, &bad).is_err(), "{bad:?}");
    }
}
