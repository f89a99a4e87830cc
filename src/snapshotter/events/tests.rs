//! The watcher against a scripted event source, task table and flush sink, on a paused clock.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_client::events::{TaskDelete, TaskExit};
use containerd_client::types::Envelope;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::snapshotter::containers::{ContainerRecord, LookupError};

const GRACE: Duration = Duration::from_secs(3);

fn envelope(namespace: &str, topic: &str, value: Vec<u8>) -> Envelope {
    Envelope {
        timestamp: None,
        namespace: namespace.to_string(),
        topic: topic.to_string(),
        // As containerd sends it: no leading `/` in the type URL.
        event: Some(prost_types::Any {
            type_url: format!("containerd.events.{}", topic.rsplit('/').next().unwrap()),
            value,
        }),
    }
}

fn exit(namespace: &str, container: &str, id: &str) -> Envelope {
    let e = TaskExit {
        container_id: container.to_string(),
        id: id.to_string(),
        pid: 42,
        exit_status: 0,
        exited_at: None,
    };
    envelope(namespace, EXIT_TOPIC, e.encode_to_vec())
}

fn delete(namespace: &str, container: &str, id: &str) -> Envelope {
    let d = TaskDelete {
        container_id: container.to_string(),
        pid: 42,
        exit_status: 0,
        exited_at: None,
        id: id.to_string(),
    };
    envelope(namespace, DELETE_TOPIC, d.encode_to_vec())
}

#[test]
fn init_exits_and_deletes_decode_and_exec_ones_are_ignored() {
    assert_eq!(
        decode(&exit("default", "c1", "c1")).unwrap(),
        Some(TaskEvent::Exit {
            namespace: "default".into(),
            container: "c1".into()
        })
    );
    assert_eq!(decode(&exit("default", "c1", "exec-7")).unwrap(), None);
    // containerd 1.6 shims leave the delete's id empty; newer ones name the process.
    for id in ["", "c1"] {
        assert_eq!(
            decode(&delete("k8s.io", "c1", id)).unwrap(),
            Some(TaskEvent::Delete {
                namespace: "k8s.io".into(),
                container: "c1".into()
            })
        );
    }
    assert_eq!(decode(&delete("k8s.io", "c1", "exec-7")).unwrap(), None);
    let mut other = exit("default", "c1", "c1");
    other.topic = "/tasks/start".into();
    assert_eq!(decode(&other).unwrap(), None);
}

#[test]
fn malformed_payloads_name_topic_and_namespace() {
    let bad = envelope("ns1", EXIT_TOPIC, vec![0x0a, 0xff]);
    let err = decode(&bad).unwrap_err();
    assert!(matches!(err, EventsError::Decode { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(EXIT_TOPIC) && text.contains("ns1"), "{text}");

    let mut empty = delete("ns2", "c1", "");
    empty.event = None;
    let text = decode(&empty).unwrap_err().to_string();
    assert!(
        text.contains(DELETE_TOPIC) && text.contains("ns2"),
        "{text}"
    );
}

#[test]
fn the_subscription_asks_for_both_task_topics_and_its_marker() {
    assert_eq!(
        ContainerdEvents::filters(),
        [
            r#"topic=="/tasks/exit""#,
            r#"topic=="/tasks/delete""#,
            r#"topic=="/zlayer-storage/subscribed""#
        ]
    );
}

/// Task states by (namespace, container); a missing entry is an absent task, and a container
/// listed in `failing` cannot be looked up.
#[derive(Debug, Default)]
struct Tasks {
    states: Mutex<BTreeMap<(String, String), TaskStatus>>,
    failing: Mutex<Vec<String>>,
}

impl Tasks {
    fn set(&self, namespace: &str, container: &str, status: TaskStatus) {
        self.states
            .lock()
            .unwrap()
            .insert((namespace.into(), container.into()), status);
    }
}

#[async_trait::async_trait]
impl ContainerLookup for Tasks {
    async fn get(&self, _: &str, _: &str) -> Result<Option<ContainerRecord>, LookupError> {
        Ok(None)
    }

    async fn task_status(&self, namespace: &str, id: &str) -> Result<TaskStatus, LookupError> {
        if self.failing.lock().unwrap().iter().any(|c| c == id) {
            return Err(LookupError::Timeout {
                namespace: namespace.into(),
                id: id.into(),
            });
        }
        Ok(self
            .states
            .lock()
            .unwrap()
            .get(&(namespace.to_string(), id.to_string()))
            .copied()
            .unwrap_or(TaskStatus::Absent))
    }
}

/// Records flush requests (as "trigger ns/container") and lists the given live snapshots.
#[derive(Debug, Default)]
struct Sink {
    requests: Mutex<Vec<String>>,
    live: Mutex<Vec<String>>,
    /// Every call in order, including `live` listings, for ordering checks.
    calls: Arc<Mutex<Vec<String>>>,
}

impl Sink {
    fn taken(&self) -> Vec<String> {
        std::mem::take(&mut self.requests.lock().unwrap())
    }
}

#[async_trait::async_trait]
impl FlushSink for Arc<Sink> {
    async fn request_flush(&self, req: FlushRequest) -> Result<FlushTicket, PersistError> {
        assert!(req.stopped && !req.allow_running, "{req:?}");
        let FlushTarget::Container { namespace, id } = &req.target else {
            panic!("unexpected target {:?}", req.target);
        };
        let line = format!("{} {namespace}/{id}", req.trigger);
        self.calls.lock().unwrap().push(line.clone());
        self.requests.lock().unwrap().push(line);
        // Not ours: the watcher must shrug this off.
        if id.starts_with("foreign") {
            return Err(PersistError::FlushTargetNotFound {
                target: req.target.to_string(),
            });
        }
        Ok(FlushTicket::NotPersisted)
    }

    async fn live_snapshots(&self) -> Result<Vec<(ContainerLayerId, String)>, PersistError> {
        self.calls.lock().unwrap().push("live".into());
        Ok(self
            .live
            .lock()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(n, key)| (ContainerLayerId::new("svc", n.to_string()), key.clone()))
            .collect())
    }
}

/// What a scripted stream yields.
type Item = Result<Envelope, tonic::Status>;

/// A scripted source: each subscribe takes the next entry — a failure, or a stream fed through
/// the returned sender — and records the (paused) time of the attempt.
#[derive(Default)]
struct Script {
    plan: Mutex<VecDeque<Option<mpsc::UnboundedReceiver<Item>>>>,
    attempts: Arc<Mutex<Vec<tokio::time::Instant>>>,
    calls: Arc<Mutex<Vec<String>>>,
}

impl Script {
    fn fail(&self) {
        self.plan.lock().unwrap().push_back(None);
    }

    fn stream(&self) -> mpsc::UnboundedSender<Item> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.plan.lock().unwrap().push_back(Some(rx));
        tx
    }
}

#[async_trait::async_trait]
impl EventSource for Arc<Script> {
    async fn subscribe(&self) -> Result<EnvelopeStream, EventsError> {
        self.attempts
            .lock()
            .unwrap()
            .push(tokio::time::Instant::now());
        let next = self.plan.lock().unwrap().pop_front();
        match next {
            Some(Some(rx)) => {
                self.calls.lock().unwrap().push("subscribed".into());
                Ok(Box::pin(
                    tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
                ))
            }
            Some(None) => Err(EventsError::Subscribe {
                source: Box::new(tonic::Status::unavailable("connection refused")),
            }),
            // Out of script: containerd stays away.
            None => std::future::pending().await,
        }
    }
}

struct Fixture {
    sink: Arc<Sink>,
    tasks: Arc<Tasks>,
    script: Arc<Script>,
    connected: Arc<AtomicBool>,
    stop: CancellationToken,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl Fixture {
    fn new() -> Self {
        let calls = Arc::new(Mutex::new(Vec::new()));
        Self {
            sink: Arc::new(Sink {
                calls: Arc::clone(&calls),
                ..Sink::default()
            }),
            tasks: Arc::new(Tasks::default()),
            script: Arc::new(Script {
                calls,
                ..Script::default()
            }),
            connected: Arc::new(AtomicBool::new(false)),
            stop: CancellationToken::new(),
            handle: None,
        }
    }

    fn start(&mut self) {
        let watcher = Watcher::new(
            Arc::clone(&self.sink),
            Arc::clone(&self.tasks) as _,
            WatchOptions { exit_grace: GRACE },
            Arc::clone(&self.connected),
            self.stop.clone(),
        );
        self.handle = Some(watcher.spawn(Arc::clone(&self.script)));
    }

    async fn stop(mut self) {
        self.stop.cancel();
        self.handle.take().unwrap().await.unwrap();
        assert!(!self.connected.load(Ordering::Relaxed));
    }
}

/// Lets every ready task run (the paused clock does not move).
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_kept_task_is_flushed_once_the_grace_passes_without_a_delete() {
    let mut f = Fixture::new();
    let tx = f.script.stream();
    f.start();
    settle().await;
    f.tasks.set("default", "c1", TaskStatus::Stopped);
    tx.send(Ok(exit("default", "c1", "c1"))).unwrap();
    tx.send(Ok(exit("default", "c1", "exec-1"))).unwrap();
    settle().await;
    tokio::time::sleep(GRACE - Duration::from_millis(10)).await;
    settle().await;
    assert!(f.sink.taken().is_empty(), "flushed before the grace ended");
    tokio::time::sleep(Duration::from_millis(20)).await;
    settle().await;
    assert_eq!(f.sink.taken(), ["event default/c1"]);
    tokio::time::sleep(GRACE * 3).await;
    settle().await;
    assert!(f.sink.taken().is_empty(), "flushed twice");
    f.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_delete_within_the_grace_flushes_at_once_and_only_once() {
    let mut f = Fixture::new();
    let tx = f.script.stream();
    f.start();
    settle().await;
    tx.send(Ok(exit("default", "c1", "c1"))).unwrap();
    settle().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    tx.send(Ok(delete("default", "c1", ""))).unwrap();
    settle().await;
    assert_eq!(f.sink.taken(), ["event default/c1"]);
    tokio::time::sleep(GRACE * 2).await;
    settle().await;
    assert!(f.sink.taken().is_empty(), "the exit's timer flushed again");
    // An exec's delete is no container delete.
    tx.send(Ok(delete("default", "c1", "exec-1"))).unwrap();
    settle().await;
    assert!(f.sink.taken().is_empty());
    f.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_restarted_container_or_an_unreadable_task_is_not_flushed() {
    let mut f = Fixture::new();
    let tx = f.script.stream();
    f.start();
    settle().await;
    // nerdctl start: the old task is deleted and a new one runs by the time the event is seen.
    f.tasks.set("default", "c1", TaskStatus::Running);
    tx.send(Ok(delete("default", "c1", ""))).unwrap();
    f.tasks.failing.lock().unwrap().push("c2".into());
    tx.send(Ok(delete("default", "c2", ""))).unwrap();
    // A task that exits again restarts the grace: the first exit's timer does nothing.
    f.tasks.set("default", "c3", TaskStatus::Stopped);
    tx.send(Ok(exit("default", "c3", "c3"))).unwrap();
    settle().await;
    tokio::time::sleep(GRACE / 2).await;
    tx.send(Ok(exit("default", "c3", "c3"))).unwrap();
    settle().await;
    tokio::time::sleep(GRACE / 2 + Duration::from_millis(10)).await;
    settle().await;
    assert!(f.sink.taken().is_empty());
    tokio::time::sleep(GRACE / 2).await;
    settle().await;
    assert_eq!(f.sink.taken(), ["event default/c3"]);
    f.stop().await;
}

#[tokio::test(start_paused = true)]
async fn every_connection_subscribes_then_reconciles_stopped_and_absent_tasks() {
    let mut f = Fixture::new();
    *f.sink.live.lock().unwrap() = vec![
        "default/3/stopped".into(),
        "default/4/running".into(),
        "k8s.io/5/gone".into(),
        "default/6/foreign".into(),
        "not-a-backend-key".into(),
    ];
    f.tasks.set("default", "stopped", TaskStatus::Stopped);
    f.tasks.set("default", "running", TaskStatus::Running);
    let first = f.script.stream();
    let second = f.script.stream();
    f.start();
    settle().await;
    assert!(f.connected.load(Ordering::Relaxed));
    let expected = [
        "reconcile default/stopped",
        "reconcile k8s.io/gone",
        "reconcile default/foreign",
    ];
    assert_eq!(f.sink.taken(), expected);

    // The stream breaks: disconnected, resubscribed after the first backoff, reconciled again.
    first
        .send(Err(tonic::Status::unavailable("containerd went away")))
        .unwrap();
    settle().await;
    assert!(!f.connected.load(Ordering::Relaxed));
    tokio::time::sleep(MIN_BACKOFF).await;
    settle().await;
    assert!(f.connected.load(Ordering::Relaxed));
    assert_eq!(f.sink.taken(), expected);
    let calls = f.sink.calls.lock().unwrap().clone();
    let order: Vec<&str> = calls
        .iter()
        .map(String::as_str)
        .filter(|c| matches!(*c, "subscribed" | "live"))
        .collect();
    assert_eq!(order, ["subscribed", "live", "subscribed", "live"]);

    // Events still flow on the new stream.
    second.send(Ok(delete("default", "stopped", ""))).unwrap();
    settle().await;
    assert_eq!(f.sink.taken(), ["event default/stopped"]);
    f.stop().await;
}

#[tokio::test(start_paused = true)]
async fn failed_subscriptions_back_off_from_100_ms_doubling_to_5_s() {
    let mut f = Fixture::new();
    for _ in 0..8 {
        f.script.fail();
    }
    let tx = f.script.stream();
    let t0 = tokio::time::Instant::now();
    f.start();
    settle().await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    settle().await;
    assert!(f.connected.load(Ordering::Relaxed));
    let gaps: Vec<u128> = f
        .script
        .attempts
        .lock()
        .unwrap()
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    assert_eq!(gaps, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    assert_eq!(f.script.attempts.lock().unwrap()[0], t0);
    // A closed stream (containerd restarted) is a lost subscription too.
    drop(tx);
    settle().await;
    assert!(!f.connected.load(Ordering::Relaxed));
    f.stop().await;
}
