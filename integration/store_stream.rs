//! Streamed uploads (parts sent while the spool is still written, then copied to the content
//! address) and parallel ranged downloads, against the real Garage.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zlayer_storage::layer::LayerSyncManager;
use zlayer_storage::layer::StateDb;
use zlayer_storage::store::{
    GrowingFile, ObjectInfo, ObjectStore, PrefixReady, Progress, PutCondition, PutOutcome, S3Store,
    SpoolFeed, StoreError, StreamedUpload, UploadJournal, UploadReport,
};
use zlayer_storage::{ContainerLayerId, LayerStorageConfig};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::store_s3::{MIB, open_s3, open_uploads, read_request, spool};
use crate::util::garage::garage_or_skip;

const STREAM_DIR: &str = ".zlayer-stream/";

/// Objects under the store's temporary folder.
async fn temp_objects(store: &S3Store, prefix: &str) -> Vec<String> {
    let out = store
        .client()
        .list_objects_v2()
        .bucket(store.bucket())
        .prefix(format!("{prefix}{STREAM_DIR}"))
        .send()
        .await
        .unwrap();
    out.contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_string))
        .collect()
}

async fn download(store: &dyn ObjectStore, key: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("dl-{}", key.replace('/', "_")));
    store.download_to_file(key, &out, None).await.unwrap();
    std::fs::read(out).unwrap()
}

/// A spool file being "packed": written in steps, each announced on the feed.
struct Writer {
    file: std::fs::File,
    path: PathBuf,
    feed: SpoolFeed,
    len: u64,
}

impl Writer {
    fn new(dir: &Path) -> (Self, GrowingFile) {
        let path = dir.join("growing.tar.zst");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let (growing, feed) = GrowingFile::follow(&file).unwrap();
        (
            Self {
                file,
                path,
                feed,
                len: 0,
            },
            growing,
        )
    }

    fn append(&mut self, data: &[u8]) {
        self.file.write_all(data).unwrap();
        self.len += data.len() as u64;
        self.feed.written(self.len);
    }

    fn complete(&self) {
        self.feed.complete(self.len);
    }
}

fn counter() -> (Arc<AtomicU64>, Progress) {
    let n = Arc::new(AtomicU64::new(0));
    let m = Arc::clone(&n);
    (
        n,
        Arc::new(move |d| {
            m.fetch_add(d, Ordering::SeqCst);
        }),
    )
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn stream_config(g: &crate::util::garage::Garage, test: &str) -> LayerStorageConfig {
    let mut cfg = g.config(test);
    cfg.part_size_bytes = 8 << 20;
    cfg.max_concurrent_uploads = 4;
    cfg
}

/// A scratch dir, a state DB in it, and a store on Garage with [`stream_config`].
struct StreamEnv {
    dir: tempfile::TempDir,
    db: StateDb,
    cfg: LayerStorageConfig,
    store: S3Store,
}

/// [`StreamEnv`] for `test` under `prefix`; `None` (skip) outside CI without Garage.
async fn stream_env(test: &str, prefix: &str) -> Option<StreamEnv> {
    let g = garage_or_skip(test)?;
    let dir = tempfile::tempdir().unwrap();
    let db = StateDb::open(&dir.path().join("state.sqlite")).unwrap();
    let cfg = stream_config(g, prefix);
    let store = open_s3(&cfg).await;
    Some(StreamEnv {
        dir,
        db,
        cfg,
        store,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_upload_equals_the_plain_upload_and_removes_its_temp_key() {
    let Some(StreamEnv {
        dir,
        db,
        cfg,
        store,
    }) = stream_env("streamed_upload_equals_the_plain_upload", "stream-equal").await
    else {
        return;
    };
    let src = spool(dir.path(), "layer", 37 * MIB, 21);
    let data = std::fs::read(&src).unwrap();

    let (mut w, growing) = Writer::new(dir.path());
    let (sent, progress) = counter();
    let up = store
        .start_streamed_upload(growing, Some(progress))
        .await
        .unwrap()
        .expect("the s3 store streams");
    w.append(&data[..24 * MIB]);
    // Parts go up while the spool is still growing, under a temporary key.
    wait_until("two streamed parts", || {
        sent.load(Ordering::SeqCst) >= 16 << 20
    })
    .await;
    let temp_uploads = open_uploads(&store, &format!("{}{STREAM_DIR}", cfg.prefix)).await;
    assert_eq!(temp_uploads.len(), 1, "{temp_uploads:?}");
    w.append(&data[24 * MIB..]);
    w.complete();
    let r = up.finish("s.tar.zst", &w.path, &db).await.unwrap();
    assert_eq!(
        r,
        UploadReport {
            parts_total: 5,
            parts_sent: 5,
            parts_reused: 0,
            already_existed: false
        }
    );
    assert_eq!(sent.load(Ordering::SeqCst), data.len() as u64);

    let plain = store
        .upload_file("p.tar.zst", &src, &db, None)
        .await
        .unwrap();
    assert!(!plain.already_existed);
    let (s, p) = (
        download(&store, "s.tar.zst", dir.path()).await,
        download(&store, "p.tar.zst", dir.path()).await,
    );
    assert!(s == data, "streamed object differs from the spool");
    assert!(s == p, "streamed and plain objects differ");
    assert!(temp_objects(&store, &cfg.prefix).await.is_empty());
    assert!(open_uploads(&store, &cfg.prefix).await.is_empty());
    assert!(store.list("").await.unwrap() == vec!["p.tar.zst", "s.tar.zst"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_stream_leaves_no_multipart_upload_and_no_temp_object() {
    let Some(g) = garage_or_skip("aborted_stream_leaves_no_multipart_upload") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = stream_config(g, "stream-abort");
    let store = open_s3(&cfg).await;
    let data = std::fs::read(spool(dir.path(), "layer", 21 * MIB, 22)).unwrap();
    let (mut w, growing) = Writer::new(dir.path());
    let (sent, progress) = counter();
    let up = store
        .start_streamed_upload(growing, Some(progress))
        .await
        .unwrap()
        .unwrap();
    w.append(&data);
    wait_until("a streamed part", || sent.load(Ordering::SeqCst) >= 8 << 20).await;
    assert!(!open_uploads(&store, &cfg.prefix).await.is_empty());
    // The layer turned out unchanged: nothing of the stream may remain.
    up.abort().await;
    assert!(open_uploads(&store, &cfg.prefix).await.is_empty());
    assert!(temp_objects(&store, &cfg.prefix).await.is_empty());
    assert!(store.list("").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_or_existing_spools_skip_the_stream() {
    let Some(StreamEnv {
        dir,
        db,
        cfg,
        store,
    }) = stream_env("small_or_existing_spools_skip_the_stream", "stream-small").await
    else {
        return;
    };

    // Below one part: never starts a multipart upload, ends as one PUT.
    let small = std::fs::read(spool(dir.path(), "small", 3 * MIB, 23)).unwrap();
    let sub = dir.path().join("a");
    std::fs::create_dir(&sub).unwrap();
    let (mut w, growing) = Writer::new(&sub);
    let up = store
        .start_streamed_upload(growing, None)
        .await
        .unwrap()
        .unwrap();
    w.append(&small);
    w.complete();
    let r = up.finish("small.tar.zst", &w.path, &db).await.unwrap();
    assert_eq!((r.parts_total, r.parts_sent), (1, 1));
    assert!(download(&store, "small.tar.zst", dir.path()).await == small);

    // Already stored: the streamed parts are thrown away and nothing is replaced.
    let big = spool(dir.path(), "big", 20 * MIB, 24);
    store
        .upload_file("big.tar.zst", &big, &db, None)
        .await
        .unwrap();
    let sub = dir.path().join("b");
    std::fs::create_dir(&sub).unwrap();
    let (mut w, growing) = Writer::new(&sub);
    let up = store
        .start_streamed_upload(growing, None)
        .await
        .unwrap()
        .unwrap();
    w.append(&std::fs::read(&big).unwrap());
    w.complete();
    let r = up.finish("big.tar.zst", &w.path, &db).await.unwrap();
    assert!(r.already_existed, "{r:?}");
    assert!(open_uploads(&store, &cfg.prefix).await.is_empty());
    assert!(temp_objects(&store, &cfg.prefix).await.is_empty());
}

/// A proxy in front of Garage that cuts the first `faulty` ranged GETs opening a connection
/// after `limit` response bytes (a reset); everything else passes through, keep-alive included.
struct CutProxy {
    addr: std::net::SocketAddr,
    cut: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CutProxy {
    async fn start(upstream: &str, limit: usize, faulty: u32) -> Self {
        let upstream: std::net::SocketAddr =
            upstream.trim_start_matches("http://").parse().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicU32::new(0));
        let counter = Arc::clone(&cut);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(Self::handle(
                    client,
                    upstream,
                    limit,
                    faulty,
                    Arc::clone(&counter),
                ));
            }
        });
        Self { addr, cut, task }
    }

    async fn handle(
        mut client: TcpStream,
        upstream: std::net::SocketAddr,
        limit: usize,
        faulty: u32,
        cut: Arc<AtomicU32>,
    ) {
        let Ok(req) = read_request(&mut client).await else {
            return;
        };
        let Ok(mut server) = TcpStream::connect(upstream).await else {
            return;
        };
        if server.write_all(&req).await.is_err() {
            return;
        }
        let head = String::from_utf8_lossy(&req).to_ascii_lowercase();
        let ranged_get = head.starts_with("get ") && head.contains("\r\nrange: bytes=");
        let fault = ranged_get
            && cut
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n < faulty).then_some(n + 1)
                })
                .is_ok();
        if fault {
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
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn cuts(&self) -> u32 {
        self.cut.load(Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranged_download_equals_the_object_and_resumes_cut_ranges() {
    let Some(g) = garage_or_skip("ranged_download_resumes_cut_ranges") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = StateDb::open(&dir.path().join("state.sqlite")).unwrap();
    let cfg = stream_config(g, "ranged");
    let src = spool(dir.path(), "layer", 30 * MIB + 12345, 25);
    open_s3(&cfg)
        .await
        .upload_file("d.tar.zst", &src, &db, None)
        .await
        .unwrap();

    // The first two ranged GETs are cut after 1 MiB of response.
    let proxy = CutProxy::start(g.endpoint(), MIB, 2).await;
    let mut via = cfg.clone();
    via.endpoint_url = Some(proxy.endpoint());
    let store = open_s3(&via).await;
    let (seen, progress) = counter();
    let prefixes = Arc::new(Mutex::new(Vec::new()));
    let ready: PrefixReady = {
        let p = Arc::clone(&prefixes);
        Arc::new(move |n| p.lock().unwrap().push(n))
    };
    let out = dir.path().join("out");
    let n = store
        .download_following("d.tar.zst", &out, ready, Some(progress))
        .await
        .unwrap();
    let want = std::fs::read(&src).unwrap();
    assert_eq!(n, want.len() as u64);
    assert!(
        std::fs::read(&out).unwrap() == want,
        "downloaded bytes differ"
    );
    assert_eq!(proxy.cuts(), 2, "two ranges were cut and resumed");
    // Resumed, not restarted: every byte is counted once.
    assert_eq!(seen.load(Ordering::SeqCst), want.len() as u64);
    let prefixes = prefixes.lock().unwrap().clone();
    assert!(prefixes.windows(2).all(|w| w[0] < w[1]), "{prefixes:?}");
    assert_eq!(prefixes.last().copied(), Some(want.len() as u64));

    let missing = store
        .download_following("missing.tar.zst", &out, Arc::new(|_| {}), None)
        .await
        .unwrap_err();
    assert!(
        matches!(missing, StoreError::NotFound { .. }),
        "{missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_removes_stale_temp_objects_and_uploads() {
    let Some(StreamEnv {
        dir: _dir,
        db,
        cfg,
        store,
    }) = stream_env("gc_removes_stale_temp_objects", "stream-gc").await
    else {
        return;
    };
    let orphan = format!("{}{STREAM_DIR}1-2-3.tar.zst", cfg.prefix);
    store
        .client()
        .put_object()
        .bucket(store.bucket())
        .key(&orphan)
        .body(b"left by a crash"[..].to_vec().into())
        .send()
        .await
        .unwrap();
    store
        .client()
        .create_multipart_upload()
        .bucket(store.bucket())
        .key(format!("{}{STREAM_DIR}4-5-6.tar.zst", cfg.prefix))
        .send()
        .await
        .unwrap();
    assert_eq!(
        store
            .abort_stale_uploads(Duration::from_secs(3600), &db)
            .await
            .unwrap(),
        0
    );
    assert_eq!(temp_objects(&store, &cfg.prefix).await, vec![orphan]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        store
            .abort_stale_uploads(Duration::ZERO, &db)
            .await
            .unwrap(),
        2
    );
    assert!(temp_objects(&store, &cfg.prefix).await.is_empty());
    assert!(open_uploads(&store, &cfg.prefix).await.is_empty());
}

// ---------------------------------------------------------------------------------------------
// A crash in the middle of a streamed sync, through the layer manager.

/// Delegates to a store, counting journaled uploads and streams; with `crash`, every streamed
/// upload "dies" at finish: its sender is dropped mid-flight like a killed process.
#[derive(Debug)]
struct Crashy {
    inner: Arc<dyn ObjectStore>,
    crash: bool,
    upload_files: AtomicU32,
    streams: AtomicU32,
}

#[derive(Debug)]
struct DyingStream(Option<Box<dyn StreamedUpload>>);

#[async_trait::async_trait]
impl StreamedUpload for DyingStream {
    async fn finish(
        mut self: Box<Self>,
        key: &str,
        _spool: &Path,
        _journal: &dyn UploadJournal,
    ) -> Result<UploadReport, StoreError> {
        drop(self.0.take());
        Err(StoreError::Config {
            reason: format!("injected crash while streaming {key}"),
        })
    }
    async fn abort(mut self: Box<Self>) {
        if let Some(s) = self.0.take() {
            s.abort().await;
        }
    }
}

#[async_trait::async_trait]
impl ObjectStore for Crashy {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        self.inner.head(key).await
    }
    async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get_bytes(key).await
    }
    async fn put_bytes(
        &self,
        key: &str,
        data: Vec<u8>,
        cond: PutCondition,
    ) -> Result<PutOutcome, StoreError> {
        self.inner.put_bytes(key, data, cond).await
    }
    async fn conditional_writes(&self) -> Result<bool, StoreError> {
        self.inner.conditional_writes().await
    }
    async fn download_to_file(
        &self,
        key: &str,
        dest: &Path,
        progress: Option<Progress>,
    ) -> Result<u64, StoreError> {
        self.inner.download_to_file(key, dest, progress).await
    }
    async fn download_following(
        &self,
        key: &str,
        dest: &Path,
        ready: PrefixReady,
        progress: Option<Progress>,
    ) -> Result<u64, StoreError> {
        self.inner
            .download_following(key, dest, ready, progress)
            .await
    }
    async fn upload_file(
        &self,
        key: &str,
        src: &Path,
        journal: &dyn UploadJournal,
        progress: Option<Progress>,
    ) -> Result<UploadReport, StoreError> {
        self.upload_files.fetch_add(1, Ordering::SeqCst);
        self.inner.upload_file(key, src, journal, progress).await
    }
    async fn start_streamed_upload(
        &self,
        src: GrowingFile,
        progress: Option<Progress>,
    ) -> Result<Option<Box<dyn StreamedUpload>>, StoreError> {
        self.streams.fetch_add(1, Ordering::SeqCst);
        let inner = self.inner.start_streamed_upload(src, progress).await?;
        Ok(match (inner, self.crash) {
            (Some(s), true) => Some(Box::new(DyingStream(Some(s)))),
            (other, _) => other,
        })
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
    async fn abort_stale_uploads(
        &self,
        older_than: Duration,
        journal: &dyn UploadJournal,
    ) -> Result<u32, StoreError> {
        self.inner.abort_stale_uploads(older_than, journal).await
    }
}

fn crashy(inner: Arc<dyn ObjectStore>, crash: bool) -> Arc<Crashy> {
    Arc::new(Crashy {
        inner,
        crash,
        upload_files: AtomicU32::new(0),
        streams: AtomicU32::new(0),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_stream_then_resume_completes_through_the_journal() {
    let Some(g) = garage_or_skip("crash_mid_stream_then_resume") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = stream_config(g, "stream-crash");
    cfg.staging_dir = dir.path().join("staging");
    cfg.state_db_path = dir.path().join("state.sqlite");
    let s3: Arc<dyn ObjectStore> = Arc::new(open_s3(&cfg).await);
    let upper = dir.path().join("upper");
    std::fs::create_dir(&upper).unwrap();
    for i in 0..3 {
        spool(&upper, &format!("blob{i}"), 9 * MIB, 30 + i);
    }
    std::fs::write(upper.join("small"), b"text").unwrap();
    let id = ContainerLayerId::new("svc", "crash");

    let first = crashy(Arc::clone(&s3), true);
    let m = LayerSyncManager::with_store(cfg.clone(), first.clone())
        .await
        .unwrap();
    let err = m.sync_layer(&id, &upper).await.unwrap_err();
    assert!(format!("{:?}", err).contains("injected crash"), "{err:?}");
    assert_eq!(first.streams.load(Ordering::SeqCst), 1);
    assert_eq!(first.upload_files.load(Ordering::SeqCst), 0);
    drop(m);
    // The dead stream's temporary upload is an orphan now.
    let s3_store = open_s3(&cfg).await;
    assert!(
        !open_uploads(&s3_store, &format!("{}{STREAM_DIR}", cfg.prefix))
            .await
            .is_empty()
    );

    // A restarted process finishes the sync from the packed spool, on the journaled path.
    let second = crashy(Arc::clone(&s3), false);
    let m = LayerSyncManager::with_store(cfg.clone(), second.clone())
        .await
        .unwrap();
    assert_eq!(m.resume_pending().await.unwrap(), 1);
    assert_eq!(second.upload_files.load(Ordering::SeqCst), 1);
    assert_eq!(second.streams.load(Ordering::SeqCst), 0);
    let manifest = m.manifest(&id).await.unwrap().expect("manifest published");
    let target = dir.path().join("restored");
    let snap = m.restore_layer(&id, &target).await.unwrap().unwrap();
    assert_eq!(snap.digest, manifest.current.digest);
    for i in 0..3 {
        let name = format!("blob{i}");
        assert!(
            std::fs::read(upper.join(&name)).unwrap() == std::fs::read(target.join(&name)).unwrap()
        );
    }
    assert_eq!(std::fs::read(target.join("small")).unwrap(), b"text");

    // gc aborts the orphan once it is old enough.
    let db = StateDb::open(&cfg.state_db_path).unwrap();
    assert!(s3.abort_stale_uploads(Duration::ZERO, &db).await.unwrap() >= 1);
    assert!(open_uploads(&s3_store, &cfg.prefix).await.is_empty());
}
