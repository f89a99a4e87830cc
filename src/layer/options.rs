//! Options, progress reporting and results of sync and restore.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::types::{ContainerLayerId, LayerSnapshot};
use crate::archive::XattrNs;

/// The stage a sync or restore is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Archiving the upper dir; `done` counts uncompressed bytes read.
    Pack,
    /// Sending the archive; `done` counts compressed bytes.
    Upload,
    /// Fetching the archive; `done` counts compressed bytes.
    Download,
    /// Extracting; `done` counts uncompressed bytes.
    Unpack,
}

impl Phase {
    /// Short label for progress displays.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Phase::Pack => "packing",
            Phase::Upload => "uploading",
            Phase::Download => "download",
            Phase::Unpack => "unpacking",
        }
    }
}

/// One progress report: bytes done so far in `phase`, and the total when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgressEvent {
    pub phase: Phase,
    pub done: u64,
    pub total: Option<u64>,
}

/// Progress callback of sync and restore; called from worker threads.
pub type LayerProgress = Arc<dyn Fn(ProgressEvent) + Send + Sync>;

/// Options of [`super::LayerSyncManager::sync_layer_with`].
#[derive(Clone, Default)]
pub struct SyncOptions {
    /// Parent chain the layer sits on, recorded in the manifest.
    pub base: Option<Vec<String>>,
    /// Ordering ticket (see [`super::LayerSyncManager::next_seq`]). A sync whose seq is lower than
    /// the manifest's uploads its blob but does not move the manifest. `None` = this sync is the
    /// newest.
    pub seq: Option<u64>,
    pub progress: Option<LayerProgress>,
}

impl std::fmt::Debug for SyncOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncOptions")
            .field("base", &self.base)
            .field("seq", &self.seq)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// Options of [`super::LayerSyncManager::restore_layer_with`].
#[derive(Clone)]
pub struct RestoreOptions {
    /// Namespace of the opaque-dir markers written (`user` for overlay mounts with `userxattr`).
    pub xattr_ns: XattrNs,
    pub progress: Option<LayerProgress>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self {
            xattr_ns: XattrNs::Trusted,
            progress: None,
        }
    }
}

impl std::fmt::Debug for RestoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreOptions")
            .field("xattr_ns", &self.xattr_ns)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// What an upload did, for reporting (and for the crash test's part accounting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadSummary {
    pub parts_total: u32,
    pub parts_sent: u32,
    pub parts_reused: u32,
    /// The blob was already in the store; nothing was sent.
    pub already_existed: bool,
}

/// Everything a sync did; [`LayerSnapshot`] is the part most callers need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncOutcome {
    pub identity: ContainerLayerId,
    #[serde(flatten)]
    pub snapshot: LayerSnapshot,
    /// The seq the sync was ordered by.
    pub seq: u64,
    /// False when a newer sync already owned the manifest (the blob was still uploaded).
    pub manifest_moved: bool,
    /// `None` when nothing needed uploading (unchanged layer).
    pub upload: Option<UploadSummary>,
}

/// Options of [`super::LayerSyncManager::gc_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcOptions {
    /// Report what would be deleted and trimmed; change nothing (no resumes, aborts or sweeps
    /// either).
    pub dry_run: bool,
}

/// What [`super::LayerSyncManager::gc`] did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// Incomplete multipart uploads aborted in the store.
    pub aborted_uploads: u32,
    /// Interrupted syncs finished (blob, metadata and manifest).
    pub resumed: u32,
    /// Abandoned spool files deleted from the staging dir.
    pub spools_removed: u32,
    /// Manifests cut to `history_keep` versions.
    pub manifests_trimmed: u32,
    /// Versions dropped from those manifests.
    pub versions_dropped: u32,
    /// Manifests over `history_keep` left alone because the store does not enforce
    /// conditional writes (all their versions stay referenced).
    pub manifests_untrimmed: u32,
    /// Layer objects (`.tar.zst` and `.meta.json`) deleted and their bytes.
    pub objects_deleted: u32,
    pub bytes_deleted: u64,
    /// Their keys, sorted.
    pub deleted: Vec<String>,
    /// Unreferenced layers kept because they were written within `gc_grace_secs`.
    pub young_kept: u32,
    /// Unreferenced layers kept because this node is still uploading them.
    pub pending_kept: u32,
}

impl GcReport {
    pub(super) fn count_deleted(&mut self, key: &str, size: u64) {
        self.objects_deleted += 1;
        self.bytes_deleted += size;
        self.deleted.push(key.to_string());
    }
}
