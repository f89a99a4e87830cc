//! Restoring an identity's layer into a new, still untouched upper dir (run by the background
//! restore jobs, never inside a containerd call that holds its locks).
//!
//! Source order: the newest queued layer of the identity in the local outbox (its upload may
//! still be pending, so the store may only have an older version), else the store's manifest.
//! The empty upper waits as `fs.pending` while both paths extract into a staging dir and rename
//! it to `fs` once it is complete and on disk, so a failure leaves no `fs` at all: the
//! snapshot cannot be mounted and the Mounts waiting for the restore fails.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::archive::{self, UnpackOptions};
use crate::config::OnBaseChange;
use crate::layer::RestoreOptions;
use crate::layer::types::ContainerLayerId;
use crate::metrics::{self, ErrorKind, RestoreSource};

use super::error::{PersistError, Result, is_store_fault};
use super::identity::describe_base;
use super::jobs::pending_of;
use super::outbox::sync_dir;
use super::{Attached, Persistence, db, hold};

impl Persistence {
    /// Restores `id` into the absent `upper` (its empty original waits as `fs.pending`), from
    /// the outbox or the store; with nothing to restore the empty original goes back in place.
    /// Everything is on disk when this returns. An upper that already has content was written
    /// without its layer: refused, never restored over and never persisted.
    pub(super) fn restore(
        &self,
        att: &Attached,
        key: &str,
        id: &ContainerLayerId,
        base: &[String],
        upper: &Path,
    ) -> Result<()> {
        let pending = hide_upper(att, key, id, upper)?;
        let restored = self
            .restore_layer(att, key, id, base, upper)
            .inspect_err(|_| metrics::error(ErrorKind::Restore))?;
        if restored {
            // The extraction's swap fsynced the parent with `fs` in it; a leftover empty
            // `fs.pending` after a crash is harmless once the snapshot is marked restored.
            std::fs::remove_dir(&pending).map_err(PersistError::io("remove", &pending))
        } else {
            std::fs::rename(&pending, upper)
                .map_err(PersistError::io("rename into place", &pending))?;
            sync_dir(upper.parent().unwrap_or(upper))
        }
    }

    /// Fills the absent `upper`; false when there was nothing to restore (or the policy said
    /// to start from the image).
    fn restore_layer(
        &self,
        att: &Attached,
        key: &str,
        id: &ContainerLayerId,
        base: &[String],
        upper: &Path,
    ) -> Result<bool> {
        let started = Instant::now();
        if let Some(copied) = self.restore_from_outbox(att, key, id, base, upper)? {
            if copied {
                metrics::restore_finished(RestoreSource::Outbox, started.elapsed());
            }
            return Ok(copied);
        }
        let manifest = self
            .handle
            .block_on(self.manager.manifest(id))
            .map_err(|e| self.restore_error(key, id, e))?;
        let Some(manifest) = manifest else {
            tracing::info!(key, identity = %id, "no stored layer yet; starting from the image");
            return Ok(false);
        };
        let seq = manifest.current.seq;
        att.write("raise sequence number", |c| db::note_synced(c, id, seq))?;
        if !self.base_allows_restore(key, id, manifest.current.base.as_deref(), base)? {
            return Ok(false);
        }
        let opts = RestoreOptions {
            xattr_ns: self.opts.xattr_ns,
            progress: None,
        };
        let restored = self
            .handle
            .block_on(self.manager.restore_layer_with(id, upper, opts))
            .map_err(|e| self.restore_error(key, id, e))?;
        match restored {
            Some(snap) => {
                metrics::restore_finished(RestoreSource::Store, started.elapsed());
                tracing::info!(key, identity = %id, digest = %snap.digest, seq,
                files = snap.file_count, bytes = snap.size_bytes, "restored layer from the store");
                Ok(true)
            }
            None => {
                tracing::info!(key, identity = %id, "stored layer disappeared; starting from the image");
                Ok(false)
            }
        }
    }

    /// Copies the newest queued layer of `id` not yet superseded in the store: `None` when
    /// there is none, else whether anything was copied (the base policy may skip it).
    fn restore_from_outbox(
        &self,
        att: &Attached,
        key: &str,
        id: &ContainerLayerId,
        base: &[String],
        upper: &Path,
    ) -> Result<Option<bool>> {
        let Some(row) = att.read("read outbox", |c| db::newest_unsynced(c, id))? else {
            return Ok(None);
        };
        if !self.base_allows_restore(key, id, row.base.as_deref(), base)? {
            return Ok(Some(false));
        }
        let pin = self.pins.get(&id.to_key());
        let _pinned = hold(&pin);
        // The worker may have finished it meanwhile; then the store has it.
        let Some(row) = att.read("read outbox", |c| db::outbox_row(c, row.id))? else {
            return Ok(None);
        };
        let src = att.layer_dir(&row).join("fs");
        let opts = UnpackOptions {
            xattr_ns: self.opts.xattr_ns,
            ..UnpackOptions::default()
        };
        let stats =
            archive::copy_tree(&src, upper, &opts).map_err(|source| PersistError::LocalCopy {
                identity: id.clone(),
                src: src.clone(),
                target: upper.to_path_buf(),
                source: Box::new(source),
            })?;
        tracing::info!(key, identity = %id, seq = row.seq, outbox = row.id, from = %src.display(),
            entries = stats.entries, tar_bytes = stats.uncompressed_size,
            "restored layer from the local outbox (upload pending)");
        Ok(Some(true))
    }

    /// Applies `on_base_change` when the layer was recorded on another base.
    fn base_allows_restore(
        &self,
        key: &str,
        id: &ContainerLayerId,
        recorded: Option<&[String]>,
        current: &[String],
    ) -> Result<bool> {
        let Some(recorded) = recorded.filter(|r| *r != current) else {
            return Ok(true);
        };
        let (recorded, current) = (describe_base(recorded), describe_base(current));
        match self.opts.on_base_change {
            OnBaseChange::Restore => {
                tracing::warn!(key, identity = %id, %recorded, %current, "base changed; restoring the layer anyway");
                Ok(true)
            }
            OnBaseChange::Skip => {
                tracing::warn!(key, identity = %id, %recorded, %current, "base changed; starting from the image instead");
                Ok(false)
            }
            OnBaseChange::Fail => Err(PersistError::BaseChanged {
                identity: id.clone(),
                key: key.to_string(),
                recorded,
                current,
            }),
        }
    }

    fn restore_error(
        &self,
        key: &str,
        id: &ContainerLayerId,
        e: crate::layer::LayerError,
    ) -> PersistError {
        if is_store_fault(&e) {
            PersistError::StoreUnavailable {
                identity: id.clone(),
                key: key.to_string(),
                source: Box::new(e),
            }
        } else {
            PersistError::Restore {
                identity: id.clone(),
                key: key.to_string(),
                source: Box::new(e),
            }
        }
    }
}

fn dir_is_empty(dir: &Path) -> Result<bool> {
    let mut entries = std::fs::read_dir(dir).map_err(PersistError::io("read directory", dir))?;
    Ok(entries.next().is_none())
}

fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// Moves the empty upper dir aside (`fs.pending`) so nothing can mount it before the restore
/// has filled its replacement; returns the pending path. Prepare calls this for identities
/// known at once; the restore job calls it again (idempotent) after a restart or for
/// identities found at Mounts.
pub(super) fn hide_upper(
    att: &Attached,
    key: &str,
    id: &ContainerLayerId,
    upper: &Path,
) -> Result<PathBuf> {
    let pending = pending_of(upper);
    let mut changed = true;
    if exists(upper) {
        if exists(&pending) {
            // A restore swapped its tree in but died before marking it restored; nothing has
            // mounted it (Mounts waits for the mark), so restore again from the source.
            tracing::warn!(key, identity = %id, "discarding a restore that was not marked done");
            crate::snapshotter::fsops::move_to_trash(upper, &att.trash)
                .map_err(|e| PersistError::Meta(Box::new(e)))?;
        } else if dir_is_empty(upper)? {
            std::fs::rename(upper, &pending).map_err(PersistError::io("rename", upper))?;
        } else {
            return Err(PersistError::UpperHasContent {
                key: key.to_string(),
                identity: id.clone(),
                path: upper.to_path_buf(),
            });
        }
    } else if !exists(&pending) {
        // Lost with its parent dir (recreated empty at start-up): an empty upper again.
        std::fs::create_dir(&pending).map_err(PersistError::io("create", &pending))?;
        std::fs::set_permissions(&pending, std::fs::Permissions::from_mode(0o755))
            .map_err(PersistError::io("set mode of", &pending))?;
    } else {
        // Already hidden (by Prepare, or by an earlier attempt): nothing to write back.
        changed = false;
    }
    if changed {
        sync_dir(upper.parent().unwrap_or(upper))?;
    }
    Ok(pending)
}
