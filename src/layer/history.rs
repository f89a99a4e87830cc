//! The store-wide view of identities and the operator's levers on them: listing every identity
//! ([`LayerSyncManager::list_identities`]), making a kept older version current again
//! ([`LayerSyncManager::rollback`]) and dropping an identity ([`LayerSyncManager::forget`]).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use super::error::{LayerError, Result, store};
use super::manager::{LayerSyncManager, blocking, parse_manifest, replacing};
use super::manifest::{
    LayerManifest, MANIFEST_PREFIX, ManifestEntry, VersionSelector, blob_key, manifest_key,
};
use super::sync::MANIFEST_ATTEMPTS;
use super::types::ContainerLayerId;

/// Manifest GETs in flight while reading them all.
const MANIFEST_READS: usize = 16;

/// One identity in the store, as `ls` and the control service's `List` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentitySummary {
    pub identity: ContainerLayerId,
    /// Current version: digest (sha256 hex of the compressed archive), seq, sizes, creation.
    pub digest: String,
    pub seq: u64,
    pub size_bytes: u64,
    pub compressed_size_bytes: u64,
    pub created_at: DateTime<Utc>,
    /// Last write of the manifest.
    pub updated_at: DateTime<Utc>,
    /// Versions kept, current included.
    pub versions: usize,
}

impl IdentitySummary {
    fn of(m: &LayerManifest) -> Self {
        Self {
            identity: m.identity.clone(),
            digest: m.current.digest.clone(),
            seq: m.current.seq,
            size_bytes: m.current.size_bytes,
            compressed_size_bytes: m.current.compressed_size_bytes,
            created_at: m.current.created_at,
            updated_at: m.updated_at,
            versions: m.versions().count(),
        }
    }
}

/// What [`LayerSyncManager::rollback`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackOutcome {
    pub identity: ContainerLayerId,
    /// The chosen version, as the manifest had it.
    pub chosen: ManifestEntry,
    /// The manifest's current version now (the chosen content under a new, higher seq); equal
    /// to `chosen` when that already was current.
    pub current: ManifestEntry,
    /// False when the chosen version already was current (nothing written).
    pub moved: bool,
}

/// What [`LayerSyncManager::forget`] removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forgotten {
    pub identity: ContainerLayerId,
    /// The store had a manifest for the identity; it is deleted (its blobs go at `gc` once
    /// older than `gc_grace_secs`).
    pub manifest_deleted: bool,
    /// The manifest's current version, when it could be read.
    pub current: Option<ManifestEntry>,
    /// This node's sync record (state, fingerprint) existed and is deleted.
    pub local_record_removed: bool,
    /// Interrupted syncs of the identity dropped from the staging dir (finishing them would
    /// have written the manifest again).
    pub intents_dropped: u32,
}

impl LayerSyncManager {
    /// Every identity with a manifest in the store, sorted by identity. One LIST of
    /// `manifests/`, then the manifests are read with bounded concurrency; a manifest that
    /// cannot be read or parsed fails the whole call, naming its key.
    pub async fn list_identities(&self) -> Result<Vec<IdentitySummary>> {
        let mut out: Vec<_> = self
            .read_all_manifests()
            .await?
            .iter()
            .map(IdentitySummary::of)
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        Ok(out)
    }

    /// Every manifest under `manifests/`. Fails on the first one that cannot be read, does not
    /// parse, or sits under another identity's key; one deleted between LIST and GET is
    /// left out.
    pub(super) async fn read_all_manifests(&self) -> Result<Vec<LayerManifest>> {
        let keys = self
            .inner
            .store
            .list(MANIFEST_PREFIX)
            .await
            .map_err(store(MANIFEST_PREFIX))?;
        futures::stream::iter(keys)
            .map(|key| self.read_manifest_at(key))
            .buffer_unordered(MANIFEST_READS)
            .try_filter_map(|m| async move { Ok(m) })
            .try_collect()
            .await
    }

    async fn read_manifest_at(&self, key: String) -> Result<Option<LayerManifest>> {
        let Some(manifest) = self.fetch_manifest(&key).await? else {
            return Ok(None);
        };
        let expected = manifest_key(&manifest.identity);
        if expected != key {
            return Err(LayerError::ManifestKey {
                key,
                found: manifest.identity,
                expected,
            });
        }
        Ok(Some(manifest))
    }

    /// Makes the version `which` selects current again, under a new seq higher than the
    /// current one: the manifest still only moves forward, and the replaced current heads the
    /// history (so a second rollback can undo the first).
    ///
    /// Only the store moves: a node still holding the newer upper dir (a running container,
    /// or one queued for upload) makes it current again with its next sync. Restore the
    /// version into the upper dir to roll the files back too.
    pub async fn rollback(
        &self,
        id: &ContainerLayerId,
        which: VersionSelector,
    ) -> Result<RollbackOutcome> {
        let lock = self.identity_lock(id);
        let _guard = lock.lock().await;
        let _file_lock = self.file_lock(id, true).await?;
        let ticket = self.next_seq(id).await?;
        let keep = self.inner.config.history_keep;
        for _ in 0..MANIFEST_ATTEMPTS {
            let Some((manifest, etag)) = self.read_manifest_versioned(id).await? else {
                return Err(LayerError::NoManifest { id: id.clone() });
            };
            let Some(chosen) = manifest.select(which).cloned() else {
                return Err(LayerError::no_such_version(&manifest, which));
            };
            if chosen.seq == manifest.current.seq {
                return Ok(RollbackOutcome {
                    identity: id.clone(),
                    current: chosen.clone(),
                    chosen,
                    moved: false,
                });
            }
            // Never point the manifest at content that is gone.
            let key = blob_key(&chosen.digest);
            if !self.inner.store.exists(&key).await.map_err(store(&key))? {
                return Err(LayerError::MissingBlob {
                    id: id.clone(),
                    key,
                    seq: chosen.seq,
                });
            }
            let seq = ticket.max(manifest.current.seq + 1);
            let next = manifest.rolled_back(&chosen, seq, keep);
            if self.put_manifest(&next, replacing(etag)).await? {
                tracing::info!(%id, from_seq = chosen.seq, seq, digest = %chosen.digest, "rolled back");
                return Ok(RollbackOutcome {
                    identity: id.clone(),
                    chosen,
                    current: next.current,
                    moved: true,
                });
            }
        }
        Err(LayerError::ManifestContention {
            key: manifest_key(id),
            attempts: MANIFEST_ATTEMPTS,
        })
    }

    /// Drops `id`: its staged interrupted syncs, its manifest and this node's sync record. The
    /// blobs are left to `gc`, which deletes them once unreferenced and older than
    /// `gc_grace_secs`. A manifest that does not parse is deleted all the same.
    ///
    /// Callers check first that nothing on the node still uses the identity: a later sync of
    /// it creates a new manifest.
    pub async fn forget(&self, id: &ContainerLayerId) -> Result<Forgotten> {
        let lock = self.identity_lock(id);
        let _guard = lock.lock().await;
        let _file_lock = self.file_lock(id, true).await?;

        // Intents first: one left behind would publish the manifest again at the next resume.
        let inner = Arc::clone(&self.inner);
        let owner = id.clone();
        let intents_dropped = blocking(move || -> Result<u32> {
            let mut dropped = 0;
            for (intent, _) in inner.staging.pending()? {
                if intent.identity == owner {
                    inner.staging.finish(&owner, &intent.snapshot.digest)?;
                    dropped += 1;
                }
            }
            Ok(dropped)
        })
        .await??;

        let key = manifest_key(id);
        let data = self
            .inner
            .store
            .get_bytes(&key)
            .await
            .map_err(store(&key))?;
        let current = data.as_deref().and_then(|d| match parse_manifest(&key, d) {
            Ok(m) => Some(m.current),
            Err(e) => {
                tracing::warn!(%id, error = %e, "deleting an unreadable manifest");
                None
            }
        });
        if data.is_some() {
            self.inner.store.delete(&key).await.map_err(store(&key))?;
        }
        let local_record_removed = self
            .inner
            .db
            .remove_sync_state(id)
            .await
            .map_err(|source| LayerError::State {
                id: id.clone(),
                source: Box::new(source),
            })?;
        tracing::info!(%id, manifest_deleted = data.is_some(), local_record_removed, intents_dropped, "identity forgotten");
        Ok(Forgotten {
            identity: id.clone(),
            manifest_deleted: data.is_some(),
            current,
            local_record_removed,
            intents_dropped,
        })
    }
}
