//! Syncing an upper dir: [`LayerSyncManager::sync_layer`] and its variants.
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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::error::{LayerError, Result, store};
use super::manager::{
    LayerSyncManager, TAR_FORMAT, TAR_FORMAT_VERSION, accumulate, blocking, replacing,
    zstd_library_version,
};
use super::manifest::{
    Advance, ArchiveFormat, ChainLink, LayerManifest, LayerMeta, ManifestEntry, blob_key,
    manifest_key, meta_key, overlay_parameters,
};
use super::options::{
    LayerProgress, Phase, ProgressEvent, SyncOptions, SyncOutcome, UploadSummary,
};
use super::spool::{Intent, remove_if_exists};
use super::stream::{SpoolWatcher, Streaming, UploadGate};
use super::types::{ContainerLayerId, LayerSnapshot};
use crate::archive::{self, PackOptions};
use crate::store::{self as objstore, PutCondition};

/// Attempts at a conditional manifest update before giving up.
pub(super) const MANIFEST_ATTEMPTS: u32 = 8;
const OVERLAY_PARAMETERS: &str = "/sys/module/overlay/parameters";

impl LayerSyncManager {
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
        let plan = self.delta_plan(id, manifest.as_ref(), 1).await;
        let (prev, chain) = match plan {
            Some((index, chain)) => (Some(index), chain),
            None => (None, Vec::new()),
        };
        let (packed, captured, stream) = self
            .pack(id, upper, opts.progress.clone(), prev, false)
            .await?;
        let stats = &captured.stats;
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
            && (m.current.digest == snapshot.digest || captured.delta == Some((0, 0)))
        {
            tracing::debug!(%id, digest = %snapshot.digest, "content unchanged");
            if let Some(st) = stream {
                st.upload.abort().await;
            }
            remove_if_exists(&packed)?;
            // An empty delta has a digest of its own: what is unchanged is the current version.
            self.record_fingerprint(id, &fingerprint, &m.current.digest)
                .await?;
            self.save_index(id, captured.index, &m.current.digest).await;
            return Ok(unchanged(id, &m.current));
        }

        let intent = Intent {
            identity: id.clone(),
            format: self.format(stats),
            snapshot,
            fingerprint: Some(fingerprint),
            seq: opts.seq,
            ticket,
            base: opts.base,
            started_at,
            chain: if captured.delta.is_some() {
                chain
            } else {
                Vec::new()
            },
            fresh_links: Vec::new(),
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
        let outcome = self
            .publish(&intent, &spool, opts.progress, false, stream)
            .await?;
        if outcome.manifest_moved {
            self.save_index(id, captured.index, &intent.snapshot.digest)
                .await;
        }
        Ok(outcome)
    }

    /// Whether the next version of `id` can be a delta, and on what: this node's index must
    /// describe the manifest's current version exactly, and the chain must stay within
    /// `delta_chain_max` deltas (after adding `room` more) adding up to less than
    /// `delta_max_percent` of its base.
    pub(super) async fn delta_plan(
        &self,
        id: &ContainerLayerId,
        manifest: Option<&LayerManifest>,
        room: usize,
    ) -> Option<(archive::TreeIndex, Vec<ChainLink>)> {
        let cfg = &self.inner.config;
        let current = &manifest?.current;
        if current.chain.len() + room > cfg.delta_chain_max {
            return None;
        }
        let this = ChainLink {
            digest: current.digest.clone(),
            compressed_size_bytes: current.compressed_size_bytes,
            size_bytes: current.size_bytes,
        };
        let mut chain = current.chain.clone();
        chain.push(this);
        let base = chain[0].compressed_size_bytes.max(1);
        let deltas: u64 = chain[1..].iter().map(|l| l.compressed_size_bytes).sum();
        if u128::from(deltas) * 100 >= u128::from(base) * u128::from(cfg.delta_max_percent) {
            return None;
        }
        let path = self.inner.staging.index_path(id);
        let loaded = blocking(move || archive::TreeIndex::load(&path)).await;
        match loaded {
            Ok(Ok(Some(index))) if index.version == current.digest => Some((index, chain)),
            Ok(Ok(_)) => None,
            Ok(Err(e)) => {
                tracing::warn!(%id, error = %e, "layer index unusable; this sync uploads a full layer");
                None
            }
            Err(e) => {
                tracing::warn!(%id, error = %e, "layer index unreadable; this sync uploads a full layer");
                None
            }
        }
    }

    /// Keeps `index` as the description of `id`'s version `digest` (the base of the next
    /// delta). A failure only costs the next sync a full upload.
    pub(super) async fn save_index(
        &self,
        id: &ContainerLayerId,
        mut index: archive::TreeIndex,
        digest: &str,
    ) {
        index.version = digest.to_string();
        let path = self.inner.staging.index_path(id);
        match blocking(move || index.save(&path)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(%id, error = %e, "cannot keep the layer index; the next sync uploads a full layer")
            }
            Err(e) => {
                tracing::warn!(%id, error = %e, "cannot keep the layer index; the next sync uploads a full layer")
            }
        }
    }

    /// Packs `upper` into a temp spool, streaming it to the store as it grows where the
    /// backend supports that.
    pub(super) async fn pack(
        &self,
        id: &ContainerLayerId,
        upper: &Path,
        progress: Option<LayerProgress>,
        prev: Option<archive::TreeIndex>,
        live: bool,
    ) -> Result<(PathBuf, archive::Captured, Option<Streaming>)> {
        let spool = self.inner.staging.temp_path("pack");
        let opts = PackOptions {
            level: self.inner.config.compression_level,
            workers: self.inner.config.compression_workers,
            live,
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
            let capture = prev
                .as_ref()
                .map_or(archive::Capture::Full, archive::Capture::Delta);
            let res =
                archive::pack_capture(&upper2, &spool2, &opts, cb_ref, Some(&watcher), capture);
            if let Ok(c) = &res {
                watcher.complete(c.stats.compressed_size);
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
            Ok(captured) => {
                let stats = &captured.stats;
                for socket in &stats.skipped_sockets {
                    tracing::warn!(%id, socket = %socket.display(), "socket not archived");
                }
                tracing::debug!(%id, digest = %stats.digest, compressed = stats.compressed_size,
                    delta = ?captured.delta, streaming = stream.is_some(), "packed");
                Ok((spool, captured, stream))
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

    pub(super) fn format(&self, stats: &archive::PackStats) -> ArchiveFormat {
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
    pub(super) async fn publish(
        &self,
        intent: &Intent,
        spool: &Path,
        progress: Option<LayerProgress>,
        resumed: bool,
        stream: Option<Streaming>,
    ) -> Result<SyncOutcome> {
        let id = &intent.identity;
        let digest = &intent.snapshot.digest;
        let (upload, meta_bytes) = self
            .upload_archive(
                id,
                &intent.snapshot,
                &intent.format,
                spool,
                progress,
                stream,
            )
            .await?;
        let (seq, moved) = self.advance_manifest(intent, resumed).await?;
        if moved && upload.already_existed {
            self.ensure_stored(id, digest, spool, meta_bytes).await?;
        }
        let local_state = async {
            self.put_state(id, digest, digest).await?;
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

    /// Uploads a packed archive (finishing `stream` if packing started one) and its metadata
    /// object; nothing references it until a manifest does. Returns the metadata bytes.
    pub(super) async fn upload_archive(
        &self,
        id: &ContainerLayerId,
        snapshot: &LayerSnapshot,
        format: &ArchiveFormat,
        spool: &Path,
        progress: Option<LayerProgress>,
        stream: Option<Streaming>,
    ) -> Result<(UploadSummary, Vec<u8>)> {
        let key = blob_key(&snapshot.digest);
        let total = snapshot.compressed_size_bytes;
        let meta = LayerMeta {
            identity: id.clone(),
            snapshot: snapshot.clone(),
            format: format.clone(),
        };
        let meta_bytes =
            serde_json::to_vec_pretty(&meta).map_err(|source| LayerError::Serialize {
                what: "layer metadata",
                source,
            })?;
        let mkey = meta_key(&snapshot.digest);
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
        // Rewritten on every publish, also when the blob was already stored: its fresh
        // last-modified time is what keeps `gc` (see `collect`) off a blob about to be referenced.
        let meta_put = async {
            self.inner
                .store
                .put_bytes(&mkey, meta_bytes.clone(), PutCondition::None)
                .await
                .map_err(store(&mkey))
        };
        let (report, _) = tokio::try_join!(uploaded, meta_put)?;
        if !report.already_existed {
            crate::metrics::uploaded(total);
        }
        let upload = UploadSummary {
            parts_total: report.parts_total,
            parts_sent: report.parts_sent,
            parts_reused: report.parts_reused,
            already_existed: report.already_existed,
        };
        Ok((upload, meta_bytes))
    }

    /// Re-uploads the blob (and metadata) of a manifest that just moved to them if they are gone.
    ///
    /// A blob found already stored may be an old version's content that `gc` judged
    /// unreferenced. `gc` spares a blob whose metadata was written within the grace period,
    /// and this publish has just rewritten it, so only a `gc` that checked the metadata before
    /// that write and deletes after it can hit the blob; checking once the manifest points at
    /// it catches every such delete that lands before this check, with the spool still here.
    async fn ensure_stored(
        &self,
        id: &ContainerLayerId,
        digest: &str,
        spool: &Path,
        meta_bytes: Vec<u8>,
    ) -> Result<()> {
        let (key, mkey) = (blob_key(digest), meta_key(digest));
        let store_ = &self.inner.store;
        if !store_.exists(&key).await.map_err(store(&key))? {
            tracing::warn!(%id, %digest, "blob deleted (by a concurrent gc) after the manifest moved to it; uploading it again");
            store_
                .upload_file(&key, spool, &self.inner.db, None)
                .await
                .map_err(store(&key))?;
        }
        if !store_.exists(&mkey).await.map_err(store(&mkey))? {
            store_
                .put_bytes(&mkey, meta_bytes, PutCondition::None)
                .await
                .map_err(store(&mkey))?;
        }
        Ok(())
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
                rolled_back_from: None,
                chain: intent.chain.clone(),
            };
            let (next, condition) = match current {
                None => (
                    LayerManifest::new(id.clone(), entry),
                    PutCondition::IfNoneMatch,
                ),
                Some((m, etag)) => match m.advance(entry, self.inner.config.history_keep) {
                    Advance::Stale { current_seq } => {
                        tracing::info!(%id, seq, current_seq, "older sync: blob kept, manifest not moved");
                        return Ok((seq, false));
                    }
                    Advance::Moved(next) => (*next, replacing(etag)),
                },
            };
            if self.put_manifest(&next, condition).await? {
                return Ok((seq, true));
            }
        }
        Err(LayerError::ManifestContention {
            key,
            attempts: MANIFEST_ATTEMPTS,
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

/// What a sync learned before packing.
struct Fresh {
    fingerprint: String,
    manifest: Option<LayerManifest>,
    ticket: u64,
    started_at: DateTime<Utc>,
}
