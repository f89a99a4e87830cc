//! Container layer identity and synchronisation: [`LayerSyncManager`] archives an upper dir,
//! uploads it content-addressed, and keeps a per-identity manifest in the bucket so any node
//! can restore the identity's current layer. Its journal in the state database ([`StateDb`])
//! keeps each identity's sync state and the multipart upload journal the stores resume from.

#[cfg(test)]
mod chain_tests;
mod checkpoint;
#[cfg(test)]
mod checkpoint_tests;
mod collect;
mod error;
mod history;
#[cfg(test)]
mod history_tests;
mod journal;
mod manager;
pub mod manifest;
mod options;
mod recovery;
mod restore;
mod spool;
mod stream;
mod sync;
#[cfg(test)]
pub(crate) mod testenv;
#[cfg(test)]
mod tests;
/// The shared types, at their original path (they live in the leaf module `crate::types`).
pub mod types {
    pub use crate::types::{
        CompletedPart, ContainerLayerId, LayerSnapshot, PendingUpload, SyncState,
    };
}

pub use checkpoint::{CheckpointOptions, CheckpointOutcome, Paused, Quiesce};
pub use error::{LayerError, QuiesceError};
pub use history::{Forgotten, IdentitySummary, RollbackOutcome};
pub use journal::{LAYER_MIGRATIONS, StateDb, SyncRecord};
pub use manager::{LayerSyncManager, TAR_FORMAT, TAR_FORMAT_VERSION, zstd_library_version};
pub use manifest::{ArchiveFormat, LayerManifest, LayerMeta, ManifestEntry, VersionSelector};
pub use options::{
    GcOptions, GcReport, LayerProgress, Phase, ProgressEvent, RestoreOptions, SyncOptions,
    SyncOutcome, UploadSummary,
};
