//! SQLite replication against Garage with real processes (issue 9): a writer process and
//! `zlayer-storage db replicate` killed with SIGKILL at random points, app checkpoints while
//! the replicator is down, a store outage, damaged objects, point in time, and wrapper mode.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use zlayer_storage::config::{Config, DatabaseEntry, LayerStorageConfig, ReplicateConfig};
use zlayer_storage::replicator::{ReplicatorOptions, SqliteReplicator, SqliteReplicatorConfig};
use zlayer_storage::store::{PutCondition, open_store};

use crate::util::garage::garage_or_skip;

const BIN: &str = env!("CARGO_BIN_EXE_zlayer-storage");

/// The writer process (`examples/sqlite_writer.rs`), built by `cargo test` with the tests.
fn writer_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let debug = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let bin = debug.join("examples").join("sqlite_writer");
    assert!(
        bin.exists(),
        "missing {} (cargo test builds it: examples/sqlite_writer.rs)",
        bin.display()
    );
    bin
}

/// One node: a config file for the CLI with Garage as the store.
struct Node {
    dir: tempfile::TempDir,
    config: PathBuf,
    db: PathBuf,
    storage: LayerStorageConfig,
    replicate: ReplicateConfig,
}

impl Node {
    fn new(storage: LayerStorageConfig) -> Self {
        let dir = tempfile::tempdir().expect("node dir");
        let db = dir.path().join("app.db");
        let replicate = ReplicateConfig {
            sync_interval_ms: 200,
            cache_dir: dir.path().join("cache"),
            control_socket: dir.path().join("db.sock"),
            databases: vec![DatabaseEntry {
                path: db.clone(),
                name: Some("app".into()),
            }],
            ..ReplicateConfig::default()
        };
        let config = dir.path().join("storage.toml");
        let cfg = Config {
            storage: storage.clone(),
            replicate: replicate.clone(),
            ..Config::default()
        };
        std::fs::write(&config, toml::to_string(&cfg).expect("config toml")).expect("config");
        Self {
            dir,
            config,
            db,
            storage,
            replicate,
        }
    }

    /// The app's connection to a new database in WAL mode with the numbered table.
    fn app(&self) -> Connection {
        let app = Connection::open(&self.db).unwrap();
        app.execute_batch(
            "PRAGMA journal_mode=WAL; CREATE TABLE t(seq INTEGER PRIMARY KEY, payload BLOB);",
        )
        .unwrap();
        app
    }

    fn cli(&self) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--config")
            .arg(&self.config)
            .env_remove("ZLAYER_CONFIG");
        c
    }

    fn replicator(&self, log: &str) -> Child {
        let log = std::fs::File::create(self.dir.path().join(log)).expect("log");
        self.cli()
            .args(["db", "replicate"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start db replicate")
    }

    fn writer(&self, extra: &[&str]) -> Child {
        Command::new(writer_bin())
            .arg("write")
            .arg(&self.db)
            .arg(self.dir.path().join("acks"))
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("start the writer")
    }

    /// `db flush`: Ok once durable.
    fn flush(&self) -> Result<(), String> {
        let out = self
            .cli()
            .args(["db", "flush", "--db"])
            .arg(&self.db)
            .args(["--timeout", "30"])
            .output()
            .expect("db flush");
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    }

    /// Flushes, retrying while the replicator starts (its socket is not there yet).
    fn flush_when_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.flush() {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("flush never succeeded: {e}\n{}", self.log("replicator.log")),
            }
        }
    }

    fn restore(&self, out: &Path, extra: &[&str]) -> std::process::Output {
        self.cli()
            .args(["db", "restore", "--db"])
            .arg(&self.db)
            .arg("--output")
            .arg(out)
            .args(extra)
            .output()
            .expect("db restore")
    }

    fn acked(&self) -> Vec<u64> {
        std::fs::read_to_string(self.dir.path().join("acks"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    fn log(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        text[text.floor_char_boundary(start)..].to_string()
    }
}

/// A child process killed (SIGKILL) when dropped, so a failing test leaves none behind.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        kill9(self);
    }
}

fn kill9(child: &mut Proc) {
    let _ = child.0.kill();
    let _ = child.0.wait();
}

fn stop(proc: &mut Proc) -> std::process::ExitStatus {
    let child = &mut proc.0;
    let pid = rustix::process::Pid::from_child(child);
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "replicator did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (seq, payload) rows of a database, after `PRAGMA integrity_check`.
fn rows(path: &Path) -> Vec<(i64, Vec<u8>)> {
    let c = Connection::open(path).expect("open");
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(ok, "ok", "{}", path.display());
    let mut s = c
        .prepare("SELECT seq, payload FROM t ORDER BY seq")
        .expect("select");
    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("rows")
        .map(Result::unwrap)
        .collect()
}

fn seqs(rows: &[(i64, Vec<u8>)]) -> Vec<u64> {
    rows.iter()
        .map(|(s, _)| u64::try_from(*s).unwrap())
        .collect()
}

/// A tiny xorshift, seeded from the clock and printed, so a failing round can be replayed
/// with `ZLAYER_TEST_SEED`.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = std::env::var("ZLAYER_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                u64::from(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .subsec_nanos(),
                ) | 1
            });
        eprintln!("seed {seed} (ZLAYER_TEST_SEED to replay)");
        Self(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// 20 rounds: the writer (mixed sizes, multi-page rows, transactions larger than its cache, a
/// VACUUM every 1000, page size 8192, sometimes checkpointing itself in every mode) and the
/// replicator are killed with SIGKILL at random points; while the replicator is down the
/// writer goes on alone (its autocheckpoint restarts the WAL). Then a restore to a fresh path
/// must pass integrity_check, hold every transaction acknowledged before the last completed
/// flush, have no gap, and equal the source row for row.
#[test]
fn kill_9_of_writer_and_replicator_loses_no_acknowledged_transaction() {
    let Some(g) =
        garage_or_skip("kill_9_of_writer_and_replicator_loses_no_acknowledged_transaction")
    else {
        return;
    };
    let node = Node::new(g.config("sqlite-crash"));
    let mut rng = Rng::new();
    let mut replicator: Option<Proc> = None;
    let mut durable_through = 0u64;
    let mut flushes = 0;
    for round in 0..20 {
        let replicator_up = replicator.is_some() || rng.below(4) != 0;
        if replicator_up && replicator.is_none() {
            replicator = Some(Proc(node.replicator("replicator.log")));
        }
        // Paced, so the rounds stay seconds long on a debug build.
        let extra: &[&str] = if round % 3 == 0 {
            &["--checkpoints", "--pace-us", "1000"]
        } else {
            &["--pace-us", "1000"]
        };
        let mut writer = Proc(node.writer(extra));
        std::thread::sleep(Duration::from_millis(150 + rng.below(500)));
        if replicator.is_some() && rng.below(2) == 0 {
            let before = node.acked().last().copied().unwrap_or(0);
            if node.flush().is_ok() {
                durable_through = durable_through.max(before);
                flushes += 1;
            }
        }
        // Kill in a random order, a random moment apart (mid-pump, mid-upload, mid-commit).
        if rng.below(2) == 0 {
            kill9(&mut writer);
        }
        std::thread::sleep(Duration::from_millis(rng.below(150)));
        if let Some(mut r) = replicator.take() {
            if rng.below(3) == 0 {
                replicator = Some(r);
            } else {
                kill9(&mut r);
            }
        }
        kill9(&mut writer);
    }
    // The last word: the replicator up, everything committed made durable.
    let mut r = replicator.unwrap_or_else(|| Proc(node.replicator("replicator.log")));
    node.flush_when_up();
    let acked = node.acked();
    durable_through = durable_through.max(acked.last().copied().unwrap_or(0));
    let status = stop(&mut r);
    assert!(
        status.success(),
        "db replicate exit: {status}\n{}",
        node.log("replicator.log")
    );

    let restored = node.dir.path().join("restored.db");
    let out = node.restore(&restored, &[]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log("replicator.log")
    );
    let got = rows(&restored);
    let source = rows(&node.db);
    let got_seqs = seqs(&got);
    let expected: Vec<u64> = (1..=got_seqs.len() as u64).collect();
    assert!(got_seqs == expected, "a gap in the restored transactions");
    assert!(
        got_seqs.last().copied().unwrap_or(0) >= durable_through,
        "acknowledged through {durable_through} before a completed flush, restored only {:?}",
        got_seqs.last()
    );
    assert_eq!(
        seqs(&source),
        got_seqs,
        "restored transactions differ from the source"
    );
    assert!(got == source, "same transactions, different contents");
    eprintln!(
        "{} transactions, {} acknowledged, {flushes} flushes in the rounds, restored equal",
        got.len(),
        acked.len()
    );
}

/// Point in time by timestamp on Garage: each restore returns exactly the state as of its time.
#[test]
fn point_in_time_restores_return_exactly_the_state_at_each_time() {
    let Some(g) = garage_or_skip("point_in_time_restores_return_exactly_the_state_at_each_time")
    else {
        return;
    };
    let node = Node::new(g.config("sqlite-pitr"));
    let rt = runtime();
    let app = node.app();
    let r = started(&rt, &node, |_| {});
    let mut marks = Vec::new();
    let before_first = chrono::Utc::now();
    for seq in 1..=12i64 {
        app.execute(
            "INSERT INTO t VALUES (?1, randomblob(?2))",
            rusqlite::params![seq, 100 + seq * 700],
        )
        .unwrap();
        // Let the replicator see this commit alone, then mark a time after it.
        std::thread::sleep(Duration::from_millis(120));
        marks.push((seq, chrono::Utc::now()));
        std::thread::sleep(Duration::from_millis(30));
    }
    rt.block_on(r.flush()).unwrap();
    rt.block_on(r.stop(Duration::from_secs(10))).unwrap();
    for (seq, at) in marks.iter().step_by(3) {
        let out = node.dir.path().join(format!("at-{seq}.db"));
        let res = node.restore(&out, &["--timestamp", &at.to_rfc3339()]);
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        let got = seqs(&rows(&out));
        assert_eq!(
            got,
            (1..=u64::try_from(*seq).unwrap()).collect::<Vec<_>>(),
            "as of {at}"
        );
    }
    // Before the first commit: the base, empty.
    let first = before_first;
    let out = node.dir.path().join("at-start.db");
    let res = node.restore(&out, &["--timestamp", &first.to_rfc3339()]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(seqs(&rows(&out)), Vec::<u64>::new());
}

/// Garage unreachable for a while: commits wait in the cache (bounded: reading stops when it is
/// full, and the pin keeps the WAL), status says so, and after the store is back everything
/// is shipped and a restore equals the source.
#[test]
fn a_store_outage_loses_nothing_keeps_the_cache_bounded_and_catches_up() {
    let Some(g) =
        garage_or_skip("a_store_outage_loses_nothing_keeps_the_cache_bounded_and_catches_up")
    else {
        return;
    };
    let rt = runtime();
    let proxy = rt.block_on(OutageProxy::start(g.endpoint()));
    let mut storage = g.config_via("sqlite-outage", &proxy.endpoint());
    storage.max_retries = 1;
    let node = Node::new(storage);
    let app = node.app();
    let r = started(&rt, &node, |c| c.max_cache_size = 1 << 20);
    rt.block_on(r.flush()).unwrap();
    proxy.down();
    // ~3 MiB of commits (incompressible) against a 1 MiB cache.
    for seq in 1..=300i64 {
        app.execute(
            "INSERT INTO t VALUES (?1, randomblob(10000))",
            rusqlite::params![seq],
        )
        .unwrap();
        if seq % 50 == 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let during = r.status();
    assert!(during.cache_full, "{during:?}");
    assert!(during.last_error.is_some(), "{during:?}");
    assert!(
        during.pending_bytes < (1 << 20) + (1 << 20),
        "cache grew past its limit by more than one segment: {during:?}"
    );
    assert!(during.durable_txid < 300, "{during:?}");
    let err = rt
        .block_on(r.flush_within(Duration::from_secs(2)))
        .unwrap_err();
    eprintln!("flush during the outage: {err}");
    proxy.up();
    rt.block_on(r.flush_within(Duration::from_secs(60)))
        .unwrap();
    let after = r.status();
    assert!(!after.cache_full, "{after:?}");
    assert_eq!(after.pending_bytes, 0, "{after:?}");
    rt.block_on(r.stop(Duration::from_secs(10))).unwrap();
    let restored = node.dir.path().join("restored.db");
    let out = node.restore(&restored, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = rows(&restored);
    assert_eq!(seqs(&got), (1..=300).collect::<Vec<_>>());
    assert!(got == rows(&node.db));
}

/// A damaged segment and a missing one in Garage: the restore fails naming the object and
/// leaves no file behind.
#[test]
fn corrupt_and_missing_segments_fail_the_restore_naming_the_object() {
    let Some(g) = garage_or_skip("corrupt_and_missing_segments_fail_the_restore_naming_the_object")
    else {
        return;
    };
    let node = Node::new(g.config("sqlite-damage"));
    let rt = runtime();
    let app = node.app();
    let r = started(&rt, &node, |_| {});
    for seq in 1..=3i64 {
        app.execute("INSERT INTO t VALUES (?1, randomblob(5000))", [seq])
            .unwrap();
        rt.block_on(r.flush()).unwrap();
    }
    let m = rt.block_on(r.manifest()).unwrap().unwrap();
    rt.block_on(r.stop(Duration::from_secs(10))).unwrap();
    let generation = m.current().unwrap();
    assert!(generation.segments.len() >= 3, "{m:?}");
    let key = |i: usize| {
        zlayer_storage::replicator::manifest::segment_key(
            &generation.id,
            generation.segments[i].first,
            generation.segments[i].last,
        )
    };
    let mut storage = node.storage.clone();
    storage.prefix = format!("{}sqlite/app/", node.storage.prefix);
    let store = rt.block_on(open_store(&storage)).unwrap();
    // Flip a byte in the middle of the second segment.
    let mut bytes = rt.block_on(store.get_bytes(&key(1))).unwrap().unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    rt.block_on(store.put_bytes(&key(1), bytes, PutCondition::None))
        .unwrap();
    let out_path = node.dir.path().join("corrupt.db");
    let out = node.restore(&out_path, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&key(1)), "{stderr}");
    assert!(!out_path.exists());
    // Remove the third.
    rt.block_on(store.delete(&key(2))).unwrap();
    let out_path = node.dir.path().join("missing.db");
    let out = node.restore(
        &out_path,
        &["--txid", &generation.segments[2].last.to_string()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&key(1)) || stderr.contains(&key(2)),
        "{stderr}"
    );
    // Up to the first segment still restores.
    let out_path = node.dir.path().join("first.db");
    let out = node.restore(
        &out_path,
        &["--txid", &generation.segments[0].last.to_string()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leftovers: Vec<_> = std::fs::read_dir(node.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("restore"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Wrapper mode: a missing database is restored before the app starts, signals reach the app,
/// its exit code comes back, and what it wrote is durable when the wrapper exits.
#[test]
fn wrapper_mode_restores_forwards_signals_flushes_and_exits_with_the_apps_code() {
    let Some(g) = garage_or_skip(
        "wrapper_mode_restores_forwards_signals_flushes_and_exits_with_the_apps_code",
    ) else {
        return;
    };
    let node = Node::new(g.config("sqlite-wrapper"));
    // 1. The app exits by itself with code 7 after 200 transactions: all durable.
    let out = node
        .cli()
        .args(["db", "replicate", "--"])
        .arg(writer_bin())
        .arg("write")
        .arg(&node.db)
        .arg(node.dir.path().join("acks"))
        .args(["--max", "200", "--exit", "7"])
        .output()
        .expect("wrapper");
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = node.dir.path().join("after-exit.db");
    let res = node.restore(&restored, &[]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(seqs(&rows(&restored)), (1..=200).collect::<Vec<_>>());

    // 2. A fresh node (database missing): restored before the app starts.
    for side in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{side}", node.db.display()));
    }
    std::fs::remove_dir_all(node.dir.path().join("cache")).unwrap();
    let count = node.dir.path().join("count");
    let out = node
        .cli()
        .args(["db", "replicate", "--"])
        .arg(writer_bin())
        .arg("count")
        .arg(&node.db)
        .arg(&count)
        .output()
        .expect("wrapper");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&count).unwrap(), "200");

    // 3. SIGTERM to the wrapper reaches the app (killed by it: 128 + 15), then everything the
    //    app committed is durable.
    let mut wrapper = Proc(
        node.cli()
            .args(["db", "replicate", "--"])
            .arg(writer_bin())
            .arg("write")
            .arg(&node.db)
            .arg(node.dir.path().join("acks"))
            .stdin(Stdio::null())
            .spawn()
            .expect("wrapper"),
    );
    let start = Instant::now();
    while node.acked().len() < 400 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the app did not write"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = stop(&mut wrapper);
    assert_eq!(status.code(), Some(143), "{status}");
    let acked = node.acked();
    let restored = node.dir.path().join("after-term.db");
    let res = node.restore(&restored, &[]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let got = seqs(&rows(&restored));
    assert!(
        got.last() >= acked.last(),
        "acked {:?}, restored {:?}",
        acked.last(),
        got.last()
    );
    assert!(got == seqs(&rows(&node.db)));
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The node's replicator (`tweak` adjusts its settings), started and reading.
fn started(
    rt: &tokio::runtime::Runtime,
    node: &Node,
    tweak: impl FnOnce(&mut SqliteReplicatorConfig),
) -> SqliteReplicator {
    let mut config = SqliteReplicatorConfig::from_section(&node.db, &node.replicate, &node.storage);
    tweak(&mut config);
    let options = ReplicatorOptions::from_section(&node.replicate, Some("app".into()));
    let r = rt
        .block_on(SqliteReplicator::with_options(
            config,
            &node.storage,
            options,
        ))
        .unwrap();
    rt.block_on(r.start()).unwrap();
    wait_running(&r);
    r
}

fn wait_running(r: &SqliteReplicator) {
    let start = Instant::now();
    while !r.status().running {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            r.status()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A TCP proxy in front of Garage that can be taken down: then it drops every open connection
/// and resets new ones, as a store that went away does.
struct OutageProxy {
    addr: std::net::SocketAddr,
    down: Arc<AtomicBool>,
    epoch: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OutageProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OutageProxy {
    async fn start(upstream: &str) -> Self {
        let upstream: std::net::SocketAddr =
            upstream.trim_start_matches("http://").parse().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let (epoch, _) = tokio::sync::watch::channel(0u64);
        let (flag, epochs) = (Arc::clone(&down), epoch.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if flag.load(Ordering::SeqCst) {
                    let _ = client.set_zero_linger();
                    continue;
                }
                let mut cut = epochs.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {
                            let _ = client.set_zero_linger();
                        }
                    }
                });
            }
        });
        Self {
            addr,
            down,
            epoch,
            task,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn down(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.epoch.send_modify(|e| *e += 1);
    }

    fn up(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}
