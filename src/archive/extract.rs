//! Creating entries inside a private staging dir (the dir itself and its swap into place are
//! in [`super::target`]).
//!
//! Every parent is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)` from the staging root and every leaf is created with an `*at` call
//! that refuses to replace or follow anything, so a hostile archive cannot reach outside the
//! staging dir. Directory metadata is applied last, deepest first.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;

use rustix::fs::{
    AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid, XattrFlags,
};
use rustix::io::Errno;

use super::delta_apply::{self, DeltaState, Existing};
use super::error::{ArchiveError, Result, extract_err};
use super::{UnpackOptions, XattrNs};

const HOLE_BLOCK: usize = 4096;

/// Metadata restored on every inode the archive describes.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, u32),
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub protattr: Option<Vec<u8>>,
}

#[derive(Debug)]
struct DirMeta {
    rel: Vec<u8>,
    entry: String,
    meta: Meta,
}

fn resolve_flags() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

fn join(comps: &[&[u8]]) -> Vec<u8> {
    comps.join(&b'/')
}

pub(super) fn os(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}

/// Maps a failed parent resolution to the error that explains it.
fn resolve_err(e: Errno, entry: &str) -> ArchiveError {
    match e {
        Errno::LOOP | Errno::XDEV => ArchiveError::EscapesTarget {
            entry: entry.to_owned(),
        },
        Errno::NOENT | Errno::NOTDIR => ArchiveError::MissingParent {
            entry: entry.to_owned(),
        },
        e => ArchiveError::Extract {
            op: "resolve parent directory",
            entry: entry.to_owned(),
            source: e.into(),
        },
    }
}

/// Creates entries under one staging root.
#[derive(Debug)]
pub struct Extractor {
    root: OwnedFd,
    ns: XattrNs,
    allow_devices: bool,
    cache: Option<(Vec<u8>, OwnedFd)>,
    dirs: Vec<DirMeta>,
    root_seen: bool,
    opaque_seen: HashSet<Vec<u8>>,
    buf: Box<[u8]>,
    /// Replace semantics while a delta is applied onto an existing tree; `None` for a full
    /// archive, whose entries may only create.
    delta: Option<DeltaState>,
}

/// What a delta entry does with whatever already is at its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replace {
    /// Remove it, whatever it is (non-directory entries).
    Any,
    /// Keep an existing directory (updated in place), remove anything else.
    KeepDir,
    /// Remove it; it must exist (removal entries).
    Remove,
}

impl Extractor {
    pub fn new(root: OwnedFd, opts: &UnpackOptions) -> Self {
        Extractor {
            root,
            ns: opts.xattr_ns,
            allow_devices: opts.allow_devices,
            cache: None,
            dirs: Vec::new(),
            root_seen: false,
            opaque_seen: HashSet::new(),
            buf: vec![0u8; 1 << 20].into_boxed_slice(),
            delta: None,
        }
    }

    /// An extractor that applies a delta onto the tree already at `root`.
    pub fn new_delta(root: OwnedFd, opts: &UnpackOptions) -> Self {
        Extractor {
            delta: Some(DeltaState::default()),
            ..Extractor::new(root, opts)
        }
    }

    pub fn is_delta(&self) -> bool {
        self.delta.is_some()
    }

    /// Whether the archive had a root (`./`) entry so far.
    pub fn root_seen(&self) -> bool {
        self.root_seen
    }

    /// In delta mode, makes room for the entry at `comps`: claims the path, records the
    /// parent's mtime and removes what is there (per `how`). Returns whether an existing
    /// directory was kept. A no-op for full archives, whose leaves are created exclusively.
    fn make_room(&mut self, comps: &[&[u8]], entry: &str, how: Replace) -> Result<bool> {
        if self.delta.is_none() {
            return Ok(false);
        }
        self.ensure_parent(comps, entry)?;
        let leaf = comps[comps.len() - 1];
        let parent = match &self.cache {
            Some((_, fd)) if comps.len() >= 2 => fd.as_fd(),
            _ => self.root.as_fd(),
        };
        let Some(delta) = self.delta.as_mut() else {
            return Ok(false);
        };
        let rel = join(comps);
        delta.claim(&rel, entry)?;
        let found = delta_apply::existing(parent, leaf, entry)?;
        match (found, how) {
            (Existing::Nothing, Replace::Remove) => {
                return Err(ArchiveError::NothingToRemove {
                    entry: entry.to_owned(),
                });
            }
            (Existing::Dir, Replace::KeepDir) => return Ok(true),
            _ => {}
        }
        delta.note_dir_change(&join(&comps[..comps.len() - 1]), parent, entry)?;
        delta_apply::remove_at(parent, leaf, found, entry)?;
        if found == Existing::Dir {
            delta.forget_under(&rel);
            // The cached parent may lie inside what was just removed.
            self.cache = None;
        }
        Ok(false)
    }

    /// A delta removal entry: removes whatever is at `comps` (a directory recursively); the
    /// path must exist.
    pub fn remove(&mut self, comps: &[&[u8]], entry: &str) -> Result<()> {
        if self.delta.is_none() {
            return Err(ArchiveError::RemovalInFullArchive {
                entry: entry.to_owned(),
            });
        }
        self.make_room(comps, entry, Replace::Remove).map(|_| ())
    }

    /// An `O_PATH` fd of the parent of `comps` (cached: archives are sorted, neighbours share parents).
    fn parent(&mut self, comps: &[&[u8]], entry: &str) -> Result<&OwnedFd> {
        self.ensure_parent(comps, entry)?;
        Ok(self.cached_parent(comps))
    }

    fn ensure_parent(&mut self, comps: &[&[u8]], entry: &str) -> Result<()> {
        if comps.len() < 2 {
            return Ok(());
        }
        let rel = join(&comps[..comps.len() - 1]);
        if self.cache.as_ref().is_none_or(|(r, _)| *r != rel) {
            let fd = self.open_beneath(&rel, OFlags::PATH, entry)?;
            self.cache = Some((rel, fd));
        }
        Ok(())
    }

    /// The parent fd after [`Self::ensure_parent`] succeeded for the same `comps`.
    fn cached_parent(&self, comps: &[&[u8]]) -> &OwnedFd {
        match &self.cache {
            Some((_, fd)) if comps.len() >= 2 => fd,
            _ => &self.root,
        }
    }

    fn open_beneath(&self, rel: &[u8], flags: OFlags, entry: &str) -> Result<OwnedFd> {
        rustix::fs::openat2(
            &self.root,
            os(rel),
            flags | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            resolve_flags(),
        )
        .map_err(|e| resolve_err(e, entry))
    }

    /// The root entry (`./`): its metadata becomes the target dir's.
    pub fn root_dir(&mut self, entry: &str, meta: Meta) -> Result<()> {
        if std::mem::replace(&mut self.root_seen, true) {
            return Err(ArchiveError::DuplicateEntry {
                entry: entry.to_owned(),
            });
        }
        self.dirs.push(DirMeta {
            rel: Vec::new(),
            entry: entry.to_owned(),
            meta,
        });
        if self.delta.is_some() {
            delta_apply::clear_opaque(self.root.as_fd(), self.ns, entry)?;
        }
        Ok(())
    }

    /// A directory; in delta mode an existing one is updated in place (its opaque xattr
    /// dropped now, the rest of its metadata at [`Self::finish`]).
    pub fn dir(&mut self, comps: &[&[u8]], entry: &str, meta: Meta) -> Result<()> {
        let kept = self.make_room(comps, entry, Replace::KeepDir)?;
        let leaf = comps[comps.len() - 1];
        let ns = self.ns;
        let parent = self.parent(comps, entry)?;
        if kept {
            let fd = rustix::fs::openat(
                parent,
                os(leaf),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(extract_err("open existing directory", entry))?;
            delta_apply::clear_opaque(fd.as_fd(), ns, entry)?;
        } else {
            rustix::fs::mkdirat(parent, os(leaf), Mode::from_raw_mode(0o700))
                .map_err(|e| create_err(e, entry))?;
        }
        self.dirs.push(DirMeta {
            rel: join(comps),
            entry: entry.to_owned(),
            meta,
        });
        Ok(())
    }

    /// A regular file; holes of at least 4 KiB of zeros are recreated as holes.
    pub fn file(
        &mut self,
        comps: &[&[u8]],
        entry: &str,
        meta: &Meta,
        size: u64,
        data: &mut dyn Read,
        read_err: &dyn Fn(io::Error) -> ArchiveError,
    ) -> Result<()> {
        self.make_room(comps, entry, Replace::Any)?;
        let leaf = comps[comps.len() - 1];
        let parent = self.parent(comps, entry)?;
        let fd = rustix::fs::openat(
            parent,
            os(leaf),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| create_err(e, entry))?;
        let file = File::from(fd);
        let mut pos = 0u64;
        let mut written_end = 0u64;
        while pos < size {
            let want = usize::try_from(size - pos)
                .unwrap_or(usize::MAX)
                .min(self.buf.len());
            read_full(data, &mut self.buf[..want]).map_err(read_err)?;
            if let Some(end) = write_sparse(&file, &self.buf[..want], pos)
                .map_err(extract_err("write data", entry))?
            {
                written_end = end;
            }
            pos += want as u64;
        }
        // Only a trailing hole leaves the file short (one syscall per file saved otherwise).
        if written_end != size {
            file.set_len(size).map_err(extract_err("set size", entry))?;
        }
        self.apply_fd(file.as_fd(), entry, meta)
    }

    /// A `.wh.<name>` entry (or a native char 0/0): a whiteout device.
    pub fn whiteout(&mut self, comps: &[&[u8]], name: &[u8], entry: &str) -> Result<()> {
        if name.is_empty() || name == b"." || name == b".." || name.starts_with(b".wh.") {
            return Err(ArchiveError::BadWhiteout {
                entry: entry.to_owned(),
            });
        }
        // The whiteout takes the plain name: that is what a delta replaces.
        let mut plain = comps.to_vec();
        if let Some(last) = plain.last_mut() {
            *last = name;
        }
        self.make_room(&plain, entry, Replace::Any)?;
        let parent = self.parent(comps, entry)?;
        rustix::fs::mknodat(
            parent,
            os(name),
            FileType::CharacterDevice,
            Mode::empty(),
            rustix::fs::makedev(0, 0),
        )
        .map_err(|e| create_err(e, entry))
    }

    /// A `.wh..wh..opq` entry: marks its parent directory opaque.
    pub fn opaque(&mut self, comps: &[&[u8]], entry: &str) -> Result<()> {
        let rel = join(&comps[..comps.len() - 1]);
        if !self.opaque_seen.insert(rel) {
            return Err(ArchiveError::DuplicateEntry {
                entry: entry.to_owned(),
            });
        }
        let name = self.ns.overlay_xattr("opaque");
        let parent = self.parent(comps, entry)?;
        let path = format!("/proc/self/fd/{}", parent.as_raw_fd());
        rustix::fs::setxattr(path.as_str(), name.as_str(), b"y", XattrFlags::empty())
            .map_err(extract_err("set opaque xattr", entry))
    }

    pub fn symlink(
        &mut self,
        comps: &[&[u8]],
        entry: &str,
        target: &[u8],
        meta: &Meta,
    ) -> Result<()> {
        if target.is_empty() || target.contains(&0) {
            return Err(ArchiveError::Unsupported {
                entry: entry.to_owned(),
                what: "empty symlink target".to_owned(),
            });
        }
        self.make_room(comps, entry, Replace::Any)?;
        let leaf = comps[comps.len() - 1];
        let parent = self.parent(comps, entry)?;
        rustix::fs::symlinkat(os(target), parent, os(leaf)).map_err(|e| create_err(e, entry))?;
        self.apply_at(comps, entry, meta, false)
    }

    /// A hard link to an earlier entry (the source is resolved beneath the root too).
    pub fn hardlink(
        &mut self,
        comps: &[&[u8]],
        entry: &str,
        target: &[&[u8]],
        target_name: &str,
    ) -> Result<()> {
        let bad = || ArchiveError::BadLinkTarget {
            entry: entry.to_owned(),
            target: target_name.to_owned(),
        };
        if target.is_empty() {
            return Err(bad());
        }
        self.make_room(comps, entry, Replace::Any)?;
        let src_rel = join(&target[..target.len() - 1]);
        let src_parent = if src_rel.is_empty() {
            None
        } else {
            Some(
                self.open_beneath(&src_rel, OFlags::PATH, target_name)
                    .map_err(|e| match e {
                        ArchiveError::MissingParent { .. } => bad(),
                        e => e,
                    })?,
            )
        };
        let leaf = comps[comps.len() - 1];
        let src_leaf = target[target.len() - 1];
        self.ensure_parent(comps, entry)?;
        let parent = self.cached_parent(comps);
        let src_fd = src_parent.as_ref().map_or(self.root.as_fd(), |f| f.as_fd());
        rustix::fs::linkat(src_fd, os(src_leaf), parent, os(leaf), AtFlags::empty()).map_err(|e| {
            match e {
                Errno::NOENT | Errno::PERM | Errno::NOTDIR => bad(),
                e => create_err(e, entry),
            }
        })
    }

    /// A FIFO, or a device node (only when allowed).
    pub fn special(
        &mut self,
        comps: &[&[u8]],
        entry: &str,
        ft: FileType,
        dev: (u32, u32),
        meta: &Meta,
    ) -> Result<()> {
        if ft != FileType::Fifo && !self.allow_devices {
            return Err(ArchiveError::DeviceNotAllowed {
                entry: entry.to_owned(),
            });
        }
        self.make_room(comps, entry, Replace::Any)?;
        let leaf = comps[comps.len() - 1];
        let parent = self.parent(comps, entry)?;
        rustix::fs::mknodat(
            parent,
            os(leaf),
            ft,
            Mode::from_raw_mode(0o600),
            rustix::fs::makedev(dev.0, dev.1),
        )
        .map_err(|e| create_err(e, entry))?;
        self.apply_at(comps, entry, meta, true)
    }

    /// Owner, mode (after chown so setuid survives), xattrs, then mtime, on an open inode.
    fn apply_fd(&self, fd: impl AsFd, entry: &str, meta: &Meta) -> Result<()> {
        let fd = fd.as_fd();
        rustix::fs::fchown(
            fd,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )
        .map_err(extract_err("set owner", entry))?;
        rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode & 0o7777))
            .map_err(extract_err("set mode", entry))?;
        for (name, value) in xattrs_to_set(meta, self.ns) {
            rustix::fs::fsetxattr(fd, os(&name), value, XattrFlags::empty())
                .map_err(extract_err("set xattr", entry))?;
        }
        rustix::fs::futimens(fd, &timestamps(meta.mtime)).map_err(extract_err("set mtime", entry))
    }

    /// Same as [`Self::apply_fd`] for inodes that cannot be opened (symlinks, fifos, devices).
    fn apply_at(&mut self, comps: &[&[u8]], entry: &str, meta: &Meta, chmod: bool) -> Result<()> {
        let leaf = comps[comps.len() - 1];
        let ns = self.ns;
        let parent = self.parent(comps, entry)?;
        rustix::fs::chownat(
            parent,
            os(leaf),
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(extract_err("set owner", entry))?;
        if chmod {
            rustix::fs::chmodat(
                parent,
                os(leaf),
                Mode::from_raw_mode(meta.mode & 0o7777),
                AtFlags::empty(),
            )
            .map_err(extract_err("set mode", entry))?;
        }
        let attrs = xattrs_to_set(meta, ns);
        if !attrs.is_empty() {
            let mut path = format!("/proc/self/fd/{}/", parent.as_raw_fd()).into_bytes();
            path.extend_from_slice(leaf);
            for (name, value) in attrs {
                rustix::fs::lsetxattr(os(&path), os(&name), value, XattrFlags::empty())
                    .map_err(extract_err("set xattr", entry))?;
            }
        }
        rustix::fs::utimensat(
            parent,
            os(leaf),
            &timestamps(meta.mtime),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(extract_err("set mtime", entry))
    }

    /// Applies directory metadata deepest first, so child updates cannot disturb parent mtimes.
    /// After a delta, directories changed without an entry of their own first get their
    /// pre-delta mtime back; directories with an entry get exactly the entry's xattrs.
    pub fn finish(mut self) -> Result<OwnedFd> {
        self.cache = None;
        let delta = self.delta.take();
        let exact = delta.is_some();
        match delta {
            Some(delta) => {
                for (rel, mtime) in delta.into_saved_mtimes() {
                    let entry = format!("./{}", String::from_utf8_lossy(&rel));
                    if rel.is_empty() {
                        delta_apply::restore_mtime(self.root.as_fd(), mtime, &entry)?;
                    } else {
                        let fd =
                            self.open_beneath(&rel, OFlags::RDONLY | OFlags::NOFOLLOW, &entry)?;
                        delta_apply::restore_mtime(fd.as_fd(), mtime, &entry)?;
                    }
                }
            }
            None if !self.root_seen => {
                rustix::fs::fchmod(&self.root, Mode::from_raw_mode(0o755))
                    .map_err(extract_err("set mode", "./"))?;
            }
            None => {}
        }
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_unstable_by(|a, b| b.rel.cmp(&a.rel));
        for d in &dirs {
            let opened;
            let fd = if d.rel.is_empty() {
                self.root.as_fd()
            } else {
                opened = self.open_beneath(&d.rel, OFlags::RDONLY | OFlags::NOFOLLOW, &d.entry)?;
                opened.as_fd()
            };
            if exact {
                delta_apply::drop_unlisted_xattrs(fd, &d.meta, self.ns, &d.entry)?;
            }
            self.apply_fd(fd, &d.entry, &d.meta)?;
        }
        Ok(self.root)
    }
}

fn create_err(e: Errno, entry: &str) -> ArchiveError {
    match e {
        Errno::EXIST => ArchiveError::DuplicateEntry {
            entry: entry.to_owned(),
        },
        e => ArchiveError::Extract {
            op: "create",
            entry: entry.to_owned(),
            source: e.into(),
        },
    }
}

fn xattrs_to_set(meta: &Meta, ns: XattrNs) -> Vec<(Vec<u8>, &[u8])> {
    let mut out: Vec<(Vec<u8>, &[u8])> = meta
        .xattrs
        .iter()
        .map(|(n, v)| (n.clone(), v.as_slice()))
        .collect();
    if let Some(p) = &meta.protattr {
        out.push((ns.overlay_xattr("protattr").into_bytes(), p.as_slice()));
    }
    out
}

fn timestamps((secs, nsec): (i64, u32)) -> Timestamps {
    let t = Timespec {
        tv_sec: secs,
        tv_nsec: nsec.into(),
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn read_full(r: &mut dyn Read, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match r.read(buf) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn is_zero(b: &[u8]) -> bool {
    let (prefix, words, suffix) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle.
        unsafe { b.align_to::<u64>() }
    };
    prefix.iter().all(|x| *x == 0)
        && words.iter().all(|x| *x == 0)
        && suffix.iter().all(|x| *x == 0)
}

/// Writes `buf` at `offset`, skipping 4 KiB blocks (aligned to the file) that are all zero;
/// returns the file offset where the last write ended, if anything was written.
fn write_sparse(file: &File, buf: &[u8], offset: u64) -> io::Result<Option<u64>> {
    let mut last_end = None;
    let mut i = 0;
    while i < buf.len() {
        let end = (i + HOLE_BLOCK).min(buf.len());
        if is_zero(&buf[i..end]) {
            i = end;
            continue;
        }
        let mut j = end;
        while j < buf.len() {
            let next = (j + HOLE_BLOCK).min(buf.len());
            if is_zero(&buf[j..next]) {
                break;
            }
            j = next;
        }
        file.write_all_at(&buf[i..j], offset + i as u64)?;
        last_end = Some(offset + j as u64);
        i = j;
    }
    Ok(last_end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sparse_writer_skips_zero_blocks() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        let f = File::create(&p).unwrap();
        let mut data = vec![0u8; 1 << 20];
        data[..10].fill(7);
        data[(1 << 20) - 5..].fill(9);
        assert_eq!(write_sparse(&f, &data, 0).unwrap(), Some(1 << 20));
        assert_eq!(write_sparse(&f, &[0u8; 8192], 1 << 20).unwrap(), None);
        data[(1 << 20) - 5..].fill(0);
        assert_eq!(write_sparse(&f, &data, 0).unwrap(), Some(4096));
        data[(1 << 20) - 5..].fill(9);
        write_sparse(&f, &data, 0).unwrap();
        f.set_len(1 << 20).unwrap();
        f.sync_all().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), data);
        let m = std::fs::metadata(&p).unwrap();
        assert!(m.blocks() * 512 <= 64 * 1024, "blocks {}", m.blocks());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4097]));
        let mut b = vec![0u8; 4096];
        b[4095] = 1;
        assert!(!is_zero(&b));
        b[4095] = 0;
        b[1] = 1;
        assert!(!is_zero(&b[1..]));
    }
}
