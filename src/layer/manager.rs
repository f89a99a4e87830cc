//! [`LayerSyncManager`]: one handle per node on the object store, the state database and the
//! staging dir, with per-identity locks. The work is split by concern: syncing an upper dir
//! (`sync`), restoring one (`restore`), and finishing what a crash interrupted plus garbage
//! collection (`recovery`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};

use chrono::Utc;

use super::error::{LayerError, Result, store};
use super::journal::StateDb;
use super::manifest::{LayerManifest, MANIFEST_VERSION, manifest_key};
use super::options::{LayerProgress, Phase, ProgressEvent};
use super::spool::{IdentityLock, Staging};
use super::types::{ContainerLayerId, SyncState};
use crate::config::LayerStorageConfig;
use crate::store::{self as objstore, ObjectStore, PutCondition, PutOutcome};

/// Name of the archive format written by [`crate::archive`], recorded in every blob's metadata.
pub const TAR_FORMAT: &str = "pax-oci-layer";
/// Version of that format.
pub const TAR_FORMAT_VERSION: u32 = 1;

/// Version of the zstd library linked in.
#[must_use]
pub fn zstd_library_version() -> &'static str {
    zstd::zstd_safe::version_string()
}

/// Syncs and restores container upper layers. Cheap to clone; clones share state and locks.
#[derive(Clone)]
pub struct LayerSyncManager {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) config: LayerStorageConfig,
    pub(super) store: Arc<dyn ObjectStore>,
    pub(super) db: StateDb,
    pub(super) staging: Staging,
    locks: StdMutex<HashMap<ContainerLayerId, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for LayerSyncManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerSyncManager")
            .field("store", &self.inner.store.describe())
            .field("state_db", &self.inner.config.state_db_path)
            .field("staging_dir", &self.inner.config.staging_dir)
            .finish_non_exhaustive()
    }
}

impl LayerSyncManager {
    /// Opens the configured store and the state database.
    pub async fn new(config: LayerStorageConfig) -> Result<Self> {
        config
            .validate()
            .map_err(|e| LayerError::Config(Box::new(e)))?;
        let store = objstore::open_store(&config)
            .await
            .map_err(|e| LayerError::OpenStore(Box::new(e)))?;
        Self::with_store(config, store).await
    }

    /// Uses `store` instead of opening the configured one (tests, shared clients).
    pub async fn with_store(
        config: LayerStorageConfig,
        store: Arc<dyn ObjectStore>,
    ) -> Result<Self> {
        config
            .validate()
            .map_err(|e| LayerError::Config(Box::new(e)))?;
        let db = StateDb::open_async(&config.state_db_path)
            .await
            .map_err(|source| LayerError::OpenState {
                path: config.state_db_path.clone(),
                source: Box::new(source),
            })?;
        let root = config.staging_dir.clone();
        let staging = blocking(move || Staging::open(&root)).await??;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                store,
                db,
                staging,
                locks: StdMutex::new(HashMap::new()),
            }),
        })
    }

    /// The object store in use.
    #[must_use]
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner.store
    }

    /// A new ordering ticket for `id`, higher than every earlier one from this node.
    pub async fn next_seq(&self, id: &ContainerLayerId) -> Result<u64> {
        self.inner
            .db
            .next_seq(id)
            .await
            .map_err(|source| LayerError::State {
                id: id.clone(),
                source: Box::new(source),
            })
    }

    /// The manifest of `id`, if the store has one.
    pub async fn manifest(&self, id: &ContainerLayerId) -> Result<Option<LayerManifest>> {
        self.read_manifest(id).await
    }

    /// Sync state of every identity known to this node's state DB.
    pub async fn status(&self) -> Result<Vec<SyncState>> {
        self.inner
            .db
            .list_sync_states()
            .await
            .map_err(|e| LayerError::StateGlobal(Box::new(e)))
    }

    pub(super) async fn file_lock(
        &self,
        id: &ContainerLayerId,
        wait: bool,
    ) -> Result<Option<IdentityLock>> {
        let inner = Arc::clone(&self.inner);
        let id = id.clone();
        blocking(move || inner.staging.lock_identity(&id, wait)).await?
    }

    pub(super) fn identity_lock(&self, id: &ContainerLayerId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = match self.inner.locks.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Forget locks nobody holds or waits for, so the map does not grow without bound.
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        Arc::clone(locks.entry(id.clone()).or_default())
    }

    /// Reads a manifest.
    pub(super) async fn read_manifest(
        &self,
        id: &ContainerLayerId,
    ) -> Result<Option<LayerManifest>> {
        let key = manifest_key(id);
        let Some(manifest) = self.fetch_manifest(&key).await? else {
            return Ok(None);
        };
        if &manifest.identity != id {
            return Err(LayerError::ManifestIdentity {
                key,
                id: id.clone(),
                found: manifest.identity,
            });
        }
        Ok(Some(manifest))
    }

    /// The manifest stored at `key`, parsed; `None` when there is none.
    pub(super) async fn fetch_manifest(&self, key: &str) -> Result<Option<LayerManifest>> {
        match self.inner.store.get_bytes(key).await.map_err(store(key))? {
            Some(data) => parse_manifest(key, &data).map(Some),
            None => Ok(None),
        }
    }

    /// Writes `manifest` under `cond`; false when the condition failed (a concurrent writer).
    pub(super) async fn put_manifest(
        &self,
        manifest: &LayerManifest,
        cond: PutCondition,
    ) -> Result<bool> {
        let key = manifest_key(&manifest.identity);
        let body = serde_json::to_vec_pretty(manifest).map_err(|source| LayerError::Serialize {
            what: "layer manifest",
            source,
        })?;
        match self
            .inner
            .store
            .put_bytes(&key, body, cond)
            .await
            .map_err(store(&key))?
        {
            PutOutcome::Written { .. } => Ok(true),
            PutOutcome::PreconditionFailed => {
                tracing::debug!(id = %manifest.identity, "manifest changed concurrently");
                Ok(false)
            }
        }
    }

    /// Reads a manifest and an ETag no newer than the content read: HEAD first, so a change in
    /// between makes the conditional write fail and retry rather than overwrite blindly.
    pub(super) async fn read_manifest_versioned(
        &self,
        id: &ContainerLayerId,
    ) -> Result<Option<(LayerManifest, Option<String>)>> {
        let key = manifest_key(id);
        let Some(info) = self.inner.store.head(&key).await.map_err(store(&key))? else {
            return Ok(None);
        };
        Ok(self.read_manifest(id).await?.map(|m| (m, info.etag)))
    }

    pub(super) async fn record_fingerprint(
        &self,
        id: &ContainerLayerId,
        fingerprint: &str,
        digest: &str,
    ) -> Result<()> {
        self.inner
            .db
            .record_fingerprint(id, fingerprint, digest)
            .await
            .map_err(|source| LayerError::State {
                id: id.clone(),
                source: Box::new(source),
            })
    }

    /// Records that this node holds `local` of `id` and the store's current is `remote`.
    pub(super) async fn put_state(
        &self,
        id: &ContainerLayerId,
        local: &str,
        remote: &str,
    ) -> Result<()> {
        let state = SyncState {
            container_id: id.clone(),
            local_digest: Some(local.to_string()),
            remote_digest: Some(remote.to_string()),
            last_sync: Some(Utc::now()),
            pending_upload: None,
        };
        self.inner
            .db
            .put_sync_state(&state)
            .await
            .map_err(|source| LayerError::State {
                id: id.clone(),
                source: Box::new(source),
            })
    }
}

/// Parses the manifest stored at `key`.
pub(super) fn parse_manifest(key: &str, data: &[u8]) -> Result<LayerManifest> {
    let m: LayerManifest =
        serde_json::from_slice(data).map_err(|source| LayerError::BadManifest {
            key: key.to_string(),
            source,
        })?;
    // A newer format may hold what this version would misread (a delta taken for a whole
    // layer): refuse it rather than restore or rewrite it wrongly.
    if m.version > MANIFEST_VERSION {
        return Err(LayerError::ManifestTooNew {
            key: key.to_string(),
            found: m.version,
            supported: MANIFEST_VERSION,
        });
    }
    Ok(m)
}

/// The condition under which a manifest read with `etag` may be replaced.
pub(super) fn replacing(etag: Option<String>) -> PutCondition {
    etag.map_or(PutCondition::None, PutCondition::IfMatch)
}

/// Turns the store's per-call byte deltas into running totals for one phase.
pub(super) fn accumulate(p: LayerProgress, phase: Phase, total: Option<u64>) -> objstore::Progress {
    let done = std::sync::atomic::AtomicU64::new(0);
    Arc::new(move |delta: u64| {
        let now = done.fetch_add(delta, std::sync::atomic::Ordering::Relaxed) + delta;
        p(ProgressEvent {
            phase,
            done: now,
            total,
        });
    })
}

/// Runs blocking work (filesystem, tar, zstd) off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(LayerError::Join)
}
