//! Crash-resumable uploads.
//!
//! Files smaller than one part go up in a single PutObject. Larger ones use a multipart upload
//! with a fixed part size and a CRC32C per part, computed here from the spool file. The journal
//! learns the upload id before the first part is sent and each part after the service
//! acknowledged it. A later call for the same key and spool reconciles the journal with
//! ListParts and keeps a part only if its size and CRC32C match what the spool yields now; every
//! other part is sent again. The object is finally checked with a HEAD (size).
//!
//! A crash between CreateMultipartUpload and the journal commit leaves an upload nobody knows
//! of; [`super::ObjectStore::abort_stale_uploads`] and the bucket lifecycle rule remove it.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::ChecksumAlgorithm;
use base64::Engine;
use chrono::Utc;
use futures::StreamExt;

use super::{
    OUTER_ATTEMPTS, S3Store, backoff, crc32c_b64, is_conflict, is_not_found,
    is_precondition_failure, s3_err,
};
use crate::config::MIN_PART_SIZE;
use crate::store::error::Result;
use crate::store::{ObjectStore, Progress, StoreError, UploadJournal, UploadReport, digest_of_key};
use crate::types::{CompletedPart, PendingUpload};

/// S3's limit on part numbers.
pub(super) const MAX_PARTS: u64 = 10_000;
/// New uploads started after 409 conflicts or vanished uploads before giving up.
const MAX_ROUNDS: u32 = 3;

/// How the spool is cut into parts.
#[derive(Debug, Clone, Copy)]
struct Layout {
    size: u64,
    part_size: u64,
    parts: u32,
}

impl Layout {
    /// Offset and length of part `n` (1-based).
    fn range(&self, n: u32) -> (u64, u64) {
        let offset = u64::from(n - 1) * self.part_size;
        (offset, self.part_size.min(self.size - offset))
    }
}

/// What one call knows about the object it uploads.
struct Job<'a> {
    store: &'a S3Store,
    key: &'a str,
    full: String,
    src: PathBuf,
    journal: &'a dyn UploadJournal,
    progress: Option<Progress>,
    layout: Layout,
    /// Send `If-None-Match: *`: the service enforces it and no (wrong-size) object is to be replaced.
    if_none_match: bool,
}

impl Job<'_> {
    fn location(&self) -> String {
        self.store.location(&self.full)
    }

    fn report_progress(&self, n: u64) {
        if let Some(p) = &self.progress {
            p(n);
        }
    }

    /// HEAD; `true` if the object exists with the expected size.
    async fn exists_complete(&self) -> Result<bool> {
        Ok(self
            .store
            .head(self.key)
            .await?
            .is_some_and(|i| i.size == self.layout.size))
    }

    async fn verify_after_complete(&self) -> Result<()> {
        match self.store.head(self.key).await? {
            Some(i) if i.size == self.layout.size => Ok(()),
            Some(i) => Err(StoreError::SizeMismatch {
                location: self.location(),
                expected: self.layout.size,
                actual: i.size,
            }),
            None => Err(StoreError::NotFound {
                location: self.location(),
            }),
        }
    }
}

pub(super) async fn upload(
    store: &S3Store,
    key: &str,
    src: &Path,
    journal: &dyn UploadJournal,
    progress: Option<Progress>,
) -> Result<UploadReport> {
    let full = store.full_key(key)?;
    if store.part_size < MIN_PART_SIZE {
        return Err(StoreError::Config {
            reason: format!("part size {} is below S3's 5 MiB minimum", store.part_size),
        });
    }
    let size = tokio::fs::metadata(src)
        .await
        .map_err(|source| StoreError::Io {
            op: "stat",
            path: src.to_path_buf(),
            source,
        })?
        .len();
    let parts = size.div_ceil(store.part_size).max(1);
    if parts > MAX_PARTS {
        return Err(StoreError::TooManyParts {
            path: src.to_path_buf(),
            size,
            part_size: store.part_size,
        });
    }
    let mut job = Job {
        store,
        key,
        full,
        src: src.to_path_buf(),
        journal,
        progress,
        layout: Layout {
            size,
            part_size: store.part_size,
            parts: u32::try_from(parts).unwrap_or(u32::MAX),
        },
        if_none_match: false,
    };
    let journaled = journal.load_upload(key).await?;
    let existing = store.head(key).await?;
    if existing.as_ref().is_some_and(|i| i.size == size) {
        if let Some(p) = journaled {
            store.abort_quietly(&job.full, &p.upload_id).await;
            journal.finish_upload(key, &p.upload_id).await?;
        }
        job.report_progress(size);
        return Ok(UploadReport {
            parts_total: job.layout.parts,
            already_existed: true,
            ..UploadReport::default()
        });
    }
    if let Some(i) = &existing {
        tracing::warn!(
            key,
            size = i.size,
            expected = size,
            "replacing an object of the wrong size"
        );
    }
    job.if_none_match = existing.is_none() && store.conditional_writes().await?;
    // A journaled upload is only resumable for the same spool cut the same way.
    let resumable = match journaled {
        Some(p)
            if p.total_size == size
                && p.part_size == job.layout.part_size
                && p.total_parts == job.layout.parts
                && p.local_tarball_path == job.src =>
        {
            Some(p)
        }
        Some(p) => {
            tracing::info!(
                key,
                upload_id = p.upload_id,
                "journaled upload does not match the spool; starting over"
            );
            store.abort_quietly(&job.full, &p.upload_id).await;
            journal.finish_upload(key, &p.upload_id).await?;
            None
        }
        None => None,
    };
    if size < job.layout.part_size {
        return put_single(&job).await;
    }
    multipart(&job, resumable).await
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

/// Read size of part bodies. The SDK's default (4 KiB) costs one trip to the blocking pool per
/// 4 KiB, which on a small machine takes as much CPU as the service needs to store the data.
const BODY_READ: usize = 256 * 1024;

/// A body over `len` bytes of `path` at `offset`, re-readable for SDK retries.
pub(super) async fn file_body(path: &Path, offset: u64, len: u64) -> Result<ByteStream> {
    if len == 0 {
        return Ok(ByteStream::from_static(b""));
    }
    ByteStream::read_from()
        .path(path)
        .offset(offset)
        .length(Length::Exact(len))
        .buffer_size(BODY_READ)
        .build()
        .await
        .map_err(|e| io_err("read", path)(std::io::Error::other(e)))
}

/// Base64 CRC32C of `len` bytes of `path` at `offset`, read on the blocking pool.
pub(super) async fn part_crc(path: &Path, offset: u64, len: u64) -> Result<String> {
    let owned = path.to_path_buf();
    let crc = tokio::task::spawn_blocking(move || -> std::io::Result<u32> {
        let mut f = std::fs::File::open(&owned)?;
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0u8; 1024 * 1024];
        let (mut crc, mut left) = (0u32, len);
        while left > 0 {
            let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            let n = f.read(&mut buf[..want])?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            left -= n as u64;
        }
        Ok(crc)
    })
    .await
    .map_err(|source| StoreError::Task {
        location: path.display().to_string(),
        source,
    })?
    .map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            StoreError::SpoolChanged {
                path: path.to_path_buf(),
            }
        } else {
            io_err("read", path)(e)
        }
    })?;
    Ok(base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes()))
}

pub(super) fn part_no(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

pub(super) fn len_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Objects smaller than one part: one PutObject.
async fn put_single(job: &Job<'_>) -> Result<UploadReport> {
    let size = job.layout.size;
    let crc = if size == 0 {
        crc32c_b64(b"")
    } else {
        part_crc(&job.src, 0, size).await?
    };
    let mut attempt = 0;
    loop {
        let mut req = job
            .store
            .client
            .put_object()
            .bucket(&job.store.bucket)
            .key(&job.full)
            .content_length(len_i64(size))
            .checksum_crc32_c(&crc)
            .body(file_body(&job.src, 0, size).await?);
        if let Some((sse, kms)) = &job.store.sse {
            req = req
                .server_side_encryption(sse.clone())
                .set_ssekms_key_id(kms.clone());
        }
        if job.if_none_match {
            req = req.if_none_match("*");
        }
        let err = match req.send().await {
            Ok(_) => break,
            Err(e) => s3_err("put", job.location(), e),
        };
        if is_precondition_failure(&err) && job.exists_complete().await? {
            job.report_progress(size);
            return Ok(UploadReport {
                parts_total: 1,
                parts_sent: 1,
                parts_reused: 0,
                already_existed: true,
            });
        }
        if (err.is_transient() || is_conflict(&err)) && attempt + 1 < OUTER_ATTEMPTS {
            tracing::warn!(error = %err, attempt, "retrying put");
            tokio::time::sleep(backoff(attempt)).await;
            attempt += 1;
            continue;
        }
        return Err(err);
    }
    job.report_progress(size);
    job.verify_after_complete().await?;
    Ok(UploadReport {
        parts_total: 1,
        parts_sent: 1,
        parts_reused: 0,
        already_existed: false,
    })
}

async fn multipart(job: &Job<'_>, mut resume: Option<PendingUpload>) -> Result<UploadReport> {
    let mut report = UploadReport {
        parts_total: job.layout.parts,
        ..UploadReport::default()
    };
    for _ in 0..MAX_ROUNDS {
        let (upload_id, mut done) = match resume.take() {
            Some(p) => match reconcile(job, &p).await? {
                Some(done) => (p.upload_id, done),
                None => {
                    // Aborted, expired, or completed just before a crash.
                    job.journal.finish_upload(job.key, &p.upload_id).await?;
                    if job.exists_complete().await? {
                        job.report_progress(job.layout.size);
                        report.already_existed = true;
                        return Ok(report);
                    }
                    tracing::info!(
                        key = job.key,
                        upload_id = p.upload_id,
                        "journaled upload is gone; starting over"
                    );
                    (begin(job).await?, BTreeMap::new())
                }
            },
            None => (begin(job).await?, BTreeMap::new()),
        };
        report.parts_reused += u32::try_from(done.len()).unwrap_or(u32::MAX);
        job.report_progress(done.values().map(|p| p.size).sum());
        send_missing(job, &upload_id, &mut done, &mut report).await?;
        let err = match complete(job, &upload_id, &done).await {
            Ok(()) => {
                job.verify_after_complete().await?;
                job.journal.finish_upload(job.key, &upload_id).await?;
                return Ok(report);
            }
            Err(e) => e,
        };
        if is_precondition_failure(&err) {
            // Another writer completed the key first; for content-addressed keys that is success.
            job.store.abort_quietly(&job.full, &upload_id).await;
            job.journal.finish_upload(job.key, &upload_id).await?;
            if job.exists_complete().await? {
                report.already_existed = true;
                return Ok(report);
            }
            return Err(err);
        }
        if is_conflict(&err) {
            tracing::warn!(
                key = job.key,
                "concurrent write while completing; starting a new upload"
            );
            job.store.abort_quietly(&job.full, &upload_id).await;
            job.journal.finish_upload(job.key, &upload_id).await?;
            continue;
        }
        if is_not_found(&err) {
            // NoSuchUpload: a retried Complete whose first attempt went through, or an abort.
            job.journal.finish_upload(job.key, &upload_id).await?;
            if job.exists_complete().await? {
                return Ok(report);
            }
            continue;
        }
        return Err(err);
    }
    Err(StoreError::Conflict {
        location: job.location(),
    })
}

/// Creates the multipart upload and journals it before any part is sent.
async fn begin(job: &Job<'_>) -> Result<String> {
    let upload_id = job
        .store
        .create_upload(&job.full, Some(ChecksumAlgorithm::Crc32C))
        .await?;
    let pending = PendingUpload {
        upload_id: upload_id.clone(),
        object_key: job.key.to_string(),
        total_parts: job.layout.parts,
        completed_parts: Default::default(),
        part_size: job.layout.part_size,
        local_tarball_path: job.src.clone(),
        started_at: Utc::now(),
        digest: digest_of_key(job.key),
        total_size: job.layout.size,
    };
    if let Err(e) = job.journal.begin_upload(&pending).await {
        job.store.abort_quietly(&job.full, &upload_id).await;
        return Err(e);
    }
    tracing::debug!(
        key = job.key,
        upload_id,
        parts = job.layout.parts,
        "started multipart upload"
    );
    Ok(upload_id)
}

/// A part as ListParts reports it.
struct ListedPart {
    number: u32,
    size: u64,
    e_tag: String,
    crc32c: Option<String>,
}

/// All parts of `upload_id`; a [`StoreError`] for which `is_not_found` holds means NoSuchUpload.
async fn list_parts(job: &Job<'_>, upload_id: &str) -> Result<Vec<ListedPart>> {
    let mut out = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let page = job
            .store
            .client
            .list_parts()
            .bucket(&job.store.bucket)
            .key(&job.full)
            .upload_id(upload_id)
            .set_part_number_marker(marker.take())
            .send()
            .await
            .map_err(|e| s3_err("list parts", job.location(), e))?;
        for p in page.parts() {
            let (Some(n), Some(size), Some(e_tag)) = (p.part_number(), p.size(), p.e_tag()) else {
                continue;
            };
            let (Ok(number), Ok(size)) = (u32::try_from(n), u64::try_from(size)) else {
                continue;
            };
            out.push(ListedPart {
                number,
                size,
                e_tag: e_tag.to_string(),
                crc32c: p.checksum_crc32_c().map(str::to_string),
            });
        }
        marker = page.next_part_number_marker().map(str::to_string);
        if page.is_truncated() != Some(true) || marker.is_none() {
            return Ok(out);
        }
    }
}

/// Parts of `pending` that the service holds with the size and CRC32C the spool yields now;
/// `None` if the upload no longer exists.
async fn reconcile(
    job: &Job<'_>,
    pending: &PendingUpload,
) -> Result<Option<BTreeMap<u32, CompletedPart>>> {
    let listed = match list_parts(job, &pending.upload_id).await {
        Ok(l) => l,
        Err(e) if is_not_found(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut done = BTreeMap::new();
    for lp in listed {
        if lp.number == 0 || lp.number > job.layout.parts {
            continue;
        }
        let (offset, len) = job.layout.range(lp.number);
        if lp.size != len {
            tracing::info!(
                key = job.key,
                part = lp.number,
                "listed part has the wrong size; re-sending"
            );
            continue;
        }
        let crc = part_crc(&job.src, offset, len).await?;
        let journaled = pending.completed_parts.get(&lp.number);
        let matches = match &lp.crc32c {
            Some(server) => *server == crc,
            // A service that does not report checksums: trust our record of what we sent.
            None => journaled.is_some_and(|j| j.e_tag == lp.e_tag && j.checksum_crc32c == crc),
        };
        if !matches {
            tracing::info!(
                key = job.key,
                part = lp.number,
                "listed part differs from the spool; re-sending"
            );
            continue;
        }
        let part = CompletedPart {
            part_number: lp.number,
            e_tag: lp.e_tag,
            checksum_crc32c: crc,
            size: len,
        };
        if journaled != Some(&part) {
            job.journal
                .record_part(job.key, &pending.upload_id, &part)
                .await?;
        }
        done.insert(part.part_number, part);
    }
    Ok(Some(done))
}

/// Sends every part not in `done`, `concurrency` at a time, journaling each as it returns.
async fn send_missing(
    job: &Job<'_>,
    upload_id: &str,
    done: &mut BTreeMap<u32, CompletedPart>,
    report: &mut UploadReport,
) -> Result<()> {
    let missing: Vec<u32> = (1..=job.layout.parts)
        .filter(|n| !done.contains_key(n))
        .collect();
    let mut results = futures::stream::iter(missing)
        .map(|n| send_part(job, upload_id, n))
        .buffer_unordered(job.store.concurrency);
    while let Some(res) = results.next().await {
        let part = res?;
        job.journal.record_part(job.key, upload_id, &part).await?;
        report.parts_sent += 1;
        done.insert(part.part_number, part);
    }
    Ok(())
}

/// One UploadPart of the journaled path.
async fn send_part(job: &Job<'_>, upload_id: &str, n: u32) -> Result<CompletedPart> {
    let (offset, len) = job.layout.range(n);
    let part = FilePart {
        full: &job.full,
        upload_id,
        n,
        path: &job.src,
        offset,
        len,
    };
    upload_file_part(job.store, &part, |sent| job.report_progress(sent)).await
}

/// A byte range of a local file to send as part `n` of `upload_id`.
#[derive(Debug)]
pub(super) struct FilePart<'a> {
    pub full: &'a str,
    pub upload_id: &'a str,
    pub n: u32,
    pub path: &'a Path,
    pub offset: u64,
    pub len: u64,
}

/// One UploadPart with its CRC32C (computed from the file, so the server checks what we
/// meant to send), retried as a whole on transient failures; `on_sent` gets the length once.
pub(super) async fn upload_file_part(
    store: &S3Store,
    part: &FilePart<'_>,
    on_sent: impl Fn(u64),
) -> Result<CompletedPart> {
    let FilePart {
        full,
        upload_id,
        n,
        path,
        offset,
        len,
    } = *part;
    let crc = part_crc(path, offset, len).await?;
    let location = format!("{} (part {n})", store.location(full));
    let mut attempt = 0;
    loop {
        let res = store
            .client
            .upload_part()
            .bucket(&store.bucket)
            .key(full)
            .upload_id(upload_id)
            .part_number(part_no(n))
            .content_length(len_i64(len))
            .checksum_crc32_c(&crc)
            .body(file_body(path, offset, len).await?)
            .send()
            .await;
        match res {
            Ok(out) => {
                let e_tag = out.e_tag().ok_or_else(|| StoreError::Protocol {
                    op: "upload part",
                    location: location.clone(),
                    what: "etag",
                })?;
                on_sent(len);
                return Ok(CompletedPart {
                    part_number: n,
                    e_tag: e_tag.to_string(),
                    checksum_crc32c: crc,
                    size: len,
                });
            }
            Err(e) => {
                let err = s3_err("upload part", location.clone(), e);
                if err.is_transient() && attempt + 1 < OUTER_ATTEMPTS {
                    tracing::warn!(error = %err, attempt, "retrying part");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                    continue;
                }
                return Err(err);
            }
        }
    }
}

/// CompleteMultipartUpload with every part (and its CRC32C) in ascending order.
async fn complete(
    job: &Job<'_>,
    upload_id: &str,
    done: &BTreeMap<u32, CompletedPart>,
) -> Result<()> {
    job.store
        .complete_upload(&job.full, upload_id, done, true, job.if_none_match)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_cuts_fixed_parts_with_a_short_last_one() {
        let l = Layout {
            size: 23,
            part_size: 5,
            parts: 5,
        };
        assert_eq!(l.range(1), (0, 5));
        assert_eq!(l.range(4), (15, 5));
        assert_eq!(l.range(5), (20, 3));
    }

    #[tokio::test]
    async fn part_crc_matches_a_whole_buffer_crc_and_detects_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let got = part_crc(&path, 1_000_000, 1_500_000).await.unwrap();
        assert_eq!(got, crc32c_b64(&data[1_000_000..2_500_000]));
        let err = part_crc(&path, 2_000_000, 2_000_000).await.unwrap_err();
        assert!(matches!(err, StoreError::SpoolChanged { .. }), "{err:?}");
    }
}
