//! Overlay-exact, deterministic archives of OverlayFS upper dirs, and safe extraction.
//!
//! **Format.** A PAX tar in OCI layer form: deletions (char 0/0 whiteouts) become empty
//! `.wh.<name>` files, opaque dirs get a `.wh..wh..opq` entry, portable xattrs travel as
//! `SCHILY.xattr.*`, overlay's `protattr` under `ZLAYER.overlay.protattr`, hard links as link
//! entries, mtimes with nanoseconds. Entries are sorted by tar path (directories before their
//! contents), carry numeric ids only and no atime/ctime, so one tree always gives the same
//! bytes. The tar is compressed with multithreaded zstd (the output does not depend on the
//! worker count, only on level and libzstd version) and addressed by the sha256 of the
//! compressed bytes.
//!
//! **Refused uppers.** `overlay.metacopy` / `overlay.redirect` (trusted or user namespace)
//! point into a specific lower; restored over another lower they silently serve wrong data, so
//! such uppers are not archived. Unknown overlay-private xattrs are refused for the same reason.
//! Sockets are skipped (listed in [`PackStats::skipped_sockets`]).
//!
//! **Deltas.** An identity's layer may be a chain: a full base plus ordered delta archives in
//! the same format, whose entries replace what is at their path and whose empty entries with
//! `ZLAYER.delta.remove=1` remove it (see [`unpack_chain_files`]); a full archive carrying such
//! an entry is refused.
//!
//! **Extraction.** The compressed file is verified against the expected digest first, then
//! extracted into a fresh staging dir next to the target and swapped in atomically. Every
//! parent is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`
//! and leaves are created with `O_EXCL`-style `*at` calls, so duplicates and escapes fail.
//! Only the portable xattr allowlist is accepted from an archive: an overlay-private xattr
//! (or any other name) in `SCHILY.xattr.*` is **rejected** with
//! [`ArchiveError::ForbiddenXattr`] rather than dropped, because only a forged archive has one.
//! Sparse files are stored with their zeros and restored with holes (runs of 4 KiB zero blocks
//! are skipped), so they stay sparse.

mod copy;
mod decode;
mod delta;
mod delta_apply;
mod error;
mod extract;
mod fingerprint;
mod index;
mod pack;
mod target;
mod tarout;
mod unpack;
mod walk;
mod xattr;

#[cfg(test)]
mod delta_apply_tests;
#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

pub use delta::{DeltaStats, pack_delta_to_file};
pub use error::{ArchiveError, Result};
pub use index::{IndexBuilder, TreeIndex};
pub use unpack::MAX_EXTENSION_HEADER;
pub use xattr::{PROTATTR_PAX_KEY, XATTR_PAX_PREFIX};

/// PAX key of a delta's removal entry: whatever is at the entry's path in the previous version
/// goes (a `.wh.` name would mean an overlay whiteout, which is itself an entry of the upper).
pub const DELTA_REMOVE_PAX_KEY: &str = "ZLAYER.delta.remove";

/// Where overlay keeps its private xattrs on the restored upper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XattrNs {
    /// `trusted.overlay.*` (rootful mounts; needs CAP_SYS_ADMIN to write).
    #[default]
    Trusted,
    /// `user.overlay.*` (mounts with the `userxattr` option, e.g. rootless).
    User,
}

impl XattrNs {
    /// `User` when the overlay mount options include `userxattr`; entries may be single
    /// options or comma-separated lists.
    pub fn from_mount_options(options: &[String]) -> Self {
        let user = options
            .iter()
            .flat_map(|o| o.split(','))
            .any(|o| o.trim() == "userxattr");
        if user {
            XattrNs::User
        } else {
            XattrNs::Trusted
        }
    }

    /// The full xattr name of an overlay attribute, e.g. `trusted.overlay.opaque`.
    pub fn overlay_xattr(self, attr: &str) -> String {
        match self {
            XattrNs::Trusted => format!("trusted.overlay.{attr}"),
            XattrNs::User => format!("user.overlay.{attr}"),
        }
    }
}

/// zstd settings. The output bytes depend on `level` and the libzstd version, not on
/// `workers` (any value ≥ 1 gives the same bytes; 0 is treated as 1 because zstd's
/// single-threaded mode would produce different bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackOptions {
    pub level: i32,
    pub workers: u32,
    /// The tree may change while it is read (a checkpoint's first pass over a running
    /// container): entries that vanish are left out and files that shrink are padded, instead
    /// of failing. The archive is then of no single instant; only what it records in its index
    /// is exact, so a later capture resends whatever moved.
    pub live: bool,
}

impl Default for PackOptions {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        PackOptions {
            level: 3,
            workers: u32::try_from(cpus.clamp(1, 8)).unwrap_or(1),
            live: false,
        }
    }
}

/// Result of [`pack_to_file`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackStats {
    /// Hex sha256 of the compressed file (the content address).
    pub digest: String,
    /// Hex sha256 of the uncompressed tar.
    pub uncompressed_digest: String,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    /// Tar entries written (PAX headers not counted).
    pub entries: u64,
    /// Sockets left out, relative to the upper dir.
    pub skipped_sockets: Vec<PathBuf>,
}

/// Extraction settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackOptions {
    /// Namespace for the opaque and protattr xattrs written on the restored upper.
    pub xattr_ns: XattrNs,
    /// Allow char/block devices other than 0/0 whiteouts.
    pub allow_devices: bool,
    /// Cap on the uncompressed tar size; callers that know the size (from a manifest) should
    /// pass it here.
    pub max_uncompressed: u64,
    /// Cap on uncompressed/compressed size (zstd bomb guard). Zero runs of sparse files
    /// compress extremely well, so keep this generous.
    pub max_ratio: u64,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            xattr_ns: XattrNs::Trusted,
            allow_devices: false,
            max_uncompressed: 1 << 40,
            max_ratio: 10_000,
        }
    }
}

/// Result of [`unpack_file`] and [`copy_tree`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackStats {
    /// Tar entries extracted (PAX headers not counted).
    pub entries: u64,
    /// Bytes of uncompressed tar read.
    pub uncompressed_size: u64,
}

/// Archives `upper` into `spool` (written under a temp name, fsynced, renamed).
/// `progress` receives cumulative uncompressed bytes. Blocking: call from `spawn_blocking`.
pub fn pack_to_file(
    upper: &Path,
    spool: &Path,
    opts: &PackOptions,
    progress: Option<&(dyn Fn(u64) + Sync)>,
) -> Result<PackStats> {
    pack::pack_to_file(upper, spool, opts, progress, None, None)
}

/// Follows a spool while [`pack_to_file_observed`] writes it, so its finished prefix can be
/// uploaded before packing ends. The spool is only ever appended to: bytes below the last
/// `written` total are final.
pub trait SpoolObserver: Sync {
    /// The spool was created (under its temp name); `file` is its write handle.
    fn created(&self, file: &std::fs::File);
    /// `total` compressed bytes have been written to the spool (visible to readers of the
    /// same inode, not yet fsynced).
    fn written(&self, total: u64);
}

/// [`pack_to_file`], reporting the spool's creation and growth to `observer`.
pub fn pack_to_file_observed(
    upper: &Path,
    spool: &Path,
    opts: &PackOptions,
    progress: Option<&(dyn Fn(u64) + Sync)>,
    observer: &dyn SpoolObserver,
) -> Result<PackStats> {
    pack::pack_to_file(upper, spool, opts, progress, Some(observer), None)
}

/// What [`pack_capture`] archives.
#[derive(Debug, Clone, Copy)]
pub enum Capture<'a> {
    /// The whole tree: a full layer.
    Full,
    /// Only what changed since the version this index describes: a delta.
    Delta(&'a TreeIndex),
}

/// What [`pack_capture`] produced.
#[derive(Debug, Clone)]
pub struct Captured {
    pub stats: PackStats,
    /// The new version's index (`version` left for the caller to set once it is stored).
    pub index: TreeIndex,
    /// For a delta: entries written because they changed, and removal entries.
    pub delta: Option<(u64, u64)>,
}

/// Archives `upper` into `spool` as a full layer or a delta, reporting the spool's growth to
/// `observer`, and indexes the new version. Blocking: call from `spawn_blocking`.
pub fn pack_capture(
    upper: &Path,
    spool: &Path,
    opts: &PackOptions,
    progress: Option<&(dyn Fn(u64) + Sync)>,
    observer: Option<&dyn SpoolObserver>,
    capture: Capture<'_>,
) -> Result<Captured> {
    let mut builder = IndexBuilder::new();
    match capture {
        Capture::Full => {
            let stats =
                pack::pack_to_file(upper, spool, opts, progress, observer, Some(&mut builder))?;
            Ok(Captured {
                stats,
                index: builder.finish(),
                delta: None,
            })
        }
        Capture::Delta(prev) => {
            let (d, index) =
                delta::pack_delta(upper, prev, spool, opts, progress, observer, &builder)?;
            Ok(Captured {
                stats: d.pack,
                index,
                delta: Some((d.changed, d.removed)),
            })
        }
    }
}

/// Verifies `spool` against `expected_digest` (`hex` or `sha256:hex`), then restores it into
/// `target`, which must be absent or an empty dir. `progress` receives cumulative
/// uncompressed bytes. Blocking: call from `spawn_blocking`.
pub fn unpack_file(
    spool: &Path,
    expected_digest: &str,
    target: &Path,
    opts: &UnpackOptions,
    progress: Option<&(dyn Fn(u64) + Sync)>,
) -> Result<UnpackStats> {
    decode::unpack_file(spool, expected_digest, target, opts, progress)
}

/// Restores the compressed archive read from `src` into `target` in a single pass: extracts
/// into a staging dir while hashing the input (decompression and hashing on a thread of their
/// own), then swaps the staging dir in only if the
/// sha256 of everything read equals `expected_digest`. `compressed_size` (the object size)
/// feeds the expansion-ratio cap; `name` labels errors. Blocking: call from `spawn_blocking`.
pub fn unpack_reader<R: std::io::Read + Send>(
    src: R,
    name: &Path,
    compressed_size: u64,
    expected_digest: &str,
    target: &Path,
    opts: &UnpackOptions,
    progress: Option<&(dyn Fn(u64) + Sync)>,
) -> Result<UnpackStats> {
    decode::unpack_reader(
        src,
        name,
        compressed_size,
        expected_digest,
        target,
        opts,
        progress,
    )
}

/// Restores a layer chain into `target` (absent or an empty dir, as for [`unpack_file`]):
/// `layers[0]` is the full base archive, the rest are deltas applied in order, each given as
/// `(spool, expected digest)` with the digest as `hex` or `sha256:hex`. Everything is built in
/// one staging dir and swapped in only when every layer applied and matched its digest.
/// `progress` receives cumulative uncompressed bytes over all layers. Blocking: call from
/// `spawn_blocking`.
pub fn unpack_chain_files(
    layers: &[(PathBuf, String)],
    target: &Path,
    opts: &UnpackOptions,
    progress: Option<&(dyn Fn(u64) + Sync)>,
) -> Result<UnpackStats> {
    delta_apply::unpack_chain_files(layers, target, opts, progress)
}

/// [`unpack_chain_files`] over streams (e.g. straight from the store): each layer is
/// `(reader, name for errors, compressed size, expected digest)` and is read once, hashed
/// while it is applied. Blocking: call from `spawn_blocking`.
pub fn unpack_chain_readers<R: std::io::Read + Send>(
    layers: Vec<(R, &Path, u64, &str)>,
    target: &Path,
    opts: &UnpackOptions,
    progress: Option<&(dyn Fn(u64) + Sync)>,
) -> Result<UnpackStats> {
    delta_apply::unpack_chain_readers(layers, target, opts, progress)
}

/// Copies an upper dir overlay-exactly (same rules and checks as a restore). Blocking.
pub fn copy_tree(src: &Path, target: &Path, opts: &UnpackOptions) -> Result<UnpackStats> {
    copy::copy_tree(src, target, opts)
}

/// Metadata-only fingerprint (hex sha256) of an upper dir; changes whenever content,
/// metadata or xattrs change, not on reads. Blocking.
pub fn fingerprint(upper: &Path) -> Result<String> {
    fingerprint::fingerprint(upper)
}

/// Hex sha256 of a whole file (an archive's content address). Blocking.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut h)?;
    Ok(hex::encode(h.finalize()))
}
