//! The checkpoint tables: `persist_frozen` marks a cgroup this daemon froze, written (durably)
//! before the freeze and removed after the thaw, so a daemon killed mid-pause thaws it at its
//! next start; `persist_checkpoint` keeps, per identity, the newest instant known to be stored
//! (the recovery point) and how the last checkpoint went.

use rusqlite::{Connection, OptionalExtension, params};

use super::error::{PersistError, Result};
use crate::layer::types::ContainerLayerId;

pub(super) const SCHEMA_V4: &str = "
CREATE TABLE persist_frozen (
    cgroup TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    since_ns INTEGER NOT NULL
);
CREATE TABLE persist_checkpoint (
    service TEXT NOT NULL,
    instance TEXT NOT NULL,
    durable_ns INTEGER,
    attempted_ns INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    pause_us INTEGER,
    bytes INTEGER,
    digest TEXT,
    seq INTEGER,
    PRIMARY KEY (service, instance)
);
";

/// How checkpoints of one identity went on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckpointRow {
    /// The newest instant whose state of the upper is known to be stored (a checkpoint's
    /// pause, or a flush of the stopped container); `None` before the first.
    pub durable_ns: Option<i64>,
    /// When the last checkpoint was tried.
    pub attempted_ns: i64,
    /// Checkpoints failed in a row.
    pub failures: i64,
    pub last_error: Option<String>,
    /// How long the last successful checkpoint kept the container paused.
    pub pause_us: Option<i64>,
    /// Compressed bytes the last successful checkpoint uploaded.
    pub bytes: Option<i64>,
    pub digest: Option<String>,
    pub seq: Option<i64>,
}

/// Records that `cgroup` (of snapshot `key`) is about to be frozen by this daemon.
pub(super) fn mark_frozen(c: &Connection, cgroup: &str, key: &str, now_ns: i64) -> Result<()> {
    c.execute(
        "INSERT OR REPLACE INTO persist_frozen (cgroup, key, since_ns) VALUES (?1, ?2, ?3)",
        params![cgroup, key, now_ns],
    )
    .map_err(PersistError::db("record a freeze"))?;
    Ok(())
}

pub(super) fn unmark_frozen(c: &Connection, cgroup: &str) -> Result<()> {
    c.execute(
        "DELETE FROM persist_frozen WHERE cgroup = ?1",
        params![cgroup],
    )
    .map_err(PersistError::db("forget a freeze"))?;
    Ok(())
}

/// Cgroups a previous run froze and may not have thawed: (cgroup, snapshot key).
pub(super) fn frozen_marks(c: &Connection) -> Result<Vec<(String, String)>> {
    let mut stmt = c
        .prepare("SELECT cgroup, key FROM persist_frozen ORDER BY since_ns")
        .map_err(PersistError::db("list freezes"))?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(PersistError::db("list freezes"))?;
    rows.collect::<rusqlite::Result<_>>()
        .map_err(PersistError::db("list freezes"))
}

pub(super) fn get(c: &Connection, id: &ContainerLayerId) -> Result<Option<CheckpointRow>> {
    c.query_row(
        "SELECT durable_ns, attempted_ns, failures, last_error, pause_us, bytes, digest, seq
         FROM persist_checkpoint WHERE service = ?1 AND instance = ?2",
        params![id.service, id.instance_id],
        |r| {
            Ok(CheckpointRow {
                durable_ns: r.get(0)?,
                attempted_ns: r.get(1)?,
                failures: r.get(2)?,
                last_error: r.get(3)?,
                pause_us: r.get(4)?,
                bytes: r.get(5)?,
                digest: r.get(6)?,
                seq: r.get(7)?,
            })
        },
    )
    .optional()
    .map_err(PersistError::db("read checkpoint state"))
}

fn ensure(c: &Connection, id: &ContainerLayerId) -> Result<()> {
    c.execute(
        "INSERT OR IGNORE INTO persist_checkpoint (service, instance) VALUES (?1, ?2)",
        params![id.service, id.instance_id],
    )
    .map_err(PersistError::db("record checkpoint state"))?;
    Ok(())
}

/// What a successful checkpoint stored.
#[derive(Debug, Clone)]
pub(super) struct Stored<'a> {
    pub durable_ns: i64,
    pub pause_us: i64,
    pub bytes: i64,
    pub digest: &'a str,
    pub seq: u64,
}

pub(super) fn succeeded(
    c: &Connection,
    id: &ContainerLayerId,
    s: &Stored<'_>,
    now_ns: i64,
) -> Result<()> {
    ensure(c, id)?;
    c.execute(
        "UPDATE persist_checkpoint SET durable_ns = MAX(COALESCE(durable_ns, 0), ?3),
             attempted_ns = ?4, failures = 0, last_error = NULL, pause_us = ?5, bytes = ?6,
             digest = ?7, seq = ?8
         WHERE service = ?1 AND instance = ?2",
        params![
            id.service,
            id.instance_id,
            s.durable_ns,
            now_ns,
            s.pause_us,
            s.bytes,
            s.digest,
            i64::try_from(s.seq).unwrap_or(i64::MAX)
        ],
    )
    .map_err(PersistError::db("record checkpoint"))?;
    Ok(())
}

pub(super) fn failed(
    c: &Connection,
    id: &ContainerLayerId,
    error: &str,
    now_ns: i64,
) -> Result<()> {
    ensure(c, id)?;
    c.execute(
        "UPDATE persist_checkpoint SET attempted_ns = ?3, failures = failures + 1, last_error = ?4
         WHERE service = ?1 AND instance = ?2",
        params![id.service, id.instance_id, now_ns, error],
    )
    .map_err(PersistError::db("record checkpoint failure"))?;
    Ok(())
}

/// A flush of the stopped container stored its state as of `at_ns` (the request time).
pub(super) fn note_durable(c: &Connection, id: &ContainerLayerId, at_ns: i64) -> Result<()> {
    ensure(c, id)?;
    c.execute(
        "UPDATE persist_checkpoint SET durable_ns = MAX(COALESCE(durable_ns, 0), ?3)
         WHERE service = ?1 AND instance = ?2",
        params![id.service, id.instance_id, at_ns],
    )
    .map_err(PersistError::db("record durable state"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(SCHEMA_V4).unwrap();
        c
    }

    #[test]
    fn the_recovery_point_only_moves_forward_and_failures_count_until_a_success() {
        let c = conn();
        let id = ContainerLayerId::new("svc", "a");
        assert_eq!(get(&c, &id).unwrap(), None);
        failed(&c, &id, "cgroup did not freeze", 10).unwrap();
        failed(&c, &id, "cgroup did not freeze", 20).unwrap();
        let r = get(&c, &id).unwrap().unwrap();
        assert_eq!((r.failures, r.durable_ns), (2, None));
        let s = Stored {
            durable_ns: 100,
            pause_us: 1500,
            bytes: 4096,
            digest: "d1",
            seq: 7,
        };
        succeeded(&c, &id, &s, 110).unwrap();
        note_durable(&c, &id, 50).unwrap();
        let r = get(&c, &id).unwrap().unwrap();
        assert_eq!(r.durable_ns, Some(100));
        assert_eq!((r.failures, r.last_error), (0, None));
        assert_eq!(
            (r.pause_us, r.bytes, r.seq),
            (Some(1500), Some(4096), Some(7))
        );
        note_durable(&c, &id, 200).unwrap();
        assert_eq!(get(&c, &id).unwrap().unwrap().durable_ns, Some(200));
    }

    #[test]
    fn freeze_marks_are_listed_until_forgotten() {
        let c = conn();
        mark_frozen(&c, "/sys/fs/cgroup/freezer/default/a", "default/1/a", 5).unwrap();
        mark_frozen(&c, "/sys/fs/cgroup/freezer/default/b", "default/2/b", 6).unwrap();
        unmark_frozen(&c, "/sys/fs/cgroup/freezer/default/a").unwrap();
        assert_eq!(
            frozen_marks(&c).unwrap(),
            vec![(
                "/sys/fs/cgroup/freezer/default/b".to_string(),
                "default/2/b".to_string()
            )]
        );
    }
}
