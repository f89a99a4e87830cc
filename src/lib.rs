//! zlayer-storage: persistent container upper layers kept in S3.
//!
//! - [`archive`]: overlay-exact, deterministic PAX+zstd archives of upper dirs, and safe extraction.
//! - [`store`]: object stores (S3 with crash-resumable multipart uploads; a local directory).
//! - [`state`]: the SQLite database handle with versioned migrations (WAL, `synchronous=FULL`).
//! - [`layer`]: [`LayerSyncManager`], which syncs and restores a container identity's layer, and
//!   its journal in the state database ([`layer::StateDb`]).
//! - [`snapshotter`]: the containerd proxy snapshotter.
//! - [`control`]: the daemon's control API (flush, status, list, forget) and the hook's protocol.
//! - [`hook`]: the OCI poststop hook and its line protocol to the daemon.
//! - [`metrics`]: Prometheus metrics and the endpoint serving them.
//! - [`replicator`]: SQLite WAL replication to the store.

pub mod archive;
pub mod config;
pub mod control;
pub mod hook;
pub mod layer;
pub mod metrics;
pub mod proto;
pub mod replicator;
pub mod snapshotter;
pub mod state;
pub mod store;
pub mod sys;
mod types;
mod util;

#[cfg(test)]
mod layout_tests;

pub use config::{Config, LayerStorageConfig, SnapshotterConfig};
pub use layer::LayerSyncManager;
pub use layer::types::{CompletedPart, ContainerLayerId, LayerSnapshot, PendingUpload, SyncState};
pub use replicator::{SqliteReplicator, SqliteReplicatorConfig};
