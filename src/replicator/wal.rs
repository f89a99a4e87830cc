//! Reading a SQLite WAL file as whole transactions (format: sqlite.org/fileformat2.html §4).
//!
//! The replicator never trusts "the last valid commit in the file": a writer killed after writing
//! a commit frame but before publishing it leaves a valid-looking transaction that never
//! happened. So a scan is always bounded by a frame count SQLite published (`mxFrame`, from
//! `PRAGMA wal_checkpoint(NOOP)`), and every frame up to that bound must carry the header's
//! salts and continue the cumulative checksum chain; anything else is a continuity anomaly.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Size of the WAL header.
pub const HEADER_LEN: u64 = 32;
/// Size of a frame header (the page follows it).
pub const FRAME_HEADER_LEN: u64 = 24;
const MAGIC_LE: u32 = 0x377f_0682;
const MAGIC_BE: u32 = 0x377f_0683;
const FORMAT_VERSION: u32 = 3_007_000;

/// Failures reading a WAL file; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("cannot read WAL {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("WAL {path} has a bad header: {reason}")]
    BadHeader { path: PathBuf, reason: String },
    #[error("WAL {path}: frame {frame} is not part of the current WAL ({reason})")]
    BadFrame {
        path: PathBuf,
        frame: u32,
        reason: String,
    },
    #[error("WAL {path}: the published end, frame {frame}, is not a commit frame")]
    NotACommit { path: PathBuf, frame: u32 },
    #[error("WAL {path}: the published end, frame {frame}, is beyond the file's {frames} frames")]
    Short {
        path: PathBuf,
        frame: u32,
        frames: u32,
    },
    /// Returned by the consumer of a scan; the scan stops and the cursor stays put.
    #[error("WAL {path}: consumer failed at frame {frame}: {message}")]
    Sink {
        path: PathBuf,
        frame: u32,
        message: String,
    },
}

type Result<T> = std::result::Result<T, WalError>;

/// A WAL's header: one WAL "lifetime" is identified by its salts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalHeader {
    /// Checksum input words are big-endian (magic `0x377f0683`).
    pub big_endian: bool,
    pub page_size: u32,
    /// Bumped at every WAL restart, not necessarily by one per lifetime.
    pub checkpoint_seq: u32,
    pub salt: (u32, u32),
    pub checksum: (u32, u32),
}

impl WalHeader {
    /// Parses and verifies the 32-byte header.
    pub fn parse(bytes: &[u8; 32], path: &Path) -> Result<Self> {
        let bad = |reason: String| WalError::BadHeader {
            path: path.to_path_buf(),
            reason,
        };
        let word = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let big_endian = match word(0) {
            MAGIC_LE => false,
            MAGIC_BE => true,
            m => return Err(bad(format!("magic {m:#010x}"))),
        };
        if word(4) != FORMAT_VERSION {
            return Err(bad(format!("format version {}", word(4))));
        }
        let page_size = word(8);
        if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
            return Err(bad(format!("page size {page_size}")));
        }
        let checksum = (word(24), word(28));
        let computed = wal_checksum((0, 0), &bytes[..24], big_endian);
        if computed != checksum {
            return Err(bad(format!(
                "checksum {checksum:08x?} where the header sums to {computed:08x?}"
            )));
        }
        Ok(Self {
            big_endian,
            page_size,
            checkpoint_seq: word(12),
            salt: (word(16), word(20)),
            checksum,
        })
    }

    /// Bytes of one frame (header and page).
    #[must_use]
    pub fn frame_len(&self) -> u64 {
        FRAME_HEADER_LEN + u64::from(self.page_size)
    }

    /// Complete frames in a WAL file of `len` bytes (the tail of an older lifetime included).
    #[must_use]
    pub fn frames_in(&self, len: u64) -> u32 {
        u32::try_from(len.saturating_sub(HEADER_LEN) / self.frame_len()).unwrap_or(u32::MAX)
    }
}

/// SQLite's WAL checksum: Fletcher-like over 32-bit words in the magic's byte order, seeded with
/// the previous value (frames chain from the header's checksum).
#[must_use]
pub fn wal_checksum(seed: (u32, u32), data: &[u8], big_endian: bool) -> (u32, u32) {
    debug_assert!(data.len().is_multiple_of(8));
    let (mut s0, mut s1) = seed;
    for pair in data.chunks_exact(8) {
        let (a, b) = if big_endian {
            (
                u32::from_be_bytes(pair[0..4].try_into().expect("4 bytes")),
                u32::from_be_bytes(pair[4..8].try_into().expect("4 bytes")),
            )
        } else {
            (
                u32::from_le_bytes(pair[0..4].try_into().expect("4 bytes")),
                u32::from_le_bytes(pair[4..8].try_into().expect("4 bytes")),
            )
        };
        s0 = s0.wrapping_add(a).wrapping_add(s1);
        s1 = s1.wrapping_add(b).wrapping_add(s0);
    }
    (s0, s1)
}

/// Where reading of one WAL lifetime stands: everything before `next_frame` was handed on as
/// whole transactions. Persisted by the caller (with what it shipped) to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalCursor {
    pub header: WalHeader,
    /// 1-based number of the next frame to read.
    pub next_frame: u32,
    /// Checksum of frame `next_frame - 1` (the header's when at frame 1).
    pub checksum: (u32, u32),
}

impl WalCursor {
    /// At the start of the lifetime `header` begins.
    #[must_use]
    pub fn start(header: WalHeader) -> Self {
        Self {
            header,
            next_frame: 1,
            checksum: header.checksum,
        }
    }
}

/// What a scan hands its consumer, in WAL order.
#[derive(Debug)]
pub enum WalEvent<'a> {
    /// A page of the transaction being read (a page may appear more than once; the last wins).
    Page { pgno: u32, data: &'a [u8] },
    /// The transaction ends here: the database has `db_pages` pages after it; `frame` is its
    /// commit frame.
    Commit { db_pages: u32, frame: u32 },
}

/// Reads the header of the WAL at `path`; `None` when the file is missing or shorter than a
/// header (no transaction since the last reset reached it).
pub fn read_header(path: &Path) -> Result<Option<WalHeader>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(WalError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    header_of(&file, path)
}

/// Reads and verifies the header from an open WAL file.
pub fn header_of(file: &File, path: &Path) -> Result<Option<WalHeader>> {
    let mut bytes = [0u8; 32];
    match file.read_exact_at(&mut bytes, 0) {
        Ok(()) => WalHeader::parse(&bytes, path).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(source) => Err(WalError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads frames `cursor.next_frame..=end` of `file` and hands them to `sink`; `end` must be a
/// published commit frame. Returns the number of transactions handed on.
///
/// Pages are handed on as they are verified, so the events since the last `Commit` are
/// provisional: after an error the sink must drop them. `cursor` only ever moves to just after a
/// commit the sink accepted.
pub fn scan(
    file: &File,
    path: &Path,
    cursor: &mut WalCursor,
    end: u32,
    sink: &mut dyn FnMut(WalEvent<'_>) -> std::result::Result<(), String>,
) -> Result<u32> {
    scan_bounded(file, path, cursor, end, u32::MAX, sink)
}

/// Frames read with one system call.
const READ_FRAMES: u32 = 64;

/// [`scan`] that stops at the first commit after `budget` frames (the cursor is then before
/// `end`), so a long WAL is read in pieces that fit one segment each.
pub fn scan_bounded(
    file: &File,
    path: &Path,
    cursor: &mut WalCursor,
    end: u32,
    budget: u32,
    sink: &mut dyn FnMut(WalEvent<'_>) -> std::result::Result<(), String>,
) -> Result<u32> {
    let header = cursor.header;
    let io = |source| WalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let frames = header.frames_in(file.metadata().map_err(io)?.len());
    if end > frames {
        return Err(WalError::Short {
            path: path.to_path_buf(),
            frame: end,
            frames,
        });
    }
    let sink_failed = |frame, message| WalError::Sink {
        path: path.to_path_buf(),
        frame,
        message,
    };
    let frame_len = usize::try_from(header.frame_len()).expect("frame fits in memory");
    // Frames are read READ_FRAMES at a time (one pread each), then checked one by one.
    let mut chunk = vec![0u8; frame_len * READ_FRAMES as usize];
    let mut chunk_first = 0;
    let mut chunk_frames = 0;
    let (mut frame, mut checksum, mut txns) = (cursor.next_frame, cursor.checksum, 0);
    let first = frame;
    while frame <= end {
        if frame >= chunk_first + chunk_frames {
            chunk_first = frame;
            chunk_frames = READ_FRAMES.min(end - frame + 1);
            let offset = HEADER_LEN + u64::from(frame - 1) * header.frame_len();
            file.read_exact_at(&mut chunk[..frame_len * chunk_frames as usize], offset)
                .map_err(io)?;
        }
        let at = (frame - chunk_first) as usize * frame_len;
        let buf = &chunk[at..at + frame_len];
        checksum = verify_frame(buf, &header, checksum).map_err(|reason| WalError::BadFrame {
            path: path.to_path_buf(),
            frame,
            reason,
        })?;
        let (pgno, data) = (be32(buf), &buf[FRAME_HEADER_LEN as usize..]);
        sink(WalEvent::Page { pgno, data }).map_err(|m| sink_failed(frame, m))?;
        let db_pages = be32(&buf[4..]);
        if db_pages != 0 {
            sink(WalEvent::Commit { db_pages, frame }).map_err(|m| sink_failed(frame, m))?;
            cursor.next_frame = frame + 1;
            cursor.checksum = checksum;
            txns += 1;
            if frame - first >= budget {
                return Ok(txns);
            }
        } else if frame == end {
            return Err(WalError::NotACommit {
                path: path.to_path_buf(),
                frame,
            });
        }
        frame += 1;
    }
    Ok(txns)
}

/// Checks one frame (header + page) against the WAL header and the running checksum; returns
/// the frame's checksum.
fn verify_frame(
    frame: &[u8],
    header: &WalHeader,
    seed: (u32, u32),
) -> std::result::Result<(u32, u32), String> {
    let pgno = be32(frame);
    if pgno == 0 {
        return Err("page number 0".to_string());
    }
    let salt = (be32(&frame[8..]), be32(&frame[12..]));
    if salt != header.salt {
        return Err(format!(
            "salts {salt:08x?} differ from the header's {:08x?}",
            header.salt
        ));
    }
    let stored = (be32(&frame[16..]), be32(&frame[20..]));
    let sum = wal_checksum(seed, &frame[..8], header.big_endian);
    let sum = wal_checksum(sum, &frame[FRAME_HEADER_LEN as usize..], header.big_endian);
    if sum != stored {
        return Err(format!(
            "checksum {stored:08x?} breaks the chain (expected {sum:08x?})"
        ));
    }
    Ok(sum)
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

#[cfg(test)]
#[path = "wal_tests.rs"]
pub(crate) mod tests;
