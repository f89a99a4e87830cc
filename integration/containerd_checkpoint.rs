//! Checkpoints of running containers (issue 10 §2–3) with a real containerd 1.6, runc, the
//! cgroup freezer and the daemon.
//!
//! Every test container runs the same loop: step N replaces `/data/A` with N, then `/data/B`
//! with N (each by rename, as applications update files atomically), every 5th step replaces
//! the directory `/data/d`, and last it reports N in the host file `/zl-in/step` (by rename too). Any state of
//! one instant therefore has B = A or B = A − 1; a capture spread over time would soon show
//! B > A or B < A − 1.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::containerd_e2e::{describe_run, garage_storage, wait_durable};
use crate::util::containerd::{
    Containerd, Node, SNAPSHOTTER, SnapshotterOptions, cgroup_frozen, freezer_of,
    require_containerd, wait_until,
};
use crate::util::image::IMAGE_REF;

/// Marks the loop's shell in the process table (followed by the container's name).
const MARKER: &str = "zl-ckpt-loop";

/// What marks `container`'s loop in the process table (tests run in parallel).
fn marker(container: &str) -> String {
    format!("{MARKER} {container};")
}

fn loop_script(container: &str) -> String {
    format!(
        "# {}\nmkdir -p /data; i=0\nwhile true; do i=$((i+1))\n\
         echo $i > /data/A.tmp; mv /data/A.tmp /data/A\n\
         echo $i > /data/B.tmp; mv /data/B.tmp /data/B\n\
         if [ $((i % 5)) -eq 0 ]; then rm -rf /data/d; mkdir /data/d; echo $i > /data/d/f; fi\n\
         echo $i > /zl-in/step.tmp; mv /zl-in/step.tmp /zl-in/step\ndone",
        marker(container)
    )
}

/// `ctr run -d` of the loop as `container` with the container label `zlayer.id=identity`.
fn run_loop(c: &Containerd, identity: &str, container: &str, host_dir: &Path) {
    let mount = format!(
        "type=bind,src={},dst=/zl-in,options=rbind:rw",
        host_dir.display()
    );
    let label = format!("zlayer.id={identity}");
    let script = loop_script(container);
    let out = c.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        SNAPSHOTTER,
        "--mount",
        &mount,
        "--label",
        &label,
        IMAGE_REF,
        container,
        "/bin/sh",
        "-c",
        &script,
    ]);
    assert!(
        out.status.success(),
        "ctr run {container} failed:\n{}",
        describe_run(&out)
    );
    wait_until(
        &format!("{container} to take steps"),
        Duration::from_secs(30),
        || step(host_dir) > 20,
    );
}

/// The last step the loop reported (0 before the first).
fn step(host_dir: &Path) -> u64 {
    fs::read_to_string(host_dir.join("step"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// (A, B, d/f if present and written) of a restored upper.
fn restored_state(upper: &Path) -> (u64, u64, Option<u64>) {
    let num = |rel: &str| -> Option<u64> {
        fs::read_to_string(upper.join(rel)).ok().map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|e| panic!("{rel} holds {s:?}: {e}"))
        })
    };
    let a = num("data/A").expect("restored upper has data/A");
    let b = num("data/B").expect("restored upper has data/B");
    // d/f is written in place right after d is made: an instant between its creation and the
    // write finds it empty, which is d not yet complete (A and B are renamed into place).
    let f = fs::read_to_string(upper.join("data/d/f"))
        .is_ok_and(|s| !s.is_empty())
        .then(|| num("data/d/f"))
        .flatten();
    (a, b, f)
}

/// B = A or B = A − 1, and d/f (when d is complete) from the last 5-step boundary at or
/// before A.
fn assert_one_instant(state: (u64, u64, Option<u64>), what: &str) {
    let (a, b, f) = state;
    assert!(
        b == a || b + 1 == a,
        "{what}: A = {a}, B = {b}: not the state of one instant"
    );
    if let Some(f) = f {
        assert!(
            f <= a && a - f <= 5 && f % 5 == 0,
            "{what}: d/f = {f} with A = {a}"
        );
    }
}

/// The pid of `container`'s loop (its shell).
fn loop_pid(container: &str) -> u32 {
    let marker = marker(container);
    let procs = std::fs::read_dir("/proc").unwrap();
    for e in procs.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if fs::read(e.path().join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&marker))
        {
            return pid;
        }
    }
    panic!("no process runs the checkpoint loop");
}

/// The daemon's `checkpoint durable` lines for `identity`.
fn durable_lines(node: &Node, identity: &str) -> usize {
    node.snapshotter
        .log()
        .lines()
        .filter(|l| l.contains("checkpoint durable") && l.contains(identity))
        .count()
}

/// Samples the loop's step every 50 ms: (when, step).
struct Steps {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<(Instant, u64)>>,
}

impl Steps {
    fn start(host_dir: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, dir) = (stop.clone(), host_dir.to_path_buf());
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !s.load(Ordering::SeqCst) {
                seen.push((Instant::now(), step(&dir)));
                std::thread::sleep(Duration::from_millis(50));
            }
            seen
        });
        Self { stop, handle }
    }

    fn finish(self) -> Vec<(Instant, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("step sampler")
    }
}

/// §3: node loss while the container runs (kill -9 of the snapshotter, containerd, the shim
/// and the container; both daemons' disks wiped). On the fresh node the identity restores to
/// one instant's state no older than one interval plus the upload time. Store: Garage.
#[test]
fn node_loss_while_running_restores_a_recent_consistent_checkpoint() {
    if !require_containerd() {
        return;
    }
    let Some(storage) = garage_storage("ckpt-nodeloss") else {
        return;
    };
    const INTERVAL_SECS: u64 = 2;
    // The longest a checkpoint may take to upload on this machine, on top of the interval.
    const UPLOAD_SLACK: Duration = Duration::from_secs(4);
    let opts = SnapshotterOptions::new(storage).with_snapshotter_key("checkpoint_interval_secs", 2);
    let mut node = Node::start(opts);
    let host = tempfile::tempdir().unwrap();
    let steps = Steps::start(host.path());
    run_loop(&node.containerd, "ck/loop", "loop", host.path());
    let started = Instant::now();
    // Long enough that the bound below is a real one (it reaches back 6 s).
    wait_until(
        "three checkpoints and 12 s of running",
        Duration::from_secs(60),
        || durable_lines(&node, "ck/loop") >= 3 && started.elapsed() > Duration::from_secs(12),
    );
    let killed_at = Instant::now();
    node.crash_and_lose_disk(&marker("loop"));
    let seen = steps.finish();
    let restored = wait_durable(&node, "ck/loop", Duration::from_secs(60));
    let state = restored_state(&restored.path().join("upper"));
    assert_one_instant(state, "restored after node loss");
    let bound = killed_at - Duration::from_secs(INTERVAL_SECS) - UPLOAD_SLACK;
    let floor = seen
        .iter()
        .rev()
        .find(|(t, _)| *t <= bound)
        .map_or(0, |(_, s)| *s);
    let last = seen.last().map_or(0, |(_, s)| *s);
    println!(
        "node loss: restored step {} (last step seen {last}, floor {floor} = step {} s before the kill)",
        state.0,
        (Duration::from_secs(INTERVAL_SECS) + UPLOAD_SLACK).as_secs()
    );
    assert!(
        floor > 0,
        "the loop ran too briefly for the bound to mean anything"
    );
    assert!(
        state.0 >= floor,
        "restored step {} is older than one interval plus upload time before the loss (step {floor})",
        state.0
    );
    assert!(
        state.0 <= last + 1,
        "restored step {} was never written",
        state.0
    );
}

/// §3: a container its user paused is checkpointed as it is and stays paused; the manual
/// checkpoint reports it. Periodic checkpoints off. Store: local directory.
#[test]
fn a_user_paused_container_is_checkpointed_and_left_paused() {
    if !require_containerd() {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let opts =
        SnapshotterOptions::local(store.path()).with_snapshotter_key("checkpoint_interval_secs", 0);
    let node = Node::start(opts);
    let c = &node.containerd;
    let host = tempfile::tempdir().unwrap();
    run_loop(c, "ck/paused", "paused", host.path());
    c.ctr_ok(&["tasks", "pause", "paused"]);
    let at_pause = step(host.path());
    let out = node.snapshotter.cli(&[
        "checkpoint",
        "paused",
        "--namespace",
        c.namespace(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "checkpoint failed:\n{}",
        describe_run(&out)
    );
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(reply.contains("\"user_paused\": true"), "{reply}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(step(host.path()), at_pause, "the paused loop moved");
    let tasks = c.ctr_ok(&["tasks", "ls"]);
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with("paused") && l.contains("PAUSED")),
        "{tasks}"
    );
    let restored = wait_durable(&node, "ck/paused", Duration::from_secs(30));
    let state = restored_state(&restored.path().join("upper"));
    assert_one_instant(state, "checkpoint of the paused container");
    assert!(
        state.0 == at_pause || state.0 == at_pause + 1,
        "restored step {} while paused at {at_pause}",
        state.0
    );
    c.ctr_ok(&["tasks", "resume", "paused"]);
    wait_until("the loop to move again", Duration::from_secs(10), || {
        step(host.path()) > at_pause
    });
}

/// §2: a pause budget too short for the freeze and the paused pass: the checkpoint fails
/// naming the budget, the container is thawed and keeps running, nothing becomes current.
#[test]
fn a_checkpoint_over_its_pause_budget_thaws_the_container_and_publishes_nothing() {
    if !require_containerd() {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let opts = SnapshotterOptions::local(store.path())
        .with_snapshotter_key("checkpoint_interval_secs", 0)
        .with_snapshotter_key("checkpoint_pause_ms", 1);
    let storage = opts.storage.clone();
    let node = Node::start(opts);
    let c = &node.containerd;
    let host = tempfile::tempdir().unwrap();
    run_loop(c, "ck/budget", "budget", host.path());
    let out = node
        .snapshotter
        .cli(&["checkpoint", "budget", "--namespace", c.namespace()]);
    assert!(
        !out.status.success(),
        "a 1 ms pause cannot fit: {}",
        describe_run(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1 ms"), "the error names the budget: {err}");
    let cgroup = freezer_of(loop_pid("budget")).expect("the loop's freezer cgroup");
    assert!(!cgroup_frozen(&cgroup), "{} left frozen", cgroup.display());
    let before = step(host.path());
    wait_until("the loop to keep running", Duration::from_secs(10), || {
        step(host.path()) > before + 10
    });
    let key = zlayer_storage::layer::manifest::manifest_key(
        &zlayer_storage::ContainerLayerId::parse("ck/budget").unwrap(),
    );
    assert!(
        !crate::util::containerd::store_keys(&storage)
            .iter()
            .any(|k| k.ends_with(&key)),
        "a failed checkpoint published a manifest"
    );
}

/// §3: checkpoints every second race the stop-time flush and the Remove's upload: whatever
/// order they finish in, the identity ends at the container's last state and stays there.
/// Store: Garage.
#[test]
fn checkpoints_racing_stop_and_remove_never_leave_an_older_version_current() {
    if !require_containerd() {
        return;
    }
    let Some(storage) = garage_storage("ckpt-race") else {
        return;
    };
    let opts = SnapshotterOptions::new(storage).with_snapshotter_key("checkpoint_interval_secs", 1);
    let node = Node::start(opts);
    let c = &node.containerd;
    for round in 0..2 {
        let (container, identity) = (format!("race{round}"), format!("ck/race{round}"));
        let host = tempfile::tempdir().unwrap();
        run_loop(c, &identity, &container, host.path());
        wait_until("a checkpoint", Duration::from_secs(30), || {
            durable_lines(&node, &identity) >= 1
        });
        // Stop it while the next checkpoint may be running, then remove it at once.
        std::thread::sleep(Duration::from_millis(300 + 400 * round));
        c.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &container]);
        wait_until("the task to stop", Duration::from_secs(30), || {
            c.ctr_ok(&["tasks", "ls"])
                .lines()
                .any(|l| l.starts_with(&container) && l.contains("STOPPED"))
        });
        let last = step(host.path());
        c.ctr_ok(&["tasks", "rm", &container]);
        c.ctr_ok(&["containers", "rm", &container]);
        let deadline = Instant::now() + Duration::from_secs(90);
        let state = loop {
            let restored = wait_durable(&node, &identity, Duration::from_secs(60));
            let state = restored_state(&restored.path().join("upper"));
            if state.0 >= last || Instant::now() > deadline {
                break state;
            }
            std::thread::sleep(Duration::from_millis(300));
        };
        assert!(
            state.0 == last || state.0 == last + 1,
            "round {round}: the identity holds step {} after the container stopped at {last}",
            state.0
        );
        // Late checkpoints or uploads must not move it back.
        std::thread::sleep(Duration::from_secs(3));
        let again = wait_durable(&node, &identity, Duration::from_secs(30));
        assert_eq!(
            restored_state(&again.path().join("upper")),
            state,
            "round {round}: an older version became current"
        );
        assert_one_instant(state, "last state");
    }
}

/// §2: a daemon killed while it held a container frozen (its record of the freeze is in the
/// metadata database, written before the freeze) thaws the container when it starts again;
/// a cgroup frozen without such a record (a user's pause) is left alone.
#[test]
fn a_daemon_killed_mid_freeze_thaws_the_container_at_its_next_start() {
    if !require_containerd() {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let opts =
        SnapshotterOptions::local(store.path()).with_snapshotter_key("checkpoint_interval_secs", 0);
    let mut node = Node::start(opts);
    let c = &node.containerd;
    let host = tempfile::tempdir().unwrap();
    run_loop(c, "ck/thaw", "thaw", host.path());
    let cgroup = freezer_of(loop_pid("thaw")).expect("the loop's freezer cgroup");
    node.snapshotter.kill9();
    // What a kill -9 between the freeze and the thaw leaves behind.
    let db = rusqlite::Connection::open(node.snapshotter.root().join("metadata.db")).unwrap();
    db.execute(
        "INSERT INTO persist_frozen (cgroup, key, since_ns) VALUES (?1, 'thaw', 0)",
        [cgroup.to_string_lossy()],
    )
    .unwrap();
    drop(db);
    let v1 = cgroup.join("freezer.state").exists();
    let (file, value) = if v1 {
        ("freezer.state", "FROZEN")
    } else {
        ("cgroup.freeze", "1")
    };
    fs::write(cgroup.join(file), value).unwrap();
    wait_until("the cgroup to freeze", Duration::from_secs(10), || {
        cgroup_frozen(&cgroup)
    });
    let at = step(host.path());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(step(host.path()), at, "the frozen loop moved");

    node.snapshotter.spawn();
    wait_until("the daemon to thaw it", Duration::from_secs(30), || {
        !cgroup_frozen(&cgroup)
    });
    wait_until("the loop to move again", Duration::from_secs(10), || {
        step(host.path()) > at
    });
    // The record is forgotten only after the thaw (never before it), so it may lag the thaw.
    let db = rusqlite::Connection::open(node.snapshotter.root().join("metadata.db")).unwrap();
    wait_until(
        "the freeze record to be forgotten",
        Duration::from_secs(10),
        || {
            db.query_row("SELECT COUNT(*) FROM persist_frozen", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap()
                == 0
        },
    );
    assert!(
        node.snapshotter
            .log()
            .contains("thawed a container a previous run left frozen"),
        "{}",
        node.snapshotter.log_lines_with(&["thaw", "frozen"])
    );
}
