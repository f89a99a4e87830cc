//! Reading a compressed archive once: one thread hashes and decompresses it, the caller's
//! thread extracts the tar stream ([`super::unpack`]) into a staging dir, and only an archive
//! whose sha256 matches is swapped in.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::mpsc;

use sha2::{Digest, Sha256};

use super::error::{ArchiveError, Result, io_err};
use super::extract::Extractor;
use super::target::{Staging, check_target};
use super::tarout::Progress;
use super::unpack::{READ_BUF, SourceReader, extract_into_target, extract_stream, parse_digest};
use super::{UnpackOptions, UnpackStats};

/// Passes bytes through while hashing them.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Decoded tar bytes travel from the decoding thread to the extractor in chunks this size.
const DECODED_CHUNK: usize = 512 * 1024;
/// Chunks decoded ahead of the extractor at most (bounds memory and a bomb's head start).
const DECODED_AHEAD: usize = 4;

/// Hashes and decompresses `src` into chunks for [`ChannelReader`]; then reads whatever is left
/// of `src` (all of it when the extractor stopped early) and returns the hex sha256 of it all.
fn decode_and_hash<R: Read>(
    src: R,
    tx: mpsc::SyncSender<io::Result<Vec<u8>>>,
    spare: mpsc::Receiver<Vec<u8>>,
) -> io::Result<String> {
    let mut hashing = HashingReader {
        inner: src,
        hasher: Sha256::new(),
    };
    let decoded = zstd::stream::read::Decoder::with_buffer(io::BufReader::with_capacity(
        READ_BUF,
        &mut hashing,
    ));
    match decoded {
        Err(e) => {
            let _ = tx.send(Err(e));
        }
        Ok(mut decoder) => 'chunks: loop {
            let mut buf = spare.try_recv().unwrap_or_default();
            buf.resize(DECODED_CHUNK, 0);
            let mut filled = 0;
            while filled < buf.len() {
                match decoder.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        break 'chunks;
                    }
                }
            }
            if filled == 0 {
                break;
            }
            buf.truncate(filled);
            if tx.send(Ok(buf)).is_err() {
                break; // the extractor stopped
            }
        },
    }
    drop(tx);
    io::copy(&mut hashing, &mut io::sink())?;
    Ok(hex::encode(hashing.hasher.finalize()))
}

/// The reading end of a producer thread's chunks (the decoder of [`decode_and_hash`], or the
/// tar writer of [`super::copy`]); EOF when the producer is done. Spent chunks go back to it
/// through `spare` for reuse.
pub(super) struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    spare: mpsc::Sender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl ChannelReader {
    pub(super) fn new(
        rx: mpsc::Receiver<io::Result<Vec<u8>>>,
        spare: mpsc::Sender<Vec<u8>>,
    ) -> Self {
        ChannelReader {
            rx,
            spare,
            cur: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(Ok(next)) => {
                    let used = std::mem::replace(&mut self.cur, next);
                    self.pos = 0;
                    // Reused by the decoder; gone if it already finished.
                    let _ = self.spare.send(used);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Extracts a compressed archive while reading it once: one thread hashes and decompresses,
/// the caller's thread builds the tree in the staging dir; the rest of the input is hashed
/// too, and only when the digest matches is the staging dir swapped in.
pub fn unpack_reader<R: Read + Send>(
    src: R,
    name: &Path,
    compressed_size: u64,
    expected_digest: &str,
    target: &Path,
    opts: &UnpackOptions,
    progress: Progress<'_>,
) -> Result<UnpackStats> {
    let expected = parse_digest(expected_digest)?;
    let slot = check_target(target)?;
    let (staging, root) = Staging::create(&slot)?;
    let mut ex = Extractor::new(root, opts);
    let applied = apply_verified(
        src,
        name,
        compressed_size,
        &expected,
        &mut ex,
        opts,
        progress,
    )
    .and_then(|(n, size)| Ok((n, size, ex.finish()?)));
    let (entries, uncompressed_size, root) = match applied {
        Ok(v) => v,
        Err(e) => return Err(staging.discard(e)),
    };
    staging.swap(root)?;
    Ok(UnpackStats {
        entries,
        uncompressed_size,
    })
}

/// Streams one compressed archive into `ex` (hashing on a decoder thread, extracting on the
/// caller's) and checks the sha256 of all of `src` against `expected` (lowercase hex).
/// Returns (entries, uncompressed bytes); the caller finishes `ex` and owns the staging dir.
pub(super) fn apply_verified<R: Read + Send>(
    src: R,
    name: &Path,
    compressed_size: u64,
    expected: &str,
    ex: &mut Extractor,
    opts: &UnpackOptions,
    progress: Progress<'_>,
) -> Result<(u64, u64)> {
    let (tx, rx) = mpsc::sync_channel(DECODED_AHEAD);
    let (spare_tx, spare_rx) = mpsc::channel();
    let (extracted, hashed) = std::thread::scope(|scope| {
        let decoder = std::thread::Builder::new()
            .name("zlayer-unzstd".into())
            .spawn_scoped(scope, move || decode_and_hash(src, tx, spare_rx));
        let decoder = match decoder {
            Ok(d) => d,
            Err(e) => return (Err(io_err("spawn decoder for", name)(e)), None),
        };
        let reader = ChannelReader::new(rx, spare_tx);
        let src = SourceReader::new(
            reader,
            opts.max_uncompressed,
            Some((compressed_size, opts.max_ratio)),
            progress,
        );
        let count = src.counter();
        // Dropping the reader (inside) tells the decoder to stop decoding and only hash.
        let extracted = extract_stream(src, ex, name).map(|n| (n, count.get()));
        let hashed = decoder
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("decoder thread panicked")));
        (extracted, Some(hashed))
    });
    // A failed extraction with a digest mismatch is reported as the mismatch: corruption in
    // transit or at rest, not an archive that was bad when published.
    let digest = match hashed {
        Some(Ok(d)) => Some(d),
        Some(Err(e)) if extracted.is_ok() => return Err(io_err("read", name)(e)),
        _ => None,
    };
    if let Some(actual) = digest
        && actual != expected
    {
        return Err(ArchiveError::DigestMismatch {
            archive: name.to_owned(),
            expected: expected.to_owned(),
            actual,
        });
    }
    extracted
}

pub fn unpack_file(
    spool: &Path,
    expected_digest: &str,
    target: &Path,
    opts: &UnpackOptions,
    progress: Progress<'_>,
) -> Result<UnpackStats> {
    let expected = parse_digest(expected_digest)?;
    let slot = check_target(target)?;
    let mut file = File::open(spool).map_err(io_err("open", spool))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut compressed = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("read", spool)(e)),
        };
        hasher.update(&buf[..n]);
        compressed += n as u64;
    }
    drop(buf);
    let actual = hex::encode(hasher.finalize());
    if actual != expected {
        return Err(ArchiveError::DigestMismatch {
            archive: spool.to_owned(),
            expected,
            actual,
        });
    }
    file.seek(SeekFrom::Start(0))
        .map_err(io_err("seek", spool))?;
    let decoder =
        zstd::stream::read::Decoder::new(file).map_err(|source| ArchiveError::Decompress {
            archive: spool.to_owned(),
            source,
        })?;
    let src = SourceReader::new(
        decoder,
        opts.max_uncompressed,
        Some((compressed, opts.max_ratio)),
        progress,
    );
    extract_into_target(&slot, src, spool, opts)
}
