//! Errors of the layer sync manager; each names the identity, key or path it concerns.

use std::path::PathBuf;

use super::manifest::{LayerManifest, VersionSelector};
use super::types::ContainerLayerId;
use crate::archive::ArchiveError;
use crate::state::StateError;
use crate::store::StoreError;

/// Errors from syncing or restoring a layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayerError {
    #[error("invalid layer storage configuration")]
    Config(#[source] Box<crate::config::ConfigError>),
    #[error("cannot open the object store")]
    OpenStore(#[source] Box<StoreError>),
    #[error("cannot open the state database {path}")]
    OpenState {
        path: PathBuf,
        #[source]
        source: Box<StateError>,
    },
    #[error("state database operation failed for {id}")]
    State {
        id: ContainerLayerId,
        #[source]
        source: Box<StateError>,
    },
    #[error("state database operation failed")]
    StateGlobal(#[source] Box<StateError>),
    #[error("cannot fingerprint upper dir {path} of {id}")]
    Fingerprint {
        id: ContainerLayerId,
        path: PathBuf,
        #[source]
        source: Box<ArchiveError>,
    },
    #[error("cannot pack upper dir {path} of {id}")]
    Pack {
        id: ContainerLayerId,
        path: PathBuf,
        #[source]
        source: Box<ArchiveError>,
    },
    #[error("cannot unpack {key} of {id} into {path}")]
    Unpack {
        id: ContainerLayerId,
        key: String,
        path: PathBuf,
        #[source]
        source: Box<ArchiveError>,
    },
    #[error("object store operation on {key} failed")]
    Store {
        key: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error("manifest {key} is not valid JSON")]
    BadManifest {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "manifest {key} has format version {found}; this zlayer-storage reads up to {supported} (upgrade it)"
    )]
    ManifestTooNew {
        key: String,
        found: u32,
        supported: u32,
    },
    #[error("manifest {key} belongs to {found}, not {id}")]
    ManifestIdentity {
        key: String,
        id: ContainerLayerId,
        found: ContainerLayerId,
    },
    #[error(
        "manifest {key} kept changing under concurrent writers; gave up after {attempts} attempts"
    )]
    ManifestContention { key: String, attempts: u32 },
    #[error("{id} has no {which} in the store (versions kept: {kept})")]
    NoSuchVersion {
        id: ContainerLayerId,
        which: VersionSelector,
        /// The versions the manifest has, e.g. `seq 7 (2025-01-02T03:04:05Z), seq 5 (...)`.
        kept: String,
    },
    #[error("{id} has no manifest in the store")]
    NoManifest { id: ContainerLayerId },
    #[error("blob {key} of {id} (seq {seq}) is missing from the store")]
    MissingBlob {
        id: ContainerLayerId,
        key: String,
        seq: u64,
    },
    #[error("manifest {key} holds {found}, whose manifest key is {expected}")]
    ManifestKey {
        key: String,
        found: ContainerLayerId,
        expected: String,
    },
    #[error("cannot serialise {what}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("i/o error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("background task failed")]
    Join(#[source] tokio::task::JoinError),
    #[error("cannot pause the writers of {id} for a checkpoint")]
    Quiesce {
        id: ContainerLayerId,
        #[source]
        source: QuiesceError,
    },
    #[error(
        "checkpoint of {id}: the frozen pass over {path} did not finish within the {budget_ms} ms pause budget; resumed the writers, nothing published"
    )]
    PauseBudget {
        id: ContainerLayerId,
        path: PathBuf,
        budget_ms: u64,
    },
    #[error("cannot resume the writers of {id} after a checkpoint")]
    Resume {
        id: ContainerLayerId,
        #[source]
        source: QuiesceError,
    },
}

/// What a [`crate::layer::Quiesce`] implementation reports (the freezer, containerd, ...).
pub type QuiesceError = Box<dyn std::error::Error + Send + Sync>;

pub type Result<T> = std::result::Result<T, LayerError>;

impl LayerError {
    /// [`LayerError::NoSuchVersion`] listing what `manifest` does have.
    pub(crate) fn no_such_version(manifest: &LayerManifest, which: VersionSelector) -> Self {
        let kept = manifest
            .versions()
            .map(|e| {
                format!(
                    "seq {} ({})",
                    e.seq,
                    e.created_at
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        Self::NoSuchVersion {
            id: manifest.identity.clone(),
            which,
            kept,
        }
    }
}

pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> LayerError {
    let path = path.into();
    move |source| LayerError::Io { path, source }
}

pub(crate) fn store(key: impl Into<String>) -> impl FnOnce(StoreError) -> LayerError {
    let key = key.into();
    move |source| LayerError::Store {
        key,
        source: Box::new(source),
    }
}
