//! SQLite replication: a database's WAL shipped to the store as whole transactions, restored
//! (latest or as of any commit) on another node.
//!
//! - [`wal`]: reading the WAL file itself, bounded by what SQLite published.
//! - [`segment`]: the stored form of a run of transactions, verified as it is read.
//! - [`source`]: the live database, read under a pin, checkpointed, snapshotted.
//! - [`manifest`]: what the store holds for a database (never LISTed).
//! - [`cache`]: the local state and the outbox of items the store does not have yet.
//! - [`apply`]: a restored database built page by page, checked, and put in place atomically.

pub mod apply;
pub mod cache;
pub mod control;
pub mod engine;
mod handle;
pub mod journal;
pub mod manifest;
pub mod pagemap;
pub mod restore;
pub mod segment;
pub mod ship;
pub mod source;
pub mod wal;

pub use handle::{
    ReplicatorError, ReplicatorOptions, ReplicatorStatus, SqliteReplicator, SqliteReplicatorConfig,
};

/// The error with its causes, on one line (for status and the socket's answers).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Wall-clock time as unix nanoseconds (commit times, status).
pub(crate) fn now_unix_ns() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}
