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
pub mod manifest;
pub mod restore;
pub mod segment;
pub mod source;
pub mod wal;
