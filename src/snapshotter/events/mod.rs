//! The containerd events watcher: flushes a container's layer when its task stops, so `ctr` and
//! `nerdctl` users need no OCI hook for a stopped container to be durable.
//!
//! - `/tasks/delete` of a container's task means its rootfs is unmounted and the upper dir
//!   quiescent: flush at once.
//! - `/tasks/exit` of the init process (an exec's exit carries the exec id, not the container
//!   id, and is ignored) leaves the upper dead but mounted. `ctr run -d` and `nerdctl stop` keep
//!   the task, so no delete may follow: flush once `exit_grace` passes without one.
//! - Before flushing, the task is looked up: a container whose new task already runs (a restart
//!   right after the delete) is not flushed, since its upper is changing again.
//! - The stream has no replay. Every (re)connect subscribes first and then reconciles: each live
//!   persisted snapshot whose container has no task or a stopped one is flushed (an unchanged
//!   upper costs the manager only its fingerprint walk). Events that fire while reconciling
//!   are therefore never lost between the two.
//! - Nothing here blocks containerd or stops the daemon: every failure is logged with the
//!   container it concerns, and the watcher reconnects with backoff.

mod containerd;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_client::events::{TaskDelete, TaskExit};
use containerd_client::types::Envelope;
use prost::Message;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

pub use self::containerd::ContainerdEvents;

use super::containers::{ContainerLookup, TaskStatus};
use super::key::BackendKey;
use super::persist::{FlushRequest, FlushTarget, FlushTicket, PersistError, Persistence};
use crate::layer::types::ContainerLayerId;
use crate::util::error_chain;

/// Topic of a process exit (init or exec).
pub const EXIT_TOPIC: &str = "/tasks/exit";
/// Topic of a task deletion (published after the shim unmounted the rootfs).
pub const DELETE_TOPIC: &str = "/tasks/delete";

/// First wait before resubscribing; doubled after each failure up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between subscription attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Triggers recorded with the flush requests (status, logs, metrics).
const TRIGGER_EVENT: &str = "event";
const TRIGGER_RECONCILE: &str = "reconcile";

/// What can go wrong with the subscription itself (events and flushes only log).
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("cannot subscribe to containerd events")]
    Subscribe {
        #[source]
        source: Box<tonic::Status>,
    },
    #[error("containerd events stream failed")]
    Stream {
        #[source]
        source: Box<tonic::Status>,
    },
    #[error("containerd closed the events stream")]
    Closed,
    #[error("{topic} event of namespace {namespace} carries no payload")]
    NoPayload { topic: String, namespace: String },
    #[error("cannot decode {topic} event of namespace {namespace}")]
    Decode {
        topic: String,
        namespace: String,
        #[source]
        source: prost::DecodeError,
    },
}

/// A task event the watcher acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEvent {
    /// The init process exited; the rootfs is still mounted.
    Exit {
        namespace: String,
        container: String,
    },
    /// The task was deleted; the rootfs is unmounted.
    Delete {
        namespace: String,
        container: String,
    },
}

/// The task event in `envelope`, or `None` for other topics and for exec processes.
/// containerd's `type_url` lacks the leading `/`, so the payload is decoded as the type the
/// topic promises rather than through `Any`'s type lookup.
pub fn decode(envelope: &Envelope) -> Result<Option<TaskEvent>, EventsError> {
    let topic = envelope.topic.as_str();
    if topic != EXIT_TOPIC && topic != DELETE_TOPIC {
        return Ok(None);
    }
    let payload = envelope
        .event
        .as_ref()
        .ok_or_else(|| EventsError::NoPayload {
            topic: topic.to_string(),
            namespace: envelope.namespace.clone(),
        })?;
    let failed = |source| EventsError::Decode {
        topic: topic.to_string(),
        namespace: envelope.namespace.clone(),
        source,
    };
    let namespace = envelope.namespace.clone();
    if topic == EXIT_TOPIC {
        let exit = TaskExit::decode(payload.value.as_slice()).map_err(failed)?;
        // An exec's exit names the exec; only the init process's exit stops the container.
        if exit.container_id.is_empty() || exit.id != exit.container_id {
            return Ok(None);
        }
        return Ok(Some(TaskEvent::Exit {
            namespace,
            container: exit.container_id,
        }));
    }
    let delete = TaskDelete::decode(payload.value.as_slice()).map_err(failed)?;
    // Older shims leave `id` empty; newer ones set it, to the exec id for an exec's delete.
    if delete.container_id.is_empty() || (!delete.id.is_empty() && delete.id != delete.container_id)
    {
        return Ok(None);
    }
    Ok(Some(TaskEvent::Delete {
        namespace,
        container: delete.container_id,
    }))
}

/// A stream of event envelopes.
pub type EnvelopeStream = Pin<Box<dyn Stream<Item = Result<Envelope, tonic::Status>> + Send>>;

/// Where the events come from.
#[async_trait::async_trait]
pub trait EventSource: Send + Sync {
    /// Subscribes to the task exit and delete topics of all namespaces; returns only once
    /// containerd has registered the subscription, so nothing published afterwards is missed.
    async fn subscribe(&self) -> Result<EnvelopeStream, EventsError>;
}

/// What the watcher asks of the persistence layer.
#[async_trait::async_trait]
pub trait FlushSink: Send + Sync {
    /// Records a flush request (see [`Persistence::request_flush`]).
    async fn request_flush(&self, req: FlushRequest) -> Result<FlushTicket, PersistError>;
    /// The live persisted snapshots: (identity, backend key).
    async fn live_snapshots(&self) -> Result<Vec<(ContainerLayerId, String)>, PersistError>;
}

#[async_trait::async_trait]
impl FlushSink for Arc<Persistence> {
    async fn request_flush(&self, req: FlushRequest) -> Result<FlushTicket, PersistError> {
        Persistence::request_flush(self, req).await
    }

    async fn live_snapshots(&self) -> Result<Vec<(ContainerLayerId, String)>, PersistError> {
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.live_identities())
            .await
            .map_err(PersistError::Join)?
    }
}

/// Settings of the watcher.
#[derive(Debug, Clone, Copy)]
pub struct WatchOptions {
    /// How long a stopped task may stay undeleted before its mounted upper is flushed.
    pub exit_grace: Duration,
}

/// The watcher; shared as `Arc<Watcher<S>>` with its grace timers.
pub struct Watcher<S> {
    sink: S,
    lookup: Arc<dyn ContainerLookup>,
    opts: WatchOptions,
    /// True while subscribed (the control API's `status` shows it).
    connected: Arc<AtomicBool>,
    /// Containers whose init exited and whose delete has not arrived: the generation of the
    /// exit, so a timer of an older exit does not act on a newer one.
    exited: Mutex<HashMap<(String, String), u64>>,
    generation: AtomicU64,
    stop: CancellationToken,
}

impl<S> std::fmt::Debug for Watcher<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("opts", &self.opts)
            .field("connected", &self.connected.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// How a connection ended.
enum Ended {
    Stopped,
    Failed(EventsError),
}

impl<S: FlushSink + 'static> Watcher<S> {
    /// A watcher flushing through `sink`, asking `lookup` for task states, setting `connected`
    /// while subscribed, until `stop` is cancelled.
    #[must_use]
    pub fn new(
        sink: S,
        lookup: Arc<dyn ContainerLookup>,
        opts: WatchOptions,
        connected: Arc<AtomicBool>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            sink,
            lookup,
            opts,
            connected,
            exited: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            stop,
        })
    }

    /// Starts [`Watcher::run`] on the current runtime.
    pub fn spawn(
        self: &Arc<Self>,
        source: impl EventSource + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move { this.run(source).await })
    }

    /// Subscribes, reconciles and handles events until stopped; resubscribes with backoff
    /// whenever the subscription fails or the stream ends.
    pub async fn run(self: Arc<Self>, source: impl EventSource) {
        let mut backoff = MIN_BACKOFF;
        // Log the first failure of a series as a warning and the repeats at debug.
        let mut quiet = false;
        loop {
            let subscribed = tokio::select! {
                () = self.stop.cancelled() => break,
                s = source.subscribe() => s,
            };
            match subscribed {
                Ok(stream) => {
                    self.connected.store(true, Ordering::Relaxed);
                    crate::metrics::set_events_connected(true);
                    tracing::info!("subscribed to containerd task events; reconciling");
                    let since = tokio::time::Instant::now();
                    let reconcile = {
                        let this = Arc::clone(&self);
                        tokio::spawn(async move { this.reconcile().await })
                    };
                    let ended = self.consume(stream).await;
                    self.connected.store(false, Ordering::Relaxed);
                    crate::metrics::set_events_connected(false);
                    match ended {
                        Ended::Stopped => {
                            reconcile.abort();
                            break;
                        }
                        Ended::Failed(e) => {
                            tracing::warn!(error = %error_chain(&e),
                                "containerd events subscription lost; resubscribing");
                        }
                    }
                    // A connection that held for a while starts a new series of attempts.
                    if since.elapsed() >= MAX_BACKOFF {
                        backoff = MIN_BACKOFF;
                    }
                    quiet = true;
                }
                Err(e) if quiet => {
                    tracing::debug!(error = %error_chain(&e), retry_ms = backoff.as_millis() as u64,
                        "cannot subscribe to containerd events");
                }
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), retry_ms = backoff.as_millis() as u64,
                        "cannot subscribe to containerd events; retrying (the next failures are logged at debug)");
                    quiet = true;
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => break,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        self.connected.store(false, Ordering::Relaxed);
    }

    /// Handles the stream's events until it ends or the watcher stops.
    async fn consume(self: &Arc<Self>, mut stream: EnvelopeStream) -> Ended {
        loop {
            let next = tokio::select! {
                () = self.stop.cancelled() => return Ended::Stopped,
                next = stream.next() => next,
            };
            match next {
                None => return Ended::Failed(EventsError::Closed),
                Some(Err(status)) => {
                    return Ended::Failed(EventsError::Stream {
                        source: Box::new(status),
                    });
                }
                Some(Ok(envelope)) => self.handle(&envelope),
            }
        }
    }

    /// Acts on one envelope without waiting: flushes and timers run as their own tasks.
    fn handle(self: &Arc<Self>, envelope: &Envelope) {
        match decode(envelope) {
            Ok(None) => {}
            Ok(Some(TaskEvent::Delete {
                namespace,
                container,
            })) => {
                self.exited
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&(namespace.clone(), container.clone()));
                tracing::debug!(%namespace, %container, "task deleted");
                let this = Arc::clone(self);
                tokio::spawn(async move {
                    this.flush_stopped(&namespace, &container, TRIGGER_EVENT)
                        .await;
                });
            }
            Ok(Some(TaskEvent::Exit {
                namespace,
                container,
            })) => {
                let generation = self.generation.fetch_add(1, Ordering::Relaxed);
                self.exited
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert((namespace.clone(), container.clone()), generation);
                tracing::debug!(%namespace, %container, grace_ms = self.opts.exit_grace.as_millis() as u64,
                    "init process exited; waiting for the task delete");
                let this = Arc::clone(self);
                tokio::spawn(async move {
                    this.after_grace(namespace, container, generation).await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "ignoring a containerd event");
            }
        }
    }

    /// Flushes a stopped container whose task was not deleted within the grace period.
    async fn after_grace(&self, namespace: String, container: String, generation: u64) {
        tokio::select! {
            () = self.stop.cancelled() => return,
            () = tokio::time::sleep(self.opts.exit_grace) => {}
        }
        let key = (namespace, container);
        let due = {
            let mut exited = self
                .exited
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = exited.get(&key) == Some(&generation);
            if due {
                exited.remove(&key);
            }
            due
        };
        if due {
            tracing::debug!(namespace = %key.0, container = %key.1,
                "task kept after exit; flushing the stopped container");
            self.flush_stopped(&key.0, &key.1, TRIGGER_EVENT).await;
        }
    }

    /// Requests a flush of a container whose task stopped, unless a new task runs already.
    async fn flush_stopped(&self, namespace: &str, container: &str, trigger: &'static str) {
        match self.lookup.task_status(namespace, container).await {
            Ok(TaskStatus::Absent | TaskStatus::Stopped) => {}
            Ok(status) => {
                tracing::debug!(%namespace, %container, status = status.as_str(), trigger,
                    "not flushing: the container has a task that may write again");
                return;
            }
            Err(e) => {
                // The subscription is likely gone too; the reconcile after it returns covers this.
                tracing::warn!(%namespace, %container, trigger, error = %error_chain(&e),
                    "not flushing: cannot tell whether the container was restarted");
                return;
            }
        }
        self.request(namespace, container, trigger).await;
    }

    /// Records the flush; a container that is not ours is skipped quietly.
    async fn request(&self, namespace: &str, container: &str, trigger: &'static str) {
        let req = FlushRequest {
            target: FlushTarget::Container {
                namespace: namespace.to_string(),
                id: container.to_string(),
            },
            trigger: trigger.to_string(),
            allow_running: false,
            stopped: true,
        };
        match self.sink.request_flush(req).await {
            Ok(FlushTicket::Recorded { id, identity, .. }) => {
                tracing::debug!(%namespace, %container, trigger, request = id, %identity,
                    "flush recorded");
            }
            Ok(FlushTicket::Queued { identity }) => {
                tracing::debug!(%namespace, %container, trigger, %identity,
                    "snapshot already removed; its layer is queued for upload");
            }
            Ok(FlushTicket::NotPersisted)
            | Err(PersistError::FlushTargetNotFound { .. } | PersistError::NotOpen) => {
                tracing::debug!(%namespace, %container, trigger, "container not persisted here");
            }
            Err(PersistError::NotRestored { .. }) => {
                tracing::debug!(%namespace, %container, trigger,
                    "not flushing: the container's layer has not been restored yet");
            }
            Err(e) => {
                tracing::warn!(%namespace, %container, trigger, error = %error_chain(&e),
                    "cannot request a flush of the stopped container");
            }
        }
    }

    /// Flushes every live persisted snapshot whose container has no task or a stopped one;
    /// returns how many flushes were requested.
    pub async fn reconcile(&self) -> usize {
        let live = match self.sink.live_snapshots().await {
            Ok(live) => live,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e),
                    "cannot reconcile after subscribing: persisted snapshots unreadable");
                return 0;
            }
        };
        let mut requested = 0;
        for (identity, key) in live {
            if self.stop.is_cancelled() {
                break;
            }
            let Some(bkey) = BackendKey::parse(&key) else {
                continue;
            };
            let (namespace, container) = (bkey.namespace, bkey.name);
            match self.lookup.task_status(namespace, container).await {
                Ok(TaskStatus::Absent | TaskStatus::Stopped) => {
                    self.request(namespace, container, TRIGGER_RECONCILE).await;
                    requested += 1;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(%namespace, %container, %identity, error = %error_chain(&e),
                        "reconcile: cannot read the container's task");
                }
            }
        }
        tracing::info!(
            requested,
            "reconciled persisted snapshots with containerd's tasks"
        );
        requested
    }
}
