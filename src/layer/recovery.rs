//! After a crash: finishing interrupted syncs from their staged spools and intents
//! ([`LayerSyncManager::resume_pending`]), and garbage collection ([`LayerSyncManager::gc`];
//! its store side is in `collect`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::error::{Result, store};
use super::manager::{LayerSyncManager, blocking};
use super::options::{GcOptions, GcReport};
use super::spool::{Intent, Staging};
use super::types::ContainerLayerId;

/// Temp spools older than this are swept by `gc`.
const TEMP_SPOOL_AGE: Duration = Duration::from_secs(24 * 3600);

impl LayerSyncManager {
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
            if !self.fresh_links_kept(&intent).await? {
                let inner = Arc::clone(&self.inner);
                let (id, digest) = (intent.identity.clone(), intent.snapshot.digest.clone());
                blocking(move || inner.staging.finish(&id, &digest)).await??;
                continue;
            }
            tracing::info!(id = %intent.identity, digest = %intent.snapshot.digest, "finishing interrupted sync");
            self.publish(&intent, &spool, None, true, None).await?;
            done += 1;
        }
        Ok(done)
    }

    /// [`Self::gc_with`] with default options.
    pub async fn gc(&self) -> Result<GcReport> {
        self.gc_with(GcOptions::default()).await
    }

    /// Finishes interrupted syncs, aborts stale multipart uploads, sweeps abandoned spools,
    /// then collects the store: manifests over `history_keep` versions are trimmed and layer
    /// objects no manifest references are deleted once older than `gc_grace_secs`. Fails
    /// without deleting anything when any manifest cannot be read. A dry run only reports
    /// what the collection would trim and delete.
    pub async fn gc_with(&self, opts: GcOptions) -> Result<GcReport> {
        let mut report = GcReport {
            dry_run: opts.dry_run,
            ..GcReport::default()
        };
        if !opts.dry_run {
            report.resumed = self.resume_pending().await?;
            let age = Duration::from_secs(self.inner.config.abort_stale_uploads_after_secs);
            report.aborted_uploads = self
                .inner
                .store
                .abort_stale_uploads(age, &self.inner.db)
                .await
                .map_err(store(""))?;
            let inner = Arc::clone(&self.inner);
            report.spools_removed = blocking(move || inner.staging.sweep(TEMP_SPOOL_AGE)).await??;
        }
        self.collect(opts.dry_run, &mut report).await?;
        Ok(report)
    }

    /// A packed, unpublished archive of `id` whose tree had `fingerprint`.
    pub(super) async fn interrupted(
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
    pub(super) async fn intact_or_dropped(&self, intent: &Intent, spool: &Path) -> Result<bool> {
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
}
