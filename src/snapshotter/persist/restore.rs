//! Restoring an identity's layer into a new, still untouched upper dir.
//!
//! Source order: the newest queued layer of the identity in the local outbox (its upload may
//! still be pending, so the store may only have an older version), else the store's manifest.
//! Both paths extract into a staging dir next to `fs` and swap it in, so a failure leaves the
//! upper dir empty and unmodified and the Prepare/Mounts fails.

use std::path::Path;

use crate::archive::{self, UnpackOptions};
use crate::config::OnBaseChange;
use crate::layer::RestoreOptions;
use crate::layer::types::ContainerLayerId;

use super::error::{PersistError, Result, is_store_fault};
use super::identity::describe_base;
use super::{Attached, Persistence, db, hold};

impl Persistence {
    /// Restores `id` into `upper` unless the upper dir already has content.
    pub(super) fn restore(
        &self,
        att: &Attached,
        key: &str,
        id: &ContainerLayerId,
        base: &[String],
        upper: &Path,
    ) -> Result<()> {
        if !dir_is_empty(upper)? {
            tracing::info!(key, identity = %id, "upper dir already has content; not restoring over it");
            return Ok(());
        }
        if self.restore_from_outbox(att, key, id, base, upper)? {
            return Ok(());
        }
        let manifest = self
            .handle
            .block_on(self.manager.manifest(id))
            .map_err(|e| self.restore_error(key, id, e))?;
        let Some(manifest) = manifest else {
            tracing::info!(key, identity = %id, "no stored layer yet; starting from the image");
            return Ok(());
        };
        let seq = manifest.current.seq;
        att.write("raise sequence number", |c| db::note_synced(c, id, seq))?;
        if !self.base_allows_restore(key, id, manifest.current.base.as_deref(), base)? {
            return Ok(());
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
            Some(snap) => tracing::info!(key, identity = %id, digest = %snap.digest, seq,
                files = snap.file_count, bytes = snap.size_bytes, "restored layer from the store"),
            None => {
                tracing::info!(key, identity = %id, "stored layer disappeared; starting from the image")
            }
        }
        Ok(())
    }

    /// Copies the newest queued layer of `id` not yet superseded in the store; false when
    /// there is none.
    fn restore_from_outbox(
        &self,
        att: &Attached,
        key: &str,
        id: &ContainerLayerId,
        base: &[String],
        upper: &Path,
    ) -> Result<bool> {
        let Some(row) = att.read("read outbox", |c| db::newest_unsynced(c, id))? else {
            return Ok(false);
        };
        if !self.base_allows_restore(key, id, row.base.as_deref(), base)? {
            return Ok(true);
        }
        let pin = self.pins.get(&id.to_key());
        let _pinned = hold(&pin);
        // The worker may have finished it meanwhile; then the store has it.
        let Some(row) = att.read("read outbox", |c| db::outbox_row(c, row.id))? else {
            return Ok(false);
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
        Ok(true)
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
