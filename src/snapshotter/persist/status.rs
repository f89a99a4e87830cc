//! What the operator CLI (`status`, `gc`) reads from and changes in a snapshotter's root while
//! the daemon may be running: queued layers, dead letters and quarantined outbox entries.
//!
//! The metadata database is opened directly (SQLite WAL allows a second process); `status`
//! opens it read-only and never applies migrations.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use serde::Serialize;

use super::db;
use super::error::{PersistError, Result};
use super::outbox::QUARANTINE;

/// How long a CLI call waits for the daemon's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// One queued layer as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueuedLayer {
    pub outbox_id: i64,
    pub identity: String,
    pub seq: u64,
    pub key: String,
    /// `live` (still a committed snapshot) or `outbox`.
    pub location: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    /// A dead letter: not retried until the next start or `gc`.
    pub dead: bool,
}

/// The persistence state of one snapshotter root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct NodeStatus {
    pub root: PathBuf,
    pub queued: Vec<QueuedLayer>,
    /// Outbox entries that could not be matched to a queued layer, kept for inspection.
    pub quarantined: Vec<PathBuf>,
}

fn metadata_db(root: &Path) -> PathBuf {
    root.join("metadata.db")
}

fn open(root: &Path, flags: OpenFlags) -> Result<Connection> {
    let path = metadata_db(root);
    let conn = Connection::open_with_flags(&path, flags).map_err(|source| PersistError::Db {
        op: "open the snapshotter's metadata database",
        source,
    })?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(PersistError::db("set busy timeout"))?;
    Ok(conn)
}

/// The queued layers and quarantined entries of the snapshotter at `root`; `None` when no
/// snapshotter has used that root.
pub fn node_status(root: &Path) -> Result<Option<NodeStatus>> {
    if !metadata_db(root).exists() {
        return Ok(None);
    }
    let conn = open(root, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let has_outbox: bool = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'persist_outbox'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(PersistError::db("read schema"))?
        > 0;
    let queued = if has_outbox {
        db::outbox_rows(&conn)?
            .into_iter()
            .map(|r| QueuedLayer {
                outbox_id: r.id,
                identity: r.identity.to_string(),
                seq: r.seq,
                key: r.key,
                location: match r.location {
                    db::Location::Live => "live".into(),
                    db::Location::Outbox => "outbox".into(),
                },
                attempts: r.attempts,
                last_error: r.last_error,
                dead: r.dead,
            })
            .collect()
    } else {
        Vec::new()
    };
    let dir = root.join(QUARANTINE);
    let mut quarantined = Vec::new();
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            for entry in entries {
                quarantined.push(
                    entry
                        .map_err(PersistError::io("read directory", &dir))?
                        .path(),
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(PersistError::io("read directory", &dir)(e)),
    }
    quarantined.sort();
    Ok(Some(NodeStatus {
        root: root.to_path_buf(),
        queued,
        quarantined,
    }))
}

/// Makes every dead letter of the snapshotter at `root` due again; the daemon retries them
/// within a minute. Returns how many were revived (0 when the root was never used).
pub fn retry_dead_letters(root: &Path) -> Result<usize> {
    if !metadata_db(root).exists() {
        return Ok(0);
    }
    let conn = open(root, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    db::revive_all(&conn)
}
