//! Transparent persistence: containers' upper dirs restored before they start and uploaded
//! after they are removed, through [`crate::layer::LayerSyncManager`].
//!
//! [`Persistence`] plugs into the snapshotter core as its [`PersistenceHooks`]:
//! - **Prepare** (no store I/O: containerd calls it under its snapshotter lock): record
//!   the identity the snapshot label asks for, move the empty upper aside and start the restore
//!   in the background ([`jobs`]).
//! - **Mounts** ([`identity`], [`jobs`], [`restore`]): resolve container-label identities by
//!   asking containerd (failing `Unavailable` when it cannot be asked), then wait, bounded, for
//!   the restore: the identity is claimed (a predecessor whose container is gone is waited
//!   for), its layer restored from the local outbox if an upload is pending there, else from
//!   the store, made durable, swapped in and only then marked restored. A failure fails the
//!   call; the upper never exists in a half-restored state.
//! - **Remove / Commit** ([`outbox`]): no store I/O. Remove queues an outbox row in the same
//!   transaction that deletes the record and renames the snapshot dir into `<root>/outbox/<n>`;
//!   Commit queues the committed dir in place. The [`worker`] uploads queued layers.
//! - **Start**: `on_open` reconciles rows, outbox dirs and markers after a crash at any point,
//!   and revives dead letters; a restore a restart interrupted runs again at the next Mounts.
//! - **Operators** ([`status`]): queued layers, dead letters and quarantined entries, read by
//!   the `status` and `gc` commands from the metadata database.

mod checkpoint;
mod checkpoint_db;
mod db;
mod error;
mod flush;
mod flush_db;
mod flush_target;
mod freeze;
pub mod identity;
mod jobs;
mod outbox;
mod restore;
mod status;
mod worker;

#[cfg(test)]
mod flush_tests;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};
use tokio::runtime::Handle;
use tokio::sync::Notify;

use crate::archive::XattrNs;
use crate::config::{OnBaseChange, PersistPolicy, SnapshotterConfig};
use crate::layer::LayerSyncManager;
use crate::layer::types::ContainerLayerId;
use crate::snapshotter::key::BackendKey;
use crate::state::Database;
use crate::sys::overlay::OverlayFeatures;

use super::containers::ContainerLookup;
use super::error::SnapshotError;
use super::hooks::{
    CommitEvent, OpenContext, PersistenceHooks, RemoveDisposition, RemoveEvent, SnapshotEvent,
};

pub use checkpoint::{CheckpointDone, CheckpointSettings, INTERVAL_LABEL};
pub use checkpoint_db::CheckpointRow;
pub use db::{Location, MIGRATIONS, OutboxRow, Resolution};
pub use error::PersistError;
use error::Result;
pub use flush::{FlushDone, FlushRequest, FlushTarget, FlushTicket};
pub use flush_db::{FlushRow, FlushState};
pub use jobs::PENDING_UPPER;
pub use status::{NodeStatus, QueuedLayer, node_status, retry_dead_letters};

/// Persistence settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersistOptions {
    pub policy: PersistPolicy,
    pub on_base_change: OnBaseChange,
    /// Namespace of the overlay xattrs written by restores (`user` with `userxattr` mounts).
    pub xattr_ns: XattrNs,
    /// How long Mounts waits for a snapshot's restore before failing `Unavailable`.
    pub restore_timeout: Duration,
    /// Whether container labels are looked up in containerd; when false identities come only
    /// from snapshot labels (and `<namespace>/<name>` under policy `all`).
    pub container_lookup: bool,
}

impl PersistOptions {
    /// From the `[snapshotter]` config and the overlay options the mounts use.
    #[must_use]
    pub fn from_config(config: &SnapshotterConfig, features: OverlayFeatures) -> Self {
        Self {
            policy: config.persist,
            on_base_change: config.on_base_change,
            xattr_ns: if features.userxattr {
                XattrNs::User
            } else {
                XattrNs::Trusted
            },
            restore_timeout: Duration::from_secs(config.restore_timeout_secs),
            container_lookup: config.container_lookup,
        }
    }
}

/// The snapshotter's persistence layer, shared as `Arc<Persistence>`: the core holds it as its
/// hooks and the daemon runs its [`worker`](Persistence::spawn_worker).
pub struct Persistence {
    /// Itself, for background restores started from `&self` hooks.
    me: std::sync::Weak<Persistence>,
    jobs: jobs::Jobs,
    opts: PersistOptions,
    manager: LayerSyncManager,
    containers: Arc<dyn ContainerLookup>,
    /// Hooks are synchronous (blocking pool); store and containerd calls run on this runtime.
    handle: Handle,
    attached: OnceLock<Attached>,
    /// Serialises resolution and restore per snapshot key.
    key_locks: KeyLocks,
    /// Held while a queued layer's dir is read for a restore and while the worker deletes it.
    pins: KeyLocks,
    wake: Notify,
    /// Wakes the flusher when a request is recorded.
    flush_wake: Notify,
    /// Wakes flush waiters when a request (or a queued layer) finishes.
    flush_done: Notify,
    /// Checkpoint settings and limits, once configured.
    checkpoints: OnceLock<checkpoint::Checkpoints>,
}

impl std::fmt::Debug for Persistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persistence")
            .field("opts", &self.opts)
            .field("manager", &self.manager)
            .field("containers", &self.containers)
            .field("root", &self.attached.get().map(|a| &a.root))
            .finish_non_exhaustive()
    }
}

/// What the core hands over at open.
#[derive(Debug)]
struct Attached {
    db: Database,
    root: PathBuf,
    snapshots: PathBuf,
    outbox: PathBuf,
    trash: PathBuf,
}

impl Attached {
    /// The directory holding a queued layer's `fs`.
    fn layer_dir(&self, row: &OutboxRow) -> PathBuf {
        match row.location {
            Location::Live => self.snapshots.join(row.snapshot_id.to_string()),
            Location::Outbox => self.outbox.join(row.id.to_string()),
        }
    }

    fn read<T>(&self, op: &'static str, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        read_db(&self.db, op, f)
    }

    fn write<T>(&self, op: &'static str, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        write_db(&self.db, op, f)
    }
}

/// Runs `f` with the connection (blocking).
fn read_db<T>(
    db: &Database,
    op: &'static str,
    f: impl FnOnce(&Connection) -> Result<T>,
) -> Result<T> {
    db.call_blocking(op, |c| Ok(f(c)))
        .map_err(PersistError::State)?
}

/// Runs `f` in an IMMEDIATE transaction, committed only when it succeeds (blocking).
fn write_db<T>(
    db: &Database,
    op: &'static str,
    f: impl FnOnce(&Connection) -> Result<T>,
) -> Result<T> {
    db.call_blocking(op, |c| {
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        match f(&tx) {
            Ok(v) => {
                tx.commit()?;
                Ok(Ok(v))
            }
            Err(e) => Ok(Err(e)),
        }
    })
    .map_err(PersistError::State)?
}

/// Named mutexes, forgotten when nobody holds or waits for them.
#[derive(Debug, Default)]
struct KeyLocks(Mutex<HashMap<String, Arc<Mutex<()>>>>);

impl KeyLocks {
    fn get(&self, name: &str) -> Arc<Mutex<()>> {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.retain(|_, l| Arc::strong_count(l) > 1);
        Arc::clone(map.entry(name.to_string()).or_default())
    }
}

/// Locks `lock`, ignoring poisoning (the guarded state lives on disk, not in the mutex).
fn hold(lock: &Mutex<()>) -> std::sync::MutexGuard<'_, ()> {
    lock.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Persistence {
    /// Persistence through `manager`, asking `containers` for container records. `handle` is the
    /// runtime the hooks block on and restores run on; hooks must be called from outside its
    /// async threads (the gRPC service calls the core on the blocking pool).
    #[must_use]
    pub fn new(
        opts: PersistOptions,
        manager: LayerSyncManager,
        containers: Arc<dyn ContainerLookup>,
        handle: Handle,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            jobs: jobs::Jobs::default(),
            opts,
            manager,
            containers,
            handle,
            attached: OnceLock::new(),
            key_locks: KeyLocks::default(),
            pins: KeyLocks::default(),
            wake: Notify::new(),
            flush_wake: Notify::new(),
            flush_done: Notify::new(),
            checkpoints: OnceLock::new(),
        })
    }

    /// The layer manager in use.
    #[must_use]
    pub fn manager(&self) -> &LayerSyncManager {
        &self.manager
    }

    /// The outbox directory (`<root>/outbox`), once attached.
    #[must_use]
    pub fn outbox_dir(&self) -> Option<&Path> {
        self.attached.get().map(|a| a.outbox.as_path())
    }

    fn attached(&self) -> Result<&Attached> {
        self.attached.get().ok_or(PersistError::NotOpen)
    }

    /// The recorded resolution of `key`, if any.
    pub fn resolution(&self, key: &str) -> Result<Option<Resolution>> {
        let key = key.to_string();
        Ok(self
            .attached()?
            .read("read snapshot persistence state", move |c| {
                db::snapshot(c, &key)
            })?
            .map(|r| r.resolution))
    }

    /// Every queued layer, oldest first.
    pub fn queued(&self) -> Result<Vec<OutboxRow>> {
        self.attached()?.read("read outbox", db::outbox_rows)
    }

    /// Records a new candidate snapshot at Prepare (no store I/O: containerd holds its
    /// snapshotter lock): the identity its labels ask for, if any, with the empty upper
    /// moved aside and the restore started in the background.
    fn prepare(&self, event: &SnapshotEvent<'_>) -> Result<()> {
        let Some(bkey) = identity::candidate(event.kind, event.backend_key) else {
            return Ok(());
        };
        let att = self.attached()?;
        let lock = self.key_locks.get(event.key);
        let _guard = hold(&lock);
        let row = self.first_sight(att, event, &bkey)?;
        if let Some(want) = &row.want {
            restore::hide_upper(att, event.key, want, event.upper)?;
            self.start_job(&jobs::Target {
                key: event.key.to_string(),
                upper: event.upper.to_path_buf(),
            });
        }
        Ok(())
    }

    /// The state recorded for a snapshot seen for the first time.
    fn first_sight(
        &self,
        att: &Attached,
        event: &SnapshotEvent<'_>,
        bkey: &BackendKey<'_>,
    ) -> Result<db::SnapshotRow> {
        let key = event.key.to_string();
        if let Some(row) = att.read("read snapshot persistence state", |c| db::snapshot(c, &key))? {
            return Ok(row);
        }
        let (want, source) = match identity::from_snapshot_labels(event.key, event.labels)? {
            Some(id) => (Some(id), "snapshot-label"),
            None if !self.opts.container_lookup && self.opts.policy == PersistPolicy::All => (
                Some(ContainerLayerId::new(bkey.namespace, bkey.name)),
                "snapshot-key",
            ),
            None => (None, ""),
        };
        // Without lookups an unlabelled snapshot is decided at once: never persisted.
        let resolution = if want.is_none() && !self.opts.container_lookup {
            Resolution::None
        } else {
            Resolution::Pending
        };
        let row = db::SnapshotRow {
            key,
            resolution,
            source: source.to_string(),
            base: identity::base_of(event.parents),
            restored: false,
            want,
        };
        att.write("record snapshot", |c| db::put_snapshot(c, &row))?;
        Ok(row)
    }

    /// At Mounts: resolves the identity (asking containerd for container labels when allowed)
    /// and waits for the snapshot's restore. Fails when the identity cannot be determined or
    /// the restore cannot be completed, so a container never starts without its layer.
    fn ensure(&self, event: &SnapshotEvent<'_>) -> Result<()> {
        let Some(bkey) = identity::candidate(event.kind, event.backend_key) else {
            return Ok(());
        };
        let att = self.attached()?;
        let target = jobs::Target {
            key: event.key.to_string(),
            upper: event.upper.to_path_buf(),
        };
        let wanted = {
            let lock = self.key_locks.get(event.key);
            let _guard = hold(&lock);
            let mut row = self.first_sight(att, event, &bkey)?;
            if row.restored {
                return Ok(());
            }
            if row.resolution == Resolution::Pending && row.want.is_none() {
                self.resolve_by_container(att, event.key, &bkey, &mut row)?;
            }
            match (&row.resolution, &row.want) {
                (Resolution::Identified(id), _) | (Resolution::Pending, Some(id)) => id.clone(),
                _ => return Ok(()),
            }
        };
        self.wait_job(&target, &wanted)
    }

    /// Asks containerd for the container record behind a pending snapshot and records the
    /// decision. No record yet (the first Mounts of `ctr run` comes before it) leaves the
    /// snapshot pending; containerd not answering fails the call.
    fn resolve_by_container(
        &self,
        att: &Attached,
        key: &str,
        bkey: &BackendKey<'_>,
        row: &mut db::SnapshotRow,
    ) -> Result<()> {
        let record = self
            .handle
            .block_on(self.containers.get(bkey.namespace, bkey.name))
            .inspect_err(|_| crate::metrics::error(crate::metrics::ErrorKind::Lookup))
            .map_err(|source| PersistError::LookupFailed {
                key: key.to_string(),
                source: Box::new(source),
            })?;
        let Some(record) = record else {
            return Ok(());
        };
        let (resolution, source) = identity::from_container(key, bkey, &record, self.opts.policy)?;
        row.source = source.to_string();
        match resolution {
            Resolution::Identified(id) => {
                tracing::info!(key, identity = %id, source, "container identity found");
                att.write("record wanted identity", |c| {
                    db::set_want(c, key, &id, source)
                })?;
                row.want = Some(id);
            }
            other => {
                tracing::debug!(key, source, "snapshot is not persisted");
                row.resolution = other;
                att.write("record snapshot identity", |c| db::put_snapshot(c, row))?;
            }
        }
        Ok(())
    }

    fn notify_worker(&self) {
        self.wake.notify_one();
    }
}

pub(crate) use crate::util::error_chain;

fn to_snapshot_error(e: PersistError) -> SnapshotError {
    SnapshotError::hook(e)
}

impl PersistenceHooks for Persistence {
    fn migrations(&self) -> &'static [crate::state::Migration] {
        MIGRATIONS
    }

    fn on_open(&self, ctx: &OpenContext<'_>) -> Result<(), SnapshotError> {
        let att = Attached {
            db: ctx.db.clone(),
            root: ctx.root.to_path_buf(),
            snapshots: ctx.snapshots.to_path_buf(),
            outbox: ctx.root.join("outbox"),
            trash: ctx.trash.to_path_buf(),
        };
        outbox::prepare_dir(&att.outbox).map_err(to_snapshot_error)?;
        let att = match self.attached.set(att) {
            Ok(()) => self.attached().map_err(to_snapshot_error)?,
            Err(_) => {
                return Err(to_snapshot_error(PersistError::Io {
                    op: "attach persistence to",
                    path: ctx.root.to_path_buf(),
                    source: std::io::Error::other("already attached to a snapshotter"),
                }));
            }
        };
        outbox::reconcile(att).map_err(to_snapshot_error)?;
        let revived = att
            .write("revive dead letters", db::revive_all)
            .map_err(to_snapshot_error)?;
        if revived > 0 {
            tracing::info!(revived, "retrying dead-letter layers after a restart");
        }
        let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
        let open = att
            .write("recover flush requests", |c| flush_db::recover(c, now))
            .map_err(to_snapshot_error)?;
        if open > 0 {
            tracing::info!(
                requests = open,
                "flush requests from before the restart will run"
            );
        }
        self.flush_wake.notify_one();
        self.notify_worker();
        Ok(())
    }

    fn on_prepare(&self, event: &SnapshotEvent<'_>) -> Result<(), SnapshotError> {
        self.prepare(event).map_err(to_snapshot_error)
    }

    fn on_mounts(&self, event: &SnapshotEvent<'_>) -> Result<(), SnapshotError> {
        self.ensure(event).map_err(to_snapshot_error)
    }

    fn on_commit_tx(&self, tx: &Connection, event: &CommitEvent<'_>) -> Result<(), SnapshotError> {
        let queued = outbox::on_commit(tx, event).map_err(to_snapshot_error)?;
        if queued {
            self.notify_worker();
        }
        Ok(())
    }

    fn on_remove_tx(
        &self,
        tx: &Connection,
        event: &RemoveEvent<'_>,
    ) -> Result<RemoveDisposition, SnapshotError> {
        let att = self.attached().map_err(to_snapshot_error)?;
        let disposition = outbox::on_remove(att, tx, event).map_err(to_snapshot_error)?;
        if disposition == RemoveDisposition::Claimed {
            self.notify_worker();
        }
        // Claims waiting for this snapshot read again once the transaction has committed
        // (their reads wait for the connection this transaction holds).
        self.jobs.note_removed(event.key);
        Ok(disposition)
    }
}
