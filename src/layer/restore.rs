//! Restoring an identity's layer: [`LayerSyncManager::restore_layer`], or an older version of it
//! ([`LayerSyncManager::restore_version`]). A restore extracts into a staging dir while the
//! download (parallel ranged GETs) fills the spool, and swaps the tree in only after the digest
//! of the whole archive matched.

use std::path::Path;

use super::error::{LayerError, Result, store};
use super::manager::{LayerSyncManager, blocking};
use super::manifest::{ManifestEntry, VersionSelector, blob_key};
use super::options::RestoreOptions;
use super::spool::remove_if_exists;
use super::stream::{ChainArchive, RestoreJob, download_and_unpack, download_and_unpack_chain};
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

    /// Restores a delta version through its chain (see [`download_and_unpack_chain`]): the base
    /// streams into one staging dir while the deltas download beside it, and the tree replaces
    /// `target` only once every archive was applied and matched its digest. A failure names the
    /// key of the archive it concerns.
    async fn restore_chain(
        &self,
        id: &ContainerLayerId,
        current: &str,
        entry: &ManifestEntry,
        target: &Path,
        opts: RestoreOptions,
    ) -> Result<LayerSnapshot> {
        let sizes = entry
            .chain
            .iter()
            .map(|l| l.compressed_size_bytes)
            .chain(std::iter::once(entry.compressed_size_bytes));
        let archives: Vec<ChainArchive> = entry
            .archives()
            .zip(sizes)
            .map(|(digest, compressed)| ChainArchive {
                key: blob_key(digest),
                spool: self.inner.staging.temp_path("restore"),
                digest: digest.to_string(),
                compressed,
            })
            .collect();
        let limits = chain_limits(&self.inner.config, entry, opts.xattr_ns);
        let outcome =
            download_and_unpack_chain(&self.inner.store, &archives, target.to_path_buf(), limits)
                .await;
        // Every scratch file goes, whatever failed; the first removal error is reported.
        let removed = archives
            .iter()
            .map(|a| remove_if_exists(&a.spool))
            .fold(Ok(()), Result::and);
        match outcome.downloaded {
            Some(Ok(bytes)) => crate::metrics::downloaded(bytes),
            Some(Err(e)) => return Err(e),
            None => {}
        }
        let fingerprint = outcome
            .unpacked
            .map_err(LayerError::Join)?
            .map_err(|source| LayerError::Unpack {
                id: id.clone(),
                key: archives[outcome.at.min(archives.len() - 1)].key.clone(),
                path: target.to_path_buf(),
                source: Box::new(source),
            })?;
        removed?;
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
