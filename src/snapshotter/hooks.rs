//! The persistence seam: what the core tells a persistence layer, and when.
//!
//! The core is a plain overlay snapshotter. Persistence (keeping containers' upper dirs in the
//! object store) plugs in through [`PersistenceHooks`]; [`NoPersistence`] is the default and
//! makes the snapshotter behave exactly like containerd's overlayfs snapshotter.
//!
//! | Hook | Called | Lock | May block on S3? | Failure |
//! |---|---|---|---|---|
//! | [`on_prepare`](PersistenceHooks::on_prepare) | after a new Active/View is recorded and its directory is in place | none of ours, but containerd holds its snapshotter lock (which its GC takes exclusively), and may hold its metadata write transaction | **no**: record, then start slow work in the background | the snapshot is removed again and Prepare fails with the hook's error |
//! | [`on_mounts`](PersistenceHooks::on_mounts) | on every Mounts of an Active/View, before replying | none (containerd holds no lock) | yes: waits for the restore the Prepare started, or restores after a restart | Mounts fails with the hook's error |
//! | [`on_commit`](PersistenceHooks::on_commit) | inside the metadata transaction, after usage is measured, before it commits | metadata | **no**: containerd holds its own write transaction | the commit is rolled back |
//! | [`on_remove`](PersistenceHooks::on_remove) | inside the metadata transaction, before the record's deletion commits | metadata | **no**: containerd's GC lock is held | the record stays; the error is returned |
//! | [`on_open`](PersistenceHooks::on_open) | once at start, after the database is open, before directories are reconciled | none (nothing else runs) | no | the snapshotter does not open |
//!
//! [`on_commit_tx`](PersistenceHooks::on_commit_tx) and [`on_remove_tx`](PersistenceHooks::on_remove_tx)
//! are what the core calls: they also receive the metadata transaction, so a hook can record
//! its own rows atomically with the commit or removal. By default they call `on_commit` and
//! `on_remove`.
//!
//! `on_remove` decides where the directory goes: [`RemoveDisposition::Trash`] (the core moves it
//! to `trash/` and deletes it in the background) or [`RemoveDisposition::Claimed`], meaning the
//! hook has already moved `snapshot_dir` out of `snapshots/` (for example a rename into an
//! outbox on the same filesystem); the core then only deletes the record, in the same
//! transaction as the hook's own rows. The crash contract is the hook's: if the process dies
//! after the hook's rename but before that transaction commits, the record and the hook's rows
//! roll back while the directory has moved. [`on_open`](PersistenceHooks::on_open) runs before
//! the core reconciles directories, so a hook that claims directories must repair that case
//! there (move the directory back), or the core would recreate an empty layout for the record.
//!
//! A hook may also leave an Active snapshot's `fs` absent for a while (moved aside until a
//! restore fills it): its mounts then fail to mount instead of showing an incomplete upper,
//! and Usage reports zero.
//!
//! Hooks are synchronous and run on the blocking pool; an implementation that needs async
//! I/O can use `tokio::runtime::Handle::block_on` from there. Returning
//! [`SnapshotError::Unavailable`](super::SnapshotError::Unavailable) maps to gRPC `Unavailable` (containerd retries); a
//! `FailedPrecondition` error from `on_remove` makes containerd's GC skip the snapshot and retry
//! at a later pass.

use std::fmt::Debug;
use std::path::Path;

use rusqlite::Connection;

use crate::state::{Database, Migration};

use super::error::Result;
use super::key::BackendKey;
use super::types::{Kind, Labels, Usage};

/// A parent layer of a snapshot.
#[derive(Debug, Clone, Copy)]
pub struct ParentRef<'a> {
    /// Backend key of the committed parent.
    pub key: &'a str,
    /// Its `fs` directory (a lower dir of the overlay).
    pub fs: &'a Path,
}

/// A new Active or View snapshot (Prepare or View), or an existing one at Mounts.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotEvent<'a> {
    pub key: &'a str,
    /// The parsed key when it came from containerd's metadata layer.
    pub backend_key: Option<BackendKey<'a>>,
    pub kind: Kind,
    /// The parent chain, nearest first.
    pub parents: &'a [ParentRef<'a>],
    /// Labels stored with the snapshot (only `containerd.io/snapshot/*` and the ref label when
    /// containerd is the caller).
    pub labels: &'a Labels,
    /// The upper dir (`fs`) the caller will mount.
    pub upper: &'a Path,
}

/// An Active snapshot being committed.
#[derive(Debug, Clone, Copy)]
pub struct CommitEvent<'a> {
    /// The Active key, which disappears.
    pub key: &'a str,
    /// The new Committed name.
    pub name: &'a str,
    /// Labels the Active snapshot had.
    pub active_labels: &'a Labels,
    /// Labels of the Committed snapshot (only those given to Commit).
    pub labels: &'a Labels,
    /// The directory, reused by the Committed snapshot.
    pub upper: &'a Path,
    pub usage: Usage,
}

/// A snapshot being removed.
#[derive(Debug, Clone, Copy)]
pub struct RemoveEvent<'a> {
    pub key: &'a str,
    pub backend_key: Option<BackendKey<'a>>,
    pub kind: Kind,
    pub labels: &'a Labels,
    /// `snapshots/<id>`, holding `fs` (and `work` for Active).
    pub snapshot_dir: &'a Path,
}

/// Who takes care of a removed snapshot's directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveDisposition {
    /// The core moves it to the trash and deletes it asynchronously.
    Trash,
    /// The hook has moved it out of `snapshots/` already (for example into an upload outbox).
    Claimed,
}

/// The snapshotter being opened.
#[derive(Debug, Clone, Copy)]
pub struct OpenContext<'a> {
    pub root: &'a Path,
    /// `snapshots/`, holding `<id>/{fs,work}` per record.
    pub snapshots: &'a Path,
    /// `trash/`, emptied in the background.
    pub trash: &'a Path,
    /// The metadata database; a hook may keep a clone for use outside transactions, but must
    /// never call it from `on_commit_tx`/`on_remove_tx` (the connection is held there).
    pub db: &'a Database,
}

/// Persistence callbacks; every method defaults to "do nothing", the plain overlay behaviour.
pub trait PersistenceHooks: Send + Sync + Debug {
    /// Schema steps for the hook's own tables in the metadata database, applied after the
    /// core's. Append only, like the core's.
    fn migrations(&self) -> &'static [Migration] {
        &[]
    }

    /// The snapshotter is opening; reconcile the hook's own state with the directories here,
    /// before the core trashes directories no record references.
    fn on_open(&self, ctx: &OpenContext<'_>) -> Result<()> {
        let _ = ctx;
        Ok(())
    }

    /// A snapshot was created. containerd holds its snapshotter lock: record what is
    /// needed and start slow work (a restore) in the background; never wait for a store.
    fn on_prepare(&self, event: &SnapshotEvent<'_>) -> Result<()> {
        let _ = event;
        Ok(())
    }

    /// Mounts is about to return; make sure the upper dir is complete before it does (wait for
    /// the restore, bounded), or fail.
    fn on_mounts(&self, event: &SnapshotEvent<'_>) -> Result<()> {
        let _ = event;
        Ok(())
    }

    /// An Active snapshot is being committed; queue work durably, do not upload here.
    fn on_commit(&self, event: &CommitEvent<'_>) -> Result<()> {
        let _ = event;
        Ok(())
    }

    /// A snapshot is being removed; claim its directory or leave it to the trash.
    fn on_remove(&self, event: &RemoveEvent<'_>) -> Result<RemoveDisposition> {
        let _ = event;
        Ok(RemoveDisposition::Trash)
    }

    /// [`on_commit`](Self::on_commit) with the metadata transaction it runs in.
    fn on_commit_tx(&self, tx: &Connection, event: &CommitEvent<'_>) -> Result<()> {
        let _ = tx;
        self.on_commit(event)
    }

    /// [`on_remove`](Self::on_remove) with the metadata transaction it runs in.
    fn on_remove_tx(&self, tx: &Connection, event: &RemoveEvent<'_>) -> Result<RemoveDisposition> {
        let _ = tx;
        self.on_remove(event)
    }
}

/// The default: no persistence, containerd's overlay behaviour.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPersistence;

impl PersistenceHooks for NoPersistence {}
