//! The [`ObjectStore`] implementation of [`S3Store`]; multipart uploads, downloads and streamed
//! uploads are in their own modules.

use std::path::Path;
use std::time::{Duration, SystemTime};

use aws_sdk_s3::primitives::ByteStream;

use super::{
    OUTER_ATTEMPTS, S3Store, backoff, crc32c_b64, download, is_conflict, is_not_found,
    is_precondition_failure, s3_err, stream, upload,
};
use crate::store::error::Result;
use crate::store::local::RESERVED_PREFIX;
use crate::store::{
    GrowingFile, ListedObject, ObjectInfo, ObjectStore, PrefixReady, Progress, PutCondition,
    PutOutcome, StoreError, StreamedUpload, UploadJournal, UploadReport, keys_of,
};

fn to_u64(v: Option<i64>) -> u64 {
    v.and_then(|n| u64::try_from(n).ok()).unwrap_or(0)
}

#[async_trait::async_trait]
impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let full = self.full_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(o) => Ok(Some(ObjectInfo {
                size: to_u64(o.content_length()),
                etag: o.e_tag().map(str::to_string),
                last_modified: o
                    .last_modified()
                    .and_then(|t| SystemTime::try_from(*t).ok()),
            })),
            Err(e) => {
                let err = s3_err("head", self.location(&full), e);
                if is_not_found(&err) {
                    Ok(None)
                } else {
                    Err(err)
                }
            }
        }
    }

    async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let full = self.full_key(key)?;
        let mut attempt = 0;
        loop {
            let out = match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(&full)
                .send()
                .await
            {
                Ok(o) => o,
                Err(e) => {
                    let err = s3_err("get", self.location(&full), e);
                    return if is_not_found(&err) {
                        Ok(None)
                    } else {
                        Err(err)
                    };
                }
            };
            match out.body.collect().await {
                Ok(data) => return Ok(Some(data.to_vec())),
                Err(e) if attempt + 1 < OUTER_ATTEMPTS => {
                    tracing::debug!(key = full, error = %e, attempt, "retrying interrupted get");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
                Err(e) => {
                    return Err(StoreError::S3 {
                        op: "get (body)",
                        location: self.location(&full),
                        status: None,
                        code: None,
                        transient: true,
                        source: Box::new(e),
                    });
                }
            }
        }
    }

    async fn put_bytes(&self, key: &str, data: Vec<u8>, cond: PutCondition) -> Result<PutOutcome> {
        let full = self.full_key(key)?;
        let enforced = self.conditional_writes().await?;
        if !enforced {
            // Emulation for services that ignore preconditions: racy, but right when alone.
            let current = self.head(key).await?;
            let allowed = match (&cond, &current) {
                (PutCondition::None, _) => true,
                (PutCondition::IfNoneMatch, cur) => cur.is_none(),
                (PutCondition::IfMatch(want), Some(ObjectInfo { etag: Some(e), .. })) => {
                    e.trim_matches('"') == want.trim_matches('"')
                }
                (PutCondition::IfMatch(_), _) => false,
            };
            if !allowed {
                return Ok(PutOutcome::PreconditionFailed);
            }
        }
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .checksum_crc32_c(crc32c_b64(&data))
            .body(ByteStream::from(data));
        if let Some((sse, kms)) = &self.sse {
            req = req
                .server_side_encryption(sse.clone())
                .set_ssekms_key_id(kms.clone());
        }
        if enforced {
            req = match &cond {
                PutCondition::None => req,
                PutCondition::IfNoneMatch => req.if_none_match("*"),
                PutCondition::IfMatch(e) => req.if_match(e),
            };
        }
        match req.send().await {
            Ok(o) => Ok(PutOutcome::Written {
                etag: o.e_tag().map(str::to_string),
            }),
            Err(e) => {
                let err = s3_err("put", self.location(&full), e);
                let refused = is_precondition_failure(&err)
                    || is_conflict(&err)
                    || (matches!(cond, PutCondition::IfMatch(_)) && is_not_found(&err));
                if refused && cond != PutCondition::None {
                    Ok(PutOutcome::PreconditionFailed)
                } else {
                    Err(err)
                }
            }
        }
    }

    async fn conditional_writes(&self) -> Result<bool> {
        self.conditional
            .get_or_try_init(|| self.probe_conditional_writes())
            .await
            .copied()
    }

    async fn download_to_file(
        &self,
        key: &str,
        dest: &Path,
        progress: Option<Progress>,
    ) -> Result<u64> {
        download::download(self, key, dest, progress).await
    }

    async fn upload_file(
        &self,
        key: &str,
        src: &Path,
        journal: &dyn UploadJournal,
        progress: Option<Progress>,
    ) -> Result<UploadReport> {
        upload::upload(self, key, src, journal, progress).await
    }

    async fn download_following(
        &self,
        key: &str,
        dest: &Path,
        ready: PrefixReady,
        progress: Option<Progress>,
    ) -> Result<u64> {
        download::download_ranged(self, key, dest, ready, progress).await
    }

    async fn start_streamed_upload(
        &self,
        src: GrowingFile,
        progress: Option<Progress>,
    ) -> Result<Option<Box<dyn StreamedUpload>>> {
        Ok(Some(Box::new(stream::start(self, src, progress))))
    }

    async fn abort_orphaned_streams(&self) -> Result<u32> {
        let dir = format!("{}{}{}/", self.prefix, stream::STREAM_DIR, self.node);
        let mut removed = 0;
        for (key, id, _) in self.list_uploads(&dir).await? {
            if stream::is_orphan(&key) {
                self.abort_quietly(&key, &id).await;
                tracing::info!(
                    key,
                    upload_id = id,
                    "aborted the upload of a stream whose process is gone"
                );
                removed += 1;
            }
        }
        Ok(removed
            + self
                .delete_stream_objects(&dir, |k, _| stream::is_orphan(k))
                .await?)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(keys_of(self.list_info(prefix).await?))
    }

    async fn list_info(&self, prefix: &str) -> Result<Vec<ListedObject>> {
        let full_prefix = format!("{}{prefix}", self.prefix);
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full_prefix)
            .into_paginator()
            .send();
        let mut objects = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| s3_err("list", self.location(&full_prefix), e))?;
            for obj in page.contents() {
                let Some(rel) = obj.key().and_then(|k| k.strip_prefix(&self.prefix)) else {
                    continue;
                };
                if !rel.split('/').any(|c| c.starts_with(RESERVED_PREFIX)) {
                    objects.push(ListedObject {
                        key: rel.to_string(),
                        size: to_u64(obj.size()),
                        last_modified: obj
                            .last_modified()
                            .and_then(|t| SystemTime::try_from(*t).ok()),
                    });
                }
            }
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.delete_full(&self.full_key(key)?).await.map(drop)
    }

    /// Aborts every multipart upload under the prefix initiated before `now - older_than`.
    ///
    /// Journaled uploads are not spared: one that old outlived any reasonable resume (the
    /// lifecycle rule would drop it too), so it is aborted and its journal entry finished; a
    /// later sync of the same key starts a fresh upload. Uploads younger than the threshold
    /// are never touched, journaled or not, so an upload in progress (or an orphan whose id
    /// was lost between CreateMultipartUpload and the journal commit) is left alone until then.
    async fn abort_stale_uploads(
        &self,
        older_than: Duration,
        journal: &dyn UploadJournal,
    ) -> Result<u32> {
        let cutoff = SystemTime::now()
            .checked_sub(older_than)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let known = journal.known_upload_ids().await?;
        let stale: Vec<(String, String)> = self
            .list_uploads(&self.prefix)
            .await?
            .into_iter()
            .filter(|(_, _, initiated)| initiated.is_some_and(|t| t < cutoff))
            .map(|(key, id, _)| (key, id))
            .collect();
        let mut aborted = 0;
        for (key, id) in stale {
            let res = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&key)
                .upload_id(&id)
                .send()
                .await;
            match res {
                Ok(_) => aborted += 1,
                Err(e) => {
                    let err = s3_err("abort multipart upload", self.location(&key), e);
                    if !is_not_found(&err) {
                        return Err(err);
                    }
                }
            }
            if known.contains(&id)
                && let Some(rel) = key.strip_prefix(&self.prefix)
            {
                journal.finish_upload(rel, &id).await?;
            }
            tracing::info!(key, upload_id = id, "aborted stale multipart upload");
        }
        let dir = format!("{}{}", self.prefix, stream::STREAM_DIR);
        let old = |_: &str, modified: Option<SystemTime>| modified.is_some_and(|t| t < cutoff);
        Ok(aborted + self.delete_stream_objects(&dir, old).await?)
    }
}
