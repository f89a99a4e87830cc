//! The replicator end to end on the local-directory store: a writer commits while it runs,
//! flush makes everything durable, and a restore elsewhere equals the source.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

use super::*;
use crate::config::BackendKind;
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
    assert!(
        !store_dir.join(&base_key).exists(),
        "the old base was not deleted"
    );
    r.flush().await.unwrap();
    r.stop(Duration::from_secs(10)).await.unwrap();
    let out = s.dir.path().join("latest.db");
    r.restore_to(&out, &restore::RestoreOptions::default())
        .await
        .unwrap();
    same(&rows(&out), &rows(&db));
}
