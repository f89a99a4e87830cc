//! Reading a tar stream (ours or foreign) into an [`Extractor`], with every hostile-input check.
//!
//! The tar crate is used in raw mode so that PAX and GNU long-name headers are size-capped
//! before they are read; PAX `size` must agree with the header (no parser differentials).

use std::cell::Cell;
use std::io::{self, Read};
use std::path::Path;
use std::rc::Rc;

use rustix::fs::FileType;
use tar::EntryType;

use super::DELTA_REMOVE_PAX_KEY;
use super::error::{ArchiveError, Result};
use super::extract::{Extractor, Meta};
use super::target::{Staging, TargetSlot};
use super::tarout::{Progress, parse_pax_time};
use super::walk::{OPAQUE_MARKER, WHITEOUT_PREFIX};
use super::{UnpackOptions, UnpackStats, xattr};

/// Cap on one PAX extended header or GNU long name.
pub const MAX_EXTENSION_HEADER: u64 = 1 << 20;
const BLOCK: u64 = 512;
const PROGRESS_STEP: u64 = 4 << 20;
/// Read size from a compressed source; large reads mean few syscalls.
pub(super) const READ_BUF: usize = 1 << 20;

/// Why [`SourceReader`] stopped; carried inside `io::Error` through the tar crate.
#[derive(Debug)]
enum Stop {
    TooLarge(u64),
    Ratio(u64),
    Decode(io::Error),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::TooLarge(l) => write!(f, "uncompressed size above {l} bytes"),
            Stop::Ratio(r) => write!(f, "expansion ratio above {r}"),
            Stop::Decode(_) => write!(f, "decompression failed"),
        }
    }
}

impl std::error::Error for Stop {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Stop::Decode(e) => Some(e),
            _ => None,
        }
    }
}

/// The decompressed stream: counts bytes, enforces the size and ratio caps, reports progress.
pub struct SourceReader<'p, R> {
    inner: R,
    count: Rc<Cell<u64>>,
    max_total: u64,
    /// (compressed size, max ratio) for archives read from a spool.
    ratio: Option<(u64, u64)>,
    progress: Progress<'p>,
    reported: u64,
}

impl<'p, R: Read> SourceReader<'p, R> {
    /// The count of decompressed bytes read so far, shared (it stays readable after the
    /// reader is handed to the extraction).
    pub(super) fn counter(&self) -> Rc<Cell<u64>> {
        Rc::clone(&self.count)
    }

    pub fn new(
        inner: R,
        max_total: u64,
        ratio: Option<(u64, u64)>,
        progress: Progress<'p>,
    ) -> Self {
        SourceReader {
            inner,
            count: Rc::new(Cell::new(0)),
            max_total,
            ratio,
            progress,
            reported: 0,
        }
    }
}

impl<R: Read> Read for SourceReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.inner.read(buf) {
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::UnexpectedEof
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                return Err(e);
            }
            Err(e) => return Err(io::Error::other(Stop::Decode(e))),
        };
        let total = self.count.get() + n as u64;
        self.count.set(total);
        if total > self.max_total {
            return Err(io::Error::other(Stop::TooLarge(self.max_total)));
        }
        if let Some((compressed, ratio)) = self.ratio
            && total > compressed.max(1).saturating_mul(ratio)
        {
            return Err(io::Error::other(Stop::Ratio(ratio)));
        }
        if let Some(p) = self.progress
            && total - self.reported >= PROGRESS_STEP
        {
            self.reported = total;
            p(total);
        }
        Ok(n)
    }
}

/// Maps a stream error to the error that explains it.
fn stream_err(e: io::Error, archive: &Path, entry: &str) -> ArchiveError {
    if e.get_ref().is_some_and(|i| i.is::<Stop>()) {
        return match e
            .into_inner()
            .and_then(|b| b.downcast::<Stop>().ok())
            .map(|b| *b)
        {
            Some(Stop::TooLarge(limit)) => ArchiveError::TooLarge {
                archive: archive.to_owned(),
                limit,
            },
            Some(Stop::Ratio(ratio)) => ArchiveError::RatioExceeded {
                archive: archive.to_owned(),
                ratio,
            },
            Some(Stop::Decode(source)) => ArchiveError::Decompress {
                archive: archive.to_owned(),
                source,
            },
            None => ArchiveError::Truncated {
                archive: archive.to_owned(),
            },
        };
    }
    if e.kind() == io::ErrorKind::UnexpectedEof {
        return ArchiveError::Truncated {
            archive: archive.to_owned(),
        };
    }
    ArchiveError::Malformed {
        archive: archive.to_owned(),
        entry: entry.to_owned(),
        source: e,
    }
}

/// Extended-header state that applies to the next real entry.
#[derive(Debug, Default)]
struct Pending {
    pax_seen: bool,
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    uid: Option<u64>,
    gid: Option<u64>,
    size: Option<u64>,
    mtime: Option<(i64, u32)>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    protattr: Option<Vec<u8>>,
    /// The value of `ZLAYER.delta.remove`, if present.
    delta_remove: Option<Vec<u8>>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

fn malformed(archive: &Path, entry: &str, msg: &str) -> ArchiveError {
    ArchiveError::Malformed {
        archive: archive.to_owned(),
        entry: entry.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidData, msg.to_owned()),
    }
}

fn parse_u64(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn apply_pax(p: &mut Pending, data: &[u8], archive: &Path, entry: &str) -> Result<()> {
    if std::mem::replace(&mut p.pax_seen, true) {
        return Err(malformed(archive, entry, "two PAX headers for one entry"));
    }
    for ext in tar::PaxExtensions::new(data) {
        let ext = ext.map_err(|e| stream_err(e, archive, entry))?;
        let (key, value) = (ext.key_bytes(), ext.value_bytes());
        let bad = || malformed(archive, entry, "invalid PAX record value");
        match key {
            b"path" => p.path = Some(value.to_vec()),
            b"linkpath" => p.linkpath = Some(value.to_vec()),
            b"uid" => p.uid = Some(parse_u64(value).ok_or_else(bad)?),
            b"gid" => p.gid = Some(parse_u64(value).ok_or_else(bad)?),
            b"size" => p.size = Some(parse_u64(value).ok_or_else(bad)?),
            b"mtime" => p.mtime = Some(parse_pax_time(value).ok_or_else(bad)?),
            k if k == xattr::PROTATTR_PAX_KEY.as_bytes() => p.protattr = Some(value.to_vec()),
            k if k == DELTA_REMOVE_PAX_KEY.as_bytes() => p.delta_remove = Some(value.to_vec()),
            k if k.starts_with(xattr::XATTR_PAX_PREFIX.as_bytes()) => {
                let name = &k[xattr::XATTR_PAX_PREFIX.len()..];
                if !xattr::is_portable(name) {
                    return Err(ArchiveError::ForbiddenXattr {
                        entry: entry.to_owned(),
                        xattr: String::from_utf8_lossy(name).into_owned(),
                    });
                }
                p.xattrs.push((name.to_vec(), value.to_vec()));
            }
            k if k.starts_with(b"GNU.sparse.") => {
                return Err(ArchiveError::Unsupported {
                    entry: entry.to_owned(),
                    what: "GNU sparse PAX records".to_owned(),
                });
            }
            // atime, ctime, uname, gname, comment, charset and vendor keys carry nothing we restore.
            _ => {}
        }
    }
    Ok(())
}

/// Splits a tar path into safe components; `./` and empty components vanish.
pub fn normalize(raw: &[u8]) -> std::result::Result<Vec<&[u8]>, &'static str> {
    if raw.is_empty() {
        return Err("empty path");
    }
    if raw[0] == b'/' {
        return Err("absolute path");
    }
    if raw.contains(&0) {
        return Err("NUL byte in path");
    }
    let comps: Vec<&[u8]> = raw
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .collect();
    if comps.iter().any(|c| *c == b"..") {
        return Err("'..' component");
    }
    Ok(comps)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Extracts a whole tar stream into `ex`; checks the end-of-archive marker and trailing bytes.
pub fn extract_stream<R: Read>(
    src: SourceReader<'_, R>,
    ex: &mut Extractor,
    archive: &Path,
) -> Result<u64> {
    let count = src.count.clone();
    let mut ar = tar::Archive::new(src);
    let mut entries = ar
        .entries()
        .map_err(|e| stream_err(e, archive, ""))?
        .raw(true);
    let mut pending = Pending::default();
    let mut last_end = 0u64;
    let mut n_entries = 0u64;
    let mut last_name = String::new();
    loop {
        let mut entry = match entries.next() {
            None => break,
            Some(Ok(e)) => e,
            Some(Err(e)) => return Err(stream_err(e, archive, &last_name)),
        };
        let header = entry.header().clone();
        let hname = lossy(&header.path_bytes());
        let size = entry.size();
        last_end = entry.raw_file_position() + size;
        let etype = header.entry_type();
        let ext_kind = match etype {
            EntryType::XHeader => Some("PAX header"),
            EntryType::GNULongName => Some("GNU long name"),
            EntryType::GNULongLink => Some("GNU long link"),
            _ => None,
        };
        if let Some(kind) = ext_kind {
            if size > MAX_EXTENSION_HEADER {
                return Err(ArchiveError::HeaderTooLarge {
                    entry: format!("{hname} ({kind})"),
                    size,
                    limit: MAX_EXTENSION_HEADER,
                });
            }
            let mut data = Vec::with_capacity(size as usize);
            entry
                .read_to_end(&mut data)
                .map_err(|e| stream_err(e, archive, &hname))?;
            if (data.len() as u64) < size {
                return Err(ArchiveError::Truncated {
                    archive: archive.to_owned(),
                });
            }
            match etype {
                EntryType::XHeader => apply_pax(&mut pending, &data, archive, &hname)?,
                _ => {
                    let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
                    data.truncate(end);
                    let slot = if etype == EntryType::GNULongName {
                        &mut pending.long_name
                    } else {
                        &mut pending.long_link
                    };
                    if slot.replace(data).is_some() {
                        return Err(malformed(
                            archive,
                            &hname,
                            "two GNU long names for one entry",
                        ));
                    }
                }
            }
            continue;
        }
        let p = std::mem::take(&mut pending);
        let path = p
            .path
            .clone()
            .or(p.long_name.clone())
            .unwrap_or_else(|| header.path_bytes().into_owned());
        let name = lossy(&path);
        last_name.clone_from(&name);
        if let Some(pax_size) = p.size
            && pax_size
                != header
                    .entry_size()
                    .map_err(|e| stream_err(e, archive, &name))?
        {
            return Err(malformed(
                archive,
                &name,
                "PAX size differs from the header size",
            ));
        }
        let read_err = |e: io::Error| stream_err(e, archive, &name);
        extract_entry(ex, &mut entry, p, &path, &name, archive, &read_err)?;
        // Consume what the entry did not read, so truncation inside it is detected here.
        io::copy(&mut entry, &mut io::sink()).map_err(read_err)?;
        if count.get() < last_end {
            return Err(ArchiveError::Truncated {
                archive: archive.to_owned(),
            });
        }
        n_entries += 1;
    }
    if pending.pax_seen || pending.long_name.is_some() || pending.long_link.is_some() {
        return Err(ArchiveError::Truncated {
            archive: archive.to_owned(),
        });
    }
    // The loop ends after reading one zero block; plain EOF there means the stream was cut.
    if count.get() < last_end.div_ceil(BLOCK) * BLOCK + BLOCK {
        return Err(ArchiveError::Truncated {
            archive: archive.to_owned(),
        });
    }
    let mut src = ar.into_inner();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = src
            .read(&mut buf)
            .map_err(|e| stream_err(e, archive, "end of archive"))?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|b| *b != 0) {
            return Err(ArchiveError::TrailingData {
                archive: archive.to_owned(),
            });
        }
    }
    if let Some(p) = src.progress {
        p(src.count.get());
    }
    Ok(n_entries)
}

fn extract_entry<R: Read>(
    ex: &mut Extractor,
    entry: &mut tar::Entry<'_, R>,
    p: Pending,
    path: &[u8],
    name: &str,
    archive: &Path,
    read_err: &dyn Fn(io::Error) -> ArchiveError,
) -> Result<()> {
    let header = &entry.header().clone();
    let unsafe_path = |reason| ArchiveError::UnsafePath {
        entry: name.to_owned(),
        reason,
    };
    let comps = normalize(path).map_err(unsafe_path)?;
    let field = |e: io::Error| ArchiveError::Malformed {
        archive: archive.to_owned(),
        entry: name.to_owned(),
        source: e,
    };
    let id = |v: u64| {
        u32::try_from(v).map_err(|_| ArchiveError::Unsupported {
            entry: name.to_owned(),
            what: format!("owner id {v}"),
        })
    };
    let meta = Meta {
        mode: header.mode().map_err(field)?,
        uid: id(match p.uid {
            Some(u) => u,
            None => header.uid().map_err(field)?,
        })?,
        gid: id(match p.gid {
            Some(g) => g,
            None => header.gid().map_err(field)?,
        })?,
        mtime: match p.mtime {
            Some(t) => t,
            None => (
                i64::try_from(header.mtime().map_err(field)?).unwrap_or(i64::MAX),
                0,
            ),
        },
        xattrs: p.xattrs,
        protattr: p.protattr,
    };
    let etype = header.entry_type();
    if let Some(value) = &p.delta_remove {
        let empty_regular =
            matches!(etype, EntryType::Regular | EntryType::Continuous) && entry.size() == 0;
        return removal(ex, &comps, path, name, archive, empty_regular, value);
    }
    let link = || {
        p.linkpath
            .clone()
            .or(p.long_link.clone())
            .or_else(|| header.link_name_bytes().map(|c| c.into_owned()))
            .unwrap_or_default()
    };
    if comps.is_empty() {
        if etype != EntryType::Directory {
            return Err(unsafe_path("only a directory may name the target root"));
        }
        return ex.root_dir(name, meta);
    }
    let leaf = comps[comps.len() - 1];
    if let Some(wh) = leaf.strip_prefix(WHITEOUT_PREFIX) {
        if !matches!(etype, EntryType::Regular | EntryType::Continuous) {
            return Err(ArchiveError::BadWhiteout {
                entry: name.to_owned(),
            });
        }
        if leaf == OPAQUE_MARKER {
            return ex.opaque(&comps, name);
        }
        return ex.whiteout(&comps, wh, name);
    }
    let dev = || -> Result<(u32, u32)> {
        Ok((
            header.device_major().map_err(field)?.unwrap_or(0),
            header.device_minor().map_err(field)?.unwrap_or(0),
        ))
    };
    match etype {
        EntryType::Directory => ex.dir(&comps, name, meta),
        EntryType::Regular | EntryType::Continuous => {
            let size = entry.size();
            ex.file(&comps, name, &meta, size, entry, read_err)
        }
        EntryType::Symlink => ex.symlink(&comps, name, &link(), &meta),
        EntryType::Link => {
            let target = link();
            let tname = lossy(&target);
            let tcomps = normalize(&target).map_err(|reason| ArchiveError::UnsafePath {
                entry: format!("{name} -> {tname}"),
                reason,
            })?;
            ex.hardlink(&comps, name, &tcomps, &tname)
        }
        EntryType::Char | EntryType::Block => {
            let dev = dev()?;
            if etype == EntryType::Char && dev == (0, 0) {
                return ex.whiteout(&comps, leaf, name);
            }
            let ft = if etype == EntryType::Char {
                FileType::CharacterDevice
            } else {
                FileType::BlockDevice
            };
            ex.special(&comps, name, ft, dev, &meta)
        }
        EntryType::Fifo => ex.special(&comps, name, FileType::Fifo, (0, 0), &meta),
        other => Err(ArchiveError::Unsupported {
            entry: name.to_owned(),
            what: format!("entry type {other:?}"),
        }),
    }
}

/// A `ZLAYER.delta.remove` entry: only deltas have them, and only as an empty regular entry
/// naming a plain path (a whiteout is removed by its plain name).
fn removal(
    ex: &mut Extractor,
    comps: &[&[u8]],
    path: &[u8],
    name: &str,
    archive: &Path,
    empty_regular: bool,
    value: &[u8],
) -> Result<()> {
    if !ex.is_delta() {
        return Err(ArchiveError::RemovalInFullArchive {
            entry: name.to_owned(),
        });
    }
    if value != b"1" {
        return Err(malformed(
            archive,
            name,
            "invalid ZLAYER.delta.remove value",
        ));
    }
    let bad = |reason| ArchiveError::BadRemoval {
        entry: name.to_owned(),
        reason,
    };
    if !empty_regular {
        return Err(bad("not an empty regular entry"));
    }
    let Some(leaf) = comps.last() else {
        return Err(bad("the root cannot be removed"));
    };
    if path.ends_with(b"/") {
        return Err(bad("trailing slash"));
    }
    if leaf.starts_with(WHITEOUT_PREFIX) {
        return Err(bad("names a .wh. entry instead of the plain path"));
    }
    ex.remove(comps, name)
}

/// Normalizes `sha256:<hex>` or `<hex>` to lowercase hex.
pub fn parse_digest(d: &str) -> Result<String> {
    let hex = d.strip_prefix("sha256:").unwrap_or(d);
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ArchiveError::InvalidDigest {
            digest: d.to_owned(),
        });
    }
    Ok(hex.to_ascii_lowercase())
}

/// Extracts into a staging dir next to the target and swaps it in; the target is never
/// touched when anything fails.
pub fn extract_into_target<R: Read>(
    slot: &TargetSlot,
    src: SourceReader<'_, R>,
    archive: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackStats> {
    let (staging, root) = Staging::create(slot)?;
    let count = src.count.clone();
    let mut ex = Extractor::new(root, opts);
    let result = extract_stream(src, &mut ex, archive).and_then(|n| Ok((n, ex.finish()?)));
    match result {
        Ok((entries, root)) => match staging.swap(root) {
            Ok(()) => Ok(UnpackStats {
                entries,
                uncompressed_size: count.get(),
            }),
            Err(e) => Err(e),
        },
        Err(e) => Err(staging.discard(e)),
    }
}
