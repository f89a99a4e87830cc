//! The durable outbox: queueing at Remove and Commit without store I/O, and start-up repair.
//!
//! **Remove** of an identified, restored Active snapshot, inside the metadata transaction that
//! deletes its record: allocate a seq ticket, insert the outbox row `n`, write a marker
//! (`zlayer-outbox.json`: row, identity, seq, base, key, snapshot id) into `snapshots/<id>`,
//! rename that dir to `outbox/<n>` and fsync both parents; the transaction commits after the
//! hook returns. **Commit** queues a row pointing at the committed dir (`location = live`);
//! removing that committed snapshot later moves it to the outbox the same way.
//!
//! **Start-up** ([`reconcile`]), for a crash at any point:
//! - row in the outbox but `outbox/<n>` missing and `snapshots/<id>` holding marker `n`: the
//!   rename was lost (power failure before it reached the disk): finish it;
//! - `outbox/<n>` without row whose marker names a snapshot record that still exists: the
//!   transaction never committed: move the dir back;
//! - `outbox/<n>` without row or record: the worker finished but died before deleting the dir:
//!   re-adopt it (the re-sync finds the layer unchanged and deletes it);
//! - an outbox entry whose marker is missing, unreadable or names another row: quarantined in
//!   `<root>/quarantine/` (kept, logged, listed by `status`) for an operator to inspect; it may
//!   be the only copy of a layer, so nothing here is ever deleted.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use crate::layer::types::ContainerLayerId;
use crate::snapshotter::hooks::{CommitEvent, RemoveDisposition, RemoveEvent};
use crate::snapshotter::meta;
use crate::snapshotter::types::Kind;

use super::Attached;
use super::db::{self, Location, NewOutbox, Resolution};
use super::error::{PersistError, Result};

/// Name of the marker written into a snapshot dir before it is renamed into the outbox.
pub const MARKER: &str = "zlayer-outbox.json";

/// What a queued dir is, readable without the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub outbox_id: i64,
    pub identity: ContainerLayerId,
    pub seq: u64,
    pub base: Option<Vec<String>>,
    pub key: String,
    pub snapshot_id: i64,
}

/// Creates a private directory such as `<root>/outbox` or `<root>/quarantine` (0700).
pub fn prepare_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(PersistError::io("create", dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(PersistError::io("set mode of", dir))
}

/// Name of the quarantine directory under the snapshotter root.
pub const QUARANTINE: &str = "quarantine";

/// The snapshot id of `snapshots/<id>`.
fn snapshot_id_of(dir: &Path) -> Option<i64> {
    dir.file_name()?.to_str()?.parse().ok()
}

/// Queues an identified Active snapshot's dir, or leaves it to the trash.
pub fn on_remove(
    att: &Attached,
    tx: &Connection,
    event: &RemoveEvent<'_>,
) -> Result<RemoveDisposition> {
    let Some(snapshot_id) = snapshot_id_of(event.snapshot_dir) else {
        return Ok(RemoveDisposition::Trash);
    };
    match event.kind {
        Kind::Active => {
            let row = db::snapshot(tx, event.key)?;
            db::delete_snapshot(tx, event.key)?;
            let Some(row) = row else {
                return Ok(RemoveDisposition::Trash);
            };
            let Resolution::Identified(identity) = row.resolution else {
                return Ok(RemoveDisposition::Trash);
            };
            if !row.restored {
                // Its upper never received the identity's layer; uploading it would replace
                // the real layer with whatever this container wrote on top of nothing.
                tracing::warn!(key = %event.key, %identity, "removed before its layer was restored; not persisted");
                return Ok(RemoveDisposition::Trash);
            }
            let (seq, id) = queue(
                tx,
                &identity,
                &row.base,
                event.key,
                snapshot_id,
                Location::Outbox,
            )?;
            let marker = Marker {
                outbox_id: id,
                identity,
                seq,
                base: Some(row.base),
                key: event.key.to_string(),
                snapshot_id,
            };
            move_into_outbox(att, event.snapshot_dir, &marker)?;
            tracing::info!(key = %event.key, identity = %marker.identity, seq, outbox = id, "queued removed snapshot for upload");
            Ok(RemoveDisposition::Claimed)
        }
        Kind::Committed => {
            let Some(row) = db::live_outbox(tx, snapshot_id)? else {
                return Ok(RemoveDisposition::Trash);
            };
            db::set_location(tx, row.id, Location::Outbox)?;
            let marker = Marker {
                outbox_id: row.id,
                identity: row.identity,
                seq: row.seq,
                base: row.base,
                key: row.key,
                snapshot_id,
            };
            move_into_outbox(att, event.snapshot_dir, &marker)?;
            tracing::info!(key = %event.key, identity = %marker.identity, outbox = row.id,
                "committed snapshot removed before its upload; kept in the outbox");
            Ok(RemoveDisposition::Claimed)
        }
        Kind::View => Ok(RemoveDisposition::Trash),
    }
}

/// Queues the committed state of an identified Active snapshot; true when queued.
pub fn on_commit(tx: &Connection, event: &CommitEvent<'_>) -> Result<bool> {
    let row = db::snapshot(tx, event.key)?;
    db::delete_snapshot(tx, event.key)?;
    let Some(row) = row else {
        return Ok(false);
    };
    let Resolution::Identified(identity) = row.resolution else {
        return Ok(false);
    };
    if !row.restored {
        tracing::warn!(key = %event.key, %identity, "committed before its layer was restored; not persisted");
        return Ok(false);
    }
    let Some(snapshot_id) = event.upper.parent().and_then(snapshot_id_of) else {
        return Ok(false);
    };
    let (seq, id) = queue(
        tx,
        &identity,
        &row.base,
        event.key,
        snapshot_id,
        Location::Live,
    )?;
    tracing::info!(key = %event.key, name = %event.name, %identity, seq, outbox = id, "queued committed snapshot for upload");
    Ok(true)
}

/// A new outbox row for the identity's next sequence number: (seq, row id).
fn queue(
    tx: &Connection,
    identity: &ContainerLayerId,
    base: &[String],
    key: &str,
    snapshot_id: i64,
    location: Location,
) -> Result<(u64, i64)> {
    let seq = db::next_seq(tx, identity)?;
    let id = db::insert_outbox(
        tx,
        &NewOutbox {
            id: None,
            identity,
            seq,
            base: Some(base),
            key,
            snapshot_id,
            location,
        },
    )?;
    Ok((seq, id))
}

/// Marker, rename, fsyncs. On failure the marker is removed again and the dir stays put: a
/// rename whose fsync failed is undone, since the transaction that records it rolls back.
fn move_into_outbox(att: &Attached, dir: &Path, marker: &Marker) -> Result<()> {
    write_marker(dir, marker)?;
    let dest = att.outbox.join(marker.outbox_id.to_string());
    if let Err(e) = fs::rename(dir, &dest) {
        let _ = fs::remove_file(dir.join(MARKER));
        return Err(PersistError::io("move into the outbox", dir)(e));
    }
    if let Err(e) = sync_dir(&att.outbox).and_then(|()| sync_dir(&att.snapshots)) {
        match fs::rename(&dest, dir) {
            Ok(()) => {
                let _ = fs::remove_file(dir.join(MARKER));
            }
            Err(undo) => {
                // Start-up moves it back (its marker names a record that still exists).
                tracing::error!(path = %dest.display(), error = %undo, "cannot undo a move into the outbox");
            }
        }
        return Err(e);
    }
    Ok(())
}

fn write_marker(dir: &Path, marker: &Marker) -> Result<()> {
    let path = dir.join(MARKER);
    let tmp = dir.join(format!("{MARKER}.tmp"));
    let body = serde_json::to_vec_pretty(marker).map_err(|source| PersistError::Marker {
        path: path.clone(),
        source,
    })?;
    let mut f = fs::File::create(&tmp).map_err(PersistError::io("create", &tmp))?;
    f.write_all(&body)
        .map_err(PersistError::io("write", &tmp))?;
    f.sync_all().map_err(PersistError::io("fsync", &tmp))?;
    fs::rename(&tmp, &path).map_err(PersistError::io("rename", &tmp))?;
    sync_dir(dir)
}

/// The marker in `dir`; `None` when there is none.
pub fn read_marker(dir: &Path) -> Result<Option<Marker>> {
    let path = dir.join(MARKER);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| PersistError::Marker { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PersistError::io("read", path)(e)),
    }
}

/// fsync of a directory (for renames in and out of it); the test failpoint can fail it.
pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(test)]
    if failpoint::should_fail(dir) {
        return Err(PersistError::io("fsync", dir)(std::io::Error::other(
            "injected fsync failure",
        )));
    }
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(PersistError::io("fsync", dir))
}

/// Moves an outbox entry nobody can vouch for into `<root>/quarantine/`, keeping it.
fn quarantine(att: &Attached, path: &Path, why: &str) -> Result<()> {
    let dir = att.root.join(QUARANTINE);
    prepare_dir(&dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dest = dir.join(crate::util::unique_temp_name(
        format!("outbox-{name}").as_bytes(),
        "quarantined",
    ));
    tracing::error!(path = %path.display(), quarantined = %dest.display(), reason = why,
        "outbox entry cannot be matched to a queued layer; quarantined, not deleted");
    fs::rename(path, &dest).map_err(PersistError::io("quarantine", path))?;
    sync_dir(&dir)?;
    sync_dir(&att.outbox)
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Repairs rows, outbox dirs and markers after a crash; see the module docs.
pub fn reconcile(att: &Attached) -> Result<()> {
    att.write("reconcile the outbox", |tx| {
        let records: HashMap<i64, (Kind, String)> = meta::all(tx)
            .map_err(|e| PersistError::Meta(Box::new(e)))?
            .into_iter()
            .map(|r| (r.id, (r.info.kind, r.info.name)))
            .collect();
        let mut rows = HashSet::new();
        for row in db::outbox_rows(tx)? {
            if reconcile_row(att, tx, &records, &row)? {
                rows.insert(row.id);
            }
        }
        for entry in
            fs::read_dir(&att.outbox).map_err(PersistError::io("read directory", &att.outbox))?
        {
            let entry = entry.map_err(PersistError::io("read directory", &att.outbox))?;
            let n = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i64>().ok());
            if n.is_some_and(|n| rows.contains(&n)) {
                continue;
            }
            reconcile_orphan(att, tx, &records, &entry.path(), n)?;
        }
        // Markers left in live snapshot dirs by removals that rolled back.
        for id in records.keys() {
            let marker = att.snapshots.join(id.to_string()).join(MARKER);
            if exists(&marker) {
                fs::remove_file(&marker)
                    .map_err(PersistError::io("remove stale marker", &marker))?;
            }
        }
        let live_keys: HashSet<&str> = records.values().map(|(_, k)| k.as_str()).collect();
        for key in db::snapshot_keys(tx)? {
            if !live_keys.contains(key.as_str()) {
                db::delete_snapshot(tx, &key)?;
            }
        }
        Ok(())
    })
}

/// Checks one row against the disk; false when the row was dropped.
fn reconcile_row(
    att: &Attached,
    tx: &Connection,
    records: &HashMap<i64, (Kind, String)>,
    row: &db::OutboxRow,
) -> Result<bool> {
    let queued = att.outbox.join(row.id.to_string());
    let source = att.snapshots.join(row.snapshot_id.to_string());
    let has_record = records.contains_key(&row.snapshot_id);
    match row.location {
        Location::Outbox if exists(&queued) => return Ok(true),
        Location::Outbox => {
            let ours = read_marker(&source)
                .ok()
                .flatten()
                .is_some_and(|m| m.outbox_id == row.id);
            if !has_record && ours {
                tracing::warn!(outbox = row.id, identity = %row.identity, "finishing a move into the outbox interrupted by a crash");
                fs::rename(&source, &queued)
                    .map_err(PersistError::io("move into the outbox", &source))?;
                sync_dir(&att.outbox)?;
                return Ok(true);
            }
        }
        Location::Live => {
            let committed = records
                .get(&row.snapshot_id)
                .is_some_and(|(k, _)| *k == Kind::Committed);
            if committed && exists(&source) {
                return Ok(true);
            }
            if exists(&queued) {
                db::set_location(tx, row.id, Location::Outbox)?;
                return Ok(true);
            }
            if !has_record && exists(&source) {
                let marker = Marker {
                    outbox_id: row.id,
                    identity: row.identity.clone(),
                    seq: row.seq,
                    base: row.base.clone(),
                    key: row.key.clone(),
                    snapshot_id: row.snapshot_id,
                };
                tracing::warn!(outbox = row.id, identity = %row.identity, "committed snapshot was removed without its dir; moving it into the outbox");
                db::set_location(tx, row.id, Location::Outbox)?;
                move_into_outbox(att, &source, &marker)?;
                return Ok(true);
            }
        }
    }
    tracing::error!(outbox = row.id, identity = %row.identity, key = %row.key, seq = row.seq,
        "queued layer has lost its directory; dropping it");
    db::delete_outbox(tx, row.id)?;
    Ok(false)
}

/// An outbox entry without a row: move back, re-adopt or trash by its marker.
fn reconcile_orphan(
    att: &Attached,
    tx: &Connection,
    records: &HashMap<i64, (Kind, String)>,
    path: &Path,
    n: Option<i64>,
) -> Result<()> {
    let marker = match read_marker(path) {
        Ok(Some(m)) if Some(m.outbox_id) == n => m,
        Ok(Some(m)) => {
            let why = format!("its marker names outbox entry {}", m.outbox_id);
            return quarantine(att, path, &why);
        }
        Ok(None) => return quarantine(att, path, "it has no marker"),
        Err(e) => {
            let why = format!("unreadable marker: {}", super::error_chain(&e));
            return quarantine(att, path, &why);
        }
    };
    let original = att.snapshots.join(marker.snapshot_id.to_string());
    if records.contains_key(&marker.snapshot_id) && !exists(&original) {
        tracing::warn!(key = %marker.key, outbox = marker.outbox_id, "undoing a removal that did not commit");
        fs::rename(path, &original).map_err(PersistError::io("move back from the outbox", path))?;
        sync_dir(&att.snapshots)?;
        let stale = original.join(MARKER);
        fs::remove_file(&stale).map_err(PersistError::io("remove stale marker", &stale))?;
        return Ok(());
    }
    tracing::warn!(identity = %marker.identity, seq = marker.seq, outbox = marker.outbox_id,
        "re-adopting an outbox entry without a row");
    db::insert_outbox(
        tx,
        &NewOutbox {
            id: Some(marker.outbox_id),
            identity: &marker.identity,
            seq: marker.seq,
            base: marker.base.as_deref(),
            key: &marker.key,
            snapshot_id: marker.snapshot_id,
            location: Location::Outbox,
        },
    )?;
    Ok(())
}

/// Test seam: make the next fsyncs of one directory fail.
#[cfg(test)]
pub(super) mod failpoint {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static FAIL: Mutex<Option<PathBuf>> = Mutex::new(None);

    pub fn fail_fsync_of(dir: Option<&Path>) {
        *FAIL.lock().unwrap() = dir.map(Path::to_path_buf);
    }

    pub(super) fn should_fail(dir: &Path) -> bool {
        FAIL.lock().unwrap().as_deref() == Some(dir)
    }
}
