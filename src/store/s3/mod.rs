//! S3 (and S3-compatible) object store.
//!
//! Requests go through the SDK's standard retry mode (`max_retries`, exponential backoff with
//! jitter on 5xx, throttling, timeouts and connection resets), a connect timeout and
//! stalled-stream protection; whole parts and interrupted downloads get a second layer of
//! retries on top (see [`upload`] and [`download`]).
//!
//! Incomplete multipart uploads are billed until aborted. Besides
//! [`ObjectStore::abort_stale_uploads`], configure the bucket to abort them itself:
//!
//! ```json
//! {"Rules": [{"ID": "abort-stale-mpu", "Status": "Enabled", "Filter": {"Prefix": ""},
//!             "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 2}}]}
//! ```
//!
//! (`aws s3api put-bucket-lifecycle-configuration --bucket B --lifecycle-configuration
//! file://lc.json`). Keep `DaysAfterInitiation` longer than the longest plausible gap before a
//! resume, or that resume starts over (correct, only slower).

mod download;
mod secret;
mod stream;
mod upload;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, ServerSideEncryption};
use base64::Engine;
use tokio::sync::OnceCell;

use super::error::Result;
use super::local::RESERVED_PREFIX;
use super::{
    GrowingFile, ObjectInfo, ObjectStore, PrefixReady, Progress, PutCondition, PutOutcome,
    StoreError, StreamedUpload, UploadJournal, UploadReport, normalize_prefix, validate_key,
};
use crate::config::{ChecksumMode, LayerStorageConfig, MAX_PART_SIZE, MIN_PART_SIZE};
use crate::layer::types::CompletedPart;

/// Our own retries around a whole part or a resumed download, on top of the SDK's.
const OUTER_ATTEMPTS: u32 = 4;

/// Object store on an S3 bucket under a key prefix. Clones share the client.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    part_size: u64,
    concurrency: usize,
    max_retries: u32,
    sse: Option<(ServerSideEncryption, Option<String>)>,
    conditional: OnceCell<bool>,
    /// Scope of this node's temporary stream keys (see [`stream::node_scope`]).
    node: String,
}

impl S3Store {
    /// Builds the client from `cfg`: static credentials when `access_key_id` is set (secret
    /// from `secret_access_key_file`), otherwise the AWS default chain (env, profile, IMDS).
    pub async fn open(cfg: &LayerStorageConfig) -> Result<Self> {
        if cfg.bucket.is_empty() {
            return Err(config_err("bucket is required for the s3 backend"));
        }
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&cfg.part_size_bytes) {
            return Err(config_err(format!(
                "part_size_bytes {} is outside 5 MiB..=5 GiB",
                cfg.part_size_bytes
            )));
        }
        let prefix = normalize_prefix(&cfg.prefix)?;
        let creds = match (&cfg.access_key_id, &cfg.secret_access_key_file) {
            (Some(id), Some(file)) => {
                let secret = secret::read_secret_file(file).await?;
                Some(Credentials::new(id, secret, None, None, "zlayer-config"))
            }
            (Some(_), None) => {
                return Err(config_err(
                    "access_key_id is set but secret_access_key_file is not",
                ));
            }
            (None, Some(_)) => {
                return Err(config_err(
                    "secret_access_key_file is set but access_key_id is not",
                ));
            }
            (None, None) => None,
        };
        // A custom endpoint rarely has a meaningful region; SigV4 still needs one.
        let region = cfg
            .region
            .clone()
            .or_else(|| cfg.endpoint_url.as_ref().map(|_| "us-east-1".to_string()));
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(r) = region {
            loader = loader.region(Region::new(r));
        }
        if let Some(c) = creds {
            loader = loader.credentials_provider(c);
        }
        let sdk = loader.load().await;
        let (req_ck, resp_ck) = match cfg.checksum_calculation {
            ChecksumMode::WhenSupported => (
                RequestChecksumCalculation::WhenSupported,
                ResponseChecksumValidation::WhenSupported,
            ),
            ChecksumMode::WhenRequired => (
                RequestChecksumCalculation::WhenRequired,
                ResponseChecksumValidation::WhenRequired,
            ),
        };
        let mut builder = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(cfg.path_style())
            .request_checksum_calculation(req_ck)
            .response_checksum_validation(resp_ck)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(cfg.max_retries.saturating_add(1))
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(20)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .build(),
            )
            .stalled_stream_protection(
                StalledStreamProtectionConfig::enabled()
                    .grace_period(Duration::from_secs(30))
                    .build(),
            );
        if let Some(ep) = &cfg.endpoint_url {
            builder = builder.endpoint_url(ep);
        }
        let sse = cfg.sse.as_deref().map(|s| {
            (
                ServerSideEncryption::from(s),
                cfg.sse_kms_key_id.clone().filter(|_| s == "aws:kms"),
            )
        });
        Ok(Self {
            client: Client::from_conf(builder.build()),
            bucket: cfg.bucket.clone(),
            prefix,
            part_size: cfg.part_size_bytes,
            concurrency: cfg.max_concurrent_uploads.max(1),
            max_retries: cfg.max_retries,
            sse,
            conditional: OnceCell::new(),
            node: stream::node_scope(&cfg.state_db_path),
        })
    }

    /// The SDK client, for operations outside [`ObjectStore`] (tests, bucket setup).
    #[must_use]
    pub fn client(&self) -> &Client {
        &self.client
    }

    #[must_use]
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// `key` with the store prefix: the real S3 key.
    pub fn full_key(&self, key: &str) -> Result<String> {
        validate_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }

    fn location(&self, full_key: &str) -> String {
        format!("s3://{}/{full_key}", self.bucket)
    }

    /// Writes a sentinel twice with `If-None-Match: *`; a 412 on the second write means the
    /// service enforces preconditions (Garage 2.5, for one, silently ignores them).
    async fn probe_conditional_writes(&self) -> Result<bool> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let key = format!(
            "{}{RESERVED_PREFIX}probe/{}-{nanos}",
            self.prefix,
            std::process::id()
        );
        let put = || {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&key)
                .if_none_match("*")
                .body(ByteStream::from_static(b"probe"))
                .send()
        };
        put()
            .await
            .map_err(|e| s3_err("put (probe)", self.location(&key), e))?;
        let supported = match put().await {
            Ok(_) => false,
            Err(e) => {
                let err = s3_err("put (probe)", self.location(&key), e);
                if !is_precondition_failure(&err) {
                    return Err(err);
                }
                true
            }
        };
        if let Err(e) = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
        {
            tracing::warn!(key, error = %e, "cannot delete conditional-write probe object");
        }
        tracing::debug!(store = %self.describe(), supported, "probed conditional writes");
        Ok(supported)
    }

    /// Aborts an upload whose outcome no longer matters; failures are only logged.
    async fn abort_quietly(&self, full_key: &str, upload_id: &str) {
        let res = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(full_key)
            .upload_id(upload_id)
            .send()
            .await;
        if let Err(e) = res {
            let err = s3_err("abort multipart upload", self.location(full_key), e);
            if !is_not_found(&err) {
                tracing::warn!(upload_id, error = %err, "cannot abort multipart upload");
            }
        }
    }
}

impl S3Store {
    /// Deletes the object `full` (a full key); `false` when it was already gone.
    pub(super) async fn delete_full(&self, full: &str) -> Result<bool> {
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) => {
                let err = s3_err("delete", self.location(full), e);
                if is_not_found(&err) {
                    Ok(false)
                } else {
                    Err(err)
                }
            }
        }
    }

    /// CreateMultipartUpload for `full` with the store's SSE settings; returns the upload id.
    pub(super) async fn create_upload(
        &self,
        full: &str,
        checksum: Option<aws_sdk_s3::types::ChecksumAlgorithm>,
    ) -> Result<String> {
        let mut req = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .set_checksum_algorithm(checksum);
        if let Some((sse, kms)) = &self.sse {
            req = req
                .server_side_encryption(sse.clone())
                .set_ssekms_key_id(kms.clone());
        }
        let out = req
            .send()
            .await
            .map_err(|e| s3_err("create multipart upload", self.location(full), e))?;
        let id = out.upload_id().ok_or_else(|| StoreError::Protocol {
            op: "create multipart upload",
            location: self.location(full),
            what: "upload id",
        })?;
        Ok(id.to_string())
    }

    /// CompleteMultipartUpload of `parts` in ascending order. `checksums` repeats each part's
    /// CRC32C (required when the upload was created with that algorithm, refused otherwise);
    /// `if_none_match` makes the completion conditional on the key not existing yet.
    pub(super) async fn complete_upload(
        &self,
        full: &str,
        upload_id: &str,
        parts: &BTreeMap<u32, CompletedPart>,
        checksums: bool,
        if_none_match: bool,
    ) -> Result<()> {
        let list = parts
            .values()
            .map(|p| {
                let part = aws_sdk_s3::types::CompletedPart::builder()
                    .part_number(upload::part_no(p.part_number))
                    .e_tag(&p.e_tag);
                if checksums {
                    part.checksum_crc32_c(&p.checksum_crc32c).build()
                } else {
                    part.build()
                }
            })
            .collect::<Vec<_>>();
        let mut req = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(list))
                    .build(),
            );
        if if_none_match {
            req = req.if_none_match("*");
        }
        req.send()
            .await
            .map(drop)
            .map_err(|e| s3_err("complete multipart upload", self.location(full), e))
    }

    /// Every multipart upload under `full_prefix`: (full key, upload id, initiated).
    async fn list_uploads(
        &self,
        full_prefix: &str,
    ) -> Result<Vec<(String, String, Option<SystemTime>)>> {
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(full_prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
                .map_err(|e| s3_err("list multipart uploads", self.location(full_prefix), e))?;
            for up in page.uploads() {
                if let (Some(key), Some(id)) = (up.key(), up.upload_id()) {
                    let initiated = up.initiated().and_then(|t| SystemTime::try_from(*t).ok());
                    out.push((key.to_string(), id.to_string(), initiated));
                }
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_string);
            id_marker = page.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() && id_marker.is_none() {
                break;
            }
        }
        Ok(out)
    }

    /// Deletes temporary objects of streamed uploads (a crash between their Complete and
    /// their deletion leaves one) under `dir` for which `doomed(key, last_modified)` holds;
    /// returns how many.
    async fn delete_stream_objects(
        &self,
        dir: &str,
        doomed: impl Fn(&str, Option<SystemTime>) -> bool,
    ) -> Result<u32> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(dir)
            .into_paginator()
            .send();
        let mut stale = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| s3_err("list", self.location(dir), e))?;
            for obj in page.contents() {
                let modified = obj
                    .last_modified()
                    .and_then(|t| SystemTime::try_from(*t).ok());
                if let Some(k) = obj.key()
                    && doomed(k, modified)
                {
                    stale.push(k.to_string());
                }
            }
        }
        let mut deleted = 0;
        for key in stale {
            if self.delete_full(&key).await? {
                deleted += 1;
            }
            tracing::info!(key, "deleted temporary object of a streamed upload");
        }
        Ok(deleted)
    }
}

fn config_err(reason: impl Into<String>) -> StoreError {
    StoreError::Config {
        reason: reason.into(),
    }
}

/// Turns an SDK error into a [`StoreError::S3`] with status, code and transience.
pub(crate) fn s3_err<E>(
    op: &'static str,
    location: String,
    e: SdkError<E, HttpResponse>,
) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = e.raw_response().map(|r| r.status().as_u16());
    let code = e.code().map(str::to_string);
    let transient = match &e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(_) => {
            status.is_some_and(|s| s >= 500 || s == 429 || s == 408)
                || code.as_deref().is_some_and(|c| {
                    matches!(
                        c,
                        "SlowDown"
                            | "Throttling"
                            | "ThrottlingException"
                            | "RequestTimeout"
                            | "InternalError"
                            | "ServiceUnavailable"
                    )
                })
        }
        _ => false,
    };
    StoreError::S3 {
        op,
        location,
        status,
        code,
        transient,
        source: Box::new(e),
    }
}

fn status_code(e: &StoreError) -> (Option<u16>, Option<&str>) {
    match e {
        StoreError::S3 { status, code, .. } => (*status, code.as_deref()),
        _ => (None, None),
    }
}

pub(crate) fn is_not_found(e: &StoreError) -> bool {
    let (status, code) = status_code(e);
    status == Some(404) || matches!(code, Some("NoSuchKey" | "NotFound" | "NoSuchUpload"))
}

pub(crate) fn is_precondition_failure(e: &StoreError) -> bool {
    let (status, code) = status_code(e);
    status == Some(412) || code == Some("PreconditionFailed")
}

pub(crate) fn is_conflict(e: &StoreError) -> bool {
    let (status, code) = status_code(e);
    status == Some(409) || code == Some("ConditionalRequestConflict")
}

pub(crate) fn crc32c_b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(crc32c::crc32c(data).to_be_bytes())
}

/// Exponential backoff for our outer retries: 0.5 s, 1 s, 2 s, ... capped at 10 s.
pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << attempt.min(5))).min(Duration::from_secs(10))
}

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
        let full_prefix = format!("{}{prefix}", self.prefix);
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full_prefix)
            .into_paginator()
            .send();
        let mut keys = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| s3_err("list", self.location(&full_prefix), e))?;
            for obj in page.contents() {
                let Some(rel) = obj.key().and_then(|k| k.strip_prefix(&self.prefix)) else {
                    continue;
                };
                if !rel.split('/').any(|c| c.starts_with(RESERVED_PREFIX)) {
                    keys.push(rel.to_string());
                }
            }
        }
        keys.sort();
        Ok(keys)
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
