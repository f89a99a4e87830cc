//! Reading one database on a thread of its own (SQLite calls block): the WAL's transactions into
//! segments in the outbox, snapshots, and the checkpoints that keep the WAL small.
//!
//! Everything read is made durable in the cache before the WAL may be checkpointed past it, so
//! the only things a crash can cost are a re-read of the WAL or, when the WAL restarted while
//! nobody read it, a new generation from a snapshot.

use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

mod output;
mod wake;

use output::{Output, Stored};
use wake::Waited;
pub use wake::{EngineSender, Waiter, channel};

use super::cache::{Cache, CacheError, FileId, LocalState, NewGeneration};
use super::journal::{Journal, JournalError};
use super::manifest;
use super::pagemap::PageMap;
use super::source::{Pumped, Source, SourceError};
use super::wal::WalCursor;

/// How often the WAL's size and time are looked at.
const POLL: Duration = Duration::from_millis(25);
/// After the WAL changed, pumps go on this long (a commit is published just after its frames
/// are written, which is what changes the file).
const ACTIVE: Duration = Duration::from_millis(250);
/// An idle database is still pumped this often (a cheap local read, no store request).
const IDLE_PUMP: Duration = Duration::from_secs(10);
/// How often the outbox's size is looked at while nothing is added.
const USAGE_EVERY: Duration = Duration::from_secs(1);
/// A segment is cut at this size whatever its age.
const MAX_SEGMENT: u64 = 16 << 20;
/// WAL frames above which a checkpoint runs.
const CHECKPOINT_FRAMES: u32 = 1000;
/// Attempts at a write barrier before a new generation gives up for now.
const BARRIER_ATTEMPTS: u32 = 20;
/// A database that cannot be opened for replication yet is tried again this often.
const START_RETRY: Duration = Duration::from_secs(1);

/// Failures of the reading thread; each names the database or file.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("database {path}: cannot {op}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("database {path}: writers kept the write lock; no snapshot could be taken")]
    Barrier { path: PathBuf },
    #[error("replicator cache {path} holds {limit} bytes or more: waiting for the store")]
    CacheFull { path: PathBuf, limit: u64 },
}

type Result<T> = std::result::Result<T, EngineError>;

/// Settings of one database's reading.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub db_path: PathBuf,
    /// A segment is cut once its first transaction is this old.
    pub batch: Duration,
    pub snapshot_interval: Duration,
    pub max_cache_size: u64,
    pub compression_level: i32,
}

/// Asks of the reading thread.
#[derive(Debug)]
pub enum Request {
    /// Read and cut everything committed; answers with the number of the last outbox item
    /// (`None`: nothing was ever cut).
    Flush(Sender<std::result::Result<Option<u64>, FlushRefused>>),
    /// The store's history diverged from ours: start over from a snapshot.
    NewGeneration(String),
    Stop,
}

/// Why a flush was not done.
#[derive(Debug, Clone)]
pub struct FlushRefused {
    /// The cache is full: the flush can be asked again once the store took some of it.
    pub cache_full: bool,
    pub message: String,
}

impl FlushRefused {
    fn from(e: &EngineError) -> Self {
        Self {
            cache_full: matches!(e, EngineError::CacheFull { .. }),
            message: super::error_chain(e),
        }
    }
}

/// What the reading thread shows (status, lag).
#[derive(Debug, Clone, Default)]
pub struct EngineStatus {
    pub generation: String,
    /// Transactions before this one are in the cache or the store.
    pub next_txid: u64,
    pub last_commit_unix_ns: i64,
    /// Commit time (as seen) of the oldest transaction not yet cut into a segment.
    pub oldest_unsealed_unix_ns: Option<i64>,
    pub wal_frames: u32,
    pub cache_full: bool,
    pub last_error: Option<String>,
    /// Last outbox item number created.
    pub last_item: Option<u64>,
    /// Reading has started (the database was opened).
    pub running: bool,
    /// Outbox items numbered below this are counted by the saved state and may be shipped.
    pub shippable_below: u64,
}

/// Shared between the reading thread and the rest.
#[derive(Debug, Default)]
pub struct Shared {
    pub status: Mutex<EngineStatus>,
    /// Woken when the outbox got an item.
    pub outbox: tokio::sync::Notify,
}

/// Runs the reading of one database until [`Request::Stop`] (or the sender is dropped). A
/// database that cannot be read yet (missing: the app creates it; not in WAL mode yet) is
/// retried every [`START_RETRY`], with the reason in the status.
pub fn run(
    cfg: EngineConfig,
    cache: Cache,
    shared: Arc<Shared>,
    requests: &mut Waiter,
) -> Result<()> {
    let mut engine = loop {
        match Engine::start(cfg.clone(), cache.clone(), Arc::clone(&shared)) {
            Ok(e) => {
                shared.status.lock().expect("status lock").last_error = None;
                break e;
            }
            Err(e) => {
                let msg = e.to_string();
                let mut st = shared.status.lock().expect("status lock");
                if st.last_error.as_deref() != Some(&msg) {
                    tracing::warn!(db = %cfg.db_path.display(), error = %msg, "cannot replicate yet; retrying");
                }
                st.last_error = Some(msg);
                drop(st);
                match requests.wait(START_RETRY, false) {
                    Waited::Request(Request::Flush(reply)) => {
                        let _ = reply.send(Err(FlushRefused::from(&e)));
                    }
                    Waited::Request(Request::NewGeneration(_))
                    | Waited::Timeout
                    | Waited::Changed => {}
                    Waited::Request(Request::Stop) | Waited::Disconnected => return Ok(()),
                }
            }
        }
    };
    shared.status.lock().expect("status lock").running = true;
    let dir = match cfg.db_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    requests.watch(dir);
    let result = engine.run(requests);
    shared.status.lock().expect("status lock").running = false;
    result
}

#[derive(Debug)]
struct Engine {
    source: Source,
    out: Output,
    wal_path: PathBuf,
    last_stat: Option<(u64, SystemTime)>,
    active_until: Instant,
    last_pump: Instant,
    /// WAL lifetime (salts) and length at the last checkpoint, not repeated until it changes.
    checkpointed: Option<((u32, u32), u32)>,
    /// A new generation that could not be started yet (nothing is read until it is).
    pending_generation: Option<String>,
    /// Outbox bytes, as last looked at (when, and the item count then).
    usage: u64,
    usage_checked: Option<(Instant, u64)>,
}

impl Engine {
    fn start(cfg: EngineConfig, cache: Cache, shared: Arc<Shared>) -> Result<Self> {
        let path = cfg.db_path.clone();
        let source = Source::open(&path)?;
        let id = FileId::of(&path).map_err(io("stat", &path))?;
        let saved = cache.load_state()?;
        let next_item = cache.items()?.last().map_or(0, |i| i.number + 1);
        let mut saved = saved.filter(|s| s.db == id);
        if let Some(s) = saved.as_mut() {
            Journal::recover(&cache, s, cfg.compression_level.min(output::SEGMENT_LEVEL))?;
        }
        let reason = if saved.is_none() && cache.load_state()?.is_some() {
            "the database file was replaced"
        } else {
            "replication of this database started"
        };
        let state = match &saved {
            Some(s) => LocalState {
                next_item: s.next_item.max(next_item),
                ..s.clone()
            },
            None => LocalState {
                format: 0,
                generation: String::new(),
                page_size: source.page_size()?,
                next_txid: 1,
                last_commit_unix_ns: 0,
                cursor: None,
                db: id,
                next_item,
                last_snapshot_unix_ms: 0,
            },
        };
        let mut wal_path = path.as_os_str().to_owned();
        wal_path.push("-wal");
        let journal = Journal::open(cache.dir())
            .inspect_err(|e| tracing::warn!(error = %e, "no tail journal; barriers take longer"))
            .ok();
        let map = saved
            .as_ref()
            .and_then(|s| PageMap::load(cache.dir(), &s.generation, s.next_txid - 1, s.page_size));
        let mut engine = Self {
            source,
            out: Output {
                cfg,
                cache,
                shared,
                state,
                open: None,
                map,
                broken: None,
                journal,
            },
            wal_path: PathBuf::from(wal_path),
            last_stat: None,
            active_until: Instant::now() + ACTIVE,
            last_pump: Instant::now(),
            checkpointed: None,
            pending_generation: None,
            usage: 0,
            usage_checked: None,
        };
        match saved.map(|s| s.cursor) {
            None => engine.new_generation(reason)?,
            Some(Some(c)) => engine.source.resume(WalCursor::from(c)),
            Some(None) => {
                // Nothing was in the WAL at the saved point (after a restore or a snapshot). An
                // empty WAL now does not prove nothing happened: the app may have written,
                // checkpointed and truncated or removed it meanwhile. The database is compared
                // with the page map instead; the generation goes on only if it is the same.
                engine.new_generation(
                    "the database may have changed while the replicator was not reading it",
                )?;
            }
        }
        {
            let mut st = engine.out.shared.status.lock().expect("status lock");
            st.shippable_below = engine.out.state.next_item;
        }
        engine.out.shared.outbox.notify_one();
        engine.out.publish();
        Ok(engine)
    }

    fn run(&mut self, requests: &mut Waiter) -> Result<()> {
        loop {
            // Idle with a watch: sleep until the directory changes or an idle pump is due.
            let idle = requests.can_sleep() && self.idle();
            let timeout = if idle {
                IDLE_PUMP.saturating_sub(self.last_pump.elapsed()).max(POLL)
            } else {
                POLL
            };
            match requests.wait(timeout, idle) {
                Waited::Request(Request::Flush(reply)) => {
                    let result = self.flush();
                    let answer = match &result {
                        Ok(()) => Ok(self.out.state.next_item.checked_sub(1)),
                        Err(e) => Err(FlushRefused::from(e)),
                    };
                    self.out.note(result.err().map(|e| e.to_string()));
                    let _ = reply.send(answer);
                }
                Waited::Request(Request::NewGeneration(reason)) => {
                    // The store lacks our history: a delta on it could not be restored.
                    self.out.map = None;
                    let r = self.new_generation(&reason);
                    self.out.note(r.err().map(|e| e.to_string()));
                }
                Waited::Request(Request::Stop) | Waited::Disconnected => {
                    let r = self.pump().and_then(|()| self.out.seal(&self.source));
                    self.out.publish();
                    return r;
                }
                waited @ (Waited::Changed | Waited::Timeout) => {
                    if matches!(waited, Waited::Changed) {
                        self.active_until = Instant::now() + ACTIVE;
                    }
                    let r = self.tick();
                    self.out.note(r.err().map(|e| e.to_string()));
                }
            }
            self.out.publish();
        }
    }

    /// Nothing to do until the database changes: no recent change, nothing unread or uncut,
    /// no pending generation, the cache not full (the shipper emptying it wakes nobody).
    fn idle(&self) -> bool {
        Instant::now() >= self.active_until
            && self.out.open.is_none()
            && !self.source.behind()
            && self.pending_generation.is_none()
            && self.usage < self.out.cfg.max_cache_size
    }

    /// Reads and cuts everything committed so far.
    fn flush(&mut self) -> Result<()> {
        if let Some(reason) = self.pending_generation.clone() {
            self.new_generation(&reason)?;
        }
        if self.cache_full()? {
            return Err(EngineError::CacheFull {
                path: self.out.cache.dir().to_path_buf(),
                limit: self.out.cfg.max_cache_size,
            });
        }
        self.catch_up()
    }

    /// One poll: read when the WAL changed, cut an old enough segment, checkpoint, snapshot.
    fn tick(&mut self) -> Result<()> {
        if let Some(reason) = self.pending_generation.clone() {
            return self.new_generation(&reason);
        }
        let now = Instant::now();
        let stat = std::fs::metadata(&self.wal_path)
            .ok()
            .and_then(|m| Some((m.len(), m.modified().ok()?)));
        if stat != self.last_stat {
            self.last_stat = stat;
            self.active_until = now + ACTIVE;
        }
        if now < self.active_until
            || self.source.behind()
            || now.duration_since(self.last_pump) >= IDLE_PUMP
        {
            self.pump()?;
            self.out.seal_if_full(&self.source)?;
        }
        if self.out.segment_due() {
            self.out.seal(&self.source)?;
        }
        if self.out.open.is_none() && !self.cache_full()? {
            self.maybe_checkpoint()?;
            self.maybe_snapshot()?;
        }
        Ok(())
    }

    /// Whether the outbox is over its limit (then nothing is read: the WAL keeps the frames,
    /// and the pin keeps anyone from checkpointing them away).
    fn cache_full(&mut self) -> Result<bool> {
        // A directory listing per poll is most of an idle replicator's CPU: look once a
        // second, and at once after something was added.
        let stale = self.usage_checked.is_none_or(|(at, items)| {
            at.elapsed() >= USAGE_EVERY || items != self.out.state.next_item
        });
        if stale {
            self.usage = self.out.cache.usage()?;
            self.usage_checked = Some((Instant::now(), self.out.state.next_item));
        }
        let full = self.usage >= self.out.cfg.max_cache_size;
        let mut st = self.out.shared.status.lock().expect("status lock");
        if full && !st.cache_full {
            tracing::warn!(
                db = %self.out.cfg.db_path.display(),
                limit = self.out.cfg.max_cache_size,
                "replicator cache full: reading and checkpointing stop until the store catches up"
            );
        }
        st.cache_full = full;
        Ok(full)
    }

    /// Reads what was published into the open segment; starts a new generation on a break.
    fn pump(&mut self) -> Result<()> {
        self.last_pump = Instant::now();
        if self.cache_full()? {
            return Ok(());
        }
        let pumped = self.source.pump(&mut self.out.sink());
        self.out.after_pump(&pumped)?;
        if let Some(reason) = self.out.broken.take() {
            return self.new_generation(reason);
        }
        match pumped {
            Ok(Pumped::Txns(_)) => Ok(()),
            Ok(Pumped::Discontinuity { reason }) => self.new_generation(reason),
            Err(SourceError::Wal(e)) if !matches!(e, super::wal::WalError::Io { .. }) => {
                // A frame below the published end fails its checks: the WAL cannot be trusted
                // past what was read, so the history restarts from the database itself.
                tracing::error!(db = %self.out.cfg.db_path.display(), error = %e, "WAL anomaly");
                self.new_generation(&format!("WAL anomaly: {e}"))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reads everything published so far (several bounded pumps) and cuts it, without a barrier.
    fn catch_up(&mut self) -> Result<()> {
        loop {
            self.pump()?;
            if !self.source.behind() || self.pending_generation.is_some() {
                break;
            }
            self.out.seal_if_full(&self.source)?;
        }
        self.out.seal(&self.source)
    }

    /// Two phases: a PASSIVE checkpoint while writers go on (copies up to the pin), then, if
    /// the WAL is still long, a short barrier to read its end, make it durable, backfill the
    /// rest and re-pin so the app's next write restarts the WAL.
    fn maybe_checkpoint(&mut self) -> Result<()> {
        let Some(cursor) = self.source.cursor() else {
            return Ok(());
        };
        let frames = cursor.next_frame - 1;
        let here = Some((cursor.header.salt, frames));
        if frames < CHECKPOINT_FRAMES || self.checkpointed == here {
            return Ok(());
        }
        let done = self.source.checkpoint()?;
        self.checkpointed = here;
        if done.busy || done.backfilled < done.log {
            // Read the bulk and backfill up to it while writers go on: under the barrier only
            // the tail written meanwhile is read, made durable and copied.
            self.catch_up()?;
            self.source.checkpoint()?;
            // What was written during that checkpoint, so the barrier's tail is only what the
            // last few milliseconds added.
            self.catch_up()?;
            let out = &mut self.out;
            let mut pending = None;
            let result = self.source.with_barrier(|src| {
                let started = Instant::now();
                let (broke, mut tail) = out.read_tail(src)?;
                if broke.is_some() {
                    return Ok::<_, EngineError>(broke);
                }
                let read = started.elapsed();
                // The journal's fdatasync runs beside SQLite's backfill (and its two fsyncs):
                // the tail must be durable only before the re-pin lets the WAL restart.
                let journal = out.journal.as_ref();
                let (synced, done) = std::thread::scope(|s| {
                    let sync = tail.as_ref().and(journal).map(|j| s.spawn(|| j.sync()));
                    let done = src.checkpoint();
                    let synced =
                        sync.map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
                    (synced, done)
                });
                if let Some(Err(e)) = synced {
                    tracing::warn!(error = %e, "tail journal unusable; sealing under the barrier");
                    if let Some(t) = tail.take() {
                        out.commit_finished(t)?;
                    }
                }
                pending = tail;
                let done = done?;
                let copied = started.elapsed() - read;
                tracing::debug!(?done, ?read, ?copied, "barrier checkpoint");
                // Re-pin on the backfilled WAL (nothing new: writers are held off; the saved
                // state is left alone until the journalled tail is committed).
                out.read_to_end(src)
            });
            // The tail is durable in the journal; into the outbox now, whatever happened since.
            if let Some(tail) = pending {
                self.out.commit_finished(tail)?;
            }
            match result? {
                None => tracing::debug!("write barrier busy; checkpoint later"),
                Some(Some(reason)) => self.pending_generation = Some(reason.to_string()),
                Some(None) => {}
            }
        }
        Ok(())
    }

    fn maybe_snapshot(&mut self) -> Result<()> {
        let st = &self.out.state;
        let age = now_ms().saturating_sub(st.last_snapshot_unix_ms);
        let due = u128::try_from(age).unwrap_or(0) >= self.out.cfg.snapshot_interval.as_millis();
        let changed = st.last_commit_unix_ns / 1_000_000 > st.last_snapshot_unix_ms;
        if !due || !changed {
            return Ok(());
        }
        self.catch_up()?;
        let out = &mut self.out;
        match self.source.with_barrier(|src| out.read_all(src))? {
            None => return Ok(()),
            Some(Some(reason)) => {
                self.pending_generation = Some(reason.to_string());
                return Ok(());
            }
            Some(None) => {}
        }
        let txid = self.out.state.next_txid - 1;
        let committed = self.out.state.last_commit_unix_ns;
        self.out.snapshot(&self.source, txid, committed, None)?;
        Ok(())
    }

    /// Starts a new generation: what was read so far is cut, then the database as of the WAL's
    /// end (writers held off for the read) becomes the generation's base snapshot. Until that
    /// snapshot is in the outbox nothing more is read (the WAL position is past frames the old
    /// generation never got).
    fn new_generation(&mut self, reason: &str) -> Result<()> {
        self.pending_generation = Some(reason.to_string());
        self.out.discard_partial();
        self.out.seal(&self.source)?;
        let mut attempts = 0;
        while self.source.with_barrier(Source::start_at_end)?.is_none() {
            attempts += 1;
            if attempts >= BARRIER_ATTEMPTS {
                return Err(EngineError::Barrier {
                    path: self.out.cfg.db_path.clone(),
                });
            }
        }
        let previous = self.out.state.clone();
        if self.out.map.as_ref().is_some_and(|m| {
            m.generation() != previous.generation || m.txid() + 1 != previous.next_txid
        }) {
            self.out.map = None;
        }
        let st = &mut self.out.state;
        st.generation = manifest::new_generation_id();
        st.page_size = self.source.page_size()?;
        st.next_txid = 1;
        st.last_commit_unix_ns = now_ns();
        st.cursor = None;
        let new = NewGeneration {
            reason: reason.to_string(),
            page_size: st.page_size,
            created_unix_ms: now_ms(),
        };
        let committed = st.last_commit_unix_ns;
        let db = self.out.cfg.db_path.clone();
        match self.out.snapshot(&self.source, 0, committed, Some(new)) {
            Ok(Stored::Snapshot) => {
                tracing::info!(db = %db.display(), reason, "new generation");
            }
            Ok(Stored::Unchanged) => {
                // The database is exactly what the store restores: the history goes on from
                // here (the WAL is empty or restarts at the position just taken).
                let next_item = self.out.state.next_item;
                self.out.state = previous;
                self.out.state.next_item = next_item;
                self.out.state.cursor = self.source.cursor().map(Into::into);
                self.out.save()?;
                tracing::info!(db = %db.display(), reason, "the database is as replicated; the generation goes on");
            }
            Err(e) => {
                // Nothing of the new generation is in the outbox: retried from scratch later.
                let next_item = self.out.state.next_item;
                self.out.state = previous;
                self.out.state.next_item = next_item;
                return Err(e);
            }
        }
        self.pending_generation = None;
        self.checkpointed = None;
        Ok(())
    }
}

fn now_ns() -> i64 {
    super::now_unix_ns()
}

fn now_ms() -> i64 {
    now_ns() / 1_000_000
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + use<> {
    let path = path.to_path_buf();
    move |source| EngineError::Io { op, path, source }
}
