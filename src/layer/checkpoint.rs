//! Checkpoints of an upper dir that is still being written: a version that is crash-consistent
//! as of one instant, with the writers paused only for a short second pass.
//!
//! 1. Pass 1, writers running: a delta against this node's index of the current version (a full
//!    archive when there is none), uploaded but referenced by nothing yet. Files may be torn.
//! 2. Writers paused ([`Quiesce`]): a delta against pass 1's index, packed into a spool. The
//!    writers resume as soon as it is packed, or when the pause budget runs out (the attempt then
//!    fails and nothing is published).
//! 3. The frozen delta is staged and published with pass 1 in its chain. A restore applies pass 1
//!    and then the frozen delta, which holds every entry whose inode changed after pass 1 read it
//!    (ctime is the witness; entries changed within the racy margin of pass 1's start are sent
//!    again anyway) and removes what went since. The result is the tree as it stood during the
//!    pause: what a power cut at that instant would have left on a disk that honoured every
//!    write already made.
//!
//! When nothing changed during pass 1 its archive alone is that state and becomes current; when
//! pass 1 found nothing, the frozen delta sits directly on the current version.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;

use super::error::{LayerError, QuiesceError, Result};
use super::manager::{LayerSyncManager, blocking};
use super::manifest::ChainLink;
use super::options::SyncOutcome;
use super::spool::{Intent, remove_if_exists};
use super::types::{ContainerLayerId, LayerSnapshot};
use crate::archive::{self, PackOptions};

/// Pauses every writer of an upper dir (a container's cgroup freezer, say).
pub trait Quiesce: Send + Sync {
    /// Blocking. Stops the writers within `budget` or fails having resumed them.
    fn pause(&self, budget: Duration) -> std::result::Result<Box<dyn Paused>, QuiesceError>;
}

/// Writers held still by [`Quiesce::pause`]. Dropping it must resume them too (a checkpoint
/// cancelled mid-pause never leaves them paused).
pub trait Paused: Send {
    /// When the writers began to be stopped: the pause budget runs from here (bookkeeping
    /// done before it, such as recording the pause durably, is not the writers' time).
    fn since(&self) -> Instant;
    /// Blocking. Lets the writers go again (a no-op for writers someone else had paused) and
    /// says how long they were held (zero for writers someone else had paused).
    fn resume(self: Box<Self>) -> std::result::Result<Duration, QuiesceError>;
}

/// How to take a checkpoint.
#[derive(Debug, Clone)]
pub struct CheckpointOptions {
    /// Ordering ticket (as [`super::SyncOptions::seq`]); a local one when `None`.
    pub seq: Option<u64>,
    /// The image's layer chain, recorded in the manifest.
    pub base: Option<Vec<String>>,
    /// Longest the writers may stay paused: reaching the pause plus the frozen pass.
    pub pause_budget: Duration,
}

/// What a checkpoint did.
#[derive(Debug, Clone)]
pub struct CheckpointOutcome {
    pub sync: SyncOutcome,
    /// How long the writers were paused (from asking for the pause to their resumption).
    pub paused: Duration,
    /// Compressed bytes of the pass made while the writers ran (0 when it found nothing).
    pub running_bytes: u64,
    /// Compressed bytes packed while the writers were paused (0 when nothing changed meanwhile).
    pub frozen_bytes: u64,
}

/// One archive made by a pass: where it is and what it holds.
struct Pass {
    spool: PathBuf,
    captured: archive::Captured,
    /// Nothing to apply: an empty delta, or a full archive equal to the current version.
    empty: bool,
}

impl Pass {
    fn link(&self) -> ChainLink {
        let s = &self.captured.stats;
        ChainLink {
            digest: s.digest.clone(),
            compressed_size_bytes: s.compressed_size,
            size_bytes: s.uncompressed_size,
        }
    }

    fn snapshot(&self, created_at: chrono::DateTime<Utc>) -> LayerSnapshot {
        let s = &self.captured.stats;
        LayerSnapshot {
            digest: s.digest.clone(),
            size_bytes: s.uncompressed_size,
            compressed_size_bytes: s.compressed_size,
            created_at,
            file_count: s.entries,
            uncompressed_digest: s.uncompressed_digest.clone(),
            unchanged: false,
        }
    }
}

impl LayerSyncManager {
    /// Makes `upper`, whose writers `quiesce` can pause, `id`'s current layer as of one instant
    /// (see the module docs). Nothing is published when the pause fails or overruns its budget.
    pub async fn checkpoint_layer(
        &self,
        id: &ContainerLayerId,
        upper: impl AsRef<Path>,
        opts: CheckpointOptions,
        quiesce: Arc<dyn Quiesce>,
    ) -> Result<CheckpointOutcome> {
        let upper = upper.as_ref().to_path_buf();
        let lock = self.identity_lock(id);
        let _guard = lock.lock().await;
        let _file_lock = self.file_lock(id, true).await?;
        let manifest = self.read_manifest(id).await?;
        let ticket = match opts.seq {
            Some(s) => s,
            None => self.next_seq(id).await?,
        };
        // Room for two links: pass 1 and the frozen delta.
        let (prev, plan_chain) = match self.delta_plan(id, manifest.as_ref(), 2).await {
            Some((index, chain)) => (Some(index), chain),
            None => (None, Vec::new()),
        };
        let current = manifest.as_ref().map(|m| m.current.clone());

        let (spool, captured, stream) = self.pack(id, &upper, None, prev, true).await?;
        let empty = captured.delta == Some((0, 0))
            || current
                .as_ref()
                .is_some_and(|c| c.digest == captured.stats.digest);
        let first = Pass {
            spool,
            captured,
            empty,
        };
        let created_at = Utc::now();
        let format = self.format(&first.captured.stats);
        let running_bytes = if first.empty {
            if let Some(st) = stream {
                st.upload.abort().await;
            }
            0
        } else {
            let uploaded = self
                .upload_archive(
                    id,
                    &first.snapshot(created_at),
                    &format,
                    &first.spool,
                    None,
                    stream,
                )
                .await;
            if let Err(e) = uploaded {
                remove_if_exists(&first.spool)?;
                return Err(e);
            }
            first.captured.stats.compressed_size
        };

        let frozen = self
            .frozen_pass(id, &upper, &first, opts.pause_budget, quiesce)
            .await;
        let (second, paused) = match frozen {
            Ok(f) => f,
            Err(e) => {
                remove_if_exists(&first.spool)?;
                return Err(e);
            }
        };
        let frozen_bytes = if second.empty {
            0
        } else {
            second.captured.stats.compressed_size
        };
        let published = self
            .publish_checkpoint(
                id,
                current.as_ref(),
                plan_chain,
                first,
                second,
                ticket,
                &opts,
            )
            .await?;
        Ok(CheckpointOutcome {
            sync: published,
            paused,
            running_bytes,
            frozen_bytes,
        })
    }

    /// Pauses the writers, packs what changed since `first` into a spool and resumes them,
    /// within `budget`. Returns the pass and how long the writers were paused.
    async fn frozen_pass(
        &self,
        id: &ContainerLayerId,
        upper: &Path,
        first: &Pass,
        budget: Duration,
        quiesce: Arc<dyn Quiesce>,
    ) -> Result<(Pass, Duration)> {
        let spool = self.inner.staging.temp_path("checkpoint");
        let opts = PackOptions {
            level: self.inner.config.compression_level,
            workers: self.inner.config.compression_workers,
            live: false,
        };
        let index = first.captured.index.clone();
        let paused = blocking(move || quiesce.pause(budget))
            .await?
            .map_err(|source| LayerError::Quiesce {
                id: id.clone(),
                source,
            })?;
        let (upper2, spool2) = (upper.to_path_buf(), spool.clone());
        let mut job = tokio::task::spawn_blocking(move || {
            archive::pack_capture(
                &upper2,
                &spool2,
                &opts,
                None,
                None,
                archive::Capture::Delta(&index),
            )
        });
        let since = paused.since();
        let left = budget.saturating_sub(since.elapsed());
        let packed = tokio::time::timeout(left, &mut job).await;
        let resumed = blocking(move || paused.resume()).await;
        let paused_for = match &resumed {
            Ok(Ok(held)) => *held,
            _ => since.elapsed(),
        };
        let overran = || LayerError::PauseBudget {
            id: id.clone(),
            path: upper.to_path_buf(),
            budget_ms: u64::try_from(budget.as_millis()).unwrap_or(u64::MAX),
        };
        let packed = match packed {
            Ok(joined) => joined.map_err(LayerError::Join)?,
            Err(_) => {
                // The pack may still be reading the (now running) tree: let it end, drop it,
                // and say what it was up against (what an operator tunes the budget by).
                let late = job.await;
                if let Ok(Ok(c)) = &late {
                    tracing::warn!(%id, budget_ms = budget.as_millis() as u64,
                        pass_ms = since.elapsed().as_millis() as u64, delta = ?c.delta,
                        compressed = c.stats.compressed_size,
                        "frozen pass overran the pause budget");
                }
                remove_if_exists(&spool)?;
                resumed?.map_err(|source| LayerError::Resume {
                    id: id.clone(),
                    source,
                })?;
                return Err(overran());
            }
        };
        let resumed = resumed?.map_err(|source| LayerError::Resume {
            id: id.clone(),
            source,
        });
        let captured = match (packed, resumed) {
            (Ok(c), Ok(_)) => c,
            (Err(source), _) => {
                remove_if_exists(&spool)?;
                return Err(LayerError::Pack {
                    id: id.clone(),
                    path: upper.to_path_buf(),
                    source: Box::new(source),
                });
            }
            (Ok(_), Err(e)) => {
                remove_if_exists(&spool)?;
                return Err(e);
            }
        };
        // The timer that bounds the pass fires late on a loaded runtime, and the thaw itself
        // takes time: a pause that still ended up over the budget publishes nothing either.
        if paused_for > budget {
            tracing::warn!(%id, budget_ms = budget.as_millis() as u64,
                paused_ms = paused_for.as_secs_f64() * 1e3, "frozen pass ended past the pause budget");
            remove_if_exists(&spool)?;
            return Err(overran());
        }
        let empty = captured.delta == Some((0, 0));
        tracing::debug!(%id, paused_ms = paused_for.as_secs_f64() * 1e3, delta = ?captured.delta,
            compressed = captured.stats.compressed_size, "frozen pass packed");
        Ok((
            Pass {
                spool,
                captured,
                empty,
            },
            paused_for,
        ))
    }

    /// Stages and publishes what the two passes found (see the module docs for the cases).
    #[allow(clippy::too_many_arguments)]
    async fn publish_checkpoint(
        &self,
        id: &ContainerLayerId,
        current: Option<&super::manifest::ManifestEntry>,
        plan_chain: Vec<ChainLink>,
        first: Pass,
        second: Pass,
        ticket: u64,
        opts: &CheckpointOptions,
    ) -> Result<SyncOutcome> {
        let started_at = Utc::now();
        // The frozen pass's index describes the paused tree, whichever archive ends up current.
        let index = second.captured.index.clone();
        // A full first pass equal to the current version: the frozen delta sits on that version.
        let chain_below_first = if first.captured.delta.is_some() {
            plan_chain
        } else {
            Vec::new()
        };
        let (kept, dropped, chain, fresh_links) = match (first.empty, second.empty, current) {
            (true, true, Some(cur)) => {
                remove_if_exists(&first.spool)?;
                remove_if_exists(&second.spool)?;
                tracing::debug!(%id, digest = %cur.digest, "checkpoint: nothing changed");
                self.save_index(id, index, &cur.digest).await;
                return Ok(SyncOutcome {
                    identity: id.clone(),
                    snapshot: cur.snapshot(true),
                    seq: cur.seq,
                    manifest_moved: false,
                    upload: None,
                });
            }
            // Nothing changed while pass 1 read the tree: pass 1 is that instant's state.
            (false, true, _) | (true, true, None) => {
                (first, second.spool, chain_below_first, Vec::new())
            }
            (true, false, Some(cur)) => {
                let chain = if first.captured.delta.is_some() {
                    chain_below_first
                } else {
                    vec![ChainLink {
                        digest: cur.digest.clone(),
                        compressed_size_bytes: cur.compressed_size_bytes,
                        size_bytes: cur.size_bytes,
                    }]
                };
                (second, first.spool, chain, Vec::new())
            }
            (_, false, _) => {
                let link = first.link();
                let mut chain = chain_below_first;
                chain.push(link.clone());
                (second, first.spool, chain, vec![link.digest])
            }
        };
        remove_if_exists(&dropped)?;
        let stats = &kept.captured.stats;
        let intent = Intent {
            identity: id.clone(),
            format: self.format(stats),
            snapshot: kept.snapshot(started_at),
            fingerprint: None,
            seq: opts.seq,
            ticket,
            base: opts.base.clone(),
            started_at,
            chain,
            fresh_links,
        };
        let staged = intent.clone();
        let inner = Arc::clone(&self.inner);
        let packed = kept.spool.clone();
        let spool = match blocking(move || inner.staging.commit(&packed, &staged)).await {
            Ok(Ok(spool)) => spool,
            Ok(Err(e)) | Err(e) => {
                remove_if_exists(&kept.spool)?;
                return Err(e);
            }
        };
        let outcome = self.publish(&intent, &spool, None, false, None).await?;
        if outcome.manifest_moved {
            self.save_index(id, index, &intent.snapshot.digest).await;
        }
        Ok(outcome)
    }

    /// Whether the links a staged checkpoint introduced are still stored (a long outage may
    /// have let `gc` take them); their metadata is rewritten first, which keeps `gc` off them
    /// until the manifest names them. A checkpoint whose first pass is gone is dropped: the
    /// upper dir still holds the data and the next sync uploads it.
    pub(super) async fn fresh_links_kept(&self, intent: &Intent) -> Result<bool> {
        use super::error::store;
        use super::manifest::{blob_key, meta_key};
        use crate::store::PutCondition;
        for digest in &intent.fresh_links {
            let (key, mkey) = (blob_key(digest), meta_key(digest));
            let store_ = &self.inner.store;
            let meta = store_.get_bytes(&mkey).await.map_err(store(&mkey))?;
            let kept = match meta {
                Some(bytes) => {
                    store_
                        .put_bytes(&mkey, bytes, PutCondition::None)
                        .await
                        .map_err(store(&mkey))?;
                    store_.exists(&key).await.map_err(store(&key))?
                }
                None => false,
            };
            if !kept {
                tracing::error!(id = %intent.identity, digest = %intent.snapshot.digest, link = %digest,
                    "interrupted checkpoint's first pass is no longer stored; dropping the checkpoint (the next sync uploads the upper again)");
                return Ok(false);
            }
        }
        Ok(true)
    }
}
