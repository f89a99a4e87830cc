//! Upper dir → OCI-form PAX tar → zstd → spool file, with sha256 of both streams.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::FileType;
use sha2::{Digest, Sha256};
use tar::EntryType;

use super::error::{ArchiveError, Result, io_err};
use super::index::IndexBuilder;
use super::tarout::{EntryMeta, Progress, TarOut};
use super::walk::{Item, ItemKind, Walker};
use super::{PackOptions, PackStats, SpoolObserver, xattr};

/// What walking and writing a tree produced.
#[derive(Debug, Default)]
pub struct TreeStats {
    pub entries: u64,
    pub skipped_sockets: Vec<PathBuf>,
}

/// Writes every entry of `upper` (not the end marker) into `out`, recording each into `index`
/// when given.
pub fn write_tree<W: Write>(
    upper: &Path,
    out: &mut TarOut<'_, W>,
    mut index: Option<&mut IndexBuilder>,
    live: bool,
) -> Result<TreeStats> {
    let mut stats = TreeStats::default();
    let mut walker = Walker::live(upper, live);
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    while let Some(item) = walker.next_item()? {
        // Recorded once written: an entry a live walk skipped must not be in the index.
        let record = |index: &mut Option<&mut IndexBuilder>| {
            if let (Some(b), Some(meta), ItemKind::Node | ItemKind::Whiteout) =
                (index.as_deref_mut(), &item.meta, item.kind)
            {
                b.record(&item.tar_path, meta);
            }
        };
        match item.kind {
            ItemKind::Socket => {
                tracing::warn!(path = %item.fs_path.display(), "skipping socket: sockets cannot be archived");
                stats.skipped_sockets.push(item.rel_path);
            }
            ItemKind::Whiteout | ItemKind::OpaqueMarker => {
                record(&mut index);
                out.header(&marker(&item.tar_path))?;
                stats.entries += 1;
            }
            ItemKind::Node => {
                if write_node(&mut walker, &item, out, &mut links, true)? {
                    record(&mut index);
                    stats.entries += 1;
                }
            }
        }
    }
    Ok(stats)
}

/// The header of a whiteout or opaque marker: their metadata is invisible in the merged view,
/// so fixed values keep the output stable.
pub(super) fn marker(tar_path: &[u8]) -> EntryMeta<'_> {
    EntryMeta {
        path: tar_path,
        etype: EntryType::Regular,
        link: None,
        mode: 0o600,
        uid: 0,
        gid: 0,
        size: 0,
        mtime: (0, 0),
        dev: None,
        xattrs: &[],
        protattr: None,
        remove: false,
    }
}

/// Writes one node (a directory's header only when `header`; either way it is listed, its
/// children coming next, with the opaque marker only after a written header). Returns false
/// when a live walk found the node gone (or replaced) before writing anything of it.
pub(super) fn write_node<W: Write>(
    walker: &mut Walker,
    item: &Item,
    out: &mut TarOut<'_, W>,
    links: &mut HashMap<(u64, u64), Vec<u8>>,
    header: bool,
) -> Result<bool> {
    let live = walker.is_live();
    // In a live walk, a node that vanished before anything of it was written is skipped.
    macro_rules! or_gone {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) if live && vanished(&e) => return Ok(false),
                Err(e) => return Err(e),
            }
        };
    }
    let Some(meta) = item.meta.as_ref() else {
        return Ok(true);
    };
    let path = &item.fs_path;
    let ft = meta.file_type();
    if !header {
        debug_assert!(
            ft == FileType::Directory,
            "only directories are listed without a header"
        );
        let dir = or_gone!(walker.open_dir(item));
        walker.descend(item, dir, false)?;
        return Ok(true);
    }
    let mtime = (meta.mtime(), meta.mtime_nsec());
    let mut entry = EntryMeta {
        path: &item.tar_path,
        etype: EntryType::Regular,
        link: None,
        mode: meta.mode(),
        uid: u64::from(meta.uid()),
        gid: u64::from(meta.gid()),
        size: 0,
        mtime,
        dev: None,
        xattrs: &[],
        protattr: None,
        remove: false,
    };
    // The first written path of a hard-linked inode; its later paths link to it.
    let mut first_link = None;
    if ft != FileType::Directory && meta.nlink() > 1 {
        if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
            entry.etype = EntryType::Link;
            entry.link = Some(first);
            out.header(&entry)?;
            return Ok(true);
        }
        first_link = Some((meta.dev(), meta.ino()));
    }
    match ft {
        FileType::Directory => {
            let dir = or_gone!(walker.open_dir(item));
            let classified = or_gone!(xattr::read_classified(path, xattr::of_fd(&dir)));
            entry.xattrs = &classified.portable;
            entry.protattr = classified.protattr.as_deref();
            entry.etype = EntryType::Directory;
            out.header(&entry)?;
            walker.descend(item, dir, classified.opaque)?;
            return Ok(true);
        }
        FileType::RegularFile => {
            let file = or_gone!(walker.open_file(item));
            if live && !same_inode(&file, meta) {
                return Ok(false);
            }
            let classified = or_gone!(xattr::read_classified(path, xattr::of_fd(&file)));
            entry.xattrs = &classified.portable;
            entry.protattr = classified.protattr.as_deref();
            entry.size = meta.size();
            out.header(&entry)?;
            if let Some(key) = first_link {
                links.insert(key, item.tar_path.clone());
            }
            let sparse = meta.blocks().saturating_mul(512) < meta.size();
            out.file_data(&file, path, meta.size(), sparse, live)?;
            return Ok(true);
        }
        _ => {}
    }
    let classified = or_gone!(xattr::read_classified(path, xattr::Source::Path));
    entry.xattrs = &classified.portable;
    entry.protattr = classified.protattr.as_deref();
    let target;
    match ft {
        FileType::Symlink => {
            target = or_gone!(item.read_link());
            entry.etype = EntryType::Symlink;
            entry.link = Some(target.as_bytes());
        }
        FileType::CharacterDevice | FileType::BlockDevice => {
            entry.etype = if ft == FileType::CharacterDevice {
                EntryType::Char
            } else {
                EntryType::Block
            };
            entry.dev = Some((
                rustix::fs::major(meta.rdev()),
                rustix::fs::minor(meta.rdev()),
            ));
        }
        FileType::Fifo => entry.etype = EntryType::Fifo,
        _ => {}
    }
    out.header(&entry)?;
    if let Some(key) = first_link {
        links.insert(key, item.tar_path.clone());
    }
    Ok(true)
}

/// Whether an error means the entry was removed or replaced after it was listed.
fn vanished(e: &ArchiveError) -> bool {
    let io = match e {
        ArchiveError::Io { source, .. } => source,
        _ => return false,
    };
    io.kind() == io::ErrorKind::NotFound
        || matches!(
            io.raw_os_error(),
            Some(libc_errno) if libc_errno == rustix::io::Errno::NOTDIR.raw_os_error()
                || libc_errno == rustix::io::Errno::LOOP.raw_os_error()
                || libc_errno == rustix::io::Errno::NXIO.raw_os_error()
        )
}

/// Whether the open `file` is still the regular file `meta` was listed as.
fn same_inode(file: &File, meta: &super::walk::Meta) -> bool {
    match rustix::fs::fstat(file) {
        Ok(st) => {
            st.st_ino == meta.ino()
                && st.st_dev == meta.dev()
                && FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
        }
        Err(_) => false,
    }
}

/// Writes compressed bytes to the spool while hashing them.
pub(super) struct HashingFile<'o> {
    file: File,
    hasher: Sha256,
    written: u64,
    observer: Option<&'o dyn SpoolObserver>,
}

impl Write for HashingFile<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        if let Some(o) = self.observer {
            o.written(self.written);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Removes a temp file unless disarmed.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// A unique hidden sibling name (`.{name}.{tag}.…`) for temp files and staging dirs.
pub fn sibling_temp_name(name: &[u8], tag: &str) -> std::ffi::OsString {
    let mut hidden = Vec::with_capacity(name.len() + 1);
    hidden.push(b'.');
    hidden.extend_from_slice(name);
    crate::util::unique_temp_name(&hidden, tag)
}

pub fn pack_to_file(
    upper: &Path,
    spool: &Path,
    opts: &PackOptions,
    progress: Progress<'_>,
    observer: Option<&dyn SpoolObserver>,
    index: Option<&mut IndexBuilder>,
) -> Result<PackStats> {
    pack_with(spool, opts, progress, observer, |out| {
        write_tree(upper, out, index, opts.live)
    })
}

/// Compresses what `write` puts into the tar into `spool` (temp name, then renamed), hashing
/// both streams.
pub(super) fn pack_with(
    spool: &Path,
    opts: &PackOptions,
    progress: Progress<'_>,
    observer: Option<&dyn SpoolObserver>,
    write: impl FnOnce(
        &mut TarOut<'_, zstd::stream::write::Encoder<'static, HashingFile<'_>>>,
    ) -> Result<TreeStats>,
) -> Result<PackStats> {
    let (dir, name) = match (spool.parent(), spool.file_name()) {
        (Some(d), Some(n)) => (
            if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            },
            n,
        ),
        _ => {
            return Err(ArchiveError::Io {
                op: "create spool",
                path: spool.to_owned(),
                source: io::Error::from(io::ErrorKind::InvalidInput),
            });
        }
    };
    let tmp = dir.join(sibling_temp_name(name.as_bytes(), "tmp"));
    // Private (0600): the spool holds the layer's data.
    let file = crate::util::private::file_options()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io_err("create spool", &tmp))?;
    let mut guard = TempGuard(Some(tmp.clone()));
    if let Some(o) = observer {
        o.created(&file);
    }
    let compress = |source| ArchiveError::Compress {
        path: spool.to_owned(),
        source,
    };
    let sink = HashingFile {
        file,
        hasher: Sha256::new(),
        written: 0,
        observer,
    };
    let mut enc = zstd::stream::write::Encoder::new(sink, opts.level).map_err(compress)?;
    enc.multithread(opts.workers.max(1)).map_err(compress)?;
    enc.include_checksum(true).map_err(compress)?;
    let mut out = TarOut::new(enc, spool, true, progress)?;
    let tree = write(&mut out)?;
    let (enc, uncompressed_size, tar_digest) = out.finish()?;
    let sink = enc.finish().map_err(compress)?;
    // Not fsynced: a spool is a cache of its source tree, and whoever keeps one across a crash
    // checks it against its digest before use (see `layer::spool`).
    fs::rename(&tmp, spool).map_err(io_err("rename spool into", spool))?;
    guard.0 = None;
    Ok(PackStats {
        digest: hex::encode(sink.hasher.finalize()),
        uncompressed_digest: tar_digest.unwrap_or_default(),
        compressed_size: sink.written,
        uncompressed_size,
        entries: tree.entries,
        skipped_sockets: tree.skipped_sockets,
    })
}
