//! Errors of the object stores; each names the object (bucket/key or path) it concerns.

use std::path::PathBuf;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of [`super::ObjectStore`] implementations and their upload journals.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A key that is empty, absolute, or has `.`/`..`/empty components or control characters.
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    /// Store configuration that cannot work (missing secret file, part size below the minimum, ...).
    #[error("invalid store configuration: {reason}")]
    Config { reason: String },
    #[error("cannot read secret access key file {path}")]
    ReadSecret {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The secret access key file can be read by group or others.
    #[error(
        "secret access key file {path} has mode {mode:04o}: it must not be readable by group or \
         others (chmod 600 it)"
    )]
    SecretFileTooOpen { path: PathBuf, mode: u32 },
    /// A local filesystem operation failed (local store, spool files, download targets).
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An S3 request failed; `transient` says whether retrying later may help.
    #[error("s3 {op} of {location} failed (status {status:?}, code {code:?})")]
    S3 {
        op: &'static str,
        location: String,
        status: Option<u16>,
        code: Option<String>,
        transient: bool,
        #[source]
        source: BoxError,
    },
    /// A response lacked a field the protocol requires.
    #[error("s3 {op} of {location} returned no {what}")]
    Protocol {
        op: &'static str,
        location: String,
        what: &'static str,
    },
    /// The object to download does not exist.
    #[error("object {location} does not exist")]
    NotFound { location: String },
    /// After an upload or download the sizes disagree.
    #[error("object {location} has {actual} bytes, expected {expected}")]
    SizeMismatch {
        location: String,
        expected: u64,
        actual: u64,
    },
    /// The spool file would need more than S3's 10,000 parts at the configured part size.
    #[error("{path} ({size} bytes) needs more than 10000 parts of {part_size} bytes")]
    TooManyParts {
        path: PathBuf,
        size: u64,
        part_size: u64,
    },
    /// The spool file changed while it was being uploaded.
    #[error("spool file {path} changed during upload")]
    SpoolChanged { path: PathBuf },
    /// Completing a multipart upload kept conflicting with concurrent writers.
    #[error("multipart upload of {location} kept conflicting with concurrent writers")]
    Conflict { location: String },
    /// The upload journal (state database) failed.
    #[error("upload journal failed for object {key:?}")]
    Journal {
        key: String,
        #[source]
        source: BoxError,
    },
    #[error("background task for {location} failed")]
    Task {
        location: String,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl StoreError {
    /// Whether retrying the same operation later may succeed (network, 5xx, throttling).
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            Self::S3 { transient, .. } => *transient,
            Self::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
            ),
            Self::Conflict { .. } => true,
            _ => false,
        }
    }
}

pub(crate) type Result<T> = std::result::Result<T, StoreError>;
