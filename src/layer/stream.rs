//! Overlapped phases: a sync uploads the spool while packing writes it, a restore extracts the
//! archive while the download fills it in.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tokio::sync::oneshot;

use super::error::{LayerError, store as store_err};
use super::manager::accumulate;
use super::manifest::ManifestEntry;
use super::options::{LayerProgress, Phase, ProgressEvent};
use crate::archive::{self, SpoolObserver, UnpackOptions, UnpackStats};
use crate::store::follow::{Follow, FollowReader};
use crate::store::{self as objstore, GrowingFile, ObjectStore, SpoolFeed, StreamedUpload};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Hands the spool being packed to the async side and feeds it the spool's growth.
pub(super) struct SpoolWatcher {
    created: Mutex<Option<oneshot::Sender<GrowingFile>>>,
    feed: Mutex<Option<SpoolFeed>>,
}

impl SpoolWatcher {
    pub(super) fn new() -> (Self, oneshot::Receiver<GrowingFile>) {
        let (tx, rx) = oneshot::channel();
        (
            Self {
                created: Mutex::new(Some(tx)),
                feed: Mutex::new(None),
            },
            rx,
        )
    }

    /// Packing succeeded: the spool is final at `len` bytes.
    pub(super) fn complete(&self, len: u64) {
        if let Some(f) = lock(&self.feed).as_ref() {
            f.complete(len);
        }
    }
}

impl SpoolObserver for SpoolWatcher {
    fn created(&self, file: &File) {
        match GrowingFile::follow(file) {
            Ok((growing, feed)) => {
                *lock(&self.feed) = Some(feed);
                if let Some(tx) = lock(&self.created).take() {
                    // A closed receiver only means nobody streams this spool.
                    let _ = tx.send(growing);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot follow the spool; uploading after packing");
            }
        }
    }

    fn written(&self, total: u64) {
        if let Some(f) = lock(&self.feed).as_ref() {
            f.written(total);
        }
    }
}

/// Upload progress of a streamed upload: counted from the first part, shown only once packing
/// is over (so a progress display does not flip between phases) and the total is known.
pub(super) struct UploadGate {
    progress: LayerProgress,
    done: AtomicU64,
    total: OnceLock<u64>,
}

impl UploadGate {
    pub(super) fn new(progress: LayerProgress) -> Arc<Self> {
        Arc::new(Self {
            progress,
            done: AtomicU64::new(0),
            total: OnceLock::new(),
        })
    }

    /// The store-side callback (byte deltas).
    pub(super) fn callback(self: &Arc<Self>) -> objstore::Progress {
        let gate = Arc::clone(self);
        Arc::new(move |delta| {
            let done = gate.done.fetch_add(delta, Ordering::Relaxed) + delta;
            if let Some(total) = gate.total.get() {
                gate.emit(done, *total);
            }
        })
    }

    /// Packing is over; start showing upload progress towards `total`.
    pub(super) fn open(&self, total: u64) {
        let _ = self.total.set(total);
        self.emit(self.done.load(Ordering::Relaxed), total);
    }

    fn emit(&self, done: u64, total: u64) {
        (self.progress)(ProgressEvent {
            phase: Phase::Upload,
            done,
            total: Some(total),
        });
    }
}

/// An upload that started while packing.
pub(super) struct Streaming {
    pub upload: Box<dyn StreamedUpload>,
    pub gate: Option<Arc<UploadGate>>,
}

/// What a restore downloads and where it lands.
pub(super) struct RestoreJob {
    pub key: String,
    pub spool: PathBuf,
    pub target: PathBuf,
    pub limits: UnpackOptions,
    pub progress: Option<LayerProgress>,
}

/// An extraction's result, after its blocking task was joined.
type Joined<T> = std::result::Result<archive::Result<T>, tokio::task::JoinError>;
type Unpacked = Joined<(UnpackStats, String)>;

/// A download into a scratch file that [`FollowReader`]s read while it fills in. Dropped before
/// its download ended, it ends as failed: a cancelled restore must not leave an extraction
/// thread waiting for data that never comes.
struct Followed {
    key: String,
    spool: PathBuf,
    follow: Arc<Follow>,
}

impl Followed {
    fn new(key: String, spool: PathBuf) -> Self {
        Self {
            key,
            spool,
            follow: Arc::new(Follow::default()),
        }
    }

    fn reader(&self) -> FollowReader {
        FollowReader::new(self.spool.clone(), Arc::clone(&self.follow))
    }

    /// Downloads the object, letting readers follow; ends the follow either way.
    async fn download(
        &self,
        store: &dyn ObjectStore,
        progress: Option<objstore::Progress>,
    ) -> Result<u64, objstore::StoreError> {
        let follow = Arc::clone(&self.follow);
        let ready: objstore::PrefixReady = Arc::new(move |n| follow.ready(n));
        let res = store
            .download_following(&self.key, &self.spool, ready, progress)
            .await;
        self.follow.end(res.as_ref().ok().copied());
        res
    }

    /// Makes readers that are still waiting fail (a no-op once the download completed).
    fn fail(&self) {
        self.follow.end(None);
    }
}

impl Drop for Followed {
    fn drop(&mut self) {
        self.fail();
    }
}

/// Runs `download` beside the extraction reading it. Extraction only ends first when it
/// failed: the rest of the download is then moot and dropped (`None`).
async fn overlap<D, T: Send + 'static>(
    download: impl std::future::Future<Output = D>,
    mut unpacking: tokio::task::JoinHandle<archive::Result<T>>,
) -> (Option<D>, Joined<T>) {
    tokio::pin!(download);
    tokio::select! {
        // A failed download also fails its reader: report the download's error, it says why.
        biased;
        d = &mut download => (Some(d), (&mut unpacking).await),
        u = &mut unpacking => {
            let failed = !matches!(&u, Ok(Ok(_)));
            (if failed { None } else { Some(download.await) }, u)
        }
    }
}

/// Downloads `entry`'s blob into the spool while extracting it from there into the target
/// (digest checked before the swap), then fingerprints the target. Returns the download's
/// result (`None` when extraction failed first and the download was dropped) and the
/// extraction's (stats and fingerprint). The caller removes the spool.
pub(super) async fn download_and_unpack(
    store: &Arc<dyn ObjectStore>,
    entry: &ManifestEntry,
    job: RestoreJob,
) -> (Option<Result<u64, objstore::StoreError>>, Unpacked) {
    let downloading = Arc::new(AtomicBool::new(true));
    let download_progress = job
        .progress
        .clone()
        .map(|p| accumulate(p, Phase::Download, Some(entry.compressed_size_bytes)));
    let followed = Followed::new(job.key, job.spool);
    let reader = followed.reader();
    let (spool, target, digest) = (followed.spool.clone(), job.target, entry.digest.clone());
    let (progress, total, compressed) = (
        job.progress,
        Some(entry.size_bytes),
        entry.compressed_size_bytes,
    );
    let gate = Arc::clone(&downloading);
    let limits = job.limits;
    let unpacking = tokio::task::spawn_blocking(move || {
        let cb = progress.map(|p| {
            move |done: u64| {
                // Shown once the download is over, so a display does not flip phases.
                if !gate.load(Ordering::Relaxed) {
                    p(ProgressEvent {
                        phase: Phase::Unpack,
                        done,
                        total,
                    });
                }
            }
        });
        let cb_ref = cb.as_ref().map(|f| f as &(dyn Fn(u64) + Sync));
        let stats = archive::unpack_reader(
            reader, &spool, compressed, &digest, &target, &limits, cb_ref,
        )?;
        let fingerprint = archive::fingerprint(&target)?;
        Ok((stats, fingerprint))
    });
    let download = async {
        let res = followed.download(store.as_ref(), download_progress).await;
        downloading.store(false, Ordering::Relaxed);
        res
    };
    overlap(download, unpacking).await
}

/// One archive of a chain restore: its key, the private scratch file it downloads into, the
/// digest it must hash to and its declared compressed size (for the expansion-ratio cap).
pub(super) struct ChainArchive {
    pub key: String,
    pub spool: PathBuf,
    pub digest: String,
    pub compressed: u64,
}

/// What [`download_and_unpack_chain`] did: the bytes all downloads brought (`None` when
/// extraction failed first), the target's fingerprint, and the index of the archive the
/// extraction was at when it stopped (the one a failure concerns).
pub(super) struct ChainOutcome {
    pub downloaded: Option<Result<u64, LayerError>>,
    pub unpacked: Joined<String>,
    pub at: usize,
}

/// Restores a chain (base first, then its deltas) into `target` through one staging dir: the
/// base is extracted while it downloads, as a full layer is, and the deltas download into their
/// scratch files at the same time, so each is there by the time it is applied. Every archive's
/// digest is checked as it is applied. The caller removes the spools.
pub(super) async fn download_and_unpack_chain(
    store: &Arc<dyn ObjectStore>,
    archives: &[ChainArchive],
    target: PathBuf,
    limits: UnpackOptions,
) -> ChainOutcome {
    let followed: Vec<Followed> = archives
        .iter()
        .map(|a| Followed::new(a.key.clone(), a.spool.clone()))
        .collect();
    let at = Arc::new(AtomicUsize::new(0));
    let readers: Vec<MarkedReader> = followed
        .iter()
        .enumerate()
        .map(|(index, f)| MarkedReader {
            inner: f.reader(),
            index,
            at: Arc::clone(&at),
        })
        .collect();
    // Archive errors name the key: the scratch file is gone by the time anyone reads them.
    let names: Vec<(PathBuf, u64, String)> = archives
        .iter()
        .map(|a| (PathBuf::from(&a.key), a.compressed, a.digest.clone()))
        .collect();
    let unpacking = tokio::task::spawn_blocking(move || {
        let layers = readers
            .into_iter()
            .zip(&names)
            .map(|(r, (name, size, digest))| (r, name.as_path(), *size, digest.as_str()))
            .collect();
        archive::unpack_chain_readers(layers, &target, &limits, None)?;
        archive::fingerprint(&target)
    });
    let all = &followed;
    let downloads = futures::future::try_join_all(all.iter().map(|f| async move {
        let res = f.download(store.as_ref(), None).await;
        if res.is_err() {
            // The others are dropped with this error: readers waiting on them must not hang.
            all.iter().for_each(Followed::fail);
        }
        res.map_err(store_err(&f.key))
    }));
    let downloaded = async { downloads.await.map(|sizes| sizes.into_iter().sum()) };
    let (downloaded, unpacked) = overlap(downloaded, unpacking).await;
    ChainOutcome {
        downloaded,
        unpacked,
        at: at.load(Ordering::Relaxed),
    }
}

/// Records, on each read, that extraction reached archive `index` of a chain. The archives are
/// read one after another, so the highest index read is the one being applied.
struct MarkedReader {
    inner: FollowReader,
    index: usize,
    at: Arc<AtomicUsize>,
}

impl Read for MarkedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.at.fetch_max(self.index, Ordering::Relaxed);
        self.inner.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_gate_reports_only_after_packing() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = Arc::clone(&seen);
        let gate = UploadGate::new(Arc::new(move |ev: ProgressEvent| {
            lock(&s2).push((ev.done, ev.total));
        }));
        let cb = gate.callback();
        cb(10);
        cb(5);
        assert!(lock(&seen).is_empty());
        gate.open(40);
        cb(25);
        assert_eq!(*lock(&seen), vec![(15, Some(40)), (40, Some(40))]);
    }
}
