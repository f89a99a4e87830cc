//! The background worker that uploads queued layers, and on-demand syncs.
//!
//! At start it finishes syncs a crash interrupted ([`LayerSyncManager::resume_pending`]), then
//! processes the outbox oldest first: `sync_layer_detailed` with the row's seq and base (an
//! unchanged layer is skipped by the manager), then, in one transaction, the row is deleted
//! and the store's seq noted; only then is the outbox dir moved to the trash and deleted. A
//! crash between the two leaves an outbox dir with a marker and no row, which start-up
//! re-adopts (see [`super::outbox`]).
//!
//! [`LayerSyncManager::resume_pending`]: crate::layer::LayerSyncManager::resume_pending

use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::layer::types::{ContainerLayerId, LayerSnapshot};
use crate::layer::{SyncOptions, SyncOutcome};
use crate::snapshotter::meta;

use super::db::{self, Location, OutboxRow, Resolution};
use super::error::{PersistError, Result};
use super::{Persistence, error_chain, hold, read_db, write_db};

/// First retry delay of a failed layer; doubles per attempt up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Attempts before a layer that fails for a local reason (it cannot be read or packed) becomes
/// a dead letter. Store faults are retried without limit: the layer is fine, the store is not.
pub const MAX_LOCAL_ATTEMPTS: i64 = 5;
/// An idle worker looks at the outbox this often even without being woken (`gc` revives dead
/// letters in the database; this is how the daemon notices).
const IDLE_RECHECK: Duration = Duration::from_secs(60);

impl Persistence {
    /// Starts the upload worker on the current runtime; it stops when `stop` is cancelled,
    /// dropping an upload in flight (its row stays queued and the manager resumes the
    /// multipart upload at the next start).
    pub fn spawn_worker(self: &Arc<Self>, stop: CancellationToken) -> JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move { this.run_worker(stop).await })
    }

    async fn run_worker(self: Arc<Self>, stop: CancellationToken) {
        let mut resumed = false;
        let mut backoff = MIN_BACKOFF;
        loop {
            // `backoff` paces retries of resume_pending; rows carry their own schedule.
            if !resumed {
                tokio::select! {
                    () = stop.cancelled() => return,
                    r = self.manager.resume_pending() => match r {
                        Ok(n) => {
                            resumed = true;
                            if n > 0 {
                                tracing::info!(resumed = n, "finished interrupted uploads");
                            }
                        }
                        Err(e) => tracing::warn!(error = %error_chain(&e), "cannot resume interrupted uploads yet"),
                    },
                }
            }
            let next_due = tokio::select! {
                () = stop.cancelled() => return,
                due = self.pass() => due,
            };
            let mut wait = next_due.map_or(IDLE_RECHECK, |d| d.min(IDLE_RECHECK));
            if !resumed {
                wait = wait.min(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            } else {
                backoff = MIN_BACKOFF;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Processes every due row once; returns how long until the next backed-off row is due.
    /// A failure schedules that row's retry (doubling per attempt); a layer failing for a
    /// local reason becomes a dead letter after [`MAX_LOCAL_ATTEMPTS`]: kept on disk and in
    /// the outbox, shown by `status`, retried at the next start or `gc`, never deleted.
    pub(super) async fn pass(self: &Arc<Self>) -> Option<Duration> {
        let rows = match self.read_async("read outbox", db::outbox_rows).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "cannot read the outbox");
                return Some(MIN_BACKOFF);
            }
        };
        let mut next_due: Option<Duration> = None;
        for row in rows {
            if row.dead {
                continue;
            }
            let now = now_ns();
            if row.next_attempt_ns > now {
                let due =
                    Duration::from_nanos(u64::try_from(row.next_attempt_ns - now).unwrap_or(0));
                next_due = Some(next_due.map_or(due, |d| d.min(due)));
                continue;
            }
            let Err(e) = self.process(&row).await else {
                continue;
            };
            let attempts = row.attempts + 1;
            let dead = !e.is_store_fault() && attempts >= MAX_LOCAL_ATTEMPTS;
            let delay = retry_delay(attempts);
            let message = error_chain(&e);
            if dead {
                tracing::error!(outbox = row.id, identity = %row.identity, seq = row.seq, attempts,
                    error = %message, "queued layer cannot be uploaded; kept as a dead letter (see status; retried by gc or a restart)");
            } else {
                tracing::warn!(outbox = row.id, identity = %row.identity, seq = row.seq, attempts,
                    retry_in_secs = delay.as_secs(), error = %message, "upload of queued layer failed; will retry");
                next_due = Some(next_due.map_or(delay, |d| d.min(delay)));
            }
            let id = row.id;
            let next = now_ns().saturating_add(i64::try_from(delay.as_nanos()).unwrap_or(i64::MAX));
            if let Err(e) = self
                .write_async("record outbox failure", move |c| {
                    db::record_failure(c, id, &message, next, dead)
                })
                .await
            {
                tracing::warn!(error = %error_chain(&e), "cannot record the failure");
            }
        }
        next_due
    }

    /// Uploads every queued layer now; returns how many were finished. Stops at the first
    /// failure (the row stays queued).
    pub async fn flush(self: &Arc<Self>) -> Result<usize> {
        let rows = self.read_async("read outbox", db::outbox_rows).await?;
        let mut done = 0;
        for row in rows {
            self.process(&row).await?;
            done += 1;
        }
        Ok(done)
    }

    /// Syncs one queued layer and deletes it.
    pub(super) async fn process(self: &Arc<Self>, row: &OutboxRow) -> Result<SyncOutcome> {
        let att = self.attached()?;
        let upper = att.layer_dir(row).join("fs");
        let opts = SyncOptions {
            base: row.base.clone(),
            seq: Some(row.seq),
            progress: None,
        };
        let synced = self
            .manager
            .sync_layer_detailed(&row.identity, &upper, opts)
            .await;
        let outcome = match synced {
            Ok(outcome) => outcome,
            Err(source) => {
                let id = row.id;
                if self
                    .read_async("read outbox", move |c| db::outbox_row(c, id))
                    .await?
                    .is_none()
                {
                    // Finished by a concurrent flush, which also removed the dir under us.
                    return self.current(&row.identity).await;
                }
                return Err(PersistError::Sync {
                    identity: row.identity.clone(),
                    path: upper,
                    source: Box::new(source),
                });
            }
        };
        let this = Arc::clone(self);
        let (id, identity, seq) = (row.id, row.identity.clone(), outcome.seq);
        tokio::task::spawn_blocking(move || this.finish(id, &identity, seq))
            .await
            .map_err(PersistError::Join)??;
        // Flushes of a removed snapshot wait for its queued layer.
        self.flush_done.notify_waiters();
        Ok(outcome)
    }

    /// The identity's current layer in the store, reported as unchanged.
    pub(super) async fn current(&self, identity: &ContainerLayerId) -> Result<SyncOutcome> {
        let outbox = self.attached()?.outbox.clone();
        let manifest =
            self.manager
                .manifest(identity)
                .await
                .map_err(|source| PersistError::Sync {
                    identity: identity.clone(),
                    path: outbox,
                    source: Box::new(source),
                })?;
        let Some(m) = manifest else {
            return Err(PersistError::NothingToSync {
                target: identity.to_string(),
            });
        };
        Ok(SyncOutcome {
            identity: identity.clone(),
            snapshot: m.current.snapshot(true),
            seq: m.current.seq,
            manifest_moved: false,
            upload: None,
        })
    }

    /// Deletes a synced row, then its outbox dir (blocking). Pinned, so a restore copying
    /// from the dir finishes first.
    fn finish(&self, id: i64, identity: &ContainerLayerId, synced_seq: u64) -> Result<()> {
        let att = self.attached()?;
        let pin = self.pins.get(&identity.to_key());
        let _pinned = hold(&pin);
        let location = att.write("finish queued layer", |c| {
            let Some(row) = db::outbox_row(c, id)? else {
                return Ok(None);
            };
            db::note_synced(c, identity, synced_seq)?;
            db::delete_outbox(c, id)?;
            Ok(Some(row.location))
        })?;
        if location == Some(Location::Outbox) {
            let dir = att.outbox.join(id.to_string());
            let doomed = att.trash.join(crate::util::unique_temp_name(
                format!("outbox-{id}").as_bytes(),
                "synced",
            ));
            std::fs::rename(&dir, &doomed).map_err(PersistError::io("move to the trash", &dir))?;
            if let Err(e) = std::fs::remove_dir_all(&doomed) {
                // The trash sweeper gets it later.
                tracing::debug!(path = %doomed.display(), error = %e, "cannot delete synced outbox dir yet");
            }
        }
        tracing::debug!(outbox = id, %identity, seq = synced_seq, "queued layer done");
        Ok(())
    }

    /// Syncs now: a live Active snapshot (by key, or by the identity it holds) from its upper
    /// dir, else the queued layers of an identity (`SERVICE/INSTANCE`). Returns the layer the
    /// identity has afterwards.
    pub async fn sync_now(self: &Arc<Self>, key_or_identity: &str) -> Result<LayerSnapshot> {
        let att = self.attached()?;
        let target = key_or_identity.to_string();
        let live = self
            .read_async("find snapshot to sync", move |c| live_target(c, &target))
            .await?;
        if let Some((row, snapshot_id)) = live {
            let Resolution::Identified(identity) = row.resolution else {
                return Err(PersistError::NothingToSync {
                    target: key_or_identity.to_string(),
                });
            };
            if !row.restored {
                return Err(PersistError::NotRestored {
                    key: row.key,
                    identity,
                });
            }
            let seq_id = identity.clone();
            let seq = self
                .write_async("allocate sequence number", move |c| {
                    db::next_seq(c, &seq_id)
                })
                .await?;
            let upper = att.snapshots.join(snapshot_id.to_string()).join("fs");
            let opts = SyncOptions {
                base: Some(row.base),
                seq: Some(seq),
                progress: None,
            };
            let outcome = self
                .manager
                .sync_layer_detailed(&identity, &upper, opts)
                .await
                .map_err(|source| PersistError::Sync {
                    identity: identity.clone(),
                    path: upper.clone(),
                    source: Box::new(source),
                })?;
            let synced = outcome.seq;
            self.write_async("record synced sequence number", move |c| {
                db::note_synced(c, &identity, synced)
            })
            .await?;
            return Ok(outcome.snapshot);
        }
        let nothing = || PersistError::NothingToSync {
            target: key_or_identity.to_string(),
        };
        let identity = ContainerLayerId::parse(key_or_identity).ok_or_else(nothing)?;
        let rows = self
            .read_async("read outbox", move |c| db::outbox_of(c, &identity))
            .await?;
        let mut last = None;
        for row in rows {
            last = Some(self.process(&row).await?.snapshot);
        }
        last.ok_or_else(nothing)
    }

    pub(super) async fn read_async<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let db = self.attached()?.db.clone();
        tokio::task::spawn_blocking(move || read_db(&db, op, f))
            .await
            .map_err(PersistError::Join)?
    }

    pub(super) async fn write_async<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let db = self.attached()?.db.clone();
        tokio::task::spawn_blocking(move || write_db(&db, op, f))
            .await
            .map_err(PersistError::Join)?
    }
}

/// The retry delay after `attempts` failures.
fn retry_delay(attempts: i64) -> Duration {
    let doublings = u32::try_from(attempts.saturating_sub(1).clamp(0, 16)).unwrap_or(16);
    (MIN_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF)
}

fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
}

/// The identified live Active snapshot named by `target` (its key, or the identity it holds)
/// and its snapshot id.
fn live_target(c: &Connection, target: &str) -> Result<Option<(db::SnapshotRow, i64)>> {
    let row = match db::snapshot(c, target)? {
        Some(row) if matches!(row.resolution, Resolution::Identified(_)) => Some(row),
        _ => match ContainerLayerId::parse(target) {
            Some(identity) => db::identity_owner(c, &identity)?,
            None => None,
        },
    };
    let Some(row) = row else {
        return Ok(None);
    };
    let record = meta::get(c, &row.key).map_err(|e| PersistError::Meta(Box::new(e)))?;
    Ok(record.map(|r| (row, r.id)))
}
