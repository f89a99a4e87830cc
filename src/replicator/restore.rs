//! Restoring a replicated database from the store: its latest state, or as of a transaction or
//! an instant.
//!
//! A restore reads one generation only (histories never mix): its latest snapshot at or before
//! the target, then its segments in txid order up to the target. The one exception is a base
//! given as a delta, which names the state of the previous generation it applies to: that state
//! is built first, exactly as the delta's writer saw it. Objects download in parallel
//! into a private work directory and are applied strictly in order into a temporary file next to
//! `dest`, which [`PageFile::install`] checks and moves into place; `dest` is never touched on
//! failure. Every object is verified on the way (snapshot size and SHA-256, segment chains,
//! lineage and ranges, index chunk ranges), and an error names the object.

mod build;
mod plan;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt, stream};

pub use plan::{Plan, Stop, Target, plan};
use plan::{check_chunk, covering, parent_plan, wanted};

use super::apply::ApplyError;
use super::manifest::{
    self, ChunkRef, Generation, IndexChunk, MANIFEST_KEY, Manifest, ManifestError, SegmentEntry,
};
use crate::store::{ObjectStore, StoreError};
use crate::util::{private, unique_temp_name};

/// Failures of a restore; each names the object, file or target concerned.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the manifest lists no generation")]
    NoGeneration,
    #[error("generation {generation} is not in the manifest")]
    UnknownGeneration { generation: String },
    #[error(
        "transaction {txid} is past the end of generation {generation}, whose last stored \
         transaction is {last}"
    )]
    PastEnd {
        generation: String,
        txid: u64,
        last: u64,
    },
    #[error(
        "transaction {txid} is before generation {generation}, which starts after transaction \
         {base}"
    )]
    BeforeStart {
        generation: String,
        txid: u64,
        base: u64,
    },
    #[error(
        "transaction {txid} of generation {generation} is not stored: its segments end at \
         transaction {last} and no snapshot is at it"
    )]
    NotStored {
        generation: String,
        txid: u64,
        last: u64,
    },
    #[error("no generation has a snapshot taken at or before {unix_ns} (unix ns)")]
    NothingAt { unix_ns: i64 },
    #[error("object {key} does not exist")]
    Missing { key: String },
    #[error("object {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("cannot read object {key}")]
    Store {
        key: String,
        #[source]
        source: StoreError,
    },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("{path} exists; restore refuses to overwrite it without force")]
    Exists { path: PathBuf },
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("restore into {path}: a worker failed")]
    Task {
        path: PathBuf,
        #[source]
        source: tokio::task::JoinError,
    },
}

type Result<T> = std::result::Result<T, RestoreError>;

/// How to restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreOptions {
    pub target: Target,
    /// Run `PRAGMA integrity_check` before installing (slow on big databases).
    pub integrity_check: bool,
    /// Replace an existing `dest` (and drop its `-wal`/`-shm`).
    pub force: bool,
    /// Objects downloading at once (at least 1); up to two more wait on disk to be applied.
    pub parallelism: usize,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self {
            target: Target::Latest,
            integrity_check: true,
            force: false,
            parallelism: 4,
        }
    }
}

/// What a restore installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub generation: String,
    /// The last transaction applied.
    pub txid: u64,
    /// When it committed (the snapshot's time when no transaction was applied after it).
    pub committed_unix_ns: i64,
    pub db_pages: u32,
    /// The snapshot the restore started from.
    pub snapshot_txid: u64,
    /// Bytes of snapshot, segment and index objects read from the store (not the manifest).
    pub downloaded_bytes: u64,
    /// Restored to the generation's last stored transaction.
    pub at_end: bool,
}

/// Reads `metadata.json` with its etag; `None` when there is none.
///
/// The etag comes from a HEAD made before the GET, so it never belongs to a newer version than
/// the bytes returned: a conditional PUT with it fails rather than replace a manifest this one
/// has not seen. `None` for the etag when the backend gives none.
pub async fn load_manifest(store: &dyn ObjectStore) -> Result<Option<(Manifest, Option<String>)>> {
    let info = store
        .head(MANIFEST_KEY)
        .await
        .map_err(|e| store_error(MANIFEST_KEY, e))?;
    let Some(bytes) = store
        .get_bytes(MANIFEST_KEY)
        .await
        .map_err(|e| store_error(MANIFEST_KEY, e))?
    else {
        return Ok(None);
    };
    let manifest = Manifest::parse(&bytes, MANIFEST_KEY)?;
    Ok(Some((manifest, info.and_then(|i| i.etag))))
}

/// Restores `manifest`'s database as `opts.target` says into `dest`, downloading into a private
/// directory under `work_dir`.
///
/// Without `opts.force`, refuses when `dest` or its `-wal` exists (a leftover WAL would be
/// replayed onto the restored file); the final rename also never replaces a database that
/// appeared meanwhile.
pub async fn restore(
    store: Arc<dyn ObjectStore>,
    manifest: &Manifest,
    dest: &Path,
    work_dir: &Path,
    opts: &RestoreOptions,
) -> Result<Restored> {
    let plan = plan(manifest, &opts.target)?;
    if !opts.force {
        refuse_existing(dest).await?;
    }
    let parallelism = opts.parallelism.max(1);
    // A delta base is applied over its parent's state, which is built first.
    let mut plans = vec![plan.clone()];
    if let Some(p) = &plan.snapshot.parent {
        plans.insert(0, parent_plan(manifest, &plan, p)?);
    }
    let mut stages = Vec::new();
    let mut index_bytes = 0;
    for plan in plans {
        let generation = manifest
            .generation(&plan.generation)
            .expect("the plan names a listed generation");
        let (segments, bytes) = segments_for(&*store, generation, &plan, parallelism).await?;
        index_bytes += bytes;
        stages.push(build::Stage { plan, segments });
    }
    let scratch = Scratch::create(dest, work_dir).await?;
    let (out, at, downloaded) = build::build(store, stages, &scratch, parallelism).await?;
    let dest_path = dest.to_path_buf();
    let (check, force) = (opts.integrity_check, opts.force);
    tokio::task::spawn_blocking(move || out.install(&dest_path, check, force))
        .await
        .map_err(|source| RestoreError::Task {
            path: dest.to_path_buf(),
            source,
        })??;
    drop(scratch);
    Ok(Restored {
        generation: plan.generation,
        txid: at.txid,
        committed_unix_ns: at.committed_unix_ns,
        db_pages: at.db_pages,
        snapshot_txid: plan.snapshot.txid,
        downloaded_bytes: downloaded + index_bytes,
        at_end: at.txid == plan.end,
    })
}

async fn refuse_existing(dest: &Path) -> Result<()> {
    for path in [dest.to_path_buf(), with_suffix(dest, "-wal")] {
        match tokio::fs::symlink_metadata(&path).await {
            Ok(_) => return Err(RestoreError::Exists { path }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(RestoreError::Io {
                    op: "check",
                    path,
                    source,
                });
            }
        }
    }
    Ok(())
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn store_error(key: &str, e: StoreError) -> RestoreError {
    match e {
        StoreError::NotFound { .. } => RestoreError::Missing {
            key: key.to_string(),
        },
        source => RestoreError::Store {
            key: key.to_string(),
            source,
        },
    }
}

/// The segments the plan needs (reading the index chunks that list some of them) and the bytes
/// those chunks took.
async fn segments_for(
    store: &dyn ObjectStore,
    g: &Generation,
    plan: &Plan,
    parallelism: usize,
) -> Result<(Vec<SegmentEntry>, u64)> {
    let chunks: Vec<(IndexChunk, u64)> =
        stream::iter(g.chunks.iter().filter(|c| wanted(plan, c.first, c.last)))
            .map(|c| fetch_chunk(store, &g.id, c))
            .buffered(parallelism)
            .try_collect()
            .await?;
    let bytes = chunks.iter().map(|(_, n)| n).sum();
    let entries = chunks.into_iter().flat_map(|(c, _)| c.segments);
    let segments = covering(plan, entries.chain(g.segments.iter().copied())).map_err(|reason| {
        RestoreError::Corrupt {
            key: MANIFEST_KEY.to_string(),
            reason,
        }
    })?;
    Ok((segments, bytes))
}

async fn fetch_chunk(
    store: &dyn ObjectStore,
    generation: &str,
    chunk: &ChunkRef,
) -> Result<(IndexChunk, u64)> {
    let key = manifest::chunk_key(generation, chunk.first);
    let bytes = store
        .get_bytes(&key)
        .await
        .map_err(|e| store_error(&key, e))?
        .ok_or_else(|| RestoreError::Missing { key: key.clone() })?;
    let corrupt = |reason| RestoreError::Corrupt {
        key: key.clone(),
        reason,
    };
    let index: IndexChunk = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    check_chunk(chunk, &index).map_err(corrupt)?;
    Ok((index, bytes.len() as u64))
}

/// The restore's own files: a work directory for downloads, and the database being built next
/// to `dest`. Both are removed when this is dropped, so an error or a cancelled restore leaves
/// nothing behind (after a successful install the database has moved to `dest`).
#[derive(Debug)]
struct Scratch {
    dir: PathBuf,
    db: PathBuf,
}

impl Scratch {
    async fn create(dest: &Path, work_dir: &Path) -> Result<Self> {
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| RestoreError::Io { op, path, source }
        };
        let name = dest
            .file_name()
            .ok_or_else(|| io("restore to", dest)(std::io::ErrorKind::InvalidInput.into()))?;
        let mut base = b".".to_vec();
        base.extend_from_slice(name.as_encoded_bytes());
        let db = dest.with_file_name(unique_temp_name(&base, "restore"));
        let work_dir = work_dir.to_path_buf();
        let dir = tokio::task::spawn_blocking(move || {
            private::create_dir_all(&work_dir).map_err(io("create", &work_dir))?;
            let dir = work_dir.join(unique_temp_name(b"restore", "work"));
            std::fs::DirBuilder::new()
                .mode(private::DIR_MODE)
                .create(&dir)
                .map_err(io("create", &dir))?;
            Ok::<_, RestoreError>(dir)
        })
        .await
        .map_err(|source| RestoreError::Task {
            path: dest.to_path_buf(),
            source,
        })??;
        Ok(Self { dir, db })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.db);
    }
}

#[cfg(test)]
#[path = "restore_tests.rs"]
mod tests;
