//! [`SqliteReplicator`]: the library API of the original design — one database replicated to
//! the store while the app runs, restored when it is missing.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::cache::{Cache, CacheError, FileId, LocalState};
use super::engine::{self, EngineConfig, EngineError, Request, Shared};
use super::pagemap::{self, PageMap, Root};
use super::restore::{self, RestoreError, RestoreOptions, Restored, Target};
use super::ship::{self, ShipError, ShipStatus, Shipper};
use crate::config::{LayerStorageConfig, ReplicateConfig, default_name, validate_name};
use crate::store::{ObjectStore, StoreError};

/// Pause before asking again for a flush the full cache refused.
const RETRY: Duration = Duration::from_millis(200);

/// The original design's settings of one replicated database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteReplicatorConfig {
    /// The database file.
    pub db_path: PathBuf,
    /// Bucket of the store; empty: the storage configuration's.
    pub s3_bucket: String,
    /// Key prefix; the database's objects go under `{s3_prefix}sqlite/{name}/`.
    pub s3_prefix: String,
    /// Segments and snapshots wait here until the store has them.
    pub cache_dir: PathBuf,
    /// Bytes the cache may hold before reading (and checkpointing) pauses.
    pub max_cache_size: u64,
    /// Restore the database from the store when it is missing.
    pub auto_restore: bool,
    /// A fresh snapshot this often while the database changes.
    pub snapshot_interval_secs: u64,
}

impl SqliteReplicatorConfig {
    /// The settings for `db_path` from a `[replicate]` section and the `[storage]` prefix.
    #[must_use]
    pub fn from_section(
        db_path: &Path,
        section: &ReplicateConfig,
        storage: &LayerStorageConfig,
    ) -> Self {
        Self {
            db_path: db_path.to_path_buf(),
            s3_bucket: storage.bucket.clone(),
            s3_prefix: storage.prefix.clone(),
            cache_dir: section.cache_dir.clone(),
            max_cache_size: section.max_cache_size,
            auto_restore: section.auto_restore,
            snapshot_interval_secs: section.snapshot_interval_secs,
        }
    }
}

/// Settings beyond the original design's, with their defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicatorOptions {
    /// Folder under `{s3_prefix}sqlite/`; the file stem when `None`.
    pub name: Option<String>,
    /// Longest time a commit waits before its segment starts uploading.
    pub sync_interval: Duration,
    pub integrity_check: bool,
    /// How far back point-in-time restores reach; older history is deleted (`None`: kept).
    pub retention: Option<Duration>,
}

impl Default for ReplicatorOptions {
    fn default() -> Self {
        Self {
            name: None,
            sync_interval: Duration::from_secs(1),
            integrity_check: true,
            retention: Some(Duration::from_secs(24 * 3600)),
        }
    }
}

impl ReplicatorOptions {
    #[must_use]
    pub fn from_section(section: &ReplicateConfig, name: Option<String>) -> Self {
        Self {
            name,
            sync_interval: Duration::from_millis(section.sync_interval_ms),
            integrity_check: section.integrity_check,
            retention: (section.retention_secs > 0)
                .then(|| Duration::from_secs(section.retention_secs)),
        }
    }
}

/// Failures of the replicator API; each names the database or object.
#[derive(Debug, thiserror::Error)]
pub enum ReplicatorError {
    #[error("invalid replication settings for {db}: {reason}")]
    Config { db: PathBuf, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Ship(#[from] ShipError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("replicator of {db} is not running")]
    NotRunning { db: PathBuf },
    #[error("replicator of {db} is already running")]
    Running { db: PathBuf },
    #[error("flush of {db}: {reason}")]
    Flush { db: PathBuf, reason: String },
    #[error("flush of {db} not durable after {waited:?}: {pending}")]
    FlushTimeout {
        db: PathBuf,
        waited: Duration,
        pending: String,
    },
    #[error("{db}: the store has no replica of this database")]
    NoReplica { db: PathBuf },
}

type Result<T> = std::result::Result<T, ReplicatorError>;

/// What [`SqliteReplicator::status`] reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicatorStatus {
    pub db_path: PathBuf,
    pub name: String,
    pub store: String,
    pub running: bool,
    pub generation: String,
    /// Transactions read (and cut into segments) so far.
    pub txid: u64,
    /// The last transaction the store has.
    pub durable_txid: u64,
    /// When the store last took something from this replicator.
    pub last_sync: Option<DateTime<Utc>>,
    /// How long the oldest transaction not yet in the store has waited, in milliseconds (0 when
    /// the store has everything).
    pub lag_ms: u64,
    /// Bytes waiting in the cache for the store.
    pub pending_bytes: u64,
    pub cache_limit: u64,
    pub cache_full: bool,
    pub wal_frames: u32,
    pub last_error: Option<String>,
}

struct Running {
    requests: engine::EngineSender,
    thread: std::thread::JoinHandle<std::result::Result<(), EngineError>>,
    shipper: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
}

/// Replicates one SQLite database to the store.
pub struct SqliteReplicator {
    config: SqliteReplicatorConfig,
    options: ReplicatorOptions,
    name: String,
    store: Arc<dyn ObjectStore>,
    cache: Cache,
    compression_level: i32,
    shared: Arc<Shared>,
    ship_status: Arc<Mutex<ShipStatus>>,
    shipped: watch::Receiver<Option<u64>>,
    shipped_tx: watch::Sender<Option<u64>>,
    running: tokio::sync::Mutex<Option<Running>>,
}

impl std::fmt::Debug for SqliteReplicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteReplicator")
            .field("db", &self.config.db_path)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl SqliteReplicator {
    /// Opens the store and the cache; restores the database first when it is missing and
    /// `auto_restore` is set (and the store has a replica).
    pub async fn new(
        config: SqliteReplicatorConfig,
        s3_config: &LayerStorageConfig,
    ) -> Result<Self> {
        Self::with_options(config, s3_config, ReplicatorOptions::default()).await
    }

    pub async fn with_options(
        config: SqliteReplicatorConfig,
        s3_config: &LayerStorageConfig,
        options: ReplicatorOptions,
    ) -> Result<Self> {
        let bad = |reason: String| ReplicatorError::Config {
            db: config.db_path.clone(),
            reason,
        };
        let name = match &options.name {
            Some(n) => n.clone(),
            None => default_name(&config.db_path).map_err(|e| bad(e.to_string()))?,
        };
        validate_name(&name).map_err(|e| bad(e.to_string()))?;
        let mut storage = s3_config.clone();
        if !config.s3_bucket.is_empty() {
            storage.bucket.clone_from(&config.s3_bucket);
        }
        // The store's own rules for a prefix (the full one is checked again when it opens).
        let prefix = crate::store::normalize_prefix(&config.s3_prefix)?;
        storage.prefix = format!("{prefix}sqlite/{name}/");
        let store = crate::store::open_store(&storage).await?;
        let cache = {
            let (dir, name) = (config.cache_dir.clone(), name.clone());
            tokio::task::spawn_blocking(move || Cache::open(&dir, &name))
                .await
                .expect("cache open task")?
        };
        let (shipped_tx, shipped) = watch::channel(None);
        let this = Self {
            config,
            options,
            name,
            store,
            cache,
            compression_level: s3_config.compression_level,
            shared: Arc::new(Shared::default()),
            ship_status: Arc::new(Mutex::new(ShipStatus::default())),
            shipped,
            shipped_tx,
            running: tokio::sync::Mutex::new(None),
        };
        if this.config.auto_restore && this.is_missing().await {
            match this.restore().await {
                Ok(()) | Err(ReplicatorError::NoReplica { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(this)
    }

    /// The name the database has in the store.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The database file.
    #[must_use]
    pub fn db_path(&self) -> &Path {
        &self.config.db_path
    }

    /// Whether the database, its WAL and its shared-memory file are all absent (only then is a
    /// restore into place safe: anything else is someone's data).
    async fn is_missing(&self) -> bool {
        let db = self.config.db_path.clone();
        tokio::task::spawn_blocking(move || {
            ["", "-wal", "-shm"].iter().all(|side| {
                let mut p = db.as_os_str().to_owned();
                p.push(side);
                !Path::new(&p).exists()
            })
        })
        .await
        .expect("stat task")
    }

    /// Starts replicating in the background (a database that does not exist yet is waited for).
    pub async fn start(&self) -> Result<()> {
        let mut running = self.running.lock().await;
        if running.is_some() {
            return Err(ReplicatorError::Running {
                db: self.config.db_path.clone(),
            });
        }
        let (requests, mut rx) = engine::channel().map_err(|e| ReplicatorError::Flush {
            db: self.config.db_path.clone(),
            reason: format!("cannot set up the reading thread's wakeups: {e}"),
        })?;
        let cache = self.cache.clone();
        let shippable = tokio::task::spawn_blocking(move || cache.shippable_below())
            .await
            .expect("cache task")?;
        self.shared
            .status
            .lock()
            .expect("status lock")
            .shippable_below = shippable;
        let cfg = EngineConfig {
            db_path: self.config.db_path.clone(),
            batch: self.options.sync_interval / 5,
            snapshot_interval: Duration::from_secs(self.config.snapshot_interval_secs.max(1)),
            max_cache_size: self.config.max_cache_size,
            compression_level: self.compression_level,
        };
        let (cache, shared) = (self.cache.clone(), Arc::clone(&self.shared));
        let thread = std::thread::Builder::new()
            .name(format!("zl-db-{}", self.name))
            .spawn(move || engine::run(cfg, cache, shared, &mut rx))
            .map_err(|e| ReplicatorError::Flush {
                db: self.config.db_path.clone(),
                reason: format!("cannot start the reading thread: {e}"),
            })?;
        let (stop, stop_rx) = watch::channel(false);
        let shipper = Shipper::new(
            Arc::clone(&self.store),
            self.cache.clone(),
            self.name.clone(),
            Arc::clone(&self.shared),
            Arc::clone(&self.ship_status),
            self.shipped_tx.clone(),
            requests.clone(),
        )
        .with_retention(self.options.retention);
        let shipper = tokio::spawn(shipper.run(stop_rx));
        *running = Some(Running {
            requests,
            thread,
            shipper,
            stop,
        });
        Ok(())
    }

    /// Ships everything committed so far; returns once the store has it.
    pub async fn flush(&self) -> Result<()> {
        self.flush_within(Duration::from_secs(60)).await
    }

    /// [`SqliteReplicator::flush`] waiting at most `timeout` for the store.
    pub async fn flush_within(&self, timeout: Duration) -> Result<()> {
        let db = self.config.db_path.clone();
        let requests = {
            let running = self.running.lock().await;
            running
                .as_ref()
                .map(|r| r.requests.clone())
                .ok_or_else(|| ReplicatorError::NotRunning { db: db.clone() })?
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let item = loop {
            let (reply, answer) = mpsc::channel();
            requests
                .send(Request::Flush(reply))
                .map_err(|_| ReplicatorError::NotRunning { db: db.clone() })?;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let answered = tokio::task::spawn_blocking(move || answer.recv_timeout(left))
                .await
                .expect("flush wait task")
                .map_err(|_| ReplicatorError::Flush {
                    db: db.clone(),
                    reason: format!("the reading thread did not answer within {timeout:?}"),
                })?;
            match answered {
                Ok(item) => break item,
                // Uploads make room; reading resumes then, and so can this flush.
                Err(refused)
                    if refused.cache_full && tokio::time::Instant::now() + RETRY < deadline =>
                {
                    tokio::time::sleep(RETRY).await;
                }
                Err(refused) => {
                    return Err(ReplicatorError::Flush {
                        db,
                        reason: refused.message,
                    });
                }
            }
        };
        let Some(item) = item else {
            return Ok(());
        };
        let mut shipped = self.shipped.clone();
        let waited = tokio::time::timeout_at(deadline, async {
            while shipped.borrow_and_update().is_none_or(|s| s < item) {
                if shipped.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if waited.is_err() {
            let pending = self
                .ship_status
                .lock()
                .expect("ship status")
                .last_error
                .clone()
                .unwrap_or_else(|| "uploads still running".to_string());
            return Err(ReplicatorError::FlushTimeout {
                db,
                waited: timeout,
                pending,
            });
        }
        Ok(())
    }

    /// Stops reading (after cutting what was read), then ships what is left (for at most
    /// `ship_for`; the rest stays in the cache for the next start).
    pub async fn stop(&self, ship_for: Duration) -> Result<()> {
        let Some(r) = self.running.lock().await.take() else {
            return Ok(());
        };
        let _ = r.requests.send(Request::Stop);
        let joined = tokio::task::spawn_blocking(move || r.thread.join())
            .await
            .expect("join task");
        let _ = r.stop.send(true);
        let mut shipper = r.shipper;
        if tokio::time::timeout(ship_for, &mut shipper).await.is_err() {
            shipper.abort();
            tracing::warn!(db = %self.config.db_path.display(), "stopped before the store took everything; the cache keeps the rest");
        }
        match joined {
            Ok(result) => result.map_err(Into::into),
            Err(_) => Err(ReplicatorError::Flush {
                db: self.config.db_path.clone(),
                reason: "the reading thread panicked".to_string(),
            }),
        }
    }

    /// Where replication stands.
    #[must_use]
    pub fn status(&self) -> ReplicatorStatus {
        let e = self.shared.status.lock().expect("status lock").clone();
        let s = self.ship_status.lock().expect("ship status").clone();
        let now = now_ns();
        let behind = e.next_txid.saturating_sub(1) > s.durable_txid
            || s.durable_generation.as_deref() != Some(e.generation.as_str());
        let oldest = if behind {
            // The first transaction the store does not have committed after the last one it
            // has; unknown durable time counts from the oldest unsealed one.
            s.durable_commit_unix_ns
                .filter(|_| s.durable_generation.as_deref() == Some(e.generation.as_str()))
                .or(e.oldest_unsealed_unix_ns)
                .or(Some(e.last_commit_unix_ns))
        } else {
            e.oldest_unsealed_unix_ns
        };
        // Not reading: nothing is known about commits the store lacks.
        let oldest = oldest.filter(|_| e.running);
        let lag = oldest.map_or(Duration::ZERO, |t| {
            Duration::from_nanos(u64::try_from(now.saturating_sub(t)).unwrap_or(0))
        });
        ReplicatorStatus {
            db_path: self.config.db_path.clone(),
            name: self.name.clone(),
            store: self.store.describe(),
            running: e.running,
            generation: e.generation,
            txid: e.next_txid.saturating_sub(1),
            durable_txid: s.durable_txid,
            last_sync: s
                .last_sync_unix_ms
                .and_then(DateTime::from_timestamp_millis),
            lag_ms: u64::try_from(lag.as_millis()).unwrap_or(u64::MAX),
            pending_bytes: s.pending_bytes,
            cache_limit: self.config.max_cache_size,
            // The reading thread notices room only at its next poll; the shipper's count is
            // current.
            cache_full: e.cache_full && s.pending_bytes >= self.config.max_cache_size,
            wal_frames: e.wal_frames,
            last_error: e.last_error.or(s.last_error),
        }
    }

    /// Restores the latest state into the database path (which must be missing).
    pub async fn restore(&self) -> Result<()> {
        let opts = RestoreOptions {
            integrity_check: self.options.integrity_check,
            ..RestoreOptions::default()
        };
        self.restore_to(&self.config.db_path.clone(), &opts)
            .await
            .map(|_| ())
    }

    /// Restores into `dest` as `opts` says. A restore of the latest state into the database
    /// path itself lets the next start continue the same generation (nothing is re-uploaded).
    pub async fn restore_to(&self, dest: &Path, opts: &RestoreOptions) -> Result<Restored> {
        let Some((manifest, _)) = restore::load_manifest(self.store.as_ref()).await? else {
            return Err(ReplicatorError::NoReplica {
                db: dest.to_path_buf(),
            });
        };
        if manifest.generations.is_empty() {
            return Err(ReplicatorError::NoReplica {
                db: dest.to_path_buf(),
            });
        }
        let work = self.cache.work();
        let restored =
            restore::restore(Arc::clone(&self.store), &manifest, dest, &work, opts).await?;
        let latest = matches!(opts.target, Target::Latest)
            && restored.at_end
            && manifest
                .current()
                .is_some_and(|g| g.id == restored.generation);
        if dest == self.config.db_path {
            let cache = self.cache.clone();
            let (dest, restored) = (dest.to_path_buf(), restored.clone());
            let generation = manifest.generation(&restored.generation);
            let page_size = generation.map_or(manifest.page_size, |g| g.page_size);
            let root = Root {
                txid: restored.snapshot_txid,
                delta: generation.is_some_and(|g| {
                    g.snapshots
                        .iter()
                        .any(|s| s.txid == restored.snapshot_txid && s.parent.is_some())
                }),
            };
            tokio::task::spawn_blocking(move || -> Result<()> {
                if !latest {
                    // An older point: its future is not the stored one; a new generation starts.
                    return cache.drop_state().map_err(Into::into);
                }
                let next_item = cache.items()?.last().map_or(0, |i| i.number + 1);
                let db = FileId::of(&dest).map_err(|e| ReplicatorError::Config {
                    db: dest.clone(),
                    reason: format!("restored file cannot be read: {e}"),
                })?;
                cache.save_state(&LocalState {
                    format: 0,
                    generation: restored.generation.clone(),
                    page_size,
                    next_txid: restored.txid + 1,
                    last_commit_unix_ns: restored.committed_unix_ns,
                    cursor: None,
                    db,
                    next_item,
                    last_snapshot_unix_ms: now_ns() / 1_000_000,
                })?;
                // What the store restores is now on disk: a later break can ship only what
                // changed from it. (Optional: without the map that break ships everything.)
                let map = pagemap::hash_file(&dest, page_size)
                    .map_err(|e| e.to_string())
                    .and_then(|hashes| {
                        let (generation, txid) = (&restored.generation, restored.txid);
                        PageMap::create(cache.dir(), generation, root, txid, page_size, hashes)
                            .map_err(|e| e.to_string())
                    });
                if let Err(e) = map {
                    tracing::warn!(db = %dest.display(), error = %e, "no page map after the restore");
                }
                Ok(())
            })
            .await
            .expect("restore state task")?;
        }
        Ok(restored)
    }

    /// The store's manifest (`None`: nothing replicated yet).
    pub async fn manifest(&self) -> Result<Option<super::manifest::Manifest>> {
        Ok(restore::load_manifest(self.store.as_ref())
            .await?
            .map(|(m, _)| m))
    }

    /// Reads the manifest the way the shipper does (for tests and `db status`).
    pub async fn stored_txid(&self) -> Result<u64> {
        let (m, _) = ship::load_manifest(self.store.as_ref(), &self.name).await?;
        Ok(m.current()
            .map_or(0, super::manifest::Generation::last_txid))
    }
}

fn now_ns() -> i64 {
    super::now_unix_ns()
}

#[cfg(test)]
#[path = "handle_tests.rs"]
mod tests;
