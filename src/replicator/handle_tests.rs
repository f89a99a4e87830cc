//! The replicator end to end on the local-directory store: a writer commits while it runs,
//! flush makes everything durable, and a restore elsewhere equals the source.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

use super::*;
use crate::config::BackendKind;
use crate::replicator::manifest;
use crate::replicator::restore::Target;

struct Setup {
    dir: tempfile::TempDir,
    storage: LayerStorageConfig,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let storage = LayerStorageConfig {
            backend: BackendKind::Local,
            local_store_dir: dir.path().join("store"),
            staging_dir: dir.path().join("staging"),
            state_db_path: dir.path().join("state.sqlite"),
            ..LayerStorageConfig::default()
        };
        Self { dir, storage }
    }

    fn config(&self, db: &Path, cache: &str) -> SqliteReplicatorConfig {
        SqliteReplicatorConfig {
            db_path: db.to_path_buf(),
            s3_bucket: String::new(),
            s3_prefix: "backups/".into(),
            cache_dir: self.dir.path().join(cache),
            max_cache_size: 64 << 20,
            auto_restore: true,
            snapshot_interval_secs: 3600,
        }
    }

    fn options() -> ReplicatorOptions {
        ReplicatorOptions {
            name: Some("app".into()),
            sync_interval: Duration::from_millis(200),
            ..ReplicatorOptions::default()
        }
    }
}

fn create(path: &Path) -> Connection {
    let c = Connection::open(path).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
         CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB);",
    )
    .unwrap();
    c
}

fn rows(path: &Path) -> Vec<(i64, Vec<u8>)> {
    let c = Connection::open(path).unwrap();
    let mut s = c.prepare("SELECT id, v FROM t ORDER BY id").unwrap();
    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(std::result::Result::unwrap)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_written_while_replicated_is_restored_elsewhere_equal_and_continues_its_generation()
 {
    let s = Setup::new();
    let db = s.dir.path().join("app.db");
    let app = create(&db);
    app.execute("INSERT INTO t(v) VALUES (randomblob(100))", [])
        .unwrap();
    let r = SqliteReplicator::with_options(s.config(&db, "cache"), &s.storage, Setup::options())
        .await
        .unwrap();
    r.start().await.unwrap();
    wait_running(&r).await;
    for i in 0..300 {
        let size = if i % 50 == 0 { 30_000 } else { 200 };
        app.execute("INSERT INTO t(v) VALUES (randomblob(?1))", [size])
            .unwrap();
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    r.flush().await.unwrap();
    let status = r.status();
    assert!(status.running, "{status:?}");
    assert_eq!(status.durable_txid, status.txid, "{status:?}");
    assert_eq!(status.txid, 300, "one transaction per insert: {status:?}");
    assert!(status.last_sync.is_some());
    assert_eq!(status.last_error, None);
    let m = r.manifest().await.unwrap().unwrap();
    assert_eq!(m.generations.len(), 1);

    // Another node: restore into a missing path (auto-restore), equal to the source.
    let other = s.dir.path().join("node2").join("app.db");
    std::fs::create_dir_all(other.parent().unwrap()).unwrap();
    let r2 =
        SqliteReplicator::with_options(s.config(&other, "cache2"), &s.storage, Setup::options())
            .await
            .unwrap();
    same(&rows(&other), &rows(&db));
    // Stop the first node; the second continues the same generation, uploading no snapshot.
    r.stop(Duration::from_secs(10)).await.unwrap();
    drop(app);
    r2.start().await.unwrap();
    wait_running(&r2).await;
    let app2 = Connection::open(&other).unwrap();
    app2.execute("INSERT INTO t(v) VALUES (randomblob(10))", [])
        .unwrap();
    r2.flush().await.unwrap();
    let m = r2.manifest().await.unwrap().unwrap();
    assert_eq!(m.generations.len(), 1, "{m:?}");
    assert_eq!(m.generations[0].snapshots.len(), 1);
    assert_eq!(m.generations[0].last_txid(), 301);
    r2.stop(Duration::from_secs(10)).await.unwrap();

    // Point in time: transaction 150 exactly.
    let pit = s.dir.path().join("pit.db");
    let restored = r2
        .restore_to(
            &pit,
            &restore::RestoreOptions {
                target: Target::Txid {
                    generation: None,
                    txid: 150,
                },
                ..restore::RestoreOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(restored.txid, 150);
    // The base snapshot holds the row inserted before replication started.
    same(&rows(&pit), &rows(&db)[..151]);
}

/// A replicator of `db` (cache "cache"), started and flushed once.
async fn started(s: &Setup, db: &Path) -> SqliteReplicator {
    let r = SqliteReplicator::with_options(s.config(db, "cache"), &s.storage, Setup::options())
        .await
        .unwrap();
    r.start().await.unwrap();
    wait_running(&r).await;
    r.flush().await.unwrap();
    r
}

async fn wait_running(r: &SqliteReplicator) {
    for _ in 0..200 {
        if r.status().running {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("replicator did not start: {:?}", r.status());
}

/// Row lists equal, without printing megabytes when they are not.
fn same(a: &[(i64, Vec<u8>)], b: &[(i64, Vec<u8>)]) {
    let ids = |r: &[(i64, Vec<u8>)]| r.iter().map(|(id, _)| *id).collect::<Vec<_>>();
    assert_eq!(ids(a), ids(b));
    assert!(a == b, "same ids, different contents");
}

/// With a retention window, a new snapshot makes the history before it unneeded: the manifest
/// drops it first, then its objects go; the latest state still restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_older_than_the_retention_is_pruned_after_a_new_snapshot() {
    let s = Setup::new();
    let db = s.dir.path().join("app.db");
    let app = create(&db);
    let mut config = s.config(&db, "cache");
    config.snapshot_interval_secs = 1;
    let options = ReplicatorOptions {
        retention: Some(Duration::from_millis(1)),
        ..Setup::options()
    };
    let r = SqliteReplicator::with_options(config, &s.storage, options)
        .await
        .unwrap();
    r.start().await.unwrap();
    wait_running(&r).await;
    for _ in 0..5 {
        app.execute("INSERT INTO t(v) VALUES (randomblob(300))", [])
            .unwrap();
    }
    r.flush().await.unwrap();
    let first = r.manifest().await.unwrap().unwrap();
    let generation = first.current().unwrap().id.clone();
    let base_key = crate::replicator::manifest::snapshot_key(&generation, 0);
    let store_dir = s.storage.local_store_dir.join("backups/sqlite/app");
    assert!(store_dir.join(&base_key).exists());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..5 {
        app.execute("INSERT INTO t(v) VALUES (randomblob(300))", [])
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = r.manifest().await.unwrap().unwrap();
        let snaps = &m.current().unwrap().snapshots;
        if snaps.len() == 1 && snaps[0].txid == 10 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not pruned: {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The manifest stops naming the old base before the base is deleted (never the reverse).
    while store_dir.join(&base_key).exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old base was not deleted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r.flush().await.unwrap();
    r.stop(Duration::from_secs(10)).await.unwrap();
    let out = s.dir.path().join("latest.db");
    r.restore_to(&out, &restore::RestoreOptions::default())
        .await
        .unwrap();
    same(&rows(&out), &rows(&db));
}

/// The app checkpoints (TRUNCATE) while the replicator is down, so the transactions in between
/// are gone from the WAL: the new generation's base is only the pages that changed, and it
/// restores equal to the source. A second such break right after takes a full snapshot (a delta
/// never stacks on a delta).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_made_while_the_replicator_was_down_ships_only_the_changed_pages() {
    let s = Setup::new();
    let db = s.dir.path().join("app.db");
    let app = create(&db);
    app.execute_batch(
        "BEGIN;
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
         INSERT INTO t(v) SELECT randomblob(1000) FROM n;
         COMMIT;",
    )
    .unwrap();
    let start = || started(&s, &db);
    let r = start().await;
    // Transactions read from the WAL (the map follows them): rewrites, growth, a VACUUM that
    // shrinks the file.
    for i in 0..40 {
        app.execute(
            "UPDATE t SET v = randomblob(1000) WHERE id = ?1",
            [i * 50 + 1],
        )
        .unwrap();
    }
    app.execute_batch(
        "INSERT INTO t(v) SELECT randomblob(3000) FROM t WHERE id <= 100;
         DELETE FROM t WHERE id BETWEEN 1500 AND 1700;
         VACUUM;",
    )
    .unwrap();
    r.flush().await.unwrap();
    let first = r.manifest().await.unwrap().unwrap();
    assert!(first.generations[0].last_txid() >= 42, "{first:?}");
    let full = first.generations[0].snapshots[0].size;
    r.stop(Duration::from_secs(10)).await.unwrap();

    let change = |ids: &str| {
        app.execute_batch(&format!(
            "UPDATE t SET v = randomblob(1000) WHERE id IN ({ids});
             INSERT INTO t(v) VALUES (randomblob(1000));
             PRAGMA wal_checkpoint(TRUNCATE);
             INSERT INTO t(v) VALUES (randomblob(10));"
        ))
        .unwrap();
    };
    change("5, 900, 1800");
    let r = start().await;
    let m = r.manifest().await.unwrap().unwrap();
    assert_eq!(m.generations.len(), 2, "{m:?}");
    let (a, b) = (&m.generations[0], &m.generations[1]);
    let base = &b.snapshots[0];
    assert_eq!(
        base.parent,
        Some(manifest::Parent {
            generation: a.id.clone(),
            txid: a.last_txid(),
            snapshot: 0,
        })
    );
    assert!(
        base.size * 20 < full,
        "the delta base is {} bytes against {full} for the whole database",
        base.size
    );
    let out = s.dir.path().join("after-delta.db");
    r.restore_to(&out, &restore::RestoreOptions::default())
        .await
        .unwrap();
    same(&rows(&out), &rows(&db));
    r.stop(Duration::from_secs(10)).await.unwrap();

    change("7");
    let r = start().await;
    let m = r.manifest().await.unwrap().unwrap();
    assert_eq!(m.generations.len(), 3, "{m:?}");
    assert_eq!(
        m.generations[2].snapshots[0].parent, None,
        "a delta on a delta"
    );
    let out = s.dir.path().join("after-full.db");
    r.restore_to(&out, &restore::RestoreOptions::default())
        .await
        .unwrap();
    same(&rows(&out), &rows(&db));
    // The delta generation still restores as of its end, through its parent.
    let mid = s.dir.path().join("mid.db");
    let restored = r
        .restore_to(
            &mid,
            &restore::RestoreOptions {
                target: Target::Txid {
                    generation: Some(m.generations[1].id.clone()),
                    txid: m.generations[1].last_txid(),
                },
                ..restore::RestoreOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(restored.generation, m.generations[1].id);
    let mid_rows = rows(&mid);
    let now = rows(&db);
    assert_eq!(
        mid_rows.len(),
        now.len() - 2,
        "one insert and one update later"
    );
    r.stop(Duration::from_secs(10)).await.unwrap();
}

/// The app writes and closes its last connection (SQLite checkpoints and removes the WAL) while
/// the replicator is down: the WAL it finds is empty, yet the database changed. The change is
/// found by comparing the database with the page map and replicated; a restart with nothing
/// changed goes on with the same generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_checkpointed_away_while_the_replicator_was_down_are_not_missed() {
    let s = Setup::new();
    let db = s.dir.path().join("app.db");
    let write = |sql: &str| {
        let c = create(&db);
        c.execute_batch(sql).unwrap();
        drop(c);
        assert!(
            !s.dir.path().join("app.db-wal").exists(),
            "the last close removes the WAL"
        );
    };
    write(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300)
         INSERT INTO t(v) SELECT randomblob(500) FROM n;",
    );
    let cycle = || async {
        let r = started(&s, &db).await;
        let m = r.manifest().await.unwrap().unwrap();
        r.stop(Duration::from_secs(10)).await.unwrap();
        m
    };
    let first = cycle().await;
    assert_eq!(first.generations.len(), 1);

    let again = cycle().await;
    assert_eq!(again.generations.len(), 1, "nothing changed: {again:?}");

    write("UPDATE t SET v = randomblob(500) WHERE id % 50 = 0;");
    let after = cycle().await;
    assert_eq!(after.generations.len(), 2, "{after:?}");
    assert!(
        after.generations[1].snapshots[0].parent.is_some(),
        "a delta"
    );
    let r = SqliteReplicator::with_options(s.config(&db, "cache"), &s.storage, Setup::options())
        .await
        .unwrap();
    let out = s.dir.path().join("restored.db");
    r.restore_to(&out, &restore::RestoreOptions::default())
        .await
        .unwrap();
    same(&rows(&out), &rows(&db));
}

/// A segment that cannot be put into the outbox (here: a directory is where its data file
/// goes, for a while) leaves transactions read but in no item. The history must break there: a restore of
/// the latest state still equals the source, with no transaction skipped or misnumbered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_the_outbox_refused_breaks_the_history_instead_of_skipping_it() {
    let s = Setup::new();
    let db = s.dir.path().join("app.db");
    let app = create(&db);
    app.execute("INSERT INTO t(v) VALUES (randomblob(100))", [])
        .unwrap();
    let r = started(&s, &db).await;
    for _ in 0..20 {
        app.execute("INSERT INTO t(v) VALUES (randomblob(300))", [])
            .unwrap();
    }
    r.flush().await.unwrap();
    // Directories where the next items' data files would go: moving a segment there fails.
    let outbox = s.dir.path().join("cache/app/outbox");
    assert!(outbox.is_dir(), "cache layout: {}", outbox.display());
    let blocked: Vec<_> = (0..500u64)
        .map(|n| outbox.join(format!("{n:016x}.zst")))
        .filter(|p| !p.exists())
        .collect();
    for p in &blocked {
        std::fs::create_dir(p).unwrap();
    }
    for _ in 0..20 {
        app.execute("INSERT INTO t(v) VALUES (randomblob(300))", [])
            .unwrap();
    }
    // Long enough for the segment to be cut (and refused) at the 200 ms interval.
    let mut refused = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The reading thread's error (the shipper may report the outbox first).
        if r.status()
            .last_error
            .is_some_and(|e| e.contains("move into the outbox"))
        {
            refused = true;
            break;
        }
    }
    assert!(refused, "the outbox never refused: {:?}", r.status());
    for p in &blocked {
        std::fs::remove_dir(p).unwrap();
    }
    for _ in 0..20 {
        app.execute("INSERT INTO t(v) VALUES (randomblob(300))", [])
            .unwrap();
    }
    r.flush().await.unwrap();
    let m = r.manifest().await.unwrap().unwrap();
    assert_eq!(
        m.generations.len(),
        2,
        "a new generation after the break: {m:?}"
    );
    let out = s.dir.path().join("restored.db");
    r.restore_to(&out, &restore::RestoreOptions::default())
        .await
        .unwrap();
    same(&rows(&out), &rows(&db));
    assert_eq!(rows(&out).len(), 61);
}
