//! Restoring an identity's layer: [`LayerSyncManager::restore_layer`], or an older version of it
//! ([`LayerSyncManager::restore_version`]). A restore extracts into a staging dir while the
//! download (parallel ranged GETs) fills the spool, and swaps the tree in only after the digest
//! of the whole archive matched.

use std::path::{Path, PathBuf};

use super::error::{LayerError, Result, store};
use super::manager::{LayerSyncManager, blocking};
use super::manifest::{ManifestEntry, VersionSelector, blob_key};
use super::options::RestoreOptions;
use super::spool::remove_if_exists;
use super::stream::{RestoreJob, download_and_unpack};
use super::types::{ContainerLayerId, LayerSnapshot};
use crate::archive::{self, UnpackOptions};
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
        if !entry.chain.is_empty() {
            return self
                .restore_chain(id, &manifest.current.digest, &entry, &target, opts)
                .await
                .map(Some);
        }
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

        self.restored(id, &target, &entry, &manifest.current.digest, &fingerprint)
            .await?;
        tracing::info!(%id, digest = %entry.digest, seq = entry.seq, target = %target.display(), "layer restored");
        Ok(Some(entry.snapshot(false)))
    }

    /// Restores a delta version: every archive of its chain is downloaded (concurrently, into
    /// private scratch files), then the base is extracted and the deltas applied in order into
    /// one staging dir, which replaces `target` only once every digest matched.
    async fn restore_chain(
        &self,
        id: &ContainerLayerId,
        current: &str,
        entry: &ManifestEntry,
        target: &Path,
        opts: RestoreOptions,
    ) -> Result<LayerSnapshot> {
        let archives: Vec<(String, PathBuf)> = entry
            .archives()
            .map(|d| (d.to_string(), self.inner.staging.temp_path("restore")))
            .collect();
        let fetched = futures::future::join_all(archives.iter().map(|(digest, spool)| {
            let key = blob_key(digest);
            async move {
                self.inner
                    .store
                    .download_to_file(&key, spool, None)
                    .await
                    .map_err(store(&key))
            }
        }))
        .await;
        let unpacked = async {
            let mut bytes = 0;
            for f in fetched {
                bytes += f?;
            }
            crate::metrics::downloaded(bytes);
            let layers: Vec<(PathBuf, String)> = archives
                .iter()
                .map(|(d, p)| (p.clone(), d.clone()))
                .collect();
            let limits = chain_limits(&self.inner.config, entry, opts.xattr_ns);
            let dest = target.to_path_buf();
            let done = blocking(move || {
                archive::unpack_chain_files(&layers, &dest, &limits, None)?;
                archive::fingerprint(&dest)
            })
            .await?;
            done.map_err(|source| LayerError::Unpack {
                id: id.clone(),
                key: blob_key(&entry.digest),
                path: target.to_path_buf(),
                source: Box::new(source),
            })
        }
        .await;
        for (_, spool) in &archives {
            remove_if_exists(spool)?;
        }
        let fingerprint = unpacked?;
        self.restored(id, target, entry, current, &fingerprint)
            .await?;
        tracing::info!(%id, digest = %entry.digest, seq = entry.seq, archives = archives.len(),
            target = %target.display(), "layer restored from its delta chain");
        Ok(entry.snapshot(false))
    }

    /// What every restore records once `target` holds `entry`: its fingerprint and sync state,
    /// and an index of the tree (nothing else touched it yet), so the next sync of `id` can
    /// upload only what changes from here. A failed index only costs that sync a full upload.
    async fn restored(
        &self,
        id: &ContainerLayerId,
        target: &Path,
        entry: &ManifestEntry,
        current: &str,
        fingerprint: &str,
    ) -> Result<()> {
        self.record_fingerprint(id, fingerprint, &entry.digest)
            .await?;
        self.put_state(id, &entry.digest, current).await?;
        let dest = target.to_path_buf();
        match blocking(move || archive::TreeIndex::of_tree(&dest)).await {
            Ok(Ok(index)) => self.save_index(id, index, &entry.digest).await,
            Ok(Err(e)) => {
                tracing::warn!(%id, error = %e, "cannot index the restored layer; the next sync uploads a full layer")
            }
            Err(e) => {
                tracing::warn!(%id, error = %e, "cannot index the restored layer; the next sync uploads a full layer")
            }
        }
        Ok(())
    }
}

/// [`restore_limits`] for a whole chain: its archives' declared sizes added up, and the ratio
/// cap raised to the highest ratio any one of them declares (a small delta of zeros compresses
/// far beyond its base).
fn chain_limits(
    config: &LayerStorageConfig,
    entry: &ManifestEntry,
    xattr_ns: crate::archive::XattrNs,
) -> UnpackOptions {
    let links = entry
        .chain
        .iter()
        .map(|l| (l.size_bytes, l.compressed_size_bytes))
        .chain(std::iter::once((
            entry.size_bytes,
            entry.compressed_size_bytes,
        )));
    let (mut size, mut compressed, mut ratio) = (0u64, 0u64, 0u64);
    for (s, c) in links {
        size = size.saturating_add(s);
        compressed = compressed.saturating_add(c);
        ratio = ratio.max(s.div_ceil(c.max(1)));
    }
    let total = ManifestEntry {
        size_bytes: size,
        compressed_size_bytes: compressed,
        ..entry.clone()
    };
    let mut limits = restore_limits(config, &total, xattr_ns);
    if size != 0 && size <= config.max_restore_bytes {
        limits.max_ratio = limits.max_ratio.max(ratio + 1);
    }
    limits
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
