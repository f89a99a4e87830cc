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
//! - [`events`] watches containerd's task events and flushes containers whose task stopped.
//! - [`key::BackendKey`] parses the `<namespace>/<seq>/<name>` keys containerd sends, the only
//!   reliable identity of a snapshot.

pub mod containers;
pub mod core;
pub mod error;
pub mod events;
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

#[cfg(test)]
mod layering_tests {
    /// The core knows persistence only through [`super::hooks`]: neither its error type nor
    /// its schema nor any of its files may name the plug-in, so the core can be read, tested
    /// and used (as a plain overlay snapshotter) alone.
    #[test]
    fn the_core_does_not_depend_on_the_persistence_plug_in() {
        let core_files = [
            ("core.rs", include_str!("core.rs")),
            ("error.rs", include_str!("error.rs")),
            ("hooks.rs", include_str!("hooks.rs")),
            ("meta.rs", include_str!("meta.rs")),
            ("service.rs", include_str!("service.rs")),
            ("server.rs", include_str!("server.rs")),
            ("fsops.rs", include_str!("fsops.rs")),
            ("mounts.rs", include_str!("mounts.rs")),
            ("filter.rs", include_str!("filter.rs")),
            ("key.rs", include_str!("key.rs")),
            ("types.rs", include_str!("types.rs")),
        ];
        for (name, text) in core_files {
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                assert!(
                    !code.contains("persist::") && !code.contains("PersistError"),
                    "src/snapshotter/{name}:{} names the persistence plug-in: {line}",
                    n + 1
                );
            }
        }
    }
}
