//! The containerd proxy snapshotter: a faithful overlayfs snapshotter served over gRPC.
//!
//! - [`core::Snapshotter`] implements containerd's overlay semantics (kinds, parent chains,
//!   mounts, commit-by-rename, asynchronous removal) over SQLite metadata; it never sees
//!   protobuf types.
//! - [`service`] adapts the generated `containerd.services.snapshots.v1.Snapshots` server to it;
//!   [`server`] binds the unix socket and serves until a shutdown signal.
//! - [`error::SnapshotError`] is the only error type, converted to a gRPC status in one place.
//! - [`hooks`] is the persistence seam (see its docs for when each hook runs and what it may do);
//!   the default [`hooks::NoPersistence`] behaves exactly like containerd's snapshotter.
//! - [`persist::Persistence`] is the hooks implementation that keeps identified containers'
//!   upper dirs in the object store; [`containers`] looks up container records in containerd.
//! - [`key::BackendKey`] parses the `<namespace>/<seq>/<name>` keys containerd sends, the only
//!   reliable identity of a snapshot.

pub mod containers;
pub mod core;
pub mod error;
pub mod filter;
mod fsops;
pub mod hooks;
pub mod key;
pub mod meta;
pub mod mounts;
pub mod persist;
pub mod server;
pub mod service;
pub mod types;

pub use self::core::{SNAPSHOT_REF_LABEL, Snapshotter};
pub use error::SnapshotError;
pub use hooks::{NoPersistence, PersistenceHooks, RemoveDisposition};
pub use key::BackendKey;
pub use types::{Info, Kind, Labels, Mount, Usage};
