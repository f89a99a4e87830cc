//! Errors of the archive codec. Every variant names the path, archive or tar entry involved.

use std::io;
use std::path::PathBuf;

/// Errors from packing, unpacking, copying and fingerprinting upper dirs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    /// A filesystem call on the source tree or the spool failed.
    #[error("failed to {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The upper dir holds overlay state that cannot be restored over another lower.
    #[error(
        "refusing to archive {path}: it carries {xattr} (metacopy/redirect uppers are not portable)"
    )]
    NotPortable { path: PathBuf, xattr: String },

    /// An overlay-private xattr whose meaning this codec does not know.
    #[error("refusing to archive {path}: unsupported overlay xattr {xattr}")]
    UnknownOverlayXattr { path: PathBuf, xattr: String },

    /// A real file whose name collides with the whiteout naming scheme.
    #[error("refusing to archive {path}: names starting with .wh. are reserved for whiteouts")]
    ReservedName { path: PathBuf },

    /// A saved tree index failed its checksum or does not parse.
    #[error("tree index {path} is damaged")]
    DamagedIndex { path: PathBuf },

    /// A file shrank while it was being archived.
    #[error("file {path} changed while it was being archived")]
    FileChanged { path: PathBuf },

    /// zstd compression failed.
    #[error("failed to compress into {path}")]
    Compress {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The expected digest is not a sha256 hex string.
    #[error("invalid sha256 digest {digest:?}")]
    InvalidDigest { digest: String },

    /// The archive's sha256 is not the one expected.
    #[error("archive {archive} has sha256 {actual}, expected {expected}")]
    DigestMismatch {
        archive: PathBuf,
        expected: String,
        actual: String,
    },

    /// zstd decompression failed.
    #[error("failed to decompress {archive}")]
    Decompress {
        archive: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The archive expands beyond the configured size cap.
    #[error("archive {archive} expands beyond the {limit} byte cap")]
    TooLarge { archive: PathBuf, limit: u64 },

    /// The archive expands beyond the configured ratio cap (zstd bomb guard).
    #[error("archive {archive} expands more than {ratio}x its compressed size")]
    RatioExceeded { archive: PathBuf, ratio: u64 },

    /// The tar stream ends early (inside an entry or without an end-of-archive marker).
    #[error("archive {archive} is truncated")]
    Truncated { archive: PathBuf },

    /// Non-zero bytes after the end-of-archive marker.
    #[error("archive {archive} has data after its end-of-archive marker")]
    TrailingData { archive: PathBuf },

    /// The tar stream is malformed (bad checksum, bad numeric field, bad PAX record).
    #[error("archive {archive} is malformed near entry {entry:?}")]
    Malformed {
        archive: PathBuf,
        entry: String,
        #[source]
        source: io::Error,
    },

    /// A PAX or GNU long-name header above the size cap.
    #[error("entry {entry:?}: extension header of {size} bytes exceeds the {limit} byte cap")]
    HeaderTooLarge {
        entry: String,
        size: u64,
        limit: u64,
    },

    /// A path with `..`, an absolute path, or an empty name.
    #[error("entry {entry:?} has an unsafe path: {reason}")]
    UnsafePath { entry: String, reason: &'static str },

    /// An entry's parent resolves through a symlink (or outside the target).
    #[error("entry {entry:?} resolves through a symlink or outside the target")]
    EscapesTarget { entry: String },

    /// An entry's parent directory does not exist (or is not a directory).
    #[error("entry {entry:?} has no parent directory in the archive")]
    MissingParent { entry: String },

    /// Two entries for the same path (a whiteout and a file of the same name count too).
    #[error("entry {entry:?} appears twice")]
    DuplicateEntry { entry: String },

    /// A hard link to a path not (yet) extracted, or to something that cannot be linked.
    #[error(
        "hard link {entry:?} points to {target:?}, which is not an earlier file in the archive"
    )]
    BadLinkTarget { entry: String, target: String },

    /// A whiteout with an empty, `.` or `..` name, or an unknown `.wh..wh.` marker.
    #[error("entry {entry:?} is not a valid whiteout name")]
    BadWhiteout { entry: String },

    /// A delta removal entry in a full archive: only a forged or misfiled archive has one.
    #[error("entry {entry:?} is a delta removal, which a full archive cannot carry")]
    RemovalInFullArchive { entry: String },

    /// A delta removes a path the tree it applies to does not have: the chain does not fit
    /// its base, so it is corrupt.
    #[error("delta entry {entry:?} removes a path that does not exist")]
    NothingToRemove { entry: String },

    /// A removal entry that is not an empty regular entry naming a plain, non-root path.
    #[error("delta entry {entry:?} is not a valid removal: {reason}")]
    BadRemoval { entry: String, reason: &'static str },

    /// A layer chain without a base archive.
    #[error("restore of {target}: a layer chain needs at least a base archive")]
    EmptyChain { target: PathBuf },

    /// A device node other than a 0/0 whiteout while devices are not allowed.
    #[error("entry {entry:?} is a device node and devices are not allowed")]
    DeviceNotAllowed { entry: String },

    /// An xattr outside the portable allowlist, e.g. an overlay-private one.
    #[error("entry {entry:?} carries forbidden xattr {xattr:?}")]
    ForbiddenXattr { entry: String, xattr: String },

    /// An entry type or header feature this codec does not accept.
    #[error("entry {entry:?} uses unsupported {what}")]
    Unsupported { entry: String, what: String },

    /// Creating an entry or restoring its metadata failed.
    #[error("failed to {op} for entry {entry:?}")]
    Extract {
        op: &'static str,
        entry: String,
        #[source]
        source: io::Error,
    },

    /// The restore target is an existing non-empty directory.
    #[error("restore target {target} exists and is not empty")]
    TargetNotEmpty { target: PathBuf },

    /// The restore target exists and is not a directory.
    #[error("restore target {target} exists and is not a directory")]
    TargetNotDir { target: PathBuf },

    /// The restore target has no usable parent/name.
    #[error("restore target {target} is not a valid path")]
    BadTarget { target: PathBuf },

    /// Moving the staging dir into place failed.
    #[error("failed to swap staging dir into {target}")]
    Swap {
        target: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The in-process tar producer of `copy_tree` died.
    #[error("tar producer thread for {src} panicked")]
    ProducerPanicked { src: PathBuf },

    /// An error occurred and removing the staging dir afterwards failed too.
    #[error("failed to remove staging dir {staging} ({cleanup}) after an error")]
    Cleanup {
        staging: PathBuf,
        cleanup: io::Error,
        #[source]
        source: Box<ArchiveError>,
    },
}

/// Result alias of the archive module.
pub type Result<T, E = ArchiveError> = std::result::Result<T, E>;

/// Builds an [`ArchiveError::Io`] mapper for `map_err`.
pub(crate) fn io_err(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> ArchiveError {
    let path = path.into();
    move |source| ArchiveError::Io { op, path, source }
}

/// Builds an [`ArchiveError::Extract`] mapper for `map_err`, accepting rustix or std errors.
pub(crate) fn extract_err<'a, E: Into<io::Error>>(
    op: &'static str,
    entry: &'a str,
) -> impl FnOnce(E) -> ArchiveError + use<'a, E> {
    move |source| ArchiveError::Extract {
        op,
        entry: entry.to_owned(),
        source: source.into(),
    }
}
