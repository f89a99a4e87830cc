//! The control socket with a real containerd, runc, the daemon and Garage (issue 8 §1–2, §5):
//! `flush` through the CLI (gRPC) and the hook's JSON line, running containers refused,
//! `status` from the daemon, and a flush acknowledged just before a daemon crash.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::containerd_e2e::{describe_run, garage_storage, run_zlayer, upper_dir};
use crate::util::containerd::{
    ID_LABEL, Node, SNAPSHOTTER, SnapshotterDaemon, SnapshotterOptions, require_containerd,
};
use crate::util::image::IMAGE_REF;

/// One hook request line; returns the daemon's answer as JSON.
fn hook_line(socket: &Path, request: &serde_json::Value) -> serde_json::Value {
    let mut s = UnixStream::connect(socket).expect("connect to the control socket");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut line = serde_json::to_vec(request).unwrap();
    line.push(b'\n');
    s.write_all(&line).unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("answer {answer:?}: {e}"))
}

/// What the store holds for `identity` at `path` (restored by the CLI), if anything.
fn stored_file(daemon: &SnapshotterDaemon, identity: &str, path: &str) -> Option<String> {
    let dir = tempfile::Builder::new()
        .prefix("zl-restored-")
        .tempdir()
        .unwrap();
    let target = dir.path().join("upper");
    let out = daemon.cli(&["restore", "--id", identity, &target.to_string_lossy()]);
    out.status
        .success()
        .then(|| fs::read_to_string(target.join(path)).unwrap_or_default())
}

#[test]
fn flush_by_cli_and_hook_line_makes_a_stopped_containers_layer_durable() {
    if !require_containerd() {
        return;
    }
    let Some(storage) = garage_storage("control-flush") else {
        return;
    };
    let node = Node::start(SnapshotterOptions::new(storage));
    let c = &node.containerd;
    let d = &node.snapshotter;
    // Kept (no --rm): the container stays, its snapshot too, nobody removes it.
    run_zlayer(
        c,
        Some("ctl/0"),
        false,
        "k1",
        "mkdir -p /data && echo v1 > /data/f",
    );

    let out = d.cli(&[
        "flush",
        "k1",
        "--namespace",
        c.namespace(),
        "--wait",
        "120",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "flush failed:\n{}",
        describe_run(&out)
    );
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["state"], "durable", "{reply}");
    assert_eq!(reply["identity"], "ctl/0");
    assert_eq!(stored_file(d, "ctl/0", "data/f").as_deref(), Some("v1\n"));

    // The hook's protocol, by upper dir as it finds it in mountinfo, waiting for durability.
    let upper = upper_dir(c, "k1");
    fs::write(upper.join("data/f"), "v2\n").unwrap();
    let answer = hook_line(
        &d.control_socket(),
        &serde_json::json!({"v": 1, "op": "flush", "origin": "hook", "namespace": c.namespace(),
            "container_id": "k1", "upper": upper, "status": "stopped", "wait_ms": 120_000}),
    );
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["state"], "durable", "{answer}");
    assert_eq!(stored_file(d, "ctl/0", "data/f").as_deref(), Some("v2\n"));
    let digest = answer["digest"].as_str().unwrap().to_string();

    // List (the store's cross-node view) through the gRPC API.
    let listed = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut client = zlayer_storage::control::client::connect(&d.control_socket())
            .await
            .unwrap();
        client
            .list(zlayer_storage::proto::control::ListRequest {})
            .await
            .unwrap()
            .into_inner()
    });
    let entry = listed
        .identities
        .iter()
        .find(|i| i.identity == "ctl/0")
        .unwrap_or_else(|| panic!("{listed:?}"));
    assert_eq!(entry.digest, digest);
    assert!(
        entry.versions >= 2 && entry.compressed_size_bytes > 0,
        "{entry:?}"
    );

    // Not ours: not_persisted, not an error. Malformed: a clear error naming the problem.
    let other = hook_line(
        &d.control_socket(),
        &serde_json::json!({"v": 1, "op": "flush", "origin": "hook", "namespace": "default",
            "container_id": "nope", "upper": "/var/lib/elsewhere/1/fs", "status": "stopped"}),
    );
    assert_eq!(other["state"], "not_persisted", "{other}");
    let bad = hook_line(
        &d.control_socket(),
        &serde_json::json!({"v": 2, "op": "flush"}),
    );
    assert_eq!(bad["ok"], false);
    assert_eq!(bad["code"], "invalid", "{bad}");

    // status (from the daemon) shows the identity with the stored digest.
    let out = d.cli(&["status", "--json"]);
    assert!(out.status.success(), "{}", describe_run(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids = status["daemon"]["identities"].as_array().unwrap();
    let me = ids
        .iter()
        .find(|i| i["identity"] == "ctl/0")
        .unwrap_or_else(|| panic!("{status}"));
    assert_eq!(me["remote_digest"], digest.as_str(), "{status}");
    assert_eq!(
        me["snapshot_key"].as_str().unwrap().rsplit('/').next(),
        Some("k1")
    );

    // A running container is refused unless the caller waives crash consistency.
    let label = format!("{ID_LABEL}=ctl/1");
    c.ctr_ok(&[
        "run",
        "-d",
        "--snapshotter",
        SNAPSHOTTER,
        "--snapshotter-label",
        &label,
        IMAGE_REF,
        "r1",
        "/bin/sh",
        "-c",
        "mkdir -p /data; echo live > /data/f; sleep 600",
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let out = d.cli(&["flush", "r1", "--namespace", c.namespace(), "--wait", "30"]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        if !out.status.success() && err.contains("is running") {
            break err;
        }
        assert!(
            Instant::now() < deadline,
            "running r1 was not refused:\n{}",
            describe_run(&out)
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        refused.contains(&format!("{}/r1", c.namespace())),
        "{refused}"
    );
    let out = d.cli(&[
        "flush",
        "r1",
        "--namespace",
        c.namespace(),
        "--wait",
        "120",
        "--allow-running",
    ]);
    assert!(out.status.success(), "{}", describe_run(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("NOT crash-consistent"),
        "{}",
        describe_run(&out)
    );
    assert_eq!(stored_file(d, "ctl/1", "data/f").as_deref(), Some("live\n"));
    c.ctr(&["task", "kill", "-s", "KILL", "r1"]);

    // forget: refused while the identity is live here, then drops the manifest.
    let out = d.cli(&["forget", "ctl/0", "--yes"]);
    assert!(!out.status.success(), "{}", describe_run(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("held by live snapshot"),
        "{}",
        describe_run(&out)
    );
    let out = d.cli(&["forget", "ctl/0"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "no --yes and no terminal: {}",
        describe_run(&out)
    );
    c.ctr_ok(&["containers", "rm", "k1"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = d.cli(&["forget", "ctl/0", "--yes"]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "forget never allowed: {}",
            describe_run(&out)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        stored_file(d, "ctl/0", "data/f"),
        None,
        "the manifest is gone"
    );
}

#[test]
fn a_flush_acknowledged_before_a_daemon_crash_runs_after_restart() {
    if !require_containerd() {
        return;
    }
    let Some(storage) = garage_storage("control-crash") else {
        return;
    };
    let mut node = Node::start(SnapshotterOptions::new(storage));
    // Long enough to pack and upload that the kill lands before it is done.
    let sum = run_zlayer(
        &node.containerd,
        Some("crash/0"),
        false,
        "k2",
        "mkdir -p /data && head -c 157286400 /dev/urandom > /data/big && sha256sum /data/big",
    );
    let upper = upper_dir(&node.containerd, "k2");
    let answer = hook_line(
        &node.snapshotter.control_socket(),
        &serde_json::json!({"v": 1, "op": "flush", "origin": "hook", "namespace": "default",
            "container_id": "k2", "upper": upper, "status": "stopped", "wait_ms": 0}),
    );
    assert_eq!(answer["state"], "queued", "{answer}");
    node.snapshotter.kill9();
    let before = stored_file(&node.snapshotter, "crash/0", "data/big").is_some();
    node.snapshotter.spawn();
    let deadline = Instant::now() + Duration::from_secs(300);
    let want = sum.split_whitespace().next().unwrap().to_string();
    loop {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("upper");
        let out = node
            .snapshotter
            .cli(&["restore", "--id", "crash/0", &target.to_string_lossy()]);
        if out.status.success() {
            let got = crate::containerd_e2e::sha256_file(&target.join("data/big"));
            assert_eq!(got, want, "restored bytes differ");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the acknowledged flush never ran after the restart (stored before the kill: {before})\n{}",
            node.snapshotter.log_lines_with(&["flush"])
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("stored before the kill: {before} (false = the restart did the flush)");
}
