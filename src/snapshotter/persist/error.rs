//! Errors of the persistence layer and the gRPC code each one means to containerd.

use std::path::PathBuf;

use crate::archive::ArchiveError;
use crate::layer::LayerError;
use crate::layer::types::ContainerLayerId;

/// Everything identity resolution, restore, the outbox and the worker can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PersistError {
    #[error("label {label} of snapshot {key} is {value:?}, not SERVICE/INSTANCE")]
    BadIdentity {
        key: String,
        label: String,
        value: String,
    },
    #[error("identity {identity} is already in use by active snapshot {other}; refusing {key}")]
    DuplicateIdentity {
        identity: ContainerLayerId,
        key: String,
        other: String,
    },
    #[error(
        "layer of {identity} was taken on base {recorded}, but snapshot {key} has base {current} \
         (on_base_change = \"fail\")"
    )]
    BaseChanged {
        identity: ContainerLayerId,
        key: String,
        recorded: String,
        current: String,
    },
    #[error(
        "snapshot {key} ({identity}) has not been restored yet; syncing it would replace the layer"
    )]
    NotRestored {
        key: String,
        identity: ContainerLayerId,
    },
    #[error(
        "identity {identity} is still held by snapshot {other}, whose container is gone but whose \
         removal has not arrived after {secs} s; refusing {key}"
    )]
    PredecessorNotRemoved {
        identity: ContainerLayerId,
        key: String,
        other: String,
        secs: u64,
    },
    #[error(
        "upper dir {path} of snapshot {key} has content although {identity} was never restored \
         into it; refusing to use it (it would start without its layer and replace the stored one)"
    )]
    UpperHasContent {
        key: String,
        identity: ContainerLayerId,
        path: PathBuf,
    },
    #[error("restore of {identity} into snapshot {key} has not finished after {secs} s")]
    RestoreTimeout {
        key: String,
        identity: ContainerLayerId,
        secs: u64,
    },
    #[error("cannot determine the identity of snapshot {key}: containerd cannot be asked")]
    LookupFailed {
        key: String,
        #[source]
        source: Box<crate::snapshotter::containers::LookupError>,
    },
    #[error("snapshot {key} was removed while its layer was being restored")]
    SnapshotGone { key: String },
    #[error(transparent)]
    Shared(std::sync::Arc<PersistError>),
    #[error("nothing to sync for {target}: no persisted active snapshot or queued layer")]
    NothingToSync { target: String },
    #[error("object store unavailable while restoring {identity} into {key}")]
    StoreUnavailable {
        identity: ContainerLayerId,
        key: String,
        #[source]
        source: Box<LayerError>,
    },
    #[error("cannot restore {identity} into {key}")]
    Restore {
        identity: ContainerLayerId,
        key: String,
        #[source]
        source: Box<LayerError>,
    },
    #[error("cannot copy the queued layer of {identity} from {src} into {target}")]
    LocalCopy {
        identity: ContainerLayerId,
        src: PathBuf,
        target: PathBuf,
        #[source]
        source: Box<ArchiveError>,
    },
    #[error("cannot sync {identity} from {path}")]
    Sync {
        identity: ContainerLayerId,
        path: PathBuf,
        #[source]
        source: Box<LayerError>,
    },
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("outbox marker {path} is unreadable")]
    Marker {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("persistence database: cannot {op}")]
    Db {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("persistence database")]
    State(#[source] crate::state::StateError),
    #[error("snapshot metadata")]
    Meta(#[source] Box<crate::snapshotter::SnapshotError>),
    #[error("no persisted snapshot of {target} is held by this node's snapshotter")]
    FlushTargetNotFound { target: String },
    #[error(
        "container {namespace}/{container} is running (task {status}); its upper dir is changing, \
         so a flush would not be crash-consistent (ask with allow_running to flush anyway)"
    )]
    ContainerRunning {
        namespace: String,
        container: String,
        status: String,
    },
    #[error("cannot tell whether container {namespace}/{container} is running")]
    TaskLookupFailed {
        namespace: String,
        container: String,
        #[source]
        source: Box<crate::snapshotter::containers::LookupError>,
    },
    #[error("flush {request} of {identity} failed: {message}")]
    FlushFailed {
        request: i64,
        identity: ContainerLayerId,
        message: String,
    },
    #[error("flush {request} of {identity} is not durable after {secs} s (it goes on){last}")]
    FlushTimeout {
        request: i64,
        identity: ContainerLayerId,
        secs: u64,
        /// `; last error: …` when an attempt failed, else empty.
        last: String,
    },
    #[error("flush request {request} does not exist")]
    NoSuchFlush { request: i64 },
    #[error("persistence is not attached to a snapshotter yet")]
    NotOpen,
    #[error(
        "container {namespace}/{container} has no running task (task {status}); a checkpoint is \
         for running containers — flush a stopped one"
    )]
    NotRunning {
        namespace: String,
        container: String,
        status: String,
    },
    #[error("cannot find the cgroup of container {namespace}/{container} (pid {pid})")]
    Cgroup {
        namespace: String,
        container: String,
        pid: u32,
        #[source]
        source: Box<crate::sys::freezer::FreezerError>,
    },
    #[error("checkpoint of {identity} from {path} failed")]
    Checkpoint {
        identity: ContainerLayerId,
        path: PathBuf,
        #[source]
        source: Box<LayerError>,
    },
    #[error("persistence task failed")]
    Join(#[source] tokio::task::JoinError),
}

/// Result type of the persistence module.
pub type Result<T, E = PersistError> = std::result::Result<T, E>;

impl PersistError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { op, path, source }
    }

    pub(crate) fn db(op: &'static str) -> impl FnOnce(rusqlite::Error) -> Self {
        move |source| Self::Db { op, source }
    }

    /// The gRPC code containerd gets: a refused identity or base is the caller's problem, a
    /// store fault is temporary (containerd retries, the container does not start meanwhile).
    #[must_use]
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::BadIdentity { .. } => Code::InvalidArgument,
            Self::DuplicateIdentity { .. }
            | Self::PredecessorNotRemoved { .. }
            | Self::UpperHasContent { .. }
            | Self::BaseChanged { .. }
            | Self::NotRestored { .. } => Code::FailedPrecondition,
            Self::NothingToSync { .. }
            | Self::SnapshotGone { .. }
            | Self::FlushTargetNotFound { .. }
            | Self::NoSuchFlush { .. } => Code::NotFound,
            Self::ContainerRunning { .. } | Self::NotRunning { .. } => Code::FailedPrecondition,
            Self::TaskLookupFailed { .. } => Code::Unavailable,
            Self::FlushTimeout { .. } => Code::DeadlineExceeded,
            Self::FlushFailed { .. } => Code::Aborted,
            Self::StoreUnavailable { .. }
            | Self::RestoreTimeout { .. }
            | Self::LookupFailed { .. } => Code::Unavailable,
            Self::Shared(e) => e.code(),
            Self::Restore { .. }
            | Self::LocalCopy { .. }
            | Self::Sync { .. }
            | Self::Checkpoint { .. }
            | Self::Cgroup { .. }
            | Self::Io { .. }
            | Self::Marker { .. }
            | Self::Db { .. }
            | Self::State(_)
            | Self::Meta(_)
            | Self::NotOpen
            | Self::Join(_) => Code::Internal,
        }
    }
}

impl PersistError {
    /// Whether this is the store failing (retry without limit) rather than the layer or the
    /// local disk (retry a few times, then keep it as a dead letter).
    #[must_use]
    pub fn is_store_fault(&self) -> bool {
        match self {
            Self::Sync { source, .. }
            | Self::Checkpoint { source, .. }
            | Self::Restore { source, .. }
            | Self::StoreUnavailable { source, .. } => is_store_fault(source),
            Self::Shared(e) => e.is_store_fault(),
            _ => false,
        }
    }
}

impl crate::snapshotter::error::HookError for PersistError {
    fn code(&self) -> tonic::Code {
        PersistError::code(self)
    }
}

/// Store faults (network, throttling, missing objects) as opposed to local or data errors.
pub(crate) fn is_store_fault(e: &LayerError) -> bool {
    matches!(
        e,
        LayerError::Store { .. } | LayerError::ManifestContention { .. }
    )
}
