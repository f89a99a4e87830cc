//! Persistence driven through the snapshotter core, without containerd: a local-directory store
//! behind a gate (blocked uploads, injected faults) and a fake container lookup.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::outbox::{MARKER, Marker};
use super::{Location, PersistOptions, Persistence, Resolution};
use crate::archive::XattrNs;
use crate::config::{OnBaseChange, PersistPolicy};
use crate::layer::types::ContainerLayerId;
use crate::layer::{LayerSyncManager, SyncOptions};
use crate::snapshotter::containers::{ContainerLookup, ContainerRecord, LookupError, TaskStatus};
use crate::snapshotter::{Labels, Mount, SnapshotError, Snapshotter};
use crate::store::{
    ObjectInfo, ObjectStore, Progress, PutCondition, PutOutcome, StoreError, UploadJournal,
    UploadReport,
};
use crate::sys::overlay::OverlayFeatures;

type StoreResult<T> = std::result::Result<T, StoreError>;

const FEATURES: OverlayFeatures = OverlayFeatures {
    index_off: true,
    userxattr: false,
};
const ID_LABEL: &str = super::identity::SNAPSHOT_ID_LABEL;
const BASE: &str = "default/2/sha256:base";

/// A store whose uploads wait for permits and whose reads can be made to fail.
#[derive(Debug)]
pub(super) struct Gate {
    pub(super) inner: Arc<dyn ObjectStore>,
    pub(super) permits: Semaphore,
    pub(super) uploads_started: AtomicUsize,
    pub(super) fail_reads: AtomicBool,
    /// Reads wait while this is set.
    pub(super) block_reads: AtomicBool,
    /// Reads of manifests (one per restore attempt by each reader).
    pub(super) manifest_reads: AtomicUsize,
}

impl Gate {
    pub(super) fn new(inner: Arc<dyn ObjectStore>, open: bool) -> Arc<Self> {
        Arc::new(Self {
            inner,
            permits: Semaphore::new(if open { Semaphore::MAX_PERMITS / 2 } else { 0 }),
            uploads_started: AtomicUsize::new(0),
            fail_reads: AtomicBool::new(false),
            block_reads: AtomicBool::new(false),
            manifest_reads: AtomicUsize::new(0),
        })
    }

    pub(super) fn release(&self) {
        self.permits.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    async fn read(&self, key: &str) -> StoreResult<()> {
        if key.contains("manifests/") {
            self.manifest_reads.fetch_add(1, Ordering::SeqCst);
        }
        while self.block_reads.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.fault(key)
    }

    pub(super) fn fault(&self, key: &str) -> StoreResult<()> {
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(StoreError::Io {
                op: "read",
                path: PathBuf::from(key),
                source: std::io::Error::other("injected store fault"),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl ObjectStore for Gate {
    fn describe(&self) -> String {
        format!("gated {}", self.inner.describe())
    }
    async fn head(&self, key: &str) -> StoreResult<Option<ObjectInfo>> {
        self.read(key).await?;
        self.inner.head(key).await
    }
    async fn get_bytes(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.read(key).await?;
        self.inner.get_bytes(key).await
    }
    async fn put_bytes(
        &self,
        key: &str,
        data: Vec<u8>,
        cond: PutCondition,
    ) -> StoreResult<PutOutcome> {
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
        self.read(key).await?;
        self.inner.download_to_file(key, dest, progress).await
    }
    async fn upload_file(
        &self,
        key: &str,
        src: &Path,
        journal: &dyn UploadJournal,
        progress: Option<Progress>,
    ) -> StoreResult<UploadReport> {
        self.uploads_started.fetch_add(1, Ordering::SeqCst);
        let _permit = self.permits.acquire().await.expect("gate semaphore closed");
        self.inner.upload_file(key, src, journal, progress).await
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

/// Container records by (namespace, id); `down` simulates an unreachable containerd.
#[derive(Debug, Default)]
pub(super) struct FakeContainers {
    pub(super) records: Mutex<HashMap<(String, String), ContainerRecord>>,
    /// Task states; absent entries have no task.
    pub(super) tasks: Mutex<HashMap<(String, String), TaskStatus>>,
    pub(super) down: AtomicBool,
    pub(super) calls: AtomicUsize,
}

impl FakeContainers {
    pub(super) fn add(&self, ns: &str, id: &str, labels: &[(&str, &str)]) {
        let record = ContainerRecord {
            id: id.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            snapshot_key: id.to_string(),
        };
        self.records
            .lock()
            .unwrap()
            .insert((ns.to_string(), id.to_string()), record);
    }
}

#[async_trait::async_trait]
impl ContainerLookup for FakeContainers {
    async fn get(&self, namespace: &str, id: &str) -> Result<Option<ContainerRecord>, LookupError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(LookupError::Timeout {
                namespace: namespace.to_string(),
                id: id.to_string(),
            });
        }
        Ok(self
            .records
            .lock()
            .unwrap()
            .get(&(namespace.to_string(), id.to_string()))
            .cloned())
    }

    async fn task_status(&self, namespace: &str, id: &str) -> Result<TaskStatus, LookupError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(LookupError::Timeout {
                namespace: namespace.to_string(),
                id: id.to_string(),
            });
        }
        Ok(self
            .tasks
            .lock()
            .unwrap()
            .get(&(namespace.to_string(), id.to_string()))
            .copied()
            .unwrap_or(TaskStatus::Absent))
    }
}

/// A store shared by nodes; each node also has its own snapshotter root.
pub(super) use crate::layer::testenv::SharedStore as Env;

impl Env {
    pub(super) fn node(
        &self,
        name: &str,
        opts: PersistOptions,
        gate: Arc<Gate>,
        worker: bool,
    ) -> Node {
        self.node_with(
            name,
            opts,
            gate,
            Arc::new(FakeContainers::default()),
            worker,
        )
    }

    /// A node without a worker whose container lookups go to a fake it returns.
    pub(super) fn node_asking_containers(
        &self,
        name: &str,
        opts: PersistOptions,
    ) -> (Node, Arc<FakeContainers>) {
        let containers = Arc::new(FakeContainers::default());
        let node = self.node_with(name, opts, self.gate(true), containers.clone(), false);
        (node, containers)
    }

    pub(super) fn node_with(
        &self,
        name: &str,
        opts: PersistOptions,
        gate: Arc<Gate>,
        containers: Arc<FakeContainers>,
        worker: bool,
    ) -> Node {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let store: Arc<dyn ObjectStore> = gate.clone();
        let manager = rt
            .block_on(LayerSyncManager::with_store(self.config(name), store))
            .unwrap();
        let lookup: Arc<dyn ContainerLookup> = containers.clone();
        let persist = Persistence::new(opts, manager, lookup, rt.handle().clone());
        let root = self.dir.path().join(name).join("root");
        let core = Snapshotter::open_with(&root, FEATURES, persist.clone()).unwrap();
        let stop = CancellationToken::new();
        if worker {
            let _enter = rt.enter();
            persist.spawn_worker(stop.clone());
            persist.spawn_flusher(stop.clone());
        }
        Node {
            rt: Some(rt),
            core: Some(core),
            persist,
            gate,
            root,
            stop,
        }
    }

    pub(super) fn gate(&self, open: bool) -> Arc<Gate> {
        Gate::new(Arc::clone(&self.store), open)
    }
}

pub(super) fn opts(policy: PersistPolicy, on_base_change: OnBaseChange) -> PersistOptions {
    PersistOptions {
        policy,
        on_base_change,
        xattr_ns: XattrNs::Trusted,
        restore_timeout: Duration::from_secs(30),
        container_lookup: true,
    }
}

pub(super) fn default_opts() -> PersistOptions {
    opts(PersistPolicy::Labeled, OnBaseChange::Restore)
}

pub(super) struct Node {
    pub(super) rt: Option<Runtime>,
    pub(super) core: Option<Snapshotter>,
    pub(super) persist: Arc<Persistence>,
    pub(super) gate: Arc<Gate>,
    pub(super) root: PathBuf,
    pub(super) stop: CancellationToken,
}

impl Node {
    pub(super) fn core(&self) -> &Snapshotter {
        self.core.as_ref().unwrap()
    }

    pub(super) fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.as_ref().unwrap().block_on(f)
    }

    /// The image layer every container sits on.
    pub(super) fn base_layer(&self) {
        let key = "default/1/extract-1-a sha256:base";
        let m = self.core().prepare(key, "", Labels::new()).unwrap();
        fs::write(upper_of(&m).join("motd"), "image\n").unwrap();
        self.core().commit(BASE, key, Labels::new()).unwrap();
    }

    /// Prepares a container snapshot on the base layer and asks for its mounts, as containerd
    /// does before a container starts (the restore runs in between); returns its upper dir.
    pub(super) fn container(&self, key: &str, identity: Option<&str>) -> PathBuf {
        let upper = upper_of(&self.core().prepare(key, BASE, id_labels(identity)).unwrap());
        self.core().mounts(key).unwrap();
        upper
    }

    /// Stores `files` as `identity`'s layer with `base`, as another node would have.
    pub(super) fn seed(&self, identity: &str, base: &[&str], files: &[(&str, &str)]) {
        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path(), files);
        let id = ContainerLayerId::parse(identity).unwrap();
        let opts = SyncOptions {
            base: Some(base.iter().map(|s| s.to_string()).collect()),
            ..SyncOptions::default()
        };
        self.block_on(
            self.persist
                .manager()
                .sync_layer_with(&id, dir.path(), opts),
        )
        .unwrap();
    }

    /// What the store holds for `identity`, restored into a fresh dir.
    pub(super) fn stored(&self, identity: &str) -> Option<Vec<(String, String)>> {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("upper");
        let id = ContainerLayerId::parse(identity).unwrap();
        self.block_on(self.persist.manager().restore_layer(&id, &target))
            .unwrap()?;
        Some(read_files(&target))
    }

    /// The store's manifest of `identity` (read without the manager's per-identity lock, which
    /// a blocked upload holds).
    pub(super) fn manifest(&self, identity: &str) -> Option<crate::layer::LayerManifest> {
        let id = ContainerLayerId::parse(identity).unwrap();
        self.block_on(self.persist.manager().manifest(&id)).unwrap()
    }

    pub(super) fn queued(&self) -> Vec<super::OutboxRow> {
        self.persist.queued().unwrap()
    }

    pub(super) fn outbox_entries(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.root.join("outbox"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Process death: no graceful stop; the runtime goes with whatever it was doing.
    pub(super) fn kill(mut self) {
        drop(self.core.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.cancel();
        drop(self.core.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

pub(super) fn id_labels(identity: Option<&str>) -> Labels {
    identity
        .map(|id| (ID_LABEL.to_string(), id.to_string()))
        .into_iter()
        .collect()
}

pub(super) fn upper_of(m: &[Mount]) -> PathBuf {
    if m[0].kind == "bind" {
        return PathBuf::from(&m[0].source);
    }
    let o = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .unwrap();
    PathBuf::from(o)
}

pub(super) fn write_files(root: &Path, files: &[(&str, &str)]) {
    for (path, content) in files {
        let p = root.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }
}

/// Regular files under `root` as (relative path, content), sorted.
pub(super) fn read_files(root: &Path) -> Vec<(String, String)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.push((rel, fs::read_to_string(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

pub(super) fn files(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    v.sort();
    v
}

pub(super) fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn identified(identity: &str) -> Option<Resolution> {
    Some(Resolution::Identified(
        ContainerLayerId::parse(identity).unwrap(),
    ))
}

fn snapshot_id(upper: &Path) -> String {
    upper
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn label_identity_restores_in_the_background_and_mounts_waits() {
    let env = Env::new();
    let node = env.node("a", default_opts(), env.gate(true), false);
    node.base_layer();
    node.seed(
        "web/0",
        &["sha256:base"],
        &[("data/state", "kept\n"), ("etc/conf", "x=1\n")],
    );

    // Prepare only records the identity; the restore runs in the background and the upper
    // cannot be mounted (it does not exist) until it is complete. Mounts waits for it.
    let upper = node.container("default/3/c1", Some("web/0"));
    assert_eq!(
        read_files(&upper),
        files(&[("data/state", "kept\n"), ("etc/conf", "x=1\n")])
    );
    assert_eq!(
        node.persist.resolution("default/3/c1").unwrap(),
        identified("web/0")
    );
    // Mounts does not restore again over the container's changes.
    fs::write(upper.join("data/state"), "changed\n").unwrap();
    node.core().mounts("default/3/c1").unwrap();
    assert_eq!(
        fs::read_to_string(upper.join("data/state")).unwrap(),
        "changed\n"
    );

    // Without any stored layer the container starts from the image.
    let fresh = node.container("default/4/c2", Some("web/9"));
    assert!(read_files(&fresh).is_empty());
}

#[test]
fn remove_queues_to_the_outbox_and_returns_while_the_upload_is_blocked() {
    let env = Env::new();
    let node = env.node("a", default_opts(), env.gate(false), true);
    node.base_layer();
    let u1 = node.container("default/3/c1", Some("web/0"));
    write_files(&u1, &[("a/one", "1\n")]);
    fs::write(u1.join("big"), vec![b'x'; 4 << 20]).unwrap();
    let u2 = node.container("default/4/c2", Some("web/1"));
    write_files(&u2, &[("two", "2\n")]);

    node.core().remove("default/3/c1").unwrap();
    wait_for(
        "the worker to block in the upload",
        Duration::from_secs(30),
        || node.gate.uploads_started.load(Ordering::SeqCst) >= 1,
    );
    let started = Instant::now();
    node.core().remove("default/4/c2").unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "remove took {took:?} while an upload was blocked"
    );
    assert_eq!(
        node.gate.uploads_started.load(Ordering::SeqCst),
        1,
        "still blocked"
    );
    assert!(
        node.manifest("web/0").is_none(),
        "nothing reached the store yet"
    );

    // Both dirs are in the outbox with their markers; the records are gone.
    let rows = node.queued();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.location == Location::Outbox));
    let dir1 = node.root.join("outbox").join(rows[0].id.to_string());
    assert_eq!(fs::read_to_string(dir1.join("fs/a/one")).unwrap(), "1\n");
    let marker: Marker = serde_json::from_slice(&fs::read(dir1.join(MARKER)).unwrap()).unwrap();
    assert_eq!(
        (marker.identity.to_string(), marker.key.as_str()),
        ("web/0".to_string(), "default/3/c1")
    );
    assert_eq!(marker.base, Some(vec!["sha256:base".to_string()]));
    assert!(!u1.exists() && !u2.exists());
    assert_eq!(
        node.core().stat("default/3/c1").unwrap_err().code(),
        tonic::Code::NotFound
    );

    node.gate.release();
    wait_for("the outbox to drain", Duration::from_secs(60), || {
        node.queued().is_empty()
    });
    assert!(
        node.outbox_entries().is_empty(),
        "{:?}",
        node.outbox_entries()
    );
    let stored = node.stored("web/0").unwrap();
    assert!(stored.contains(&("a/one".to_string(), "1\n".to_string())));
    assert_eq!(node.stored("web/1").unwrap(), files(&[("two", "2\n")]));
    let manifest = node.manifest("web/0").unwrap();
    assert_eq!(manifest.current.base, Some(vec!["sha256:base".to_string()]));
}

#[test]
fn a_new_container_restores_from_the_outbox_while_the_upload_is_pending() {
    let env = Env::new();
    let node = env.node("a", default_opts(), env.gate(true), false);
    node.base_layer();
    node.seed("web/0", &["sha256:base"], &[("v", "1\n")]);
    let v1 = node.manifest("web/0").unwrap().current.digest;
    node.gate.permits.forget_permits(usize::MAX);
    let gate = node.gate.clone();
    {
        let _enter = node.rt.as_ref().unwrap().enter();
        node.persist.spawn_worker(node.stop.clone());
    }

    let u1 = node.container("default/3/c1", Some("web/0"));
    assert_eq!(read_files(&u1), files(&[("v", "1\n")]));
    fs::write(u1.join("v"), "2\n").unwrap();
    node.core().remove("default/3/c1").unwrap();
    wait_for("the upload of v2 to block", Duration::from_secs(30), || {
        gate.uploads_started.load(Ordering::SeqCst) >= 1
    });
    assert_eq!(
        node.manifest("web/0").unwrap().current.digest,
        v1,
        "the store is behind"
    );

    // The new container sees v2 from the local outbox, not v1 from the store.
    let u2 = node.container("default/4/c2", Some("web/0"));
    assert_eq!(read_files(&u2), files(&[("v", "2\n")]));
    fs::write(u2.join("v"), "3\n").unwrap();

    gate.release();
    wait_for("v2 to be uploaded", Duration::from_secs(60), || {
        node.queued().is_empty()
    });
    assert_eq!(node.stored("web/0").unwrap(), files(&[("v", "2\n")]));
    node.core().remove("default/4/c2").unwrap();
    wait_for("v3 to be uploaded", Duration::from_secs(60), || {
        node.queued().is_empty()
    });
    assert_eq!(node.stored("web/0").unwrap(), files(&[("v", "3\n")]));
    let m = node.manifest("web/0").unwrap();
    assert_eq!(
        m.history.len(),
        2,
        "v1 -> v2 -> v3, each moving forward: {m:?}"
    );
    assert!(m.current.seq > m.history[0].seq && m.history[0].seq > m.history[1].seq);
}

#[test]
fn two_live_snapshots_with_one_identity_are_refused() {
    let env = Env::new();
    let (node, containers) = env.node_asking_containers("a", default_opts());
    node.base_layer();
    node.container("default/3/c1", Some("web/0"));
    containers.add("default", "c1", &[]);
    // Prepare records the wish and returns (containerd holds its transaction); the Mounts
    // before the container start refuses, since c1's container is alive.
    node.core()
        .prepare("default/4/c2", BASE, id_labels(Some("web/0")))
        .unwrap();
    let err = node.core().mounts("default/4/c2").unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let msg = err.full_message();
    assert!(
        msg.contains("web/0") && msg.contains("default/3/c1"),
        "{msg}"
    );
    node.core().remove("default/4/c2").unwrap();
    assert!(
        node.queued().is_empty(),
        "a refused snapshot is never queued"
    );

    // The same through container labels at Mounts.
    node.container("default/5/c3", None);
    containers.add("default", "c3", &[("zlayer.id", "web/0")]);
    let err = node.core().mounts("default/5/c3").unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::FailedPrecondition,
        "{}",
        err.full_message()
    );

    // Once the first is gone the identity is free again.
    node.core().remove("default/3/c1").unwrap();
    node.container("default/6/c4", Some("web/0"));
}

#[test]
fn a_successor_waits_for_its_predecessors_remove_and_sees_its_writes() {
    let env = Env::new();
    let (node, containers) = env.node_asking_containers("a", default_opts());
    node.base_layer();
    let u1 = node.container("default/3/c1", Some("web/0"));
    write_files(&u1, &[("log", "run 1\n")]);
    // `ctr run --rm`: the container record is deleted, the snapshot's Remove comes later from
    // containerd's GC, after the next run's Prepare and first Mounts.
    assert!(containers.records.lock().unwrap().is_empty());
    node.core()
        .prepare("default/4/c2", BASE, id_labels(Some("web/0")))
        .unwrap();
    let u2 = std::thread::scope(|s| {
        let mounts = s.spawn(|| node.core().mounts("default/4/c2"));
        std::thread::sleep(Duration::from_millis(500));
        assert!(!mounts.is_finished(), "Mounts waits for the predecessor");
        node.core().remove("default/3/c1").unwrap();
        upper_of(&mounts.join().unwrap().unwrap())
    });
    assert_eq!(read_files(&u2), files(&[("log", "run 1\n")]));
    assert_eq!(
        node.persist.resolution("default/4/c2").unwrap(),
        identified("web/0")
    );
}

#[test]
fn a_predecessor_that_is_never_removed_fails_the_successor_in_bounded_time() {
    let env = Env::new();
    let mut o = default_opts();
    o.restore_timeout = Duration::from_secs(2);
    let (node, _containers) = env.node_asking_containers("a", o);
    node.base_layer();
    node.container("default/3/c1", Some("web/0"));
    node.core()
        .prepare("default/4/c2", BASE, id_labels(Some("web/0")))
        .unwrap();
    let started = Instant::now();
    let err = node.core().mounts("default/4/c2").unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        matches!(
            err.code(),
            tonic::Code::FailedPrecondition | tonic::Code::Unavailable
        ),
        "{}",
        err.full_message()
    );
    assert!(
        err.full_message().contains("web/0"),
        "{}",
        err.full_message()
    );
}

#[test]
fn prepare_does_no_store_io_and_the_upper_is_not_mountable_until_restored() {
    let env = Env::new();
    let node = env.node("a", default_opts(), env.gate(true), false);
    node.base_layer();
    node.seed("web/0", &["sha256:base"], &[("data", "kept\n")]);
    // Every store read blocks: Prepare must still return at once.
    node.gate.manifest_reads.store(0, Ordering::SeqCst);
    node.gate.block_reads.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let m = node
        .core()
        .prepare("default/3/c1", BASE, id_labels(Some("web/0")))
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "prepare took {:?}",
        started.elapsed()
    );
    // The returned mounts name an upper dir that does not exist yet: mounting them fails
    // (ENOENT) rather than showing an empty upper.
    let upper = upper_of(&m);
    assert!(!upper.exists(), "upper must not exist before the restore");
    assert_eq!(
        node.core().usage("default/3/c1").unwrap(),
        crate::snapshotter::Usage::default()
    );
    // Concurrent Mounts share the one restore and both see the layer.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| node.core().mounts("default/3/c1"));
        let b = s.spawn(|| node.core().mounts("default/3/c1"));
        std::thread::sleep(Duration::from_millis(300));
        assert!(!a.is_finished() && !b.is_finished());
        node.gate.block_reads.store(false, Ordering::SeqCst);
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(a.unwrap(), b.unwrap());
    assert_eq!(read_files(&upper), files(&[("data", "kept\n")]));
    assert_eq!(
        node.gate.manifest_reads.load(Ordering::SeqCst),
        2,
        "one restore: a manifest read by the persistence layer and one by the manager"
    );
}

#[test]
fn mounts_fails_after_the_restore_timeout_and_a_later_mounts_gets_the_same_restore() {
    let env = Env::new();
    let mut o = default_opts();
    o.restore_timeout = Duration::from_secs(1);
    let node = env.node("a", o, env.gate(true), false);
    node.base_layer();
    node.seed("web/0", &["sha256:base"], &[("data", "kept\n")]);
    node.gate.manifest_reads.store(0, Ordering::SeqCst);
    node.gate.block_reads.store(true, Ordering::SeqCst);
    node.core()
        .prepare("default/3/c1", BASE, id_labels(Some("web/0")))
        .unwrap();
    let err = node.core().mounts("default/3/c1").unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::Unavailable,
        "{}",
        err.full_message()
    );
    let msg = err.full_message();
    assert!(
        msg.contains("web/0") && msg.contains("default/3/c1"),
        "{msg}"
    );
    node.gate.block_reads.store(false, Ordering::SeqCst);
    let upper = upper_of(&node.core().mounts("default/3/c1").unwrap());
    assert_eq!(read_files(&upper), files(&[("data", "kept\n")]));
    assert_eq!(
        node.gate.manifest_reads.load(Ordering::SeqCst),
        2,
        "the retry waited for the first restore"
    );
}

#[test]
fn an_upper_with_content_but_no_restore_is_refused_and_never_persisted() {
    let env = Env::new();
    let (node, containers) = env.node_asking_containers("a", default_opts());
    node.base_layer();
    node.seed("db/0", &["sha256:base"], &[("db", "rows\n")]);
    let before = node.manifest("db/0").unwrap().current.digest;
    // Something wrote into the upper before the identity was known (e.g. it was mounted
    // while containerd could not be asked).
    let upper = node.container("default/3/c1", None);
    fs::write(upper.join("db"), "empty start\n").unwrap();
    containers.add("default", "c1", &[("zlayer.id", "db/0")]);
    let err = node.core().mounts("default/3/c1").unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::FailedPrecondition,
        "{}",
        err.full_message()
    );
    assert!(
        err.full_message().contains("db/0"),
        "{}",
        err.full_message()
    );
    // Refused again, and at Remove it is not queued: the stored layer stays.
    assert!(node.core().mounts("default/3/c1").is_err());
    node.core().remove("default/3/c1").unwrap();
    assert!(node.queued().is_empty());
    assert_eq!(node.manifest("db/0").unwrap().current.digest, before);
}

#[test]
fn base_changes_follow_the_policy() {
    let env = Env::new();
    let seeder = env.node("seed", default_opts(), env.gate(true), false);
    seeder.seed("web/0", &["sha256:old"], &[("f", "kept\n")]);
    drop(seeder);

    let restore = env.node(
        "restore",
        opts(PersistPolicy::Labeled, OnBaseChange::Restore),
        env.gate(true),
        false,
    );
    restore.base_layer();
    let u = restore.container("default/3/c1", Some("web/0"));
    assert_eq!(read_files(&u), files(&[("f", "kept\n")]));

    let skip = env.node(
        "skip",
        opts(PersistPolicy::Labeled, OnBaseChange::Skip),
        env.gate(true),
        false,
    );
    skip.base_layer();
    let u = skip.container("default/3/c1", Some("web/0"));
    assert!(read_files(&u).is_empty());

    let fail = env.node(
        "fail",
        opts(PersistPolicy::Labeled, OnBaseChange::Fail),
        env.gate(true),
        false,
    );
    fail.base_layer();
    fail.core()
        .prepare("default/3/c1", BASE, id_labels(Some("web/0")))
        .unwrap();
    let err = fail.core().mounts("default/3/c1").unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let msg = err.full_message();
    assert!(
        msg.contains("sha256:old") && msg.contains("sha256:base"),
        "{msg}"
    );
    fail.core().remove("default/3/c1").unwrap();
    assert!(fail.queued().is_empty());
}

#[test]
fn mounts_resolves_container_labels_once_the_record_exists() {
    let env = Env::new();
    let (node, containers) = env.node_asking_containers("a", default_opts());
    node.base_layer();
    node.seed("db/0", &["sha256:base"], &[("db", "rows\n")]);
    let upper = node.container("default/3/c1", None);
    assert_eq!(
        node.persist.resolution("default/3/c1").unwrap(),
        Some(Resolution::Pending)
    );

    // First Mounts: no record yet (`ctr run` asks before creating it); still pending.
    node.core().mounts("default/3/c1").unwrap();
    // containerd cannot be asked: the identity is unknown, so Mounts fails (Unavailable,
    // naming the cause) instead of starting the container without its layer.
    containers.down.store(true, Ordering::SeqCst);
    let err = node.core().mounts("default/3/c1").unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::Unavailable,
        "{}",
        err.full_message()
    );
    assert!(
        err.full_message().contains("default/3/c1"),
        "{}",
        err.full_message()
    );
    assert_eq!(
        node.persist.resolution("default/3/c1").unwrap(),
        Some(Resolution::Pending)
    );
    assert!(read_files(&upper).is_empty());

    containers.down.store(false, Ordering::SeqCst);
    containers.add("default", "c1", &[("zlayer.id", "db/0")]);
    node.core().mounts("default/3/c1").unwrap();
    assert_eq!(
        node.persist.resolution("default/3/c1").unwrap(),
        identified("db/0")
    );
    assert_eq!(read_files(&upper), files(&[("db", "rows\n")]));

    // Decided: not asked again.
    let calls = containers.calls.load(Ordering::SeqCst);
    node.core().mounts("default/3/c1").unwrap();
    assert_eq!(containers.calls.load(Ordering::SeqCst), calls);
}

#[test]
fn mounts_stands_alone_after_a_restart() {
    let env = Env::new();
    let (node, containers) = env.node_asking_containers("a", default_opts());
    node.base_layer();
    node.seed("db/0", &["sha256:base"], &[("db", "rows\n")]);
    let upper = node.container("default/3/c1", None);
    node.kill();

    let node = env.node_with(
        "a",
        default_opts(),
        env.gate(true),
        containers.clone(),
        false,
    );
    containers.add("default", "c1", &[("zlayer.id", "db/0")]);
    let m = node.core().mounts("default/3/c1").unwrap();
    assert_eq!(upper_of(&m), upper);
    assert_eq!(read_files(&upper), files(&[("db", "rows\n")]));
}

#[test]
fn a_failed_restore_leaves_the_upper_empty_and_is_not_persisted() {
    let env = Env::new();
    let (node, containers) = env.node_asking_containers("a", default_opts());
    node.base_layer();
    node.seed("db/0", &["sha256:base"], &[("db", "rows\n")]);

    // Store fault at Mounts: Unavailable, upper untouched, retried by the next Mounts.
    let upper = node.container("default/3/c1", None);
    containers.add("default", "c1", &[("zlayer.id", "db/0")]);
    node.gate.fail_reads.store(true, Ordering::SeqCst);
    let err = node.core().mounts("default/3/c1").unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::Unavailable,
        "{}",
        err.full_message()
    );
    assert!(!upper.exists(), "not mountable after a failed restore");
    // Removed before any restore succeeded: its (empty) upper must not replace the layer.
    node.gate.fail_reads.store(false, Ordering::SeqCst);
    node.core().remove("default/3/c1").unwrap();
    assert!(node.queued().is_empty());

    // Corrupt blob: Prepare succeeds (no store I/O), Mounts fails, nothing is ever mountable.
    let blobs = env.dir.path().join("store/layers");
    for e in fs::read_dir(&blobs).unwrap() {
        let p = e.unwrap().path();
        if p.to_string_lossy().ends_with(".tar.zst") {
            let mut bytes = fs::read(&p).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 0xff;
            fs::write(&p, bytes).unwrap();
        }
    }
    let m = node
        .core()
        .prepare("default/4/c2", BASE, id_labels(Some("db/0")))
        .unwrap();
    let err = node.core().mounts("default/4/c2").unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok);
    assert!(!upper_of(&m).exists(), "no upper after a failed restore");
    let staging: Vec<_> = fs::read_dir(upper_of(&m).parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("staging"))
        .collect();
    assert!(staging.is_empty(), "staging left behind: {staging:?}");
    node.core().remove("default/4/c2").unwrap();
    assert!(node.queued().is_empty());
}

#[test]
fn extract_and_unparseable_keys_and_views_are_never_persisted() {
    let env = Env::new();
    let (node, containers) =
        env.node_asking_containers("a", opts(PersistPolicy::All, OnBaseChange::Restore));
    node.base_layer();
    for key in ["plain-key", "default/1/extract-9-z sha256:q"] {
        let m = node
            .core()
            .prepare(key, "", id_labels(Some("web/0")))
            .unwrap();
        fs::write(upper_of(&m).join("f"), "x").unwrap();
        node.core().mounts(key).unwrap();
        assert_eq!(node.persist.resolution(key).unwrap(), None, "{key}");
        node.core().remove(key).unwrap();
    }
    node.core()
        .view("default/7/v1", BASE, id_labels(Some("web/0")))
        .unwrap();
    node.core().mounts("default/7/v1").unwrap();
    assert_eq!(node.persist.resolution("default/7/v1").unwrap(), None);
    node.core().remove("default/7/v1").unwrap();
    assert!(node.queued().is_empty());
    assert!(node.outbox_entries().is_empty());

    // Under `all` a plain container is persisted as <namespace>/<container id>.
    let upper = node.container("default/8/c9", None);
    containers.add("default", "c9", &[]);
    node.core().mounts("default/8/c9").unwrap();
    assert_eq!(
        node.persist.resolution("default/8/c9").unwrap(),
        identified("default/c9")
    );
    fs::write(upper.join("f"), "x").unwrap();
    node.core().remove("default/8/c9").unwrap();
    assert_eq!(node.queued().len(), 1);

    // Under the default policy an unlabeled container is not.
    let labeled = env.node_with(
        "b",
        default_opts(),
        env.gate(true),
        containers.clone(),
        false,
    );
    labeled.base_layer();
    let upper = labeled.container("default/3/anon", None);
    containers.add("default", "anon", &[("nerdctl/name", "anon")]);
    labeled.core().mounts("default/3/anon").unwrap();
    assert_eq!(
        labeled.persist.resolution("default/3/anon").unwrap(),
        Some(Resolution::None)
    );
    fs::write(upper.join("f"), "x").unwrap();
    labeled.core().remove("default/3/anon").unwrap();
    assert!(labeled.queued().is_empty());
    assert!(labeled.outbox_entries().is_empty());
}

#[test]
fn commit_queues_the_committed_state() {
    let env = Env::new();
    let node = env.node("a", default_opts(), env.gate(true), false);
    node.base_layer();
    let u1 = node.container("default/3/c1", Some("web/0"));
    write_files(&u1, &[("c", "committed\n")]);
    node.core()
        .commit("default/5/snap", "default/3/c1", Labels::new())
        .unwrap();
    let rows = node.queued();
    assert_eq!((rows.len(), rows[0].location), (1, Location::Live));
    // Removed before the worker got to it: moved to the outbox, not the trash.
    node.core().remove("default/5/snap").unwrap();
    assert_eq!(node.queued()[0].location, Location::Outbox);
    assert_eq!(node.outbox_entries(), vec![rows[0].id.to_string()]);
    assert_eq!(node.block_on(node.persist.flush()).unwrap(), 1);
    assert_eq!(
        node.stored("web/0").unwrap(),
        files(&[("c", "committed\n")])
    );
    assert!(node.outbox_entries().is_empty());

    // Synced in place: the committed snapshot stays.
    let u2 = node.container("default/6/c2", Some("web/1"));
    write_files(&u2, &[("d", "2\n")]);
    node.core()
        .commit("default/7/snap2", "default/6/c2", Labels::new())
        .unwrap();
    node.block_on(node.persist.flush()).unwrap();
    assert_eq!(node.stored("web/1").unwrap(), files(&[("d", "2\n")]));
    assert!(node.queued().is_empty());
    assert_eq!(fs::read_to_string(u2.join("d")).unwrap(), "2\n");
    node.core().stat("default/7/snap2").unwrap();
}

#[test]
fn sync_now_syncs_a_live_upper_or_flushes_the_outbox() {
    let env = Env::new();
    let node = env.node("a", default_opts(), env.gate(true), false);
    node.base_layer();
    let upper = node.container("default/3/c1", Some("web/0"));
    write_files(&upper, &[("live", "1\n")]);
    let first = node
        .block_on(node.persist.sync_now("default/3/c1"))
        .unwrap();
    assert_eq!(node.stored("web/0").unwrap(), files(&[("live", "1\n")]));

    fs::write(upper.join("live"), "2\n").unwrap();
    let second = node.block_on(node.persist.sync_now("web/0")).unwrap();
    assert_ne!(first.digest, second.digest);
    assert_eq!(node.stored("web/0").unwrap(), files(&[("live", "2\n")]));

    let err = node
        .block_on(node.persist.sync_now("nobody/0"))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    fs::write(upper.join("live"), "3\n").unwrap();
    node.core().remove("default/3/c1").unwrap();
    assert_eq!(node.queued().len(), 1);
    node.block_on(node.persist.sync_now("web/0")).unwrap();
    assert!(node.queued().is_empty());
    assert!(node.outbox_entries().is_empty());
    assert_eq!(node.stored("web/0").unwrap(), files(&[("live", "3\n")]));
}

#[test]
fn killed_mid_upload_the_outbox_resumes_on_restart() {
    let env = Env::new();
    let node = env.node("a", default_opts(), env.gate(false), true);
    node.base_layer();
    let upper = node.container("default/3/c1", Some("web/0"));
    write_files(&upper, &[("state", "precious\n")]);
    fs::write(upper.join("big"), vec![b'y'; 2 << 20]).unwrap();
    node.core().remove("default/3/c1").unwrap();
    wait_for("the upload to start", Duration::from_secs(30), || {
        node.gate.uploads_started.load(Ordering::SeqCst) >= 1
    });
    node.kill();

    let node = env.node("a", default_opts(), env.gate(true), true);
    wait_for(
        "the outbox to drain after restart",
        Duration::from_secs(60),
        || node.queued().is_empty(),
    );
    let stored = node.stored("web/0").unwrap();
    assert!(stored.contains(&("state".to_string(), "precious\n".to_string())));
    assert!(node.outbox_entries().is_empty());
}

#[test]
fn start_up_repairs_every_crash_window() {
    let env = Env::new();
    let node = env.node("a", default_opts(), env.gate(true), false);
    node.base_layer();
    let u1 = node.container("default/3/c1", Some("web/0"));
    write_files(&u1, &[("one", "1\n")]);
    for (key, id, content) in [
        ("default/4/c2", "web/1", "2\n"),
        ("default/5/c3", "web/2", "3\n"),
    ] {
        let u = node.container(key, Some(id));
        write_files(&u, &[("f", content)]);
        node.core().remove(key).unwrap();
    }
    let rows = node.queued();
    let (n2, n3) = (rows[0].id, rows[1].id);
    let outbox = node.root.join("outbox");
    let sid2 = rows[0].snapshot_id;

    // (1) Removal of c1 renamed its dir but the transaction never committed.
    let dir1 = u1.parent().unwrap().to_path_buf();
    let marker = Marker {
        outbox_id: 999,
        identity: ContainerLayerId::new("web", "0"),
        seq: 7,
        base: None,
        key: "default/3/c1".into(),
        snapshot_id: snapshot_id(&u1).parse().unwrap(),
    };
    fs::write(dir1.join(MARKER), serde_json::to_vec(&marker).unwrap()).unwrap();
    fs::rename(&dir1, outbox.join("999")).unwrap();
    // A stray entry that is not ours.
    fs::create_dir(outbox.join("stray")).unwrap();
    let root = node.root.clone();
    node.kill();
    // (2) The rename of c2's removal never reached the disk.
    fs::rename(
        outbox.join(n2.to_string()),
        root.join("snapshots").join(sid2.to_string()),
    )
    .unwrap();
    // (3) The worker finished c3's row but died before deleting its dir.
    let conn = rusqlite::Connection::open(root.join("metadata.db")).unwrap();
    conn.execute("DELETE FROM persist_outbox WHERE id = ?1", [n3])
        .unwrap();
    drop(conn);

    let node = env.node("a", default_opts(), env.gate(true), false);
    assert_eq!(
        read_files(&u1),
        files(&[("one", "1\n")]),
        "c1 is back in place"
    );
    assert!(!dir1.join(MARKER).exists());
    node.core().mounts("default/3/c1").unwrap();
    let rows = node.queued();
    assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![n2, n3]);
    assert_eq!(node.outbox_entries(), vec![n2.to_string(), n3.to_string()]);
    assert_eq!(node.block_on(node.persist.flush()).unwrap(), 2);
    assert_eq!(node.stored("web/1").unwrap(), files(&[("f", "2\n")]));
    assert_eq!(node.stored("web/2").unwrap(), files(&[("f", "3\n")]));
    assert!(node.outbox_entries().is_empty());
    assert_eq!(
        node.persist.resolution("default/3/c1").unwrap(),
        identified("web/0")
    );
}

#[test]
fn errors_reach_grpc_with_persistence_codes() {
    let e = SnapshotError::hook(super::PersistError::NothingToSync {
        target: "x/y".into(),
    });
    assert_eq!(tonic::Status::from(e).code(), tonic::Code::NotFound);
}

#[test]
fn unmatched_outbox_entries_are_quarantined_kept_and_listed() {
    let env = Env::new();
    let node = env.node("a", default_opts(), env.gate(true), false);
    let root = node.root.clone();
    let outbox = root.join("outbox");
    // No marker; an unreadable marker; a marker naming another entry.
    fs::create_dir_all(outbox.join("stray/fs")).unwrap();
    fs::write(outbox.join("stray/fs/secret"), "only copy\n").unwrap();
    fs::create_dir_all(outbox.join("55/fs")).unwrap();
    fs::write(outbox.join("55").join(MARKER), "{not json").unwrap();
    fs::write(outbox.join("55/fs/data"), "55\n").unwrap();
    let marker = Marker {
        outbox_id: 78,
        identity: ContainerLayerId::new("web", "0"),
        seq: 1,
        base: None,
        key: "default/3/c1".into(),
        snapshot_id: 3,
    };
    fs::create_dir_all(outbox.join("77/fs")).unwrap();
    fs::write(
        outbox.join("77").join(MARKER),
        serde_json::to_vec(&marker).unwrap(),
    )
    .unwrap();
    node.kill();

    let node = env.node("a", default_opts(), env.gate(true), false);
    assert!(
        node.outbox_entries().is_empty(),
        "{:?}",
        node.outbox_entries()
    );
    assert!(node.queued().is_empty());
    let status = super::node_status(&root).unwrap().unwrap();
    assert_eq!(status.quarantined.len(), 3, "{status:?}");
    let mut contents = Vec::new();
    for q in &status.quarantined {
        assert!(q.starts_with(root.join("quarantine")));
        contents.extend(read_files(&q.join("fs")));
    }
    contents.sort();
    assert_eq!(
        contents,
        files(&[("secret", "only copy\n"), ("data", "55\n")]),
        "nothing was deleted"
    );
    let trash: Vec<_> = fs::read_dir(root.join("trash")).unwrap().collect();
    assert!(trash.is_empty());
}

#[test]
fn a_failed_fsync_after_the_outbox_rename_undoes_the_rename() {
    let env = Env::new();
    let node = env.node("a", default_opts(), env.gate(true), false);
    node.base_layer();
    let upper = node.container("default/3/c1", Some("web/0"));
    write_files(&upper, &[("keep", "me\n")]);
    let outbox = node.root.join("outbox");
    super::outbox::failpoint::fail_fsync_of(Some(&outbox));
    let err = node.core().remove("default/3/c1");
    super::outbox::failpoint::fail_fsync_of(None);
    let err = err.unwrap_err();
    assert!(
        err.full_message().contains("fsync"),
        "{}",
        err.full_message()
    );
    // Everything as before: record, dir in place without a marker, no row, nothing queued.
    node.core().stat("default/3/c1").unwrap();
    assert_eq!(read_files(&upper), files(&[("keep", "me\n")]));
    assert!(!upper.parent().unwrap().join(MARKER).exists());
    assert!(node.queued().is_empty());
    assert!(node.outbox_entries().is_empty());
    // A later Remove queues it normally.
    node.core().remove("default/3/c1").unwrap();
    assert_eq!(node.queued().len(), 1);
}

#[test]
fn a_layer_that_cannot_be_packed_becomes_a_dead_letter_and_is_kept() {
    let env = Env::new();
    let node = env.node("a", default_opts(), env.gate(true), false);
    node.base_layer();
    let upper = node.container("default/3/c1", Some("web/0"));
    write_files(&upper, &[("victim", "data\n")]);
    rustix::fs::setxattr(
        upper.join("victim"),
        "user.overlay.metacopy",
        b"",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    node.core().remove("default/3/c1").unwrap();
    let clear_schedule = |root: &Path| {
        let conn = rusqlite::Connection::open(root.join("metadata.db")).unwrap();
        conn.execute("UPDATE persist_outbox SET next_attempt_ns = 0", [])
            .unwrap();
    };
    for attempt in 1..=super::worker::MAX_LOCAL_ATTEMPTS {
        node.block_on(node.persist.pass());
        let row = node.queued().pop().unwrap();
        assert_eq!(row.attempts, attempt);
        assert_eq!(row.dead, attempt == super::worker::MAX_LOCAL_ATTEMPTS);
        assert!(
            row.last_error.as_deref().unwrap().contains("victim"),
            "{row:?}"
        );
        clear_schedule(&node.root);
    }
    // Dead: not retried by further passes, still on disk and listed by status.
    node.block_on(node.persist.pass());
    let row = node.queued().pop().unwrap();
    assert_eq!(row.attempts, super::worker::MAX_LOCAL_ATTEMPTS);
    let dir = node.root.join("outbox").join(row.id.to_string());
    assert_eq!(fs::read_to_string(dir.join("fs/victim")).unwrap(), "data\n");
    let status = super::node_status(&node.root).unwrap().unwrap();
    assert!(status.queued[0].dead);
    assert!(
        status.queued[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("metacopy")
    );
    // `gc` revives it (the daemon retries it).
    assert_eq!(super::retry_dead_letters(&node.root).unwrap(), 1);
    let row = node.queued().pop().unwrap();
    assert!(!row.dead && row.attempts == 0);
    // So does a restart; the entry is never dropped.
    let conn = rusqlite::Connection::open(node.root.join("metadata.db")).unwrap();
    conn.execute("UPDATE persist_outbox SET dead = 1", [])
        .unwrap();
    drop(conn);
    node.kill();
    let node = env.node("a", default_opts(), env.gate(true), false);
    let row = node.queued().pop().unwrap();
    assert!(!row.dead);
    assert!(
        node.root
            .join("outbox")
            .join(row.id.to_string())
            .join("fs/victim")
            .exists()
    );
}
