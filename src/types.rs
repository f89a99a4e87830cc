//! Identity, snapshot, sync-state and upload-journal types shared by [`crate::store`] and
//! [`crate::layer`]. A leaf module: it depends on std, serde and
//! chrono only, so no folder has to reach into another for them. Re-exported as
//! [`crate::layer::types`] (the original path) and at the crate root.

use std::collections::HashMap;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Identifies a container's persistent layer state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerLayerId {
    /// Service/deployment name.
    pub service: String,
    /// Unique container instance ID.
    pub instance_id: String,
}

impl ContainerLayerId {
    pub fn new(service: impl Into<String>, instance_id: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            instance_id: instance_id.into(),
        }
    }

    /// Parses `SERVICE/INSTANCE` (the instance may itself contain `/`).
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        let (service, instance) = s.split_once('/')?;
        if service.is_empty() || instance.is_empty() {
            return None;
        }
        Some(Self::new(service, instance))
    }

    /// A key safe for file names and S3 keys, injective over (service, instance).
    ///
    /// Each part is percent-encoded (everything outside `[A-Za-z0-9.-]`, so `_` too), then joined
    /// with `_`: `("a_b","c")` → `a%5Fb_c` and `("a","b_c")` → `a_b%5Fc` can never collide.
    #[must_use]
    pub fn to_key(&self) -> String {
        format!(
            "{}_{}",
            encode_part(&self.service),
            encode_part(&self.instance_id)
        )
    }
}

fn encode_part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    // A lone "." or ".." would be a special path component.
    if out == "." || out == ".." {
        return out.replace('.', "%2E");
    }
    out
}

impl std::fmt::Display for ContainerLayerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.service, self.instance_id)
    }
}

/// Metadata for a persisted layer snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSnapshot {
    /// SHA256 digest (hex) of the compressed tarball: the content address.
    pub digest: String,
    /// Size in bytes (uncompressed tar).
    pub size_bytes: u64,
    /// Size in bytes (compressed with zstd).
    pub compressed_size_bytes: u64,
    /// When the snapshot was created.
    pub created_at: DateTime<Utc>,
    /// Number of entries in the layer.
    pub file_count: u64,
    /// SHA256 (hex) of the uncompressed tar.
    #[serde(default)]
    pub uncompressed_digest: String,
    /// True when the layer was found unchanged and nothing was uploaded.
    #[serde(default)]
    pub unchanged: bool,
}

/// Tracks sync state between local and S3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    /// Container this state belongs to.
    pub container_id: ContainerLayerId,
    /// Current local layer digest (None if never packed).
    pub local_digest: Option<String>,
    /// Last successfully uploaded digest.
    pub remote_digest: Option<String>,
    /// Timestamp of last successful sync.
    pub last_sync: Option<DateTime<Utc>>,
    /// In-progress upload state (for crash recovery).
    pub pending_upload: Option<PendingUpload>,
}

impl SyncState {
    #[must_use]
    pub fn new(container_id: ContainerLayerId) -> Self {
        Self {
            container_id,
            local_digest: None,
            remote_digest: None,
            last_sync: None,
            pending_upload: None,
        }
    }

    #[must_use]
    pub fn needs_upload(&self) -> bool {
        match (&self.local_digest, &self.remote_digest) {
            (Some(local), Some(remote)) => local != remote,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

/// State for resumable multipart uploads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingUpload {
    /// S3 multipart upload ID.
    pub upload_id: String,
    /// S3 object key.
    pub object_key: String,
    /// Total parts expected.
    pub total_parts: u32,
    /// Parts successfully uploaded (`part_number` -> part record).
    pub completed_parts: HashMap<u32, CompletedPart>,
    /// Part size in bytes.
    pub part_size: u64,
    /// Local file path of tarball being uploaded.
    pub local_tarball_path: PathBuf,
    /// Started at timestamp.
    pub started_at: DateTime<Utc>,
    /// Digest of the layer being uploaded.
    pub digest: String,
    /// Total object size in bytes.
    #[serde(default)]
    pub total_size: u64,
}

impl PendingUpload {
    #[must_use]
    pub fn missing_parts(&self) -> Vec<u32> {
        (1..=self.total_parts)
            .filter(|p| !self.completed_parts.contains_key(p))
            .collect()
    }

    #[must_use]
    pub fn is_complete(&self) -> bool {
        (1..=self.total_parts).all(|p| self.completed_parts.contains_key(&p))
    }
}

/// One uploaded part, with what is needed to verify it against ListParts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletedPart {
    pub part_number: u32,
    pub e_tag: String,
    /// Base64 CRC32C of the part as sent.
    #[serde(default)]
    pub checksum_crc32c: String,
    /// Part size in bytes.
    #[serde(default)]
    pub size: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unambiguous() {
        let a = ContainerLayerId::new("a_b", "c").to_key();
        let b = ContainerLayerId::new("a", "b_c").to_key();
        assert_ne!(a, b);
        assert_eq!(ContainerLayerId::new("web", "0").to_key(), "web_0");
        assert_eq!(ContainerLayerId::new("ns", "x/y").to_key(), "ns_x%2Fy");
        assert_eq!(ContainerLayerId::new("..", "1").to_key(), "%2E%2E_1");
    }

    #[test]
    fn parse_splits_on_first_slash() {
        let id = ContainerLayerId::parse("web/0/extra").unwrap();
        assert_eq!(id.service, "web");
        assert_eq!(id.instance_id, "0/extra");
        assert!(ContainerLayerId::parse("noslash").is_none());
        assert!(ContainerLayerId::parse("/x").is_none());
    }

    #[test]
    fn missing_parts_and_completion() {
        let mut p = PendingUpload {
            upload_id: "u".into(),
            object_key: "k".into(),
            total_parts: 3,
            completed_parts: HashMap::new(),
            part_size: 5,
            local_tarball_path: "/x".into(),
            started_at: Utc::now(),
            digest: "d".into(),
            total_size: 15,
        };
        p.completed_parts.insert(
            2,
            CompletedPart {
                part_number: 2,
                e_tag: "e".into(),
                checksum_crc32c: String::new(),
                size: 5,
            },
        );
        assert_eq!(p.missing_parts(), vec![1, 3]);
        assert!(!p.is_complete());
    }
}
