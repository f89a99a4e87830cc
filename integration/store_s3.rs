//! Object stores against a real Garage: the shared conformance suite (run on the local store
//! too), multipart uploads, crash resume, ListParts reconciliation, stale-upload GC, and
//! retries through a fault-injecting TCP proxy.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use zlayer_storage::ContainerLayerId;
use zlayer_storage::layer::types::{CompletedPart, PendingUpload};
use zlayer_storage::layer::{
    GcOptions, LayerSyncManager, RestoreOptions, StateDb, VersionSelector,
};
use zlayer_storage::store::{
    LocalStore, ObjectStore, Progress, PutCondition, PutOutcome, S3Store, StoreError,
    UploadJournal, UploadReport,
};

use crate::util::garage::{Garage, garage_or_skip};

pub(crate) const MIB: usize = 1024 * 1024;

/// Deterministic, poorly compressible bytes.
pub(crate) fn spool(dir: &Path, name: &str, len: usize, seed: u64) -> PathBuf {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path
}

async fn assert_object_equals(store: &dyn ObjectStore, key: &str, expected: &Path, dir: &Path) {
    let out = dir.join(format!("download-{}", key.replace('/', "_")));
    let n = store.download_to_file(key, &out, None).await.unwrap();
    let want = std::fs::read(expected).unwrap();
    assert_eq!(n, want.len() as u64);
    assert!(
        std::fs::read(&out).unwrap() == want,
        "downloaded bytes of {key} differ"
    );
}

pub(crate) async fn open_s3(cfg: &zlayer_storage::LayerStorageConfig) -> S3Store {
    S3Store::open(cfg).await.unwrap()
}

/// Multipart uploads still open under the store's prefix.
pub(crate) async fn open_uploads(store: &S3Store, prefix: &str) -> Vec<(String, String)> {
    let out = store
        .client()
        .list_multipart_uploads()
        .bucket(store.bucket())
        .prefix(prefix)
        .send()
        .await
        .unwrap();
    out.uploads()
        .iter()
        .map(|u| {
            (
                u.key().unwrap().to_string(),
                u.upload_id().unwrap().to_string(),
            )
        })
        .collect()
}

/// A journal that "crashes" (fails) on the part record after `allow` successful ones.
struct CrashingJournal {
    inner: StateDb,
    allow: AtomicU32,
}

impl CrashingJournal {
    fn new(inner: StateDb, allow: u32) -> Self {
        Self {
            inner,
            allow: AtomicU32::new(allow),
        }
    }
}

#[async_trait::async_trait]
impl UploadJournal for CrashingJournal {
    async fn load_upload(&self, key: &str) -> Result<Option<PendingUpload>, StoreError> {
        self.inner.load_upload(key).await
    }
    async fn begin_upload(&self, upload: &PendingUpload) -> Result<(), StoreError> {
        self.inner.begin_upload(upload).await
    }
    async fn record_part(
        &self,
        key: &str,
        id: &str,
        part: &CompletedPart,
    ) -> Result<(), StoreError> {
        let left = self.allow.load(Ordering::SeqCst);
        if left == 0 {
            return Err(StoreError::Journal {
                key: key.to_string(),
                source: Box::new(std::io::Error::other("simulated crash")),
            });
        }
        self.allow.store(left - 1, Ordering::SeqCst);
        self.inner.record_part(key, id, part).await
    }
    async fn finish_upload(&self, key: &str, id: &str) -> Result<(), StoreError> {
        self.inner.finish_upload(key, id).await
    }
    async fn known_upload_ids(&self) -> Result<Vec<String>, StoreError> {
        self.inner.known_upload_ids().await
    }
}

// ---------------------------------------------------------------------------------------------
// Conformance suite, run against both backends.

async fn conformance(store: &dyn ObjectStore, journal: &dyn UploadJournal, dir: &Path) {
    assert_eq!(store.head("a.json").await.unwrap(), None);
    assert_eq!(store.get_bytes("a.json").await.unwrap(), None);

    let PutOutcome::Written { etag } = store
        .put_bytes("a.json", b"{\"v\":1}".to_vec(), PutCondition::None)
        .await
        .unwrap()
    else {
        panic!("unconditional put must write")
    };
    assert_eq!(
        store.get_bytes("a.json").await.unwrap().unwrap(),
        b"{\"v\":1}"
    );
    let info = store.head("a.json").await.unwrap().unwrap();
    assert_eq!(info.size, 7);
    assert!(info.etag.is_some());
    assert_eq!(info.etag, etag);
    // Last-modified within a few seconds of now (S3 reports whole seconds).
    let age = |t: Option<std::time::SystemTime>| {
        let t = t.expect("last_modified reported");
        let now = std::time::SystemTime::now();
        now.duration_since(t)
            .unwrap_or_else(|e| e.duration())
            .as_secs()
    };
    assert!(age(info.last_modified) < 60, "{info:?}");
    assert!(store.exists("a.json").await.unwrap());
    assert!(!store.exists("nope.json").await.unwrap());

    for k in [
        "ids/web_0/manifest.json",
        "ids/web_1/manifest.json",
        "b.meta.json",
    ] {
        store
            .put_bytes(k, b"m".to_vec(), PutCondition::None)
            .await
            .unwrap();
    }
    assert_eq!(
        store.list("").await.unwrap(),
        vec![
            "a.json",
            "b.meta.json",
            "ids/web_0/manifest.json",
            "ids/web_1/manifest.json"
        ]
    );
    assert_eq!(
        store.list("ids/web_1").await.unwrap(),
        vec!["ids/web_1/manifest.json"]
    );
    assert!(store.list("zzz").await.unwrap().is_empty());
    let listed = store.list_info("ids/").await.unwrap();
    assert_eq!(
        listed.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(),
        ["ids/web_0/manifest.json", "ids/web_1/manifest.json"]
    );
    for o in &listed {
        assert_eq!(o.size, 1, "{o:?}");
        assert!(age(o.last_modified) < 60, "{o:?}");
    }

    // Preconditions: enforced by the service or emulated; sequentially the result is the same.
    assert_eq!(
        store
            .put_bytes("a.json", b"x".to_vec(), PutCondition::IfNoneMatch)
            .await
            .unwrap(),
        PutOutcome::PreconditionFailed
    );
    assert_eq!(
        store.get_bytes("a.json").await.unwrap().unwrap(),
        b"{\"v\":1}"
    );
    assert!(matches!(
        store
            .put_bytes("new.json", b"n".to_vec(), PutCondition::IfNoneMatch)
            .await
            .unwrap(),
        PutOutcome::Written { .. }
    ));
    assert_eq!(
        store
            .put_bytes(
                "a.json",
                b"x".to_vec(),
                PutCondition::IfMatch("\"0123\"".into())
            )
            .await
            .unwrap(),
        PutOutcome::PreconditionFailed
    );
    assert_eq!(
        store
            .put_bytes(
                "nope.json",
                b"x".to_vec(),
                PutCondition::IfMatch("\"0123\"".into())
            )
            .await
            .unwrap(),
        PutOutcome::PreconditionFailed
    );
    let current = info.etag.clone().unwrap();
    assert!(matches!(
        store
            .put_bytes(
                "a.json",
                b"{\"v\":2}".to_vec(),
                PutCondition::IfMatch(current)
            )
            .await
            .unwrap(),
        PutOutcome::Written { .. }
    ));
    assert_eq!(
        store.get_bytes("a.json").await.unwrap().unwrap(),
        b"{\"v\":2}"
    );

    // Small file upload (one part), download, skip when present.
    let src = spool(dir, "small", 300_000, 1);
    let seen = Arc::new(AtomicU64::new(0));
    let progress: Progress = {
        let seen = seen.clone();
        Arc::new(move |n| {
            seen.fetch_add(n, Ordering::Relaxed);
        })
    };
    let r = store
        .upload_file("s.tar.zst", &src, journal, Some(progress))
        .await
        .unwrap();
    assert_eq!(
        r,
        UploadReport {
            parts_total: 1,
            parts_sent: 1,
            parts_reused: 0,
            already_existed: false
        }
    );
    assert_eq!(seen.load(Ordering::Relaxed), 300_000);
    assert_object_equals(store, "s.tar.zst", &src, dir).await;
    let r = store
        .upload_file("s.tar.zst", &src, journal, None)
        .await
        .unwrap();
    assert!(r.already_existed && r.parts_sent == 0, "{r:?}");

    // Empty objects work too.
    let empty = spool(dir, "empty", 0, 2);
    store
        .upload_file("e.tar.zst", &empty, journal, None)
        .await
        .unwrap();
    assert_eq!(store.head("e.tar.zst").await.unwrap().unwrap().size, 0);

    // Errors name the key.
    let err = store.get_bytes("../x").await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidKey { .. }) && err.to_string().contains("../x"));
    let err = store
        .download_to_file("missing.tar.zst", &dir.join("m"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("missing.tar.zst"), "{err}");

    store.delete("a.json").await.unwrap();
    store.delete("a.json").await.unwrap();
    assert_eq!(store.get_bytes("a.json").await.unwrap(), None);
    assert!(
        !store
            .list("")
            .await
            .unwrap()
            .contains(&"a.json".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_local() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(&dir.path().join("store"), "layers/").unwrap();
    let db = StateDb::open(&dir.path().join("state.sqlite")).unwrap();
    conformance(&store, &db, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_s3() {
    let Some(g) = garage_or_skip("conformance_s3") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = g.config("conformance");
    let store = open_s3(&cfg).await;
    assert!(
        store
            .describe()
            .starts_with("s3://zlayer-test/conformance-")
    );
    let db = StateDb::open(&dir.path().join("state.sqlite")).unwrap();
    conformance(&store, &db, dir.path()).await;

    // The probe agrees with what the service really does with If-None-Match.
    let key = format!("{}probe-check", cfg.prefix);
    let put = || {
        store
            .client()
            .put_object()
            .bucket(store.bucket())
            .key(&key)
            .if_none_match("*")
            .body(ByteStream::from_static(b"1"))
            .send()
    };
    put().await.unwrap();
    let enforced = put().await.is_err();
    assert_eq!(store.conditional_writes().await.unwrap(), enforced);
    // Probe objects never show up in listings.
    assert!(
        store
            .list("")
            .await
            .unwrap()
            .iter()
            .all(|k| !k.contains(".zlayer-"))
    );
}

// ---------------------------------------------------------------------------------------------
// Multipart uploads and resume.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_upload_of_several_parts() {
    let Some(g) = garage_or_skip("multipart_upload_of_several_parts") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = g.config("multipart");
    let store = open_s3(&cfg).await;
    let db = StateDb::open(&dir.path().join("state.sqlite")).unwrap();
    let src = spool(dir.path(), "layer", 23 * MIB, 3);
    let seen = Arc::new(AtomicU64::new(0));
    let progress: Progress = {
        let seen = seen.clone();
        Arc::new(move |n| {
            seen.fetch_add(n, Ordering::Relaxed);
        })
    };
    let r = store
        .upload_file("d.tar.zst", &src, &db, Some(progress))
        .await
        .unwrap();
    assert_eq!(
        r,
        UploadReport {
            parts_total: 5,
            parts_sent: 5,
            parts_reused: 0,
            already_existed: false
        }
    );
    assert_eq!(seen.load(Ordering::Relaxed), 23 * MIB as u64);
    let head = store
        .client()
        .head_object()
        .bucket(store.bucket())
        .key(format!("{}d.tar.zst", cfg.prefix))
        .send()
        .await
        .unwrap();
    assert!(
        head.e_tag().unwrap().ends_with("-5\""),
        "multipart etag: {:?}",
        head.e_tag()
    );
    assert_object_equals(&store, "d.tar.zst", &src, dir.path()).await;
    assert!(db.list_pending_uploads().await.unwrap().is_empty());
    assert!(open_uploads(&store, &cfg.prefix).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_crash_sends_only_missing_parts() {
    let Some(g) = garage_or_skip("resume_after_crash_sends_only_missing_parts") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("state.sqlite");
    let mut cfg = g.config("resume");
    cfg.max_concurrent_uploads = 1;
    let src = spool(dir.path(), "layer", 23 * MIB, 4);
    {
        let store = open_s3(&cfg).await;
        let journal = CrashingJournal::new(StateDb::open(&db_path).unwrap(), 2);
        let err = store
            .upload_file("d.tar.zst", &src, &journal, None)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Journal { .. }), "{err:?}");
        // Parts 1-2 are journaled; part 3 reached the service but its record was lost.
    }
    let db = StateDb::open(&db_path).unwrap();
    let pending = db.load_upload("d.tar.zst").await.unwrap().unwrap();
    assert_eq!(pending.missing_parts(), vec![3, 4, 5]);

    let store = open_s3(&cfg).await;
    let r = store
        .upload_file("d.tar.zst", &src, &db, None)
        .await
        .unwrap();
    assert_eq!(
        r,
        UploadReport {
            parts_total: 5,
            parts_sent: 2,
            parts_reused: 3,
            already_existed: false
        }
    );
    assert_object_equals(&store, "d.tar.zst", &src, dir.path()).await;
    assert!(db.load_upload("d.tar.zst").await.unwrap().is_none());
    assert!(open_uploads(&store, &cfg.prefix).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_the_upload_future_is_dropped_mid_flight() {
    let Some(g) = garage_or_skip("resume_after_the_upload_future_is_dropped_mid_flight") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = StateDb::open(&dir.path().join("state.sqlite")).unwrap();
    let mut cfg = g.config("drop");
    cfg.max_concurrent_uploads = 2;
    let src = spool(dir.path(), "layer", 28 * MIB, 5);
    {
        let store = open_s3(&cfg).await;
        let done = Arc::new(AtomicU64::new(0));
        let notify = Arc::new(tokio::sync::Notify::new());
        let progress: Progress = {
            let (done, notify) = (done.clone(), notify.clone());
            Arc::new(move |n| {
                if done.fetch_add(n, Ordering::SeqCst) + n >= 2 * 5 * MIB as u64 {
                    notify.notify_one();
                }
            })
        };
        tokio::select! {
            r = store.upload_file("d.tar.zst", &src, &db, Some(progress)) => panic!("upload finished before the crash: {r:?}"),
            () = notify.notified() => {}
        }
    }
    let pending = db.load_upload("d.tar.zst").await.unwrap().unwrap();
    assert_eq!(pending.total_parts, 6);
    assert!(!pending.is_complete());

    let store = open_s3(&cfg).await;
    let r = store
        .upload_file("d.tar.zst", &src, &db, None)
        .await
        .unwrap();
    assert_eq!(r.parts_total, 6);
    assert_eq!(r.parts_sent + r.parts_reused, 6, "{r:?}");
    assert!(r.parts_reused >= 1 && r.parts_sent < 6, "{r:?}");
    assert_object_equals(&store, "d.tar.zst", &src, dir.path()).await;
    assert!(open_uploads(&store, &cfg.prefix).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_that_differs_on_the_server_is_resent() {
    let Some(g) = garage_or_skip("a_part_that_differs_on_the_server_is_resent") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("state.sqlite");
    let mut cfg = g.config("mismatch");
    cfg.max_concurrent_uploads = 1;
    let src = spool(dir.path(), "layer", 23 * MIB, 6);
    let store = open_s3(&cfg).await;
    {
        let journal = CrashingJournal::new(StateDb::open(&db_path).unwrap(), 3);
        store
            .upload_file("d.tar.zst", &src, &journal, None)
            .await
            .unwrap_err();
    }
    let db = StateDb::open(&db_path).unwrap();
    let pending = db.load_upload("d.tar.zst").await.unwrap().unwrap();
    // Out of band: part 2 replaced by other bytes of the same size (valid checksum for them).
    let other = vec![0xABu8; 5 * MIB];
    let crc =
        base64::engine::general_purpose::STANDARD.encode(crc32c::crc32c(&other).to_be_bytes());
    store
        .client()
        .upload_part()
        .bucket(store.bucket())
        .key(format!("{}d.tar.zst", cfg.prefix))
        .upload_id(&pending.upload_id)
        .part_number(2)
        .checksum_crc32_c(crc)
        .body(ByteStream::from(other))
        .send()
        .await
        .unwrap();

    let r = store
        .upload_file("d.tar.zst", &src, &db, None)
        .await
        .unwrap();
    // Parts 1, 3, 4 verified and kept; 2 (mismatch) and 5 (never sent) sent.
    assert_eq!(
        r,
        UploadReport {
            parts_total: 5,
            parts_sent: 2,
            parts_reused: 3,
            already_existed: false
        }
    );
    assert_object_equals(&store, "d.tar.zst", &src, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_upload_starts_over() {
    let Some(g) = garage_or_skip("a_vanished_upload_starts_over") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("state.sqlite");
    let mut cfg = g.config("vanished");
    cfg.max_concurrent_uploads = 1;
    let src = spool(dir.path(), "layer", 12 * MIB, 7);
    let store = open_s3(&cfg).await;
    {
        let journal = CrashingJournal::new(StateDb::open(&db_path).unwrap(), 1);
        store
            .upload_file("d.tar.zst", &src, &journal, None)
            .await
            .unwrap_err();
    }
    let db = StateDb::open(&db_path).unwrap();
    let old = db
        .load_upload("d.tar.zst")
        .await
        .unwrap()
        .unwrap()
        .upload_id;
    store
        .client()
        .abort_multipart_upload()
        .bucket(store.bucket())
        .key(format!("{}d.tar.zst", cfg.prefix))
        .upload_id(&old)
        .send()
        .await
        .unwrap();

    let r = store
        .upload_file("d.tar.zst", &src, &db, None)
        .await
        .unwrap();
    assert_eq!(
        r,
        UploadReport {
            parts_total: 3,
            parts_sent: 3,
            parts_reused: 0,
            already_existed: false
        }
    );
    assert_object_equals(&store, "d.tar.zst", &src, dir.path()).await;
    assert!(db.known_upload_ids().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_objects_are_skipped_and_stale_journal_entries_cleared() {
    let Some(g) = garage_or_skip("existing_objects_are_skipped_and_stale_journal_entries_cleared")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = StateDb::open(&dir.path().join("state.sqlite")).unwrap();
    let cfg = g.config("exists");
    let store = open_s3(&cfg).await;
    let src = spool(dir.path(), "layer", 11 * MIB, 8);
    let first = store
        .upload_file("d.tar.zst", &src, &db, None)
        .await
        .unwrap();
    assert_eq!(first.parts_sent, 3);

    // As if the process died between Complete and the journal update.
    let pending = PendingUpload {
        upload_id: "gone-upload-id".into(),
        object_key: "d.tar.zst".into(),
        total_parts: 3,
        completed_parts: Default::default(),
        part_size: cfg.part_size_bytes,
        local_tarball_path: src.clone(),
        started_at: chrono::Utc::now(),
        digest: "d".into(),
        total_size: 11 * MIB as u64,
    };
    db.begin_upload(&pending).await.unwrap();
    let r = store
        .upload_file("d.tar.zst", &src, &db, None)
        .await
        .unwrap();
    assert_eq!(
        r,
        UploadReport {
            parts_total: 3,
            parts_sent: 0,
            parts_reused: 0,
            already_existed: true
        }
    );
    assert!(db.load_upload("d.tar.zst").await.unwrap().is_none());

    // An object of the wrong size under the key (a truncated copy) is replaced, not kept.
    store
        .put_bytes("w.tar.zst", b"truncated".to_vec(), PutCondition::None)
        .await
        .unwrap();
    let r = store
        .upload_file("w.tar.zst", &src, &db, None)
        .await
        .unwrap();
    assert_eq!((r.parts_sent, r.already_existed), (3, false));
    assert_object_equals(&store, "w.tar.zst", &src, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_uploads_are_aborted() {
    let Some(g) = garage_or_skip("stale_uploads_are_aborted") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = StateDb::open(&dir.path().join("state.sqlite")).unwrap();
    let cfg = g.config("gc");
    let other_cfg = g.config("gc-other");
    let store = open_s3(&cfg).await;
    let create = |key: String| {
        let client = store.client().clone();
        async move {
            client
                .create_multipart_upload()
                .bucket(crate::util::garage::BUCKET)
                .key(key)
                .send()
                .await
                .unwrap()
                .upload_id()
                .unwrap()
                .to_string()
        }
    };
    let unknown = create(format!("{}orphan.tar.zst", cfg.prefix)).await;
    let journaled = create(format!("{}j.tar.zst", cfg.prefix)).await;
    let elsewhere = create(format!("{}x.tar.zst", other_cfg.prefix)).await;
    db.begin_upload(&PendingUpload {
        upload_id: journaled.clone(),
        object_key: "j.tar.zst".into(),
        total_parts: 2,
        completed_parts: Default::default(),
        part_size: cfg.part_size_bytes,
        local_tarball_path: "/nonexistent".into(),
        started_at: chrono::Utc::now(),
        digest: "j".into(),
        total_size: 1,
    })
    .await
    .unwrap();

    assert_eq!(
        store
            .abort_stale_uploads(Duration::from_secs(3600), &db)
            .await
            .unwrap(),
        0
    );
    assert_eq!(open_uploads(&store, &cfg.prefix).await.len(), 2);

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let n = store
        .abort_stale_uploads(Duration::from_millis(500), &db)
        .await
        .unwrap();
    assert_eq!(n, 2);
    assert!(open_uploads(&store, &cfg.prefix).await.is_empty());
    assert!(
        db.load_upload("j.tar.zst").await.unwrap().is_none(),
        "journal entry finished"
    );
    let left = open_uploads(&store, &other_cfg.prefix).await;
    assert_eq!(
        left.iter().map(|(_, id)| id.clone()).collect::<Vec<_>>(),
        vec![elsewhere]
    );
    assert!(!left.iter().any(|(_, id)| *id == unknown));
}

/// Store-side gc on real S3: every identity listed, history kept, unreferenced layers deleted
/// only once older than the grace period, referenced and young ones kept, and manifests over
/// `history_keep` trimmed only where the service enforces conditional writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_collects_unreferenced_layers_after_the_grace_period() {
    let test = "gc_collects_unreferenced_layers_after_the_grace_period";
    let Some(g) = garage_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = g.config("history-gc");
    let node = |name: &str, keep: usize, grace: u64| {
        let mut cfg = base.clone();
        cfg.staging_dir = dir.path().join(name).join("staging");
        cfg.state_db_path = dir.path().join(name).join("state.sqlite");
        cfg.history_keep = keep;
        cfg.gc_grace_secs = grace;
        // Every version a full layer: a kept delta would keep its base (covered by the unit
        // test `a_kept_delta_keeps_its_whole_chain`).
        cfg.delta_chain_max = 0;
        cfg
    };
    let sync_versions = |m: LayerSyncManager, id: ContainerLayerId, n: usize| {
        let root = dir.path().join(id.to_key());
        async move {
            let mut digests = Vec::new();
            for i in 0..n {
                let upper = root.join(format!("v{i}"));
                std::fs::create_dir_all(&upper).unwrap();
                std::fs::write(upper.join("f"), format!("{id} version {i}")).unwrap();
                digests.push(m.sync_layer(&id, &upper).await.unwrap().digest);
            }
            (m, digests)
        }
    };
    let (narrow, wide) = (
        ContainerLayerId::new("gc", "0"),
        ContainerLayerId::new("gc", "w"),
    );
    let a = LayerSyncManager::new(node("a", 2, 3600)).await.unwrap();
    let (a, d) = sync_versions(a, narrow.clone(), 3).await;
    let w = LayerSyncManager::new(node("w", 5, 3600)).await.unwrap();
    let (_w, wd) = sync_versions(w, wide.clone(), 3).await;

    let list = a.list_identities().await.unwrap();
    let seen: Vec<_> = list
        .iter()
        .map(|s| (s.identity.clone(), s.versions))
        .collect();
    assert_eq!(seen, [(narrow.clone(), 2), (wide.clone(), 3)]);
    assert_eq!(list[0].digest, d[2]);

    // Everything is younger than an hour: nothing goes.
    let r = a.gc().await.unwrap();
    assert_eq!(r.objects_deleted, 0, "{r:?}");
    assert_eq!(r.young_kept, 1);

    // A 3 s grace: wait past it, then write a fresh unreferenced layer that must stay.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let store = a.store().clone();
    let fresh = "f".repeat(64);
    for key in [format!("{fresh}.tar.zst"), format!("{fresh}.meta.json")] {
        store
            .put_bytes(&key, b"{}".to_vec(), PutCondition::None)
            .await
            .unwrap();
    }
    let enforced = store.conditional_writes().await.unwrap();
    let c = LayerSyncManager::new(node("c", 2, 3)).await.unwrap();
    let before = store.list("").await.unwrap();
    let dry = c.gc_with(GcOptions { dry_run: true }).await.unwrap();
    assert_eq!(
        store.list("").await.unwrap(),
        before,
        "a dry run deletes nothing"
    );
    let r = c.gc().await.unwrap();
    assert_eq!(r.deleted, dry.deleted);
    let mut gone = vec![d[0].clone()];
    if enforced {
        assert_eq!((r.manifests_trimmed, r.versions_dropped), (1, 1));
        gone.push(wd[0].clone());
    } else {
        assert_eq!(r.manifests_untrimmed, 1, "{r:?}");
    }
    let mut expected: Vec<String> = gone
        .iter()
        .flat_map(|g| [format!("{g}.tar.zst"), format!("{g}.meta.json")])
        .collect();
    expected.sort();
    assert_eq!(r.deleted, expected);
    assert!(r.bytes_deleted > 0);
    assert_eq!(r.young_kept, 1, "the fresh layer");
    let left = store.list("").await.unwrap();
    for digest in d[1..].iter().chain(&wd[1..]).chain([&fresh]) {
        assert!(left.contains(&format!("{digest}.tar.zst")), "{digest} kept");
    }
    for digest in &gone {
        assert!(
            !left.contains(&format!("{digest}.tar.zst")),
            "{digest} deleted"
        );
    }

    // The kept older version still restores, with its content.
    let m = a.manifest(&narrow).await.unwrap().unwrap();
    let target = dir.path().join("restored");
    c.restore_version(
        &narrow,
        VersionSelector::Seq(m.history[0].seq),
        &target,
        RestoreOptions::default(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(target.join("f")).unwrap(),
        format!("{narrow} version 1")
    );
}

/// Deltas through a real S3 service: a small change after a full sync uploads a small delta
/// naming its chain, a node that never saw the identity restores it exactly through the chain,
/// and `gc` keeps the chain's base even once history no longer lists it as a version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_chain_round_trips_through_garage_and_gc_keeps_its_base() {
    let test = "a_delta_chain_round_trips_through_garage_and_gc_keeps_its_base";
    let Some(g) = garage_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = g.config("delta-chain");
    let node = |name: &str| {
        let mut cfg = base.clone();
        cfg.staging_dir = dir.path().join(name).join("staging");
        cfg.state_db_path = dir.path().join(name).join("state.sqlite");
        cfg.history_keep = 1;
        cfg.gc_grace_secs = 0;
        cfg
    };
    let id = ContainerLayerId::new("delta", "0");
    let upper = dir.path().join("upper");
    std::fs::create_dir_all(upper.join("etc")).unwrap();
    let mut noise = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(std::fs::File::open("/dev/urandom").unwrap(), 4 << 20),
        &mut noise,
    )
    .unwrap();
    std::fs::write(upper.join("big"), noise).unwrap();
    std::fs::write(upper.join("etc/conf"), b"v1").unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let a = LayerSyncManager::new(node("a")).await.unwrap();
    let full = a.sync_layer(&id, &upper).await.unwrap();
    std::fs::write(upper.join("etc/conf"), b"v2").unwrap();
    std::fs::remove_file(upper.join("big")).unwrap();
    std::fs::write(upper.join("new"), b"new").unwrap();
    let delta = a.sync_layer(&id, &upper).await.unwrap();
    let m = a.manifest(&id).await.unwrap().unwrap();
    assert_eq!(m.current.digest, delta.digest);
    assert_eq!(m.current.chain.len(), 1, "{m:?}");
    assert_eq!(m.current.chain[0].digest, full.digest);
    assert!(delta.compressed_size_bytes * 10 < full.compressed_size_bytes);

    // gc with history_keep = 1: the full version is no longer a version, but the delta needs it.
    let r = a.gc().await.unwrap();
    let left = a.store().list("").await.unwrap();
    assert!(left.contains(&format!("{}.tar.zst", full.digest)), "{r:?}");

    let b = LayerSyncManager::new(node("b")).await.unwrap();
    let target = dir.path().join("restored");
    let restored = b.restore_layer(&id, &target).await.unwrap().unwrap();
    assert_eq!(restored.digest, delta.digest);
    assert_eq!(std::fs::read(target.join("etc/conf")).unwrap(), b"v2");
    assert_eq!(std::fs::read(target.join("new")).unwrap(), b"new");
    assert!(!target.join("big").exists());
}

// ---------------------------------------------------------------------------------------------
// Fault injection.

#[derive(Debug, Clone, Copy)]
pub(crate) enum Fault {
    /// Read the request, then reset the connection.
    Reset,
    /// Answer 503 SlowDown and close.
    Unavailable,
    /// Forward, but reset after this many response bytes.
    CutAfter(usize),
}

/// A loopback TCP proxy in front of Garage whose first `faulty` connections misbehave.
pub(crate) struct FaultProxy {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    pub(crate) async fn start(garage: &Garage, fault: Fault, faulty: usize) -> Self {
        let upstream: SocketAddr = garage
            .endpoint()
            .trim_start_matches("http://")
            .parse()
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let i = counter.fetch_add(1, Ordering::SeqCst);
                let fault = (i < faulty).then_some(fault);
                tokio::spawn(handle(client, upstream, fault));
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Reads one request head (and a `Content-Length` body) so the client is done sending;
/// returns the bytes read.
pub(crate) async fn read_request(client: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(buf);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut have = buf.len() - head_end;
    while have < len {
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        have += n;
    }
    Ok(buf)
}

async fn handle(mut client: TcpStream, upstream: SocketAddr, fault: Option<Fault>) {
    match fault {
        Some(Fault::Reset) => {
            let _ = read_request(&mut client).await;
            let _ = client.set_zero_linger();
            drop(client);
        }
        Some(Fault::Unavailable) => {
            let _ = read_request(&mut client).await;
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>injected</Message></Error>";
            let resp = format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = client.write_all(resp.as_bytes()).await;
            let _ = client.shutdown().await;
        }
        Some(Fault::CutAfter(limit)) => {
            // One request per connection here: forward it, then only `limit` response bytes.
            let Ok(req) = read_request(&mut client).await else {
                return;
            };
            let Ok(mut server) = TcpStream::connect(upstream).await else {
                return;
            };
            if server.write_all(&req).await.is_err() {
                return;
            }
            let mut sent = 0;
            let mut buf = vec![0u8; 64 * 1024];
            while sent < limit {
                let Ok(n) = server.read(&mut buf).await else {
                    break;
                };
                if n == 0 {
                    break;
                }
                let n = n.min(limit - sent);
                if client.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                sent += n;
            }
            let _ = client.set_zero_linger();
        }
        None => {
            let Ok(mut server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_survive_connection_resets() {
    let Some(g) = garage_or_skip("requests_survive_connection_resets") else {
        return;
    };
    let proxy = FaultProxy::start(g, Fault::Reset, 3).await;
    let store = open_s3(&g.config_via("resets", &proxy.endpoint())).await;
    store
        .put_bytes("a.json", b"1".to_vec(), PutCondition::None)
        .await
        .unwrap();
    assert_eq!(store.get_bytes("a.json").await.unwrap().unwrap(), b"1");
    assert!(proxy.connections() > 3, "the faulty connections were used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_upload_survives_503s() {
    let Some(g) = garage_or_skip("multipart_upload_survives_503s") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = StateDb::open(&dir.path().join("state.sqlite")).unwrap();
    let proxy = FaultProxy::start(g, Fault::Unavailable, 4).await;
    let cfg = g.config_via("unavailable", &proxy.endpoint());
    let store = open_s3(&cfg).await;
    let src = spool(dir.path(), "layer", 12 * MIB, 9);
    let r = store
        .upload_file("d.tar.zst", &src, &db, None)
        .await
        .unwrap();
    assert_eq!((r.parts_total, r.parts_sent), (3, 3));
    assert!(proxy.connections() > 4);
    let mut direct = cfg.clone();
    direct.endpoint_url = Some(g.endpoint().to_string());
    assert_object_equals(&open_s3(&direct).await, "d.tar.zst", &src, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_resume_after_a_cut_connection() {
    let Some(g) = garage_or_skip("downloads_resume_after_a_cut_connection") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = StateDb::open(&dir.path().join("state.sqlite")).unwrap();
    let cfg = g.config("cut");
    let src = spool(dir.path(), "layer", 12 * MIB, 10);
    open_s3(&cfg)
        .await
        .upload_file("d.tar.zst", &src, &db, None)
        .await
        .unwrap();

    let proxy = FaultProxy::start(g, Fault::CutAfter(MIB), 2).await;
    let mut via = cfg.clone();
    via.endpoint_url = Some(proxy.endpoint());
    let store = open_s3(&via).await;
    let seen = Arc::new(AtomicU64::new(0));
    let progress: Progress = {
        let seen = seen.clone();
        Arc::new(move |n| {
            seen.fetch_add(n, Ordering::Relaxed);
        })
    };
    let out = dir.path().join("out");
    let n = store
        .download_to_file("d.tar.zst", &out, Some(progress))
        .await
        .unwrap();
    assert_eq!(n, 12 * MIB as u64);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&src).unwrap());
    assert!(
        proxy.connections() >= 3,
        "two cut connections, then a good one"
    );
    // Resumed, not restarted: the bytes reported add up to the object exactly once.
    assert_eq!(seen.load(Ordering::Relaxed), 12 * MIB as u64);
}
