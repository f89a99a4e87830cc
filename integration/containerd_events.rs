//! The containerd events watcher (issue 8 §4) with a real containerd 1.6, runc and the daemon:
//! a stopped container's layer becomes durable without anyone removing the container.
//!
//! Each container writes its payload and then, as its last act, a marker file into a host dir
//! bind-mounted at `/zl-in`; the marker's mtime is the exit time, and the moment the identity's
//! manifest shows up in the store is the durable time. Each test prints `exit→durable: N ms`.

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use zlayer_storage::ContainerLayerId;
use zlayer_storage::config::LayerStorageConfig;
use zlayer_storage::layer::manifest::manifest_key;

use crate::containerd_e2e::{describe_run, garage_storage, wait_durable};
use crate::util::containerd::{
    Containerd, ID_LABEL, Node, SNAPSHOTTER, SnapshotterOptions, require_containerd, store_keys,
    wait_until,
};
use crate::util::image::IMAGE_REF;

/// How long a test waits for a layer to become durable.
const DURABLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Long enough that the exit timer never fires during a test that must prove another path.
const NO_GRACE_SECS: i64 = 3600;

/// How a test container gets its identity.
enum Identity<'a> {
    /// The container label `zlayer.id` (looked up in containerd at Mounts).
    ContainerLabel(&'a str),
    /// The snapshot label `containerd.io/snapshot/zlayer.id`.
    SnapshotLabel(&'a str),
}

/// `ctr run [-d] ...` of `container` with `identity`, `host_dir` bind-mounted at `/zl-in`, running
/// `script` in busybox's sh; returns ctr's output (asserted successful).
fn run(
    c: &Containerd,
    detach: bool,
    identity: &Identity<'_>,
    container: &str,
    host_dir: &Path,
    script: &str,
) -> std::process::Output {
    let mount = format!(
        "type=bind,src={},dst=/zl-in,options=rbind:rw",
        host_dir.display()
    );
    let mut args = vec!["run"];
    if detach {
        args.push("-d");
    }
    args.extend(["--snapshotter", SNAPSHOTTER, "--mount", &mount]);
    let label = match identity {
        Identity::ContainerLabel(id) => {
            args.push("--label");
            format!("zlayer.id={id}")
        }
        Identity::SnapshotLabel(id) => {
            args.push("--snapshotter-label");
            format!("{ID_LABEL}={id}")
        }
    };
    args.push(&label);
    args.extend([IMAGE_REF, container, "/bin/sh", "-c", script]);
    let out = c.ctr(&args);
    assert!(
        out.status.success(),
        "ctr run {container} failed:\n{}",
        describe_run(&out)
    );
    out
}

/// The script: wait for `/zl-in/go` if asked, write `payload` to `/data/out`, then leave the
/// exit marker `/zl-in/exited` as the last act before exiting.
fn script(payload: &str, wait_for_go: bool) -> String {
    let wait = if wait_for_go {
        "while [ ! -e /zl-in/go ]; do sleep 0.05; done\n"
    } else {
        ""
    };
    format!("set -e\n{wait}echo {payload} > /data/out\necho > /zl-in/exited")
}

/// Waits for the container's exit marker in `host_dir`; returns its mtime (≈ the exit time).
fn exit_time(host_dir: &Path, container: &str) -> SystemTime {
    let marker = host_dir.join("exited");
    wait_until(
        &format!("{container} to write its exit marker"),
        Duration::from_secs(60),
        || marker.exists(),
    );
    fs::metadata(&marker)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("mtime of {}: {e}", marker.display()))
}

/// Whether the store holds a manifest of `identity`.
fn has_manifest(storage: &LayerStorageConfig, identity: &str) -> bool {
    let key = manifest_key(&ContainerLayerId::parse(identity).expect("a SERVICE/INSTANCE id"));
    store_keys(storage).iter().any(|k| k.ends_with(&key))
}

/// Polls the store from a thread of its own, started before the container runs, so the time
/// the manifest first shows up is not delayed by what the test itself waits for.
struct ManifestWatch {
    identity: String,
    seen: std::thread::JoinHandle<Option<SystemTime>>,
}

impl ManifestWatch {
    fn start(storage: &LayerStorageConfig, identity: &str) -> Self {
        let (storage, id) = (storage.clone(), identity.to_string());
        let seen = std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + DURABLE_TIMEOUT;
            while std::time::Instant::now() < deadline {
                if has_manifest(&storage, &id) {
                    return Some(SystemTime::now());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            None
        });
        Self {
            identity: identity.to_string(),
            seen,
        }
    }

    /// When the manifest was first seen; fails after [`DURABLE_TIMEOUT`] naming the flush log.
    fn durable(self, node: &Node) -> SystemTime {
        let seen = self.seen.join().expect("manifest watch thread");
        seen.unwrap_or_else(|| {
            panic!(
                "{} not durable after {DURABLE_TIMEOUT:?}; flush log:\n{}",
                self.identity,
                node.snapshotter
                    .log_lines_with(&["flush", "events", "reconcil", &self.identity])
            )
        })
    }
}

/// Restores `identity` with the CLI (a separate process on the same store) and returns its
/// `/data/out`.
fn restored_payload(node: &Node, identity: &str) -> String {
    let restored = wait_durable(node, identity, DURABLE_TIMEOUT);
    let path = restored.path().join("upper/data/out");
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("restored {identity} has no data/out: {e}"))
}

/// The daemon's `flush requested` lines for `container` with `trigger`.
fn flush_requests(node: &Node, container: &str, trigger: &str) -> Vec<String> {
    let trigger = format!("trigger={trigger}");
    node.snapshotter
        .log()
        .lines()
        .filter(|l| l.contains("flush requested") && l.contains(&trigger))
        .filter(|l| l.contains(&format!("/{container} ")))
        .map(str::to_string)
        .collect()
}

fn millis_between(from: SystemTime, to: SystemTime) -> u128 {
    to.duration_since(from).map_or(0, |d| d.as_millis())
}

/// `ctr task ls` line of `container`, e.g. `c1  1234  STOPPED`.
fn task_line(c: &Containerd, container: &str) -> Option<String> {
    c.ctr_ok(&["tasks", "ls"])
        .lines()
        .find(|l| l.split_whitespace().next() == Some(container))
        .map(str::to_string)
}

/// §4: `ctr run -d` keeps the task after its process exits; no delete follows, so the upper is
/// flushed (dead but mounted) once `exit_grace_secs` (default 3) passes. The container is never
/// removed. Store: Garage.
#[test]
fn kept_task_is_flushed_after_the_exit_grace() {
    if !require_containerd() {
        return;
    }
    let Some(storage) = garage_storage("events-kept") else {
        return;
    };
    let node = Node::start(SnapshotterOptions::new(storage.clone()));
    let c = &node.containerd;
    let host = tempfile::tempdir().unwrap();
    let watch = ManifestWatch::start(&storage, "ev/kept");
    run(
        c,
        true,
        &Identity::ContainerLabel("ev/kept"),
        "kept",
        host.path(),
        &script("kept-payload", false),
    );
    let exited = exit_time(host.path(), "kept");
    let durable = watch.durable(&node);
    println!(
        "exit→durable: {} ms (task kept: exit_grace_secs = 3, then the flush; Garage)",
        millis_between(exited, durable)
    );
    let task = task_line(c, "kept").expect("the kept task is still listed");
    assert!(task.contains("STOPPED"), "task of kept: {task}");
    assert_eq!(restored_payload(&node, "ev/kept"), "kept-payload\n");
    let requests = flush_requests(&node, "kept", "event");
    assert!(
        !requests.is_empty(),
        "no event-triggered flush of kept in the log:\n{}",
        node.snapshotter.log_lines_with(&["flush", "kept"])
    );
}

/// §4: a foreground `ctr run` deletes the task (not the container) when the process exits:
/// `/tasks/delete` flushes the unmounted upper at once. The exit timer is set far beyond the
/// test, so only the delete event can have done it. Store: a local directory.
#[test]
fn deleted_task_is_flushed_from_the_delete_event() {
    if !require_containerd() {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let opts = SnapshotterOptions::local(store.path())
        .with_snapshotter_key("exit_grace_secs", NO_GRACE_SECS);
    let storage = opts.storage.clone();
    let node = Node::start(opts);
    let c = &node.containerd;
    let host = tempfile::tempdir().unwrap();
    let watch = ManifestWatch::start(&storage, "ev/deleted");
    run(
        c,
        false,
        &Identity::SnapshotLabel("ev/deleted"),
        "deleted",
        host.path(),
        &script("deleted-payload", false),
    );
    let exited = exit_time(host.path(), "deleted");
    let durable = watch.durable(&node);
    println!(
        "exit→durable: {} ms (task deleted: flushed on /tasks/delete; local store)",
        millis_between(exited, durable)
    );
    assert_eq!(task_line(c, "deleted"), None, "the task was not deleted");
    assert!(
        c.ctr_ok(&["containers", "ls", "-q"])
            .lines()
            .any(|l| l == "deleted"),
        "the container was removed; the test must show a flush without removal"
    );
    assert_eq!(restored_payload(&node, "ev/deleted"), "deleted-payload\n");
    assert!(
        !flush_requests(&node, "deleted", "event").is_empty(),
        "no event-triggered flush of deleted in the log:\n{}",
        node.snapshotter.log_lines_with(&["flush", "deleted"])
    );
}

/// §4: containerd is killed while a container runs, the container exits while containerd is
/// down (its events are lost to us), and containerd comes back: the watcher resubscribes,
/// reconciles and flushes the stopped container. The exit timer is set far beyond the test
/// and the task is kept, so only the reconcile can have done it. Store: Garage.
#[test]
fn exit_while_containerd_is_down_is_flushed_by_the_reconcile() {
    if !require_containerd() {
        return;
    }
    let Some(storage) = garage_storage("events-restart") else {
        return;
    };
    let opts = SnapshotterOptions::new(storage.clone())
        .with_snapshotter_key("exit_grace_secs", NO_GRACE_SECS);
    let mut node = Node::start(opts);
    let host = tempfile::tempdir().unwrap();
    run(
        &node.containerd,
        true,
        &Identity::ContainerLabel("ev/restart"),
        "restart",
        host.path(),
        &script("restart-payload", true),
    );
    wait_until("the restart task to run", Duration::from_secs(30), || {
        task_line(&node.containerd, "restart").is_some_and(|l| l.contains("RUNNING"))
    });
    wait_until("the watcher to subscribe", Duration::from_secs(30), || {
        node.snapshotter
            .log()
            .contains("subscribed to containerd task events")
    });

    node.containerd.kill_daemon();
    fs::write(host.path().join("go"), "").unwrap();
    let exited = exit_time(host.path(), "restart");
    // Let the shim reap the process and fail to publish its exit.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !has_manifest(&storage, "ev/restart"),
        "ev/restart durable while containerd was down: nothing should have flushed it"
    );
    let watch = ManifestWatch::start(&storage, "ev/restart");
    let restarted = SystemTime::now();
    node.containerd.spawn();
    let durable = watch.durable(&node);
    println!(
        "exit→durable: {} ms (exit while containerd was down for {} ms; containerd start→durable {} ms; Garage)",
        millis_between(exited, durable),
        millis_between(exited, restarted),
        millis_between(restarted, durable)
    );
    let task = task_line(&node.containerd, "restart").expect("the restart task survived");
    assert!(task.contains("STOPPED"), "task of restart: {task}");
    assert_eq!(restored_payload(&node, "ev/restart"), "restart-payload\n");
    assert!(
        !flush_requests(&node, "restart", "reconcile").is_empty(),
        "no reconcile-triggered flush of restart in the log:\n{}",
        node.snapshotter
            .log_lines_with(&["flush", "restart", "subscri", "reconcil"])
    );
}
