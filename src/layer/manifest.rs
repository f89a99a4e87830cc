//! What lives in the bucket next to the blobs: the per-identity manifest and the per-blob metadata.
//!
//! The manifest is what makes a restore possible on a node with an empty disk: it names the
//! identity's current digest. It only moves forward (by `seq`), so a slow, older sync that finishes
//! late cannot replace a newer layer.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::types::{ContainerLayerId, LayerSnapshot};

/// Schema version of [`LayerManifest`]; bumped on incompatible changes.
pub const MANIFEST_VERSION: u32 = 1;
/// Previous digests kept in a manifest's history.
pub const HISTORY_LIMIT: usize = 32;

/// Object key of an identity's manifest (relative to the configured prefix).
#[must_use]
pub fn manifest_key(id: &ContainerLayerId) -> String {
    format!("manifests/{}.json", id.to_key())
}

/// Object key of a layer blob.
#[must_use]
pub fn blob_key(digest: &str) -> String {
    format!("{digest}.tar.zst")
}

/// Object key of a blob's metadata document.
#[must_use]
pub fn meta_key(digest: &str) -> String {
    format!("{digest}.meta.json")
}

/// One version of an identity's layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// sha256 (hex) of the compressed archive: the blob's content address.
    pub digest: String,
    pub compressed_size_bytes: u64,
    pub size_bytes: u64,
    pub uncompressed_digest: String,
    pub file_count: u64,
    pub created_at: DateTime<Utc>,
    /// Ordering ticket; the manifest never moves to a lower one.
    pub seq: u64,
    /// Parent chain (image layer digests or snapshot keys) the layer was taken on.
    #[serde(default)]
    pub base: Option<Vec<String>>,
}

impl ManifestEntry {
    /// The snapshot this entry describes.
    #[must_use]
    pub fn snapshot(&self, unchanged: bool) -> LayerSnapshot {
        LayerSnapshot {
            digest: self.digest.clone(),
            size_bytes: self.size_bytes,
            compressed_size_bytes: self.compressed_size_bytes,
            created_at: self.created_at,
            file_count: self.file_count,
            uncompressed_digest: self.uncompressed_digest.clone(),
            unchanged,
        }
    }
}

/// The per-identity manifest stored at [`manifest_key`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerManifest {
    pub version: u32,
    pub identity: ContainerLayerId,
    pub current: ManifestEntry,
    /// Earlier versions, newest first, at most [`HISTORY_LIMIT`].
    #[serde(default)]
    pub history: Vec<ManifestEntry>,
    pub updated_at: DateTime<Utc>,
}

/// Outcome of trying to move a manifest to a new entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Advance {
    /// The manifest to write.
    Moved(LayerManifest),
    /// The entry is older than the current one; the manifest must not move.
    Stale { current_seq: u64 },
}

impl LayerManifest {
    /// A first manifest for `identity`.
    #[must_use]
    pub fn new(identity: ContainerLayerId, entry: ManifestEntry) -> Self {
        Self {
            version: MANIFEST_VERSION,
            identity,
            updated_at: entry.created_at,
            current: entry,
            history: Vec::new(),
        }
    }

    /// Moves to `entry` unless its seq is lower than the current one. Re-syncing the current
    /// digest does not add a history row.
    #[must_use]
    pub fn advance(&self, entry: ManifestEntry) -> Advance {
        if entry.seq < self.current.seq {
            return Advance::Stale {
                current_seq: self.current.seq,
            };
        }
        let mut next = self.clone();
        next.updated_at = Utc::now();
        if entry.digest != self.current.digest {
            next.history.insert(0, self.current.clone());
            next.history.truncate(HISTORY_LIMIT);
        }
        next.current = entry;
        Advance::Moved(next)
    }
}

/// How a blob was produced, so a reader years later knows how to interpret it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveFormat {
    /// `pax-oci-layer`: PAX tar with OCI whiteouts, entries sorted.
    pub tar_format: String,
    pub tar_format_version: u32,
    pub compression: String,
    pub zstd_level: i32,
    pub zstd_workers: u32,
    pub zstd_library_version: String,
    pub uncompressed_digest: String,
    pub uncompressed_size: u64,
    pub skipped_sockets: u64,
    /// `/sys/module/overlay/parameters/*` of the node that packed the layer.
    pub overlay_parameters: BTreeMap<String, String>,
}

/// The document stored at [`meta_key`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMeta {
    pub identity: ContainerLayerId,
    pub snapshot: LayerSnapshot,
    pub format: ArchiveFormat,
}

/// Reads the overlay module parameters; missing module or unreadable files give what is readable.
pub fn overlay_parameters(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        if let Ok(value) = std::fs::read_to_string(entry.path()) {
            out.insert(
                entry.file_name().to_string_lossy().into_owned(),
                value.trim_end().to_string(),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(digest: &str, seq: u64) -> ManifestEntry {
        ManifestEntry {
            digest: digest.into(),
            compressed_size_bytes: 1,
            size_bytes: 2,
            uncompressed_digest: format!("u{digest}"),
            file_count: 3,
            created_at: Utc::now(),
            seq,
            base: None,
        }
    }

    #[test]
    fn keys_are_relative_and_identity_scoped() {
        let id = ContainerLayerId::new("a_b", "c");
        assert_eq!(manifest_key(&id), "manifests/a%5Fb_c.json");
        assert_eq!(blob_key("ab"), "ab.tar.zst");
        assert_eq!(meta_key("ab"), "ab.meta.json");
    }

    #[test]
    fn advance_refuses_lower_seq_and_keeps_bounded_history() {
        let id = ContainerLayerId::new("s", "i");
        let mut m = LayerManifest::new(id, entry("d0", 1));
        assert_eq!(
            m.advance(entry("old", 0)),
            Advance::Stale { current_seq: 1 }
        );
        for i in 1..=(HISTORY_LIMIT as u64 + 5) {
            match m.advance(entry(&format!("d{i}"), i + 1)) {
                Advance::Moved(next) => m = next,
                Advance::Stale { .. } => panic!("seq {i} should move"),
            }
        }
        assert_eq!(m.history.len(), HISTORY_LIMIT);
        assert_eq!(m.current.digest, format!("d{}", HISTORY_LIMIT + 5));
        assert_eq!(m.history[0].digest, format!("d{}", HISTORY_LIMIT + 4));
        // Same digest again (a retry): moves seq but adds no history row.
        let Advance::Moved(again) = m.advance(entry(&m.current.digest, 100)) else {
            panic!("equal digest with higher seq should move");
        };
        assert_eq!(again.history, m.history);
        assert_eq!(again.current.seq, 100);
    }

    #[test]
    fn manifest_round_trips_through_json() {
        let m = LayerManifest::new(ContainerLayerId::new("s", "i/j"), entry("d", 7));
        let text = serde_json::to_string(&m).unwrap();
        let back: LayerManifest = serde_json::from_str(&text).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.current.snapshot(true).digest, "d");
    }

    #[test]
    fn overlay_parameters_reads_files_and_tolerates_absence() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("metacopy"), "N\n").unwrap();
        let p = overlay_parameters(dir.path());
        assert_eq!(p.get("metacopy").map(String::as_str), Some("N"));
        assert!(overlay_parameters(&dir.path().join("missing")).is_empty());
    }
}
