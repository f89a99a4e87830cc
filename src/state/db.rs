//! A reusable SQLite handle: durable pragmas, ordered migrations, one writer.
//!
//! Every database of the crate (layer state, snapshotter metadata) opens through [`Database::open`]
//! with its own append-only list of [`Migration`]s. The schema version lives in `PRAGMA
//! user_version`; `schema_migrations` keeps the names of applied steps so that opening a file with
//! the wrong migration list (say, the snapshotter's DB as layer state) fails instead of corrupting it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::{Result, StateError};

/// How long a statement waits for another process holding the write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// One schema step. Steps are applied in list order; version `n` is the `n`-th entry (1-based).
/// Never edit or reorder a released step: append a new one.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Short stable name, recorded in `schema_migrations` and checked on every open.
    pub name: &'static str,
    /// SQL executed as a batch inside the step's transaction.
    pub sql: &'static str,
}

/// A SQLite database with one connection guarded by a mutex: the single writer.
///
/// Clones share the connection. Async callers use [`Database::call`], which runs the closure on
/// the blocking pool; synchronous callers (the OCI hook, tests) use [`Database::call_blocking`].
#[derive(Debug, Clone)]
pub struct Database {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl Database {
    /// Opens (creating if needed) the database at `path` and applies pending migrations.
    ///
    /// Blocking; from async code use [`Database::open_async`]. Refuses a file whose schema is
    /// newer than `migrations` or whose applied steps carry other names.
    pub fn open(path: &Path, migrations: &'static [Migration]) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StateError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let mut conn = Connection::open(path).map_err(|source| StateError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        configure(&conn).map_err(|source| StateError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        migrate(&mut conn, path, migrations)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                conn: Mutex::new(conn),
            }),
        })
    }

    /// [`Database::open`] on the blocking pool.
    pub async fn open_async(path: &Path, migrations: &'static [Migration]) -> Result<Self> {
        let owned = path.to_path_buf();
        tokio::task::spawn_blocking(move || Self::open(&owned, migrations))
            .await
            .map_err(|source| StateError::Task {
                path: path.to_path_buf(),
                source,
            })?
    }

    /// [`Database::open`] through the SQLite VFS `vfs` (tests: a power-cut simulation), with
    /// the same pragmas and migrations; the directory must exist.
    #[cfg(test)]
    pub(crate) fn open_with_vfs(
        path: &Path,
        migrations: &'static [Migration],
        vfs: &str,
    ) -> Result<Self> {
        let open_err = |source| StateError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut conn =
            Connection::open_with_flags_and_vfs(path, rusqlite::OpenFlags::default(), vfs)
                .map_err(open_err)?;
        configure(&conn).map_err(open_err)?;
        migrate(&mut conn, path, migrations)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                conn: Mutex::new(conn),
            }),
        })
    }

    /// The database file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The schema version currently applied (number of migrations).
    pub fn schema_version(&self) -> Result<u32> {
        self.call_blocking("read schema version", |c| user_version(c))
    }

    /// Runs `f` with the connection on the current thread; `op` names the work in errors.
    pub fn call_blocking<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let mut conn = self.inner.conn.lock().map_err(|_| StateError::Poisoned {
            path: self.inner.path.clone(),
        })?;
        f(&mut conn).map_err(|source| StateError::Query {
            path: self.inner.path.clone(),
            op,
            source,
        })
    }

    /// Runs `f` with the connection on the blocking pool; `op` names the work in errors.
    pub async fn call<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.call_blocking(op, f))
            .await
            .map_err(|source| StateError::Task {
                path: self.inner.path.clone(),
                source,
            })?
    }
}

/// Durability first: resume state must survive power loss, so WAL with `synchronous=FULL`.
fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(%mode, "sqlite refused WAL journal mode");
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    Ok(())
}

fn user_version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
}

fn migrate(conn: &mut Connection, path: &Path, migrations: &'static [Migration]) -> Result<()> {
    let query_err = |op: &'static str| {
        move |source| StateError::Query {
            path: path.to_path_buf(),
            op,
            source,
        }
    };
    let supported = u32::try_from(migrations.len()).unwrap_or(u32::MAX);
    loop {
        // IMMEDIATE takes the write lock up front, so two processes opening a fresh file at
        // once serialise here instead of both applying the same step.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(query_err("begin migration"))?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version INTEGER PRIMARY KEY,
                name TEXT NOT NULL,
                applied_at TEXT NOT NULL
            )",
        )
        .map_err(query_err("create schema_migrations"))?;
        let current = user_version(&tx).map_err(query_err("read schema version"))?;
        if current > supported {
            return Err(StateError::TooNew {
                path: path.to_path_buf(),
                found: current,
                supported,
            });
        }
        check_applied_names(&tx, path, migrations, current)?;
        if current == supported {
            tx.commit().map_err(query_err("commit"))?;
            return Ok(());
        }
        let version = current + 1;
        let step = migrations[current as usize];
        tx.execute_batch(step.sql)
            .map_err(|source| StateError::Migration {
                path: path.to_path_buf(),
                version,
                name: step.name,
                source,
            })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            rusqlite::params![version, step.name, chrono::Utc::now().to_rfc3339()],
        )
        .map_err(query_err("record migration"))?;
        tx.pragma_update(None, "user_version", version)
            .map_err(query_err("write schema version"))?;
        tx.commit().map_err(query_err("commit migration"))?;
        tracing::debug!(path = %path.display(), version, name = step.name, "applied migration");
    }
}

fn check_applied_names(
    conn: &Connection,
    path: &Path,
    migrations: &'static [Migration],
    current: u32,
) -> Result<()> {
    for (idx, step) in migrations.iter().take(current as usize).enumerate() {
        let version = idx as u32 + 1;
        let name: Option<String> = conn
            .query_row(
                "SELECT name FROM schema_migrations WHERE version = ?1",
                [version],
                |r| r.get(0),
            )
            .optional()
            .map_err(|source| StateError::Query {
                path: path.to_path_buf(),
                op: "read schema_migrations",
                source,
            })?;
        if name.as_deref() != Some(step.name) {
            return Err(StateError::ForeignSchema {
                path: path.to_path_buf(),
                version,
                expected: step.name,
                found: name,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    static V1: &[Migration] = &[Migration {
        name: "create t",
        sql: "CREATE TABLE t (x INTEGER NOT NULL)",
    }];
    static V2: &[Migration] = &[
        Migration {
            name: "create t",
            sql: "CREATE TABLE t (x INTEGER NOT NULL)",
        },
        Migration {
            name: "add y",
            sql: "ALTER TABLE t ADD COLUMN y TEXT",
        },
    ];
    static OTHER: &[Migration] = &[Migration {
        name: "create u",
        sql: "CREATE TABLE u (x INTEGER)",
    }];
    static BROKEN: &[Migration] = &[
        Migration {
            name: "create t",
            sql: "CREATE TABLE t (x INTEGER NOT NULL)",
        },
        Migration {
            name: "bad",
            sql: "ALTER TABLE t ADD COLUMN z TEXT; THIS IS NOT SQL",
        },
    ];

    #[test]
    fn migrates_from_empty_and_reopens_idempotently() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/db.sqlite");
        let db = Database::open(&path, V2).unwrap();
        assert_eq!(db.schema_version().unwrap(), 2);
        db.call_blocking("insert", |c| {
            c.execute("INSERT INTO t (x, y) VALUES (1, 'a')", [])
        })
        .unwrap();
        drop(db);
        let db = Database::open(&path, V2).unwrap();
        assert_eq!(db.schema_version().unwrap(), 2);
        let n: i64 = db
            .call_blocking("count", |c| {
                c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            })
            .unwrap();
        assert_eq!(n, 1);
        let (mode, sync, fk): (String, i64, i64) = db
            .call_blocking("pragmas", |c| {
                Ok((
                    c.pragma_query_value(None, "journal_mode", |r| r.get(0))?,
                    c.pragma_query_value(None, "synchronous", |r| r.get(0))?,
                    c.pragma_query_value(None, "foreign_keys", |r| r.get(0))?,
                ))
            })
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(sync, 2, "synchronous=FULL");
        assert_eq!(fk, 1);
    }

    #[test]
    fn upgrades_an_older_schema_step_by_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        Database::open(&path, V1)
            .unwrap()
            .call_blocking("insert", |c| c.execute("INSERT INTO t (x) VALUES (7)", []))
            .unwrap();
        let db = Database::open(&path, V2).unwrap();
        assert_eq!(db.schema_version().unwrap(), 2);
        let y: Option<String> = db
            .call_blocking("read", |c| {
                c.query_row("SELECT y FROM t WHERE x = 7", [], |r| r.get(0))
            })
            .unwrap();
        assert_eq!(y, None);
    }

    #[test]
    fn refuses_a_newer_schema_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        drop(Database::open(&path, V2).unwrap());
        let err = Database::open(&path, V1).unwrap_err();
        assert!(
            matches!(
                err,
                StateError::TooNew {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn refuses_a_database_of_another_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        drop(Database::open(&path, OTHER).unwrap());
        let err = Database::open(&path, V2).unwrap_err();
        assert!(
            matches!(err, StateError::ForeignSchema { version: 1, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn a_failing_step_is_rolled_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let err = Database::open(&path, BROKEN).unwrap_err();
        assert!(
            matches!(
                err,
                StateError::Migration {
                    version: 2,
                    name: "bad",
                    ..
                }
            ),
            "{err:?}"
        );
        // Step 1 stays applied; step 2's ALTER did not survive its failed transaction.
        let db = Database::open(&path, V1).unwrap();
        assert_eq!(db.schema_version().unwrap(), 1);
        let cols: Vec<String> = db
            .call_blocking("columns", |c| {
                let mut st = c.prepare("SELECT name FROM pragma_table_info('t')")?;
                st.query_map([], |r| r.get(0))?.collect()
            })
            .unwrap();
        assert_eq!(cols, vec!["x".to_string()]);
    }

    #[tokio::test]
    async fn async_calls_run_on_the_blocking_pool() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open_async(&dir.path().join("db.sqlite"), V1)
            .await
            .unwrap();
        db.call("insert", |c| c.execute("INSERT INTO t (x) VALUES (1)", []))
            .await
            .unwrap();
        let err = db
            .call("bad", |c| c.execute("INSERT INTO nope VALUES (1)", []))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StateError::Query { op: "bad", .. }),
            "{err:?}"
        );
    }
}
