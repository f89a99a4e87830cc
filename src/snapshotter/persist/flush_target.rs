//! Resolving a flush target to the snapshot it names (blocking; database reads only).

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use crate::layer::types::ContainerLayerId;
use crate::snapshotter::key::BackendKey;
use crate::snapshotter::meta;

use super::db::{self, Resolution, SnapshotRow};
use super::error::{PersistError, Result};
use super::flush::FlushTarget;

/// Where a request's snapshot was found.
pub(super) enum Found {
    Live(SnapshotRow),
    QueuedOnly(ContainerLayerId),
    Nothing,
}

/// The snapshot dir id and base of the live, identified snapshot `key` still holding `identity`.
pub(super) fn live_dir(
    c: &Connection,
    key: &str,
    identity: &ContainerLayerId,
) -> Result<Option<(i64, Vec<String>)>> {
    let Some(row) = db::snapshot(c, key)? else {
        return Ok(None);
    };
    if row.resolution != Resolution::Identified(identity.clone()) || !row.restored {
        return Ok(None);
    }
    let record = meta::get(c, key).map_err(|e| PersistError::Meta(Box::new(e)))?;
    Ok(record.map(|r| (r.id, row.base)))
}

/// Opens the snapshot dir `dir` and names its upper through the descriptor: a Remove may rename
/// the dir into the outbox while a flush or checkpoint reads it, and the descriptor follows it.
/// Keep the file open while reading the path.
pub(super) async fn open_followed(dir: &Path) -> Result<(std::fs::File, PathBuf)> {
    use std::os::fd::AsRawFd;
    let opened = {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || std::fs::File::open(dir))
            .await
            .map_err(PersistError::Join)?
    };
    let handle = opened.map_err(PersistError::io("open snapshot dir", dir))?;
    let upper = Path::new("/proc/self/fd")
        .join(handle.as_raw_fd().to_string())
        .join("fs");
    Ok((handle, upper))
}

/// Resolves a target to the live persisted snapshot, or the identity's queued layers.
pub(super) fn find(c: &Connection, snapshots: &Path, target: &FlushTarget) -> Result<Found> {
    let live = match target {
        FlushTarget::BackendKey(k) => db::snapshot(c, k)?,
        FlushTarget::Identity(id) => db::identity_owner(c, id)?,
        FlushTarget::Container { namespace, id } => {
            let mut found = None;
            for key in db::snapshot_keys(c)? {
                if BackendKey::parse(&key).is_some_and(|b| b.namespace == namespace && b.name == id)
                {
                    found = db::snapshot(c, &key)?;
                    break;
                }
            }
            found
        }
        FlushTarget::Upper(path) => {
            let id = snapshot_id_of_upper(snapshots, path);
            let mut found = None;
            if let Some(id) = id {
                let records = meta::all(c).map_err(|e| PersistError::Meta(Box::new(e)))?;
                if let Some(r) = records.into_iter().find(|r| r.id == id) {
                    found = db::snapshot(c, &r.info.name)?;
                }
            }
            found
        }
    };
    if let Some(row) = live {
        return Ok(Found::Live(row));
    }
    // Removed already: its layer may be queued.
    let queued = db::outbox_rows(c)?.into_iter().find(|r| match target {
        FlushTarget::Identity(id) => &r.identity == id,
        FlushTarget::BackendKey(k) => &r.key == k,
        FlushTarget::Container { namespace, id } => {
            BackendKey::parse(&r.key).is_some_and(|b| b.namespace == namespace && b.name == id)
        }
        FlushTarget::Upper(_) => false,
    });
    Ok(queued.map_or(Found::Nothing, |r| Found::QueuedOnly(r.identity)))
}

/// `<snapshots>/<id>/fs` → id.
fn snapshot_id_of_upper(snapshots: &Path, upper: &Path) -> Option<i64> {
    let rest = upper.strip_prefix(snapshots).ok()?;
    let mut parts = rest.components();
    let id = parts.next()?.as_os_str().to_str()?.parse().ok()?;
    (parts.next()?.as_os_str() == "fs" && parts.next().is_none()).then_some(id)
}
