//! A file being downloaded, read in order while the download fills it in: the download
//! reports how long its final prefix is, and a [`FollowReader`] reads up to there and waits.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How far a download has filled its file, for a reader following it.
#[derive(Debug, Default)]
pub struct Follow {
    state: Mutex<FollowState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct FollowState {
    ready: u64,
    /// `Some(true)`: complete at `ready` bytes; `Some(false)`: the download failed.
    ended: Option<bool>,
}

impl Follow {
    /// The first `len` bytes of the file are final.
    pub fn ready(&self, len: u64) {
        let mut s = lock(&self.state);
        if len > s.ready {
            s.ready = len;
            self.cv.notify_all();
        }
    }

    /// The download ended, successfully at `len` bytes or (`None`) with an error; only the
    /// first call counts.
    pub fn end(&self, len: Option<u64>) {
        let mut s = lock(&self.state);
        if s.ended.is_some() {
            return;
        }
        match len {
            Some(n) => {
                s.ready = s.ready.max(n);
                s.ended = Some(true);
            }
            None => s.ended = Some(false),
        }
        self.cv.notify_all();
    }

    /// Blocks until bytes beyond `pos` are final; `None` at the end of a complete download.
    fn wait_beyond(&self, pos: u64) -> io::Result<Option<u64>> {
        let mut s = lock(&self.state);
        loop {
            if s.ready > pos {
                return Ok(Some(s.ready));
            }
            match s.ended {
                Some(true) => return Ok(None),
                Some(false) => return Err(io::Error::other("download failed")),
                None => {}
            }
            s = match self.cv.wait(s) {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
        }
    }
}

/// Ends a [`Follow`] as failed when dropped first: a restore that is cancelled must not leave
/// its extraction thread waiting for data that never comes.
#[derive(Debug)]
pub struct EndOnDrop(pub Arc<Follow>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.end(None);
    }
}

/// Reads a file in order as a download fills it in (positional reads below the final prefix).
#[derive(Debug)]
pub struct FollowReader {
    path: PathBuf,
    file: Option<File>,
    pos: u64,
    follow: Arc<Follow>,
}

impl FollowReader {
    pub fn new(path: PathBuf, follow: Arc<Follow>) -> Self {
        Self {
            path,
            file: None,
            pos: 0,
            follow,
        }
    }
}

impl Read for FollowReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let Some(ready) = self.follow.wait_beyond(self.pos)? else {
            return Ok(0);
        };
        // Opened only once data is final: a backend may create the file by renaming into place.
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(File::open(&self.path)?),
        };
        let want = usize::try_from(ready - self.pos)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Reads `reader` to its end on a thread of its own (a test's extraction stand-in).
#[cfg(test)]
pub(crate) fn read_to_end_in_thread(
    mut reader: FollowReader,
) -> std::thread::JoinHandle<io::Result<Vec<u8>>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        reader.read_to_end(&mut out).map(|_| out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn follow_reader_waits_for_the_prefix_and_ends_with_the_download() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let follow = Arc::new(Follow::default());
        let t = read_to_end_in_thread(FollowReader::new(path.clone(), Arc::clone(&follow)));
        let mut f = File::create(&path).unwrap();
        f.set_len(10).unwrap();
        // Bytes beyond the ready prefix are in the file but must not be read yet.
        f.write_all_at(b"world", 5).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!t.is_finished(), "nothing is ready yet");
        f.write_all_at(b"hello", 0).unwrap();
        follow.ready(5);
        follow.ready(3);
        follow.ready(10);
        follow.end(Some(10));
        drop(EndOnDrop(Arc::clone(&follow)));
        assert_eq!(
            t.join().unwrap().unwrap(),
            b"helloworld",
            "a late end changes nothing"
        );
        f.flush().unwrap();
    }

    #[test]
    fn follow_reader_fails_when_the_download_fails_or_is_dropped() {
        let follow = Arc::new(Follow::default());
        let mut r = FollowReader::new(PathBuf::from("/nonexistent"), Arc::clone(&follow));
        drop(EndOnDrop(Arc::clone(&follow)));
        let err = r.read(&mut [0u8; 4]).unwrap_err();
        assert!(err.to_string().contains("download failed"), "{err}");
    }
}
