//! Flush: sync a snapshot's upper dir, left in place, to the store as its identity's current
//! layer — the one operation the control API, the poststop hook and the events watcher call.
//!
//! - A request is recorded in `persist_flush` (synchronous=FULL) before it is acknowledged, so
//!   a crash after the reply still flushes at the next start; a request for a snapshot that
//!   already has a pending one joins it.
//! - The flusher syncs requests one at a time through the layer manager, which skips an
//!   unchanged upper after its fingerprint walk; the fingerprint it records then makes the
//!   later Remove's upload a no-op too.
//! - The upper is read through a descriptor of the snapshot dir, so a Remove that renames the
//!   dir into the outbox mid-flush does not break the walk. Ordering is by seq: the flush takes
//!   its ticket first, the Remove's queued layer a later one, and the manifest never moves
//!   backwards, so an older upload cannot replace a newer one. A request whose snapshot is
//!   gone before it runs is served by uploading that identity's queued layers.
//! - A running container is refused unless the caller waives crash consistency; callers that
//!   know the task stopped (hook at poststop, task events) say so and skip the check.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::layer::SyncOptions;
use crate::layer::types::ContainerLayerId;
use crate::metrics::{self, ErrorKind, Outcome, Trigger};
use crate::snapshotter::key::BackendKey;

use super::db::{self, Resolution, SnapshotRow};
use super::error::{PersistError, Result};
use super::flush_db::{self, FlushRow, FlushState};
use super::flush_target::{Found, find, live_dir, open_followed};
use super::{Persistence, error_chain};

/// What to flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlushTarget {
    /// A container (its rootfs snapshot has the container's id as client key, as ctr, nerdctl
    /// and CRI name it) or a client snapshot key, in a containerd namespace.
    Container { namespace: String, id: String },
    /// A backend snapshot key (`<namespace>/<n>/<key>`).
    BackendKey(String),
    /// The live snapshot holding an identity, or else its queued layers.
    Identity(ContainerLayerId),
    /// An upper dir (`<root>/snapshots/<id>/fs`), as the hook finds it in mountinfo.
    Upper(PathBuf),
}

impl std::fmt::Display for FlushTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Container { namespace, id } => write!(f, "container {namespace}/{id}"),
            Self::BackendKey(k) => write!(f, "snapshot {k}"),
            Self::Identity(i) => write!(f, "identity {i}"),
            Self::Upper(p) => write!(f, "upper dir {}", p.display()),
        }
    }
}

/// A flush request.
#[derive(Debug, Clone)]
pub struct FlushRequest {
    pub target: FlushTarget,
    /// Who asks: `hook`, `event`, `reconcile`, `cli`, `api` (logs, status, metrics).
    pub trigger: String,
    /// Flush even if the container runs (the result is not crash-consistent).
    pub allow_running: bool,
    /// The caller knows the task has stopped (poststop hook, task exit/delete event).
    pub stopped: bool,
}

/// The answer to a recorded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlushTicket {
    /// Recorded durably as request `id` (or joined the pending request `id`).
    Recorded {
        id: i64,
        identity: ContainerLayerId,
        joined: bool,
    },
    /// No live snapshot, but layers of the identity are queued (durable in the outbox).
    Queued { identity: ContainerLayerId },
    /// The target is not persisted: nothing to do.
    NotPersisted,
}

/// A flush that reached the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushDone {
    pub identity: ContainerLayerId,
    pub request: i64,
    pub digest: String,
    pub seq: u64,
    pub unchanged: bool,
    pub crash_consistent: bool,
}

/// Backoff of a request that failed for a store fault (it stays pending).
const MIN_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);
/// Local failures are retried this often before the request is failed (the layer still goes
/// up at Remove through the outbox).
const MAX_LOCAL_ATTEMPTS: i64 = 3;
/// Waiters look at their request at least this often, in case a wake-up was missed.
const WAIT_RECHECK: Duration = Duration::from_millis(500);

impl Persistence {
    /// Records a flush request (durably) and wakes the flusher; does not wait for the upload.
    pub async fn request_flush(self: &Arc<Self>, req: FlushRequest) -> Result<FlushTicket> {
        metrics::flush_requested(trigger_of(&req.trigger));
        let att = self.attached()?;
        let snapshots = att.snapshots.clone();
        let target = req.target.clone();
        let found = self
            .read_async("find snapshot to flush", move |c| {
                find(c, &snapshots, &target)
            })
            .await?;
        let row = match found {
            // Not a snapshot dir of ours (another snapshotter's mount): nothing to do.
            Found::Nothing if matches!(req.target, FlushTarget::Upper(_)) => {
                return Ok(FlushTicket::NotPersisted);
            }
            Found::Nothing => {
                return Err(PersistError::FlushTargetNotFound {
                    target: req.target.to_string(),
                });
            }
            Found::QueuedOnly(identity) => {
                self.notify_worker();
                return Ok(FlushTicket::Queued { identity });
            }
            Found::Live(row) => row,
        };
        let identity = match (&row.resolution, row.restored) {
            (Resolution::Identified(id), true) => id.clone(),
            (Resolution::Identified(id), false) => {
                return Err(PersistError::NotRestored {
                    key: row.key,
                    identity: id.clone(),
                });
            }
            _ => return Ok(FlushTicket::NotPersisted),
        };
        if !req.allow_running && !req.stopped {
            self.refuse_running(&row.key).await?;
        }
        let (key, id2, trigger) = (row.key.clone(), identity.clone(), req.trigger.clone());
        let consistent = !req.allow_running || req.stopped;
        let requested = self
            .write_async("record flush request", move |c| {
                flush_db::request(c, &key, &id2, &trigger, consistent, now_ns())
            })
            .await?;
        tracing::info!(request = requested.id, key = %row.key, %identity, trigger = %req.trigger,
            joined = requested.joined, "flush requested");
        self.flush_wake.notify_one();
        Ok(FlushTicket::Recorded {
            id: requested.id,
            identity,
            joined: requested.joined,
        })
    }

    /// Fails when the container behind snapshot `key` may still write to its upper dir.
    async fn refuse_running(&self, key: &str) -> Result<()> {
        let Some(bkey) = BackendKey::parse(key) else {
            return Ok(());
        };
        let status = self
            .containers
            .task_status(bkey.namespace, bkey.name)
            .await
            .map_err(|source| PersistError::TaskLookupFailed {
                namespace: bkey.namespace.to_string(),
                container: bkey.name.to_string(),
                source: Box::new(source),
            })?;
        if status.may_write() {
            return Err(PersistError::ContainerRunning {
                namespace: bkey.namespace.to_string(),
                container: bkey.name.to_string(),
                status: status.as_str().to_string(),
            });
        }
        Ok(())
    }

    /// A request recorded as "the task stopped" must not sync an upper that a new task (a
    /// restart between the stop and the flush) is writing again. containerd being unreachable
    /// is no reason to wait: without it no task can start.
    async fn refuse_restarted(&self, key: &str) -> Result<()> {
        let Some(bkey) = BackendKey::parse(key) else {
            return Ok(());
        };
        match self.containers.task_status(bkey.namespace, bkey.name).await {
            Ok(status) if status.may_write() => Err(PersistError::ContainerRunning {
                namespace: bkey.namespace.to_string(),
                container: bkey.name.to_string(),
                status: format!(
                    "{} again since the stop that asked for this flush",
                    status.as_str()
                ),
            }),
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::debug!(key, error = %error_chain(&e), "cannot ask containerd for the task; it cannot have restarted it");
                Ok(())
            }
        }
    }

    /// Waits until `ticket` is durable in the store, at most `timeout`.
    pub async fn wait_flush(&self, ticket: &FlushTicket, timeout: Duration) -> Result<FlushDone> {
        let deadline = tokio::time::Instant::now() + timeout;
        match ticket {
            FlushTicket::NotPersisted => Err(PersistError::NothingToSync {
                target: "an unpersisted snapshot".to_string(),
            }),
            FlushTicket::Queued { identity } => self.wait_queued(identity, deadline, timeout).await,
            FlushTicket::Recorded { id, identity, .. } => {
                self.wait_recorded(*id, identity, deadline, timeout).await
            }
        }
    }

    async fn wait_recorded(
        &self,
        mut id: i64,
        identity: &ContainerLayerId,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<FlushDone> {
        loop {
            // Registered before reading, so a completion between the read and the wait wakes us.
            let notified = self.flush_done.notified();
            let row = self
                .read_async("read flush request", move |c| flush_db::get(c, id))
                .await?
                .ok_or(PersistError::NoSuchFlush { request: id })?;
            if let Some(next) = row.merged_into {
                id = next;
                continue;
            }
            match row.state {
                FlushState::Done => {
                    return Ok(FlushDone {
                        identity: row.identity,
                        request: row.id,
                        digest: row.digest.unwrap_or_default(),
                        seq: row.seq.unwrap_or_default(),
                        unchanged: row.unchanged,
                        crash_consistent: row.crash_consistent,
                    });
                }
                FlushState::Failed => {
                    return Err(PersistError::FlushFailed {
                        request: row.id,
                        identity: row.identity,
                        message: row.error.unwrap_or_default(),
                    });
                }
                FlushState::Pending | FlushState::Running => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(PersistError::FlushTimeout {
                    request: id,
                    identity: identity.clone(),
                    secs: timeout.as_secs(),
                    last: row
                        .error
                        .map(|e| format!("; last error: {e}"))
                        .unwrap_or_default(),
                });
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep(WAIT_RECHECK) => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Waits until no layer of `identity` is queued, then reports the store's current one.
    async fn wait_queued(
        &self,
        identity: &ContainerLayerId,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<FlushDone> {
        loop {
            let notified = self.flush_done.notified();
            let id = identity.clone();
            let rows = self
                .read_async("read outbox", move |c| db::outbox_of(c, &id))
                .await?;
            if rows.is_empty() {
                let current = self.current(identity).await?;
                return Ok(FlushDone {
                    identity: identity.clone(),
                    request: 0,
                    digest: current.snapshot.digest,
                    seq: current.seq,
                    unchanged: true,
                    crash_consistent: true,
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(PersistError::FlushTimeout {
                    request: 0,
                    identity: identity.clone(),
                    secs: timeout.as_secs(),
                    last: rows
                        .iter()
                        .find_map(|r| r.last_error.clone())
                        .map(|e| format!("; last error: {e}"))
                        .unwrap_or_default(),
                });
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep(WAIT_RECHECK) => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Starts the flusher on the current runtime; stops when `stop` is cancelled (a flush in
    /// flight is dropped and runs again at the next start).
    pub fn spawn_flusher(self: &Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move { this.run_flusher(stop).await })
    }

    async fn run_flusher(self: Arc<Self>, stop: CancellationToken) {
        loop {
            self.count_flushes().await;
            let next_due = tokio::select! {
                () = stop.cancelled() => return,
                due = self.flush_pass() => due,
            };
            self.count_flushes().await;
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.flush_wake.notified() => {}
                () = tokio::time::sleep(next_due.unwrap_or(Duration::from_secs(60))) => {}
            }
        }
    }

    /// Publishes the number of unfinished requests as a metric.
    async fn count_flushes(&self) {
        match self
            .read_async("count flush requests", flush_db::open_count)
            .await
        {
            Ok(n) => metrics::set_flush_queue(usize::try_from(n).unwrap_or(0)),
            Err(e) => tracing::debug!(error = %error_chain(&e), "cannot count flush requests"),
        }
    }

    /// Runs every due pending request once; returns when the next backed-off one is due.
    pub(super) async fn flush_pass(self: &Arc<Self>) -> Option<Duration> {
        let rows = match self
            .read_async("read flush requests", flush_db::pending)
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "cannot read flush requests");
                return Some(MIN_RETRY);
            }
        };
        let mut next_due: Option<Duration> = None;
        for row in rows {
            let now = now_ns();
            if row.next_attempt_ns > now {
                let due =
                    Duration::from_nanos(u64::try_from(row.next_attempt_ns - now).unwrap_or(0));
                next_due = Some(next_due.map_or(due, |d| d.min(due)));
                continue;
            }
            if let Some(due) = self.run_one(row).await {
                next_due = Some(next_due.map_or(due, |d| d.min(due)));
            }
        }
        next_due
    }

    /// Runs one request to its end state; returns the retry delay if it stays pending.
    async fn run_one(self: &Arc<Self>, row: FlushRow) -> Option<Duration> {
        let id = row.id;
        match self
            .write_async("start flush request", move |c| flush_db::start(c, id))
            .await
        {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                tracing::warn!(request = id, error = %error_chain(&e), "cannot start flush request");
                return Some(MIN_RETRY);
            }
        }
        let started = std::time::Instant::now();
        let result = self.execute(&row).await;
        let (outcome, retry) = match result {
            Ok(done) => {
                flush_ended(&row, Outcome::succeeded(done.2));
                if row.crash_consistent {
                    // The stopped container's upper as of the request is stored.
                    self.note_durable(&row.identity, row.requested_ns).await;
                }
                tracing::info!(request = id, identity = %row.identity, digest = %done.0, seq = done.1,
                    unchanged = done.2, trigger = %row.trigger, ms = started.elapsed().as_millis() as u64,
                    "flush durable");
                let (digest, seq, unchanged) = done;
                let r = self
                    .write_async("finish flush request", move |c| {
                        flush_db::succeed(c, id, &digest, seq, unchanged, now_ns())
                    })
                    .await;
                (r, None)
            }
            Err(e) => {
                let message = error_chain(&e);
                let attempts = row.attempts + 1;
                if e.is_store_fault() || attempts < MAX_LOCAL_ATTEMPTS {
                    let delay = retry_delay(attempts);
                    metrics::error(if e.is_store_fault() {
                        ErrorKind::Store
                    } else {
                        ErrorKind::Local
                    });
                    tracing::warn!(request = id, identity = %row.identity, attempts, retry_in_secs = delay.as_secs(),
                        error = %message, "flush failed; will retry");
                    let next = now_ns()
                        .saturating_add(i64::try_from(delay.as_nanos()).unwrap_or(i64::MAX));
                    let r = self
                        .write_async("reschedule flush request", move |c| {
                            flush_db::retry_later(c, id, &message, next)
                        })
                        .await;
                    (r, Some(delay))
                } else {
                    flush_ended(&row, Outcome::Failed);
                    tracing::error!(request = id, identity = %row.identity, attempts, error = %message,
                        "flush failed (the layer is still uploaded when the snapshot is removed)");
                    let r = self
                        .write_async("fail flush request", move |c| {
                            flush_db::fail(c, id, &message, now_ns())
                        })
                        .await;
                    (r, None)
                }
            }
        };
        if let Err(e) = outcome {
            tracing::warn!(request = id, error = %error_chain(&e), "cannot record the flush result");
        }
        self.flush_done.notify_waiters();
        retry
    }

    /// Syncs the request's snapshot; returns (digest, seq, unchanged).
    async fn execute(self: &Arc<Self>, row: &FlushRow) -> Result<(String, u64, bool)> {
        let att = self.attached()?;
        let (key, identity) = (row.key.clone(), row.identity.clone());
        let live = self
            .read_async("find snapshot to flush", move |c| {
                live_dir(c, &key, &identity)
            })
            .await?;
        let Some((snapshot_id, base)) = live else {
            // Removed before the flush ran: its layer is queued (or already uploaded).
            let identity = row.identity.clone();
            let queued = self
                .read_async("read outbox", move |c| db::outbox_of(c, &identity))
                .await?;
            let mut unchanged = true;
            for q in &queued {
                unchanged &= self.process(q).await?.upload.is_none();
            }
            let current = self.current(&row.identity).await?;
            return Ok((current.snapshot.digest, current.seq, unchanged));
        };
        if row.crash_consistent {
            self.refuse_restarted(&row.key).await?;
        }
        let dir = att.snapshots.join(snapshot_id.to_string());
        let (handle, upper) = open_followed(&dir).await?;
        let seq_id = row.identity.clone();
        let seq = self
            .write_async("allocate sequence number", move |c| {
                db::next_seq(c, &seq_id)
            })
            .await?;
        let opts = SyncOptions {
            base: Some(base),
            seq: Some(seq),
            progress: None,
        };
        let synced = self
            .manager
            .sync_layer_detailed(&row.identity, &upper, opts)
            .await;
        drop(handle);
        let outcome = synced.map_err(|source| PersistError::Sync {
            identity: row.identity.clone(),
            path: dir.join("fs"),
            source: Box::new(source),
        })?;
        let (identity, synced_seq) = (row.identity.clone(), outcome.seq);
        self.write_async("record synced sequence number", move |c| {
            db::note_synced(c, &identity, synced_seq)
        })
        .await?;
        Ok((
            outcome.snapshot.digest,
            outcome.seq,
            outcome.upload.is_none(),
        ))
    }

    /// Flush requests not finished yet.
    pub fn open_flushes(&self) -> Result<i64> {
        self.attached()?
            .read("count flush requests", flush_db::open_count)
    }

    /// The newest flush requests of `identity`, newest first.
    pub fn recent_flushes(&self, identity: &ContainerLayerId, limit: i64) -> Result<Vec<FlushRow>> {
        let identity = identity.clone();
        self.attached()?.read("read flush requests", move |c| {
            flush_db::recent(c, &identity, limit)
        })
    }
}

fn trigger_of(name: &str) -> Trigger {
    Trigger::from_name(name).unwrap_or(Trigger::Api)
}

/// Records that `row` ended as `outcome`, timed from the request (queueing and earlier
/// attempts included).
fn flush_ended(row: &FlushRow, outcome: Outcome) {
    let took = Duration::from_nanos(u64::try_from(now_ns() - row.requested_ns).unwrap_or(0));
    metrics::flush_finished(trigger_of(&row.trigger), outcome, took);
}

fn retry_delay(attempts: i64) -> Duration {
    let doublings = u32::try_from(attempts.saturating_sub(1).clamp(0, 16)).unwrap_or(16);
    (MIN_RETRY * 2u32.pow(doublings)).min(MAX_RETRY)
}

fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
}

impl Persistence {
    /// The live snapshots holding an identity on this node: (identity, backend key).
    pub fn live_identities(&self) -> Result<Vec<(ContainerLayerId, String)>> {
        self.attached()?.read("list persisted snapshots", |c| {
            let mut out = Vec::new();
            for key in db::snapshot_keys(c)? {
                if let Some(SnapshotRow {
                    resolution: Resolution::Identified(id),
                    ..
                }) = db::snapshot(c, &key)?
                {
                    out.push((id, key));
                }
            }
            Ok(out)
        })
    }

    /// The highest seq of `identity` this node knows to be in the store.
    pub fn synced_seq(&self, identity: &ContainerLayerId) -> Result<u64> {
        let identity = identity.clone();
        self.attached()?
            .read("read synced seq", move |c| db::synced_seq(c, &identity))
    }
}
