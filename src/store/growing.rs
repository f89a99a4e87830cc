//! A spool file that is uploaded while it is still being written.
//!
//! The writer only ever appends, and publishes the length written so far through a
//! [`SpoolFeed`]; bytes below that length are final and may be read (with positional reads or
//! fresh opens) by an uploader holding the [`GrowingFile`].

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;

/// How much of a growing file is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpoolLen {
    /// Bytes written so far; never decreases.
    pub len: u64,
    /// The writer is done and `len` is the final size.
    pub complete: bool,
}

/// Read side of a spool being written. Cheap to clone; clones share one read handle.
#[derive(Debug, Clone)]
pub struct GrowingFile {
    file: Arc<File>,
    len: watch::Receiver<SpoolLen>,
}

/// Write side: tells the readers how far the spool is final.
#[derive(Debug)]
pub struct SpoolFeed {
    tx: watch::Sender<SpoolLen>,
}

impl GrowingFile {
    /// Follows the file `writer` writes to, through a read handle of its own: a fresh open of
    /// the same inode, so it works for a write-only `writer` and survives renames of the file.
    pub fn follow(writer: &File) -> std::io::Result<(Self, SpoolFeed)> {
        let file = File::open(fd_path(writer))?;
        Ok(Self::from_reader(file))
    }

    /// Follows `file`, which must be open for reading.
    #[must_use]
    pub fn from_reader(file: File) -> (Self, SpoolFeed) {
        let (tx, len) = watch::channel(SpoolLen::default());
        (
            Self {
                file: Arc::new(file),
                len,
            },
            SpoolFeed { tx },
        )
    }

    /// A path that opens this file's inode whatever its current name (`/proc/self/fd/N`),
    /// valid while this handle lives; for APIs that re-open a file for each retry.
    #[must_use]
    pub fn reopen_path(&self) -> PathBuf {
        fd_path(&self.file)
    }

    /// The read handle, for positional reads.
    #[must_use]
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// What is final right now.
    #[must_use]
    pub fn state(&self) -> SpoolLen {
        *self.len.borrow()
    }

    /// A receiver that wakes whenever the state changes (and errs once the feed is gone).
    #[must_use]
    pub fn watch(&self) -> watch::Receiver<SpoolLen> {
        self.len.clone()
    }
}

impl SpoolFeed {
    /// `len` bytes have been written (calls with smaller values are ignored).
    pub fn written(&self, len: u64) {
        self.tx.send_if_modified(|s| {
            if s.complete || len <= s.len {
                return false;
            }
            s.len = len;
            true
        });
    }

    /// The spool is finished at `len` bytes.
    pub fn complete(&self, len: u64) {
        self.tx.send_replace(SpoolLen {
            len,
            complete: true,
        });
    }
}

fn fd_path(f: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    #[test]
    fn follower_reads_what_the_writer_appended_across_a_rename() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let (g, feed) = GrowingFile::follow(&w).unwrap();
        assert_eq!(g.state(), SpoolLen::default());
        w.write_all(b"hello ").unwrap();
        feed.written(6);
        feed.written(3);
        assert_eq!(g.state().len, 6, "lengths never go back");
        std::fs::rename(&path, dir.path().join("renamed")).unwrap();
        w.write_all(b"world").unwrap();
        feed.complete(11);
        feed.written(20);
        assert_eq!(
            g.state(),
            SpoolLen {
                len: 11,
                complete: true
            }
        );
        let mut buf = [0u8; 5];
        g.file().read_exact_at(&mut buf, 6).unwrap();
        assert_eq!(&buf, b"world");
        assert_eq!(std::fs::read(g.reopen_path()).unwrap(), b"hello world");
    }
}
