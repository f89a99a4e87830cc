//! The snapshotter's error type and its one mapping to gRPC status codes.
//!
//! containerd decodes every reply with `errdefs.FromGRPC`, so the code is part of the protocol:
//! `NotFound`, `AlreadyExists`, `FailedPrecondition` (which GC treats as "skip, retry later") and
//! `InvalidArgument` must be exact; anything else reaches containerd as `ErrUnknown`.

use std::path::PathBuf;

use super::types::Kind;

/// Everything the snapshotter core, its metadata store and its hooks can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    #[error("snapshot {key} does not exist")]
    NotFound { key: String },
    #[error("snapshot {key} already exists")]
    AlreadyExists { key: String },
    #[error("target snapshot {target} for {key} already exists as {existing}")]
    TargetExists {
        key: String,
        target: String,
        existing: String,
    },
    #[error("parent snapshot {parent} of {key} does not exist")]
    ParentNotFound { key: String, parent: String },
    #[error("parent snapshot {parent} of {key} is {kind}, not committed")]
    ParentNotCommitted {
        key: String,
        parent: String,
        kind: Kind,
    },
    #[error("cannot remove snapshot {key}: it has children")]
    HasChildren { key: String },
    #[error("snapshot {key} is {kind}, {op} needs an active snapshot")]
    NotActive {
        key: String,
        kind: Kind,
        op: &'static str,
    },
    #[error("snapshot {key} is committed and has no mounts")]
    CommittedHasNoMounts { key: String },
    #[error("snapshot key must not be empty")]
    EmptyKey,
    #[error("cannot update field {path:?} of snapshot {key}: only labels are mutable")]
    ImmutableField { key: String, path: String },
    #[error("label {label:?} of snapshot {key} is too long: key and value exceed 4096 bytes")]
    LabelTooLong { key: String, label: String },
    #[error("invalid filter {filter:?}: {reason}")]
    InvalidFilter { filter: String, reason: String },
    #[error("request is missing {field}")]
    MissingField { field: &'static str },
    #[error("snapshot {key} is temporarily unavailable: {reason}")]
    Unavailable { key: String, reason: String },
    #[error("snapshotter is shutting down")]
    ShuttingDown,
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata database: cannot {op}")]
    Db {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("metadata record of {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("metadata database")]
    State(#[source] crate::state::StateError),
    #[error("snapshotter root {root} is in use by another process")]
    RootInUse { root: PathBuf },
    #[error("snapshotter task failed")]
    Join(#[source] tokio::task::JoinError),
    /// A persistence hook's own error; the hook chose its gRPC code.
    #[error(transparent)]
    Hook(HookFailure),
}

/// An error a [`PersistenceHooks`](super::hooks::PersistenceHooks) implementation fails with.
/// The core does not know the plug-in's error type; the plug-in says which code containerd
/// should see.
pub trait HookError: std::error::Error + Send + Sync + 'static {
    /// The gRPC code containerd gets.
    fn code(&self) -> tonic::Code;
}

/// A boxed [`HookError`], itself an error whose causes are the hook error's causes.
#[derive(Debug)]
pub struct HookFailure(pub Box<dyn HookError>);

impl std::fmt::Display for HookFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for HookFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl SnapshotError {
    /// Wraps a hook's error.
    pub fn hook(e: impl HookError) -> Self {
        Self::Hook(HookFailure(Box::new(e)))
    }
}

/// Result type of the snapshotter module.
pub type Result<T, E = SnapshotError> = std::result::Result<T, E>;

impl SnapshotError {
    /// Builds an [`SnapshotError::Io`] for `path`.
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { op, path, source }
    }

    /// Builds an [`SnapshotError::Db`].
    pub(crate) fn db(op: &'static str) -> impl FnOnce(rusqlite::Error) -> Self {
        move |source| Self::Db { op, source }
    }

    /// The gRPC code containerd expects for this error.
    #[must_use]
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::NotFound { .. } | Self::ParentNotFound { .. } => Code::NotFound,
            Self::AlreadyExists { .. } | Self::TargetExists { .. } => Code::AlreadyExists,
            Self::HasChildren { .. }
            | Self::NotActive { .. }
            | Self::CommittedHasNoMounts { .. } => Code::FailedPrecondition,
            Self::ParentNotCommitted { .. }
            | Self::EmptyKey
            | Self::ImmutableField { .. }
            | Self::LabelTooLong { .. }
            | Self::InvalidFilter { .. }
            | Self::MissingField { .. } => Code::InvalidArgument,
            Self::Unavailable { .. } | Self::ShuttingDown => Code::Unavailable,
            Self::Io { .. }
            | Self::Db { .. }
            | Self::State(_)
            | Self::RootInUse { .. }
            | Self::Corrupt { .. }
            | Self::Join(_) => Code::Internal,
            Self::Hook(e) => e.0.code(),
        }
    }
}

impl SnapshotError {
    /// The error and its causes on one line.
    #[must_use]
    pub fn full_message(&self) -> String {
        crate::util::error_chain(self)
    }
}

impl From<SnapshotError> for tonic::Status {
    fn from(err: SnapshotError) -> Self {
        // The whole chain goes into the message: containerd logs only the status message.
        tonic::Status::new(err.code(), err.full_message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn status(err: SnapshotError) -> tonic::Status {
        err.into()
    }

    #[test]
    fn every_variant_maps_to_the_code_containerd_expects() {
        let k = || "default/1/k".to_string();
        let cases: Vec<(SnapshotError, Code)> = vec![
            (SnapshotError::NotFound { key: k() }, Code::NotFound),
            (
                SnapshotError::ParentNotFound {
                    key: k(),
                    parent: "p".into(),
                },
                Code::NotFound,
            ),
            (
                SnapshotError::AlreadyExists { key: k() },
                Code::AlreadyExists,
            ),
            (
                SnapshotError::TargetExists {
                    key: k(),
                    target: "t".into(),
                    existing: "e".into(),
                },
                Code::AlreadyExists,
            ),
            (
                SnapshotError::ParentNotCommitted {
                    key: k(),
                    parent: "p".into(),
                    kind: Kind::Active,
                },
                Code::InvalidArgument,
            ),
            (
                SnapshotError::HasChildren { key: k() },
                Code::FailedPrecondition,
            ),
            (
                SnapshotError::NotActive {
                    key: k(),
                    kind: Kind::View,
                    op: "commit",
                },
                Code::FailedPrecondition,
            ),
            (
                SnapshotError::CommittedHasNoMounts { key: k() },
                Code::FailedPrecondition,
            ),
            (SnapshotError::EmptyKey, Code::InvalidArgument),
            (
                SnapshotError::ImmutableField {
                    key: k(),
                    path: "parent".into(),
                },
                Code::InvalidArgument,
            ),
            (
                SnapshotError::LabelTooLong {
                    key: k(),
                    label: "l".into(),
                },
                Code::InvalidArgument,
            ),
            (
                SnapshotError::InvalidFilter {
                    filter: "(".into(),
                    reason: "r".into(),
                },
                Code::InvalidArgument,
            ),
            (
                SnapshotError::MissingField { field: "info" },
                Code::InvalidArgument,
            ),
            (
                SnapshotError::Unavailable {
                    key: k(),
                    reason: "r".into(),
                },
                Code::Unavailable,
            ),
            (SnapshotError::ShuttingDown, Code::Unavailable),
            (
                SnapshotError::Io {
                    op: "create",
                    path: "/x".into(),
                    source: std::io::Error::other("disk"),
                },
                Code::Internal,
            ),
            (
                SnapshotError::Corrupt {
                    key: k(),
                    reason: "r".into(),
                },
                Code::Internal,
            ),
        ];
        for (err, code) in cases {
            let text = err.to_string();
            assert_eq!(status(err).code(), code, "{text}");
        }
    }

    #[test]
    fn remove_with_children_mentions_remove() {
        // containerd's testsuite checks the error text for "remove".
        let st = status(SnapshotError::HasChildren { key: "a".into() });
        assert!(st.message().contains("remove"), "{}", st.message());
    }

    #[test]
    fn status_message_carries_the_cause_chain_once() {
        let st = status(SnapshotError::Io {
            op: "create",
            path: "/root/x".into(),
            source: std::io::Error::other("no space left"),
        });
        assert_eq!(st.message(), "cannot create /root/x: no space left");
    }
}
