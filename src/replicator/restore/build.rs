//! Downloading a restore's objects and applying them in order into the database being built,
//! verifying each on the way.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{StreamExt, stream};
use sha2::{Digest, Sha256};

use super::plan::{Plan, Stop};
use super::{RestoreError, Result, Scratch, store_error};
use crate::replicator::apply::{ApplyError, PageFile};
use crate::replicator::manifest::{self, MANIFEST_KEY, SegmentEntry, Snapshot};
use crate::replicator::segment::{self, Flow, SegmentEvent, SegmentHeader, TxnInfo};
use crate::store::follow::{EndOnDrop, Follow, FollowReader};
use crate::store::{ObjectStore, PrefixReady};
use crate::util::error_chain;

/// Downloads in flight or waiting on disk per unit of parallelism (segments are small: many
/// are fetched while the snapshot is applied).
const PREFETCH: usize = 4;

/// Snapshot pages decompressed and written with one call.
const RUN_PAGES: usize = 256;

/// The 16 bytes every SQLite database file starts with.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// One generation's part of a restore: from its snapshot, its segments up to the plan's stop.
/// A restore whose snapshot is a delta first builds the delta's parent (an earlier stage).
#[derive(Debug, Clone)]
pub(super) struct Stage {
    pub plan: Plan,
    pub segments: Vec<SegmentEntry>,
}

/// An object to download and apply.
#[derive(Debug, Clone)]
enum Object {
    Snapshot(Snapshot),
    /// A snapshot holding only the pages that differ from its parent's state.
    Delta(Snapshot),
    Segment(SegmentEntry),
}

/// A downloaded object.
#[derive(Debug)]
struct Fetched {
    /// Index of the stage it belongs to.
    stage: usize,
    object: Object,
    key: String,
    path: PathBuf,
    /// Unknown (0) while `follow` is set.
    size: u64,
    /// Set while the download is still filling `path` in.
    follow: Option<Arc<Follow>>,
}

/// Downloads each stage's snapshot and segments, several at once, and applies them strictly in
/// order on a blocking thread while later ones download. Returns the built file, the last
/// transaction in it and the bytes downloaded.
pub(super) async fn build(
    store: Arc<dyn ObjectStore>,
    stages: Vec<Stage>,
    scratch: &Scratch,
    parallelism: usize,
) -> Result<(PageFile, TxnInfo, u64)> {
    let last = stages.last().expect("a restore has a stage").plan.clone();
    let mut objects = Vec::new();
    for (i, stage) in stages.iter().enumerate() {
        let g = &stage.plan.generation;
        let s = &stage.plan.snapshot;
        let first = if s.parent.is_some() {
            Object::Delta(s.clone())
        } else {
            Object::Snapshot(s.clone())
        };
        objects.push((i, s.key(g), first));
        for e in &stage.segments {
            let key = manifest::segment_key(g, e.first, e.last);
            objects.push((i, key, Object::Segment(*e)));
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Fetched>(1);
    // The first object, the full snapshot and by far the biggest, is applied (hashed,
    // decompressed, written) while it downloads; it is verified once complete.
    let (stage0, key0, object0) = objects.remove(0);
    let path0 = scratch.dir.join("snapshot.zst");
    let follow = Arc::new(Follow::default());
    let _unblock = EndOnDrop(Arc::clone(&follow));
    tx.send(Fetched {
        stage: stage0,
        object: object0,
        key: key0.clone(),
        path: path0.clone(),
        size: 0,
        follow: Some(Arc::clone(&follow)),
    })
    .await
    .expect("the applier takes the first object");
    let snapshot_download = {
        let (store, follow) = (Arc::clone(&store), Arc::clone(&follow));
        async move {
            let ready: PrefixReady = {
                let follow = Arc::clone(&follow);
                Arc::new(move |n| follow.ready(n))
            };
            let got = store.download_following(&key0, &path0, ready, None).await;
            follow.end(got.as_ref().ok().copied());
            got.map_err(|e| store_error(&key0, e))
        }
    };
    let db = scratch.db.clone();
    let plans: Vec<Plan> = stages.into_iter().map(|s| s.plan).collect();
    let applier = tokio::task::spawn_blocking(move || {
        let mut b = Builder::create(&db, &plans[0])?;
        while let Some(f) = rx.blocking_recv() {
            if f.stage != b.stage {
                b.next_stage(f.stage, &plans[f.stage])?;
            }
            let applied = b.apply(&f);
            let _ = std::fs::remove_file(&f.path);
            applied?;
        }
        Ok::<_, RestoreError>(b)
    });
    let dir = scratch.dir.clone();
    let downloads = async move {
        // Each download is a task of its own, so it goes on while this loop waits for the
        // applier (still busy with the snapshot): the next objects are on disk by then.
        let mut fetched = stream::iter(objects.into_iter().enumerate())
            .map(|(n, (stage, key, object))| {
                let (store, path) = (Arc::clone(&store), dir.join(format!("{}.zst", n + 1)));
                let task =
                    tokio::spawn(async move { fetch(&*store, stage, object, key, path).await });
                let abort = AbortOnDrop(task.abort_handle());
                async move {
                    let _abort = abort;
                    task.await.map_err(|e| RestoreError::Io {
                        op: "download",
                        path: PathBuf::from("(restore task)"),
                        source: std::io::Error::other(e),
                    })?
                }
            })
            .buffered(parallelism * PREFETCH);
        let mut bytes = 0;
        loop {
            let f = tokio::select! {
                f = fetched.next() => f,
                // The applier failed; its error is the one to report.
                () = tx.closed() => break,
            };
            let Some(f) = f else { break };
            let f = f?;
            bytes += f.size;
            if tx.send(f).await.is_err() {
                break;
            }
        }
        Ok::<_, RestoreError>(bytes)
    };
    let (snapshot_bytes, downloaded, applied) = tokio::join!(snapshot_download, downloads, applier);
    // A failed download is what a reader of its half file then trips over: report it first.
    let snapshot_bytes = snapshot_bytes?;
    let built = applied.map_err(|source| RestoreError::Task {
        path: scratch.db.clone(),
        source,
    })??;
    let downloaded = downloaded? + snapshot_bytes;
    match built.stop {
        Stop::Txid(txid) if txid == built.at.txid => Ok((built.out, built.at, downloaded)),
        stop => Err(RestoreError::Corrupt {
            key: MANIFEST_KEY.to_string(),
            reason: format!(
                "generation {}: the segments ended at transaction {}, short of {stop:?}",
                last.generation, built.at.txid
            ),
        }),
    }
}

async fn fetch(
    store: &dyn ObjectStore,
    stage: usize,
    object: Object,
    key: String,
    path: PathBuf,
) -> Result<Fetched> {
    // A scratch file verified before use: no fsync (which `download_to_file` does).
    let size = store
        .download_following(&key, &path, Arc::new(|_| {}), None)
        .await
        .map_err(|e| store_error(&key, e))?;
    Ok(Fetched {
        stage,
        follow: None,
        object,
        key,
        path,
        size,
    })
}

/// The database being built, and how far it got.
#[derive(Debug)]
struct Builder {
    out: PageFile,
    /// The stage being applied.
    stage: usize,
    page_size: u32,
    lineage: [u8; 16],
    snapshot_txid: u64,
    /// A time stop becomes a txid once the segment holding it was read.
    stop: Stop,
    /// The last transaction applied (the snapshot's at first).
    at: TxnInfo,
}

impl Builder {
    fn create(path: &Path, plan: &Plan) -> Result<Self> {
        Ok(Self {
            out: PageFile::create(path, plan.page_size)?,
            stage: 0,
            page_size: plan.page_size,
            lineage: manifest::lineage(&plan.generation),
            snapshot_txid: plan.snapshot.txid,
            stop: plan.stop,
            at: TxnInfo {
                txid: plan.snapshot.txid,
                committed_unix_ns: plan.snapshot.committed_unix_ns,
                db_pages: plan.snapshot.db_pages,
            },
        })
    }

    fn apply(&mut self, f: &Fetched) -> Result<()> {
        match &f.object {
            Object::Snapshot(s) => self.snapshot(f, s),
            Object::Delta(s) => self.delta(f, s),
            Object::Segment(e) => self.segment(f, e),
        }
    }

    /// Moves on to the next stage once the current one reached exactly its stop (the state its
    /// successor's delta was computed against).
    fn next_stage(&mut self, stage: usize, plan: &Plan) -> Result<()> {
        let done = matches!(self.stop, Stop::Txid(t) if t == self.at.txid);
        if !done || stage != self.stage + 1 || plan.page_size != self.page_size {
            return Err(RestoreError::Corrupt {
                key: MANIFEST_KEY.to_string(),
                reason: format!(
                    "generation {}'s base needs transaction {:?} of its parent; the parent \
                     ended at {}",
                    plan.generation, self.stop, self.at.txid
                ),
            });
        }
        self.stage = stage;
        self.lineage = manifest::lineage(&plan.generation);
        self.snapshot_txid = plan.snapshot.txid;
        self.stop = plan.stop;
        Ok(())
    }

    /// Checks the object's size and SHA-256, then writes its pages.
    fn snapshot(&mut self, f: &Fetched, s: &Snapshot) -> Result<()> {
        let corrupt = |reason: String| RestoreError::Corrupt {
            key: f.key.clone(),
            reason,
        };
        let pages = match &f.follow {
            None => {
                verify(f, s)?;
                self.snapshot_pages(decompress(&f.path)?, s, &corrupt)?
            }
            Some(follow) => {
                let mut hashing = HashingReader {
                    inner: FollowReader::new(f.path.clone(), Arc::clone(follow)),
                    hash: Sha256::new(),
                    len: 0,
                };
                let input = zstd::stream::read::Decoder::new(&mut hashing).map_err(|source| {
                    RestoreError::Io {
                        op: "decompress",
                        path: f.path.clone(),
                        source,
                    }
                })?;
                let pages = self.snapshot_pages(input, s, &corrupt);
                // Whatever follows the compressed data still counts for size and digest; when
                // decoding failed, a digest that differs says why.
                std::io::copy(&mut hashing, &mut std::io::sink())
                    .map_err(|e| corrupt(format!("cannot read: {}", error_chain(&e))))?;
                let sha256 = hex::encode(hashing.hash.finalize());
                if hashing.len != s.size || !sha256.eq_ignore_ascii_case(&s.sha256) {
                    return Err(corrupt(format!(
                        "{} bytes with sha256 {sha256}; the manifest says {} bytes with {}",
                        hashing.len, s.size, s.sha256
                    )));
                }
                pages?
            }
        };
        self.out.commit(pages)?;
        Ok(())
    }

    /// Writes a snapshot's pages from its decompressed bytes; returns how many there were.
    fn snapshot_pages(
        &mut self,
        mut input: impl Read,
        s: &Snapshot,
        corrupt: &dyn Fn(String) -> RestoreError,
    ) -> Result<u32> {
        // Pages are contiguous: written RUN_PAGES at a time.
        let page_size = self.page_size as usize;
        let mut run = vec![0u8; page_size * RUN_PAGES];
        let mut pages = 0u32;
        loop {
            let n = read_full(&mut input, &mut run)
                .map_err(|e| corrupt(format!("cannot decompress: {}", error_chain(&e))))?;
            if n == 0 {
                break;
            }
            let whole = u32::try_from(n / page_size).expect("a run is a few hundred pages");
            if n % page_size != 0 {
                return Err(corrupt(format!("ends inside page {}", pages + whole + 1)));
            }
            if pages == 0 {
                check_first_page(&run[..page_size], self.page_size).map_err(corrupt)?;
            }
            if pages + whole > s.db_pages {
                return Err(corrupt(format!(
                    "holds more than the {} pages the manifest says",
                    s.db_pages
                )));
            }
            self.out.pages(pages + 1, &run[..n])?;
            pages += whole;
        }
        if pages != s.db_pages || pages == 0 {
            return Err(corrupt(format!(
                "holds {pages} pages; the manifest says {}",
                s.db_pages
            )));
        }
        Ok(pages)
    }

    /// Checks the object's size and SHA-256, then writes its pages over the parent's state:
    /// exactly one transaction, the snapshot's, with the manifest's size and time.
    fn delta(&mut self, f: &Fetched, s: &Snapshot) -> Result<()> {
        let corrupt = |reason: String| RestoreError::Corrupt {
            key: f.key.clone(),
            reason,
        };
        verify(f, s)?;
        let header = SegmentHeader {
            page_size: self.page_size,
            lineage: self.lineage,
            first_txid: s.txid,
        };
        let out = &mut self.out;
        let decoded = decode_with(f, header, &mut |event| {
            match event {
                SegmentEvent::Begin { .. } => {}
                SegmentEvent::Page { pgno, data } => out.page(pgno, data)?,
                SegmentEvent::Commit(info) => out.commit(info.db_pages)?,
            }
            Ok(Flow::Continue)
        })?;
        match decoded {
            Some(info)
                if info.txid == s.txid
                    && info.db_pages == s.db_pages
                    && info.committed_unix_ns == s.committed_unix_ns =>
            {
                self.at = info;
                Ok(())
            }
            other => Err(corrupt(format!(
                "holds {other:?}; the manifest says transaction {} of {} pages committed at {} ns",
                s.txid, s.db_pages, s.committed_unix_ns
            ))),
        }
    }

    /// Applies the segment's transactions after the snapshot up to the stop.
    fn segment(&mut self, f: &Fetched, e: &SegmentEntry) -> Result<()> {
        let corrupt = |reason: String| RestoreError::Corrupt {
            key: f.key.clone(),
            reason,
        };
        check_size(f, e.size)?;
        let limit = match self.stop {
            Stop::Txid(txid) => txid,
            Stop::Time { unix_ns, .. } if e.last_unix_ns <= unix_ns => e.last,
            Stop::Time { unix_ns, .. } => {
                let txid = self.last_committed_by(f, e, unix_ns)?;
                self.stop = Stop::Txid(txid);
                txid
            }
        };
        let header = self.header(e);
        let (out, at, skip) = (&mut self.out, &mut self.at, self.snapshot_txid);
        let mut writing = false;
        let last = decode_with(f, header, &mut |event| {
            match event {
                SegmentEvent::Begin { txid } if txid > limit => return Ok(Flow::Stop),
                // The snapshot already holds transactions up to its own.
                SegmentEvent::Begin { txid } => writing = txid > skip,
                SegmentEvent::Page { pgno, data } if writing => out.page(pgno, data)?,
                SegmentEvent::Commit(info) if writing => {
                    out.commit(info.db_pages)?;
                    *at = info;
                }
                SegmentEvent::Page { .. } | SegmentEvent::Commit(_) => {}
            }
            Ok(Flow::Continue)
        })?;
        let reached = last.map_or(e.first.saturating_sub(1), |i| i.txid);
        let to_end = limit >= e.last;
        let expected = if to_end {
            e.last
        } else {
            limit.max(e.first.saturating_sub(1))
        };
        if reached != expected {
            return Err(corrupt(format!(
                "ends after transaction {reached}; expected {expected}"
            )));
        }
        if let Some(info) = last.filter(|_| to_end)
            && info.committed_unix_ns != e.last_unix_ns
        {
            return Err(corrupt(format!(
                "transaction {} committed at {} ns; the manifest says {} ns",
                info.txid, info.committed_unix_ns, e.last_unix_ns
            )));
        }
        Ok(())
    }

    /// The last transaction committed at or before `unix_ns` up to this segment's, found by a
    /// pass that writes nothing (a commit time comes after the transaction's pages).
    fn last_committed_by(&self, f: &Fetched, e: &SegmentEntry, unix_ns: i64) -> Result<u64> {
        let (mut last, skip) = (self.at.txid, self.snapshot_txid);
        segment::decode(decompress(&f.path)?, self.header(e), &mut |event| {
            Ok(match event {
                SegmentEvent::Commit(info)
                    if info.txid > skip && info.committed_unix_ns > unix_ns =>
                {
                    Flow::Stop
                }
                SegmentEvent::Commit(info) => {
                    last = last.max(info.txid);
                    Flow::Continue
                }
                SegmentEvent::Begin { .. } | SegmentEvent::Page { .. } => Flow::Continue,
            })
        })
        .map_err(|err| RestoreError::Corrupt {
            key: f.key.clone(),
            reason: error_chain(&err),
        })?;
        Ok(last)
    }

    fn header(&self, e: &SegmentEntry) -> SegmentHeader {
        SegmentHeader {
            page_size: self.page_size,
            lineage: self.lineage,
            first_txid: e.first,
        }
    }
}

/// Decodes a segment object, handing each event to `step`: a failure to apply is returned as
/// itself, a failure to decode as corruption of the object.
fn decode_with(
    f: &Fetched,
    header: SegmentHeader,
    step: &mut dyn FnMut(SegmentEvent<'_>) -> std::result::Result<Flow, ApplyError>,
) -> Result<Option<TxnInfo>> {
    let mut failed = None;
    let decoded = segment::decode(decompress(&f.path)?, header, &mut |event| {
        step(event).map_err(|e| {
            let message = e.to_string();
            failed = Some(e);
            message
        })
    });
    if let Some(e) = failed {
        return Err(e.into());
    }
    decoded.map_err(|e| RestoreError::Corrupt {
        key: f.key.clone(),
        reason: error_chain(&e),
    })
}

/// A downloaded object must have the size the manifest gives it.
fn check_size(f: &Fetched, expected: u64) -> Result<()> {
    if f.size == expected {
        return Ok(());
    }
    Err(RestoreError::Corrupt {
        key: f.key.clone(),
        reason: format!("{} bytes; the manifest says {expected}", f.size),
    })
}

/// A snapshot object must have the manifest's size and SHA-256.
fn verify(f: &Fetched, s: &Snapshot) -> Result<()> {
    let corrupt = |reason: String| RestoreError::Corrupt {
        key: f.key.clone(),
        reason,
    };
    check_size(f, s.size)?;
    let mut hash = Sha256::new();
    std::io::copy(&mut open(&f.path)?, &mut hash).map_err(|source| RestoreError::Io {
        op: "read",
        path: f.path.clone(),
        source,
    })?;
    let sha256 = hex::encode(hash.finalize());
    if !sha256.eq_ignore_ascii_case(&s.sha256) {
        return Err(corrupt(format!(
            "sha256 {sha256}; the manifest says {}",
            s.sha256
        )));
    }
    Ok(())
}

/// A snapshot must be a SQLite database of the manifest's page size.
fn check_first_page(page: &[u8], page_size: u32) -> std::result::Result<(), String> {
    if page.len() < 100 || &page[..16] != SQLITE_MAGIC {
        return Err("not a SQLite database".to_string());
    }
    let found = match u16::from_be_bytes([page[16], page[17]]) {
        1 => 65536,
        n => u32::from(n),
    };
    if found != page_size {
        return Err(format!("page size {found}; the manifest says {page_size}"));
    }
    Ok(())
}

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| RestoreError::Io {
        op: "open",
        path: path.to_path_buf(),
        source,
    })
}

fn decompress(path: &Path) -> Result<zstd::stream::read::Decoder<'static, BufReader<File>>> {
    zstd::stream::read::Decoder::new(open(path)?).map_err(|source| RestoreError::Io {
        op: "decompress",
        path: path.to_path_buf(),
        source,
    })
}

/// Stops a download task once nobody waits for it (the restore failed or was dropped).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts and hashes what is read through it.
struct HashingReader<R> {
    inner: R,
    hash: Sha256,
    len: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// Fills `buf` unless the input ends first; returns how much was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
