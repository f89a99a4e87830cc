//! Snapshot records in SQLite (`<root>/metadata.db`), through the crate's [`Database`].
//!
//! One row per snapshot; `id` names its directory `snapshots/<id>` and survives Commit, which
//! rewrites the row in place (the directory is reused, never copied). AUTOINCREMENT ids are never
//! reused, so a directory left behind by a crash can never be mistaken for a newer snapshot.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::state::Migration;

use super::error::{Result, SnapshotError};
use super::types::{Info, Kind, Labels, Usage};

/// Schema of the snapshotter's own tables. Append only; a persistence hook's steps
/// ([`PersistenceHooks::migrations`](super::hooks::PersistenceHooks::migrations)) follow them.
pub static MIGRATIONS: &[Migration] = &[Migration {
    name: "snapshotter: snapshots",
    sql: "CREATE TABLE snapshots (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            key TEXT NOT NULL UNIQUE,
            parent TEXT NOT NULL DEFAULT '',
            kind INTEGER NOT NULL,
            created_ns INTEGER NOT NULL,
            updated_ns INTEGER NOT NULL,
            labels TEXT NOT NULL DEFAULT '{}',
            size INTEGER NOT NULL DEFAULT 0,
            inodes INTEGER NOT NULL DEFAULT 0
          );
          CREATE INDEX snapshots_parent ON snapshots (parent);",
}];

/// A stored snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: i64,
    pub info: Info,
    /// Usage stored at Commit; zero for other kinds.
    pub usage: Usage,
}

const COLUMNS: &str = "id, key, parent, kind, created_ns, updated_ns, labels, size, inodes";

type RawRow = (i64, String, String, i64, i64, i64, String, i64, i64);

fn from_row(row: &Row<'_>) -> rusqlite::Result<RawRow> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
        row.get(7)?,
        row.get(8)?,
    ))
}

fn decode(raw: RawRow) -> Result<Record> {
    let (id, key, parent, kind, created, updated, labels, size, inodes) = raw;
    let corrupt = |reason: String| SnapshotError::Corrupt {
        key: key.clone(),
        reason,
    };
    let kind = Kind::from_db(kind).ok_or_else(|| corrupt(format!("unknown kind {kind}")))?;
    let labels: Labels = serde_json::from_str(&labels)
        .map_err(|e| corrupt(format!("labels are not a JSON object: {e}")))?;
    Ok(Record {
        id,
        info: Info {
            name: key,
            parent,
            kind,
            created: from_nanos(created),
            updated: from_nanos(updated),
            labels,
        },
        usage: Usage { size, inodes },
    })
}

/// Nanoseconds since the epoch: exact round trips through the protobuf `Timestamp`.
pub fn to_nanos(t: DateTime<Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or(i64::MAX)
}

pub fn from_nanos(n: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(n)
}

fn encode_labels(labels: &Labels) -> String {
    // A BTreeMap<String, String> always serializes.
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".to_string())
}

/// Looks up one snapshot by key.
pub fn get(conn: &Connection, key: &str) -> Result<Option<Record>> {
    let raw = conn
        .prepare_cached(&format!("SELECT {COLUMNS} FROM snapshots WHERE key = ?1"))
        .and_then(|mut st| st.query_row([key], from_row))
        .optional()
        .map_err(SnapshotError::db("read snapshot"))?;
    raw.map(decode).transpose()
}

/// Like [`get`], but a missing key is `NotFound`.
pub fn require(conn: &Connection, key: &str) -> Result<Record> {
    get(conn, key)?.ok_or_else(|| SnapshotError::NotFound {
        key: key.to_string(),
    })
}

/// Every snapshot, ordered by id (creation order).
pub fn all(conn: &Connection) -> Result<Vec<Record>> {
    let mut stmt = conn
        .prepare_cached(&format!("SELECT {COLUMNS} FROM snapshots ORDER BY id"))
        .map_err(SnapshotError::db("list snapshots"))?;
    let rows = stmt
        .query_map([], from_row)
        .map_err(SnapshotError::db("list snapshots"))?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(SnapshotError::db("list snapshots"))?;
    rows.into_iter().map(decode).collect()
}

/// Committed snapshots whose parent is `parent`.
pub fn committed_children(conn: &Connection, parent: &str) -> Result<Vec<Record>> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM snapshots WHERE parent = ?1 AND kind = ?2 ORDER BY id"
        ))
        .map_err(SnapshotError::db("list children"))?;
    let rows = stmt
        .query_map(params![parent, Kind::Committed.to_db()], from_row)
        .map_err(SnapshotError::db("list children"))?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(SnapshotError::db("list children"))?;
    rows.into_iter().map(decode).collect()
}

/// True when some snapshot names `key` as its parent.
pub fn has_children(conn: &Connection, key: &str) -> Result<bool> {
    conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM snapshots WHERE parent = ?1)")
        .and_then(|mut st| st.query_row([key], |r| r.get(0)))
        .map_err(SnapshotError::db("check children"))
}

/// `key` and its ancestors as (id, key), `key` first, then nearest parent first.
pub fn chain(conn: &Connection, key: &str) -> Result<Vec<(i64, String)>> {
    let mut stmt = conn
        .prepare_cached(
            "WITH RECURSIVE chain (id, key, parent, depth) AS (
                SELECT id, key, parent, 0 FROM snapshots WHERE key = ?1
                UNION ALL
                SELECT s.id, s.key, s.parent, c.depth + 1 FROM snapshots s JOIN chain c ON s.key = c.parent
                WHERE c.parent != ''
             )
             SELECT id, key FROM chain ORDER BY depth",
        )
        .map_err(SnapshotError::db("resolve parents"))?;
    stmt.query_map([key], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(SnapshotError::db("resolve parents"))?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(SnapshotError::db("resolve parents"))
}

/// Every id in use.
pub fn ids(conn: &Connection) -> Result<std::collections::HashSet<i64>> {
    let mut stmt = conn
        .prepare_cached("SELECT id FROM snapshots")
        .map_err(SnapshotError::db("list ids"))?;
    stmt.query_map([], |r| r.get(0))
        .map_err(SnapshotError::db("list ids"))?
        .collect::<rusqlite::Result<_>>()
        .map_err(SnapshotError::db("list ids"))
}

/// Inserts a new Active or View snapshot and returns its id.
pub fn insert(conn: &Connection, info: &Info) -> Result<i64> {
    conn.prepare_cached("INSERT INTO snapshots (key, parent, kind, created_ns, updated_ns, labels) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
        .and_then(|mut st| st.execute(params![
            info.name,
            info.parent,
            info.kind.to_db(),
            to_nanos(info.created),
            to_nanos(info.updated),
            encode_labels(&info.labels)
        ]))
        .map_err(SnapshotError::db("insert snapshot"))?;
    Ok(conn.last_insert_rowid())
}

/// Turns the Active row `id` into the Committed snapshot `name`, keeping the id (and directory).
pub fn commit(
    conn: &Connection,
    id: i64,
    name: &str,
    labels: &Labels,
    now: DateTime<Utc>,
    usage: Usage,
) -> Result<()> {
    conn.prepare_cached("UPDATE snapshots SET key = ?2, kind = ?3, created_ns = ?4, updated_ns = ?4, labels = ?5, size = ?6, inodes = ?7
         WHERE id = ?1")
        .and_then(|mut st| st.execute(params![
            id,
            name,
            Kind::Committed.to_db(),
            to_nanos(now),
            encode_labels(labels),
            usage.size,
            usage.inodes
        ]))
        .map_err(SnapshotError::db("commit snapshot"))?;
    Ok(())
}

/// Stores new labels and the Updated time.
pub fn update_labels(
    conn: &Connection,
    id: i64,
    labels: &Labels,
    updated: DateTime<Utc>,
) -> Result<()> {
    conn.prepare_cached("UPDATE snapshots SET labels = ?2, updated_ns = ?3 WHERE id = ?1")
        .and_then(|mut st| st.execute(params![id, encode_labels(labels), to_nanos(updated)]))
        .map_err(SnapshotError::db("update labels"))?;
    Ok(())
}

/// Deletes the row `id`.
pub fn delete(conn: &Connection, id: i64) -> Result<()> {
    conn.prepare_cached("DELETE FROM snapshots WHERE id = ?1")
        .and_then(|mut st| st.execute([id]))
        .map_err(SnapshotError::db("delete snapshot"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Database;

    fn db() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(&dir.path().join("metadata.db"), MIGRATIONS).unwrap();
        (dir, db)
    }

    fn info(key: &str, parent: &str, kind: Kind) -> Info {
        let now = Utc::now();
        Info {
            name: key.into(),
            parent: parent.into(),
            kind,
            created: now,
            updated: now,
            labels: [("a".to_string(), "1".to_string())].into(),
        }
    }

    #[test]
    fn rows_round_trip_with_exact_timestamps() {
        let (_d, db) = db();
        db.call_blocking("t", |c| {
            let i = info("k", "", Kind::Active);
            let id = insert(c, &i).unwrap();
            let r = require(c, "k").unwrap();
            assert_eq!(r.id, id);
            assert_eq!(r.info, i);
            assert!(matches!(
                require(c, "nope"),
                Err(SnapshotError::NotFound { .. })
            ));
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn commit_keeps_the_id_and_replaces_labels() {
        let (_d, db) = db();
        db.call_blocking("t", |c| {
            let id = insert(c, &info("k", "", Kind::Active)).unwrap();
            let now = Utc::now();
            let labels: Labels = [("c".to_string(), "2".to_string())].into();
            commit(
                c,
                id,
                "n",
                &labels,
                now,
                Usage {
                    size: 4096,
                    inodes: 1,
                },
            )
            .unwrap();
            assert!(get(c, "k").unwrap().is_none());
            let r = require(c, "n").unwrap();
            assert_eq!(
                (r.id, r.info.kind, r.info.labels.clone()),
                (id, Kind::Committed, labels)
            );
            assert_eq!((r.info.created, r.info.updated), (now, now));
            assert_eq!(
                r.usage,
                Usage {
                    size: 4096,
                    inodes: 1
                }
            );
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn chain_is_nearest_first_and_ids_are_never_reused() {
        let (_d, db) = db();
        db.call_blocking("t", |c| {
            let a = insert(c, &info("a", "", Kind::Committed)).unwrap();
            let b = insert(c, &info("b", "a", Kind::Committed)).unwrap();
            let x = insert(c, &info("x", "b", Kind::Active)).unwrap();
            let ids_of = |k: &str| {
                chain(c, k)
                    .unwrap()
                    .into_iter()
                    .map(|(id, _)| id)
                    .collect::<Vec<_>>()
            };
            assert_eq!(ids_of("x"), vec![x, b, a]);
            assert_eq!(ids_of("a"), vec![a]);
            assert!(ids_of("nope").is_empty());
            assert_eq!(chain(c, "x").unwrap()[1].1, "b");
            assert!(has_children(c, "a").unwrap());
            assert!(!has_children(c, "x").unwrap());
            assert_eq!(committed_children(c, "a").unwrap().len(), 1);
            delete(c, x).unwrap();
            let y = insert(c, &info("y", "b", Kind::View)).unwrap();
            assert!(y > x, "AUTOINCREMENT must not hand out {x} again");
            assert_eq!(ids(c).unwrap(), [a, b, y].into());
            assert_eq!(
                all(c).unwrap().iter().map(|r| r.id).collect::<Vec<_>>(),
                vec![a, b, y]
            );
            Ok(())
        })
        .unwrap();
    }
}
