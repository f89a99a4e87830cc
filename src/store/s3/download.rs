//! Downloads: one stream that resumes with a ranged GET after an interrupted body, and
//! parallel ranged GETs written in place that a reader can follow.

use std::path::Path;

use aws_sdk_s3::config::ResponseChecksumValidation;
use futures::StreamExt;
use tokio::io::{AsyncSeekExt, AsyncWriteExt, BufWriter};

use super::{S3Store, backoff, is_not_found, s3_err};
use crate::store::error::Result;
use crate::store::{PrefixReady, Progress, StoreError};

const WRITE_BUF: usize = 1024 * 1024;

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

/// Creates (or truncates) a download target; private (0600): it holds layer data.
async fn create_private(dest: &Path) -> Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(crate::sys::private::FILE_MODE)
        .open(dest)
        .await
        .map_err(io_err("create", dest))
}

pub(super) async fn download(
    store: &S3Store,
    key: &str,
    dest: &Path,
    progress: Option<Progress>,
) -> Result<u64> {
    let full = store.full_key(key)?;
    let location = store.location(&full);
    let file = create_private(dest).await?;
    let mut out = BufWriter::with_capacity(WRITE_BUF, file);
    let mut written = 0u64;
    let mut expected: Option<u64> = None;
    let mut etag: Option<String> = None;
    // Failures in a row without progress; any received byte resets it.
    let mut failures = 0u32;
    loop {
        let mut req = store.client.get_object().bucket(&store.bucket).key(&full);
        if written > 0 {
            req = req.range(format!("bytes={written}-"));
            // The same object version, or the resumed bytes would not belong to the first ones.
            if let Some(e) = &etag {
                req = req.if_match(e);
            }
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let err = s3_err("get", location.clone(), e);
                if written == 0 && is_not_found(&err) {
                    return Err(StoreError::NotFound { location });
                }
                if err.is_transient() && failures < store.max_retries {
                    failures += 1;
                    tracing::warn!(error = %err, written, "retrying download");
                    tokio::time::sleep(backoff(failures)).await;
                    continue;
                }
                return Err(err);
            }
        };
        if written == 0 {
            expected = resp.content_length().and_then(|n| u64::try_from(n).ok());
            etag = resp.e_tag().map(str::to_string);
        } else if !resp
            .content_range()
            .is_some_and(|r| r.starts_with(&format!("bytes {written}-")))
        {
            // The service ignored the range: start over from the first byte.
            tracing::debug!(key, "range not honoured; restarting download");
            out.flush().await.map_err(io_err("write", dest))?;
            let f = out.get_mut();
            f.set_len(0).await.map_err(io_err("truncate", dest))?;
            f.seek(std::io::SeekFrom::Start(0))
                .await
                .map_err(io_err("seek", dest))?;
            written = 0;
            expected = resp.content_length().and_then(|n| u64::try_from(n).ok());
            etag = resp.e_tag().map(str::to_string);
        }
        let mut body = resp.body;
        let interrupted = loop {
            match body.next().await {
                Some(Ok(chunk)) => {
                    out.write_all(&chunk).await.map_err(io_err("write", dest))?;
                    let n = chunk.len() as u64;
                    written += n;
                    failures = 0;
                    if let Some(p) = &progress {
                        p(n);
                    }
                }
                Some(Err(e)) => break Some(e),
                None => break None,
            }
        };
        match interrupted {
            None => break,
            Some(e) if failures < store.max_retries => {
                failures += 1;
                tracing::warn!(error = %e, written, "download interrupted; resuming");
                tokio::time::sleep(backoff(failures)).await;
            }
            Some(e) => {
                return Err(StoreError::S3 {
                    op: "get (body)",
                    location,
                    status: None,
                    code: None,
                    transient: true,
                    source: Box::new(e),
                });
            }
        }
    }
    out.flush().await.map_err(io_err("write", dest))?;
    out.get_mut()
        .sync_all()
        .await
        .map_err(io_err("fsync", dest))?;
    if let Some(exp) = expected
        && exp != written
    {
        return Err(StoreError::SizeMismatch {
            location,
            expected: exp,
            actual: written,
        });
    }
    Ok(written)
}

/// Received bytes are written in batches of this size.
const WRITE_BATCH: usize = 1024 * 1024;

/// Which ranges are complete, to tell the reader how long the complete prefix is.
struct Tracker {
    size: u64,
    range: u64,
    done: Vec<u64>,
    first_incomplete: usize,
    prefix: u64,
}

impl Tracker {
    fn range_len(&self, i: usize) -> u64 {
        let start = i as u64 * self.range;
        self.range.min(self.size - start)
    }

    /// Records `n` more bytes of range `i`; returns the new prefix length if it grew.
    fn advance(&mut self, i: usize, n: u64) -> Option<u64> {
        self.done[i] += n;
        while self.first_incomplete < self.done.len()
            && self.done[self.first_incomplete] == self.range_len(self.first_incomplete)
        {
            self.first_incomplete += 1;
        }
        let prefix = match self.done.get(self.first_incomplete) {
            Some(d) => self.first_incomplete as u64 * self.range + d,
            None => self.size,
        };
        (prefix > self.prefix).then(|| {
            self.prefix = prefix;
            prefix
        })
    }
}

/// What every range task of one download shares.
struct Ranged<'a> {
    store: &'a S3Store,
    full: String,
    location: String,
    dest: &'a Path,
    etag: Option<String>,
    file: std::sync::Arc<std::fs::File>,
    tracker: std::sync::Mutex<Tracker>,
    ready: PrefixReady,
    progress: Option<Progress>,
}

impl Ranged<'_> {
    /// Writes `data` at `offset` and publishes the progress of range `i`.
    async fn write(&self, i: usize, offset: u64, data: bytes::Bytes) -> Result<()> {
        let file = std::sync::Arc::clone(&self.file);
        let n = data.len() as u64;
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            file.write_all_at(&data, offset)
        })
        .await
        .map_err(|source| StoreError::Task {
            location: self.location.clone(),
            source,
        })?
        .map_err(io_err("write", self.dest))?;
        let grown = match self.tracker.lock() {
            Ok(mut t) => t.advance(i, n),
            Err(poisoned) => poisoned.into_inner().advance(i, n),
        };
        if let Some(p) = &self.progress {
            p(n);
        }
        if let Some(prefix) = grown {
            (self.ready)(prefix);
        }
        Ok(())
    }

    /// Fetches range `i`, resuming where an interrupted response stopped.
    async fn fetch(&self, i: usize) -> Result<()> {
        let (start, len) = match self.tracker.lock() {
            Ok(t) => (i as u64 * t.range, t.range_len(i)),
            Err(p) => {
                let t = p.into_inner();
                (i as u64 * t.range, t.range_len(i))
            }
        };
        let end = start + len;
        let mut pos = start;
        let mut failures = 0u32;
        while pos < end {
            let resp = self
                .store
                .client
                .get_object()
                .bucket(&self.store.bucket)
                .key(&self.full)
                .range(format!("bytes={pos}-{}", end - 1))
                .set_if_match(self.etag.clone())
                .customize()
                // The caller verifies the digest; the SDK's check cannot cover ranges anyway.
                .config_override(
                    aws_sdk_s3::config::Builder::new()
                        .response_checksum_validation(ResponseChecksumValidation::WhenRequired),
                )
                .send()
                .await;
            let resp = match resp {
                Ok(r) => r,
                Err(e) => {
                    let err = s3_err("get", self.location.clone(), e);
                    if err.is_transient() && failures < self.store.max_retries {
                        failures += 1;
                        tracing::warn!(error = %err, range = i, "retrying ranged get");
                        tokio::time::sleep(backoff(failures)).await;
                        continue;
                    }
                    return Err(err);
                }
            };
            if !resp
                .content_range()
                .is_some_and(|r| r.starts_with(&format!("bytes {pos}-")))
            {
                return Err(StoreError::Protocol {
                    op: "get (range)",
                    location: self.location.clone(),
                    what: "content range matching the requested range",
                });
            }
            let mut body = resp.body;
            let mut batch = bytes::BytesMut::with_capacity(WRITE_BATCH);
            let interrupted = loop {
                match body.next().await {
                    Some(Ok(chunk)) => {
                        let room = usize::try_from(end - pos).unwrap_or(usize::MAX) - batch.len();
                        batch.extend_from_slice(&chunk[..chunk.len().min(room)]);
                        failures = 0;
                        if batch.len() >= WRITE_BATCH {
                            let data = batch.split().freeze();
                            let n = data.len() as u64;
                            self.write(i, pos, data).await?;
                            pos += n;
                        }
                    }
                    Some(Err(e)) => break Some(e),
                    None => break None,
                }
            };
            if !batch.is_empty() {
                let data = batch.split().freeze();
                let n = data.len() as u64;
                self.write(i, pos, data).await?;
                pos += n;
            }
            match interrupted {
                None if pos < end => {
                    // A short body without an error: ask again for the rest.
                    if failures >= self.store.max_retries {
                        return Err(StoreError::SizeMismatch {
                            location: self.location.clone(),
                            expected: end - start,
                            actual: pos - start,
                        });
                    }
                    failures += 1;
                }
                None => {}
                Some(e) if failures < self.store.max_retries => {
                    failures += 1;
                    tracing::warn!(error = %e, range = i, pos, "ranged get interrupted; resuming");
                    tokio::time::sleep(backoff(failures)).await;
                }
                Some(e) => {
                    return Err(StoreError::S3 {
                        op: "get (body)",
                        location: self.location.clone(),
                        status: None,
                        code: None,
                        transient: true,
                        source: Box::new(e),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Parallel ranged GETs (`max_concurrent_uploads` in flight, ranges of the streamed part size)
/// written in place into `dest`; `ready` follows the complete prefix. All ranges must come from
/// the same object version (`If-Match` on the etag of the first HEAD).
pub(super) async fn download_ranged(
    store: &S3Store,
    key: &str,
    dest: &Path,
    ready: PrefixReady,
    progress: Option<Progress>,
) -> Result<u64> {
    let full = store.full_key(key)?;
    let location = store.location(&full);
    let head = match store
        .client
        .head_object()
        .bucket(&store.bucket)
        .key(&full)
        .send()
        .await
    {
        Ok(h) => h,
        Err(e) => {
            let err = s3_err("head", location.clone(), e);
            return Err(if is_not_found(&err) {
                StoreError::NotFound { location }
            } else {
                err
            });
        }
    };
    let size = head
        .content_length()
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(0);
    let file = create_private(dest).await?;
    file.set_len(size).await.map_err(io_err("truncate", dest))?;
    let file = file.into_std().await;
    if size == 0 {
        ready(0);
        return Ok(0);
    }
    let range = super::stream::stream_part_size(store.part_size);
    let count = usize::try_from(size.div_ceil(range)).unwrap_or(usize::MAX);
    let job = Ranged {
        store,
        full,
        location,
        dest,
        etag: head.e_tag().map(str::to_string),
        file: std::sync::Arc::new(file),
        tracker: std::sync::Mutex::new(Tracker {
            size,
            range,
            done: vec![0; count],
            first_incomplete: 0,
            prefix: 0,
        }),
        ready,
        progress,
    };
    // Started in order, so the first ranges (the ones a reader waits for) go first.
    let mut fetches = futures::stream::iter(0..count)
        .map(|i| job.fetch(i))
        .buffer_unordered(store.concurrency);
    while let Some(res) = fetches.next().await {
        res?;
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_targets_are_created_private_under_any_umask() {
        use crate::sys::private::testing::{assert_private, for_each_umask};
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for_each_umask(|_| {
            let dir = tempfile::tempdir().unwrap();
            let dest = dir.path().join("restore.tar.zst");
            rt.block_on(create_private(&dest)).unwrap();
            assert_private(&dest);
        });
    }

    #[test]
    fn tracker_reports_only_the_contiguous_prefix() {
        let mut t = Tracker {
            size: 25,
            range: 10,
            done: vec![0; 3],
            first_incomplete: 0,
            prefix: 0,
        };
        assert_eq!(t.advance(1, 10), None, "range 1 done, range 0 not started");
        assert_eq!(t.advance(0, 4), Some(4));
        assert_eq!(t.advance(2, 5), None);
        assert_eq!(
            t.advance(0, 6),
            Some(25),
            "ranges 1 and 2 were already complete"
        );
        assert_eq!(t.first_incomplete, 3);
    }
}
