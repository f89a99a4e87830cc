//! Transparent persistence: containers' upper dirs restored before they start and uploaded
//! after they are removed, through [`crate::layer::LayerSyncManager`].
//!
//! [`Persistence`] plugs into the snapshotter core as its [`PersistenceHooks`]:
//! - **Prepare / Mounts** ([`identity`], [`restore`]): resolve the snapshot's identity (snapshot
//!   label at Prepare; container labels once containerd has the record, at a later Mounts),
//!   then restore the identity's layer into the still-empty upper dir, from the local outbox if
//!   an upload is pending there, else from the store. The restore extracts into a staging dir
//!   and swaps it in, so a failure leaves the upper empty and fails the call.
//! - **Remove / Commit** ([`outbox`]): no store I/O. Remove queues an outbox row in the same
//!   transaction that deletes the record and renames the snapshot dir into `<root>/outbox/<n>`;
//!   Commit queues the committed dir in place. The [`worker`] uploads queued layers.
//! - **Start**: `on_open` reconciles rows, outbox dirs and markers after a crash at any point.

mod db;
mod error;
pub mod identity;
mod outbox;
mod restore;
mod worker;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rusqlite::{Connection, TransactionBehavior};
use tokio::runtime::Handle;
use tokio::sync::Notify;

use crate::archive::XattrNs;
use crate::config::{OnBaseChange, PersistPolicy, SnapshotterConfig};
use crate::layer::LayerSyncManager;
use crate::state::Database;
use crate::sys::overlay::OverlayFeatures;

use super::containers::ContainerLookup;
use super::error::SnapshotError;
use super::hooks::{
    CommitEvent, OpenContext, PersistenceHooks, RemoveDisposition, RemoveEvent, SnapshotEvent,
};

pub use db::{Location, OutboxRow, Resolution, SCHEMA};
pub use error::PersistError;
use error::Result;

/// How often an unreachable containerd is logged at warn level.
const LOOKUP_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// Persistence settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersistOptions {
    pub policy: PersistPolicy,
    pub on_base_change: OnBaseChange,
    /// Namespace of the overlay xattrs written by restores (`user` with `userxattr` mounts).
    pub xattr_ns: XattrNs,
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
        }
    }
}

/// The snapshotter's persistence layer. Share it as `Arc<Persistence>`: the core holds it as its
/// hooks, the daemon runs its [`worker`](Persistence::spawn_worker) and calls
/// [`sync_now`](Persistence::sync_now).
pub struct Persistence {
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
    last_lookup_warning: Mutex<Option<Instant>>,
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
    /// runtime the hooks block on; hooks must be called from outside its async threads (the
    /// gRPC service calls the core on the blocking pool).
    #[must_use]
    pub fn new(
        opts: PersistOptions,
        manager: LayerSyncManager,
        containers: Arc<dyn ContainerLookup>,
        handle: Handle,
    ) -> Self {
        Self {
            opts,
            manager,
            containers,
            handle,
            attached: OnceLock::new(),
            key_locks: KeyLocks::default(),
            pins: KeyLocks::default(),
            wake: Notify::new(),
            last_lookup_warning: Mutex::new(None),
        }
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

    /// Makes sure `event`'s snapshot is resolved and, when identified, restored. `lookup`
    /// allows asking containerd for the container record (Mounts, not Prepare).
    fn ensure(&self, event: &SnapshotEvent<'_>, lookup: bool) -> Result<()> {
        let Some(bkey) = identity::candidate(event.kind, event.backend_key) else {
            return Ok(());
        };
        let att = self.attached()?;
        let lock = self.key_locks.get(event.key);
        let _guard = hold(&lock);
        let key = event.key.to_string();
        let mut row =
            match att.read("read snapshot persistence state", |c| db::snapshot(c, &key))? {
                Some(row) => row,
                None => {
                    // First sight: Prepare, or a Mounts of a snapshot whose state was never recorded.
                    let (resolution, source) =
                        match identity::from_snapshot_labels(event.key, event.labels)? {
                            Some(id) => (Resolution::Identified(id), "snapshot-label"),
                            None => (Resolution::Pending, ""),
                        };
                    let row = db::SnapshotRow {
                        key: key.clone(),
                        resolution,
                        source: source.to_string(),
                        base: identity::base_of(event.parents),
                        restored: false,
                    };
                    self.claim(att, &row)?;
                    row
                }
            };
        if row.resolution == Resolution::Pending && lookup {
            let Some(record) = self.lookup(&bkey) else {
                return Ok(());
            };
            let (resolution, source) =
                identity::from_container(event.key, &bkey, &record, self.opts.policy)?;
            row.resolution = resolution;
            row.source = source.to_string();
            self.claim(att, &row)?;
            match &row.resolution {
                Resolution::Identified(id) => {
                    tracing::info!(key = %event.key, identity = %id, source, "snapshot identified");
                }
                _ => tracing::debug!(key = %event.key, source, "snapshot is not persisted"),
            }
        }
        if let Resolution::Identified(id) = &row.resolution
            && !row.restored
        {
            self.restore(att, event.key, id, &row.base, event.upper)?;
            att.write("mark snapshot restored", |c| db::set_restored(c, &key))?;
        }
        Ok(())
    }

    /// Records `row`, refusing an identity another live snapshot holds.
    fn claim(&self, att: &Attached, row: &db::SnapshotRow) -> Result<()> {
        att.write("record snapshot identity", |c| {
            if let Resolution::Identified(id) = &row.resolution
                && let Some(other) = db::identity_owner(c, id)?
                && other.key != row.key
            {
                return Err(PersistError::DuplicateIdentity {
                    identity: id.clone(),
                    key: row.key.clone(),
                    other: other.key,
                });
            }
            db::put_snapshot(c, row)
        })
    }

    /// The container record of `key`, or `None` when it does not exist yet or containerd
    /// cannot be asked (logged, rate-limited; the next Mounts asks again).
    fn lookup(
        &self,
        key: &super::key::BackendKey<'_>,
    ) -> Option<super::containers::ContainerRecord> {
        let answer = self
            .handle
            .block_on(self.containers.get(key.namespace, key.name));
        match answer {
            Ok(record) => record,
            Err(e) => {
                let mut last = self
                    .last_lookup_warning
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if last.is_none_or(|t| t.elapsed() >= LOOKUP_WARN_INTERVAL) {
                    *last = Some(Instant::now());
                    tracing::warn!(error = %error_chain(&e), "cannot look up container records; treating them as not created yet");
                } else {
                    tracing::debug!(error = %e, "container lookup failed");
                }
                None
            }
        }
    }

    fn notify_worker(&self) {
        self.wake.notify_one();
    }
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn to_snapshot_error(e: PersistError) -> SnapshotError {
    SnapshotError::Persist(Box::new(e))
}

impl PersistenceHooks for Persistence {
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
        self.notify_worker();
        Ok(())
    }

    fn on_prepare(&self, event: &SnapshotEvent<'_>) -> Result<(), SnapshotError> {
        self.ensure(event, false).map_err(to_snapshot_error)
    }

    fn on_mounts(&self, event: &SnapshotEvent<'_>) -> Result<(), SnapshotError> {
        self.ensure(event, true).map_err(to_snapshot_error)
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
        Ok(disposition)
    }
}
