//! Object stores for layer archives and their metadata.
//!
//! Two backends behind [`ObjectStore`]: [`S3Store`] (any S3-compatible service, with multipart
//! uploads that resume after a crash) and [`LocalStore`] (a directory, also usable on NFS).
//! Keys are relative to the configured prefix, which the store prepends; layer objects are
//! `{digest}.tar.zst` and `{digest}.meta.json`.

mod error;
pub mod follow;
mod growing;
mod local;
mod s3;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use error::StoreError;
pub use growing::{GrowingFile, SpoolFeed, SpoolLen};
pub use local::LocalStore;
pub use s3::S3Store;

use crate::config::{BackendKind, LayerStorageConfig};
use crate::types::{CompletedPart, PendingUpload};
use error::Result;

/// Called with the number of bytes transferred since the previous call.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Called with the length of the prefix of a download target that is complete (an absolute
/// length, growing with each call), so a reader can follow a download in progress.
pub type PrefixReady = Arc<dyn Fn(u64) + Send + Sync>;

/// What a HEAD tells about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    /// Opaque version tag for [`PutCondition::IfMatch`] (quoted, as S3 returns it).
    pub etag: Option<String>,
    /// When the object was last written (S3 `Last-Modified`, the file's mtime); `None` when the
    /// backend did not say. Garbage collection treats `None` as "just written".
    pub last_modified: Option<SystemTime>,
}

/// One object of [`ObjectStore::list_info`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    /// Key relative to the store prefix.
    pub key: String,
    pub size: u64,
    /// As [`ObjectInfo::last_modified`].
    pub last_modified: Option<SystemTime>,
}

/// Precondition of [`ObjectStore::put_bytes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutCondition {
    None,
    /// Write only if the key does not exist.
    IfNoneMatch,
    /// Write only if the current object has this etag.
    IfMatch(String),
}

/// Result of [`ObjectStore::put_bytes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    Written { etag: Option<String> },
    PreconditionFailed,
}

/// What [`ObjectStore::upload_file`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UploadReport {
    /// Parts the object consists of (1 for a single PUT).
    pub parts_total: u32,
    /// Parts sent over the wire by this call (re-sent parts count once per send).
    pub parts_sent: u32,
    /// Parts of an interrupted upload that were verified on the server and kept.
    pub parts_reused: u32,
    /// The object was found complete instead of being written by this call: it existed before,
    /// an earlier attempt completed it, or a concurrent writer won the conditional Complete.
    pub already_existed: bool,
}

/// Storage for immutable layer archives and small JSON documents.
#[async_trait::async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// e.g. `s3://bucket/prefix` or `file:///dir`, for logs and error messages.
    fn describe(&self) -> String;

    /// Size and etag of `key`, or `None` if it does not exist.
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>>;

    /// Whole contents of a small object, or `None` if it does not exist.
    async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// Writes a small object under a precondition.
    ///
    /// Where the backend ignores preconditions (see [`ObjectStore::conditional_writes`]) they are
    /// emulated with a HEAD first: correct without concurrent writers, racy with them.
    async fn put_bytes(&self, key: &str, data: Vec<u8>, cond: PutCondition) -> Result<PutOutcome>;

    /// Whether the backend enforces preconditions itself; probed once per store.
    async fn conditional_writes(&self) -> Result<bool>;

    /// Streams `key` into `dest` (created or truncated); returns its size.
    /// The caller verifies the digest.
    async fn download_to_file(
        &self,
        key: &str,
        dest: &Path,
        progress: Option<Progress>,
    ) -> Result<u64>;

    /// Uploads the immutable file `src` as `key`, resuming a journaled upload of the same key.
    ///
    /// Skipped when `key` already exists with the size of `src` (keys are content addressed).
    /// `progress` also counts bytes that did not need sending (reused parts, existing objects),
    /// so a progress bar ends at the file size.
    async fn upload_file(
        &self,
        key: &str,
        src: &Path,
        journal: &dyn UploadJournal,
        progress: Option<Progress>,
    ) -> Result<UploadReport>;

    /// [`ObjectStore::download_to_file`] that lets a reader follow along: `ready` is called
    /// whenever the complete prefix of `dest` grows, and bytes below it are final. Backends
    /// may fetch ranges in parallel and need not fsync `dest` (it is a scratch file the caller
    /// verifies). The default downloads the whole object, then reports it ready.
    async fn download_following(
        &self,
        key: &str,
        dest: &Path,
        ready: PrefixReady,
        progress: Option<Progress>,
    ) -> Result<u64> {
        let n = self.download_to_file(key, dest, progress).await?;
        ready(n);
        Ok(n)
    }

    /// Starts uploading a spool while it is still being written: finished parts go up as
    /// parts of a temporary upload, and [`StreamedUpload::finish`] turns the whole into the
    /// content-addressed object once the digest is known. `None` when the backend gains
    /// nothing from it (the default); the caller then uses [`ObjectStore::upload_file`].
    ///
    /// The temporary upload is not journaled: a crash before `finish` leaves the packed spool
    /// for the journaled path, and the orphan for [`ObjectStore::abort_orphaned_streams`]
    /// (and, for another node's orphans, [`ObjectStore::abort_stale_uploads`]).
    async fn start_streamed_upload(
        &self,
        src: GrowingFile,
        progress: Option<Progress>,
    ) -> Result<Option<Box<dyn StreamedUpload>>> {
        let _ = (src, progress);
        Ok(None)
    }

    /// Drops this node's streamed uploads whose process is gone (a crash or `kill -9` mid-stream:
    /// the finished spool is uploaded through the journaled path instead, so the temporary
    /// upload is never needed again and would otherwise be billed until `abort_stale_uploads`).
    /// Returns how many uploads and temporary objects were removed.
    async fn abort_orphaned_streams(&self) -> Result<u32> {
        Ok(0)
    }

    /// Keys (relative to the store prefix) starting with `prefix`, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>>;

    /// [`ObjectStore::list`] with each object's size and last-modified time, sorted by key.
    /// The default HEADs every key (objects deleted in between are left out); backends whose
    /// listing carries both override it.
    async fn list_info(&self, prefix: &str) -> Result<Vec<ListedObject>> {
        let mut out = Vec::new();
        for key in self.list(prefix).await? {
            if let Some(info) = self.head(&key).await? {
                out.push(ListedObject {
                    key,
                    size: info.size,
                    last_modified: info.last_modified,
                });
            }
        }
        Ok(out)
    }

    /// Whether `key` exists. The default is a HEAD; backends where a HEAD reads the whole
    /// object (the local store hashes it for the etag) override it.
    async fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.head(key).await?.is_some())
    }

    /// Removes `key`; a missing key is not an error.
    async fn delete(&self, key: &str) -> Result<()>;

    /// Removes incomplete uploads older than `older_than` (multipart uploads, and temporary
    /// objects a streamed upload left behind); returns how many.
    async fn abort_stale_uploads(
        &self,
        older_than: Duration,
        journal: &dyn UploadJournal,
    ) -> Result<u32>;
}

/// An upload started by [`ObjectStore::start_streamed_upload`].
#[async_trait::async_trait]
pub trait StreamedUpload: Send + Sync + std::fmt::Debug {
    /// Makes the finished spool (`spool`, complete per its [`SpoolFeed`]) the object `key`.
    ///
    /// Skipped when `key` already exists with the spool's size. Where streaming did not work
    /// out (a part failed, the spool outgrew what can be copied server-side, or was smaller
    /// than one part) the temporary upload is dropped and `spool` is uploaded with the
    /// journaled [`ObjectStore::upload_file`] instead, so the result is the same either way.
    async fn finish(
        self: Box<Self>,
        key: &str,
        spool: &Path,
        journal: &dyn UploadJournal,
    ) -> Result<UploadReport>;

    /// Stops sending and removes what was sent (the spool was unchanged or packing failed).
    async fn abort(self: Box<Self>);
}

/// Durable record of multipart uploads in flight, so a restarted process can resume them.
///
/// Implementations must make each call durable before returning: the store sends a part only
/// after `begin_upload` returned, and treats a part as done only after `record_part` returned.
#[async_trait::async_trait]
pub trait UploadJournal: Send + Sync {
    async fn load_upload(&self, object_key: &str) -> Result<Option<PendingUpload>>;
    /// Records a new upload, replacing any other upload of the same key.
    async fn begin_upload(&self, upload: &PendingUpload) -> Result<()>;
    async fn record_part(
        &self,
        object_key: &str,
        upload_id: &str,
        part: &CompletedPart,
    ) -> Result<()>;
    /// Forgets the upload (completed, aborted or abandoned).
    async fn finish_upload(&self, object_key: &str, upload_id: &str) -> Result<()>;
    async fn known_upload_ids(&self) -> Result<Vec<String>>;
}

/// Opens the backend selected by `cfg.backend`.
pub async fn open_store(cfg: &LayerStorageConfig) -> Result<Arc<dyn ObjectStore>> {
    Ok(match cfg.backend {
        BackendKind::Local => Arc::new(LocalStore::open(cfg)?),
        BackendKind::S3 => Arc::new(S3Store::open(cfg).await?),
    })
}

/// Checks a key (or the configured prefix without its trailing `/`) for path safety; both
/// backends apply the same rules so an object written to one can be copied to the other.
pub(crate) fn validate_key(key: &str) -> Result<()> {
    let bad = |reason| {
        Err(StoreError::InvalidKey {
            key: key.to_string(),
            reason,
        })
    };
    if key.is_empty() {
        return bad("empty");
    }
    if key.len() > 1024 {
        return bad("longer than 1024 bytes");
    }
    if key.starts_with('/') {
        return bad("absolute");
    }
    if key.chars().any(char::is_control) {
        return bad("contains control characters");
    }
    for comp in key.split('/') {
        match comp {
            "" => return bad("has an empty path component"),
            "." | ".." => return bad("has a . or .. component"),
            c if c.starts_with(local::RESERVED_PREFIX) => {
                return bad("uses the reserved .zlayer- name prefix");
            }
            _ => {}
        }
    }
    Ok(())
}

/// Normalises the configured prefix: no leading `/`, exactly one trailing `/` unless empty.
pub(crate) fn normalize_prefix(prefix: &str) -> Result<String> {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    validate_key(trimmed)?;
    Ok(format!("{trimmed}/"))
}

/// The keys of a [`ObjectStore::list_info`] result (backends list through it).
pub(crate) fn keys_of(objects: Vec<ListedObject>) -> Vec<String> {
    objects.into_iter().map(|o| o.key).collect()
}

/// The last path segment up to its first `.`: the digest of `{digest}.tar.zst`.
pub(crate) fn digest_of_key(key: &str) -> String {
    let name = key.rsplit('/').next().unwrap_or(key);
    name.split('.').next().unwrap_or(name).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated_with_the_key_in_the_error() {
        for (key, reason) in [
            ("", "empty"),
            ("/abs", "absolute"),
            ("a/../b", ". or .."),
            ("..", ". or .."),
            ("a/./b", ". or .."),
            ("a//b", "empty path component"),
            ("a/", "empty path component"),
            ("a\nb", "control"),
            ("x/.zlayer-tmp-1", "reserved"),
        ] {
            let err = validate_key(key).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(reason), "{key:?}: {msg}");
            assert!(msg.contains(&format!("{key:?}")), "{key:?}: {msg}");
        }
        validate_key("abc.tar.zst").unwrap();
        validate_key("ids/web_0/manifest.json").unwrap();
        validate_key("a..b/.hidden").unwrap();
    }

    #[test]
    fn prefixes_are_normalised() {
        assert_eq!(normalize_prefix("").unwrap(), "");
        assert_eq!(normalize_prefix("/").unwrap(), "");
        assert_eq!(normalize_prefix("layers").unwrap(), "layers/");
        assert_eq!(normalize_prefix("/a/b/").unwrap(), "a/b/");
        assert!(normalize_prefix("a/../b").is_err());
    }

    #[test]
    fn digest_is_taken_from_the_object_name() {
        assert_eq!(digest_of_key("abc123.tar.zst"), "abc123");
        assert_eq!(digest_of_key("x/abc123.meta.json"), "abc123");
        assert_eq!(digest_of_key("plain"), "plain");
    }
}
