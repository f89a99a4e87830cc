//! What lives in the bucket next to the blobs: the per-identity manifest and the per-blob metadata.
//!
//! The manifest is what makes a restore possible on a node with an empty disk: it names the
//! identity's current digest. It only moves forward (by `seq`), so a slow, older sync that finishes
//! late cannot replace a newer layer. It also keeps the previous versions (`history_keep` in all,
//! current included) that `restore --seq/--at` and `rollback` choose from and that `gc` keeps.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::types::{ContainerLayerId, LayerSnapshot};

/// Schema version of [`LayerManifest`]; bumped on incompatible changes.
pub const MANIFEST_VERSION: u32 = 1;

/// Where the manifests live (relative to the configured prefix).
pub const MANIFEST_PREFIX: &str = "manifests/";

/// Object key of an identity's manifest (relative to the configured prefix).
#[must_use]
pub fn manifest_key(id: &ContainerLayerId) -> String {
    format!("{MANIFEST_PREFIX}{}.json", id.to_key())
}

/// The digest of a layer object key (`{digest}.tar.zst` or `{digest}.meta.json` at the top
/// level, digest = 64 lowercase hex); `None` for any other key.
#[must_use]
pub fn layer_object_digest(key: &str) -> Option<&str> {
    let digest = key
        .strip_suffix(".tar.zst")
        .or_else(|| key.strip_suffix(".meta.json"))?;
    let hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
    (digest.len() == 64 && digest.chars().all(hex)).then_some(digest)
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
    /// Set when a rollback made this content current again: the seq it had before. The entry's
    /// `created_at` is then the time of the rollback, so `--at` finds what was current when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_from: Option<u64>,
    /// When `digest` is a delta: the archives a restore applies before it, the full base first
    /// (each one a blob of its own). Empty for a full layer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<ChainLink>,
}

/// One archive under a delta.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainLink {
    pub digest: String,
    pub compressed_size_bytes: u64,
    pub size_bytes: u64,
}

impl ManifestEntry {
    /// Every blob a restore of this version reads, in the order it applies them.
    pub fn archives(&self) -> impl Iterator<Item = &str> {
        self.chain
            .iter()
            .map(|l| l.digest.as_str())
            .chain(std::iter::once(self.digest.as_str()))
    }

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
    /// Earlier versions, newest first; a sync keeps at most `history_keep - 1` of them.
    #[serde(default)]
    pub history: Vec<ManifestEntry>,
    pub updated_at: DateTime<Utc>,
}

/// Outcome of trying to move a manifest to a new entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Advance {
    /// The manifest to write.
    Moved(Box<LayerManifest>),
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

    /// Moves to `entry` unless its seq is lower than the current one, keeping `keep` versions
    /// in all (current included, at least one). Re-syncing the current digest does not add a
    /// history row.
    #[must_use]
    pub fn advance(&self, entry: ManifestEntry, keep: usize) -> Advance {
        if entry.seq < self.current.seq {
            return Advance::Stale {
                current_seq: self.current.seq,
            };
        }
        let mut next = self.clone();
        next.updated_at = Utc::now();
        if entry.digest != self.current.digest {
            next.history.insert(0, self.current.clone());
        }
        next.history.truncate(keep.max(1) - 1);
        next.current = entry;
        Advance::Moved(Box::new(next))
    }

    /// Current first, then the history, newest first.
    pub fn versions(&self) -> impl Iterator<Item = &ManifestEntry> {
        std::iter::once(&self.current).chain(&self.history)
    }

    /// The version `which` names, if the manifest still has it.
    #[must_use]
    pub fn select(&self, which: VersionSelector) -> Option<&ManifestEntry> {
        match which {
            VersionSelector::Current => Some(&self.current),
            VersionSelector::Seq(seq) => self.versions().find(|e| e.seq == seq),
            VersionSelector::At(t) => self
                .versions()
                .filter(|e| e.created_at <= t)
                .max_by_key(|e| (e.created_at, e.seq)),
        }
    }

    /// This manifest with only `keep` versions (current included), or `None` when it has no
    /// more than that already.
    #[must_use]
    pub fn trimmed(&self, keep: usize) -> Option<Self> {
        let history = keep.max(1) - 1;
        if self.history.len() <= history {
            return None;
        }
        let mut next = self.clone();
        next.history.truncate(history);
        next.updated_at = Utc::now();
        Some(next)
    }

    /// The manifest after making `old` (a version from the history) current again as `seq`
    /// (higher than the current one, so the manifest still only moves forward): the replaced
    /// current heads the history, `old` leaves it, and `keep` versions remain.
    #[must_use]
    pub fn rolled_back(&self, old: &ManifestEntry, seq: u64, keep: usize) -> Self {
        let now = Utc::now();
        let mut next = self.clone();
        next.history.retain(|e| e.seq != old.seq);
        next.history.insert(0, self.current.clone());
        next.history.truncate(keep.max(1) - 1);
        next.current = ManifestEntry {
            seq,
            created_at: now,
            rolled_back_from: Some(old.seq),
            ..old.clone()
        };
        next.updated_at = now;
        next
    }
}

/// Which version of an identity's layer to restore or roll back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionSelector {
    /// The manifest's current version.
    Current,
    /// The version with this seq (current or history).
    Seq(u64),
    /// The newest version created at or before this time (what was current then).
    At(DateTime<Utc>),
}

impl std::fmt::Display for VersionSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Current => f.write_str("current version"),
            Self::Seq(seq) => write!(f, "version with seq {seq}"),
            Self::At(t) => write!(
                f,
                "version created at or before {}",
                t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
            ),
        }
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
            rolled_back_from: None,
            chain: Vec::new(),
        }
    }

    #[test]
    fn a_delta_version_lists_its_chain_base_first_and_full_versions_stay_as_they_were() {
        let mut e = entry("d3", 3);
        assert_eq!(e.archives().collect::<Vec<_>>(), ["d3"]);
        let json = serde_json::to_string(&e).unwrap();
        assert!(
            !json.contains("chain"),
            "a full version's JSON is unchanged: {json}"
        );
        e.chain = ["b1", "d2"]
            .iter()
            .map(|d| ChainLink {
                digest: (*d).into(),
                compressed_size_bytes: 1,
                size_bytes: 2,
            })
            .collect();
        assert_eq!(e.archives().collect::<Vec<_>>(), ["b1", "d2", "d3"]);
        let back: ManifestEntry =
            serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn a_manifest_of_a_newer_format_is_refused_naming_it() {
        let mut m = LayerManifest::new(ContainerLayerId::new("s", "i"), entry("d1", 1));
        let key = "manifests/s/i.json";
        let ok = serde_json::to_vec(&m).unwrap();
        assert_eq!(super::super::manager::parse_manifest(key, &ok).unwrap(), m);
        m.version = MANIFEST_VERSION + 1;
        let newer = serde_json::to_vec(&m).unwrap();
        let err = super::super::manager::parse_manifest(key, &newer).unwrap_err();
        assert!(err.to_string().contains(key), "{err}");
        assert!(err.to_string().contains("upgrade"), "{err}");
    }

    #[test]
    fn keys_are_relative_and_identity_scoped() {
        let id = ContainerLayerId::new("a_b", "c");
        assert_eq!(manifest_key(&id), "manifests/a%5Fb_c.json");
        assert_eq!(blob_key("ab"), "ab.tar.zst");
        assert_eq!(meta_key("ab"), "ab.meta.json");
        let d = "0123456789abcdef".repeat(4);
        assert_eq!(layer_object_digest(&blob_key(&d)), Some(d.as_str()));
        assert_eq!(layer_object_digest(&meta_key(&d)), Some(d.as_str()));
        for other in [
            format!("x/{d}.tar.zst"),
            format!("{}.tar.zst", d.to_uppercase()),
            format!("{}.tar.zst", &d[1..]),
            format!("{d}.json"),
            manifest_key(&id),
        ] {
            assert_eq!(layer_object_digest(&other), None, "{other}");
        }
    }

    const KEEP: usize = 5;

    /// A manifest that went through seqs 1..=n (digests d1..dn), keeping `keep` versions.
    fn advanced(n: u64, keep: usize) -> LayerManifest {
        let mut m = LayerManifest::new(ContainerLayerId::new("s", "i"), entry("d1", 1));
        for i in 2..=n {
            match m.advance(entry(&format!("d{i}"), i), keep) {
                Advance::Moved(next) => m = *next,
                Advance::Stale { .. } => panic!("seq {i} should move"),
            }
        }
        m
    }

    #[test]
    fn advance_refuses_lower_seq_and_keeps_history_keep_versions() {
        let mut m = advanced(KEEP as u64 + 5, KEEP);
        assert_eq!(
            m.advance(entry("old", 0), KEEP),
            Advance::Stale {
                current_seq: KEEP as u64 + 5
            }
        );
        assert_eq!(m.versions().count(), KEEP);
        assert_eq!(m.current.digest, format!("d{}", KEEP + 5));
        assert_eq!(m.history[0].digest, format!("d{}", KEEP + 4));
        // Same digest again (a retry): moves seq but adds no history row.
        let Advance::Moved(again) = m.advance(entry(&m.current.digest, 100), KEEP) else {
            panic!("equal digest with higher seq should move");
        };
        assert_eq!(again.history, m.history);
        assert_eq!(again.current.seq, 100);
        // history_keep = 1: only the current version.
        m = advanced(4, 1);
        assert!(m.history.is_empty());
        assert_eq!(m.current.seq, 4);
    }

    #[test]
    fn a_manifest_with_too_much_history_is_trimmed_to_keep() {
        let m = advanced(12, 40);
        assert_eq!(m.history.len(), 11);
        let t = m.trimmed(3).unwrap();
        assert_eq!(t.current, m.current);
        assert_eq!(t.history, m.history[..2]);
        assert_eq!(t.trimmed(3), None);
        assert_eq!(m.trimmed(12), None);
    }

    #[test]
    fn versions_are_selected_by_seq_or_time() {
        let base = Utc::now() - chrono::Duration::hours(10);
        let mut m = LayerManifest::new(ContainerLayerId::new("s", "i"), entry("d1", 1));
        m.current.created_at = base;
        for i in 2..=4u64 {
            let mut e = entry(&format!("d{i}"), i);
            e.created_at = base + chrono::Duration::hours(i64::try_from(i).unwrap());
            let Advance::Moved(next) = m.advance(e, KEEP) else {
                panic!("seq {i} should move")
            };
            m = *next;
        }
        let digest = |s: VersionSelector| m.select(s).map(|e| e.digest.clone());
        assert_eq!(digest(VersionSelector::Current).unwrap(), "d4");
        assert_eq!(digest(VersionSelector::Seq(2)).unwrap(), "d2");
        assert_eq!(digest(VersionSelector::Seq(4)).unwrap(), "d4");
        assert_eq!(digest(VersionSelector::Seq(9)), None);
        let at = |h: i64, m: i64| {
            VersionSelector::At(base + chrono::Duration::hours(h) + chrono::Duration::minutes(m))
        };
        assert_eq!(digest(at(2, 30)).unwrap(), "d2");
        assert_eq!(
            digest(at(3, 0)).unwrap(),
            "d3",
            "at exactly the creation time"
        );
        assert_eq!(digest(at(99, 0)).unwrap(), "d4");
        assert_eq!(digest(at(0, -1)), None, "before the first version");
        assert!(VersionSelector::Seq(9).to_string().contains("seq 9"));
    }

    #[test]
    fn rollback_makes_an_old_version_current_with_a_higher_seq() {
        let m = advanced(5, KEEP);
        let old = m.select(VersionSelector::Seq(2)).unwrap().clone();
        let r = m.rolled_back(&old, 6, KEEP);
        assert_eq!(r.current.digest, "d2");
        assert_eq!(r.current.seq, 6);
        assert_eq!(r.current.rolled_back_from, Some(2));
        assert!(r.current.created_at >= m.current.created_at);
        let seqs: Vec<u64> = r.history.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            [5, 4, 3, 1],
            "replaced current first, the old entry moved out"
        );
        // --at a time after the rollback finds the rolled-back content.
        assert_eq!(
            r.select(VersionSelector::At(Utc::now())).unwrap().digest,
            "d2"
        );
        // Bounded like any advance.
        assert_eq!(m.rolled_back(&old, 6, 2).history.len(), 1);
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
