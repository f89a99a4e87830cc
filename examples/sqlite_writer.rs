//! A real SQLite writer process for the replication tests (bundled SQLite, like the sidecar's,
//! so the app side is past the 3.51.3 WAL-reset fix).
//!
//! `sqlite_writer write DB ACKS [--max N] [--exit CODE] [--checkpoints] [--page-size N] [--pace-us N]`
//! commits numbered transactions (`seq` 1, 2, …, continuing after the largest in DB) of mixed
//! sizes — multi-page rows, some transactions larger than the page cache, a VACUUM now and
//! then (every 1000) — and appends each `seq` to ACKS once its COMMIT returned (the test's oracle). With
//! `--checkpoints` it also runs PASSIVE, RESTART and TRUNCATE checkpoints itself.
//!
//! `sqlite_writer count DB OUT` writes the number of rows to OUT (the wrapped-app test).

use std::io::Write;
use std::time::Duration;

use rusqlite::Connection;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("write") => write(&args[2], &args[3], &args[4..]),
        Some("count") => {
            let c = Connection::open(&args[2]).expect("open");
            let n: i64 = c
                .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .unwrap_or(-1);
            std::fs::write(&args[3], n.to_string()).expect("write count");
        }
        _ => {
            eprintln!(
                "usage: sqlite_writer write DB ACKS [--max N] [--exit CODE] [--checkpoints] | count DB OUT"
            );
            std::process::exit(2);
        }
    }
}

fn flag(rest: &[String], name: &str) -> Option<String> {
    rest.iter()
        .position(|a| a == name)
        .and_then(|i| rest.get(i + 1).cloned())
}

fn write(db: &str, acks: &str, rest: &[String]) {
    let max: u64 = flag(rest, "--max").map_or(u64::MAX, |v| v.parse().expect("--max"));
    let exit: i32 = flag(rest, "--exit").map_or(0, |v| v.parse().expect("--exit"));
    let page_size: u32 =
        flag(rest, "--page-size").map_or(8192, |v| v.parse().expect("--page-size"));
    let checkpoints = rest.iter().any(|a| a == "--checkpoints");
    let pace =
        Duration::from_micros(flag(rest, "--pace-us").map_or(0, |v| v.parse().expect("--pace-us")));
    let c = Connection::open(db).expect("open the database");
    c.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    c.execute_batch(&format!(
        "PRAGMA page_size={page_size}; PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
         PRAGMA cache_size=-256;
         CREATE TABLE IF NOT EXISTS t(seq INTEGER PRIMARY KEY, payload BLOB NOT NULL);"
    ))
    .expect("set up");
    let mut acks = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(acks)
        .expect("open the ack log");
    let mut seq: u64 = c
        .query_row("SELECT coalesce(max(seq), 0) FROM t", [], |r| {
            r.get::<_, i64>(0)
        })
        .map(|v| u64::try_from(v).unwrap_or(0))
        .expect("read the last seq");
    let mut rng = seq
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut done = 0u64;
    while done < max {
        seq += 1;
        let kind = next() % 100;
        let tx = c.unchecked_transaction().expect("begin");
        // Every transaction adds exactly one numbered row; some also churn filler rows.
        let size = match kind {
            0..=79 => 64 + next() % 400,
            80..=94 => 9_000 + next() % 30_000,
            _ => 200,
        };
        let kind = if kind >= 95 && next() % 4 != 0 {
            0
        } else {
            kind
        };
        tx.execute(
            "INSERT INTO t(seq, payload) VALUES (?1, randomblob(?2))",
            rusqlite::params![
                i64::try_from(seq).expect("seq"),
                i64::try_from(size).expect("size")
            ],
        )
        .expect("insert");
        if kind >= 95 {
            // Larger than the page cache: the transaction spills before it commits.
            // (Deleted again in the same transaction: the database does not grow.)
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS filler(x BLOB);
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300)
                 INSERT INTO filler SELECT randomblob(3000) FROM n;
                 DELETE FROM filler;",
            )
            .expect("filler");
        }
        tx.commit().expect("commit");
        writeln!(acks, "{seq}").expect("ack");
        done += 1;
        if !pace.is_zero() {
            std::thread::sleep(pace);
        }
        if seq.is_multiple_of(400) {
            c.execute_batch("DELETE FROM filler; VACUUM;")
                .or_else(|_| c.execute_batch("VACUUM"))
                .expect("vacuum");
        }
        if checkpoints && seq.is_multiple_of(97) {
            let mode =
                ["PASSIVE", "RESTART", "TRUNCATE"][usize::try_from(seq / 97 % 3).expect("mode")];
            let _ = c.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(()));
        }
    }
    drop(acks);
    std::process::exit(exit);
}
