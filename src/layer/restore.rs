//! Restoring an identity's layer: [`LayerSyncManager::restore_layer`], or an older version of it
//! ([`LayerSyncManager::restore_version`]). A restore extracts into a staging dir while the
//! download (parallel ranged GETs) fills the spool, and swaps the tree in only after the digest
//! of the whole archive matched.

use std::path::Path;

use super::error::{LayerError, Result, store};
use super::manager::LayerSyncManager;
use super::manifest::{ManifestEntry, VersionSelector, blob_key};
use super::options::RestoreOptions;
use super::spool::remove_if_exists;
use super::stream::{RestoreJob, download_and_unpack};
use super::types::{ContainerLayerId, LayerSnapshot};
use crate::archive::UnpackOptions;
use crate::config::LayerStorageConfig;

impl LayerSyncManager {
    /// Restores `id`'s current layer into `target` (absent or an empty dir). `None` when the
    /// store has no layer for `id`.
    pub async fn restore_layer(
        &self,
        id: &ContainerLayerId,
        target: impl AsRef<Path>,
    ) -> Result<Option<LayerSnapshot>> {
        self.restore_layer_with(id, target, RestoreOptions::default())
            .await
    }

    /// [`Self::restore_layer`] with an xattr namespace and progress reporting.
    pub async fn restore_layer_with(
        &self,
        id: &ContainerLayerId,
        target: impl AsRef<Path>,
        opts: RestoreOptions,
    ) -> Result<Option<LayerSnapshot>> {
        self.restore_version(id, VersionSelector::Current, target, opts)
            .await
    }

    /// Restores the version of `id` that `which` selects from its manifest (current or kept
    /// history) into `target`. `None` when the store has no layer for `id`;
    /// [`LayerError::NoSuchVersion`] when it has, but not that version.
    pub async fn restore_version(
        &self,
        id: &ContainerLayerId,
        which: VersionSelector,
        target: impl AsRef<Path>,
        opts: RestoreOptions,
    ) -> Result<Option<LayerSnapshot>> {
        let target = target.as_ref().to_path_buf();
        let lock = self.identity_lock(id);
        let _guard = lock.lock().await;
        let Some(manifest) = self.read_manifest(id).await? else {
            return Ok(None);
        };
        let Some(entry) = manifest.select(which).cloned() else {
            return Err(LayerError::no_such_version(&manifest, which));
        };
        let key = blob_key(&entry.digest);
        let spool = self.inner.staging.temp_path("restore");
        let job = RestoreJob {
            key: key.clone(),
            spool: spool.clone(),
            target: target.clone(),
            limits: restore_limits(&self.inner.config, &entry, opts.xattr_ns),
            progress: opts.progress,
        };
        let (downloaded, unpacked) = download_and_unpack(&self.inner.store, &entry, job).await;
        remove_if_exists(&spool)?;
        if let Some(Ok(bytes)) = downloaded {
            crate::metrics::downloaded(bytes);
        }
        if let Some(Err(e)) = downloaded {
            return Err(store(&key)(e));
        }
        let (_stats, fingerprint) =
            unpacked
                .map_err(LayerError::Join)?
                .map_err(|source| LayerError::Unpack {
                    id: id.clone(),
                    key: key.clone(),
                    path: target.clone(),
                    source: Box::new(source),
                })?;

        self.record_fingerprint(id, &fingerprint, &entry.digest)
            .await?;
        self.put_state(id, &entry.digest, &manifest.current.digest)
            .await?;
        tracing::info!(%id, digest = %entry.digest, seq = entry.seq, target = %target.display(), "layer restored");
        Ok(Some(entry.snapshot(false)))
    }
}

/// Bomb guards for a restore. The manifest declares the uncompressed size, so extraction is
/// capped at exactly that (and at `max_restore_bytes`); the ratio cap is raised to the declared
/// ratio, because a legitimate layer holding a large zero-filled file compresses far beyond any
/// fixed ratio and must still restore.
pub(super) fn restore_limits(
    config: &LayerStorageConfig,
    entry: &ManifestEntry,
    xattr_ns: crate::archive::XattrNs,
) -> UnpackOptions {
    let declared = entry.size_bytes;
    let (max_uncompressed, max_ratio) = if declared == 0 || declared > config.max_restore_bytes {
        (config.max_restore_bytes, config.max_expansion_ratio)
    } else {
        let ratio = declared.div_ceil(entry.compressed_size_bytes.max(1));
        (declared, config.max_expansion_ratio.max(ratio + 1))
    };
    UnpackOptions {
        xattr_ns,
        allow_devices: false,
        max_uncompressed,
        max_ratio,
    }
}
