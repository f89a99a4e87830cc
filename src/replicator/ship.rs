//! Shipping the outbox to the store: each item's object, then one manifest update for the batch
//! (conditional on the manifest not having changed since it was read), then the local copies go.
//!
//! An item the manifest already has (a crash after the manifest was written) is dropped without
//! upload. When the store's history of a generation is not the one this node continues (another
//! replicator appended to it, or it is gone), the reading thread is asked for a new generation
//! and that generation's items are dropped once the new base snapshot is in the outbox: its
//! changes are in that snapshot, so nothing is lost.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

mod placement;

pub use placement::item_key;
use placement::{Placement, apply, placement};

use super::cache::{Cache, CacheError, Item, ItemKind};
use super::engine::{EngineSender, Request, Shared};
use super::manifest::{self, MANIFEST_KEY, Manifest, ManifestError};
use crate::store::{ObjectStore, PutCondition, PutOutcome, StoreError, UploadJournal};
use crate::types::{CompletedPart, PendingUpload};

/// Objects up to this size go up in one conditional PUT.
const SMALL_OBJECT: u64 = 8 << 20;
/// Items shipped per manifest update at most.
const BATCH: usize = 64;
/// History is pruned at most this often.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Backoff after a failed batch, doubling up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Failures shipping; each names the object or file.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(
        "{key} exists in the store with different contents ({found} bytes, expected {expected})"
    )]
    Conflict {
        key: String,
        found: u64,
        expected: u64,
    },
    #[error("cannot read {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shipping task ended: {0}")]
    Task(String),
    #[error("the manifest kept changing under this replicator (another one writes {name}?)")]
    Contended { name: String },
}

type Result<T> = std::result::Result<T, ShipError>;

/// What shipping shows (status, flush).
#[derive(Debug, Clone, Default)]
pub struct ShipStatus {
    /// Every outbox item up to this number is in the store.
    pub shipped_item: Option<u64>,
    pub last_sync_unix_ms: Option<i64>,
    /// Commit time of the last transaction the store has.
    pub durable_commit_unix_ns: Option<i64>,
    pub durable_generation: Option<String>,
    pub durable_txid: u64,
    pub pending_bytes: u64,
    pub last_error: Option<String>,
}

/// The shipping side of one database.
pub struct Shipper {
    pub store: Arc<dyn ObjectStore>,
    pub cache: Cache,
    pub name: String,
    pub shared: Arc<Shared>,
    pub status: Arc<Mutex<ShipStatus>>,
    pub shipped: watch::Sender<Option<u64>>,
    pub engine: EngineSender,
    /// The manifest as last read or written, with its etag.
    manifest: Option<(Manifest, Option<String>)>,
    /// Generations whose history diverged from the store's.
    diverged: BTreeSet<String>,
    /// How far back point-in-time restores must reach (`None`: keep everything).
    retention: Option<Duration>,
    /// When history was last pruned.
    pruned_at: Option<tokio::time::Instant>,
    /// A snapshot was shipped since (older history may have become prunable).
    shipped_snapshot: bool,
}

impl std::fmt::Debug for Shipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shipper")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Shipper {
    #[must_use]
    pub fn new(
        store: Arc<dyn ObjectStore>,
        cache: Cache,
        name: String,
        shared: Arc<Shared>,
        status: Arc<Mutex<ShipStatus>>,
        shipped: watch::Sender<Option<u64>>,
        engine: EngineSender,
    ) -> Self {
        Self {
            store,
            cache,
            name,
            shared,
            status,
            shipped,
            engine,
            manifest: None,
            diverged: BTreeSet::new(),
            retention: None,
            pruned_at: None,
            shipped_snapshot: false,
        }
    }

    /// Deletes history older than `retention` (checked after shipping a snapshot, and at most
    /// every [`PRUNE_EVERY`] otherwise).
    #[must_use]
    pub fn with_retention(mut self, retention: Option<Duration>) -> Self {
        self.retention = retention;
        self
    }

    /// Ships until `stop` is set and the outbox is empty (or `stop` and the store is failing).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut backoff = FIRST_BACKOFF;
        let shared = Arc::clone(&self.shared);
        loop {
            let notified = shared.outbox.notified();
            let outcome = self.ship_once().await;
            let stopping = *stop.borrow();
            match outcome {
                Ok(0) if stopping => return,
                Ok(0) => {
                    backoff = FIRST_BACKOFF;
                    tokio::select! {
                        () = notified => {}
                        _ = stop.changed() => {}
                    }
                }
                Ok(_) => {
                    backoff = FIRST_BACKOFF;
                    if let Err(e) = self.prune().await {
                        self.record_error(&e);
                    }
                }
                Err(e) => {
                    self.record_error(&e);
                    if stopping {
                        return;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn record_error(&self, e: &ShipError) {
        let msg = super::error_chain(e);
        let mut st = self.status.lock().expect("ship status");
        if st.last_error.as_deref() != Some(&msg) {
            tracing::warn!(db = %self.name, error = %msg, "shipping to the store failed; retrying");
        }
        st.last_error = Some(msg);
    }

    /// Ships one batch; returns how many items left the outbox.
    pub async fn ship_once(&mut self) -> Result<usize> {
        let cache = self.cache.clone();
        let shippable = self
            .shared
            .status
            .lock()
            .expect("status lock")
            .shippable_below;
        let (items, usage) = tokio::task::spawn_blocking(move || {
            let mut items = cache.items()?;
            items.retain(|i| i.number < shippable);
            Ok::<_, CacheError>((items, cache.usage()?))
        })
        .await
        .map_err(|e| ShipError::Task(e.to_string()))??;
        self.status.lock().expect("ship status").pending_bytes = usage;
        // Items leave the outbox only once shipped: every number below the first one left (and
        // below what the saved state counts) is in the store, e.g. shipped before a restart.
        let left = items.first().map_or(shippable, |i| i.number.min(shippable));
        if let Some(through) = left.checked_sub(1) {
            self.mark_shipped(through);
        }
        if items.is_empty() {
            return Ok(0);
        }
        let batch: Vec<Item> = items.iter().take(BATCH).cloned().collect();
        let mut attempts = 0;
        let done = loop {
            if self.manifest.is_none() {
                self.manifest = Some(load_manifest(self.store.as_ref(), &self.name).await?);
            }
            match self.ship_batch(&batch, &items).await? {
                Some(done) => break done,
                None => {
                    // The manifest changed since it was read: read it again and redo.
                    self.manifest = None;
                    attempts += 1;
                    if attempts >= 5 {
                        return Err(ShipError::Contended {
                            name: self.name.clone(),
                        });
                    }
                }
            }
        };
        let cache = self.cache.clone();
        let removed = done.clone();
        let usage = tokio::task::spawn_blocking(move || {
            removed.iter().try_for_each(|i| cache.remove_item(i))?;
            cache.usage()
        })
        .await
        .map_err(|e| ShipError::Task(e.to_string()))??;
        let last = done.iter().map(|i| i.number).max();
        self.shipped_snapshot |= done
            .iter()
            .any(|i| matches!(i.kind, ItemKind::Snapshot { .. }));
        let (m, _) = self.manifest.as_ref().expect("manifest loaded");
        let mut st = self.status.lock().expect("ship status");
        st.pending_bytes = usage;
        st.last_error = None;
        st.last_sync_unix_ms = Some(super::now_unix_ns() / 1_000_000);
        if let Some(g) = m.current() {
            st.durable_generation = Some(g.id.clone());
            st.durable_txid = g.last_txid();
            st.durable_commit_unix_ns = Some(g.last_unix_ns());
        }
        drop(st);
        if let Some(last) = last {
            self.mark_shipped(last);
        }
        Ok(done.len())
    }

    /// Items up to `through` are in the store (flushes waiting for them return).
    fn mark_shipped(&self, through: u64) {
        let newer = self.shipped.borrow().is_none_or(|s| s < through);
        if newer {
            self.shipped.send_replace(Some(through));
            self.status.lock().expect("ship status").shipped_item = Some(through);
        }
    }

    /// Drops history no restore within the retention window needs: the manifest first (so a
    /// crash leaves unreferenced objects, never references to deleted ones), then the objects.
    pub async fn prune(&mut self) -> Result<usize> {
        let Some(retention) = self.retention else {
            return Ok(0);
        };
        if !self.shipped_snapshot && self.pruned_at.is_some_and(|t| t.elapsed() < PRUNE_EVERY) {
            return Ok(0);
        }
        self.shipped_snapshot = false;
        let Some((manifest, etag)) = self.manifest.clone() else {
            return Ok(0);
        };
        self.pruned_at = Some(tokio::time::Instant::now());
        let keep_from = super::now_unix_ns()
            .saturating_sub(i64::try_from(retention.as_nanos()).unwrap_or(i64::MAX));
        let mut m = manifest;
        let pruned = m.prune(keep_from);
        if pruned.is_empty() {
            return Ok(0);
        }
        let mut keys = pruned.keys;
        for (generation, chunk) in &pruned.chunks {
            let key = manifest::chunk_key(generation, chunk.first);
            if let Some(bytes) = self.store.get_bytes(&key).await? {
                let index: manifest::IndexChunk =
                    serde_json::from_slice(&bytes).map_err(|e| ManifestError::Invalid {
                        key: key.clone(),
                        reason: e.to_string(),
                    })?;
                keys.extend(
                    index
                        .segments
                        .iter()
                        .map(|e| manifest::segment_key(generation, e.first, e.last)),
                );
            }
            keys.push(key);
        }
        let cond = etag.map_or(PutCondition::IfNoneMatch, PutCondition::IfMatch);
        match self
            .store
            .put_bytes(MANIFEST_KEY, m.to_bytes(), cond)
            .await?
        {
            PutOutcome::Written { etag } => self.manifest = Some((m, etag)),
            PutOutcome::PreconditionFailed => {
                // Someone else wrote it: prune again next time, from a fresh read.
                self.manifest = None;
                return Ok(0);
            }
        }
        for key in &keys {
            if let Err(e) = self.store.delete(key).await {
                tracing::warn!(db = %self.name, key, error = %e, "cannot delete pruned object; it stays unreferenced");
            }
        }
        tracing::info!(db = %self.name, objects = keys.len(), "pruned history older than the retention");
        Ok(keys.len())
    }

    /// Uploads `batch`'s objects and writes the manifest once. `None`: the manifest changed
    /// under us (nothing is lost; the caller re-reads and retries). Returns the items done.
    async fn ship_batch(&mut self, batch: &[Item], all: &[Item]) -> Result<Option<Vec<Item>>> {
        let (mut m, etag) = self.manifest.clone().expect("manifest loaded");
        let mut done = Vec::new();
        let mut chunks = Vec::new();
        for item in batch {
            if self.diverged.contains(&item.generation) {
                // Dropped once a later generation's base is waiting behind it.
                let replaced = all.iter().any(|later| {
                    later.number > item.number
                        && matches!(
                            later.kind,
                            ItemKind::Snapshot {
                                new_generation: Some(_),
                                ..
                            }
                        )
                });
                if replaced {
                    done.push(item.clone());
                    continue;
                }
                break;
            }
            match placement(&m, item) {
                Placement::AlreadyThere => {
                    done.push(item.clone());
                    continue;
                }
                Placement::Diverged(why) => {
                    tracing::warn!(db = %self.name, generation = %item.generation, why, "history diverged from the store's; starting a new generation");
                    self.diverged.insert(item.generation.clone());
                    let _ = self.engine.send(Request::NewGeneration(format!(
                        "the store's history diverged: {why}"
                    )));
                    break;
                }
                Placement::Append => {}
            }
            self.upload(item).await?;
            if let Some(chunk) = apply(&mut m, item) {
                chunks.push(chunk);
            }
            done.push(item.clone());
        }
        for (key, bytes) in chunks {
            self.put_immutable(&key, bytes).await?;
        }
        if m == self.manifest.as_ref().expect("manifest loaded").0 {
            return Ok(Some(done));
        }
        let cond = etag.map_or(PutCondition::IfNoneMatch, PutCondition::IfMatch);
        match self
            .store
            .put_bytes(MANIFEST_KEY, m.to_bytes(), cond)
            .await?
        {
            PutOutcome::Written { etag } => {
                self.manifest = Some((m, etag));
                Ok(Some(done))
            }
            PutOutcome::PreconditionFailed => Ok(None),
        }
    }

    /// Puts an item's object (skipped when the same object is there already).
    async fn upload(&self, item: &Item) -> Result<()> {
        let key = item_key(item);
        let path = self.cache.item_data(item);
        if item.size <= SMALL_OBJECT {
            let bytes = tokio::fs::read(&path)
                .await
                .map_err(|source| ShipError::Read {
                    path: path.clone(),
                    source,
                })?;
            return self.put_immutable(&key, bytes).await;
        }
        self.store
            .upload_file(&key, &path, &MemoryJournal::default(), None)
            .await?;
        Ok(())
    }

    /// Writes a content-fixed object once; an existing one must have the same size (a re-run
    /// after a crash), else it belongs to another history and nothing is overwritten.
    async fn put_immutable(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        let expected = bytes.len() as u64;
        match self
            .store
            .put_bytes(key, bytes, PutCondition::IfNoneMatch)
            .await?
        {
            PutOutcome::Written { .. } => Ok(()),
            PutOutcome::PreconditionFailed => {
                let found = self.store.head(key).await?.map_or(0, |i| i.size);
                if found == expected {
                    Ok(())
                } else {
                    Err(ShipError::Conflict {
                        key: key.to_string(),
                        found,
                        expected,
                    })
                }
            }
        }
    }
}

/// Reads the manifest with the etag of exactly that version (HEAD, GET, HEAD agree), or a new
/// empty one when the store has none.
pub async fn load_manifest(
    store: &dyn ObjectStore,
    name: &str,
) -> Result<(Manifest, Option<String>)> {
    for _ in 0..5 {
        let before = store.head(MANIFEST_KEY).await?;
        let Some(bytes) = store.get_bytes(MANIFEST_KEY).await? else {
            if before.is_none() {
                return Ok((Manifest::new(name, 0), None));
            }
            continue;
        };
        let after = store.head(MANIFEST_KEY).await?;
        let (Some(b), Some(a)) = (before, after) else {
            continue;
        };
        if b.etag == a.etag {
            let key = format!("{}/{MANIFEST_KEY}", store.describe());
            return Ok((Manifest::parse(&bytes, &key)?, a.etag));
        }
    }
    Err(ShipError::Contended {
        name: name.to_string(),
    })
}

/// Multipart state for one upload call (snapshots are retaken rather than resumed after a
/// crash, so nothing needs to outlive the process).
#[derive(Default)]
struct MemoryJournal {
    uploads: Mutex<HashMap<String, PendingUpload>>,
}

#[async_trait::async_trait]
impl UploadJournal for MemoryJournal {
    async fn load_upload(
        &self,
        key: &str,
    ) -> std::result::Result<Option<PendingUpload>, StoreError> {
        Ok(self.uploads.lock().expect("journal").get(key).cloned())
    }
    async fn begin_upload(&self, upload: &PendingUpload) -> std::result::Result<(), StoreError> {
        self.uploads
            .lock()
            .expect("journal")
            .insert(upload.object_key.clone(), upload.clone());
        Ok(())
    }
    async fn record_part(
        &self,
        key: &str,
        _upload_id: &str,
        part: &CompletedPart,
    ) -> std::result::Result<(), StoreError> {
        if let Some(u) = self.uploads.lock().expect("journal").get_mut(key) {
            u.completed_parts.insert(part.part_number, part.clone());
        }
        Ok(())
    }
    async fn finish_upload(
        &self,
        key: &str,
        _upload_id: &str,
    ) -> std::result::Result<(), StoreError> {
        self.uploads.lock().expect("journal").remove(key);
        Ok(())
    }
    async fn known_upload_ids(&self) -> std::result::Result<Vec<String>, StoreError> {
        Ok(self
            .uploads
            .lock()
            .expect("journal")
            .values()
            .map(|u| u.upload_id.clone())
            .collect())
    }
}
