//! SQLite state: a [`Database`] handle with versioned [`Migration`]s, opened in WAL mode with
//! `synchronous=FULL` so a committed transaction survives power loss. It knows no schema of its
//! own: each user brings its tables (the layer journal in `crate::layer`, the snapshotter's
//! metadata) as migrations.

mod db;
#[cfg(test)]
pub(crate) mod powercut;

use std::path::PathBuf;

pub use db::{Database, Migration};

/// Errors of the state databases; each names the database file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path}")]
    CreateDir {
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
