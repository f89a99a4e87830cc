//! Overlapped phases: a sync uploads the spool while packing writes it, a restore extracts the
//! archive while the download fills it in.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tokio::sync::oneshot;

use super::manager::accumulate;
use super::manifest::ManifestEntry;
use super::options::{LayerProgress, Phase, ProgressEvent};
use crate::archive::{self, SpoolObserver, UnpackOptions, UnpackStats};
use crate::store::follow::{EndOnDrop, Follow, FollowReader};
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

type Unpacked = std::result::Result<archive::Result<(UnpackStats, String)>, tokio::task::JoinError>;

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
    let follow = Arc::new(Follow::default());
    let ready: objstore::PrefixReady = {
        let follow = Arc::clone(&follow);
        Arc::new(move |n| follow.ready(n))
    };
    let reader = FollowReader::new(job.spool.clone(), Arc::clone(&follow));
    let _cancelled = EndOnDrop(Arc::clone(&follow));
    let (spool, target, digest) = (job.spool.clone(), job.target, entry.digest.clone());
    let (progress, total, compressed) = (
        job.progress,
        Some(entry.size_bytes),
        entry.compressed_size_bytes,
    );
    let gate = Arc::clone(&downloading);
    let limits = job.limits;
    let mut unpacking = tokio::task::spawn_blocking(move || {
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
        let res = store
            .download_following(&job.key, &job.spool, ready, download_progress)
            .await;
        follow.end(res.as_ref().ok().copied());
        downloading.store(false, Ordering::Relaxed);
        res
    };
    tokio::pin!(download);
    tokio::select! {
        d = &mut download => (Some(d), (&mut unpacking).await),
        u = &mut unpacking => {
            // Extraction only ends first when it failed: the rest of the download is moot.
            let failed = !matches!(&u, Ok(Ok(_)));
            (if failed { None } else { Some(download.await) }, u)
        }
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
