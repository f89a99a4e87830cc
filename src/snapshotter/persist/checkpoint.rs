//! Checkpoints of running persisted containers: every `checkpoint_interval_secs` (or a
//! container's `zlayer.checkpoint-interval` label), and on demand, a crash-consistent version
//! of the container's upper dir through [`LayerSyncManager::checkpoint_layer`], with the
//! container's cgroup freezer as the pause.
//!
//! - The pause is bounded (`checkpoint_pause_ms`): a freezer that does not reach frozen in time
//!   (a task in uninterruptible sleep) or a paused pass that overruns is thawed, and the
//!   checkpoint is retried later. A container the user paused is captured as it is and left
//!   paused.
//! - Before freezing, the cgroup is recorded (durably) in `persist_frozen`, and forgotten only
//!   after the thaw: a daemon killed while a container is frozen thaws it at its next start.
//! - Ordering with Remove and flushes is the flush's: the checkpoint takes its sequence ticket
//!   before it reads, the upper is read through a descriptor that follows a concurrent rename
//!   into the outbox, and the manifest never moves to an older ticket.
//! - What "consistent" means: the stored version is the upper dir as it stood at one instant
//!   while every process of the container was frozen — what a power cut at that instant would
//!   have left, given that the container's own writes had reached the page cache. Data still in
//!   the processes' memory (unflushed buffers) is not in it, exactly as after a power cut.
//!
//! [`LayerSyncManager::checkpoint_layer`]: crate::layer::LayerSyncManager::checkpoint_layer

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::layer::types::ContainerLayerId;
use crate::layer::{CheckpointOptions, LayerError};
use crate::metrics::{self, CheckpointOutcome};
use crate::snapshotter::containers::TaskStatus;
use crate::snapshotter::key::BackendKey;
use crate::sys::freezer::{FreezeState, Freezer};

use super::checkpoint_db::{self, CheckpointRow, Stored};
use super::db;
use super::error::{PersistError, Result};
use super::flush::FlushTarget;
use super::flush_target::{Found, find, live_dir, open_followed};
use super::freeze::CgroupPause;
use super::{Persistence, error_chain};

/// Container label overriding `checkpoint_interval_secs` for one container (seconds, 0 = off).
pub const INTERVAL_LABEL: &str = "zlayer.checkpoint-interval";

/// The scheduler wakes at least this often to look for due containers.
const MAX_TICK: Duration = Duration::from_secs(10);
const MIN_TICK: Duration = Duration::from_secs(1);
/// A failed checkpoint is retried after this, doubled per failure in a row, at most the
/// container's interval.
const RETRY_AFTER: Duration = Duration::from_secs(15);

/// Checkpoint settings (`[snapshotter]`).
#[derive(Debug, Clone)]
pub struct CheckpointSettings {
    /// Default interval; zero = only containers whose label asks.
    pub interval: Duration,
    /// Longest a container stays frozen.
    pub pause: Duration,
    /// Checkpoints at once on this node.
    pub concurrency: usize,
}

impl Default for CheckpointSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(300),
            pause: Duration::from_millis(200),
            concurrency: 1,
        }
    }
}

/// Settings and the node-wide limit, shared by the scheduler and manual checkpoints.
#[derive(Debug)]
pub(super) struct Checkpoints {
    settings: CheckpointSettings,
    slots: Arc<Semaphore>,
    /// Snapshot keys with a checkpoint in flight.
    busy: Mutex<HashSet<String>>,
}

impl Checkpoints {
    fn new(settings: CheckpointSettings) -> Self {
        let slots = Arc::new(Semaphore::new(settings.concurrency.max(1)));
        Self {
            settings,
            slots,
            busy: Mutex::new(HashSet::new()),
        }
    }
}

/// A checkpoint that reached the store (or found nothing to store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointDone {
    pub identity: ContainerLayerId,
    pub digest: String,
    pub seq: u64,
    pub unchanged: bool,
    /// How long the container was frozen.
    pub paused: Duration,
    /// Compressed bytes uploaded (both passes).
    pub bytes: u64,
    /// The instant the stored version is of (unix ns): when the container was frozen.
    pub at_ns: i64,
    /// The container was paused by its user: captured without freezing, left paused.
    pub user_paused: bool,
}

impl Persistence {
    fn checkpoints(&self) -> &Checkpoints {
        static DEFAULT: OnceLock<Checkpoints> = OnceLock::new();
        self.checkpoints.get().unwrap_or_else(|| {
            DEFAULT.get_or_init(|| Checkpoints::new(CheckpointSettings::default()))
        })
    }

    /// Uses `settings` for checkpoints from now on (the first call wins).
    pub fn configure_checkpoints(&self, settings: CheckpointSettings) {
        let _ = self.checkpoints.set(Checkpoints::new(settings));
    }

    /// Checkpoints the running container behind `target` now (waiting for a free slot).
    pub async fn checkpoint_now(
        self: &Arc<Self>,
        target: FlushTarget,
        trigger: &str,
    ) -> Result<CheckpointDone> {
        let att = self.attached()?;
        let snapshots = att.snapshots.clone();
        let t = target.clone();
        let found = self
            .read_async("find snapshot to checkpoint", move |c| {
                find(c, &snapshots, &t)
            })
            .await?;
        let row = match found {
            Found::Live(row) => row,
            Found::Nothing | Found::QueuedOnly(_) => {
                return Err(PersistError::FlushTargetNotFound {
                    target: target.to_string(),
                });
            }
        };
        let identity = match (&row.resolution, row.restored) {
            (db::Resolution::Identified(id), true) => id.clone(),
            (db::Resolution::Identified(id), false) => {
                return Err(PersistError::NotRestored {
                    key: row.key,
                    identity: id.clone(),
                });
            }
            _ => {
                return Err(PersistError::NothingToSync {
                    target: target.to_string(),
                });
            }
        };
        self.checkpoint_slot(&row.key, &identity, trigger).await
    }

    /// Runs one checkpoint of `key` in a node-wide slot and records how it went.
    async fn checkpoint_slot(
        self: &Arc<Self>,
        key: &str,
        identity: &ContainerLayerId,
        trigger: &str,
    ) -> Result<CheckpointDone> {
        let cps = self.checkpoints();
        let _slot = Arc::clone(&cps.slots)
            .acquire_owned()
            .await
            .map_err(|_| PersistError::NotOpen)?;
        let result = self.checkpoint_key(key, identity).await;
        let (id, now) = (identity.clone(), now_ns());
        let recorded = match &result {
            Ok(done) => {
                let outcome = if done.unchanged {
                    CheckpointOutcome::Unchanged
                } else {
                    CheckpointOutcome::Durable
                };
                metrics::checkpoint_finished(outcome, Some(done.paused), Some(done.bytes));
                tracing::info!(%identity, key, trigger, digest = %done.digest, seq = done.seq,
                    unchanged = done.unchanged, pause_ms = done.paused.as_secs_f64() * 1e3,
                    bytes = done.bytes, user_paused = done.user_paused, "checkpoint durable");
                let stored = done.clone();
                self.write_async("record checkpoint", move |c| {
                    checkpoint_db::succeeded(
                        c,
                        &id,
                        &Stored {
                            durable_ns: stored.at_ns,
                            pause_us: i64::try_from(stored.paused.as_micros()).unwrap_or(i64::MAX),
                            bytes: i64::try_from(stored.bytes).unwrap_or(i64::MAX),
                            digest: &stored.digest,
                            seq: stored.seq,
                        },
                        now,
                    )
                })
                .await
            }
            Err(e) => {
                let outcome = if is_pause_timeout(e) {
                    CheckpointOutcome::PauseTimeout
                } else {
                    CheckpointOutcome::Failed
                };
                metrics::checkpoint_finished(outcome, None, None);
                let message = error_chain(e);
                tracing::warn!(%identity, key, trigger, error = %message, "checkpoint failed; retried later");
                self.write_async("record checkpoint failure", move |c| {
                    checkpoint_db::failed(c, &id, &message, now)
                })
                .await
            }
        };
        if let Err(e) = recorded {
            tracing::warn!(%identity, error = %error_chain(&e), "cannot record the checkpoint's result");
        }
        result
    }

    /// Freezer-paused checkpoint of the live snapshot `key` holding `identity`.
    async fn checkpoint_key(
        self: &Arc<Self>,
        key: &str,
        identity: &ContainerLayerId,
    ) -> Result<CheckpointDone> {
        let att = self.attached()?;
        let bkey = BackendKey::parse(key).ok_or_else(|| PersistError::NothingToSync {
            target: format!("snapshot {key}"),
        })?;
        let (namespace, container) = (bkey.namespace.to_string(), bkey.name.to_string());
        let (status, pid) =
            self.containers
                .task(&namespace, &container)
                .await
                .map_err(|source| PersistError::TaskLookupFailed {
                    namespace: namespace.clone(),
                    container: container.clone(),
                    source: Box::new(source),
                })?;
        if !matches!(
            status,
            TaskStatus::Running | TaskStatus::Paused | TaskStatus::Pausing
        ) || pid == 0
        {
            return Err(PersistError::NotRunning {
                namespace,
                container,
                status: status.as_str().to_string(),
            });
        }
        let freezer = tokio::task::spawn_blocking(move || Freezer::of_pid(pid))
            .await
            .map_err(PersistError::Join)?
            .map_err(|source| PersistError::Cgroup {
                namespace: namespace.clone(),
                container: container.clone(),
                pid,
                source: Box::new(source),
            })?;
        let (k, id2) = (key.to_string(), identity.clone());
        let live = self
            .read_async("find snapshot to checkpoint", move |c| {
                live_dir(c, &k, &id2)
            })
            .await?;
        let Some((snapshot_id, base)) = live else {
            return Err(PersistError::SnapshotGone {
                key: key.to_string(),
            });
        };
        let dir = att.snapshots.join(snapshot_id.to_string());
        let (handle, upper) = open_followed(&dir).await?;
        let seq_id = identity.clone();
        let seq = self
            .write_async("allocate sequence number", move |c| {
                db::next_seq(c, &seq_id)
            })
            .await?;
        let quiesce = Arc::new(CgroupPause::new(Arc::clone(self), freezer, key));
        let opts = CheckpointOptions {
            seq: Some(seq),
            base: Some(base),
            pause_budget: self.checkpoints().settings.pause,
        };
        let done = self
            .manager
            .checkpoint_layer(identity, &upper, opts, quiesce.clone())
            .await;
        drop(handle);
        let out = done.map_err(|source| PersistError::Checkpoint {
            identity: identity.clone(),
            path: dir.join("fs"),
            source: Box::new(source),
        })?;
        let (id3, synced) = (identity.clone(), out.sync.seq);
        self.write_async("record synced sequence number", move |c| {
            db::note_synced(c, &id3, synced)
        })
        .await?;
        let (at_ns, user_paused) = quiesce.paused_at().unwrap_or((now_ns(), false));
        Ok(CheckpointDone {
            identity: identity.clone(),
            digest: out.sync.snapshot.digest.clone(),
            seq: out.sync.seq,
            unchanged: !out.sync.manifest_moved,
            paused: out.paused,
            bytes: out.running_bytes + out.frozen_bytes,
            at_ns,
            user_paused,
        })
    }

    /// Starts the scheduler of periodic checkpoints; stops when `stop` is cancelled.
    pub fn spawn_checkpointer(
        self: &Arc<Self>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move { this.run_checkpointer(stop).await })
    }

    async fn run_checkpointer(self: Arc<Self>, stop: CancellationToken) {
        if let Err(e) = self.thaw_leftovers().await {
            tracing::warn!(error = %error_chain(&e), "cannot thaw containers a previous run froze");
        }
        // When each running container was first seen running (its recovery point before any
        // checkpoint of this run).
        let mut first_seen: HashMap<String, i64> = HashMap::new();
        loop {
            let tick = match self.schedule(&mut first_seen).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "cannot schedule checkpoints");
                    MAX_TICK
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(tick) => {}
            }
        }
    }

    /// Starts every due checkpoint; returns how long to sleep before looking again.
    async fn schedule(self: &Arc<Self>, first_seen: &mut HashMap<String, i64>) -> Result<Duration> {
        let live = {
            let this = Arc::clone(self);
            tokio::task::spawn_blocking(move || this.live_identities())
                .await
                .map_err(PersistError::Join)??
        };
        let now = now_ns();
        let mut tick = MAX_TICK;
        let mut oldest = Duration::ZERO;
        let mut running_keys = HashSet::new();
        for (identity, key) in live {
            let Some(bkey) = BackendKey::parse(&key) else {
                continue;
            };
            let (ns, name) = (bkey.namespace.to_string(), bkey.name.to_string());
            let Some(interval) = self.interval_of(&ns, &name).await else {
                continue;
            };
            let running = matches!(
                self.containers.task_status(&ns, &name).await,
                Ok(TaskStatus::Running | TaskStatus::Paused)
            );
            if !running {
                continue;
            }
            running_keys.insert(key.clone());
            let seen = *first_seen.entry(key.clone()).or_insert(now);
            let id2 = identity.clone();
            let row = self
                .read_async("read checkpoint state", move |c| {
                    checkpoint_db::get(c, &id2)
                })
                .await?
                .unwrap_or_default();
            let point = row.durable_ns.unwrap_or(seen).max(seen);
            oldest = oldest.max(ns_between(point, now));
            let due_at = next_due(&row, point, interval);
            if due_at > now {
                tick = tick.min(ns_between(now, due_at));
                continue;
            }
            tick = tick.min(interval);
            self.start_checkpoint(key, identity);
        }
        first_seen.retain(|k, _| running_keys.contains(k));
        metrics::set_oldest_recovery_point(oldest);
        Ok(tick.clamp(MIN_TICK, MAX_TICK))
    }

    /// The checkpoint interval of a container: its label, else the default; `None` when off.
    async fn interval_of(&self, namespace: &str, name: &str) -> Option<Duration> {
        let default = self.checkpoints().settings.interval;
        let labelled = match self.containers.get(namespace, name).await {
            Ok(Some(rec)) => rec.labels.get(INTERVAL_LABEL).cloned(),
            _ => None,
        };
        let interval = match labelled {
            Some(v) => match v.trim().parse::<u64>() {
                Ok(secs) => Duration::from_secs(secs),
                Err(_) => {
                    tracing::warn!(namespace, container = name, label = INTERVAL_LABEL, value = %v,
                        "not a number of seconds; using checkpoint_interval_secs");
                    default
                }
            },
            None => default,
        };
        (!interval.is_zero()).then_some(interval)
    }

    /// Runs a checkpoint of `key` in the background unless one is in flight.
    fn start_checkpoint(self: &Arc<Self>, key: String, identity: ContainerLayerId) {
        {
            let mut busy = self
                .checkpoints()
                .busy
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !busy.insert(key.clone()) {
                return;
            }
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let _ = this.checkpoint_slot(&key, &identity, "periodic").await;
            this.checkpoints()
                .busy
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&key);
        });
    }

    /// Thaws the cgroups a previous run recorded as frozen by it (killed mid-pause).
    pub async fn thaw_leftovers(&self) -> Result<u32> {
        let marks = self
            .read_async("list freezes", checkpoint_db::frozen_marks)
            .await?;
        let mut thawed = 0;
        for (cgroup, key) in marks {
            let dir = cgroup.clone();
            let res = tokio::task::spawn_blocking(move || -> std::result::Result<bool, String> {
                let f = match Freezer::at(&dir) {
                    Ok(f) => f,
                    // The container is gone with its cgroup.
                    Err(_) if !Path::new(&dir).exists() => return Ok(false),
                    Err(e) => return Err(error_chain(&e)),
                };
                match f.state().map_err(|e| error_chain(&e))? {
                    FreezeState::Thawed => Ok(false),
                    _ => f.thaw().map(|()| true).map_err(|e| error_chain(&e)),
                }
            })
            .await
            .map_err(PersistError::Join)?;
            match res {
                Ok(did) => {
                    if did {
                        thawed += 1;
                        tracing::warn!(
                            cgroup,
                            key,
                            "thawed a container a previous run left frozen mid-checkpoint"
                        );
                    }
                    let c2 = cgroup.clone();
                    self.write_async("forget a freeze", move |c| {
                        checkpoint_db::unmark_frozen(c, &c2)
                    })
                    .await?;
                }
                Err(e) => {
                    tracing::error!(cgroup, key, error = %e, "cannot thaw a container a previous run froze")
                }
            }
        }
        Ok(thawed)
    }

    /// How checkpoints of `identity` went on this node.
    pub fn checkpoint_state(&self, identity: &ContainerLayerId) -> Result<Option<CheckpointRow>> {
        let identity = identity.clone();
        self.attached()?.read("read checkpoint state", move |c| {
            checkpoint_db::get(c, &identity)
        })
    }

    /// A flush stored the stopped container's state as of `at_ns`: the recovery point moves.
    pub(super) async fn note_durable(&self, identity: &ContainerLayerId, at_ns: i64) {
        let id = identity.clone();
        if let Err(e) = self
            .write_async("record durable state", move |c| {
                checkpoint_db::note_durable(c, &id, at_ns)
            })
            .await
        {
            tracing::debug!(%identity, error = %error_chain(&e), "cannot record the recovery point");
        }
    }
}

/// When the next checkpoint is due (unix ns): an interval after the recovery point, or sooner
/// after a failure (backing off), never sooner than a retry delay after the last attempt.
fn next_due(row: &CheckpointRow, point: i64, interval: Duration) -> i64 {
    let regular = point.saturating_add(dur_ns(interval));
    if row.failures == 0 {
        return regular;
    }
    let doublings = u32::try_from(row.failures.saturating_sub(1).clamp(0, 8)).unwrap_or(8);
    let backoff = (RETRY_AFTER * 2u32.pow(doublings)).min(interval);
    regular.min(row.attempted_ns.saturating_add(dur_ns(backoff)))
}

fn dur_ns(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn ns_between(from: i64, to: i64) -> Duration {
    Duration::from_nanos(u64::try_from(to.saturating_sub(from)).unwrap_or(0))
}

pub(super) fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
}

fn is_pause_timeout(e: &PersistError) -> bool {
    match e {
        PersistError::Checkpoint { source, .. } => matches!(
            **source,
            LayerError::PauseBudget { .. } | LayerError::Quiesce { .. }
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_but_never_past_the_interval() {
        let interval = Duration::from_secs(300);
        let s = 1_000_000_000i64;
        let ok = CheckpointRow::default();
        assert_eq!(next_due(&ok, 100 * s, interval), 400 * s);
        let failed = |n, at| CheckpointRow {
            failures: n,
            attempted_ns: at,
            ..CheckpointRow::default()
        };
        assert_eq!(next_due(&failed(1, 390 * s), 0, interval), 300 * s);
        assert_eq!(next_due(&failed(1, 10 * s), 0, interval), 25 * s);
        assert_eq!(next_due(&failed(2, 10 * s), 0, interval), 40 * s);
        assert_eq!(next_due(&failed(9, 10 * s), 0, interval), 300 * s);
    }
}
