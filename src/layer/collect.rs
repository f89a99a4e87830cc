//! Store-side garbage collection, the second half of [`LayerSyncManager::gc_with`]: manifests
//! cut to `history_keep` versions, and layer objects (`{digest}.tar.zst`, `{digest}.meta.json`)
//! that no manifest references deleted once older than `gc_grace_secs`.
//!
//! Deleting is the one irreversible thing this crate does to the store, so it is guarded:
//! - every manifest must read and parse, or nothing is deleted (fail closed);
//! - objects are listed before the manifests are read: an object written after the listing is
//!   never a candidate, and a manifest that moved to a listed blob before the reading counts;
//! - a digest is as young as the newer of its two objects; every publish rewrites the metadata
//!   object (also when the blob was already stored), so content a sync is about to reference
//!   again is young, and the metadata is HEADed once more right before the delete (what is
//!   left — a publish between that HEAD and the delete — the publish itself repairs; see
//!   `ensure_stored` in `sync`);
//! - digests this node is still uploading (journaled multipart uploads, staged intents) stay;
//! - manifests are only rewritten where the store enforces conditional writes, so a trim can
//!   never overwrite a concurrent sync's manifest; elsewhere their full history stays
//!   referenced (a sync trims them at its next advance).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{StreamExt, TryStreamExt};

use super::error::{LayerError, Result, store};
use super::manager::{LayerSyncManager, blocking, replacing};
use super::manifest::{LayerManifest, ManifestEntry, layer_object_digest, manifest_key, meta_key};
use super::options::GcReport;
use super::sync::MANIFEST_ATTEMPTS;
use super::types::ContainerLayerId;
use crate::store::{ListedObject, digest_of_key};

/// Digests deleted concurrently.
const DELETES_IN_FLIGHT: usize = 8;

/// Both objects of one digest, as listed.
type Objects = Vec<ListedObject>;

impl LayerSyncManager {
    /// Trims manifests and deletes unreferenced layer objects (only reports in a dry run).
    pub(super) async fn collect(&self, dry_run: bool, report: &mut GcReport) -> Result<()> {
        let grace = Duration::from_secs(self.inner.config.gc_grace_secs);
        let cutoff = SystemTime::now()
            .checked_sub(grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let listed = self.inner.store.list_info("").await.map_err(store(""))?;
        let mut by_digest: BTreeMap<String, Objects> = BTreeMap::new();
        for obj in listed {
            if let Some(d) = layer_object_digest(&obj.key) {
                by_digest.entry(d.to_string()).or_default().push(obj);
            }
        }

        let manifests = self.read_all_manifests().await?;
        let referenced = self.keep_versions(manifests, dry_run, report).await?;
        let pending = self.local_uploads().await?;

        let mut doomed = Vec::new();
        for (digest, objects) in by_digest {
            if referenced.contains(&digest) {
                continue;
            }
            if pending.contains(&digest) {
                report.pending_kept += 1;
            } else if objects
                .iter()
                .all(|o| o.last_modified.is_some_and(|t| t < cutoff))
            {
                doomed.push((digest, objects));
            } else {
                report.young_kept += 1;
            }
        }
        if dry_run {
            for (_, objects) in &doomed {
                for o in objects {
                    report.count_deleted(&o.key, o.size);
                }
            }
            return Ok(());
        }
        let deleted: Vec<Option<Objects>> = futures::stream::iter(doomed)
            .map(|(digest, objects)| self.delete_digest(digest, objects, cutoff))
            .buffer_unordered(DELETES_IN_FLIGHT)
            .try_collect()
            .await?;
        for objects in deleted {
            match objects {
                Some(objects) => objects
                    .iter()
                    .for_each(|o| report.count_deleted(&o.key, o.size)),
                None => report.young_kept += 1,
            }
        }
        report.deleted.sort();
        Ok(())
    }

    /// The digests the manifests keep (current and up to `history_keep - 1` earlier versions),
    /// trimming manifests that hold more where that is safe.
    async fn keep_versions(
        &self,
        manifests: Vec<LayerManifest>,
        dry_run: bool,
        report: &mut GcReport,
    ) -> Result<HashSet<String>> {
        let keep = self.inner.config.history_keep;
        let mut referenced = HashSet::new();
        let mut enforced = None;
        for m in manifests {
            let Some(trimmed) = m.trimmed(keep) else {
                referenced.extend(referenced_by(&m));
                continue;
            };
            let dropped = (m.history.len() - trimmed.history.len()) as u32;
            // Asked in a dry run too (the probe touches only a reserved object), so that it
            // reports what a real run does.
            let conditional = match enforced {
                Some(c) => c,
                None => {
                    let c = self
                        .inner
                        .store
                        .conditional_writes()
                        .await
                        .map_err(store(manifest_key(&m.identity)))?;
                    *enforced.insert(c)
                }
            };
            if !conditional {
                tracing::warn!(id = %m.identity, versions = m.versions().count(), keep,
                    "manifest keeps more versions than history_keep; not trimmed because the store does not enforce conditional writes (its next sync trims it)");
                referenced.extend(referenced_by(&m));
                report.manifests_untrimmed += 1;
                continue;
            }
            referenced.extend(referenced_by(&trimmed));
            if dry_run {
                report.manifests_trimmed += 1;
                report.versions_dropped += dropped;
                continue;
            }
            // What was written may differ from what was read (a sync moved it meanwhile).
            if let Some(written) = self.trim_manifest(&m.identity, keep).await? {
                referenced.extend(referenced_by(&written));
                report.manifests_trimmed += 1;
                report.versions_dropped += dropped;
            }
        }
        Ok(referenced)
    }

    /// Cuts `id`'s manifest to `keep` versions with a conditional write (the current version
    /// and its seq stay as they are); returns what was written, `None` when the manifest is
    /// gone or no longer needs it.
    async fn trim_manifest(
        &self,
        id: &ContainerLayerId,
        keep: usize,
    ) -> Result<Option<LayerManifest>> {
        for _ in 0..MANIFEST_ATTEMPTS {
            let Some((m, etag)) = self.read_manifest_versioned(id).await? else {
                return Ok(None);
            };
            let Some(next) = m.trimmed(keep) else {
                return Ok(None);
            };
            if self.put_manifest(&next, replacing(etag)).await? {
                tracing::info!(%id, kept = next.versions().count(), dropped = m.history.len() - next.history.len(), "manifest history trimmed");
                return Ok(Some(next));
            }
        }
        Err(LayerError::ManifestContention {
            key: manifest_key(id),
            attempts: MANIFEST_ATTEMPTS,
        })
    }

    /// Digests this node is still uploading: journaled multipart uploads and staged intents.
    async fn local_uploads(&self) -> Result<HashSet<String>> {
        let uploads = self
            .inner
            .db
            .list_pending_uploads()
            .await
            .map_err(|e| LayerError::StateGlobal(Box::new(e)))?;
        let mut digests: HashSet<String> = uploads
            .iter()
            .flat_map(|u| [u.digest.clone(), digest_of_key(&u.object_key)])
            .collect();
        let inner = Arc::clone(&self.inner);
        let staged = blocking(move || inner.staging.pending()).await??;
        digests.extend(staged.into_iter().map(|(i, _)| i.snapshot.digest));
        Ok(digests)
    }

    /// Deletes one digest's objects (blob first) unless its metadata was written since
    /// `cutoff`; returns what was deleted, `None` when it turned out young.
    async fn delete_digest(
        &self,
        digest: String,
        objects: Objects,
        cutoff: SystemTime,
    ) -> Result<Option<Objects>> {
        let mkey = meta_key(&digest);
        let meta = self.inner.store.head(&mkey).await.map_err(store(&mkey))?;
        if meta.is_some_and(|m| m.last_modified.is_none_or(|t| t >= cutoff)) {
            tracing::info!(%digest, "unreferenced layer written again since the listing; kept");
            return Ok(None);
        }
        let mut objects = objects;
        // Blob before metadata, so an interruption leaves only metadata behind.
        objects.sort_by_key(|o| o.key.ends_with(".meta.json"));
        for o in &objects {
            self.inner
                .store
                .delete(&o.key)
                .await
                .map_err(store(&o.key))?;
        }
        tracing::info!(%digest, objects = objects.len(), "unreferenced layer deleted");
        Ok(Some(objects))
    }
}

/// Every blob a kept version of `m` needs: its own and those of its delta chain.
fn referenced_by(m: &LayerManifest) -> Vec<String> {
    m.versions()
        .flat_map(ManifestEntry::archives)
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::manifest::ChainLink;

    /// `gc` must keep what a kept delta version is applied on, not only its own blob.
    #[test]
    fn a_kept_delta_keeps_its_whole_chain() {
        let entry = |digest: &str, seq: u64, chain: &[&str]| ManifestEntry {
            digest: digest.into(),
            compressed_size_bytes: 1,
            size_bytes: 1,
            uncompressed_digest: String::new(),
            file_count: 1,
            created_at: chrono::Utc::now(),
            seq,
            base: None,
            rolled_back_from: None,
            chain: chain
                .iter()
                .map(|d| ChainLink {
                    digest: (*d).into(),
                    compressed_size_bytes: 1,
                    size_bytes: 1,
                })
                .collect(),
        };
        let mut m = LayerManifest::new(
            ContainerLayerId::new("s", "i"),
            entry("d3", 3, &["b1", "d2"]),
        );
        m.history.push(entry("x0", 1, &[]));
        let mut got = referenced_by(&m);
        got.sort();
        assert_eq!(got, ["b1", "d2", "d3", "x0"]);
    }
}
