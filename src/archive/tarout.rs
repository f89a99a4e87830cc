//! Deterministic PAX tar writer over a large staging buffer.
//!
//! File data is read straight into the buffer (no intermediate copy) and handed to the sink in
//! 1 MiB chunks, so zstd sees large writes and the uncompressed sha256 runs on whole chunks.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use super::error::{ArchiveError, Result};

const BLOCK: usize = 512;
const BUF_SIZE: usize = 1 << 20;
/// Largest value of an 8-byte octal header field (uid, gid).
const MAX_OCTAL_ID: u64 = 0o7_777_777;
/// Largest value of a 12-byte octal header field (mtime).
const MAX_OCTAL_TIME: i64 = 0o77_777_777_777;
const PROGRESS_STEP: u64 = 4 << 20;

/// Progress callback: cumulative bytes.
pub type Progress<'a> = Option<&'a (dyn Fn(u64) + Sync)>;

/// Metadata of one tar entry, as written.
#[derive(Debug)]
pub struct EntryMeta<'a> {
    pub path: &'a [u8],
    pub etype: EntryType,
    pub link: Option<&'a [u8]>,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: (i64, u32),
    pub dev: Option<(u32, u32)>,
    pub xattrs: &'a [(Vec<u8>, Vec<u8>)],
    pub protattr: Option<&'a [u8]>,
    /// A delta's removal entry: whatever is at `path` goes (see [`super::DELTA_REMOVE_PAX_KEY`]).
    pub remove: bool,
}

/// sha256 of the tar stream on its own thread, fed with full buffers that rotate back.
///
/// Hashing inline would serialise it with reading files on the producer thread; on its own
/// thread it overlaps with both reading and the zstd workers.
struct HashThread {
    tx: SyncSender<(Box<[u8]>, usize)>,
    back: Receiver<Box<[u8]>>,
    handle: JoinHandle<String>,
}

impl HashThread {
    fn spawn(spare_buffers: usize) -> io::Result<Self> {
        let (tx, rx) = sync_channel::<(Box<[u8]>, usize)>(spare_buffers);
        let (back_tx, back) = sync_channel::<Box<[u8]>>(spare_buffers);
        for _ in 0..spare_buffers {
            let _ = back_tx.send(vec![0u8; BUF_SIZE].into_boxed_slice());
        }
        let handle = std::thread::Builder::new()
            .name("zlayer-tar-sha256".to_owned())
            .spawn(move || {
                let mut h = Sha256::new();
                for (buf, n) in rx {
                    h.update(&buf[..n]);
                    // The writer may be gone after its last buffer; keep hashing what is queued.
                    let _ = back_tx.send(buf);
                }
                hex::encode(h.finalize())
            })?;
        Ok(HashThread { tx, back, handle })
    }
}

fn hash_thread_gone() -> io::Error {
    io::Error::other("tar hashing thread stopped")
}

/// Tar stream writer with an optional sha256 of everything written.
pub struct TarOut<'a, W: Write> {
    sink: W,
    /// Names the destination in errors (the spool, or the copy source).
    sink_name: PathBuf,
    buf: Box<[u8]>,
    fill: usize,
    hasher: Option<HashThread>,
    total: u64,
    progress: Progress<'a>,
    reported: u64,
}

impl<'a, W: Write> TarOut<'a, W> {
    pub fn new(sink: W, sink_name: &Path, hash: bool, progress: Progress<'a>) -> Result<Self> {
        let hasher = if hash {
            Some(
                HashThread::spawn(4).map_err(|source| ArchiveError::Compress {
                    path: sink_name.to_owned(),
                    source,
                })?,
            )
        } else {
            None
        };
        Ok(TarOut {
            sink,
            sink_name: sink_name.to_owned(),
            buf: vec![0u8; BUF_SIZE].into_boxed_slice(),
            fill: 0,
            hasher,
            total: 0,
            progress,
            reported: 0,
        })
    }

    fn sink_err(&self, source: io::Error) -> ArchiveError {
        ArchiveError::Compress {
            path: self.sink_name.clone(),
            source,
        }
    }

    fn flush_buf(&mut self) -> Result<()> {
        if self.fill == 0 {
            return Ok(());
        }
        if let Err(e) = self.sink.write_all(&self.buf[..self.fill]) {
            return Err(self.sink_err(e));
        }
        if let Some(h) = self.hasher.as_ref() {
            let next = h
                .back
                .recv()
                .map_err(|_| self.sink_err(hash_thread_gone()))?;
            let full = std::mem::replace(&mut self.buf, next);
            h.tx.send((full, self.fill))
                .map_err(|_| self.sink_err(hash_thread_gone()))?;
        }
        self.total += self.fill as u64;
        self.fill = 0;
        if let Some(p) = self.progress
            && self.total - self.reported >= PROGRESS_STEP
        {
            self.reported = self.total;
            p(self.total);
        }
        Ok(())
    }

    fn push(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            if self.fill == self.buf.len() {
                self.flush_buf()?;
            }
            let n = data.len().min(self.buf.len() - self.fill);
            self.buf[self.fill..self.fill + n].copy_from_slice(&data[..n]);
            self.fill += n;
            data = &data[n..];
        }
        Ok(())
    }

    fn push_zeros(&mut self, mut n: u64) -> Result<()> {
        while n > 0 {
            if self.fill == self.buf.len() {
                self.flush_buf()?;
            }
            let k = usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(self.buf.len() - self.fill);
            self.buf[self.fill..self.fill + k].fill(0);
            self.fill += k;
            n -= k as u64;
        }
        Ok(())
    }

    fn pad(&mut self, size: u64) -> Result<()> {
        let rem = (size % BLOCK as u64) as usize;
        if rem != 0 {
            self.push_zeros((BLOCK - rem) as u64)?;
        }
        Ok(())
    }

    /// Writes the PAX header (if needed) and the ustar header of one entry.
    pub fn header(&mut self, m: &EntryMeta<'_>) -> Result<()> {
        let mut pax = Vec::new();
        if m.path.len() > 100 {
            pax_record(&mut pax, b"path", m.path);
        }
        if let Some(link) = m.link.filter(|l| l.len() > 100) {
            pax_record(&mut pax, b"linkpath", link);
        }
        if m.uid > MAX_OCTAL_ID {
            pax_record(&mut pax, b"uid", m.uid.to_string().as_bytes());
        }
        if m.gid > MAX_OCTAL_ID {
            pax_record(&mut pax, b"gid", m.gid.to_string().as_bytes());
        }
        let (secs, nsec) = m.mtime;
        if nsec != 0 || !(0..=MAX_OCTAL_TIME).contains(&secs) {
            pax_record(&mut pax, b"mtime", format_pax_time(secs, nsec).as_bytes());
        }
        if m.remove {
            pax_record(&mut pax, super::DELTA_REMOVE_PAX_KEY.as_bytes(), b"1");
        }
        if let Some(p) = m.protattr {
            pax_record(&mut pax, super::xattr::PROTATTR_PAX_KEY.as_bytes(), p);
        }
        for (name, value) in m.xattrs {
            let key = [super::xattr::XATTR_PAX_PREFIX.as_bytes(), name].concat();
            pax_record(&mut pax, &key, value);
        }
        if !pax.is_empty() {
            let mut h = Header::new_ustar();
            set_name(&mut h, b"././@PaxHeader", false);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(pax.len() as u64);
            h.set_entry_type(EntryType::XHeader);
            h.set_cksum();
            self.push(h.as_bytes())?;
            self.push(&pax)?;
            self.pad(pax.len() as u64)?;
        }
        let mut h = Header::new_ustar();
        set_name(&mut h, m.path, false);
        if let Some(link) = m.link {
            set_name(&mut h, link, true);
        }
        h.set_mode(m.mode & 0o7777);
        h.set_uid(m.uid);
        h.set_gid(m.gid);
        h.set_size(m.size);
        h.set_mtime(u64::try_from(secs.clamp(0, MAX_OCTAL_TIME)).unwrap_or(0));
        h.set_entry_type(m.etype);
        if let Some((major, minor)) = m.dev {
            let path = PathBuf::from(String::from_utf8_lossy(m.path).into_owned());
            h.set_device_major(major)
                .and_then(|()| h.set_device_minor(minor))
                .map_err(|source| ArchiveError::Io {
                    op: "encode device numbers of",
                    path,
                    source,
                })?;
        }
        h.set_cksum();
        self.push(h.as_bytes())
    }

    /// Streams `size` bytes of `file` as entry data; holes are emitted as zeros without reading.
    /// With `live` (the file may be written meanwhile), a file that shrinks or cannot be read
    /// further is padded with zeros to `size`: the entry is torn and its index token will not
    /// match the file's next state, so a later capture writes it again.
    pub fn file_data(
        &mut self,
        file: &File,
        path: &Path,
        size: u64,
        sparse: bool,
        live: bool,
    ) -> Result<()> {
        if size > BUF_SIZE as u64 {
            let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::Sequential);
        }
        let mut pos = 0u64;
        while pos < size {
            let (is_data, end) = if sparse {
                next_region(file, pos, size)
            } else {
                (true, size)
            };
            if !is_data {
                self.push_zeros(end - pos)?;
                pos = end;
                continue;
            }
            while pos < end {
                if self.fill == self.buf.len() {
                    self.flush_buf()?;
                }
                let room = usize::try_from(end - pos)
                    .unwrap_or(usize::MAX)
                    .min(self.buf.len() - self.fill);
                let n = match file.read_at(&mut self.buf[self.fill..self.fill + room], pos) {
                    Ok(0) | Err(_) if live => {
                        self.push_zeros(size - pos)?;
                        return self.pad(size);
                    }
                    Ok(0) => {
                        return Err(ArchiveError::FileChanged {
                            path: path.to_owned(),
                        });
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(source) => {
                        return Err(ArchiveError::Io {
                            op: "read",
                            path: path.to_owned(),
                            source,
                        });
                    }
                };
                self.fill += n;
                pos += n as u64;
            }
        }
        self.pad(size)
    }

    /// Writes the end-of-archive marker, flushes, and returns the sink, size and hex sha256.
    pub fn finish(mut self) -> Result<(W, u64, Option<String>)> {
        self.push_zeros(2 * BLOCK as u64)?;
        self.flush_buf()?;
        if let Some(p) = self.progress {
            p(self.total);
        }
        let digest = match self.hasher.take() {
            Some(HashThread { tx, back, handle }) => {
                drop(tx);
                drop(back);
                Some(
                    handle
                        .join()
                        .map_err(|_| self.sink_err(hash_thread_gone()))?,
                )
            }
            None => None,
        };
        Ok((self.sink, self.total, digest))
    }
}

/// The region at `pos`: (is data, end), found with SEEK_DATA/SEEK_HOLE.
fn next_region(file: &File, pos: u64, size: u64) -> (bool, u64) {
    use rustix::fs::{SeekFrom, seek};
    match seek(file, SeekFrom::Data(pos)) {
        Ok(d) if d > pos => (false, d.min(size)),
        Ok(_) => match seek(file, SeekFrom::Hole(pos)) {
            Ok(h) if h > pos => (true, h.min(size)),
            _ => (true, size),
        },
        // No data after pos: the rest is a hole.
        Err(rustix::io::Errno::NXIO) => (false, size),
        Err(_) => (true, size),
    }
}

/// Stores a name in the ustar `name` or `linkname` field; longer names go to PAX and are cut here.
fn set_name(h: &mut Header, name: &[u8], link: bool) {
    if let Some(u) = h.as_ustar_mut() {
        let field: &mut [u8; 100] = if link { &mut u.linkname } else { &mut u.name };
        let n = name.len().min(100);
        field[..n].copy_from_slice(&name[..n]);
    }
}

fn digits(mut n: usize) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// Appends one `"<len> <key>=<value>\n"` record.
pub fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let base = key.len() + value.len() + 3;
    let mut len = base + 1;
    while len != base + digits(len) {
        len = base + digits(len);
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// `secs.nnnnnnnnn`, with negative times written as a negative decimal.
pub fn format_pax_time(secs: i64, nsec: u32) -> String {
    if secs < 0 && nsec > 0 {
        format!("-{}.{:09}", -(secs + 1), 1_000_000_000 - nsec)
    } else {
        format!("{secs}.{nsec:09}")
    }
}

/// Parses a PAX time (`123`, `123.5`, `-1.25`) into (secs, nsec).
pub fn parse_pax_time(s: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(s).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let secs: i64 = int.parse().ok()?;
    let mut nsec: u32 = 0;
    for (i, b) in frac.bytes().take(9).enumerate() {
        nsec += u32::from(b - b'0') * 10u32.pow(8 - i as u32);
    }
    if !neg {
        return Some((secs, nsec));
    }
    if nsec == 0 {
        Some((-secs, 0))
    } else {
        Some((-secs - 1, 1_000_000_000 - nsec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_lengths_are_self_consistent() {
        for vlen in [
            0usize, 1, 5, 6, 7, 90, 95, 96, 97, 98, 99, 100, 994, 995, 996, 1000,
        ] {
            let mut out = Vec::new();
            let value = vec![b'v'; vlen];
            pax_record(&mut out, b"path", &value);
            let sp = out.iter().position(|b| *b == b' ').unwrap();
            let len: usize = std::str::from_utf8(&out[..sp]).unwrap().parse().unwrap();
            assert_eq!(len, out.len(), "value len {vlen}");
        }
    }

    #[test]
    fn pax_times_round_trip() {
        for (s, n) in [
            (0i64, 0u32),
            (1, 1),
            (1_700_000_000, 123_456_789),
            (-1, 500_000_000),
            (-5, 0),
            (-2, 1),
        ] {
            let text = format_pax_time(s, n);
            assert_eq!(parse_pax_time(text.as_bytes()), Some((s, n)), "{text}");
        }
        assert_eq!(parse_pax_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
        assert_eq!(parse_pax_time(b"1.2x"), None);
        assert_eq!(parse_pax_time(b""), None);
    }
}
