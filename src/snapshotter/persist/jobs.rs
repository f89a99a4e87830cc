//! Background restores: Prepare starts them, Mounts waits for them.
//!
//! containerd calls Prepare holding its per-snapshotter lock, which its garbage collector takes
//! exclusively to remove snapshots (and the issue that asked for this measured 1.6/1.7 calling
//! it inside the metadata write transaction): a restore there held every later Prepare on the
//! node behind the next GC pass (measured: an unrelated start waited 26–33 s for a 500 MB
//! restore). So Prepare only records
//! the identity a snapshot asks for, hides the empty upper dir (`fs` → `fs.pending`, so a
//! mount of the returned mounts fails instead of showing an empty upper) and starts a job on
//! the blocking pool. The job claims the identity (waiting, bounded, for a predecessor whose
//! container is gone but whose Remove has not arrived yet), restores the layer into the absent
//! `fs`, makes it durable and only then marks the snapshot restored. Mounts waits for the job
//! (bounded by `restore_timeout`); concurrent Mounts share it; a failed job is dropped, so the
//! next Mounts starts a new one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::layer::types::ContainerLayerId;
use crate::snapshotter::key::BackendKey;

use super::db::{self, Resolution};
use super::error::{PersistError, Result};
use super::{Attached, Persistence};

/// Longest wait for a predecessor's Remove (containerd's GC pauses between passes).
const MAX_PREDECESSOR_WAIT: Duration = Duration::from_secs(60);
/// How often a claim waiting for a predecessor looks again without being woken.
const CLAIM_POLL: Duration = Duration::from_millis(200);

/// Sibling of `fs` holding the empty upper dir while the restore runs.
pub const PENDING_UPPER: &str = "fs.pending";

/// One restore in flight.
#[derive(Debug, Default)]
pub(super) struct Job {
    outcome: Mutex<Option<Result<(), Arc<PersistError>>>>,
    done: Condvar,
    cancelled: AtomicBool,
}

impl Job {
    fn finish(&self, result: Result<(), Arc<PersistError>>) {
        let mut outcome = self
            .outcome
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *outcome = Some(result);
        self.done.notify_all();
    }

    /// The outcome, or `None` when `timeout` passed first.
    fn wait(&self, timeout: Duration) -> Option<Result<(), Arc<PersistError>>> {
        let outcome = self
            .outcome
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (outcome, _) = self
            .done
            .wait_timeout_while(outcome, timeout, |o| o.is_none())
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        outcome.clone()
    }
}

/// Restores in flight by snapshot key, plus a signal for claims waiting on a Remove.
#[derive(Debug, Default)]
pub(super) struct Jobs {
    running: Mutex<HashMap<String, Arc<Job>>>,
    removed: (Mutex<u64>, Condvar),
}

impl Jobs {
    /// Wakes claims waiting for a predecessor's removal.
    pub(super) fn note_removed(&self, key: &str) {
        if let Some(job) = self.lock().get(key) {
            job.cancelled.store(true, Ordering::Relaxed);
        }
        let (count, cv) = &self.removed;
        *count
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
        cv.notify_all();
    }

    fn wait_removed(&self, timeout: Duration) {
        let (count, cv) = &self.removed;
        let seen = count
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = *seen;
        let _ = cv
            .wait_timeout_while(seen, timeout, |c| *c == start)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What a job needs to know about its snapshot.
#[derive(Debug, Clone)]
pub(super) struct Target {
    pub key: String,
    /// `snapshots/<id>/fs`.
    pub upper: PathBuf,
}

impl Persistence {
    /// The running job of `target`, or a new one started on the blocking pool.
    pub(super) fn start_job(&self, target: &Target) -> Arc<Job> {
        let mut running = self.jobs.lock();
        if let Some(job) = running.get(&target.key) {
            return Arc::clone(job);
        }
        let job = Arc::new(Job::default());
        running.insert(target.key.clone(), Arc::clone(&job));
        drop(running);
        let Some(this) = self.me.upgrade() else {
            job.finish(Err(Arc::new(PersistError::NotOpen)));
            return job;
        };
        let (target, run) = (target.clone(), Arc::clone(&job));
        self.handle.spawn_blocking(move || {
            let result = this.run_job(&target, &run).map_err(Arc::new);
            if let Err(e) = &result {
                tracing::warn!(key = %target.key, error = %super::error_chain(e.as_ref()), "restore failed");
            }
            let mut running = this.jobs.lock();
            if running.get(&target.key).is_some_and(|j| Arc::ptr_eq(j, &run)) {
                running.remove(&target.key);
            }
            drop(running);
            run.finish(result);
        });
        job
    }

    /// Waits for `target`'s restore (starting it if needed), at most `restore_timeout`.
    pub(super) fn wait_job(&self, target: &Target, identity: &ContainerLayerId) -> Result<()> {
        let job = self.start_job(target);
        match job.wait(self.opts.restore_timeout) {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(PersistError::Shared(e)),
            None => Err(PersistError::RestoreTimeout {
                key: target.key.clone(),
                identity: identity.clone(),
                secs: self.opts.restore_timeout.as_secs(),
            }),
        }
    }

    /// Claims, restores and marks one snapshot (blocking).
    fn run_job(&self, target: &Target, job: &Job) -> Result<()> {
        let att = self.attached()?;
        let key = target.key.clone();
        let identity = self.claim_wanted(att, target, job)?;
        let Some(identity) = identity else {
            return Ok(());
        };
        let row = att
            .read("read snapshot persistence state", |c| db::snapshot(c, &key))?
            .ok_or_else(|| PersistError::SnapshotGone { key: key.clone() })?;
        if row.restored {
            return Ok(());
        }
        self.restore(att, &key, &identity, &row.base, &target.upper)?;
        if job.cancelled.load(Ordering::Relaxed) {
            return Err(PersistError::SnapshotGone { key });
        }
        att.write("mark snapshot restored", |c| {
            if db::snapshot(c, &key)?.is_none() {
                return Err(PersistError::SnapshotGone { key: key.clone() });
            }
            db::set_restored(c, &key)
        })?;
        tracing::debug!(key = %target.key, %identity, "snapshot restored and marked");
        Ok(())
    }

    /// The identity `target` holds once claimed; `None` when it is not persisted. Waits for a
    /// predecessor whose container is gone; refuses one whose container still exists.
    fn claim_wanted(
        &self,
        att: &Attached,
        target: &Target,
        job: &Job,
    ) -> Result<Option<ContainerLayerId>> {
        let key = target.key.as_str();
        let started = Instant::now();
        let limit = self.opts.restore_timeout.min(MAX_PREDECESSOR_WAIT);
        let mut logged = false;
        loop {
            if job.cancelled.load(Ordering::Relaxed) {
                return Err(PersistError::SnapshotGone {
                    key: key.to_string(),
                });
            }
            let row = att
                .read("read snapshot persistence state", |c| db::snapshot(c, key))?
                .ok_or_else(|| PersistError::SnapshotGone {
                    key: key.to_string(),
                })?;
            let want = match (&row.resolution, &row.want) {
                (Resolution::Identified(id), _) => return Ok(Some(id.clone())),
                (Resolution::Pending, Some(want)) => want.clone(),
                _ => return Ok(None),
            };
            let holder = att.write("claim identity", |c| db::try_claim(c, key, &want))?;
            let Some(other) = holder else {
                tracing::info!(key, identity = %want, source = %row.source, "snapshot identified");
                return Ok(Some(want));
            };
            if self.container_alive(key, &other.key) {
                return Err(PersistError::DuplicateIdentity {
                    identity: want,
                    key: key.to_string(),
                    other: other.key,
                });
            }
            let waited = started.elapsed();
            if waited >= limit {
                return Err(PersistError::PredecessorNotRemoved {
                    identity: want,
                    key: key.to_string(),
                    other: other.key,
                    secs: waited.as_secs(),
                });
            }
            if !logged {
                logged = true;
                tracing::info!(key, identity = %want, predecessor = %other.key,
                    "waiting for the predecessor's removal before restoring");
            }
            self.jobs.wait_removed(CLAIM_POLL);
        }
    }

    /// Whether the container owning snapshot `key` (held by another snapshot than `ours`)
    /// still exists; false when containerd may not be asked or cannot answer (the wait for its
    /// removal is bounded). A predecessor with our own namespace and container id is gone:
    /// containerd refuses a second container of that id, so the record is ours.
    fn container_alive(&self, ours: &str, key: &str) -> bool {
        if !self.opts.container_lookup {
            return false;
        }
        let Some(bkey) = BackendKey::parse(key) else {
            return false;
        };
        if BackendKey::parse(ours)
            .is_some_and(|o| o.namespace == bkey.namespace && o.name == bkey.name)
        {
            return false;
        }
        match self
            .handle
            .block_on(self.containers.get(bkey.namespace, bkey.name))
        {
            Ok(Some(record)) => record.snapshot_key.is_empty() || record.snapshot_key == bkey.name,
            Ok(None) => false,
            Err(e) => {
                tracing::debug!(key, error = %e, "cannot ask whether the predecessor's container exists");
                false
            }
        }
    }
}

/// The pending sibling of an upper dir.
pub(super) fn pending_of(upper: &Path) -> PathBuf {
    upper.with_file_name(PENDING_UPPER)
}
