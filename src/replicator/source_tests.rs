//! Reading a live database while another connection writes and checkpoints it.

use std::fs::{self, File};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rusqlite::Connection;

use super::*;
use crate::replicator::wal::tests::{Apply, Db};

/// A copy of the database built from a snapshot plus the transactions pumped after it.
struct Replica {
    apply: Apply,
}

impl Replica {
    /// Starts reading `source` at its end and snapshots the state there into `path`.
    fn start(source: &mut Source, path: &Path, page_size: u32) -> Self {
        source
            .with_barrier(|s| s.start_at_end())
            .unwrap()
            .expect("barrier taken");
        source.snapshot_to(path).unwrap();
        Self {
            apply: Apply::new(path, page_size),
        }
    }

    fn sink(&mut self) -> impl FnMut(WalEvent<'_>) -> std::result::Result<(), String> + '_ {
        |event| self.apply.event(event)
    }

    /// Transactions applied so far.
    fn txns(&self) -> u32 {
        u32::try_from(self.apply.commits.len()).unwrap()
    }

    /// What the engine does under a barrier: read to the end, checkpoint, take a fresh pin.
    fn checkpoint(&mut self, source: &mut Source) -> Result<Checkpointed> {
        source.pump(&mut self.sink())?;
        let done = source.checkpoint()?;
        assert!(!done.busy, "{done:?}");
        source.pump(&mut self.sink())?;
        self.apply.pending.clear();
        Ok(done)
    }

    fn pump(&mut self, source: &mut Source) -> Pumped {
        let pumped = source.pump(&mut self.sink()).unwrap();
        self.apply.pending.clear();
        pumped
    }
}

/// Commits single-row transactions (some rows larger than a page) until told to stop.
fn writer(path: &Path, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u32> {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let c = Connection::open(&path).unwrap();
        c.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
        c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        let mut n = 0u32;
        while !stop.load(Ordering::SeqCst) {
            let size = if n.is_multiple_of(17) { 20_000 } else { 100 };
            c.execute("INSERT INTO t(v) VALUES (randomblob(?1))", [size])
                .unwrap();
            n += 1;
        }
        n
    })
}

#[test]
fn a_replica_from_a_snapshot_and_pumped_transactions_equals_the_source_under_a_writer() {
    let db = Db::new(4096);
    db.commit(50, 300);
    let mut source = Source::open(&db.path).unwrap();
    let copy = db.dir.path().join("replica.db");
    let mut replica = Replica::start(&mut source, &copy, 4096);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(&db.path, Arc::clone(&stop));
    let mut lifetimes = std::collections::BTreeSet::new();
    for round in 0..40 {
        std::thread::sleep(std::time::Duration::from_millis(5));
        lifetimes.extend(source.cursor().map(|c| c.header.salt));
        let p = replica.pump(&mut source);
        assert!(matches!(p, Pumped::Txns(_)), "round {round}: {p:?}");
        if round % 10 == 9 {
            // A barrier checkpoint lets the WAL restart under the writer; reading continues.
            source.with_barrier(|s| replica.checkpoint(s)).unwrap();
        }
    }
    stop.store(true, Ordering::SeqCst);
    let written = w.join().unwrap();
    let p = replica.pump(&mut source);
    assert!(matches!(p, Pumped::Txns(_)), "last: {p:?}");
    assert_eq!(
        replica.txns(),
        written,
        "every committed transaction read once"
    );
    drop(replica);
    assert_eq!(Db::rows(&copy), Db::rows(&db.path));
}

/// The app's own checkpoints between pumps, in every mode: RESTART and TRUNCATE cannot get past
/// the pin (they report busy), PASSIVE backfills up to it, and every transaction is still read
/// once, in order, without a break.
#[test]
fn app_checkpoints_in_every_mode_never_break_the_history() {
    let db = Db::new(8192);
    db.commit(10, 500);
    db.conn
        .busy_timeout(std::time::Duration::from_millis(20))
        .unwrap();
    let mut source = Source::open(&db.path).unwrap();
    let copy = db.dir.path().join("replica.db");
    let mut replica = Replica::start(&mut source, &copy, 8192);
    let mut committed = 0;
    for (i, mode) in [
        "PASSIVE", "RESTART", "TRUNCATE", "FULL", "PASSIVE", "TRUNCATE",
    ]
    .iter()
    .cycle()
    .take(24)
    .enumerate()
    {
        db.commit(1 + i % 3, if i % 5 == 0 { 12_000 } else { 200 });
        committed += 1;
        let (busy, log, done): (i64, i64, i64) = db
            .conn
            .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert!(
            *mode == "PASSIVE" || busy == 1 || done == log,
            "{mode}: ({busy},{log},{done})"
        );
        db.commit(1, 100);
        committed += 1;
        if i % 2 == 0 {
            let p = replica.pump(&mut source);
            assert!(matches!(p, Pumped::Txns(_)), "after {mode}: {p:?}");
        }
        if i % 7 == 6 {
            source.with_barrier(|s| replica.checkpoint(s)).unwrap();
        }
    }
    let p = replica.pump(&mut source);
    assert!(matches!(p, Pumped::Txns(_)), "{p:?}");
    assert_eq!(replica.txns(), committed);
    drop(replica);
    assert_eq!(Db::rows(&copy), Db::rows(&db.path));
}

/// While no replicator holds a pin, the app checkpoints and restarts its WAL: frames nobody read
/// are gone, and resuming from the old position must say so instead of continuing.
#[test]
fn a_wal_restarted_while_the_replicator_was_down_is_a_discontinuity() {
    let db = Db::new(4096);
    db.commit(5, 100);
    let mut source = Source::open(&db.path).unwrap();
    let copy = db.dir.path().join("replica.db");
    let mut replica = Replica::start(&mut source, &copy, 4096);
    db.commit(3, 100);
    assert_eq!(replica.pump(&mut source), Pumped::Txns(1));
    let cursor = source.cursor().expect("a position");
    drop(source);
    db.commit(2, 100);
    db.conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    db.commit(2, 100);
    let mut source = Source::open(&db.path).unwrap();
    source.resume(cursor);
    assert!(matches!(
        replica.pump(&mut source),
        Pumped::Discontinuity { .. }
    ));
    // Resuming where nothing was lost continues.
    let mut source = Source::open(&db.path).unwrap();
    source.start_at_end().unwrap();
    let cursor = source.cursor().expect("a position");
    drop(source);
    db.commit(1, 100);
    let mut source = Source::open(&db.path).unwrap();
    source.resume(cursor);
    assert_eq!(replica.pump(&mut source), Pumped::Txns(1));
}

/// A database replaced by another file (a restore, a copy) under the same name is not the
/// continuation of the one read before, even while a pin was held.
#[test]
fn a_replaced_database_is_a_discontinuity() {
    let db = Db::new(4096);
    db.commit(5, 100);
    let mut source = Source::open(&db.path).unwrap();
    let copy = db.dir.path().join("replica.db");
    let mut replica = Replica::start(&mut source, &copy, 4096);
    db.commit(1, 100);
    assert_eq!(replica.pump(&mut source), Pumped::Txns(1));
    let other = Db::new(4096);
    other.commit(3, 100);
    drop(other.conn);
    for suffix in ["", "-wal", "-shm"] {
        let from = format!("{}{suffix}", other.path.display());
        let to = format!("{}{suffix}", db.path.display());
        let _ = fs::remove_file(&to);
        if Path::new(&from).exists() {
            fs::copy(&from, &to).unwrap();
        }
    }
    let c = Connection::open(&db.path).unwrap();
    c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    c.execute("INSERT INTO t(v) VALUES (randomblob(10))", [])
        .unwrap();
    assert!(matches!(
        replica.pump(&mut source),
        Pumped::Discontinuity { .. }
    ));
}

#[test]
fn a_database_not_in_wal_mode_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollback.db");
    Connection::open(&path)
        .unwrap()
        .execute_batch("CREATE TABLE t(x)")
        .unwrap();
    let err = Source::open(&path).unwrap_err();
    assert!(matches!(err, SourceError::NotWal { .. }), "{err}");
    assert!(err.to_string().contains("rollback.db"), "{err}");
    let _ = File::open(&path).unwrap();
}

/// Pumps are bounded; a snapshot through a pin left behind by one would copy an older state
/// than the cursor's, so it is refused until a pump reached the published end.
#[test]
fn a_snapshot_is_refused_until_everything_published_was_read() {
    let db = Db::new(4096);
    db.commit(1, 100);
    let mut source = Source::open(&db.path).unwrap();
    let copy = db.dir.path().join("replica.db");
    let mut replica = Replica::start(&mut source, &copy, 4096);
    db.conn.execute_batch("BEGIN").unwrap();
    for _ in 0..3000 {
        db.conn
            .execute("INSERT INTO t(v) VALUES (randomblob(3000))", [])
            .unwrap();
    }
    db.conn.execute_batch("COMMIT").unwrap();
    for _ in 0..5 {
        db.commit(1, 100);
    }
    assert!(matches!(replica.pump(&mut source), Pumped::Txns(_)));
    assert!(
        source.behind(),
        "one pump reads at most {PUMP_FRAMES} frames"
    );
    let stale = db.dir.path().join("stale.db");
    let err = source.snapshot_to(&stale).unwrap_err();
    assert!(matches!(err, SourceError::PinBehind { .. }), "{err}");
    while source.behind() {
        replica.pump(&mut source);
    }
    let snap = db.dir.path().join("snap.db");
    source.snapshot_to(&snap).unwrap();
    drop(replica);
    assert_eq!(Db::rows(&snap), Db::rows(&db.path));
    assert_eq!(Db::rows(&copy), Db::rows(&db.path));
}
