//! The snapshotter itself: containerd's overlayfs semantics over SQLite metadata.
//!
//! Layout under the root: `metadata.db`, `snapshots/<id>/{fs,work}`, `trash/` (directories of
//! removed snapshots awaiting deletion) and `lock` (one daemon per root). Every method blocks;
//! the gRPC adapter calls them on the blocking pool. One mutex (the database connection)
//! serialises every change together with the directory work it describes.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::Utc;
use rusqlite::{Connection, Transaction, TransactionBehavior};
use tokio::sync::Notify;

use crate::state::{Database, Migration};
use crate::sys::overlay::OverlayFeatures;

use super::error::{Result, SnapshotError};
use super::filter::Filters;
use super::fsops;
use super::hooks::{
    CommitEvent, NoPersistence, OpenContext, ParentRef, PersistenceHooks, RemoveDisposition,
    RemoveEvent, SnapshotEvent,
};
use super::key::BackendKey;
use super::meta::{self, MIGRATIONS, Record};
use super::mounts;
use super::types::{Info, Kind, LabelPath, Labels, Mount, Usage};

/// Label by which containerd asks for a remote-style lookup of an already available layer.
pub const SNAPSHOT_REF_LABEL: &str = "containerd.io/snapshot.ref";

/// containerd's limit on one label (key plus value).
const MAX_LABEL_BYTES: usize = 4096;

/// An overlay snapshotter rooted in one directory.
#[derive(Debug)]
pub struct Snapshotter {
    root: PathBuf,
    snapshots: PathBuf,
    trash: PathBuf,
    db: Database,
    features: OverlayFeatures,
    hooks: Arc<dyn PersistenceHooks>,
    /// Signalled whenever something lands in the trash.
    trash_ready: Notify,
    sweeping: Mutex<()>,
    /// Holds the root's advisory lock for the snapshotter's lifetime.
    _lock: fs::File,
}

impl Snapshotter {
    /// Opens (creating if needed) the snapshotter at `root` without persistence, probing the
    /// kernel's overlay options.
    pub fn open(root: &Path) -> Result<Self> {
        Self::open_with(root, OverlayFeatures::detect(root), Arc::new(NoPersistence))
    }

    /// Opens the snapshotter with explicit overlay options and persistence hooks.
    ///
    /// Reconciles directories with records: leftovers of interrupted creates (`new-*`) and any
    /// directory without a record go to the trash; a directory with a record is never touched.
    pub fn open_with(
        root: &Path,
        features: OverlayFeatures,
        hooks: Arc<dyn PersistenceHooks>,
    ) -> Result<Self> {
        let snapshots = root.join("snapshots");
        let trash = root.join("trash");
        for dir in [root, snapshots.as_path(), trash.as_path()] {
            fs::create_dir_all(dir).map_err(SnapshotError::io("create", dir))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(SnapshotError::io("set mode of", dir))?;
        }
        let lock = lock_root(root)?;
        let db = Database::open(&root.join("metadata.db"), migrations_with(hooks.as_ref()))
            .map_err(SnapshotError::State)?;
        let this = Self {
            root: root.to_path_buf(),
            snapshots,
            trash,
            db,
            features,
            hooks,
            trash_ready: Notify::new(),
            sweeping: Mutex::new(()),
            _lock: lock,
        };
        this.hooks.on_open(&OpenContext {
            root,
            snapshots: &this.snapshots,
            trash: &this.trash,
            db: &this.db,
        })?;
        let moved = this.reconcile()?;
        if moved > 0 {
            tracing::info!(root = %root.display(), moved, "moved unreferenced snapshot directories to the trash");
        }
        Ok(this)
    }

    /// The snapshotter root.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The overlay options mounts are built with.
    #[must_use]
    pub fn features(&self) -> OverlayFeatures {
        self.features
    }

    /// Creates an Active snapshot and returns its mounts.
    pub fn prepare(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels)
    }

    /// Creates a read-only View snapshot and returns its mounts.
    pub fn view(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    fn create(&self, kind: Kind, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(SnapshotError::EmptyKey);
        }
        validate_labels(key, &labels)?;
        let (id, chain) = self.write("create snapshot", |tx| {
            if meta::get(tx, key)?.is_some() {
                return Err(SnapshotError::AlreadyExists {
                    key: key.to_string(),
                });
            }
            if let Some(target) = labels.get(SNAPSHOT_REF_LABEL) {
                // containerd then lists with `labels."containerd.io/snapshot.ref"==<target>,parent==<parent>`
                // and uses the committed match instead of unpacking the layer.
                let existing = meta::committed_children(tx, parent)?
                    .into_iter()
                    .find(|r| r.info.labels.get(SNAPSHOT_REF_LABEL) == Some(target));
                if let Some(existing) = existing {
                    return Err(SnapshotError::TargetExists {
                        key: key.to_string(),
                        target: target.clone(),
                        existing: existing.info.name,
                    });
                }
            }
            let chain = if parent.is_empty() {
                Vec::new()
            } else {
                let p = meta::get(tx, parent)?.ok_or_else(|| SnapshotError::ParentNotFound {
                    key: key.to_string(),
                    parent: parent.to_string(),
                })?;
                if p.info.kind != Kind::Committed {
                    return Err(SnapshotError::ParentNotCommitted {
                        key: key.to_string(),
                        parent: parent.to_string(),
                        kind: p.info.kind,
                    });
                }
                meta::chain(tx, parent)?
            };
            let now = Utc::now();
            let info = Info {
                name: key.to_string(),
                parent: parent.to_string(),
                kind,
                created: now,
                updated: now,
                labels: labels.clone(),
            };
            let id = self.materialize(tx, &info, chain.first().map(|(pid, _)| *pid))?;
            Ok((id, chain))
        })?;

        let parent_fs: Vec<PathBuf> = chain.iter().map(|(pid, _)| self.fs_dir(*pid)).collect();
        let parents: Vec<ParentRef<'_>> = chain
            .iter()
            .zip(&parent_fs)
            .map(|((_, k), fs)| ParentRef { key: k, fs })
            .collect();
        let upper = self.fs_dir(id);
        let event = SnapshotEvent {
            key,
            backend_key: BackendKey::parse(key),
            kind,
            parents: &parents,
            labels: &labels,
            upper: &upper,
        };
        if let Err(e) = self.hooks.on_prepare(&event) {
            tracing::warn!(key, error = %e, "persistence failed at prepare; removing the new snapshot");
            if let Err(undo) = self.remove_record(key) {
                tracing::error!(key, error = %undo, "cannot undo the snapshot after a failed prepare hook");
            }
            return Err(e);
        }
        Ok(self.build_mounts(kind, id, &parent_fs))
    }

    /// Record first (for the id), then `new-<id>` renamed to `<id>`, all before the record
    /// commits. No directory fsync is needed: if the rename or the mkdir is lost to a power
    /// failure, start-up rolls `new-<id>` forward or recreates the (still empty) layout; a
    /// crash before the commit leaves only unreferenced directories, which go to the trash.
    fn materialize(&self, tx: &Connection, info: &Info, parent_id: Option<i64>) -> Result<i64> {
        let id = meta::insert(tx, info)?;
        let temp = self.temp_dir(id);
        let dest = self.dir(id);
        for stale in [&temp, &dest] {
            // Debris of a create whose record never committed (its id was handed out again).
            if fs::symlink_metadata(stale).is_ok() {
                fsops::move_to_trash(stale, &self.trash)?;
            }
        }
        fsops::create_layout(&temp, info.kind)?;
        let result = (|| {
            if let Some(pid) = parent_id {
                fsops::chown_like(&temp.join("fs"), &self.fs_dir(pid))?;
            }
            fs::rename(&temp, &dest).map_err(SnapshotError::io("rename into place", &temp))
        })();
        if let Err(e) = result {
            fsops::remove_quietly(&temp);
            return Err(e);
        }
        Ok(id)
    }

    /// Mounts of an Active or View snapshot.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let (rec, chain) = self.read("read mounts", |c| {
            let rec = meta::require(c, key)?;
            if rec.info.kind == Kind::Committed {
                return Err(SnapshotError::CommittedHasNoMounts {
                    key: key.to_string(),
                });
            }
            let mut chain = meta::chain(c, key)?;
            chain.remove(0);
            Ok((rec, chain))
        })?;
        let parent_fs: Vec<PathBuf> = chain.iter().map(|(pid, _)| self.fs_dir(*pid)).collect();
        let parents: Vec<ParentRef<'_>> = chain
            .iter()
            .zip(&parent_fs)
            .map(|((_, k), fs)| ParentRef { key: k, fs })
            .collect();
        let upper = self.fs_dir(rec.id);
        self.hooks.on_mounts(&SnapshotEvent {
            key,
            backend_key: BackendKey::parse(key),
            kind: rec.info.kind,
            parents: &parents,
            labels: &rec.info.labels,
            upper: &upper,
        })?;
        Ok(self.build_mounts(rec.info.kind, rec.id, &parent_fs))
    }

    fn build_mounts(&self, kind: Kind, id: i64, parent_fs: &[PathBuf]) -> Vec<Mount> {
        let parents: Vec<&Path> = parent_fs.iter().map(PathBuf::as_path).collect();
        mounts::build(
            kind,
            &self.fs_dir(id),
            &self.work_dir(id),
            &parents,
            self.features,
        )
    }

    /// Commits the Active `key` as `name`: usage is measured and stored, the directory is
    /// reused, the new snapshot carries only `labels`, and `key` is gone.
    pub fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        if name.is_empty() || key.is_empty() {
            return Err(SnapshotError::EmptyKey);
        }
        validate_labels(name, &labels)?;
        self.write("commit snapshot", |tx| {
            let rec = meta::require(tx, key)?;
            if meta::get(tx, name)?.is_some() {
                return Err(SnapshotError::AlreadyExists {
                    key: name.to_string(),
                });
            }
            if rec.info.kind != Kind::Active {
                return Err(SnapshotError::NotActive {
                    key: key.to_string(),
                    kind: rec.info.kind,
                    op: "commit",
                });
            }
            let upper = self.fs_dir(rec.id);
            let usage = fsops::disk_usage(&upper)?;
            meta::commit(tx, rec.id, name, &labels, Utc::now(), usage)?;
            self.hooks.on_commit_tx(
                tx,
                &CommitEvent {
                    key,
                    name,
                    active_labels: &rec.info.labels,
                    labels: &labels,
                    upper: &upper,
                    usage,
                },
            )
        })
    }

    /// Removes a snapshot without children. The record goes at once; the directory is moved
    /// to the trash (or claimed by the persistence hook) and deleted in the background.
    pub fn remove(&self, key: &str) -> Result<()> {
        self.remove_record(key)
    }

    fn remove_record(&self, key: &str) -> Result<()> {
        let (id, disposition) = self.write("remove snapshot", |tx| {
            let rec = meta::require(tx, key)?;
            if meta::has_children(tx, key)? {
                return Err(SnapshotError::HasChildren {
                    key: key.to_string(),
                });
            }
            meta::delete(tx, rec.id)?;
            let dir = self.dir(rec.id);
            let disposition = self.hooks.on_remove_tx(
                tx,
                &RemoveEvent {
                    key,
                    backend_key: BackendKey::parse(key),
                    kind: rec.info.kind,
                    labels: &rec.info.labels,
                    snapshot_dir: &dir,
                },
            )?;
            Ok((rec.id, disposition))
        })?;
        if disposition == RemoveDisposition::Trash {
            // The record is gone, so a failure here only leaves an unreferenced directory,
            // which Cleanup and the next start collect.
            match fsops::move_to_trash(&self.dir(id), &self.trash) {
                Ok(()) => self.trash_ready.notify_one(),
                Err(e) => {
                    tracing::warn!(key, error = %e, "cannot move removed snapshot to the trash")
                }
            }
        }
        Ok(())
    }

    /// Info of one snapshot.
    pub fn stat(&self, key: &str) -> Result<Info> {
        self.read("stat snapshot", |c| Ok(meta::require(c, key)?.info))
    }

    /// Updates labels (the only mutable field) per containerd's field-path rules.
    pub fn update(&self, key: &str, labels: &Labels, paths: &[String]) -> Result<Info> {
        self.write("update snapshot", |tx| {
            let rec = meta::require(tx, key)?;
            let ops =
                LabelPath::parse_all(paths).map_err(|path| SnapshotError::ImmutableField {
                    key: key.to_string(),
                    path: path.to_string(),
                })?;
            let new_labels = LabelPath::apply(&ops, &rec.info.labels, labels);
            validate_labels(key, &new_labels)?;
            let updated = Utc::now();
            meta::update_labels(tx, rec.id, &new_labels, updated)?;
            Ok(Info {
                labels: new_labels,
                updated,
                ..rec.info
            })
        })
    }

    /// Disk usage: live for Active, stored at Commit for Committed, zero for View.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let rec = self.read("read usage", |c| meta::require(c, key))?;
        match rec.info.kind {
            // No `fs` yet: a persistence hook is still restoring it; nothing is used so far.
            Kind::Active if !self.fs_dir(rec.id).exists() => Ok(Usage::default()),
            Kind::Active => fsops::disk_usage(&self.fs_dir(rec.id)),
            Kind::Committed => Ok(rec.usage),
            Kind::View => Ok(Usage::default()),
        }
    }

    /// Every snapshot matching any of `filters` (all when empty), in creation order.
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let filters = Filters::parse(filters)?;
        let all = self.read("list snapshots", meta::all)?;
        Ok(all
            .into_iter()
            .map(|r: Record| r.info)
            .filter(|i| filters.matches(i))
            .collect())
    }

    /// Moves every unreferenced directory to the trash, then empties it.
    pub fn cleanup(&self) -> Result<()> {
        self.reconcile()?;
        self.sweep()?;
        Ok(())
    }

    /// Deletes the trash's contents; returns how many entries went.
    pub fn sweep(&self) -> Result<usize> {
        let _guard = self
            .sweeping
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        fsops::empty_trash(&self.trash)
    }

    /// Resolves when something was put in the trash since the last call.
    pub async fn trash_ready(&self) {
        self.trash_ready.notified().await;
    }

    /// Under the metadata lock (so no create is in flight): finish creates whose record
    /// committed, trash what no record references, and recreate lost layouts of Active/View
    /// snapshots. A directory with a record is never removed.
    fn reconcile(&self) -> Result<usize> {
        let moved = self.write("reconcile directories", |tx| {
            let records = meta::all(tx)?;
            let ids: std::collections::HashSet<i64> = records.iter().map(|r| r.id).collect();
            let mut moved = 0;
            let entries =
                fs::read_dir(&self.snapshots).map_err(SnapshotError::io("read directory", &self.snapshots))?;
            for entry in entries {
                let entry = entry.map_err(SnapshotError::io("read directory", &self.snapshots))?;
                let name = entry.file_name();
                let name = name.to_str().unwrap_or_default();
                let (id, pending) = match name.strip_prefix(fsops::TEMP_PREFIX) {
                    Some(rest) => (rest.parse::<i64>().ok(), true),
                    None => (name.parse::<i64>().ok(), false),
                };
                match id.filter(|id| ids.contains(id)) {
                    Some(id) if pending && fs::symlink_metadata(self.dir(id)).is_err() => {
                        tracing::warn!(id, "finishing a snapshot creation interrupted by a crash");
                        fs::rename(entry.path(), self.dir(id)).map_err(SnapshotError::io("rename into place", entry.path()))?;
                    }
                    Some(_) if !pending => {}
                    _ => {
                        fsops::move_to_trash(&entry.path(), &self.trash)?;
                        moved += 1;
                    }
                }
            }
            for rec in &records {
                if fs::symlink_metadata(self.dir(rec.id)).is_ok() {
                    continue;
                }
                if rec.info.kind == Kind::Committed {
                    tracing::error!(key = %rec.info.name, dir = %self.dir(rec.id).display(), "committed snapshot has lost its directory");
                } else {
                    tracing::warn!(key = %rec.info.name, "snapshot directory was lost before its first use; recreating it empty");
                    fsops::create_layout(&self.dir(rec.id), rec.info.kind)?;
                }
            }
            Ok(moved)
        })?;
        if moved > 0 {
            self.trash_ready.notify_one();
        }
        Ok(moved)
    }

    fn dir(&self, id: i64) -> PathBuf {
        self.snapshots.join(id.to_string())
    }

    fn temp_dir(&self, id: i64) -> PathBuf {
        self.snapshots.join(format!("{}{id}", fsops::TEMP_PREFIX))
    }

    fn fs_dir(&self, id: i64) -> PathBuf {
        self.dir(id).join("fs")
    }

    fn work_dir(&self, id: i64) -> PathBuf {
        self.dir(id).join("work")
    }

    /// Runs `f` in an IMMEDIATE transaction, committed only when `f` succeeds.
    fn write<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        self.db
            .call_blocking(op, |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                match f(&tx) {
                    Ok(v) => {
                        tx.commit()?;
                        Ok(Ok(v))
                    }
                    // Dropping the transaction rolls it back.
                    Err(e) => Ok(Err(e)),
                }
            })
            .map_err(SnapshotError::State)?
    }

    /// Runs `f` with the connection (holding the lock, so it sees a consistent state).
    fn read<T>(&self, op: &'static str, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        self.db
            .call_blocking(op, |conn| Ok(f(conn)))
            .map_err(SnapshotError::State)?
    }
}

/// The core's schema steps followed by the hook's. Leaked once per open (a few pointers), since
/// the database keeps the list for its lifetime.
fn migrations_with(hooks: &dyn PersistenceHooks) -> &'static [Migration] {
    let extra = hooks.migrations();
    if extra.is_empty() {
        return MIGRATIONS;
    }
    Box::leak([MIGRATIONS, extra].concat().into_boxed_slice())
}

fn validate_labels(key: &str, labels: &Labels) -> Result<()> {
    match labels
        .iter()
        .find(|(k, v)| k.len() + v.len() > MAX_LABEL_BYTES)
    {
        Some((k, _)) => Err(SnapshotError::LabelTooLong {
            key: key.to_string(),
            label: k.clone(),
        }),
        None => Ok(()),
    }
}

/// One daemon per root: a second one would race on directories and ids.
fn lock_root(root: &Path) -> Result<fs::File> {
    let path = root.join("lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(SnapshotError::io("open", &path))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(SnapshotError::RootInUse {
            root: root.to_path_buf(),
        }),
        Err(e) => Err(SnapshotError::io("lock", &path)(e.into())),
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
