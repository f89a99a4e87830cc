//! The staging dir: archives being packed, and packed archives waiting to be published.
//!
//! A packed archive is renamed to `ready/{identity}.{digest}.tar.zst` and an intent file is written
//! next to it *before* the upload starts, so a sync killed mid-upload can be finished later
//! (blob, metadata and manifest) by `resume_pending`/`gc` without repacking.
//!
//! Archives are not fsynced: after a power loss one may be short or hold zeros, so every resume
//! checks it against the digest in its (fsynced) intent first ([`Staging::intact`]) and drops a
//! damaged one. Its source (the upper dir, or the snapshotter's outbox copy) outlives the intent,
//! so the next sync packs it again. Writing each archive back to disk up front would cost a
//! synchronous write of the whole layer on every sync to save a repack after a rare crash.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};

use super::error::{LayerError, Result, io};
use super::manifest::ArchiveFormat;
use super::types::{ContainerLayerId, LayerSnapshot};
use crate::sys::private;

const INTENT_SUFFIX: &str = ".intent.json";
const BLOB_SUFFIX: &str = ".tar.zst";
const LOCK_SUFFIX: &str = ".lock";

/// A packed archive that still has to be published for an identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub identity: ContainerLayerId,
    pub snapshot: LayerSnapshot,
    pub format: ArchiveFormat,
    pub fingerprint: Option<String>,
    /// Explicit ordering ticket, if the caller gave one.
    pub seq: Option<u64>,
    /// Local ticket taken when the sync started (used when `seq` is `None`).
    pub ticket: u64,
    pub base: Option<Vec<String>>,
    pub started_at: DateTime<Utc>,
    /// When the archive is a delta: what a restore applies before it (see
    /// [`super::manifest::ManifestEntry::chain`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<super::manifest::ChainLink>,
    /// Digests of `chain` that no manifest referenced when this was staged (a checkpoint's
    /// first pass): a resumed publish makes sure they are still stored before the manifest
    /// names them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fresh_links: Vec<String>,
}

/// Paths inside the staging dir.
#[derive(Debug)]
pub struct Staging {
    tmp: PathBuf,
    ready: PathBuf,
    locks: PathBuf,
    index: PathBuf,
}

impl Staging {
    /// Creates `tmp/`, `ready/`, `locks/` and `index/` under `root`, private (0700): spools and
    /// restore downloads hold layer data, indexes list file names. They are ours alone and are
    /// tightened if they already existed; `root` is only given 0700 when it is created here (it
    /// may be shared).
    pub fn open(root: &Path) -> Result<Self> {
        let tmp = root.join("tmp");
        let ready = root.join("ready");
        let locks = root.join("locks");
        let index = root.join("index");
        private::create_dir_all(root).map_err(io(root))?;
        for dir in [&tmp, &ready, &locks, &index] {
            private::create_own_dir(dir).map_err(io(dir))?;
        }
        Ok(Self {
            tmp,
            ready,
            locks,
            index,
        })
    }

    /// Where this node keeps the index of the version of `id` it last stored or restored (the
    /// base for the next delta).
    pub fn index_path(&self, id: &ContainerLayerId) -> PathBuf {
        self.index.join(format!("{}.idx", id.to_key()))
    }

    /// A fresh, unique path for an archive being packed or downloaded.
    pub fn temp_path(&self, what: &str) -> PathBuf {
        let mut name = crate::util::unique_temp_name(what.as_bytes(), "spool");
        name.push(BLOB_SUFFIX);
        self.tmp.join(name)
    }

    /// Where a packed archive waits for publication (unique per identity and digest).
    pub fn ready_path(&self, id: &ContainerLayerId, digest: &str) -> PathBuf {
        self.ready
            .join(format!("{}.{digest}{BLOB_SUFFIX}", id.to_key()))
    }

    fn intent_path(&self, id: &ContainerLayerId, digest: &str) -> PathBuf {
        self.ready
            .join(format!("{}.{digest}{INTENT_SUFFIX}", id.to_key()))
    }

    /// Moves a packed archive into `ready/` and records what remains to be done, durably.
    pub fn commit(&self, packed: &Path, intent: &Intent) -> Result<PathBuf> {
        let blob = self.ready_path(&intent.identity, &intent.snapshot.digest);
        std::fs::rename(packed, &blob).map_err(io(&blob))?;
        self.rewrite_intent(intent)?;
        Ok(blob)
    }

    /// Replaces the intent of an already committed archive (new ordering for a retried sync).
    pub fn rewrite_intent(&self, intent: &Intent) -> Result<()> {
        let text = serde_json::to_vec_pretty(intent).map_err(|source| LayerError::Serialize {
            what: "sync intent",
            source,
        })?;
        write_atomic(
            &self.intent_path(&intent.identity, &intent.snapshot.digest),
            &text,
        )
    }

    /// Deletes a published archive and its intent (intent first: an archive without intent is
    /// only garbage, an intent without archive would be an unfinishable sync).
    pub fn finish(&self, id: &ContainerLayerId, digest: &str) -> Result<()> {
        remove_if_exists(&self.intent_path(id, digest))?;
        remove_if_exists(&self.ready_path(id, digest))
    }

    /// Whether `blob` still holds exactly the archive `intent` describes (size and sha256).
    /// Blocking: reads the whole file.
    pub fn intact(intent: &Intent, blob: &Path) -> Result<bool> {
        let len = match std::fs::metadata(blob) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io(blob)(e)),
        };
        if len != intent.snapshot.compressed_size_bytes {
            return Ok(false);
        }
        let digest = crate::archive::sha256_file(blob).map_err(io(blob))?;
        Ok(digest == intent.snapshot.digest)
    }

    /// Whether the intent of `id` and `digest` is still pending.
    pub fn has_intent(&self, id: &ContainerLayerId, digest: &str) -> bool {
        self.intent_path(id, digest).exists()
    }

    /// Intents left by interrupted syncs, with their archive path.
    pub fn pending(&self) -> Result<Vec<(Intent, PathBuf)>> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.ready).map_err(io(&self.ready))?;
        for entry in entries {
            let entry = entry.map_err(io(&self.ready))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.ends_with(INTENT_SUFFIX) {
                continue;
            }
            let path = entry.path();
            let text = std::fs::read(&path).map_err(io(&path))?;
            let intent: Intent = match serde_json::from_slice(&text) {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable sync intent");
                    continue;
                }
            };
            let blob = self.ready_path(&intent.identity, &intent.snapshot.digest);
            out.push((intent, blob));
        }
        out.sort_by_key(|(intent, _)| intent.started_at);
        Ok(out)
    }

    /// Deletes temp files older than `age` and ready archives that have no intent.
    pub fn sweep(&self, age: Duration) -> Result<u32> {
        let mut removed = 0;
        let now = SystemTime::now();
        let old = |p: &Path| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|d| d >= age)
        };
        for entry in std::fs::read_dir(&self.tmp).map_err(io(&self.tmp))? {
            let path = entry.map_err(io(&self.tmp))?.path();
            if old(&path) {
                remove_if_exists(&path)?;
                removed += 1;
            }
        }
        for entry in std::fs::read_dir(&self.ready).map_err(io(&self.ready))? {
            let path = entry.map_err(io(&self.ready))?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if let Some(stem) = name.strip_suffix(BLOB_SUFFIX)
                && !self.ready.join(format!("{stem}{INTENT_SUFFIX}")).exists()
                && old(&path)
            {
                remove_if_exists(&path)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Holds an identity's cross-process lock file (`locks/{identity}.lock`) until dropped, so a CLI
/// and a daemon sharing a staging dir never publish the same identity at once.
#[derive(Debug)]
pub struct IdentityLock {
    _file: File,
}

impl Staging {
    /// Locks `id` across processes; `wait = false` returns `None` when another holder has it.
    /// Blocking: call from `spawn_blocking`.
    pub fn lock_identity(&self, id: &ContainerLayerId, wait: bool) -> Result<Option<IdentityLock>> {
        let path = self.locks.join(format!("{}{LOCK_SUFFIX}", id.to_key()));
        let file = private::file_options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        let op = if wait {
            FlockOperation::LockExclusive
        } else {
            FlockOperation::NonBlockingLockExclusive
        };
        match rustix::fs::flock(&file, op) {
            Ok(()) => Ok(Some(IdentityLock { _file: file })),
            Err(rustix::io::Errno::WOULDBLOCK) if !wait => Ok(None),
            Err(e) => Err(LayerError::Io {
                path,
                source: e.into(),
            }),
        }
    }
}

/// Removes a file, treating "already gone" as success.
pub fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LayerError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// Write to a temp file, fsync, rename over `path`, fsync the directory.
fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut f = private::create(&tmp).map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn intent(id: &ContainerLayerId, digest: &str) -> Intent {
        Intent {
            identity: id.clone(),
            snapshot: LayerSnapshot {
                digest: digest.into(),
                size_bytes: 1,
                compressed_size_bytes: 1,
                created_at: Utc::now(),
                file_count: 1,
                uncompressed_digest: "u".into(),
                unchanged: false,
            },
            format: ArchiveFormat {
                tar_format: "pax-oci-layer".into(),
                tar_format_version: 1,
                compression: "zstd".into(),
                zstd_level: 3,
                zstd_workers: 2,
                zstd_library_version: "1.5.7".into(),
                uncompressed_digest: "u".into(),
                uncompressed_size: 1,
                skipped_sockets: 0,
                overlay_parameters: BTreeMap::new(),
            },
            fingerprint: Some("fp".into()),
            seq: None,
            ticket: 3,
            base: None,
            started_at: Utc::now(),
            chain: Vec::new(),
            fresh_links: Vec::new(),
        }
    }

    #[test]
    fn commit_pending_finish_cycle() {
        let dir = tempfile::tempdir().unwrap();
        let st = Staging::open(dir.path()).unwrap();
        let id = ContainerLayerId::new("s", "i");
        let tmp = st.temp_path("pack");
        std::fs::write(&tmp, b"archive").unwrap();
        let blob = st.commit(&tmp, &intent(&id, "abc")).unwrap();
        assert!(!tmp.exists());
        assert_eq!(std::fs::read(&blob).unwrap(), b"archive");
        let pending = st.pending().unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(
            pending[0].0,
            intent(&id, "abc").clone_with_times(&pending[0].0)
        );
        assert_eq!(pending[0].1, blob);
        st.finish(&id, "abc").unwrap();
        assert!(st.pending().unwrap().is_empty());
        assert!(!blob.exists());
    }

    #[test]
    fn staging_dirs_spools_intents_and_locks_are_private_under_any_umask() {
        use crate::sys::private::testing::{assert_private, for_each_umask};
        use std::os::unix::fs::PermissionsExt;
        for_each_umask(|_| {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("staging");
            let st = Staging::open(&root).unwrap();
            assert_private(&root);
            // Subdirs left world-readable by an older version are tightened on open.
            std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o755))
                .unwrap();
            let st = {
                drop(st);
                Staging::open(&root).unwrap()
            };
            let upper = dir.path().join("upper");
            std::fs::create_dir(&upper).unwrap();
            std::fs::write(upper.join("secret"), b"s3cr3t").unwrap();
            let spool = st.temp_path("pack");
            let stats = crate::archive::pack_to_file(
                &upper,
                &spool,
                &crate::archive::PackOptions::default(),
                None,
            )
            .unwrap();
            assert_private(&spool);
            let id = ContainerLayerId::new("s", "i");
            let blob = st.commit(&spool, &intent(&id, &stats.digest)).unwrap();
            let _lock = st.lock_identity(&id, true).unwrap().unwrap();
            for p in [
                root.clone(),
                root.join("tmp"),
                root.join("ready"),
                root.join("locks"),
                blob,
                st.intent_path(&id, &stats.digest),
                st.locks.join(format!("{}{LOCK_SUFFIX}", id.to_key())),
            ] {
                assert_private(&p);
            }
        });
    }

    #[test]
    fn sweep_removes_only_old_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let st = Staging::open(dir.path()).unwrap();
        let id = ContainerLayerId::new("s", "i");
        let tmp = st.temp_path("pack");
        std::fs::write(&tmp, b"x").unwrap();
        let orphan = st.ready_path(&id, "orphan");
        std::fs::write(&orphan, b"x").unwrap();
        let kept_src = st.temp_path("pack");
        std::fs::write(&kept_src, b"x").unwrap();
        let kept = st.commit(&kept_src, &intent(&id, "kept")).unwrap();
        assert_eq!(st.sweep(Duration::from_secs(3600)).unwrap(), 0);
        assert_eq!(st.sweep(Duration::ZERO).unwrap(), 2);
        assert!(!tmp.exists() && !orphan.exists());
        assert!(kept.exists(), "an archive with an intent is never swept");
    }

    #[test]
    fn identity_lock_excludes_other_holders_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let st = Staging::open(dir.path()).unwrap();
        let other = Staging::open(dir.path()).unwrap();
        let (a, b) = (
            ContainerLayerId::new("s", "a"),
            ContainerLayerId::new("s", "b"),
        );
        let held = st.lock_identity(&a, true).unwrap().unwrap();
        assert!(other.lock_identity(&a, false).unwrap().is_none());
        assert!(other.lock_identity(&b, false).unwrap().is_some());
        drop(held);
        assert!(other.lock_identity(&a, false).unwrap().is_some());
        // Lock files are not mistaken for orphaned archives.
        assert_eq!(st.sweep(Duration::ZERO).unwrap(), 0);
    }

    impl Intent {
        fn clone_with_times(&self, other: &Intent) -> Intent {
            let mut c = self.clone();
            c.started_at = other.started_at;
            c.snapshot.created_at = other.snapshot.created_at;
            c
        }
    }
}
