//! The local store's [`ObjectStore::download_following`](super::ObjectStore::download_following):
//! the object is copied into the scratch file a chunk at a time and each chunk is reported
//! ready as soon as it is written, so an extraction reads along with the copy. The trait's
//! default copied the whole object and fsynced it first, which made a local-store restore
//! wait for a full durable copy before extracting anything. The scratch file is not fsynced:
//! the caller verifies the digest of what it reads and removes the file afterwards.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{COPY_BUF, io_err, is_absent, private};
use crate::store::error::Result;
use crate::store::{PrefixReady, Progress, StoreError};

/// Tells the copy to stop when dropped first: the restore gave up on this download (its
/// extraction failed, or another archive of the chain did), and a blocking copy cannot be
/// cancelled any other way.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Copies the object at `src` into `dest` (created or truncated), calling `ready` with the
/// copied length after every chunk; returns the object's size. `location` names the object
/// in a [`StoreError::NotFound`].
pub(super) async fn download(
    src: PathBuf,
    dest: PathBuf,
    location: String,
    ready: PrefixReady,
    progress: Option<Progress>,
) -> Result<u64> {
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let flag = Arc::clone(&stop.0);
    let task_location = location.clone();
    tokio::task::spawn_blocking(move || {
        copy(&src, &dest, &location, &ready, progress.as_ref(), &flag)
    })
    .await
    .map_err(|source| StoreError::Task {
        location: task_location,
        source,
    })?
}

fn copy(
    src: &Path,
    dest: &Path,
    location: &str,
    ready: &PrefixReady,
    progress: Option<&Progress>,
    stop: &AtomicBool,
) -> Result<u64> {
    let not_found = || StoreError::NotFound {
        location: location.to_string(),
    };
    let mut from = match File::open(src) {
        Ok(f) => f,
        Err(e) if is_absent(&e) => return Err(not_found()),
        Err(e) => return Err(io_err("open", src)(e)),
    };
    if !from.metadata().map_err(io_err("stat", src))?.is_file() {
        return Err(not_found());
    }
    let mut out = private::create(dest).map_err(io_err("create", dest))?;
    let mut buf = vec![0u8; COPY_BUF];
    let mut total = 0u64;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(io_err("copy into", dest)(ErrorKind::Interrupted.into()));
        }
        let n = from.read(&mut buf).map_err(io_err("read", src))?;
        if n == 0 {
            return Ok(total);
        }
        out.write_all(&buf[..n]).map_err(io_err("write", dest))?;
        total += n as u64;
        ready(total);
        if let Some(p) = progress {
            p(n as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::store::follow::{Follow, FollowReader, read_to_end_in_thread};
    use crate::store::{LocalStore, ObjectStore, PutCondition};

    #[tokio::test]
    async fn a_reader_follows_the_copy_and_a_missing_object_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::new(dir.path(), "layers").unwrap();
        let data: Vec<u8> = (0..(3 * COPY_BUF as u32 + 17))
            .map(|i| (i % 251) as u8)
            .collect();
        s.put_bytes("d1.tar.zst", data.clone(), PutCondition::None)
            .await
            .unwrap();
        let dest = dir.path().join("scratch");
        let follow = Arc::new(Follow::default());
        let reading = read_to_end_in_thread(FollowReader::new(dest.clone(), Arc::clone(&follow)));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let ready: PrefixReady = {
            let (seen, follow) = (Arc::clone(&seen), Arc::clone(&follow));
            Arc::new(move |n| {
                seen.lock().unwrap().push(n);
                follow.ready(n);
            })
        };
        let n = s
            .download_following("d1.tar.zst", &dest, ready, None)
            .await
            .unwrap();
        follow.end(Some(n));
        assert_eq!(n, data.len() as u64);
        assert_eq!(reading.join().unwrap().unwrap(), data);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 4, "one report per chunk: {seen:?}");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");

        let err = s
            .download_following("missing.tar.zst", &dest, Arc::new(|_| {}), None)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains("layers/missing.tar.zst"), "{err}");
    }

    #[test]
    fn a_stopped_copy_ends_without_reporting_more() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("obj");
        std::fs::write(&src, vec![7u8; 2 * COPY_BUF]).unwrap();
        let stop = AtomicBool::new(true);
        let ready: PrefixReady = Arc::new(|n| panic!("reported {n} after the stop"));
        let err = copy(&src, &dir.path().join("out"), "obj", &ready, None, &stop).unwrap_err();
        assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
    }
}
