//! Applying *delta* archives (incremental layers) onto a tree restored from their base, and
//! restoring a whole chain (base + deltas) into a target in one staging dir.
//!
//! A delta uses the full format's conventions; its entries *replace* what is at their path
//! (the [`Extractor`] in delta mode removes first, then creates as for a full archive), a
//! directory entry over an existing directory updates it in place, and an empty regular entry
//! carrying [`super::DELTA_REMOVE_PAX_KEY`] removes its path. A delta that does not fit the tree
//! (removes a missing path, names a path twice) fails the whole restore: a chain that does not
//! match its base is corrupt, and guessing would restore a tree nobody packed.
//!
//! Directories whose children a delta changes but which have no entry of their own keep the
//! mtime they had before the delta (recorded before the first change, restored at the end).

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

use super::decode::apply_verified;
use super::error::{ArchiveError, Result, extract_err, io_err};
use super::extract::{Extractor, Meta, os};
use super::target::{Staging, check_target};
use super::tarout::Progress;
use super::unpack::parse_digest;
use super::{UnpackOptions, UnpackStats, XattrNs, xattr};

/// Replace-mode bookkeeping of one delta being applied.
#[derive(Debug, Default)]
pub struct DeltaState {
    /// Paths this delta already created, replaced or removed (a second entry is corrupt).
    touched: HashSet<Vec<u8>>,
    /// Pre-delta mtimes of directories whose children changed, by path.
    saved_mtimes: BTreeMap<Vec<u8>, Timespec>,
}

/// What a delta entry finds at its path before it is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    Nothing,
    Dir,
    Other,
}

impl DeltaState {
    /// Claims `rel` for one entry: two entries for one path (a whiteout and a file of the
    /// same name count too) would make the result depend on order.
    pub fn claim(&mut self, rel: &[u8], entry: &str) -> Result<()> {
        if !self.touched.insert(rel.to_vec()) {
            return Err(ArchiveError::DuplicateEntry {
                entry: entry.to_owned(),
            });
        }
        Ok(())
    }

    /// Records the mtime of the directory `rel` (open as `dir`) before its first change.
    pub fn note_dir_change(&mut self, rel: &[u8], dir: BorrowedFd<'_>, entry: &str) -> Result<()> {
        if self.saved_mtimes.contains_key(rel) {
            return Ok(());
        }
        let st = rustix::fs::fstat(dir).map_err(extract_err("stat parent directory", entry))?;
        self.saved_mtimes.insert(rel.to_vec(), stat_mtime(&st));
        Ok(())
    }

    /// Forgets recorded mtimes of the removed directory `rel` and everything below it.
    pub fn forget_under(&mut self, rel: &[u8]) {
        self.saved_mtimes.remove(rel);
        let mut lo = rel.to_vec();
        lo.push(b'/');
        let mut hi = rel.to_vec();
        hi.push(b'/' + 1);
        let below: Vec<Vec<u8>> = self
            .saved_mtimes
            .range(lo..hi)
            .map(|(k, _)| k.clone())
            .collect();
        for k in below {
            self.saved_mtimes.remove(&k);
        }
    }

    /// The recorded pre-delta mtimes, to be restored once every child change is done.
    pub fn into_saved_mtimes(self) -> BTreeMap<Vec<u8>, Timespec> {
        self.saved_mtimes
    }
}

// Field widths of `struct stat` differ between architectures; the casts are exact on all.
#[allow(clippy::unnecessary_cast)]
fn stat_mtime(st: &rustix::fs::Stat) -> Timespec {
    Timespec {
        tv_sec: st.st_mtime as i64,
        tv_nsec: st.st_mtime_nsec as _,
    }
}

/// What is at `leaf` in `parent` (never following a symlink).
pub fn existing(parent: BorrowedFd<'_>, leaf: &[u8], entry: &str) -> Result<Existing> {
    match rustix::fs::statat(parent, os(leaf), AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(Existing::Nothing),
        Err(e) => Err(extract_err("stat existing path", entry)(e)),
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => Ok(Existing::Dir),
        Ok(_) => Ok(Existing::Other),
    }
}

/// Removes `leaf` from `parent`: a directory recursively, anything else (symlinks included)
/// by unlinking the name itself.
pub fn remove_at(parent: BorrowedFd<'_>, leaf: &[u8], kind: Existing, entry: &str) -> Result<()> {
    match kind {
        Existing::Nothing => Ok(()),
        Existing::Other => rustix::fs::unlinkat(parent, os(leaf), AtFlags::empty())
            .map_err(extract_err("remove existing path", entry)),
        Existing::Dir => {
            let fd = rustix::fs::openat(
                parent,
                os(leaf),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(extract_err("open directory to remove", entry))?;
            remove_children(fd, entry)?;
            rustix::fs::unlinkat(parent, os(leaf), AtFlags::REMOVEDIR)
                .map_err(extract_err("remove directory", entry))
        }
    }
}

/// Empties the directory `dir`, depth first, through fds only (no path is ever re-resolved,
/// so nothing below can redirect the removal through a symlink).
fn remove_children(dir: OwnedFd, entry: &str) -> Result<()> {
    let mut names = Vec::new();
    {
        let mut rd =
            rustix::fs::Dir::read_from(&dir).map_err(extract_err("read directory", entry))?;
        while let Some(e) = rd.read() {
            let e = e.map_err(extract_err("read directory", entry))?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                let kind = if e.file_type() == FileType::Directory {
                    Existing::Dir
                } else if e.file_type() == FileType::Unknown {
                    existing(dir.as_fd(), n, entry)?
                } else {
                    Existing::Other
                };
                names.push((n.to_vec(), kind));
            }
        }
    }
    for (name, kind) in names {
        remove_at(dir.as_fd(), &name, kind, entry)?;
    }
    Ok(())
}

/// Drops the overlay opaque xattr of an existing directory updated in place: the delta says
/// it again with a `.wh..wh..opq` entry right after the directory if it is still opaque.
pub fn clear_opaque(dir: BorrowedFd<'_>, ns: XattrNs, entry: &str) -> Result<()> {
    remove_xattr_if_present(dir, ns.overlay_xattr("opaque").as_bytes(), entry)
}

fn remove_xattr_if_present(fd: BorrowedFd<'_>, name: &[u8], entry: &str) -> Result<()> {
    match rustix::fs::fremovexattr(fd, os(name)) {
        Ok(()) | Err(Errno::NODATA) => Ok(()),
        Err(e) => Err(extract_err("remove xattr", entry)(e)),
    }
}

/// Makes a directory's portable xattrs and protattr exactly the entry's (the caller sets
/// the listed ones afterwards): an in-place update must not keep what the delta dropped.
pub fn drop_unlisted_xattrs(
    fd: BorrowedFd<'_>,
    meta: &Meta,
    ns: XattrNs,
    entry: &str,
) -> Result<()> {
    let names = xattr::list(Path::new(entry), xattr::Source::Fd(fd))
        .map_err(extract_err("list xattrs", entry))?;
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if xattr::is_portable(name) && !meta.xattrs.iter().any(|(n, _)| n == name) {
            remove_xattr_if_present(fd, name, entry)?;
        }
    }
    if meta.protattr.is_none() {
        remove_xattr_if_present(fd, ns.overlay_xattr("protattr").as_bytes(), entry)?;
    }
    Ok(())
}

/// Sets a directory's mtime back to `mtime`, leaving its atime alone.
pub fn restore_mtime(fd: BorrowedFd<'_>, mtime: Timespec, entry: &str) -> Result<()> {
    let ts = Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        last_modification: mtime,
    };
    rustix::fs::futimens(fd, &ts).map_err(extract_err("restore directory mtime", entry))
}

/// One layer of a chain read from a stream: the reader, a name for errors, its compressed
/// size (for the expansion-ratio cap) and its expected digest.
pub type ChainReader<'a, R> = (R, &'a Path, u64, &'a str);

/// Restores a chain from streams: the first is the full base, the rest deltas in order. Each
/// is applied while it is hashed; any digest mismatch or failure discards the staging dir, so
/// `target` only ever gets the complete, verified tree. The staging root stays private (0700)
/// until the last layer is applied.
pub fn unpack_chain_readers<R: Read + Send>(
    layers: Vec<ChainReader<'_, R>>,
    target: &Path,
    opts: &UnpackOptions,
    progress: Progress<'_>,
) -> Result<UnpackStats> {
    let expected = layers
        .iter()
        .map(|(_, _, _, d)| parse_digest(d))
        .collect::<Result<Vec<_>>>()?;
    if layers.is_empty() {
        return Err(ArchiveError::EmptyChain {
            target: target.to_owned(),
        });
    }
    let slot = check_target(target)?;
    let (staging, root) = Staging::create(&slot)?;
    match apply_layers(layers, &expected, root, opts, progress) {
        Ok((stats, root)) => {
            staging.swap(root)?;
            Ok(stats)
        }
        Err(e) => Err(staging.discard(e)),
    }
}

/// Applies every layer onto `root` (the empty staging root), in order.
fn apply_layers<R: Read + Send>(
    layers: Vec<ChainReader<'_, R>>,
    expected: &[String],
    mut root: OwnedFd,
    opts: &UnpackOptions,
    progress: Progress<'_>,
) -> Result<(UnpackStats, OwnedFd)> {
    let mut stats = UnpackStats {
        entries: 0,
        uncompressed_size: 0,
    };
    let mut root_mode = None;
    for (i, ((src, name, compressed_size, _), expected)) in
        layers.into_iter().zip(expected).enumerate()
    {
        let done = stats.uncompressed_size;
        let shifted = progress.map(|p| move |n: u64| p(done + n));
        let layer_progress = shifted.as_ref().map(|p| p as &(dyn Fn(u64) + Sync));
        let mut ex = if i == 0 {
            Extractor::new(root, opts)
        } else {
            Extractor::new_delta(root, opts)
        };
        let (entries, size) = apply_verified(
            src,
            name,
            compressed_size,
            expected,
            &mut ex,
            opts,
            layer_progress,
        )?;
        let sets_root_mode = i == 0 || ex.root_seen();
        root = ex.finish()?;
        stats.entries += entries;
        stats.uncompressed_size += size;
        // Each finish gives the root its archived mode; keep it private until the end.
        if sets_root_mode {
            let st = rustix::fs::fstat(&root).map_err(extract_err("stat", "./"))?;
            root_mode = Some(st.st_mode & 0o7777);
        }
        rustix::fs::fchmod(&root, Mode::from_raw_mode(0o700))
            .map_err(extract_err("set mode", "./"))?;
    }
    if let Some(mode) = root_mode {
        rustix::fs::fchmod(&root, Mode::from_raw_mode(mode))
            .map_err(extract_err("set mode", "./"))?;
    }
    Ok((stats, root))
}

/// [`unpack_chain_readers`] over spool files: `(path, expected digest)` per layer.
pub fn unpack_chain_files(
    layers: &[(PathBuf, String)],
    target: &Path,
    opts: &UnpackOptions,
    progress: Progress<'_>,
) -> Result<UnpackStats> {
    let mut readers = Vec::with_capacity(layers.len());
    for (path, digest) in layers {
        let file = File::open(path).map_err(io_err("open", path))?;
        let size = file.metadata().map_err(io_err("stat", path))?.len();
        readers.push((file, path.as_path(), size, digest.as_str()));
    }
    unpack_chain_readers(readers, target, opts, progress)
}
