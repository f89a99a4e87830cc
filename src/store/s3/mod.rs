//! S3 (and S3-compatible) object store.
//!
//! Requests go through the SDK's standard retry mode (`max_retries`, exponential backoff with
//! jitter on 5xx, throttling, timeouts and connection resets), a connect timeout and
//! stalled-stream protection; whole parts and interrupted downloads get a second layer of
//! retries on top (see [`upload`] and [`download`]).
//!
//! Incomplete multipart uploads are billed until aborted. Besides
//! [`ObjectStore::abort_stale_uploads`](super::ObjectStore::abort_stale_uploads), configure the bucket to abort them itself:
//!
//! ```json
//! {"Rules": [{"ID": "abort-stale-mpu", "Status": "Enabled", "Filter": {"Prefix": ""},
//!             "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 2}}]}
//! ```
//!
//! (`aws s3api put-bucket-lifecycle-configuration --bucket B --lifecycle-configuration
//! file://lc.json`). Keep `DaysAfterInitiation` longer than the longest plausible gap before a
//! resume, or that resume starts over (correct, only slower).
//!
//! Layout: `client` builds the SDK client, `probe` detects whether conditional writes are
//! enforced, `classify` turns SDK errors into [`StoreError`]s, `object_store` implements
//! [`ObjectStore`](super::ObjectStore); `upload` (journaled multipart), `stream` (upload while packing) and
//! `download` (parallel ranged GETs) do the transfers.

mod classify;
mod client;
mod download;
mod object_store;
mod probe;
mod stream;
mod upload;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use aws_sdk_s3::Client;
use aws_sdk_s3::types::{CompletedMultipartUpload, ServerSideEncryption};
use base64::Engine;
use tokio::sync::OnceCell;

pub(crate) use classify::{is_conflict, is_not_found, is_precondition_failure, s3_err};

use super::error::Result;
use super::{StoreError, validate_key};
use crate::types::CompletedPart;

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
    /// The SDK client, for operations outside [`ObjectStore`](super::ObjectStore) (tests, bucket
    /// setup).
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

pub(crate) fn crc32c_b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(crc32c::crc32c(data).to_be_bytes())
}

/// Exponential backoff for our outer retries: 0.5 s, 1 s, 2 s, ... capped at 10 s.
pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << attempt.min(5))).min(Duration::from_secs(10))
}
