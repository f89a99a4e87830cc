//! The `zlayer-storage` binary end to end: sync, restore, status, exit codes, and a kill -9 in
//! the middle of a multipart upload to Garage.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
use zlayer_storage::config::{Config, LayerStorageConfig};

use crate::util::garage;

const BIN: &str = env!("CARGO_BIN_EXE_zlayer-storage");

/// A scratch dir with a config file for the binary.
struct Node {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Node {
    /// `storage` gets this node's private staging dir and state DB.
    fn new(mut storage: LayerStorageConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        storage.staging_dir = dir.path().join("staging");
        storage.state_db_path = dir.path().join("state.sqlite");
        let config = dir.path().join("storage.toml");
        let cfg = Config {
            storage,
            ..Config::default()
        };
        std::fs::write(&config, toml::to_string(&cfg).unwrap()).unwrap();
        Self { dir, config }
    }

    fn local(store: &Path) -> Self {
        Self::new(LayerStorageConfig {
            local_store_dir: store.to_path_buf(),
            ..LayerStorageConfig::default()
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--config").arg(&self.config);
        for (k, _) in std::env::vars() {
            if k.starts_with("ZLAYER_") || k == "RUST_LOG" {
                c.env_remove(k);
            }
        }
        c.stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    fn sync(&self, id: &str, upper: &Path) -> Value {
        let out = self.run(&["sync", "--json", "--id", id, upper.to_str().unwrap()]);
        json_ok(&out)
    }

    fn restore(&self, id: &str, target: &Path) -> Output {
        self.run(&["restore", "--json", "--id", id, target.to_str().unwrap()])
    }
}

fn json_ok(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn make_tree(root: &Path, variant: &str) {
    std::fs::create_dir_all(root.join("etc/app")).unwrap();
    std::fs::create_dir_all(root.join("var/empty")).unwrap();
    std::fs::write(root.join("etc/app/config"), format!("variant={variant}\n")).unwrap();
    std::fs::write(root.join("etc/app/big"), vec![b'z'; 3 << 20]).unwrap();
    std::fs::write(root.join("run.sh"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::symlink("../etc/app/config", root.join("var/link")).unwrap();
    std::fs::hard_link(root.join("run.sh"), root.join("run2.sh")).unwrap();
}

/// Path → (type bits and mode, uid, gid, size, mtime s+ns, content hash or link target).
fn describe_tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let md = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let ft = md.file_type();
            let body = if ft.is_symlink() {
                std::fs::read_link(&path).unwrap().display().to_string()
            } else if ft.is_dir() {
                walk(root, &path, out);
                String::new()
            } else {
                hex::encode(Sha256::digest(std::fs::read(&path).unwrap()))
            };
            let mtime = if ft.is_symlink() {
                String::new()
            } else {
                format!("{}.{}", md.mtime(), md.mtime_nsec())
            };
            let size = if ft.is_file() { md.len() } else { 0 };
            out.insert(
                rel,
                format!(
                    "{:o} {} {} {size} {mtime} {} {body}",
                    md.mode(),
                    md.uid(),
                    md.gid(),
                    md.nlink()
                ),
            );
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn round_trip(a: &Node, b: &Node) {
    let upper = a.path("upper");
    make_tree(&upper, "1");
    let first = a.sync("web/0", &upper);
    assert_eq!(first["unchanged"], false);
    assert_eq!(first["manifest_moved"], true);
    let digest = first["digest"].as_str().unwrap().to_string();
    assert_eq!(digest.len(), 64);

    // Another node with an empty disk restores it.
    let target = b.path("restored");
    let restored = json_ok(&b.restore("web/0", &target));
    assert_eq!(restored["digest"], digest.as_str());
    assert_eq!(describe_tree(&upper), describe_tree(&target));

    // Unchanged re-sync uploads nothing, on the first node and on the restoring one.
    let again = a.sync("web/0", &upper);
    assert_eq!(again["unchanged"], true);
    assert!(again["upload"].is_null());
    assert_eq!(again["digest"], digest.as_str());
    let from_restored = b.sync("web/0", &target);
    assert_eq!(from_restored["unchanged"], true);

    // A change is uploaded and becomes current.
    std::fs::write(upper.join("etc/app/config"), "variant=2\n").unwrap();
    let changed = a.sync("web/0", &upper);
    assert_eq!(changed["unchanged"], false);
    assert_ne!(changed["digest"], digest.as_str());
    let target2 = b.path("restored2");
    let restored2 = json_ok(&b.restore("web/0", &target2));
    assert_eq!(restored2["digest"], changed["digest"]);
    assert_eq!(describe_tree(&upper), describe_tree(&target2));

    let status = json_ok(&a.run(&["status", "--json"]));
    let states = status["layers"].as_array().unwrap();
    assert_eq!(states.len(), 1);
    assert_eq!(states[0]["remote_digest"], changed["digest"]);
    let text = a.run(&["status"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("web/0"));
}

#[test]
fn local_store_sync_restore_and_unchanged_resync() {
    let store = tempfile::tempdir().unwrap();
    let (a, b) = (Node::local(store.path()), Node::local(store.path()));
    round_trip(&a, &b);
    let gc = a.run(&["gc"]);
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
}

#[test]
fn garage_sync_restore_and_unchanged_resync() {
    let Some(g) = garage::garage_or_skip("layer-cli-round-trip") else {
        return;
    };
    let storage = g.config("layer-cli-round-trip");
    let (a, b) = (Node::new(storage.clone()), Node::new(storage));
    round_trip(&a, &b);
}

#[test]
fn bad_config_exits_3_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[storage]\npart_size_bytes = 1024\n", "part_size_bytes"),
        ("[storage]\nbukket = \"x\"\n", "bukket"),
        ("[storage]\nbackend = \"s3\"\n", "bucket"),
    ];
    for (i, (text, key)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&path)
            .args(["sync", "--id", "a/b", "/nonexistent"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("zlayer-storage: "), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(err.contains(key), "{key} not named: {err}");
    }
    // Problems only found when the store opens are config errors too.
    let path = dir.path().join("secret.toml");
    std::fs::write(
        &path,
        "[storage]\nbackend = \"s3\"\nbucket = \"b\"\nendpoint_url = \"http://127.0.0.1:9\"\n\
         access_key_id = \"AK\"\nsecret_access_key_file = \"/nonexistent/secret\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .args(["status"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("/nonexistent/secret"), "{err}");
    // An explicit config path that does not exist is a config error too.
    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/zlayer.toml", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    // A bad environment override names the variable.
    let node = Node::local(dir.path());
    let out = node
        .cmd()
        .env("ZLAYER_STORAGE_PART_SIZE_BYTES", "lots")
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ZLAYER_STORAGE_PART_SIZE_BYTES"));
}

#[test]
fn restore_of_unknown_identity_exits_4_and_usage_errors_exit_2() {
    let store = tempfile::tempdir().unwrap();
    let node = Node::local(store.path());
    let target = node.path("target");
    let out = node.restore("nobody/0", &target);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("nobody/0"));
    assert!(!target.exists());

    let out = node.run(&["sync", "--id", "no-slash", "/tmp"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-slash"));
    let out = node.run(&["sync"]);
    assert_eq!(out.status.code(), Some(2));

    // A runtime failure is exit 1 with one line naming the path.
    let out = node.run(&["sync", "--id", "a/b", "/nonexistent/upper"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/upper"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");

    let out = node.run(&["version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

/// `ls`, `restore --seq/--at`, `rollback` and `gc --dry-run`/`gc` through the binary.
#[test]
fn ls_restore_seq_rollback_and_gc_of_old_versions() {
    let store = tempfile::tempdir().unwrap();
    let storage = |keep: usize| LayerStorageConfig {
        local_store_dir: store.path().to_path_buf(),
        history_keep: keep,
        gc_grace_secs: 0,
        ..LayerStorageConfig::default()
    };
    let (a, b) = (Node::new(storage(3)), Node::new(storage(1)));
    let empty = a.run(&["ls"]);
    assert!(String::from_utf8_lossy(&empty.stdout).contains("no identities"));

    // Three versions of web/0; remember each tree.
    let upper = a.path("upper");
    make_tree(&upper, "1");
    let mut trees = Vec::new();
    let mut digests = Vec::new();
    let mut between = String::new();
    for v in 1..=3 {
        std::fs::write(upper.join("etc/app/config"), format!("variant={v}\n")).unwrap();
        digests.push(
            a.sync("web/0", &upper)["digest"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        trees.push(describe_tree(&upper));
        if v == 1 {
            std::thread::sleep(Duration::from_millis(20));
            between = chrono::Utc::now().to_rfc3339();
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let other = a.path("other");
    make_tree(&other, "db");
    a.sync("db/0", &other);

    let ls = json_ok(&a.run(&["ls", "--json"]));
    let ls = ls.as_array().unwrap();
    assert_eq!(ls.len(), 2);
    assert_eq!(ls[1]["identity"]["service"], "web");
    assert_eq!(ls[1]["versions"], 3);
    assert_eq!(ls[1]["digest"], digests[2].as_str());
    let text = String::from_utf8_lossy(&a.run(&["ls"]).stdout).to_string();
    assert!(text.contains("web/0") && text.contains("db/0"), "{text}");
    let history = json_ok(&a.run(&["ls", "--json", "--id", "web/0"]));
    let seq1 = history["history"][1]["seq"].as_u64().unwrap();
    assert_eq!(history["history"][1]["digest"], digests[0].as_str());
    let text = String::from_utf8_lossy(&a.run(&["ls", "--id", "web/0"]).stdout).to_string();
    assert_eq!(text.lines().count(), 4, "header + 3 versions: {text}");

    // Another node restores version 1 by seq and by time.
    let by_seq = b.path("by-seq");
    let out = b.run(&[
        "restore",
        "--json",
        "--id",
        "web/0",
        "--seq",
        &seq1.to_string(),
        by_seq.to_str().unwrap(),
    ]);
    assert_eq!(json_ok(&out)["digest"], digests[0].as_str());
    assert_eq!(describe_tree(&by_seq), trees[0]);
    let by_time = b.path("by-time");
    json_ok(&b.run(&[
        "restore",
        "--json",
        "--id",
        "web/0",
        "--at",
        &between,
        by_time.to_str().unwrap(),
    ]));
    assert_eq!(describe_tree(&by_time), trees[0]);
    let out = b.run(&[
        "restore",
        "--id",
        "web/0",
        "--seq",
        "999",
        b.path("none").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("web/0") && err.contains("seq 999"), "{err}");
    let out = b.run(&["restore", "--id", "web/0", "--at", "last week", "x"]);
    assert_eq!(out.status.code(), Some(2));

    // Rollback makes version 1 current again, under a higher seq.
    let rolled = json_ok(&a.run(&[
        "rollback",
        "--json",
        "--id",
        "web/0",
        "--seq",
        &seq1.to_string(),
    ]));
    assert!(
        rolled["current"]["seq"].as_u64().unwrap() > history["current"]["seq"].as_u64().unwrap()
    );
    let current = b.path("current");
    json_ok(&b.restore("web/0", &current));
    assert_eq!(describe_tree(&current), trees[0]);

    // gc on a node keeping 1 version: a dry run lists versions 2 and 3 and deletes nothing.
    let objects = |dir: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(dir.join("layers"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let listing = objects(store.path());
    let dry = json_ok(&b.run(&["gc", "--dry-run", "--json"]));
    assert_eq!(objects(store.path()), listing);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["objects_deleted"], 4);
    assert_eq!(dry["manifests_trimmed"], 1);
    let deleted: Vec<&str> = dry["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    for d in &digests[1..] {
        assert!(
            deleted.contains(&format!("{d}.tar.zst").as_str()),
            "{deleted:?}"
        );
    }
    let text = String::from_utf8_lossy(&b.run(&["gc", "--dry-run"]).stdout).to_string();
    assert!(
        text.contains("would be deleted") && text.contains(&digests[1]),
        "{text}"
    );
    assert_eq!(objects(store.path()), listing);

    let done = json_ok(&b.run(&["gc", "--json"]));
    assert_eq!(done["deleted"], dry["deleted"]);
    let after = json_ok(&a.run(&["ls", "--json", "--id", "web/0"]));
    assert_eq!(after["history"].as_array().unwrap().len(), 0);
    let again = b.path("again");
    json_ok(&b.restore("web/0", &again));
    assert_eq!(describe_tree(&again), trees[0]);
}

/// Writes `n` files of `size` bytes of /dev/urandom; returns their sha256 by name.
fn random_files(dir: &Path, n: usize, size: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut urandom = std::fs::File::open("/dev/urandom").unwrap();
    for i in 0..n {
        let mut f = std::fs::File::create(dir.join(format!("blob{i}"))).unwrap();
        let copied = std::io::copy(&mut (&mut urandom).take(size), &mut f).unwrap();
        assert_eq!(copied, size);
        f.flush().unwrap();
    }
}

/// Parts journaled for uploads in progress, read from the state DB while the CLI runs.
fn journaled_parts(db: &Path) -> Option<(u64, u64)> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.busy_timeout(Duration::from_millis(200)).ok()?;
    let parts: u64 = conn
        .query_row("SELECT COUNT(*) FROM upload_parts", [], |r| r.get(0))
        .ok()?;
    let total: u64 = conn
        .query_row(
            "SELECT COALESCE(SUM(total_parts), 0) FROM pending_uploads",
            [],
            |r| r.get(0),
        )
        .ok()?;
    Some((parts, total))
}

/// Whether a packed archive waits in the staging dir for its upload to finish.
fn intent_committed(staging: &Path) -> bool {
    std::fs::read_dir(staging.join("ready")).is_ok_and(|d| {
        d.filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().ends_with(".intent.json"))
    })
}

/// Kills `child` (SIGKILL) once `ready` holds; panics if it finishes first.
fn kill_when(child: &mut std::process::Child, what: &str, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("sync finished before it could be killed ({what}): {status}");
        }
        if ready() {
            break;
        }
        assert!(Instant::now() < deadline, "never reached: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

#[test]
fn kill_9_mid_upload_then_rerun_sends_only_missing_parts() {
    let Some(g) = garage::garage_or_skip("layer-cli-crash") else {
        return;
    };
    let mut storage = g.config("layer-cli-crash");
    storage.part_size_bytes = 8 << 20;
    storage.max_concurrent_uploads = 2;
    let node = Node::new(storage);
    let upper = node.path("upper");
    random_files(&upper, 5, 64 << 20); // 320 MiB, incompressible
    let db = node.path("state.sqlite");
    let sync = || {
        node.cmd()
            .args(["sync", "--json", "--id", "crash/0", upper.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // 1. Killed after packing, while the archive streams to a temporary key (not journaled):
    //    the packed spool and its intent survive.
    let mut child = sync();
    kill_when(&mut child, "archive packed", || {
        intent_committed(&node.path("staging"))
    });
    assert_eq!(
        journaled_parts(&db),
        Some((0, 0)),
        "streamed parts are not journaled"
    );

    // 2. The rerun finishes that archive with the journaled upload; killed in the middle.
    let mut child = sync();
    let counted = std::cell::Cell::new((0, 0));
    kill_when(&mut child, "a third of the parts journaled", || {
        journaled_parts(&db).is_some_and(|(parts, total)| {
            counted.set((parts, total));
            total > 0 && parts >= (total / 3).max(3)
        })
    });
    let (before, total) = counted.get();
    assert!(
        before < total,
        "all {total} parts journaled before the kill"
    );
    // Parts recorded after the count was read but before the kill landed count too.
    let (recorded, _) = journaled_parts(&db).unwrap();
    assert!(recorded >= before);
    eprintln!("killed after {recorded} of {total} parts were journaled");

    let out = node
        .cmd()
        .args(["sync", "--json", "--id", "crash/0", upper.to_str().unwrap()])
        .output()
        .unwrap();
    let second = json_ok(&out);
    let upload = &second["upload"];
    let (sent, reused, parts_total) = (
        upload["parts_sent"].as_u64().unwrap(),
        upload["parts_reused"].as_u64().unwrap(),
        upload["parts_total"].as_u64().unwrap(),
    );
    eprintln!("rerun: {sent} sent, {reused} reused of {parts_total}");
    assert_eq!(parts_total, total);
    assert!(reused >= recorded, "reused {reused} < journaled {recorded}");
    assert_eq!(sent + reused, parts_total);
    assert_eq!(second["manifest_moved"], true);
    assert_eq!(journaled_parts(&db), Some((0, 0)), "journal not cleared");

    // The object is complete and correct: a restore verifies the digest and the files match.
    let target = node.path("restored");
    let restored = json_ok(&node.restore("crash/0", &target));
    assert_eq!(restored["digest"], second["digest"]);
    assert_eq!(describe_tree(&upper), describe_tree(&target));
}
