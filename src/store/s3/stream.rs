//! Streamed uploads: parts of a spool that is still being packed go up while packing goes on.
//!
//! The content address is only known when packing ends, so the parts are sent as a multipart
//! upload under a unique temporary key (`{prefix}.zlayer-stream/…`, a reserved name that never
//! shows in `list`). At the end the upload is completed and copied server-side (CopyObject) to
//! `{digest}.tar.zst`, checked with a HEAD, and the temporary object deleted. Whenever that does
//! not work out the temporary upload is dropped and the finished spool goes through the
//! journaled [`super::upload`] path instead, which is also what a crash falls back to: the
//! temporary upload is deliberately not journaled.
//!
//! Checksums: every part carries its CRC32C, which the service verifies on receipt, but the
//! temporary upload is created without an object checksum algorithm. A multipart source with
//! one makes CopyObject recompute the checksum over the whole object (a full data copy on
//! Garage, per the S3 rules for multipart sources); without one, Garage copies metadata only.
//! The content itself is covered by the sha256 key, checked on every restore. A service that
//! refuses part checksums on such an upload makes the sender fail, and the journaled path
//! (with an object checksum) takes over.
//!
//! Part size: the configured `part_size_bytes`, capped at [`STREAM_PART_CAP`]. Smaller parts
//! start sending sooner and leave a shorter tail once packing ends; since a streamed object is
//! never larger than CopyObject's 5 GiB, 16 MiB parts stay far below the 10,000-part limit,
//! and at that size the per-request overhead is negligible. Parts are all the same size except
//! the last (as R2 requires).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::task::JoinHandle;

use super::upload::{self, MAX_PARTS};
use super::{S3Store, s3_err};
use crate::config::MIN_PART_SIZE;
use crate::store::error::Result;
use crate::store::{
    GrowingFile, ObjectStore, Progress, StoreError, StreamedUpload, UploadJournal, UploadReport,
};
use crate::types::CompletedPart;

/// Folder of temporary objects under the store prefix.
pub(super) const STREAM_DIR: &str = ".zlayer-stream/";
/// CopyObject copies at most 5 GiB; larger spools take the journaled path.
const COPY_LIMIT: u64 = 5 << 30;
/// Upper bound of the streamed part size.
pub(super) const STREAM_PART_CAP: u64 = 16 << 20;

// Even in the smallest parts, a streamed object fits S3's part-number limit.
const _: () = assert!(COPY_LIMIT / MIN_PART_SIZE <= MAX_PARTS);

/// Part size of streamed uploads for a configured part size.
pub(super) fn stream_part_size(configured: u64) -> u64 {
    configured.clamp(MIN_PART_SIZE, STREAM_PART_CAP)
}

/// How the part sender ended.
#[derive(Debug)]
enum Outcome {
    /// Every byte of the finished spool is in `parts` of `upload_id`.
    Sent {
        upload_id: String,
        parts: BTreeMap<u32, CompletedPart>,
    },
    /// Streaming does not apply; the reason is logged.
    NotStreamed(&'static str),
}

/// What the part sender works with.
struct Sender {
    store: Arc<S3Store>,
    full: String,
    src: GrowingFile,
    part_size: u64,
    upload_id: Arc<Mutex<Option<String>>>,
    progress: Option<Progress>,
    sent: Arc<AtomicU64>,
}

/// A streamed upload in progress (see the module docs).
pub(super) struct S3StreamedUpload {
    store: Arc<S3Store>,
    /// Temporary key, with the store prefix.
    temp: String,
    upload_id: Arc<Mutex<Option<String>>>,
    task: Option<JoinHandle<Result<Outcome>>>,
    src: GrowingFile,
    progress: Option<Progress>,
    sent: Arc<AtomicU64>,
}

impl std::fmt::Debug for S3StreamedUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3StreamedUpload")
            .field("temp", &self.temp)
            .field("upload_id", &self.current_id())
            .field("sent", &self.sent.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// This node's directory under [`STREAM_DIR`]: a hash of the machine id and the state DB path,
/// so two nodes sharing a bucket (or two daemons with separate state on one host) never
/// clean up each other's streams.
pub(super) fn node_scope(state_db: &Path) -> String {
    use sha2::{Digest, Sha256};
    let machine = std::fs::read_to_string("/etc/machine-id")
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/hostname"))
        .unwrap_or_default();
    let mut h = Sha256::new();
    h.update(machine.trim().as_bytes());
    h.update([0]);
    h.update(state_db.as_os_str().as_encoded_bytes());
    hex::encode(&h.finalize()[..8])
}

/// `<pid>.<session>`: the session tells this process from an earlier one that had its pid.
fn process_scope() -> &'static str {
    static SCOPE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SCOPE.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{}.{nanos:x}", std::process::id())
    })
}

/// True when the stream key `.../<node>/<pid>.<session>/<name>` belongs to a process that is
/// gone: an earlier incarnation of this pid, or a pid with no live process. Keys of other live
/// processes on this node (a CLI `sync` next to the daemon) are left alone.
pub(super) fn is_orphan(full_key: &str) -> bool {
    let mut parts = full_key.rsplit('/');
    let (Some(_name), Some(scope)) = (parts.next(), parts.next()) else {
        return false;
    };
    let Some((pid, _session)) = scope.split_once('.') else {
        return false;
    };
    if scope == process_scope() {
        return false;
    }
    pid == std::process::id().to_string() || !Path::new("/proc").join(pid).exists()
}

/// Starts sending the parts of `src` in the background.
pub(super) fn start(
    store: &S3Store,
    src: GrowingFile,
    progress: Option<Progress>,
) -> S3StreamedUpload {
    let temp = format!(
        "{}{STREAM_DIR}{}/{}/{}.tar.zst",
        store.prefix,
        store.node,
        process_scope(),
        crate::util::unique_temp_name(b"layer", "stream").to_string_lossy()
    );
    let store = Arc::new(store.clone());
    let upload_id = Arc::new(Mutex::new(None));
    let sent = Arc::new(AtomicU64::new(0));
    let sender = Sender {
        store: Arc::clone(&store),
        full: temp.clone(),
        src: src.clone(),
        part_size: stream_part_size(store.part_size),
        upload_id: Arc::clone(&upload_id),
        progress: progress.clone(),
        sent: Arc::clone(&sent),
    };
    S3StreamedUpload {
        store,
        temp,
        upload_id,
        task: Some(tokio::spawn(sender.run())),
        src,
        progress,
        sent,
    }
}

fn lock_id(m: &Mutex<Option<String>>) -> std::sync::MutexGuard<'_, Option<String>> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Sender {
    async fn run(self) -> Result<Outcome> {
        let ps = self.part_size;
        let mut rx = self.src.watch();
        let mut parts = BTreeMap::new();
        let mut inflight = FuturesUnordered::new();
        let mut next: u32 = 1;
        loop {
            let state = *rx.borrow_and_update();
            let created = lock_id(&self.upload_id).clone();
            if state.complete && created.is_none() && state.len <= ps {
                return Ok(Outcome::NotStreamed("spool not larger than one part"));
            }
            while inflight.len() < self.store.concurrency {
                let start = u64::from(next - 1) * ps;
                let len = if state.complete {
                    state.len.saturating_sub(start).min(ps)
                } else if state.len >= start + ps {
                    ps
                } else {
                    0
                };
                if len == 0 {
                    break;
                }
                if start + len > COPY_LIMIT || u64::from(next) > MAX_PARTS {
                    return Ok(Outcome::NotStreamed("spool larger than a server-side copy"));
                }
                let existing = lock_id(&self.upload_id).clone();
                let id = match existing {
                    Some(id) => id,
                    None => self.create().await?,
                };
                inflight.push(self.send(id, next, start, len));
                next += 1;
            }
            let all_scheduled = state.complete && u64::from(next - 1) * ps >= state.len;
            if all_scheduled && inflight.is_empty() {
                let Some(upload_id) = lock_id(&self.upload_id).clone() else {
                    return Ok(Outcome::NotStreamed("nothing was sent"));
                };
                return Ok(Outcome::Sent { upload_id, parts });
            }
            tokio::select! {
                Some(res) = inflight.next(), if !inflight.is_empty() => {
                    let part = res?;
                    parts.insert(part.part_number, part);
                }
                changed = rx.changed(), if !state.complete => {
                    if changed.is_err() {
                        return Ok(Outcome::NotStreamed("spool abandoned before completion"));
                    }
                }
                else => return Ok(Outcome::NotStreamed("nothing left to wait for")),
            }
        }
    }

    /// No object-level checksum: with one, Garage's CopyObject re-reads and re-hashes the whole
    /// object; each part still carries its CRC32C.
    async fn create(&self) -> Result<String> {
        let id = self.store.create_upload(&self.full, None).await?;
        *lock_id(&self.upload_id) = Some(id.clone());
        tracing::debug!(key = self.full, upload_id = id, "started streamed upload");
        Ok(id)
    }

    /// One UploadPart read from the spool's final prefix.
    async fn send(
        &self,
        upload_id: String,
        n: u32,
        offset: u64,
        len: u64,
    ) -> Result<CompletedPart> {
        let path = self.src.reopen_path();
        let part = upload::FilePart {
            full: &self.full,
            upload_id: &upload_id,
            n,
            path: &path,
            offset,
            len,
        };
        upload::upload_file_part(&self.store, &part, |sent| {
            self.sent.fetch_add(sent, Ordering::Relaxed);
            if let Some(p) = &self.progress {
                p(sent);
            }
        })
        .await
    }
}

impl S3StreamedUpload {
    fn current_id(&self) -> Option<String> {
        lock_id(&self.upload_id).clone()
    }

    /// Stops the sender and removes the temporary upload and object, whatever state they are
    /// in; failures are only logged (`gc` removes what is left).
    async fn discard(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        // The sender may have been cancelled between CreateMultipartUpload and recording its
        // id; the temporary key is unique, so listing it finds such an upload too.
        let mut ids: Vec<String> = self.current_id().into_iter().collect();
        match self
            .store
            .client
            .list_multipart_uploads()
            .bucket(&self.store.bucket)
            .prefix(&self.temp)
            .send()
            .await
        {
            Ok(page) => {
                for u in page.uploads() {
                    if u.key() == Some(self.temp.as_str())
                        && let Some(id) = u.upload_id()
                        && !ids.iter().any(|k| k == id)
                    {
                        ids.push(id.to_string());
                    }
                }
            }
            Err(e) => {
                let err = s3_err("list multipart uploads", self.store.location(&self.temp), e);
                tracing::warn!(error = %err, "cannot list streamed uploads to abort");
            }
        }
        for id in ids {
            self.store.abort_quietly(&self.temp, &id).await;
        }
        if let Err(err) = self.store.delete_full(&self.temp).await {
            tracing::warn!(error = %err, "cannot delete temporary object");
        }
    }

    /// Complete under the temporary key, copy to `full`, verify, delete the temporary object.
    async fn publish(
        &self,
        full: &str,
        upload_id: &str,
        parts: &BTreeMap<u32, CompletedPart>,
        size: u64,
    ) -> Result<()> {
        let sent: u64 = parts.values().map(|p| p.size).sum();
        if sent != size {
            return Err(StoreError::SizeMismatch {
                location: self.store.location(&self.temp),
                expected: size,
                actual: sent,
            });
        }
        // No part checksums: the temporary upload has no object checksum algorithm.
        self.store
            .complete_upload(&self.temp, upload_id, parts, false, false)
            .await?;
        let mut copy = self
            .store
            .client
            .copy_object()
            .bucket(&self.store.bucket)
            .key(full)
            .copy_source(copy_source(&self.store.bucket, &self.temp));
        if let Some((sse, kms)) = &self.store.sse {
            copy = copy
                .server_side_encryption(sse.clone())
                .set_ssekms_key_id(kms.clone());
        }
        copy.send()
            .await
            .map_err(|e| s3_err("copy", self.store.location(full), e))?;
        let head = self
            .store
            .client
            .head_object()
            .bucket(&self.store.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| s3_err("head", self.store.location(full), e))?;
        let actual = head
            .content_length()
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0);
        if actual != size {
            return Err(StoreError::SizeMismatch {
                location: self.store.location(full),
                expected: size,
                actual,
            });
        }
        if let Err(err) = self.store.delete_full(&self.temp).await {
            tracing::warn!(error = %err, "cannot delete temporary object; gc removes it");
        }
        Ok(())
    }
}

impl Drop for S3StreamedUpload {
    fn drop(&mut self) {
        // Dropped without finish/abort (the caller was cancelled): stop sending; the
        // temporary upload is left to `gc`.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[async_trait::async_trait]
impl StreamedUpload for S3StreamedUpload {
    async fn finish(
        mut self: Box<Self>,
        key: &str,
        spool: &Path,
        journal: &dyn UploadJournal,
    ) -> Result<UploadReport> {
        let full = self.store.full_key(key)?;
        let state = self.src.state();
        let exists = self.store.head(key).await?.map(|i| i.size);
        let outcome = if !state.complete {
            Ok(Ok(Outcome::NotStreamed("spool not marked complete")))
        } else if exists == Some(state.len) {
            Ok(Ok(Outcome::NotStreamed("object already exists")))
        } else if let Some(task) = self.task.take() {
            task.await.map_err(|source| StoreError::Task {
                location: self.store.location(&self.temp),
                source,
            })
        } else {
            Ok(Ok(Outcome::NotStreamed("sender already stopped")))
        };
        let fallback_reason = match outcome {
            Ok(Ok(Outcome::Sent { upload_id, parts })) => {
                match self.publish(&full, &upload_id, &parts, state.len).await {
                    Ok(()) => {
                        let n = u32::try_from(parts.len()).unwrap_or(u32::MAX);
                        tracing::debug!(key, parts = n, "streamed upload published");
                        return Ok(UploadReport {
                            parts_total: n,
                            parts_sent: n,
                            parts_reused: 0,
                            already_existed: false,
                        });
                    }
                    Err(e) => crate::util::error_chain(&e),
                }
            }
            Ok(Ok(Outcome::NotStreamed(reason))) => reason.to_string(),
            Ok(Err(e)) | Err(e) => crate::util::error_chain(&e),
        };
        tracing::debug!(
            key,
            reason = fallback_reason,
            "streamed upload not used; uploading the spool"
        );
        self.discard().await;
        // Bytes sent in the stream were reported already; the journaled path reports its own.
        let sent = self.sent.swap(0, Ordering::Relaxed);
        if sent > 0 {
            tracing::info!(
                key,
                sent,
                reason = fallback_reason,
                "streamed upload fell back to a plain upload"
            );
        }
        upload::upload(&self.store, key, spool, journal, self.progress.clone()).await
    }

    async fn abort(mut self: Box<Self>) {
        self.discard().await;
    }
}

/// `bucket/key` for CopyObject's `x-amz-copy-source`, percent-encoded except for `/`.
fn copy_source(bucket: &str, key: &str) -> String {
    let mut out = String::with_capacity(bucket.len() + key.len() + 1);
    for b in format!("{bucket}/{key}").bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_streams_of_gone_processes_are_orphans() {
        let dir = "layers/.zlayer-stream/0123456789abcdef";
        let own = format!("{dir}/{}/1-0.tar.zst", process_scope());
        assert!(!is_orphan(&own), "this process's own stream");
        let earlier = format!("{dir}/{}.1/1-0.tar.zst", std::process::id());
        assert!(is_orphan(&earlier), "an earlier process with this pid");
        assert!(
            !is_orphan(&format!("{dir}/1.5/1-0.tar.zst")),
            "pid 1 is alive"
        );
        let gone = (4_000_000..4_194_304)
            .find(|p| !Path::new("/proc").join(p.to_string()).exists())
            .unwrap();
        assert!(
            is_orphan(&format!("{dir}/{gone}.5/1-0.tar.zst")),
            "no such pid"
        );
        assert!(
            !is_orphan("layers/.zlayer-stream/x"),
            "malformed keys are left alone"
        );
        assert!(!is_orphan(&format!("{dir}/nodot/1-0.tar.zst")));
    }

    #[test]
    fn node_scopes_differ_per_state_db() {
        let a = node_scope(Path::new("/var/lib/a/state.sqlite"));
        assert_eq!(a, node_scope(Path::new("/var/lib/a/state.sqlite")));
        assert_ne!(a, node_scope(Path::new("/var/lib/b/state.sqlite")));
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn streamed_parts_are_capped_but_never_below_the_s3_minimum() {
        assert_eq!(stream_part_size(64 << 20), 16 << 20);
        assert_eq!(stream_part_size(8 << 20), 8 << 20);
        assert_eq!(stream_part_size(1 << 20), MIN_PART_SIZE);
    }

    #[test]
    fn copy_source_is_percent_encoded() {
        assert_eq!(
            copy_source("b", "p x/.zlayer-stream/1-2-3.tar.zst"),
            "b/p%20x/.zlayer-stream/1-2-3.tar.zst"
        );
        assert_eq!(copy_source("b", "ü+"), "b/%C3%BC%2B");
    }
}
