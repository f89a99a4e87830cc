//! Streaming downloads that resume with a ranged GET after an interrupted body.

use std::path::Path;

use tokio::io::{AsyncSeekExt, AsyncWriteExt, BufWriter};

use super::{S3Store, backoff, is_not_found, s3_err};
use crate::store::error::Result;
use crate::store::{Progress, StoreError};

const WRITE_BUF: usize = 1024 * 1024;

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

pub(super) async fn download(
    store: &S3Store,
    key: &str,
    dest: &Path,
    progress: Option<Progress>,
) -> Result<u64> {
    let full = store.full_key(key)?;
    let location = store.location(&full);
    let file = tokio::fs::File::create(dest)
        .await
        .map_err(io_err("create", dest))?;
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
