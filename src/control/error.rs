//! Errors of the control API and the one place they become gRPC codes and hook-line codes.

use crate::hook::wire::ErrorCode;
use crate::snapshotter::persist::PersistError;

/// Everything a control call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("invalid request: {reason}")]
    Invalid { reason: String },
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error("layer store: cannot {op} {identity}")]
    Layer {
        op: &'static str,
        identity: String,
        #[source]
        source: Box<crate::layer::LayerError>,
    },
    #[error("identity {identity} is in use on this node ({reason}); refusing to forget it")]
    InUse { identity: String, reason: String },
}

impl ControlError {
    pub(crate) fn invalid(reason: impl Into<String>) -> Self {
        Self::Invalid {
            reason: reason.into(),
        }
    }

    /// The gRPC code of this error.
    #[must_use]
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::Invalid { .. } => tonic::Code::InvalidArgument,
            Self::Persist(e) => e.code(),
            Self::Layer { .. } => tonic::Code::Unavailable,
            Self::InUse { .. } => tonic::Code::FailedPrecondition,
        }
    }

    /// The hook line protocol's `code` for this error.
    #[must_use]
    pub fn line_code(&self) -> ErrorCode {
        match self.code() {
            tonic::Code::InvalidArgument => ErrorCode::Invalid,
            tonic::Code::NotFound => ErrorCode::NotFound,
            tonic::Code::FailedPrecondition | tonic::Code::Aborted => ErrorCode::FailedPrecondition,
            tonic::Code::Unavailable => ErrorCode::Unavailable,
            tonic::Code::DeadlineExceeded => ErrorCode::Timeout,
            _ => ErrorCode::Internal,
        }
    }
}

impl From<ControlError> for tonic::Status {
    fn from(e: ControlError) -> Self {
        tonic::Status::new(e.code(), crate::util::error_chain(&e))
    }
}
