//! The live database a replicator reads: its WAL, bounded by what SQLite published, read under a
//! pinned read transaction so no frame is reset away before it was handed on.
//!
//! Connections (none ever inside the app's transactions, none creating anything in the
//! database): two pins used hand over hand (a read transaction begun while unbackfilled frames
//! exist holds a read mark ≥ 1, which stops any WAL restart), and one for `wal_checkpoint(NOOP)`,
//! which must not run inside a transaction.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;

use super::wal::{self, WalCursor, WalError, WalEvent, WalHeader};

/// SQLite releases before this one can corrupt a database when a checkpoint races a writer
/// restarting the WAL (sqlite.org/wal.html#walresetbug), which a replicator makes routine.
pub const MIN_SQLITE: (u32, u32, u32) = (3, 51, 3);
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a barrier waits for the write lock before giving up for now.
const BARRIER_WAIT: Duration = Duration::from_millis(100);
/// How often a barrier tries for the write lock while it waits.
const BARRIER_RETRY: Duration = Duration::from_micros(50);
/// A published bound read while the WAL restarted is retried this often.
const BOUND_ATTEMPTS: u32 = 5;
/// Frames one pump reads at most (then it stops at the next commit), so a long WAL becomes
/// several segments and the reading thread keeps answering.
const PUMP_FRAMES: u32 = 2048;
/// PASSIVE attempts inside a barrier while another connection holds the checkpoint lock.
const PASSIVE_RETRIES: u32 = 25;
/// Restarts that reached no frame between two lifetimes read (each empty TRUNCATE is one).
const MAX_EMPTY_RESTARTS: u32 = 1 << 16;

/// Failures reading a live database; each names it.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("database {path}: {op}")]
    Sqlite {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "database {path} is in journal mode {mode}; replication needs WAL (PRAGMA journal_mode=WAL)"
    )]
    NotWal { path: PathBuf, mode: String },
    #[error("SQLite {found} is older than {}.{}.{}, which fixes a WAL-reset corruption bug", MIN_SQLITE.0, MIN_SQLITE.1, MIN_SQLITE.2)]
    TooOld { found: String },
    #[error("database {path}: the WAL kept changing while its published end was read")]
    Unstable { path: PathBuf },
    #[error("database {path}: a snapshot needs everything published read first")]
    PinBehind { path: PathBuf },
    #[error(transparent)]
    Wal(#[from] WalError),
}

type Result<T> = std::result::Result<T, SourceError>;

/// What a pump found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pumped {
    /// `n` transactions handed on (0: nothing new).
    Txns(u32),
    /// The WAL is not the continuation of what was read before (it restarted while frames were
    /// unread, or the database was replaced): the history has a gap, a new lineage must start
    /// from a snapshot. Nothing was handed on.
    Discontinuity { reason: &'static str },
}

/// A database being read.
#[derive(Debug)]
pub struct Source {
    path: PathBuf,
    wal_path: PathBuf,
    pins: [Connection; 2],
    /// Which of `pins` holds the current read transaction, if any.
    pinned: Option<usize>,
    noop: Connection,
    /// Barrier: holds the write lock while a checkpoint or snapshot needs writers held off.
    barrier: Connection,
    cursor: Option<WalCursor>,
    /// The last pump stopped before the published end (its frame budget ran out).
    behind: bool,
    /// A pin has been held without a break since the cursor was last advanced by this process.
    /// Then a WAL restart loses nothing: SQLite restarts only a fully backfilled WAL, and no
    /// checkpoint backfills past the oldest pin, whose mark never exceeds what was read.
    continuous: bool,
}

/// What a checkpoint achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpointed {
    /// Frames in the WAL.
    pub log: u32,
    /// Frames copied into the database (all of them: the next write restarts the WAL).
    pub backfilled: u32,
    /// The checkpoint could not run (another connection was checkpointing).
    pub busy: bool,
}

impl Source {
    /// Opens the database at `path` (must exist, be in WAL mode, SQLite new enough).
    pub fn open(path: &Path) -> Result<Self> {
        let open = || -> Result<Connection> {
            let c = Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(sqlite(path, "open"))?;
            c.busy_timeout(BUSY_TIMEOUT)
                .map_err(sqlite(path, "set busy timeout"))?;
            // Only our own connections: the app's autocheckpoint is its own setting.
            c.pragma_update(None, "wal_autocheckpoint", 0)
                .map_err(sqlite(path, "turn off autocheckpoint"))?;
            Ok(c)
        };
        let noop = open()?;
        let version: String = noop
            .query_row("SELECT sqlite_version()", [], |r| r.get(0))
            .map_err(sqlite(path, "read the SQLite version"))?;
        if parse_version(&version) < MIN_SQLITE {
            return Err(SourceError::TooOld { found: version });
        }
        let mode: String = noop
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(sqlite(path, "read the journal mode"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(SourceError::NotWal {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut wal_path = path.as_os_str().to_owned();
        wal_path.push("-wal");
        let barrier = open()?;
        // The barrier retries itself, often (see `with_barrier`).
        barrier
            .busy_timeout(Duration::ZERO)
            .map_err(sqlite(path, "set busy timeout"))?;
        Ok(Self {
            path: path.to_path_buf(),
            wal_path: PathBuf::from(wal_path),
            pins: [open()?, open()?],
            pinned: None,
            barrier,
            noop,
            cursor: None,
            behind: false,
            continuous: false,
        })
    }

    /// The database file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether published transactions are left to read (the last pump ran out of budget).
    #[must_use]
    pub fn behind(&self) -> bool {
        self.behind
    }

    /// Where reading stands (`None` before the first pump or after a discontinuity).
    #[must_use]
    pub fn cursor(&self) -> Option<WalCursor> {
        self.cursor
    }

    /// Continues from a cursor persisted earlier (the next pump checks it still fits the WAL).
    pub fn resume(&mut self, cursor: WalCursor) {
        self.cursor = Some(cursor);
        self.continuous = false;
    }

    /// Starts reading at the current end of the WAL without handing anything on: what is in the
    /// database now is the base a new lineage's snapshot must capture (taken by the caller while
    /// writers are held off). Returns the number of frames skipped.
    pub fn start_at_end(&mut self) -> Result<u32> {
        let old = self.pinned;
        self.pin_next()?;
        self.release(old)?;
        let (header, end) = self.published()?;
        self.continuous = true;
        self.behind = false;
        let Some(header) = header else {
            self.cursor = None;
            return Ok(0);
        };
        let mut cursor = WalCursor::start(header);
        if end > 0 {
            let file = self.open_wal()?;
            wal::scan(&file, &self.wal_path, &mut cursor, end, &mut |_| Ok(()))?;
        }
        self.cursor = Some(cursor);
        Ok(end)
    }

    /// Hands every transaction published since the last pump to `sink`, moving the pin forward.
    ///
    /// The new pin begins before the published end is read, so its mark never exceeds that end;
    /// the old pin is released only once everything up to that end was read. Otherwise (the
    /// sink refused a transaction) the old pin stays, so no checkpoint backfills — and no
    /// restart discards — frames that were not read.
    pub fn pump(
        &mut self,
        sink: &mut dyn FnMut(WalEvent<'_>) -> std::result::Result<(), String>,
    ) -> Result<Pumped> {
        let old = self.pinned;
        self.pin_next()?;
        let result = self.pump_pinned(sink);
        let caught_up = matches!(result, Ok((_, true)));
        self.behind = matches!(result, Ok((Pumped::Txns(_), false)));
        if caught_up || old.is_none() || !self.continuous {
            self.release(old)?;
            self.continuous = caught_up;
        } else {
            // Keep the old pin, which only covers frames already read.
            let new = self.pinned;
            self.pinned = old;
            self.release(new)?;
        }
        result.map(|(pumped, _)| pumped)
    }

    /// Reads up to the published end; also says whether the cursor reached it.
    fn pump_pinned(
        &mut self,
        sink: &mut dyn FnMut(WalEvent<'_>) -> std::result::Result<(), String>,
    ) -> Result<(Pumped, bool)> {
        let discontinuity = |reason| Ok((Pumped::Discontinuity { reason }, false));
        let (header, end) = self.published()?;
        let mut cursor = match (self.cursor, header) {
            (None, _) if !self.continuous => return discontinuity("no position in this WAL yet"),
            // Nothing was in the WAL when reading started, or nothing reached it since it
            // restarted: nothing lost while a pin held.
            (_, None) if self.continuous => return Ok((Pumped::Txns(0), true)),
            (None, Some(header)) => WalCursor::start(header),
            (_, None) => {
                self.cursor = None;
                return discontinuity(
                    "the WAL was removed while the replicator was not reading it",
                );
            }
            (Some(c), Some(header)) if c.header.salt == header.salt => c,
            (Some(c), Some(header)) if self.continuous && continues(&c.header, &header) => {
                WalCursor::start(header)
            }
            (Some(_), Some(_)) => {
                self.cursor = None;
                return discontinuity(if self.continuous {
                    "the WAL is not the continuation of the one read before (database replaced?)"
                } else {
                    "the WAL restarted while the replicator was not reading it"
                });
            }
        };
        if end < cursor.next_frame - 1 {
            // A writer restarting the WAL publishes the new lifetime's salts and an end of 0 in
            // the wal-index before its first frame rewrites the file's header: read again later.
            return Ok((Pumped::Txns(0), false));
        }
        let file = self.open_wal()?;
        let result = wal::scan_bounded(&file, &self.wal_path, &mut cursor, end, PUMP_FRAMES, sink);
        // The cursor moved past every transaction the sink took, even if a later one failed.
        self.cursor = Some(cursor);
        let txns = result?;
        Ok((Pumped::Txns(txns), cursor.next_frame - 1 == end))
    }

    /// Runs `f` while writers are held off (this process holds the write lock). A barrier
    /// that cannot get the lock within the busy timeout gives up (`Ok(None)`): the caller backs
    /// off rather than stall the app.
    pub fn with_barrier<T, E: From<SourceError>>(
        &mut self,
        f: impl FnOnce(&mut Self) -> std::result::Result<T, E>,
    ) -> std::result::Result<Option<T>, E> {
        // SQLite's busy handler sleeps 1, 2, 5, 10… ms between tries, and a busy writer takes
        // the lock back within microseconds of releasing it: such a barrier almost never gets
        // in. Trying every ~50 µs lands in the gap between two of the app's transactions.
        let deadline = std::time::Instant::now() + BARRIER_WAIT;
        loop {
            match self.barrier.execute_batch("BEGIN IMMEDIATE") {
                Ok(()) => break,
                Err(e) if is_busy(&e) => {
                    if std::time::Instant::now() >= deadline {
                        return Ok(None);
                    }
                    std::thread::sleep(BARRIER_RETRY);
                }
                Err(e) => return Err(sqlite(&self.path, "take the write barrier")(e).into()),
            }
        }
        let held = std::time::Instant::now();
        let result = f(self);
        tracing::debug!(db = %self.path.display(), held_us = held.elapsed().as_micros(), "write barrier released");
        let rolled_back = self
            .barrier
            .execute_batch("ROLLBACK")
            .map_err(sqlite(&self.path, "release the write barrier"));
        let out = result?;
        rolled_back?;
        Ok(Some(out))
    }

    /// Copies the WAL's frames into the database up to the pin (PASSIVE: never waits for
    /// readers or writers; retried briefly while another connection holds the checkpoint lock).
    ///
    /// Under [`Source::with_barrier`], after a pump, the pin marks the WAL's end, so everything is
    /// backfilled; the next pump then takes its pin on a fully backfilled WAL, which lets the
    /// app's next write restart the WAL. Whatever was read must be durable before this is
    /// called: once backfilled, frames may be overwritten.
    pub fn checkpoint(&mut self) -> Result<Checkpointed> {
        let mut done = self.passive()?;
        for _ in 0..PASSIVE_RETRIES {
            if !done.busy {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
            done = self.passive()?;
        }
        Ok(done)
    }

    /// The database's page size.
    pub fn page_size(&self) -> Result<u32> {
        self.noop
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(sqlite(&self.path, "read the page size"))
    }

    /// Runs a PASSIVE checkpoint on the connection that is never inside a transaction.
    fn passive(&self) -> Result<Checkpointed> {
        let (busy, log, done): (i64, i64, i64) = self
            .noop
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(sqlite(&self.path, "checkpoint (PASSIVE)"))?;
        let clamp = |n: i64| u32::try_from(n.max(0)).unwrap_or(u32::MAX);
        Ok(Checkpointed {
            log: clamp(log),
            backfilled: clamp(done),
            busy: busy != 0 || log < 0,
        })
    }

    /// Copies the database as of the current pin into `dest` (SQLite's backup API inside the
    /// pin's read transaction: exactly the state after the last transaction pumped, whatever
    /// writers do meanwhile). Pump first under [`Source::with_barrier`] so that this state is
    /// the cursor's.
    pub fn snapshot_to(&self, dest: &Path) -> Result<()> {
        // Only a pump that reached the published end moved the pin to the cursor; an older pin
        // would copy an older state under the cursor's transaction id.
        if self.behind || !self.continuous {
            return Err(SourceError::PinBehind {
                path: self.path.clone(),
            });
        }
        let pin = &self.pins[self.pinned.expect("a pin is held after the first pump")];
        let mut out = Connection::open(dest).map_err(sqlite(dest, "create the snapshot file"))?;
        let backup = rusqlite::backup::Backup::new(pin, &mut out)
            .map_err(sqlite(&self.path, "start a snapshot"))?;
        backup
            .step(-1)
            .map_err(sqlite(&self.path, "copy the database into a snapshot"))?;
        Ok(())
    }

    /// Reads the published frame count with the WAL header it belongs to (retried while the WAL
    /// restarts underneath).
    fn published(&self) -> Result<(Option<WalHeader>, u32)> {
        for _ in 0..BOUND_ATTEMPTS {
            let before = wal::read_header(&self.wal_path)?;
            let (_busy, log, _done): (i64, i64, i64) = self
                .noop
                .query_row("PRAGMA wal_checkpoint(NOOP)", [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .map_err(sqlite(&self.path, "read the published WAL end"))?;
            let after = wal::read_header(&self.wal_path)?;
            // -1: the wal-index could not be read consistently (a writer was changing it).
            if log >= 0 && before.map(|h| h.salt) == after.map(|h| h.salt) {
                let end = u32::try_from(log.max(0)).unwrap_or(u32::MAX);
                return Ok((after, if after.is_some() { end } else { 0 }));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Err(SourceError::Unstable {
            path: self.path.clone(),
        })
    }

    fn open_wal(&self) -> Result<File> {
        File::open(&self.wal_path).map_err(|source| {
            SourceError::Wal(WalError::Io {
                path: self.wal_path.clone(),
                source,
            })
        })
    }

    /// Begins a read transaction on the pin connection not in use.
    fn pin_next(&mut self) -> Result<()> {
        let next = self.pinned.map_or(0, |i| 1 - i);
        let c = &self.pins[next];
        c.execute_batch("BEGIN; SELECT 1 FROM sqlite_schema LIMIT 1;")
            .map_err(sqlite(&self.path, "begin the pinning read transaction"))?;
        self.pinned = Some(next);
        Ok(())
    }

    /// Ends the read transaction of pin `old` (after the new one took over).
    fn release(&mut self, old: Option<usize>) -> Result<()> {
        if let Some(i) = old
            && Some(i) != self.pinned
        {
            self.pins[i]
                .execute_batch("COMMIT")
                .map_err(sqlite(&self.path, "end the old pinning read transaction"))?;
        }
        Ok(())
    }
}

/// Whether `next` can be a later lifetime of the WAL `prev` belongs to: every restart adds 1
/// to salt-1 (restarts that reached no frame too, hence a small positive delta rather than 1),
/// while a new WAL starts from random salts. The checkpoint sequence is no help: each
/// connection writes its own count.
fn continues(prev: &WalHeader, next: &WalHeader) -> bool {
    let delta = next.salt.0.wrapping_sub(prev.salt.0);
    (1..=MAX_EMPTY_RESTARTS).contains(&delta) && next.page_size == prev.page_size
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn parse_version(v: &str) -> (u32, u32, u32) {
    let mut parts = v.split('.').map(|p| p.parse().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

fn sqlite(path: &Path, op: &'static str) -> impl FnOnce(rusqlite::Error) -> SourceError + use<> {
    let path = path.to_path_buf();
    move |source| SourceError::Sqlite { path, op, source }
}

#[cfg(test)]
#[path = "source_tests.rs"]
mod tests;
