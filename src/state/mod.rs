//! SQLite state: sync state per identity, the multipart upload journal, and a reusable
//! [`Database`] with versioned migrations for other modules' own databases.
//!
//! Every change that resume depends on is committed (WAL, `synchronous=FULL`) before the action
//! it describes is started, so a crash or power loss leaves a journal that is never behind S3.

mod db;
mod layer;

use std::path::PathBuf;

pub use db::{Database, Migration};
pub use layer::{LAYER_MIGRATIONS, StateDb, SyncRecord};

/// Errors of the state databases; each names the database file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create or restrict (0600) state database file {path}")]
    Permissions {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open state database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "state database {path} has schema version {found}, newer than this build supports ({supported}); \
         upgrade zlayer-storage or point it at another file"
    )]
    TooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "state database {path} belongs to another schema: migration {version} is {found:?}, expected {expected:?}"
    )]
    ForeignSchema {
        path: PathBuf,
        version: u32,
        expected: &'static str,
        found: Option<String>,
    },
    #[error("migration {version} ({name}) of state database {path} failed")]
    Migration {
        path: PathBuf,
        version: u32,
        name: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot {op} in state database {path}")]
    Query {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("a previous operation on state database {path} panicked")]
    Poisoned { path: PathBuf },
    #[error("state database task for {path} failed")]
    Task {
        path: PathBuf,
        #[source]
        source: tokio::task::JoinError,
    },
}

type Result<T> = std::result::Result<T, StateError>;
