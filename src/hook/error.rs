//! Errors of the poststop hook, split by who is at fault: the invocation (exit 2) or the
//! runtime around it (logged, exit 0, so `runc delete` never fails because of us).

use std::path::PathBuf;

use super::wire::WireError;

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    // --- malformed invocation ---
    #[error("cannot read the OCI state from stdin")]
    ReadState(#[source] std::io::Error),
    #[error("OCI state on stdin exceeds {limit} bytes")]
    StateTooLarge { limit: u64 },
    #[error("empty OCI state on stdin")]
    EmptyState,
    #[error("OCI state on stdin is not valid JSON")]
    StateJson(#[source] serde_json::Error),
    #[error("OCI state on stdin: `{field}` {reason}")]
    StateField {
        field: &'static str,
        reason: &'static str,
    },

    // --- runtime problems ---
    #[error("cannot reach the zlayer-storage daemon at {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no connection to the zlayer-storage daemon at {socket} within {timeout_ms} ms")]
    ConnectTimeout { socket: PathBuf, timeout_ms: u128 },
    #[error("cannot send the flush request to {socket}")]
    Send {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the answer from {socket}")]
    Receive {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from {socket} within {timeout_ms} ms")]
    AnswerTimeout { socket: PathBuf, timeout_ms: u128 },
    #[error("{socket} closed the connection without answering")]
    NoAnswer { socket: PathBuf },
    #[error("unreadable answer from {socket}")]
    BadAnswer {
        socket: PathBuf,
        #[source]
        source: WireError,
    },
}

impl HookError {
    /// The caller got the invocation wrong (exit 2); every other error is the runtime's.
    #[must_use]
    pub fn is_invocation_error(&self) -> bool {
        matches!(
            self,
            HookError::ReadState(_)
                | HookError::StateTooLarge { .. }
                | HookError::EmptyState
                | HookError::StateJson(_)
                | HookError::StateField { .. }
        )
    }
}

pub type Result<T> = std::result::Result<T, HookError>;
