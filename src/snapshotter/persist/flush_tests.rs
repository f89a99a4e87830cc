//! Flush: in place, durable before acknowledged, coalesced, safe against a racing Remove.

use std::fs;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::flush_db::FlushState;
use super::tests::{Env, FakeContainers, Node, default_opts, files, wait_for, write_files};
use super::{FlushRequest, FlushTarget, FlushTicket};
use crate::layer::types::ContainerLayerId;
use crate::snapshotter::containers::TaskStatus;

const WAIT: Duration = Duration::from_secs(60);

fn request(id: &str) -> FlushRequest {
    FlushRequest {
        target: FlushTarget::Container {
            namespace: "default".into(),
            id: id.into(),
        },
        trigger: "test".into(),
        allow_running: false,
        stopped: false,
    }
}

/// Node "a" with a base layer; `open`: uploads proceed; `flusher`: the flusher and worker run.
fn node_on_a_base(env: &Env, open: bool, flusher: bool) -> (Node, Arc<FakeContainers>) {
    let containers = Arc::new(FakeContainers::default());
    let node = env.node_with(
        "a",
        default_opts(),
        env.gate(open),
        containers.clone(),
        flusher,
    );
    node.base_layer();
    (node, containers)
}

fn set_task(c: &FakeContainers, id: &str, status: TaskStatus) {
    c.tasks
        .lock()
        .unwrap()
        .insert(("default".into(), id.into()), status);
}

#[test]
fn flush_syncs_in_place_and_repeats_and_the_remove_upload_nothing() {
    let env = Env::new();
    let (node, containers) = node_on_a_base(&env, true, true);
    let upper = node.container("default/3/c1", Some("web/0"));
    write_files(&upper, &[("data/db", "v1\n")]);
    set_task(&containers, "c1", TaskStatus::Stopped);

    let ticket = node
        .block_on(node.persist.request_flush(request("c1")))
        .unwrap();
    let FlushTicket::Recorded { identity, .. } = &ticket else {
        panic!("{ticket:?}");
    };
    assert_eq!(identity, &ContainerLayerId::new("web", "0"));
    let done = node
        .block_on(node.persist.wait_flush(&ticket, WAIT))
        .unwrap();
    assert!(!done.unchanged && done.crash_consistent);
    assert_eq!(node.stored("web/0").unwrap(), files(&[("data/db", "v1\n")]));
    assert_eq!(node.manifest("web/0").unwrap().current.digest, done.digest);
    assert_eq!(
        fs::read_to_string(upper.join("data/db")).unwrap(),
        "v1\n",
        "upper left in place"
    );
    let uploads = node.gate.uploads_started.load(Ordering::SeqCst);
    assert!(uploads >= 1);

    // Unchanged: only the fingerprint walk, no upload.
    let again = node
        .block_on(node.persist.request_flush(request("c1")))
        .unwrap();
    let second = node
        .block_on(node.persist.wait_flush(&again, WAIT))
        .unwrap();
    assert!(second.unchanged);
    assert_eq!(second.digest, done.digest);
    assert_eq!(node.gate.uploads_started.load(Ordering::SeqCst), uploads);

    // The later Remove queues the dir; its upload is a no-op.
    node.core().remove("default/3/c1").unwrap();
    wait_for("the outbox to drain", WAIT, || node.queued().is_empty());
    assert_eq!(node.gate.uploads_started.load(Ordering::SeqCst), uploads);
    assert_eq!(node.manifest("web/0").unwrap().current.digest, done.digest);
}

#[test]
fn running_containers_are_refused_unless_waived_and_unknown_state_fails_closed() {
    let env = Env::new();
    let (node, containers) = node_on_a_base(&env, true, true);
    let upper = node.container("default/3/c1", Some("web/0"));
    write_files(&upper, &[("f", "1\n")]);

    set_task(&containers, "c1", TaskStatus::Running);
    let err = node
        .block_on(node.persist.request_flush(request("c1")))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("default/c1"), "{err}");

    containers.down.store(true, Ordering::SeqCst);
    let err = node
        .block_on(node.persist.request_flush(request("c1")))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");

    // The hook and the events watcher know the task stopped: no question asked.
    let mut stopped = request("c1");
    stopped.stopped = true;
    let t = node.block_on(node.persist.request_flush(stopped)).unwrap();
    node.block_on(node.persist.wait_flush(&t, WAIT)).unwrap();

    containers.down.store(false, Ordering::SeqCst);
    fs::write(upper.join("f"), "2\n").unwrap();
    let mut waived = request("c1");
    waived.allow_running = true;
    let t = node.block_on(node.persist.request_flush(waived)).unwrap();
    let done = node.block_on(node.persist.wait_flush(&t, WAIT)).unwrap();
    assert!(!done.crash_consistent);
    assert_eq!(node.stored("web/0").unwrap(), files(&[("f", "2\n")]));

    // Not ours / not persisted.
    let err = node
        .block_on(node.persist.request_flush(request("nope")))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let other = FlushRequest {
        target: FlushTarget::Upper("/var/lib/elsewhere/7/fs".into()),
        ..request("x")
    };
    assert_eq!(
        node.block_on(node.persist.request_flush(other)).unwrap(),
        FlushTicket::NotPersisted
    );
}

#[test]
fn requests_coalesce_and_a_request_survives_a_crash() {
    let env = Env::new();
    let node = env.node("a", default_opts(), env.gate(true), false);
    node.base_layer();
    let upper = node.container("default/3/c1", Some("web/0"));
    write_files(&upper, &[("f", "kept\n")]);
    let mut req = request("c1");
    req.stopped = true;
    // By upper dir, as the hook finds it in mountinfo.
    let by_upper = FlushRequest {
        target: FlushTarget::Upper(upper.clone()),
        ..req.clone()
    };
    let a = node
        .block_on(node.persist.request_flush(req.clone()))
        .unwrap();
    let b = node.block_on(node.persist.request_flush(by_upper)).unwrap();
    let (
        FlushTicket::Recorded {
            id: ia, joined: ja, ..
        },
        FlushTicket::Recorded {
            id: ib, joined: jb, ..
        },
    ) = (&a, &b)
    else {
        panic!("{a:?} {b:?}");
    };
    assert_eq!(
        (ia, ja, jb),
        (ib, &false, &true),
        "second request joins the first"
    );
    assert_eq!(node.persist.open_flushes().unwrap(), 1);
    assert!(node.manifest("web/0").is_none());

    // The daemon dies after acknowledging; the next start runs the request.
    let ticket = a.clone();
    node.kill();
    let node = env.node("a", default_opts(), env.gate(true), true);
    let done = node
        .block_on(node.persist.wait_flush(&ticket, WAIT))
        .unwrap();
    assert_eq!(node.stored("web/0").unwrap(), files(&[("f", "kept\n")]));
    assert_eq!(node.manifest("web/0").unwrap().current.digest, done.digest);
    assert_eq!(node.persist.open_flushes().unwrap(), 0);
}

#[test]
fn a_remove_during_a_flush_loses_nothing_and_the_newer_layer_wins() {
    let env = Env::new();
    let (node, _containers) = node_on_a_base(&env, false, true);
    let upper = node.container("default/3/c1", Some("web/0"));
    write_files(&upper, &[("f", "old\n")]);
    fs::write(upper.join("pad"), vec![b'x'; 1 << 20]).unwrap();
    let mut req = request("c1");
    req.allow_running = true;
    let ticket = node.block_on(node.persist.request_flush(req)).unwrap();
    wait_for("the flush to block in its upload", WAIT, || {
        node.gate.uploads_started.load(Ordering::SeqCst) >= 1
    });
    // Written after the flush packed, then removed: the queued layer is the newer one.
    fs::write(upper.join("f"), "new\n").unwrap();
    node.core().remove("default/3/c1").unwrap();
    assert_eq!(node.queued().len(), 1);
    node.gate.release();
    let done = node
        .block_on(node.persist.wait_flush(&ticket, WAIT))
        .unwrap();
    wait_for("the outbox to drain", WAIT, || node.queued().is_empty());
    let m = node.manifest("web/0").unwrap();
    assert!(m.current.seq > done.seq, "the queued layer's seq is newer");
    assert_eq!(
        node.stored("web/0").unwrap(),
        files(&[("f", "new\n"), ("pad", &"x".repeat(1 << 20))])
    );
    // Whatever the order, history holds the flushed version too: nothing lost.
    assert!(m.history.iter().any(|e| e.digest == done.digest) || m.current.digest == done.digest);

    // A flush asked after the Remove is served by the queued layer (here: already uploaded).
    let ticket = node
        .block_on(node.persist.request_flush(FlushRequest {
            target: FlushTarget::Identity(ContainerLayerId::new("web", "0")),
            ..request("c1")
        }))
        .unwrap_err();
    assert_eq!(ticket.code(), tonic::Code::NotFound);
}

#[test]
fn a_stop_time_flush_never_reads_an_upper_a_restarted_task_is_writing() {
    let env = Env::new();
    let (node, containers) = node_on_a_base(&env, true, false);
    let upper = node.container("default/3/c1", Some("web/0"));
    write_files(&upper, &[("f", "at stop\n")]);
    let mut req = request("c1");
    req.stopped = true;
    node.block_on(node.persist.request_flush(req)).unwrap();
    // Restarted before the flusher got to it.
    set_task(&containers, "c1", TaskStatus::Running);
    node.block_on(node.persist.flush_pass());
    assert!(
        node.manifest("web/0").is_none(),
        "a changing upper was synced"
    );
    let id = ContainerLayerId::new("web", "0");
    let rows = node.persist.recent_flushes(&id, 1).unwrap();
    let error = rows[0].error.clone().unwrap_or_default();
    assert!(error.contains("running again"), "{error}");
    // Stopped again: the retry flushes.
    set_task(&containers, "c1", TaskStatus::Stopped);
    std::thread::sleep(Duration::from_millis(1100));
    node.block_on(node.persist.flush_pass());
    assert_eq!(node.stored("web/0").unwrap(), files(&[("f", "at stop\n")]));
}

#[test]
fn a_store_outage_keeps_the_flush_pending_with_its_error_until_the_store_returns() {
    let env = Env::new();
    let (node, containers) = node_on_a_base(&env, true, true);
    let upper = node.container("default/3/c1", Some("web/0"));
    write_files(&upper, &[("data/db", "kept\n")]);
    set_task(&containers, "c1", TaskStatus::Stopped);
    node.gate.fail_reads.store(true, Ordering::SeqCst);

    let ticket = node
        .block_on(node.persist.request_flush(request("c1")))
        .unwrap();
    let id = ContainerLayerId::new("web", "0");
    // More failed attempts than a local fault gets before it is given up: a store fault never is.
    wait_for("four failed attempts", WAIT, || {
        node.persist.recent_flushes(&id, 1).unwrap()[0].attempts >= 4
    });
    let row = &node.persist.recent_flushes(&id, 1).unwrap()[0];
    assert!(
        matches!(row.state, FlushState::Pending | FlushState::Running),
        "{:?}",
        row.state
    );
    let error = row.error.clone().unwrap_or_default();
    assert!(error.contains("injected store fault"), "{error}");
    let err = node
        .block_on(node.persist.wait_flush(&ticket, Duration::from_millis(200)))
        .unwrap_err();
    assert!(
        err.to_string().contains("injected store fault"),
        "a timed-out wait names the last error: {err}"
    );
    let manifest = node.block_on(node.gate.inner.get_bytes("manifests/web_0.json"));
    assert!(manifest.unwrap().is_none(), "nothing was published");

    node.gate.fail_reads.store(false, Ordering::SeqCst);
    let done = node
        .block_on(node.persist.wait_flush(&ticket, WAIT))
        .unwrap();
    assert_eq!(
        node.stored("web/0").unwrap(),
        files(&[("data/db", "kept\n")])
    );
    assert_eq!(node.manifest("web/0").unwrap().current.digest, done.digest);
}
