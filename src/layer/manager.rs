//! [`LayerSyncManager`]: sync an upper dir to the store and restore it, per identity.
//!
//! Order of durable steps in a sync: pack to a spool → commit spool + intent in the staging dir →
//! upload the blob → metadata → manifest (forward only) → sync state and fingerprint → delete
//! spool and intent. A crash at any point leaves enough behind for
//! [`LayerSyncManager::resume_pending`] to finish without repacking.
//!
//! Where the store supports it, the upload starts while packing (finished parts go up under a
//! temporary key and are copied to the digest key once packing ends; see
//! [`crate::store::StreamedUpload`]). That temporary upload is not journaled: a crash falls back
//! to the journaled upload of the committed spool (state DB), which resumes part by part.
//! A restore extracts into a staging dir while the download (parallel ranged GETs) fills the
//! spool, and swaps the tree in only after the digest of the whole archive matched.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::error::{LayerError, Result, store};
use super::manifest::{
    Advance, ArchiveFormat, LayerManifest, LayerMeta, ManifestEntry, blob_key, manifest_key,
    meta_key, overlay_parameters,
};
use super::options::{
    GcReport, LayerProgress, Phase, ProgressEvent, RestoreOptions, SyncOptions, SyncOutcome,
    UploadSummary,
};
use super::spool::{IdentityLock, Intent, Staging, remove_if_exists};
use super::stream::{RestoreJob, SpoolWatcher, Streaming, UploadGate, download_and_unpack};
use super::types::{ContainerLayerId, LayerSnapshot, SyncState};
use crate::archive::{self, PackOptions, UnpackOptions};
use crate::config::LayerStorageConfig;
use super::journal::StateDb;
use crate::store::{self as objstore, ObjectStore, PutCondition, PutOutcome};

/// Name of the archive format written by [`crate::archive`], recorded in every blob's metadata.
pub const TAR_FORMAT: &str = "pax-oci-layer";
/// Version of that format.
pub const TAR_FORMAT_VERSION: u32 = 1;
/// Attempts at a conditional manifest update before giving up.
const MANIFEST_ATTEMPTS: u32 = 8;
/// Temp spools older than this are swept by `gc`.
const TEMP_SPOOL_AGE: Duration = Duration::from_secs(24 * 3600);
const OVERLAY_PARAMETERS: &str = "/sys/module/overlay/parameters";

/// Version of the zstd library linked in.
#[must_use]
pub fn zstd_library_version() -> &'static str {
    zstd::zstd_safe::version_string()
}

/// Syncs and restores container upper layers. Cheap to clone; clones share state and locks.
#[derive(Clone)]
pub struct LayerSyncManager {
    inner: Arc<Inner>,
}

struct Inner {
    config: LayerStorageConfig,
    store: Arc<dyn ObjectStore>,
    db: StateDb,
    staging: Staging,
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

    /// Archives `upper` and makes it `id`'s current layer.
    pub async fn sync_layer(
        &self,
        id: &ContainerLayerId,
        upper: impl AsRef<Path>,
    ) -> Result<LayerSnapshot> {
        self.sync_layer_with(id, upper, SyncOptions::default())
            .await
    }

    /// [`Self::sync_layer`] with a base chain, an ordering ticket and progress reporting.
    pub async fn sync_layer_with(
        &self,
        id: &ContainerLayerId,
        upper: impl AsRef<Path>,
        opts: SyncOptions,
    ) -> Result<LayerSnapshot> {
        Ok(self.sync_layer_detailed(id, upper, opts).await?.snapshot)
    }

    /// [`Self::sync_layer_with`], also reporting the upload and whether the manifest moved.
    pub async fn sync_layer_detailed(
        &self,
        id: &ContainerLayerId,
        upper: impl AsRef<Path>,
        opts: SyncOptions,
    ) -> Result<SyncOutcome> {
        let upper = upper.as_ref().to_path_buf();
        let lock = self.identity_lock(id);
        let _guard = lock.lock().await;
        let _file_lock = self.file_lock(id, true).await?;
        let started_at = Utc::now();

        // The metadata walk, the manifest GET and the state read are independent: overlap them.
        let fp_path = upper.clone();
        let (fingerprint, manifest, record) = tokio::join!(
            blocking(move || archive::fingerprint(&fp_path)),
            self.read_manifest(id),
            self.inner.db.get_sync_record(id),
        );
        let fingerprint = fingerprint?.map_err(|source| LayerError::Fingerprint {
            id: id.clone(),
            path: upper.clone(),
            source: Box::new(source),
        })?;
        let manifest = manifest?;
        let record = record.map_err(|source| LayerError::State {
            id: id.clone(),
            source: Box::new(source),
        })?;
        if let (Some(m), Some(rec)) = (&manifest, &record)
            && rec.fingerprint.as_deref() == Some(fingerprint.as_str())
            && rec.fingerprint_digest.as_deref() == Some(m.current.digest.as_str())
        {
            tracing::debug!(%id, digest = %m.current.digest, "fingerprint unchanged");
            return Ok(unchanged(id, &m.current));
        }

        let ticket = match opts.seq {
            Some(s) => s,
            None => self.next_seq(id).await?,
        };
        if let Some((mut intent, spool)) = self.interrupted(id, &fingerprint).await? {
            // Same tree as a sync that was interrupted after packing: finish that archive.
            tracing::info!(%id, digest = %intent.snapshot.digest, "resuming interrupted sync of an unchanged tree");
            intent.seq = opts.seq;
            intent.ticket = ticket;
            intent.base = opts.base;
            intent.started_at = started_at;
            let inner = Arc::clone(&self.inner);
            let staged = intent.clone();
            blocking(move || inner.staging.rewrite_intent(&staged)).await??;
            return self
                .publish(&intent, &spool, opts.progress, false, None)
                .await;
        }
        // The manifest write at the end may need to know whether the store enforces conditional
        // writes; probing now, while packing, keeps those requests off the tail.
        // Awaited before returning so a short-lived process never cuts it between its writes.
        let store = Arc::clone(&self.inner.store);
        let probe = tokio::spawn(async move {
            if let Err(e) = store.conditional_writes().await {
                tracing::debug!(error = %e, "early conditional-write probe failed; retried when needed");
            }
        });
        let fresh = Fresh {
            fingerprint,
            manifest,
            ticket,
            started_at,
        };
        let result = self.pack_and_publish(id, &upper, opts, fresh).await;
        let _ = probe.await;
        result
    }

    /// The part of a sync after the unchanged checks: pack, compare, stage, publish.
    async fn pack_and_publish(
        &self,
        id: &ContainerLayerId,
        upper: &Path,
        opts: SyncOptions,
        fresh: Fresh,
    ) -> Result<SyncOutcome> {
        let Fresh {
            fingerprint,
            manifest,
            ticket,
            started_at,
        } = fresh;
        let (packed, stats, stream) = self.pack(id, upper, opts.progress.clone()).await?;
        let snapshot = LayerSnapshot {
            digest: stats.digest.clone(),
            size_bytes: stats.uncompressed_size,
            compressed_size_bytes: stats.compressed_size,
            created_at: started_at,
            file_count: stats.entries,
            uncompressed_digest: stats.uncompressed_digest.clone(),
            unchanged: false,
        };
        if let Some(m) = &manifest
            && m.current.digest == snapshot.digest
        {
            tracing::debug!(%id, digest = %snapshot.digest, "content unchanged");
            if let Some(st) = stream {
                st.upload.abort().await;
            }
            remove_if_exists(&packed)?;
            self.record_fingerprint(id, &fingerprint, &snapshot.digest)
                .await?;
            return Ok(unchanged(id, &m.current));
        }

        let intent = Intent {
            identity: id.clone(),
            format: self.format(&stats),
            snapshot,
            fingerprint: Some(fingerprint),
            seq: opts.seq,
            ticket,
            base: opts.base,
            started_at,
        };
        let staging_intent = intent.clone();
        let inner = Arc::clone(&self.inner);
        let committed = blocking(move || inner.staging.commit(&packed, &staging_intent)).await;
        let spool = match committed {
            Ok(Ok(spool)) => spool,
            Ok(Err(e)) | Err(e) => {
                if let Some(st) = stream {
                    st.upload.abort().await;
                }
                return Err(e);
            }
        };
        self.publish(&intent, &spool, opts.progress, false, stream)
            .await
    }

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
        let target = target.as_ref().to_path_buf();
        let lock = self.identity_lock(id);
        let _guard = lock.lock().await;
        let Some(manifest) = self.read_manifest(id).await? else {
            return Ok(None);
        };
        let entry = manifest.current;
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
        self.put_state(id, &entry.digest).await?;
        tracing::info!(%id, digest = %entry.digest, target = %target.display(), "layer restored");
        Ok(Some(entry.snapshot(false)))
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

    /// Finishes syncs a crash interrupted (upload, metadata, manifest); returns how many.
    pub async fn resume_pending(&self) -> Result<u32> {
        // Streams cut short by a crash are never finished: their spools go the journaled way.
        match self.inner.store.abort_orphaned_streams().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "cleaned up streamed uploads of a previous run"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot clean up streamed uploads of a previous run")
            }
        }
        let inner = Arc::clone(&self.inner);
        let pending = blocking(move || inner.staging.pending()).await??;
        let mut done = 0;
        for (intent, spool) in pending {
            let lock = self.identity_lock(&intent.identity);
            let _guard = lock.lock().await;
            let Some(_file_lock) = self.file_lock(&intent.identity, false).await? else {
                tracing::debug!(id = %intent.identity, "identity busy in another process; not resuming");
                continue;
            };
            // Listed before the lock was taken: another process may have finished it since.
            if !self
                .inner
                .staging
                .has_intent(&intent.identity, &intent.snapshot.digest)
            {
                continue;
            }
            if !self.intact_or_dropped(&intent, &spool).await? {
                continue;
            }
            tracing::info!(id = %intent.identity, digest = %intent.snapshot.digest, "finishing interrupted sync");
            self.publish(&intent, &spool, None, true, None).await?;
            done += 1;
        }
        Ok(done)
    }

    /// Aborts stale multipart uploads, finishes interrupted syncs, sweeps abandoned spools.
    pub async fn gc(&self) -> Result<GcReport> {
        let resumed = self.resume_pending().await?;
        let age = Duration::from_secs(self.inner.config.abort_stale_uploads_after_secs);
        let aborted = self
            .inner
            .store
            .abort_stale_uploads(age, &self.inner.db)
            .await
            .map_err(store(""))?;
        let inner = Arc::clone(&self.inner);
        let spools_removed = blocking(move || inner.staging.sweep(TEMP_SPOOL_AGE)).await??;
        Ok(GcReport {
            aborted_uploads: aborted,
            resumed,
            spools_removed,
        })
    }

    /// A packed, unpublished archive of `id` whose tree had `fingerprint`.
    async fn interrupted(
        &self,
        id: &ContainerLayerId,
        fingerprint: &str,
    ) -> Result<Option<(Intent, PathBuf)>> {
        let inner = Arc::clone(&self.inner);
        let pending = blocking(move || inner.staging.pending()).await??;
        let found = pending.into_iter().rev().find(|(intent, spool)| {
            &intent.identity == id
                && intent.fingerprint.as_deref() == Some(fingerprint)
                && spool.exists()
        });
        match found {
            Some((intent, spool)) if self.intact_or_dropped(&intent, &spool).await? => {
                Ok(Some((intent, spool)))
            }
            _ => Ok(None),
        }
    }

    /// Checks an interrupted sync's archive against its intent; a missing or damaged one (a
    /// power loss before writeback) is dropped with its intent, and false returned.
    async fn intact_or_dropped(&self, intent: &Intent, spool: &Path) -> Result<bool> {
        let (checked, path) = (intent.clone(), spool.to_path_buf());
        if blocking(move || Staging::intact(&checked, &path)).await?? {
            return Ok(true);
        }
        tracing::warn!(id = %intent.identity, digest = %intent.snapshot.digest, spool = %spool.display(),
            "interrupted sync's archive is missing or damaged; dropping it (the next sync packs again)");
        let inner = Arc::clone(&self.inner);
        let (id, digest) = (intent.identity.clone(), intent.snapshot.digest.clone());
        blocking(move || inner.staging.finish(&id, &digest)).await??;
        Ok(false)
    }

    async fn file_lock(&self, id: &ContainerLayerId, wait: bool) -> Result<Option<IdentityLock>> {
        let inner = Arc::clone(&self.inner);
        let id = id.clone();
        blocking(move || inner.staging.lock_identity(&id, wait)).await?
    }

    fn identity_lock(&self, id: &ContainerLayerId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = match self.inner.locks.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Forget locks nobody holds or waits for, so the map does not grow without bound.
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        Arc::clone(locks.entry(id.clone()).or_default())
    }

    /// Packs `upper` into a temp spool, streaming it to the store as it grows where the
    /// backend supports that.
    async fn pack(
        &self,
        id: &ContainerLayerId,
        upper: &Path,
        progress: Option<LayerProgress>,
    ) -> Result<(PathBuf, archive::PackStats, Option<Streaming>)> {
        let spool = self.inner.staging.temp_path("pack");
        let opts = PackOptions {
            level: self.inner.config.compression_level,
            workers: self.inner.config.compression_workers,
        };
        let (watcher, created) = SpoolWatcher::new();
        let (upper2, spool2) = (upper.to_path_buf(), spool.clone());
        let pack_progress = progress.clone();
        let job = tokio::task::spawn_blocking(move || {
            let cb = pack_progress.map(|p| {
                move |done: u64| {
                    p(ProgressEvent {
                        phase: Phase::Pack,
                        done,
                        total: None,
                    });
                }
            });
            let cb_ref = cb.as_ref().map(|f| f as &(dyn Fn(u64) + Sync));
            let res = archive::pack_to_file_observed(&upper2, &spool2, &opts, cb_ref, &watcher);
            if let Ok(stats) = &res {
                watcher.complete(stats.compressed_size);
            }
            res
        });
        // The spool exists once `created` fires; a pack that fails before never sends it.
        let stream = match created.await {
            Ok(growing) => self.start_stream(growing, progress).await,
            Err(_) => None,
        };
        let packed = job.await.map_err(LayerError::Join)?;
        match packed {
            Ok(stats) => {
                for socket in &stats.skipped_sockets {
                    tracing::warn!(%id, socket = %socket.display(), "socket not archived");
                }
                tracing::debug!(%id, digest = %stats.digest, compressed = stats.compressed_size,
                    streaming = stream.is_some(), "packed");
                Ok((spool, stats, stream))
            }
            Err(source) => {
                if let Some(st) = stream {
                    st.upload.abort().await;
                }
                remove_if_exists(&spool)?;
                Err(LayerError::Pack {
                    id: id.clone(),
                    path: upper.to_path_buf(),
                    source: Box::new(source),
                })
            }
        }
    }

    /// A streamed upload of `growing`, or `None` where the store does not stream (or cannot
    /// start: the upload after packing then still works).
    async fn start_stream(
        &self,
        growing: objstore::GrowingFile,
        progress: Option<LayerProgress>,
    ) -> Option<Streaming> {
        let gate = progress.map(UploadGate::new);
        match self
            .inner
            .store
            .start_streamed_upload(growing, gate.as_ref().map(UploadGate::callback))
            .await
        {
            Ok(Some(upload)) => Some(Streaming { upload, gate }),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a streamed upload; uploading after packing");
                None
            }
        }
    }

    fn format(&self, stats: &archive::PackStats) -> ArchiveFormat {
        ArchiveFormat {
            tar_format: TAR_FORMAT.to_string(),
            tar_format_version: TAR_FORMAT_VERSION,
            compression: "zstd".to_string(),
            zstd_level: self.inner.config.compression_level,
            zstd_workers: self.inner.config.compression_workers,
            zstd_library_version: zstd_library_version().to_string(),
            uncompressed_digest: stats.uncompressed_digest.clone(),
            uncompressed_size: stats.uncompressed_size,
            skipped_sockets: stats.skipped_sockets.len() as u64,
            overlay_parameters: overlay_parameters(Path::new(OVERLAY_PARAMETERS)),
        }
    }

    /// Upload (finishing `stream` if packing started one), metadata, manifest, state; then drop
    /// the spool. Caller holds the identity lock.
    async fn publish(
        &self,
        intent: &Intent,
        spool: &Path,
        progress: Option<LayerProgress>,
        resumed: bool,
        stream: Option<Streaming>,
    ) -> Result<SyncOutcome> {
        let id = &intent.identity;
        let digest = &intent.snapshot.digest;
        let key = blob_key(digest);
        let total = intent.snapshot.compressed_size_bytes;
        let meta = LayerMeta {
            identity: id.clone(),
            snapshot: intent.snapshot.clone(),
            format: intent.format.clone(),
        };
        let meta_bytes =
            serde_json::to_vec_pretty(&meta).map_err(|source| LayerError::Serialize {
                what: "layer metadata",
                source,
            })?;
        let mkey = meta_key(digest);
        let uploaded = async {
            match stream {
                Some(st) => {
                    if let Some(g) = &st.gate {
                        g.open(total);
                    }
                    st.upload.finish(&key, spool, &self.inner.db).await
                }
                None => {
                    let upload_progress =
                        progress.map(|p| accumulate(p, Phase::Upload, Some(total)));
                    self.inner
                        .store
                        .upload_file(&key, spool, &self.inner.db, upload_progress)
                        .await
                }
            }
            .map_err(store(&key))
        };
        // The metadata object is only read next to the blob, and only the manifest (written
        // after both) makes the layer visible, so it can travel with the blob's last parts.
        let meta_put = async {
            self.inner
                .store
                .put_bytes(&mkey, meta_bytes, PutCondition::None)
                .await
                .map_err(store(&mkey))
        };
        let (report, _) = tokio::try_join!(uploaded, meta_put)?;
        let upload = UploadSummary {
            parts_total: report.parts_total,
            parts_sent: report.parts_sent,
            parts_reused: report.parts_reused,
            already_existed: report.already_existed,
        };

        let (seq, moved) = self.advance_manifest(intent, resumed).await?;
        let local_state = async {
            self.put_state(id, digest).await?;
            if let Some(fp) = &intent.fingerprint {
                self.record_fingerprint(id, fp, digest).await?;
            }
            Ok(())
        };
        let inner = Arc::clone(&self.inner);
        let (id2, digest2) = (id.clone(), digest.clone());
        let staging_done = async { blocking(move || inner.staging.finish(&id2, &digest2)).await? };
        tokio::try_join!(local_state, staging_done)?;
        tracing::info!(%id, %digest, seq, manifest_moved = moved, parts_sent = upload.parts_sent,
            parts_reused = upload.parts_reused, "layer synced");
        Ok(SyncOutcome {
            identity: id.clone(),
            snapshot: intent.snapshot.clone(),
            seq,
            manifest_moved: moved,
            upload: Some(upload),
        })
    }

    /// Moves the manifest to the intent's digest unless a newer sync owns it.
    async fn advance_manifest(&self, intent: &Intent, resumed: bool) -> Result<(u64, bool)> {
        let id = &intent.identity;
        let key = manifest_key(id);
        for _ in 0..MANIFEST_ATTEMPTS {
            let current = self.read_manifest_versioned(id).await?;
            let seq = match (&current, intent.seq) {
                (_, Some(explicit)) => explicit,
                (Some((m, _)), None) => {
                    // An interrupted "latest wins" sync must not undo what was published after
                    // it started.
                    if resumed && m.current.created_at > intent.started_at {
                        return Ok((intent.ticket, false));
                    }
                    intent.ticket.max(m.current.seq + 1)
                }
                (None, None) => intent.ticket,
            };
            let entry = ManifestEntry {
                digest: intent.snapshot.digest.clone(),
                compressed_size_bytes: intent.snapshot.compressed_size_bytes,
                size_bytes: intent.snapshot.size_bytes,
                uncompressed_digest: intent.snapshot.uncompressed_digest.clone(),
                file_count: intent.snapshot.file_count,
                created_at: intent.snapshot.created_at,
                seq,
                base: intent.base.clone(),
            };
            let (next, condition) = match current {
                None => (
                    LayerManifest::new(id.clone(), entry),
                    PutCondition::IfNoneMatch,
                ),
                Some((m, etag)) => match m.advance(entry) {
                    Advance::Stale { current_seq } => {
                        tracing::info!(%id, seq, current_seq, "older sync: blob kept, manifest not moved");
                        return Ok((seq, false));
                    }
                    Advance::Moved(next) => {
                        (next, etag.map_or(PutCondition::None, PutCondition::IfMatch))
                    }
                },
            };
            let body =
                serde_json::to_vec_pretty(&next).map_err(|source| LayerError::Serialize {
                    what: "layer manifest",
                    source,
                })?;
            match self
                .inner
                .store
                .put_bytes(&key, body, condition)
                .await
                .map_err(store(&key))?
            {
                PutOutcome::Written { .. } => return Ok((seq, true)),
                PutOutcome::PreconditionFailed => {
                    tracing::debug!(%id, "manifest changed concurrently; retrying");
                }
            }
        }
        Err(LayerError::ManifestContention {
            key,
            attempts: MANIFEST_ATTEMPTS,
        })
    }

    /// Reads a manifest.
    async fn read_manifest(&self, id: &ContainerLayerId) -> Result<Option<LayerManifest>> {
        let key = manifest_key(id);
        let Some(data) = self
            .inner
            .store
            .get_bytes(&key)
            .await
            .map_err(store(&key))?
        else {
            return Ok(None);
        };
        let manifest: LayerManifest =
            serde_json::from_slice(&data).map_err(|source| LayerError::BadManifest {
                key: key.clone(),
                source,
            })?;
        if &manifest.identity != id {
            return Err(LayerError::ManifestIdentity {
                key,
                id: id.clone(),
                found: manifest.identity,
            });
        }
        Ok(Some(manifest))
    }

    /// Reads a manifest and an ETag no newer than the content read: HEAD first, so a change in
    /// between makes the conditional write fail and retry rather than overwrite blindly.
    async fn read_manifest_versioned(
        &self,
        id: &ContainerLayerId,
    ) -> Result<Option<(LayerManifest, Option<String>)>> {
        let key = manifest_key(id);
        let Some(info) = self.inner.store.head(&key).await.map_err(store(&key))? else {
            return Ok(None);
        };
        Ok(self.read_manifest(id).await?.map(|m| (m, info.etag)))
    }

    async fn record_fingerprint(
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

    async fn put_state(&self, id: &ContainerLayerId, digest: &str) -> Result<()> {
        let state = SyncState {
            container_id: id.clone(),
            local_digest: Some(digest.to_string()),
            remote_digest: Some(digest.to_string()),
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

fn unchanged(id: &ContainerLayerId, current: &ManifestEntry) -> SyncOutcome {
    SyncOutcome {
        identity: id.clone(),
        snapshot: current.snapshot(true),
        seq: current.seq,
        manifest_moved: false,
        upload: None,
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
/// What a sync learned before packing.
struct Fresh {
    fingerprint: String,
    manifest: Option<LayerManifest>,
    ticket: u64,
    started_at: DateTime<Utc>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(LayerError::Join)
}
