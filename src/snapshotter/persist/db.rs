//! Persistence tables in the snapshotter's metadata database, so an outbox row can be written in
//! the same transaction that deletes the snapshot record.
//!
//! - `persist_snapshots`: per Active snapshot key, the identity resolution (`pending` until
//!   decided, then `none` or `identified`), the base it sits on, and whether the restore step
//!   is done. A partial unique index makes two live snapshots with one identity impossible.
//! - `persist_outbox`: layers waiting for upload. `location = 'live'` means the directory is
//!   still a committed snapshot at `snapshots/<snapshot_id>`; `'outbox'` means it was moved to
//!   `outbox/<id>` when its snapshot was removed.
//! - `persist_seq`: per identity, the last ordering ticket handed out and the highest seq known
//!   to be in the store's manifest. Both are raised by every manifest read, so tickets keep
//!   moving forward after a node lost its disk, and a queued layer the store has already
//!   superseded is never used for a restore.

use chrono::Utc;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::error::{PersistError, Result};
use crate::layer::types::ContainerLayerId;
use crate::state::Migration;

/// Schema steps appended to the snapshotter's migrations (through
/// [`PersistenceHooks::migrations`](crate::snapshotter::hooks::PersistenceHooks::migrations)).
/// Append only: the names are recorded in every database.
pub static MIGRATIONS: &[Migration] = &[
    Migration {
        name: "snapshotter: persistence",
        sql: SCHEMA_V1,
    },
    Migration {
        name: "snapshotter: persistence, background restores and dead letters",
        sql: SCHEMA_V2,
    },
    Migration {
        name: "snapshotter: flush requests",
        sql: super::flush_db::SCHEMA_V3,
    },
    Migration {
        name: "snapshotter: checkpoints and freezes",
        sql: super::checkpoint_db::SCHEMA_V4,
    },
];

/// `want_*`: the identity a snapshot asks for (snapshot label at Prepare, container label at
/// Mounts) before the background restore has claimed it; `dead`/`next_attempt_ns`: the upload
/// worker's retry schedule and dead-letter state.
const SCHEMA_V2: &str = "
ALTER TABLE persist_snapshots ADD COLUMN want_service TEXT;
ALTER TABLE persist_snapshots ADD COLUMN want_instance TEXT;
ALTER TABLE persist_outbox ADD COLUMN next_attempt_ns INTEGER NOT NULL DEFAULT 0;
ALTER TABLE persist_outbox ADD COLUMN dead INTEGER NOT NULL DEFAULT 0;
";

const SCHEMA_V1: &str = "
CREATE TABLE persist_snapshots (
    key TEXT PRIMARY KEY,
    resolution TEXT NOT NULL CHECK (resolution IN ('pending', 'none', 'identified')),
    service TEXT,
    instance TEXT,
    source TEXT NOT NULL DEFAULT '',
    base TEXT NOT NULL DEFAULT '[]',
    restored INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX persist_snapshots_identity ON persist_snapshots (service, instance)
    WHERE resolution = 'identified';
CREATE TABLE persist_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    service TEXT NOT NULL,
    instance TEXT NOT NULL,
    seq INTEGER NOT NULL,
    base TEXT,
    key TEXT NOT NULL,
    snapshot_id INTEGER NOT NULL,
    location TEXT NOT NULL CHECK (location IN ('live', 'outbox')),
    created_ns INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX persist_outbox_identity ON persist_outbox (service, instance, seq);
CREATE INDEX persist_outbox_snapshot ON persist_outbox (snapshot_id);
CREATE TABLE persist_seq (
    service TEXT NOT NULL,
    instance TEXT NOT NULL,
    last INTEGER NOT NULL,
    synced INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (service, instance)
);
";

/// Where a snapshot stands in identity resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Not decided: waiting for the container record.
    Pending,
    /// Decided: never persisted.
    None,
    /// Decided: persisted under this identity.
    Identified(ContainerLayerId),
}

/// The persistence state of one Active snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRow {
    pub key: String,
    pub resolution: Resolution,
    /// Where the identity came from (for logs): `snapshot-label`, `container-label`, ...
    pub source: String,
    /// The parent chain's stable names, nearest first.
    pub base: Vec<String>,
    /// The restore step finished (restored, nothing to restore, or skipped by policy): only
    /// then may this upper dir become the identity's layer.
    pub restored: bool,
    /// The identity asked for while `resolution` is still `Pending`: the background restore
    /// claims it (once no other live snapshot holds it) and then restores it.
    pub want: Option<ContainerLayerId>,
}

/// Where a queued layer's directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// Still the committed snapshot `snapshots/<snapshot_id>`.
    Live,
    /// Moved to `outbox/<id>` when its snapshot was removed.
    Outbox,
}

impl Location {
    fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Outbox => "outbox",
        }
    }
}

/// A layer waiting to be synced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub id: i64,
    pub identity: ContainerLayerId,
    pub seq: u64,
    pub base: Option<Vec<String>>,
    /// Snapshot key the layer came from.
    pub key: String,
    pub snapshot_id: i64,
    pub location: Location,
    pub attempts: i64,
    /// The last failure, for status.
    pub last_error: Option<String>,
    /// Not retried before this time (ns since the epoch).
    pub next_attempt_ns: i64,
    /// Dead letter: failed for a reason retrying will not fix; kept on disk, retried only at
    /// the next start or `gc`.
    pub dead: bool,
    /// When it was queued (ns since the epoch).
    pub created_ns: i64,
}

/// A new outbox row (the id is assigned by the database unless given).
#[derive(Debug, Clone)]
pub struct NewOutbox<'a> {
    pub id: Option<i64>,
    pub identity: &'a ContainerLayerId,
    pub seq: u64,
    pub base: Option<&'a [String]>,
    pub key: &'a str,
    pub snapshot_id: i64,
    pub location: Location,
}

fn encode_base(base: &[String]) -> String {
    serde_json::to_string(base).unwrap_or_else(|_| "[]".to_string())
}

fn decode_base(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn snapshot_from_row(r: &Row<'_>) -> rusqlite::Result<SnapshotRow> {
    let resolution: String = r.get(1)?;
    let service: Option<String> = r.get(2)?;
    let instance: Option<String> = r.get(3)?;
    let resolution = match (resolution.as_str(), service, instance) {
        ("identified", Some(s), Some(i)) => Resolution::Identified(ContainerLayerId::new(s, i)),
        ("none", _, _) => Resolution::None,
        _ => Resolution::Pending,
    };
    Ok(SnapshotRow {
        key: r.get(0)?,
        resolution,
        source: r.get(4)?,
        base: decode_base(&r.get::<_, String>(5)?),
        restored: r.get(6)?,
        want: match (
            r.get::<_, Option<String>>(7)?,
            r.get::<_, Option<String>>(8)?,
        ) {
            (Some(s), Some(i)) => Some(ContainerLayerId::new(s, i)),
            _ => None,
        },
    })
}

const SNAPSHOT_COLUMNS: &str =
    "key, resolution, service, instance, source, base, restored, want_service, want_instance";

/// The persistence state of `key`, if any was recorded.
pub fn snapshot(conn: &Connection, key: &str) -> Result<Option<SnapshotRow>> {
    conn.query_row(
        &format!("SELECT {SNAPSHOT_COLUMNS} FROM persist_snapshots WHERE key = ?1"),
        [key],
        snapshot_from_row,
    )
    .optional()
    .map_err(PersistError::db("read snapshot persistence state"))
}

/// The live snapshot holding `identity`, if any.
pub fn identity_owner(
    conn: &Connection,
    identity: &ContainerLayerId,
) -> Result<Option<SnapshotRow>> {
    conn.query_row(
        &format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM persist_snapshots
             WHERE resolution = 'identified' AND service = ?1 AND instance = ?2"
        ),
        params![identity.service, identity.instance_id],
        snapshot_from_row,
    )
    .optional()
    .map_err(PersistError::db("look up identity owner"))
}

/// Inserts or replaces the state of `row.key`.
pub fn put_snapshot(conn: &Connection, row: &SnapshotRow) -> Result<()> {
    let (resolution, service, instance) = match &row.resolution {
        Resolution::Pending => ("pending", None, None),
        Resolution::None => ("none", None, None),
        Resolution::Identified(id) => ("identified", Some(&id.service), Some(&id.instance_id)),
    };
    conn.execute(
        "INSERT INTO persist_snapshots (key, resolution, service, instance, source, base, restored,
             want_service, want_instance)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (key) DO UPDATE SET resolution = ?2, service = ?3, instance = ?4, source = ?5,
             base = ?6, restored = ?7, want_service = ?8, want_instance = ?9",
        params![
            row.key,
            resolution,
            service,
            instance,
            row.source,
            encode_base(&row.base),
            row.restored,
            row.want.as_ref().map(|w| &w.service),
            row.want.as_ref().map(|w| &w.instance_id),
        ],
    )
    .map_err(PersistError::db("store snapshot persistence state"))?;
    Ok(())
}

/// Marks the restore step of `key` as done.
pub fn set_restored(conn: &Connection, key: &str) -> Result<()> {
    conn.execute(
        "UPDATE persist_snapshots SET restored = 1 WHERE key = ?1",
        [key],
    )
    .map_err(PersistError::db("mark snapshot restored"))?;
    Ok(())
}

/// Claims `want` for `key` unless another live snapshot holds it; returns that holder.
pub fn try_claim(
    conn: &Connection,
    key: &str,
    want: &ContainerLayerId,
) -> Result<Option<SnapshotRow>> {
    if let Some(other) = identity_owner(conn, want)?
        && other.key != key
    {
        return Ok(Some(other));
    }
    conn.execute(
        "UPDATE persist_snapshots SET resolution = 'identified', service = ?2, instance = ?3
         WHERE key = ?1",
        params![key, want.service, want.instance_id],
    )
    .map_err(PersistError::db("claim identity"))?;
    Ok(None)
}

/// Forgets `key`.
pub fn delete_snapshot(conn: &Connection, key: &str) -> Result<()> {
    conn.execute("DELETE FROM persist_snapshots WHERE key = ?1", [key])
        .map_err(PersistError::db("delete snapshot persistence state"))?;
    Ok(())
}

/// Every key with recorded state.
pub fn snapshot_keys(conn: &Connection) -> Result<Vec<String>> {
    let mut st = conn
        .prepare_cached("SELECT key FROM persist_snapshots")
        .map_err(PersistError::db("list persisted snapshots"))?;
    st.query_map([], |r| r.get(0))
        .and_then(Iterator::collect)
        .map_err(PersistError::db("list persisted snapshots"))
}

/// A new ordering ticket for `identity`, above every earlier one and every manifest seen.
pub fn next_seq(conn: &Connection, identity: &ContainerLayerId) -> Result<u64> {
    let seq: i64 = conn
        .query_row(
            "INSERT INTO persist_seq (service, instance, last) VALUES (?1, ?2, 1)
             ON CONFLICT (service, instance) DO UPDATE SET last = last + 1
             RETURNING last",
            params![identity.service, identity.instance_id],
            |r| r.get(0),
        )
        .map_err(PersistError::db("allocate sequence number"))?;
    Ok(u64::try_from(seq).unwrap_or(0))
}

/// Records that the store's manifest of `identity` is at `seq` or later: later tickets exceed
/// it, and queued layers up to it are superseded.
pub fn note_synced(conn: &Connection, identity: &ContainerLayerId, seq: u64) -> Result<()> {
    conn.execute(
        "INSERT INTO persist_seq (service, instance, last, synced) VALUES (?1, ?2, ?3, ?3)
         ON CONFLICT (service, instance) DO UPDATE SET last = max(last, ?3), synced = max(synced, ?3)",
        params![identity.service, identity.instance_id, to_i64(seq)],
    )
    .map_err(PersistError::db("record synced sequence number"))?;
    Ok(())
}

/// The highest seq of `identity` known to be in the store (0 if none).
pub fn synced_seq(conn: &Connection, identity: &ContainerLayerId) -> Result<u64> {
    let seq: Option<i64> = conn
        .query_row(
            "SELECT synced FROM persist_seq WHERE service = ?1 AND instance = ?2",
            params![identity.service, identity.instance_id],
            |r| r.get(0),
        )
        .optional()
        .map_err(PersistError::db("read synced sequence number"))?;
    Ok(seq.and_then(|s| u64::try_from(s).ok()).unwrap_or(0))
}

const OUTBOX_COLUMNS: &str = "id, service, instance, seq, base, key, snapshot_id, location, attempts, \
     last_error, next_attempt_ns, dead, created_ns";

fn outbox_from_row(r: &Row<'_>) -> rusqlite::Result<OutboxRow> {
    let base: Option<String> = r.get(4)?;
    let location: String = r.get(7)?;
    Ok(OutboxRow {
        id: r.get(0)?,
        identity: ContainerLayerId::new(r.get::<_, String>(1)?, r.get::<_, String>(2)?),
        seq: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
        base: base.as_deref().map(decode_base),
        key: r.get(5)?,
        snapshot_id: r.get(6)?,
        location: if location == "live" {
            Location::Live
        } else {
            Location::Outbox
        },
        attempts: r.get(8)?,
        last_error: r.get(9)?,
        next_attempt_ns: r.get(10)?,
        dead: r.get(11)?,
        created_ns: r.get(12)?,
    })
}

/// Queues a layer; returns the row id.
pub fn insert_outbox(conn: &Connection, new: &NewOutbox<'_>) -> Result<i64> {
    conn.execute(
        "INSERT INTO persist_outbox (id, service, instance, seq, base, key, snapshot_id, location, created_ns)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            new.id,
            new.identity.service,
            new.identity.instance_id,
            to_i64(new.seq),
            new.base.map(encode_base),
            new.key,
            new.snapshot_id,
            new.location.as_str(),
            Utc::now().timestamp_nanos_opt().unwrap_or(0)
        ],
    )
    .map_err(PersistError::db("queue layer"))?;
    Ok(conn.last_insert_rowid())
}

fn outbox_query(
    conn: &Connection,
    filter: &str,
    args: impl rusqlite::Params,
) -> Result<Vec<OutboxRow>> {
    let mut st = conn
        .prepare_cached(&format!(
            "SELECT {OUTBOX_COLUMNS} FROM persist_outbox {filter}"
        ))
        .map_err(PersistError::db("read outbox"))?;
    st.query_map(args, outbox_from_row)
        .and_then(Iterator::collect)
        .map_err(PersistError::db("read outbox"))
}

/// Every queued layer, oldest first.
pub fn outbox_rows(conn: &Connection) -> Result<Vec<OutboxRow>> {
    outbox_query(conn, "ORDER BY id", [])
}

/// One queued layer.
pub fn outbox_row(conn: &Connection, id: i64) -> Result<Option<OutboxRow>> {
    Ok(outbox_query(conn, "WHERE id = ?1", [id])?.pop())
}

/// The newest queued layer of `identity` that the store has not superseded.
pub fn newest_unsynced(
    conn: &Connection,
    identity: &ContainerLayerId,
) -> Result<Option<OutboxRow>> {
    Ok(outbox_query(
        conn,
        "WHERE service = ?1 AND instance = ?2
           AND seq > coalesce((SELECT synced FROM persist_seq WHERE service = ?1 AND instance = ?2), 0)
         ORDER BY seq DESC, id DESC LIMIT 1",
        params![identity.service, identity.instance_id],
    )?
    .pop())
}

/// Every queued layer of `identity`, oldest first.
pub fn outbox_of(conn: &Connection, identity: &ContainerLayerId) -> Result<Vec<OutboxRow>> {
    outbox_query(
        conn,
        "WHERE service = ?1 AND instance = ?2 ORDER BY seq, id",
        params![identity.service, identity.instance_id],
    )
}

/// The queued layer that is still the live committed snapshot `snapshot_id`.
pub fn live_outbox(conn: &Connection, snapshot_id: i64) -> Result<Option<OutboxRow>> {
    Ok(outbox_query(
        conn,
        "WHERE snapshot_id = ?1 AND location = 'live' ORDER BY id DESC LIMIT 1",
        [snapshot_id],
    )?
    .pop())
}

/// Records that row `id`'s directory moved.
pub fn set_location(conn: &Connection, id: i64, location: Location) -> Result<()> {
    conn.execute(
        "UPDATE persist_outbox SET location = ?2 WHERE id = ?1",
        params![id, location.as_str()],
    )
    .map_err(PersistError::db("update outbox location"))?;
    Ok(())
}

/// Records a failed attempt: not retried before `next_attempt_ns`, or never again
/// automatically when `dead`.
pub fn record_failure(
    conn: &Connection,
    id: i64,
    error: &str,
    next_attempt_ns: i64,
    dead: bool,
) -> Result<()> {
    conn.execute(
        "UPDATE persist_outbox SET attempts = attempts + 1, last_error = ?2, next_attempt_ns = ?3,
             dead = ?4 WHERE id = ?1",
        params![id, error, next_attempt_ns, dead],
    )
    .map_err(PersistError::db("record outbox failure"))?;
    Ok(())
}

/// Makes every dead letter and backed-off row due again (start-up, `gc`); returns how many
/// dead letters were revived.
pub fn revive_all(conn: &Connection) -> Result<usize> {
    let dead = conn
        .execute(
            "UPDATE persist_outbox SET dead = 0, attempts = 0, next_attempt_ns = 0 WHERE dead = 1",
            [],
        )
        .map_err(PersistError::db("revive dead letters"))?;
    conn.execute("UPDATE persist_outbox SET next_attempt_ns = 0", [])
        .map_err(PersistError::db("reset retry schedule"))?;
    Ok(dead)
}

/// Records the identity a pending snapshot asks for.
pub fn set_want(conn: &Connection, key: &str, want: &ContainerLayerId, source: &str) -> Result<()> {
    conn.execute(
        "UPDATE persist_snapshots SET want_service = ?2, want_instance = ?3, source = ?4
         WHERE key = ?1 AND resolution = 'pending'",
        params![key, want.service, want.instance_id, source],
    )
    .map_err(PersistError::db("record wanted identity"))?;
    Ok(())
}

/// Removes a finished row.
pub fn delete_outbox(conn: &Connection, id: i64) -> Result<()> {
    conn.execute("DELETE FROM persist_outbox WHERE id = ?1", [id])
        .map_err(PersistError::db("delete outbox row"))?;
    Ok(())
}
