//! The `persist_flush` table: flush requests, recorded before they are acknowledged so a daemon
//! crash after a hook returned still flushes at the next start.
//!
//! At most one `pending` row per snapshot key (a partial unique index): a request for a key
//! that already has one joins it (coalescing). A `running` row is being synced; a request
//! arriving meanwhile makes a new `pending` row, since the walk may have started before the
//! change it wants captured. `done` and `failed` rows stay a week for `status`.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::error::{PersistError, Result};
use crate::layer::types::ContainerLayerId;

pub(super) const SCHEMA_V3: &str = "
CREATE TABLE persist_flush (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    service TEXT NOT NULL,
    instance TEXT NOT NULL,
    trigger TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed')),
    requested_ns INTEGER NOT NULL,
    finished_ns INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ns INTEGER NOT NULL DEFAULT 0,
    digest TEXT,
    seq INTEGER,
    unchanged INTEGER NOT NULL DEFAULT 0,
    crash_consistent INTEGER NOT NULL DEFAULT 1,
    error TEXT,
    merged_into INTEGER
);
CREATE UNIQUE INDEX persist_flush_pending ON persist_flush (key) WHERE state = 'pending';
CREATE INDEX persist_flush_identity ON persist_flush (service, instance, id);
";

/// Finished requests are kept this long for `status`.
const KEEP_FINISHED_NS: i64 = 7 * 24 * 3600 * 1_000_000_000;

/// Where a flush request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushState {
    Pending,
    Running,
    Done,
    Failed,
}

impl FlushState {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "running" => Self::Running,
            "done" => Self::Done,
            "failed" => Self::Failed,
            _ => return None,
        })
    }
}

/// One flush request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushRow {
    pub id: i64,
    /// Backend key of the snapshot whose upper dir is flushed.
    pub key: String,
    pub identity: ContainerLayerId,
    pub trigger: String,
    pub state: FlushState,
    pub requested_ns: i64,
    pub finished_ns: Option<i64>,
    pub attempts: i64,
    pub next_attempt_ns: i64,
    pub digest: Option<String>,
    pub seq: Option<u64>,
    pub unchanged: bool,
    pub crash_consistent: bool,
    pub error: Option<String>,
    /// This request was folded into a newer one for the same snapshot: wait for that one.
    pub merged_into: Option<i64>,
}

const COLUMNS: &str = "id, key, service, instance, trigger, state, requested_ns, finished_ns, \
    attempts, next_attempt_ns, digest, seq, unchanged, crash_consistent, error, merged_into";

fn from_row(r: &Row<'_>) -> rusqlite::Result<FlushRow> {
    let state: String = r.get(5)?;
    let seq: Option<i64> = r.get(11)?;
    Ok(FlushRow {
        id: r.get(0)?,
        key: r.get(1)?,
        identity: ContainerLayerId::new(r.get::<_, String>(2)?, r.get::<_, String>(3)?),
        trigger: r.get(4)?,
        state: FlushState::parse(&state).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                5,
                rusqlite::types::Type::Text,
                format!("unknown flush state {state:?}").into(),
            )
        })?,
        requested_ns: r.get(6)?,
        finished_ns: r.get(7)?,
        attempts: r.get(8)?,
        next_attempt_ns: r.get(9)?,
        digest: r.get(10)?,
        seq: seq.and_then(|s| u64::try_from(s).ok()),
        unchanged: r.get(12)?,
        crash_consistent: r.get(13)?,
        error: r.get(14)?,
        merged_into: r.get(15)?,
    })
}

fn query(
    c: &Connection,
    op: &'static str,
    sql: &str,
    p: impl rusqlite::Params,
) -> Result<Vec<FlushRow>> {
    let mut st = c.prepare_cached(sql).map_err(PersistError::db(op))?;
    st.query_map(p, from_row)
        .map_err(PersistError::db(op))?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(PersistError::db(op))
}

/// What [`request`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requested {
    pub id: i64,
    /// An earlier pending request for the same snapshot was joined.
    pub joined: bool,
}

/// Records a request for `key`, or joins the pending one (which then also waives the
/// crash-consistency flag if this request does).
pub fn request(
    c: &Connection,
    key: &str,
    identity: &ContainerLayerId,
    trigger: &str,
    crash_consistent: bool,
    now_ns: i64,
) -> Result<Requested> {
    let op = "record flush request";
    let existing: Option<i64> = c
        .query_row(
            "SELECT id FROM persist_flush WHERE key = ?1 AND state = 'pending'",
            [key],
            |r| r.get(0),
        )
        .optional()
        .map_err(PersistError::db(op))?;
    if let Some(id) = existing {
        if !crash_consistent {
            c.execute(
                "UPDATE persist_flush SET crash_consistent = 0 WHERE id = ?1",
                [id],
            )
            .map_err(PersistError::db(op))?;
        }
        return Ok(Requested { id, joined: true });
    }
    c.execute(
        "INSERT INTO persist_flush (key, service, instance, trigger, state, requested_ns, crash_consistent)
         VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?6)",
        params![key, identity.service, identity.instance_id, trigger, now_ns, crash_consistent],
    )
    .map_err(PersistError::db(op))?;
    Ok(Requested {
        id: c.last_insert_rowid(),
        joined: false,
    })
}

pub fn get(c: &Connection, id: i64) -> Result<Option<FlushRow>> {
    Ok(query(
        c,
        "read flush request",
        &format!("SELECT {COLUMNS} FROM persist_flush WHERE id = ?1"),
        [id],
    )?
    .pop())
}

/// Pending requests, oldest first.
pub fn pending(c: &Connection) -> Result<Vec<FlushRow>> {
    query(
        c,
        "read flush requests",
        &format!("SELECT {COLUMNS} FROM persist_flush WHERE state = 'pending' ORDER BY id"),
        [],
    )
}

/// The newest `limit` requests of `identity`, newest first.
pub fn recent(c: &Connection, identity: &ContainerLayerId, limit: i64) -> Result<Vec<FlushRow>> {
    query(
        c,
        "read flush requests",
        &format!(
            "SELECT {COLUMNS} FROM persist_flush WHERE service = ?1 AND instance = ?2
             ORDER BY id DESC LIMIT ?3"
        ),
        params![identity.service, identity.instance_id, limit],
    )
}

/// Requests not finished yet (pending or running).
pub fn open_count(c: &Connection) -> Result<i64> {
    c.query_row(
        "SELECT count(*) FROM persist_flush WHERE state IN ('pending', 'running')",
        [],
        |r| r.get(0),
    )
    .map_err(PersistError::db("count flush requests"))
}

/// Marks a pending request running. False when it is no longer pending.
pub fn start(c: &Connection, id: i64) -> Result<bool> {
    let n = c
        .execute(
            "UPDATE persist_flush SET state = 'running', attempts = attempts + 1
             WHERE id = ?1 AND state = 'pending'",
            [id],
        )
        .map_err(PersistError::db("start flush request"))?;
    Ok(n == 1)
}

/// Records success.
pub fn succeed(
    c: &Connection,
    id: i64,
    digest: &str,
    seq: u64,
    unchanged: bool,
    now_ns: i64,
) -> Result<()> {
    c.execute(
        "UPDATE persist_flush SET state = 'done', digest = ?2, seq = ?3, unchanged = ?4,
         finished_ns = ?5, error = NULL WHERE id = ?1",
        params![
            id,
            digest,
            i64::try_from(seq).unwrap_or(i64::MAX),
            unchanged,
            now_ns
        ],
    )
    .map_err(PersistError::db("finish flush request"))?;
    Ok(())
}

/// Records a final failure.
pub fn fail(c: &Connection, id: i64, error: &str, now_ns: i64) -> Result<()> {
    c.execute(
        "UPDATE persist_flush SET state = 'failed', error = ?2, finished_ns = ?3 WHERE id = ?1",
        params![id, error, now_ns],
    )
    .map_err(PersistError::db("fail flush request"))?;
    Ok(())
}

/// Puts a running request back to pending, due at `next_ns`, keeping the error for `status`.
/// If another pending request for the key appeared meanwhile, this one is merged into it.
pub fn retry_later(c: &Connection, id: i64, error: &str, next_ns: i64) -> Result<()> {
    let op = "reschedule flush request";
    let key: Option<String> = c
        .query_row("SELECT key FROM persist_flush WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()
        .map_err(PersistError::db(op))?;
    let Some(key) = key else {
        return Ok(());
    };
    let other: Option<i64> = c
        .query_row(
            "SELECT id FROM persist_flush WHERE key = ?1 AND state = 'pending' AND id != ?2",
            params![key, id],
            |r| r.get(0),
        )
        .optional()
        .map_err(PersistError::db(op))?;
    if let Some(other) = other {
        // The newer request covers this one; its waiters follow the pointer.
        c.execute(
            "UPDATE persist_flush SET state = 'failed', error = ?2, merged_into = ?3,
             finished_ns = ?4 WHERE id = ?1",
            params![id, error, other, next_ns],
        )
        .map_err(PersistError::db(op))?;
        return Ok(());
    }
    c.execute(
        "UPDATE persist_flush SET state = 'pending', error = ?2, next_attempt_ns = ?3 WHERE id = ?1",
        params![id, error, next_ns],
    )
    .map_err(PersistError::db(op))?;
    Ok(())
}

/// After a crash: requests that were running are pending again; old finished ones are
/// dropped. Returns how many were pending afterwards.
pub fn recover(c: &Connection, now_ns: i64) -> Result<i64> {
    let op = "recover flush requests";
    // A running row whose key meanwhile got a pending one is covered by it.
    c.execute(
        "UPDATE persist_flush SET state = 'failed', error = 'interrupted by a restart',
         finished_ns = ?1,
         merged_into = (SELECT p.id FROM persist_flush p WHERE p.key = persist_flush.key
                        AND p.state = 'pending')
         WHERE state = 'running' AND key IN (SELECT key FROM persist_flush WHERE state = 'pending')",
        [now_ns],
    )
    .map_err(PersistError::db(op))?;
    c.execute(
        "UPDATE persist_flush SET state = 'pending', next_attempt_ns = 0 WHERE state = 'running'",
        [],
    )
    .map_err(PersistError::db(op))?;
    c.execute(
        "DELETE FROM persist_flush WHERE state IN ('done', 'failed') AND finished_ns < ?1",
        [now_ns.saturating_sub(KEEP_FINISHED_NS)],
    )
    .map_err(PersistError::db(op))?;
    open_count(c)
}
