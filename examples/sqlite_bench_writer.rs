//! Writers for `integration/bench/sqlite.sh` (bundled SQLite, like the sidecar's).
//!
//! `sqlite_bench_writer throughput DB SECS [--autocheckpoint N] [--payload BYTES] [--slow FILE]`
//!   single-row autocommit INSERTs (WAL, `synchronous=NORMAL`) for SECS seconds; prints one JSON
//!   line: transactions, tx/s, per-commit latency percentiles (µs), commits slower than 5 and
//!   20 ms, the time spent in commits slower than 5 ms and their p50/p99 (ms: the stalls), the
//!   writer's CPU time, and the largest `-wal` size seen (sampled every 1000 commits). `--slow FILE`: "end_unix_ns latency_us" of each commit
//!   slower than 5 ms.
//! `sqlite_bench_writer paced OUT RATE SECS DB [DB…]`
//!   RATE single-row transactions per second in all (round robin over the DBs) for SECS
//!   seconds; writes "db_index commit_no unix_ns" per commit to OUT (the wall time once COMMIT
//!   returned; commit_no counts from 1 per database).
//! `sqlite_bench_writer fill DB MB`
//!   creates a WAL-mode database of about MB megabytes (rows of hex text with an index, which
//!   compresses about 2:1 like typical app data) and checkpoints it into the main file.
//! `sqlite_bench_writer churn DB SECS RATE`
//!   RATE single-row UPDATEs per second of random rows of a `fill`ed database for SECS seconds.

use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::Connection;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("throughput") if args.len() >= 4 => throughput(&args[2], &args[3], &args[4..]),
        Some("paced") if args.len() >= 6 => paced(&args[2], &args[3], &args[4], &args[5..]),
        Some("fill") if args.len() == 4 => fill(&args[2], &args[3]),
        Some("churn") if args.len() == 5 => churn(&args[2], &args[3], &args[4]),
        _ => {
            eprintln!(
                "usage: sqlite_bench_writer throughput DB SECS [--autocheckpoint N] [--payload BYTES]\n\
                 \x20      sqlite_bench_writer paced OUT RATE SECS DB [DB…]\n\
                 \x20      sqlite_bench_writer fill DB MB\n\
                 \x20      sqlite_bench_writer churn DB SECS RATE"
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

fn num<T: std::str::FromStr>(s: &str, what: &str) -> T {
    s.parse()
        .unwrap_or_else(|_| panic!("{what}: not a number: {s}"))
}

fn unix_ns() -> i128 {
    i128::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos(),
    )
    .expect("time fits")
}

/// An app connection: WAL, `synchronous=NORMAL`, a busy timeout as apps are advised to set.
fn open(db: &str) -> Connection {
    let c = Connection::open(db).expect("open the database");
    c.busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
         CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, payload BLOB NOT NULL);",
    )
    .expect("set up");
    c
}

fn throughput(db: &str, secs: &str, rest: &[String]) {
    let secs: f64 = num(secs, "SECS");
    let payload: i64 = flag(rest, "--payload").map_or(200, |v| num(&v, "--payload"));
    let c = open(db);
    if let Some(n) = flag(rest, "--autocheckpoint") {
        c.pragma_update(
            None,
            "wal_autocheckpoint",
            num::<i64>(&n, "--autocheckpoint"),
        )
        .expect("wal_autocheckpoint");
    }
    let autocheckpoint: i64 = c
        .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
        .expect("read wal_autocheckpoint");
    let wal = format!("{db}-wal");
    let mut stmt = c
        .prepare("INSERT INTO t(payload) VALUES (randomblob(?1))")
        .expect("prepare");
    let mut lat: Vec<u32> = Vec::with_capacity(2_000_000);
    let mut slow: Vec<(i128, u32)> = Vec::new();
    let mut wal_max = 0u64;
    let cpu0 = cpu_secs();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        stmt.execute([payload]).expect("insert");
        let d = t0.elapsed();
        lat.push(u32::try_from(d.as_nanos()).unwrap_or(u32::MAX));
        if d > Duration::from_millis(5) {
            slow.push((unix_ns(), u32::try_from(d.as_micros()).unwrap_or(u32::MAX)));
        }
        if lat.len().is_multiple_of(1000) {
            wal_max = wal_max.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu0;
    if let Some(path) = flag(rest, "--slow") {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create --slow"));
        for (t, us) in &slow {
            writeln!(f, "{t} {us}").expect("write --slow");
        }
    }
    let slow_ms = slow.iter().map(|&(_, us)| f64::from(us)).sum::<f64>() / 1000.0;
    // Percentiles of the slow commits alone: the stalls (a barrier, a checkpoint's fsync).
    let mut stalls: Vec<u32> = slow.iter().map(|&(_, us)| us).collect();
    stalls.sort_unstable();
    let stall_pct = |p: f64| {
        let k = stalls.len();
        let i = ((k as f64 * p).ceil() as usize).clamp(1, k.max(1)) - 1;
        f64::from(stalls.get(i).copied().unwrap_or(0)) / 1000.0
    };
    wal_max = wal_max.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
    let n = lat.len();
    let over_20ms = lat.iter().filter(|&&v| v > 20_000_000).count();
    let over_5ms = lat.iter().filter(|&&v| v > 5_000_000).count();
    lat.sort_unstable();
    let pct = |p: f64| {
        let i = ((n as f64 * p).ceil() as usize).clamp(1, n.max(1)) - 1;
        f64::from(lat.get(i).copied().unwrap_or(0)) / 1000.0
    };
    println!(
        "{{\"txns\":{n},\"secs\":{elapsed:.3},\"tps\":{:.0},\"p50_us\":{:.1},\"p99_us\":{:.1},\
         \"p999_us\":{:.1},\"max_us\":{:.1},\"over_5ms\":{over_5ms},\"over_20ms\":{over_20ms},\
         \"in_slow_commits_ms\":{slow_ms:.0},\"slow_p50_ms\":{:.1},\"slow_p99_ms\":{:.1},\"writer_cpu_s\":{cpu:.2},\
         \"wal_max_bytes\":{wal_max},\"autocheckpoint\":{autocheckpoint}}}",
        n as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        pct(0.999),
        f64::from(lat.last().copied().unwrap_or(0)) / 1000.0,
        stall_pct(0.50),
        stall_pct(0.99),
    );
}

/// User + system CPU time of this process, in seconds.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    ticks / 100.0 // USER_HZ, 100 on Linux
}

fn paced(out: &str, rate: &str, secs: &str, dbs: &[String]) {
    let rate: f64 = num(rate, "RATE");
    let secs: f64 = num(secs, "SECS");
    let conns: Vec<Connection> = dbs.iter().map(|d| open(d)).collect();
    let mut stmts: Vec<_> = conns
        .iter()
        .map(|c| {
            c.prepare("INSERT INTO t(payload) VALUES (randomblob(200))")
                .expect("prepare")
        })
        .collect();
    let total = (rate * secs).round() as u64;
    let mut counts = vec![0u64; conns.len()];
    let mut log: Vec<(usize, u64, i128)> = Vec::with_capacity(total as usize);
    let start = Instant::now();
    for k in 0..total {
        let due = start + Duration::from_secs_f64(k as f64 / rate);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let i = (k as usize) % conns.len();
        stmts[i].execute([]).expect("insert");
        counts[i] += 1;
        log.push((i, counts[i], unix_ns()));
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(out).expect("create OUT"));
    for (i, n, t) in &log {
        writeln!(f, "{i} {n} {t}").expect("write OUT");
    }
    f.flush().expect("flush OUT");
    eprintln!(
        "paced: {} commits in {:.1} s over {} databases",
        log.len(),
        start.elapsed().as_secs_f64(),
        conns.len()
    );
}

fn fill(db: &str, mb: &str) {
    let mb: u64 = num(mb, "MB");
    let c = open(db);
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS items(id INTEGER PRIMARY KEY, k INTEGER NOT NULL, body TEXT NOT NULL);
         CREATE INDEX IF NOT EXISTS items_k ON items(k);",
    )
    .expect("create");
    let target = mb * 1_000_000;
    let page_size: u64 = c
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .expect("page size");
    loop {
        let pages: u64 = c
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .expect("page count");
        if pages * page_size >= target {
            break;
        }
        c.execute_batch(
            "BEGIN;
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)
             INSERT INTO items(k, body) SELECT abs(random()) % 1000000000, hex(randomblob(150)) FROM n;
             COMMIT;",
        )
        .expect("fill");
    }
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
}

fn churn(db: &str, secs: &str, rate: &str) {
    let secs: f64 = num(secs, "SECS");
    let rate: f64 = num(rate, "RATE");
    let c = open(db);
    let max: i64 = c
        .query_row("SELECT max(id) FROM items", [], |r| r.get(0))
        .expect("a filled database");
    let mut stmt = c
        .prepare("UPDATE items SET body = hex(randomblob(150)) WHERE id = ?1")
        .expect("prepare");
    let total = (rate * secs).round() as u64;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let start = Instant::now();
    for k in 0..total {
        let due = start + Duration::from_secs_f64(k as f64 / rate);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let id = 1 + i64::try_from(x % u64::try_from(max).expect("max")).expect("id");
        stmt.execute([id]).expect("update");
    }
}
