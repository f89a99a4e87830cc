//! LayerSyncManager against the local-directory store, with a counting wrapper store.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use super::StateDb;
use super::manifest::blob_key;
use super::*;
use crate::config::LayerStorageConfig;
use crate::layer::types::ContainerLayerId;
use crate::store::{
    ObjectInfo, ObjectStore, Progress, PutCondition, PutOutcome, StoreError, UploadJournal,
    UploadReport,
};
use crate::util::error_chain;

type StoreResult<T> = std::result::Result<T, StoreError>;

/// Delegates to a real store, counting writes and tracking concurrent uploads.
#[derive(Debug)]
pub(super) struct Counting {
    inner: Arc<dyn ObjectStore>,
    uploads: AtomicU32,
    parts_sent: AtomicU32,
    puts: AtomicU32,
    in_flight: AtomicU32,
    max_in_flight: AtomicU32,
    upload_delay: Duration,
    pub(super) fail_next_upload: AtomicBool,
    /// Deletes the object right after an upload that found it already stored (a `gc` racing
    /// the sync).
    pub(super) vanish_after_existing_upload: AtomicBool,
    /// Written (key, bytes) just before the next GET of a manifest is served (a sync
    /// elsewhere publishing while `gc` reads the manifests).
    pub(super) put_before_manifest_get: std::sync::Mutex<Option<(String, Vec<u8>)>>,
    /// Downloads of these keys wait (up to 5 s) until a subdirectory of the dir holds an
    /// entry of the name: an extraction into a staging dir there has reached it.
    pub(super) hold_downloads: std::sync::Mutex<Option<(Vec<String>, PathBuf, String)>>,
    /// A held download gave up waiting.
    pub(super) hold_timed_out: AtomicBool,
}

impl Counting {
    fn new(inner: Arc<dyn ObjectStore>, upload_delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner,
            uploads: AtomicU32::new(0),
            parts_sent: AtomicU32::new(0),
            puts: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            max_in_flight: AtomicU32::new(0),
            upload_delay,
            fail_next_upload: AtomicBool::new(false),
            vanish_after_existing_upload: AtomicBool::new(false),
            put_before_manifest_get: std::sync::Mutex::new(None),
            hold_downloads: std::sync::Mutex::new(None),
            hold_timed_out: AtomicBool::new(false),
        })
    }
}

#[async_trait::async_trait]
impl ObjectStore for Counting {
    fn describe(&self) -> String {
        format!("counting({})", self.inner.describe())
    }
    async fn head(&self, key: &str) -> StoreResult<Option<ObjectInfo>> {
        self.inner.head(key).await
    }
    async fn get_bytes(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let put = if key.starts_with(manifest::MANIFEST_PREFIX) {
            self.put_before_manifest_get.lock().unwrap().take()
        } else {
            None
        };
        if let Some((k, data)) = put {
            self.inner.put_bytes(&k, data, PutCondition::None).await?;
        }
        self.inner.get_bytes(key).await
    }
    async fn put_bytes(
        &self,
        key: &str,
        data: Vec<u8>,
        cond: PutCondition,
    ) -> StoreResult<PutOutcome> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put_bytes(key, data, cond).await
    }
    async fn conditional_writes(&self) -> StoreResult<bool> {
        self.inner.conditional_writes().await
    }
    async fn download_to_file(
        &self,
        key: &str,
        dest: &Path,
        progress: Option<Progress>,
    ) -> StoreResult<u64> {
        let hold = self.hold_downloads.lock().unwrap().clone();
        if let Some((_, dir, name)) = hold.filter(|(keys, ..)| keys.iter().any(|k| k == key)) {
            let reached = || {
                std::fs::read_dir(&dir)
                    .unwrap()
                    .any(|e| e.unwrap().path().join(&name).exists())
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !reached() {
                if std::time::Instant::now() > deadline {
                    self.hold_timed_out.store(true, Ordering::SeqCst);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        self.inner.download_to_file(key, dest, progress).await
    }
    async fn upload_file(
        &self,
        key: &str,
        src: &Path,
        journal: &dyn UploadJournal,
        progress: Option<Progress>,
    ) -> StoreResult<UploadReport> {
        self.uploads.fetch_add(1, Ordering::SeqCst);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.upload_delay).await;
        let result = if self.fail_next_upload.swap(false, Ordering::SeqCst) {
            Err(StoreError::Config {
                reason: "injected upload failure".into(),
            })
        } else {
            self.inner.upload_file(key, src, journal, progress).await
        };
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Ok(r) = &result {
            self.parts_sent.fetch_add(r.parts_sent, Ordering::SeqCst);
            if r.already_existed
                && self
                    .vanish_after_existing_upload
                    .swap(false, Ordering::SeqCst)
            {
                self.inner.delete(key).await?;
            }
        }
        result
    }
    async fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.inner.delete(key).await
    }
    async fn abort_stale_uploads(
        &self,
        older_than: Duration,
        journal: &dyn UploadJournal,
    ) -> StoreResult<u32> {
        self.inner.abort_stale_uploads(older_than, journal).await
    }
}

pub(super) use super::testenv::SharedStore as Env;

impl Env {
    pub(super) async fn counting_node(
        &self,
        node: &str,
        delay: Duration,
    ) -> (LayerSyncManager, Arc<Counting>) {
        let counting = Counting::new(Arc::clone(&self.store), delay);
        let store: Arc<dyn ObjectStore> = counting.clone();
        let m = LayerSyncManager::with_store(self.config(node), store)
            .await
            .unwrap();
        (m, counting)
    }

    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

pub(super) fn make_tree(root: &Path, variant: &str) {
    std::fs::create_dir_all(root.join("etc/app")).unwrap();
    std::fs::write(root.join("etc/app/config"), format!("variant={variant}\n")).unwrap();
    std::fs::write(root.join("data.bin"), vec![7u8; 100_000]).unwrap();
    std::fs::set_permissions(
        root.join("data.bin"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::os::unix::fs::symlink("etc/app/config", root.join("link")).unwrap();
}

/// Path → (kind, mode, size, mtime, content or link target).
pub(super) fn describe_tree(root: &Path) -> BTreeMap<String, (String, u32, u64, i64, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (String, u32, u64, i64, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let md = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let ft = md.file_type();
            let (kind, body) = if ft.is_symlink() {
                (
                    "link",
                    std::fs::read_link(&path)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                )
            } else if ft.is_dir() {
                walk(root, &path, out);
                ("dir", Vec::new())
            } else {
                ("file", std::fs::read(&path).unwrap())
            };
            let size = if ft.is_file() { md.len() } else { 0 };
            let mtime = if ft.is_symlink() { 0 } else { md.mtime() };
            out.insert(rel, (kind.to_string(), md.mode(), size, mtime, body));
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

pub(super) fn id(s: &str) -> ContainerLayerId {
    ContainerLayerId::new("svc", s)
}

#[tokio::test]
async fn sync_then_restore_on_an_empty_node_round_trips() {
    let env = Env::new();
    let upper = env.path("upper");
    make_tree(&upper, "a");
    let (a, _) = env.counting_node("a", Duration::ZERO).await;
    let snap = a.sync_layer(&id("0"), &upper).await.unwrap();
    assert!(!snap.unchanged);
    assert_eq!(snap.digest.len(), 64);

    let (b, _) = env.counting_node("b", Duration::ZERO).await;
    let target = env.path("restored");
    let restored = b.restore_layer(&id("0"), &target).await.unwrap().unwrap();
    assert_eq!(restored.digest, snap.digest);
    assert_eq!(describe_tree(&upper), describe_tree(&target));

    let m = b.manifest(&id("0")).await.unwrap().unwrap();
    assert_eq!(m.current.digest, snap.digest);
    assert_eq!(m.identity, id("0"));
    let meta = env
        .store
        .get_bytes(&manifest::meta_key(&snap.digest))
        .await
        .unwrap()
        .unwrap();
    let meta: LayerMeta = serde_json::from_slice(&meta).unwrap();
    assert_eq!(meta.format.tar_format, TAR_FORMAT);
    assert_eq!(meta.format.uncompressed_digest, snap.uncompressed_digest);
    assert!(!meta.format.zstd_library_version.is_empty());

    assert!(
        b.restore_layer(&id("unknown"), env.path("none"))
            .await
            .unwrap()
            .is_none()
    );
    assert!(!env.path("none").exists());
    assert_no_spools(&env, "a");
    assert_no_spools(&env, "b");
}

pub(super) fn assert_no_spools(env: &Env, node: &str) {
    for sub in ["tmp", "ready"] {
        let dir = env.path(node).join("staging").join(sub);
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "{}: {left:?}", dir.display());
    }
}

#[tokio::test]
async fn second_sync_of_an_unchanged_tree_uploads_nothing() {
    let env = Env::new();
    let upper = env.path("upper");
    make_tree(&upper, "a");
    let (m, counting) = env.counting_node("a", Duration::ZERO).await;
    let first = m.sync_layer(&id("0"), &upper).await.unwrap();
    let (uploads, puts) = (
        counting.uploads.load(Ordering::SeqCst),
        counting.puts.load(Ordering::SeqCst),
    );
    assert_eq!(uploads, 1);
    let second = m
        .sync_layer_detailed(&id("0"), &upper, SyncOptions::default())
        .await
        .unwrap();
    assert!(second.snapshot.unchanged);
    assert!(second.upload.is_none());
    assert_eq!(second.snapshot.digest, first.digest);
    assert_eq!(counting.uploads.load(Ordering::SeqCst), uploads);
    assert_eq!(counting.puts.load(Ordering::SeqCst), puts);

    // A change is noticed.
    std::fs::write(upper.join("etc/app/config"), "variant=b\n").unwrap();
    let third = m.sync_layer(&id("0"), &upper).await.unwrap();
    assert!(!third.unchanged);
    assert_ne!(third.digest, first.digest);
    assert_eq!(counting.uploads.load(Ordering::SeqCst), uploads + 1);
}

#[tokio::test]
async fn equal_digest_with_unknown_fingerprint_is_unchanged_and_learns_the_fingerprint() {
    let env = Env::new();
    let upper = env.path("upper");
    make_tree(&upper, "a");
    let (a, _) = env.counting_node("a", Duration::ZERO).await;
    let snap = a.sync_layer(&id("0"), &upper).await.unwrap();

    // Node b has never seen this tree: it must pack to find out, then upload nothing.
    let (b, counting) = env.counting_node("b", Duration::ZERO).await;
    let db = StateDb::open(&env.config("b").state_db_path).unwrap();
    assert!(db.get_sync_record(&id("0")).await.unwrap().is_none());
    let again = b.sync_layer(&id("0"), &upper).await.unwrap();
    assert!(again.unchanged);
    assert_eq!(again.digest, snap.digest);
    assert_eq!(counting.uploads.load(Ordering::SeqCst), 0);
    assert_eq!(counting.puts.load(Ordering::SeqCst), 0);
    let rec = db.get_sync_record(&id("0")).await.unwrap().unwrap();
    assert_eq!(
        rec.fingerprint_digest.as_deref(),
        Some(snap.digest.as_str())
    );
    assert!(rec.fingerprint.is_some());
    assert_no_spools(&env, "b");
}

#[tokio::test]
async fn restored_untouched_tree_is_unchanged_on_next_sync() {
    let env = Env::new();
    let upper = env.path("upper");
    make_tree(&upper, "a");
    let (a, _) = env.counting_node("a", Duration::ZERO).await;
    let snap = a.sync_layer(&id("0"), &upper).await.unwrap();
    let (b, counting) = env.counting_node("b", Duration::ZERO).await;
    let target = env.path("restored");
    b.restore_layer(&id("0"), &target).await.unwrap().unwrap();
    let db = StateDb::open(&env.config("b").state_db_path).unwrap();
    let rec = db.get_sync_record(&id("0")).await.unwrap().unwrap();
    assert_eq!(
        rec.fingerprint_digest.as_deref(),
        Some(snap.digest.as_str())
    );
    assert_eq!(
        rec.state.remote_digest.as_deref(),
        Some(snap.digest.as_str())
    );
    let next = b.sync_layer(&id("0"), &target).await.unwrap();
    assert!(next.unchanged);
    assert_eq!(counting.uploads.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn older_seq_uploads_its_blob_but_does_not_move_the_manifest() {
    let env = Env::new();
    let (m, _) = env.counting_node("a", Duration::ZERO).await;
    let (v1, v2) = (env.path("v1"), env.path("v2"));
    make_tree(&v1, "1");
    make_tree(&v2, "2");
    let opts = |seq| SyncOptions {
        seq: Some(seq),
        base: Some(vec!["sha256:base".into()]),
        ..SyncOptions::default()
    };
    let new = m.sync_layer_detailed(&id("0"), &v1, opts(5)).await.unwrap();
    assert!(new.manifest_moved);
    let old = m.sync_layer_detailed(&id("0"), &v2, opts(3)).await.unwrap();
    assert!(!old.manifest_moved);
    assert!(
        env.store
            .head(&blob_key(&old.snapshot.digest))
            .await
            .unwrap()
            .is_some()
    );
    let manifest = m.manifest(&id("0")).await.unwrap().unwrap();
    assert_eq!(manifest.current.digest, new.snapshot.digest);
    assert_eq!(manifest.current.seq, 5);
    assert_eq!(manifest.current.base, Some(vec!["sha256:base".to_string()]));
    assert!(manifest.history.is_empty());

    // A newer ticket with the same content moves it, reusing the uploaded blob.
    let newer = m.sync_layer_detailed(&id("0"), &v2, opts(6)).await.unwrap();
    assert!(newer.manifest_moved);
    assert!(newer.upload.unwrap().already_existed);
    let manifest = m.manifest(&id("0")).await.unwrap().unwrap();
    assert_eq!(manifest.current.digest, old.snapshot.digest);
    assert_eq!(manifest.current.seq, 6);

    // Tickets from next_seq increase.
    let t1 = m.next_seq(&id("0")).await.unwrap();
    let t2 = m.next_seq(&id("0")).await.unwrap();
    assert!(t2 > t1);
}

#[tokio::test]
async fn manifest_keeps_history_newest_first() {
    let env = Env::new();
    let (m, _) = env.counting_node("a", Duration::ZERO).await;
    let upper = env.path("upper");
    make_tree(&upper, "0");
    let mut digests = vec![m.sync_layer(&id("0"), &upper).await.unwrap().digest];
    for v in 1..3 {
        std::fs::write(upper.join("etc/app/config"), format!("variant={v}\n")).unwrap();
        digests.push(m.sync_layer(&id("0"), &upper).await.unwrap().digest);
    }
    let manifest = m.manifest(&id("0")).await.unwrap().unwrap();
    assert_eq!(manifest.current.digest, digests[2]);
    let history: Vec<_> = manifest.history.iter().map(|e| e.digest.clone()).collect();
    assert_eq!(history, vec![digests[1].clone(), digests[0].clone()]);
    assert!(manifest.current.seq > manifest.history[0].seq);
    // The manifest of another identity is separate.
    assert!(m.manifest(&id("1")).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn syncs_of_one_identity_are_serialized_and_of_two_run_in_parallel() {
    let env = Env::new();
    let (m, counting) = env.counting_node("a", Duration::from_millis(400)).await;
    let (x, y) = (env.path("x"), env.path("y"));
    make_tree(&x, "x");
    make_tree(&y, "y");

    let (i0, i1, i2) = (id("0"), id("1"), id("2"));
    let (r1, r2) = tokio::join!(m.sync_layer(&i0, &x), m.sync_layer(&i0, &y));
    r1.unwrap();
    r2.unwrap();
    assert_eq!(counting.uploads.load(Ordering::SeqCst), 2);
    assert_eq!(
        counting.max_in_flight.load(Ordering::SeqCst),
        1,
        "same identity overlapped"
    );

    std::fs::write(x.join("extra"), "1").unwrap();
    std::fs::write(y.join("extra"), "2").unwrap();
    let (r1, r2) = tokio::join!(m.sync_layer(&i1, &x), m.sync_layer(&i2, &y));
    r1.unwrap();
    r2.unwrap();
    assert_eq!(
        counting.max_in_flight.load(Ordering::SeqCst),
        2,
        "two identities did not overlap"
    );
}

#[tokio::test]
async fn corrupt_blob_fails_restore_naming_the_key_and_leaves_target_untouched() {
    let env = Env::new();
    let upper = env.path("upper");
    make_tree(&upper, "a");
    let (m, _) = env.counting_node("a", Duration::ZERO).await;
    let snap = m.sync_layer(&id("0"), &upper).await.unwrap();
    let key = blob_key(&snap.digest);
    let mut data = env.store.get_bytes(&key).await.unwrap().unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    env.store
        .put_bytes(&key, data, PutCondition::None)
        .await
        .unwrap();

    let target = env.path("target");
    std::fs::create_dir(&target).unwrap();
    let err = m.restore_layer(&id("0"), &target).await.unwrap_err();
    let chain = error_chain(&err);
    assert!(chain.contains(&key), "{chain}");
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
    let absent = env.path("absent");
    m.restore_layer(&id("0"), &absent).await.unwrap_err();
    assert!(!absent.exists());
    assert_no_spools(&env, "a");
}

#[tokio::test]
async fn interrupted_sync_is_finished_by_resume_pending() {
    let env = Env::new();
    let upper = env.path("upper");
    make_tree(&upper, "a");
    let (m, counting) = env.counting_node("a", Duration::ZERO).await;
    counting.fail_next_upload.store(true, Ordering::SeqCst);
    let err = m.sync_layer(&id("0"), &upper).await.unwrap_err();
    assert!(
        error_chain(&err).contains("injected"),
        "{}",
        error_chain(&err)
    );
    assert!(m.manifest(&id("0")).await.unwrap().is_none());

    // A new process (same node) finishes it without repacking.
    let (m2, counting2) = env.counting_node("a", Duration::ZERO).await;
    assert_eq!(m2.resume_pending().await.unwrap(), 1);
    assert_eq!(counting2.uploads.load(Ordering::SeqCst), 1);
    let manifest = m2.manifest(&id("0")).await.unwrap().unwrap();
    let target = env.path("restored");
    m2.restore_layer(&id("0"), &target).await.unwrap().unwrap();
    assert_eq!(describe_tree(&upper), describe_tree(&target));
    assert_eq!(m2.resume_pending().await.unwrap(), 0);
    assert_no_spools(&env, "a");
    let report = m2.gc().await.unwrap();
    assert_eq!(report.resumed, 0);
    let states = m2.status().await.unwrap();
    assert_eq!(states.len(), 1);
    assert_eq!(
        states[0].remote_digest.as_deref(),
        Some(manifest.current.digest.as_str())
    );
}

/// A sync whose blob was already stored (another identity's, or an old version's content synced
/// again) uploads it again when a racing `gc` deleted it before the manifest moved to it.
#[tokio::test]
async fn a_blob_deleted_by_a_racing_gc_is_uploaded_again() {
    let env = Env::new();
    let upper = env.path("upper");
    make_tree(&upper, "a");
    let (a, _) = env.counting_node("a", Duration::ZERO).await;
    let first = a.sync_layer(&id("0"), &upper).await.unwrap();
    let (b, counting) = env.counting_node("b", Duration::ZERO).await;
    counting
        .vanish_after_existing_upload
        .store(true, Ordering::SeqCst);
    let out = b
        .sync_layer_detailed(&id("1"), &upper, SyncOptions::default())
        .await
        .unwrap();
    assert!(out.upload.unwrap().already_existed);
    assert!(
        !counting.vanish_after_existing_upload.load(Ordering::SeqCst),
        "the blob was deleted after the upload found it"
    );
    assert_eq!(out.snapshot.digest, first.digest);
    assert!(env.store.exists(&blob_key(&first.digest)).await.unwrap());
    let (c, _) = env.counting_node("c", Duration::ZERO).await;
    let target = env.path("restored");
    c.restore_layer(&id("1"), &target).await.unwrap().unwrap();
    assert_eq!(describe_tree(&upper), describe_tree(&target));
}

/// A sync of identity `0` on node `a` that packed its tree and then failed its upload.
pub(super) async fn interrupted_sync() -> (Env, PathBuf, LayerSyncManager, Arc<Counting>) {
    let env = Env::new();
    let upper = env.path("upper");
    make_tree(&upper, "a");
    let (m, counting) = env.counting_node("a", Duration::ZERO).await;
    counting.fail_next_upload.store(true, Ordering::SeqCst);
    m.sync_layer(&id("0"), &upper).await.unwrap_err();
    (env, upper, m, counting)
}

/// Spools are not fsynced; one damaged by a power loss (here: same size, zeroed) must never be
/// published under its digest. Resume drops it and the next sync packs the tree again.
#[tokio::test]
async fn damaged_spool_of_an_interrupted_sync_is_dropped_not_published() {
    let (env, upper, _m, _counting) = interrupted_sync().await;
    let ready = env.path("a").join("staging").join("ready");
    let blobs: Vec<PathBuf> = std::fs::read_dir(&ready)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".tar.zst"))
        .collect();
    assert_eq!(blobs.len(), 1, "{blobs:?}");
    let len = std::fs::metadata(&blobs[0]).unwrap().len();
    std::fs::write(&blobs[0], vec![0u8; usize::try_from(len).unwrap()]).unwrap();

    let (m2, counting2) = env.counting_node("a", Duration::ZERO).await;
    assert_eq!(m2.resume_pending().await.unwrap(), 0);
    assert_eq!(counting2.uploads.load(Ordering::SeqCst), 0);
    assert!(m2.manifest(&id("0")).await.unwrap().is_none());
    assert_no_spools(&env, "a");

    // The same tree again: packed afresh (no stale archive reused), published, restorable.
    let snap = m2.sync_layer(&id("0"), &upper).await.unwrap();
    assert!(!snap.unchanged);
    assert_eq!(counting2.uploads.load(Ordering::SeqCst), 1);
    let target = env.path("restored");
    m2.restore_layer(&id("0"), &target).await.unwrap().unwrap();
    assert_eq!(describe_tree(&upper), describe_tree(&target));
}

#[tokio::test]
async fn interrupted_latest_wins_sync_does_not_undo_a_newer_one() {
    let env = Env::new();
    let (old, new) = (env.path("old"), env.path("new"));
    make_tree(&old, "old");
    make_tree(&new, "new");
    let (m, counting) = env.counting_node("a", Duration::ZERO).await;
    counting.fail_next_upload.store(true, Ordering::SeqCst);
    m.sync_layer(&id("0"), &old).await.unwrap_err();
    let newer = m.sync_layer(&id("0"), &new).await.unwrap();
    assert_eq!(m.resume_pending().await.unwrap(), 1);
    let manifest = m.manifest(&id("0")).await.unwrap().unwrap();
    assert_eq!(manifest.current.digest, newer.digest);
}

#[test]
fn manager_futures_are_send() {
    fn send<T: Send>(_: &T) {}
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let env = Env::new();
    let (m, _) = rt.block_on(env.counting_node("a", Duration::ZERO));
    let i = id("0");
    send(&m.sync_layer(&i, "/nonexistent"));
    send(&m.restore_layer(&i, "/nonexistent"));
    send(&m.gc());
}

#[tokio::test]
async fn rerun_after_an_interrupted_upload_reuses_the_packed_archive() {
    let (env, upper, m, counting) = interrupted_sync().await;

    let phases = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&phases);
    let opts = SyncOptions {
        progress: Some(Arc::new(move |ev: ProgressEvent| {
            seen.lock().unwrap().push(ev.phase)
        })),
        ..SyncOptions::default()
    };
    let out = m.sync_layer_detailed(&id("0"), &upper, opts).await.unwrap();
    assert!(out.manifest_moved);
    assert!(
        !phases.lock().unwrap().contains(&Phase::Pack),
        "the archive was packed again"
    );
    assert_eq!(counting.uploads.load(Ordering::SeqCst), 2);
    assert_eq!(m.resume_pending().await.unwrap(), 0);
    assert_no_spools(&env, "a");

    // A packing sync does report the pack phase (so the assertion above can fail).
    std::fs::write(upper.join("new"), "x").unwrap();
    let seen = Arc::clone(&phases);
    let opts = SyncOptions {
        progress: Some(Arc::new(move |ev: ProgressEvent| {
            seen.lock().unwrap().push(ev.phase)
        })),
        ..SyncOptions::default()
    };
    m.sync_layer_detailed(&id("0"), &upper, opts).await.unwrap();
    assert!(phases.lock().unwrap().contains(&Phase::Pack));
}

#[tokio::test]
async fn highly_compressible_layer_restores_despite_the_ratio_cap() {
    let env = Env::new();
    let upper = env.path("upper");
    std::fs::create_dir(&upper).unwrap();
    std::fs::write(upper.join("zeros"), vec![0u8; 64 << 20]).unwrap();
    let (m, _) = env.counting_node("a", Duration::ZERO).await;
    let snap = m.sync_layer(&id("0"), &upper).await.unwrap();
    assert!(
        snap.size_bytes / snap.compressed_size_bytes
            > LayerStorageConfig::default().max_expansion_ratio
    );
    let target = env.path("restored");
    m.restore_layer(&id("0"), &target).await.unwrap().unwrap();
    assert_eq!(describe_tree(&upper), describe_tree(&target));
}

#[test]
fn restore_is_capped_at_the_declared_size() {
    let cfg = LayerStorageConfig::default();
    let mut entry = manifest::ManifestEntry {
        digest: "d".into(),
        compressed_size_bytes: 1000,
        size_bytes: 10_000_000,
        uncompressed_digest: "u".into(),
        file_count: 1,
        created_at: chrono::Utc::now(),
        seq: 1,
        base: None,
        rolled_back_from: None,
        chain: Vec::new(),
    };
    let o = super::restore::restore_limits(&cfg, &entry, crate::archive::XattrNs::User);
    assert_eq!(o.max_uncompressed, 10_000_000);
    assert!(o.max_ratio > 10_000);
    assert_eq!(o.xattr_ns, crate::archive::XattrNs::User);
    assert!(!o.allow_devices);
    entry.size_bytes = cfg.max_restore_bytes + 1;
    let o = super::restore::restore_limits(&cfg, &entry, crate::archive::XattrNs::Trusted);
    assert_eq!(o.max_uncompressed, cfg.max_restore_bytes);
    assert_eq!(o.max_ratio, cfg.max_expansion_ratio);
}

#[tokio::test]
async fn resume_skips_identities_locked_by_another_process() {
    let (env, _upper, m, _counting) = interrupted_sync().await;

    // Another process (its own open of the lock file) is working on the identity.
    let other = super::spool::Staging::open(&env.config("a").staging_dir).unwrap();
    let held = other.lock_identity(&id("0"), false).unwrap().unwrap();
    assert_eq!(m.resume_pending().await.unwrap(), 0);
    assert!(m.manifest(&id("0")).await.unwrap().is_none());
    drop(held);
    assert_eq!(m.resume_pending().await.unwrap(), 1);
    assert!(m.manifest(&id("0")).await.unwrap().is_some());
}

/// A version stored as a delta on the previous one restores, on a node that never saw either,
/// through its chain: base extracted, delta applied, the directory whose file the delta replaced
/// keeping its mtime. Without the chain's base the restore fails naming it, target untouched.
#[tokio::test]
async fn a_delta_version_restores_through_its_chain_on_another_node() {
    use crate::archive::{self, PackOptions, TreeIndex};
    let env = Env::new();
    let upper = env.path("upper");
    make_tree(&upper, "a");
    let (a, _) = env.counting_node("a", Duration::ZERO).await;
    let base = a.sync_layer(&id("0"), &upper).await.unwrap();
    let index = TreeIndex::of_tree(&upper).unwrap();
    std::fs::write(upper.join("etc/app/config"), b"variant=b\n").unwrap();
    std::fs::remove_file(upper.join("data.bin")).unwrap();
    std::fs::write(upper.join("new.txt"), b"new").unwrap();
    let spool = env.path("delta.tar.zst");
    let (stats, _) =
        archive::pack_delta_to_file(&upper, &index, &spool, &PackOptions::default(), None).unwrap();
    assert_eq!(stats.removed, 1);
    let delta = stats.pack;
    env.store
        .put_bytes(
            &blob_key(&delta.digest),
            std::fs::read(&spool).unwrap(),
            PutCondition::None,
        )
        .await
        .unwrap();
    let m = a.manifest(&id("0")).await.unwrap().unwrap();
    let entry = manifest::ManifestEntry {
        digest: delta.digest.clone(),
        compressed_size_bytes: delta.compressed_size,
        size_bytes: delta.uncompressed_size,
        uncompressed_digest: delta.uncompressed_digest.clone(),
        file_count: delta.entries,
        created_at: chrono::Utc::now(),
        seq: m.current.seq + 1,
        base: None,
        rolled_back_from: None,
        chain: vec![manifest::ChainLink {
            digest: base.digest.clone(),
            compressed_size_bytes: base.compressed_size_bytes,
            size_bytes: base.size_bytes,
        }],
    };
    let manifest::Advance::Moved(next) = m.advance(entry, 5) else {
        panic!("a higher seq moves the manifest")
    };
    env.store
        .put_bytes(
            &manifest::manifest_key(&id("0")),
            serde_json::to_vec(&*next).unwrap(),
            PutCondition::None,
        )
        .await
        .unwrap();

    let (b, _) = env.counting_node("b", Duration::ZERO).await;
    let target = env.path("restored");
    let restored = b.restore_layer(&id("0"), &target).await.unwrap().unwrap();
    assert_eq!(restored.digest, delta.digest);
    assert_eq!(describe_tree(&upper), describe_tree(&target));
    assert_no_spools(&env, "b");

    env.store.delete(&blob_key(&base.digest)).await.unwrap();
    let missing = env.path("missing");
    let err = b.restore_layer(&id("0"), &missing).await.unwrap_err();
    let msg = error_chain(&err);
    assert!(msg.contains(&base.digest), "{msg}");
    assert!(!missing.exists());
    assert_no_spools(&env, "b");
}

pub(super) fn random_bytes(n: u64) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .take(n)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// Syncs on one node upload deltas (a small change costs a small upload) until the chain holds
/// `delta_chain_max` of them, then a full layer again; an unusable index also means a full
/// layer. Every version restores on another node equal to its tree.
#[tokio::test]
async fn syncs_upload_deltas_until_the_chain_is_full_then_a_full_layer() {
    let env = Env::new();
    let mut cfg = env.config("a");
    cfg.delta_chain_max = 2;
    let a = LayerSyncManager::with_store(cfg, Arc::clone(&env.store))
        .await
        .unwrap();
    let (b, _) = env.counting_node("b", Duration::ZERO).await;
    let upper = env.path("upper");
    make_tree(&upper, "a");
    std::fs::write(upper.join("big.bin"), random_bytes(1 << 20)).unwrap();
    // Past the racy margin: the first capture's index can trust what was written before it.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let check = |round: usize| {
        let (b, upper, env) = (&b, &upper, &env);
        async move {
            let target = env.path(&format!("restored-{round}"));
            b.restore_layer(&id("0"), &target).await.unwrap().unwrap();
            assert_eq!(
                describe_tree(upper),
                describe_tree(&target),
                "round {round}"
            );
        }
    };
    let full = a.sync_layer(&id("0"), &upper).await.unwrap();
    let chain_len = |m: &manifest::LayerManifest| m.current.chain.len();
    let mut sizes = Vec::new();
    for round in 1..=3 {
        std::fs::write(
            upper.join("etc/app/config"),
            format!("variant=a, round {round}\n"),
        )
        .unwrap();
        let snap = a.sync_layer(&id("0"), &upper).await.unwrap();
        let m = a.manifest(&id("0")).await.unwrap().unwrap();
        assert_eq!(m.current.digest, snap.digest);
        sizes.push((chain_len(&m), snap.compressed_size_bytes));
        check(round).await;
    }
    // Two deltas on the full base, then the chain is full: a full layer again.
    assert_eq!(sizes[0].0, 1, "{sizes:?}");
    assert_eq!(sizes[1].0, 2, "{sizes:?}");
    assert_eq!(sizes[2].0, 0, "{sizes:?}");
    assert!(
        sizes[0].1 * 20 < full.compressed_size_bytes,
        "{sizes:?} vs {full:?}"
    );
    assert!(sizes[2].1 * 2 > full.compressed_size_bytes, "{sizes:?}");
    let m = a.manifest(&id("0")).await.unwrap().unwrap();
    assert_eq!(m.history[0].chain[0].digest, full.digest);

    // A damaged index: the next sync cannot trust it and uploads a full layer.
    let index = env
        .dir
        .path()
        .join("a/staging/index")
        .join(format!("{}.idx", id("0").to_key()));
    let mut bytes = std::fs::read(&index).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&index, bytes).unwrap();
    std::fs::write(upper.join("etc/app/config"), b"after the damage\n").unwrap();
    a.sync_layer(&id("0"), &upper).await.unwrap();
    let m = a.manifest(&id("0")).await.unwrap().unwrap();
    assert!(m.current.chain.is_empty(), "full after a damaged index");
    check(4).await;
    // Indexed again: deltas resume.
    std::fs::write(upper.join("etc/app/config"), b"and again\n").unwrap();
    a.sync_layer(&id("0"), &upper).await.unwrap();
    let m = a.manifest(&id("0")).await.unwrap().unwrap();
    assert_eq!(m.current.chain.len(), 1);
    check(5).await;
}
