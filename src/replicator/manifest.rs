//! What a replicated database has in the store, so that steady state never LISTs.
//!
//! Under `{prefix}sqlite/{name}/` (the store's prefix ends there):
//! - `metadata.json`: this manifest, replaced with a conditional PUT on each sync that shipped
//!   something (never when idle);
//! - `snapshots/{generation}/{txid:016x}.db.zst`: the database after transaction `txid`;
//! - `snapshots/{generation}/{txid:016x}.delta.zst`: a generation's base given as the pages that
//!   differ from another generation's state (its [`Parent`]), in the segment format;
//! - `wal/{generation}/{first:016x}-{last:016x}.seg.zst`: transactions `first..=last`;
//! - `wal/{generation}/index-{first:016x}.json`: a full [`IndexChunk`] of segment entries, moved
//!   out of the manifest so that it stays small however long a generation runs.
//!
//! A generation is one unbroken history: every transaction follows the previous one on the same
//! database. Anything that breaks continuity (the WAL restarted unseen, the file replaced, a
//! restore to an older point) starts a new generation from a snapshot, so a restore never mixes
//! histories.

use serde::{Deserialize, Serialize};

/// Format of `metadata.json` written by this version.
pub const FORMAT: u32 = 1;

/// Segment entries kept in the manifest before they move into an index chunk.
pub const CHUNK_ENTRIES: usize = 256;

pub const MANIFEST_KEY: &str = "metadata.json";

/// The manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// The database's name (the folder in the store).
    pub name: String,
    /// Page size of the newest generation (each generation records its own).
    pub page_size: u32,
    /// Oldest first; the last one is where the replicator appends.
    pub generations: Vec<Generation>,
}

/// One unbroken history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Generation {
    /// 32 hex digits (the segments' lineage).
    pub id: String,
    pub created_unix_ms: i64,
    /// Page size of the database in this generation (a replaced file may differ).
    pub page_size: u32,
    /// Why it started (new database, discontinuity, restore, …), for operators.
    pub reason: String,
    /// Oldest first; the first one is the generation's base.
    pub snapshots: Vec<Snapshot>,
    /// Full chunks of segment entries, oldest first.
    pub chunks: Vec<ChunkRef>,
    /// Segment entries after the last chunk, oldest first.
    pub segments: Vec<SegmentEntry>,
}

/// A snapshot object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// The database as of the end of this transaction (0: before the generation's first).
    pub txid: u64,
    /// When that transaction committed (unix ns; the snapshot's time for txid 0).
    pub committed_unix_ns: i64,
    pub db_pages: u32,
    /// Compressed size and SHA-256 of the object, checked on restore.
    pub size: u64,
    pub sha256: String,
    /// Set for a delta: the object holds only the pages that differ from this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Parent>,
}

/// The state a delta snapshot applies to: `generation` after `txid`, restored from its full
/// snapshot at `snapshot` (the one the delta was computed against).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Parent {
    pub generation: String,
    pub txid: u64,
    pub snapshot: u64,
}

impl Snapshot {
    /// The object's key in `generation`.
    #[must_use]
    pub fn key(&self, generation: &str) -> String {
        if self.parent.is_some() {
            delta_key(generation, self.txid)
        } else {
            snapshot_key(generation, self.txid)
        }
    }
}

/// A segment object (its key follows from the generation and the range).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentEntry {
    pub first: u64,
    pub last: u64,
    /// Commit time of `last` (unix ns), to find a point in time without reading segments.
    pub last_unix_ns: i64,
    pub size: u64,
}

/// An index chunk in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    pub first: u64,
    pub last: u64,
    pub last_unix_ns: i64,
}

/// Segment entries moved out of the manifest (immutable once written).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexChunk {
    pub segments: Vec<SegmentEntry>,
}

/// Failures reading a manifest; each names the object.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{key} is not a valid manifest: {reason}")]
    Invalid { key: String, reason: String },
    #[error("{key} has format {found}; this version reads format {FORMAT}")]
    Format { key: String, found: u32 },
}

impl Manifest {
    #[must_use]
    pub fn new(name: &str, page_size: u32) -> Self {
        Self {
            format: FORMAT,
            name: name.to_string(),
            page_size,
            generations: Vec::new(),
        }
    }

    /// Parses and checks `bytes` read from `key`.
    pub fn parse(bytes: &[u8], key: &str) -> Result<Self, ManifestError> {
        let invalid = |reason: String| ManifestError::Invalid {
            key: key.to_string(),
            reason,
        };
        #[derive(Deserialize)]
        struct Probe {
            format: u32,
        }
        let probe: Probe = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        if probe.format != FORMAT {
            return Err(ManifestError::Format {
                key: key.to_string(),
                found: probe.format,
            });
        }
        let m: Self = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        m.check().map_err(invalid)?;
        Ok(m)
    }

    /// Serialized form.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a manifest serializes")
    }

    /// The generation being appended to.
    #[must_use]
    pub fn current(&self) -> Option<&Generation> {
        self.generations.last()
    }

    #[must_use]
    pub fn generation(&self, id: &str) -> Option<&Generation> {
        self.generations.iter().find(|g| g.id == id)
    }

    pub fn generation_mut(&mut self, id: &str) -> Option<&mut Generation> {
        self.generations.iter_mut().find(|g| g.id == id)
    }

    /// Drops what no restore of a point at or after `keep_from` (unix ns) needs: generations a
    /// later generation's base already covers that time for, and in each generation the
    /// snapshots before the last one taken at or before it, with the ranges before that
    /// snapshot. Returns what the store may delete once this manifest is written (the objects
    /// of dropped index chunks are found by reading them).
    pub fn prune(&mut self, keep_from: i64) -> Pruned {
        let mut pruned = Pruned::default();
        // Per generation, the snapshot restores of points at or after `keep_from` start from.
        let mut start: Vec<Option<usize>> = self
            .generations
            .iter()
            .map(|g| {
                g.snapshots
                    .iter()
                    .rposition(|s| s.committed_unix_ns <= keep_from)
            })
            .collect();
        // A generation is needed while no later one has a full snapshot at or before
        // `keep_from` (a delta base needs its parent's history).
        let mut first_kept = self
            .generations
            .iter()
            .rposition(|g| {
                g.snapshots
                    .iter()
                    .any(|s| s.parent.is_none() && s.committed_unix_ns <= keep_from)
            })
            .unwrap_or(0);
        // A kept delta keeps what restores its parent: that generation, from the snapshot the
        // delta was computed against.
        let mut i = self.generations.len();
        while i > first_kept {
            i -= 1;
            let from = start[i].unwrap_or(0);
            for p in self.generations[i].snapshots[from..]
                .iter()
                .filter_map(|s| s.parent.as_ref())
            {
                let Some(j) = self.generations.iter().position(|g| g.id == p.generation) else {
                    continue;
                };
                first_kept = first_kept.min(j);
                let parent = &self.generations[j];
                if let (Some(k), Some(s)) = (
                    parent.snapshots.iter().position(|s| s.txid == p.snapshot),
                    start[j],
                ) {
                    start[j] = Some(s.min(k));
                }
            }
        }
        for g in self.generations.drain(..first_kept) {
            pruned.add_generation(&g);
        }
        for (g, start) in self.generations.iter_mut().zip(&start[first_kept..]) {
            let Some(start) = *start else {
                continue;
            };
            let base = g.snapshots[start].txid;
            for old in g.snapshots.drain(..start) {
                pruned.keys.push(old.key(&g.id));
            }
            // Whole ranges before the new base go; one that straddles it stays.
            let chunks = g.chunks.iter().take_while(|c| c.last <= base).count();
            for c in g.chunks.drain(..chunks) {
                pruned.chunks.push((g.id.clone(), c));
            }
            if g.chunks.is_empty() {
                let segments = g.segments.iter().take_while(|e| e.last <= base).count();
                for e in g.segments.drain(..segments) {
                    pruned.keys.push(segment_key(&g.id, e.first, e.last));
                }
            }
        }
        pruned
    }

    /// Ranges must follow each other within a generation; the first covers the transaction
    /// right after its base (it may start earlier, once older history was pruned).
    fn check(&self) -> Result<(), String> {
        for g in &self.generations {
            if !is_generation_id(&g.id) {
                return Err(format!("generation id {:?}", g.id));
            }
            let Some(base) = g.snapshots.first() else {
                return Err(format!("generation {} has no snapshot", g.id));
            };
            let mut next = base.txid + 1;
            // Point-in-time restores rely on commit times that never go back.
            let mut time = base.committed_unix_ns;
            let first = g
                .chunks
                .first()
                .map(|c| (c.first, c.last))
                .or_else(|| g.segments.first().map(|e| (e.first, e.last)));
            if let Some((first, last)) = first
                && first <= next
                && last >= next
            {
                next = first;
            }
            for c in &g.chunks {
                if c.first != next || c.last < c.first || c.last_unix_ns < time {
                    return Err(format!(
                        "generation {}: chunk {}..={}",
                        g.id, c.first, c.last
                    ));
                }
                next = c.last + 1;
                time = c.last_unix_ns;
            }
            for s in &g.segments {
                if s.first != next || s.last < s.first || s.last_unix_ns < time {
                    return Err(format!(
                        "generation {}: segment {}..={}",
                        g.id, s.first, s.last
                    ));
                }
                next = s.last + 1;
                time = s.last_unix_ns;
            }
        }
        Ok(())
    }
}

/// What [`Manifest::prune`] dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Objects no longer referenced.
    pub keys: Vec<String>,
    /// Dropped index chunks (generation, chunk): their segments and the chunk object go too.
    pub chunks: Vec<(String, ChunkRef)>,
}

impl Pruned {
    fn add_generation(&mut self, g: &Generation) {
        for s in &g.snapshots {
            self.keys.push(s.key(&g.id));
        }
        for c in &g.chunks {
            self.chunks.push((g.id.clone(), *c));
        }
        for e in &g.segments {
            self.keys.push(segment_key(&g.id, e.first, e.last));
        }
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.chunks.is_empty()
    }
}

impl Generation {
    /// The last transaction stored for this generation.
    #[must_use]
    pub fn last_txid(&self) -> u64 {
        self.segments
            .last()
            .map(|s| s.last)
            .or_else(|| self.chunks.last().map(|c| c.last))
            .unwrap_or_else(|| self.snapshots.first().map_or(0, |s| s.txid))
    }

    /// Commit time of the last transaction stored.
    #[must_use]
    pub fn last_unix_ns(&self) -> i64 {
        self.segments
            .last()
            .map(|s| s.last_unix_ns)
            .or_else(|| self.chunks.last().map(|c| c.last_unix_ns))
            .unwrap_or_else(|| self.snapshots.first().map_or(0, |s| s.committed_unix_ns))
    }

    /// Appends a segment; when the manifest's entries fill a chunk, returns the chunk to store
    /// (under [`chunk_key`]) before the manifest that references it.
    pub fn push_segment(&mut self, entry: SegmentEntry) -> Option<(ChunkRef, IndexChunk)> {
        self.segments.push(entry);
        if self.segments.len() < CHUNK_ENTRIES {
            return None;
        }
        let segments = std::mem::take(&mut self.segments);
        let chunk = ChunkRef {
            first: segments[0].first,
            last: entry.last,
            last_unix_ns: entry.last_unix_ns,
        };
        self.chunks.push(chunk);
        Some((chunk, IndexChunk { segments }))
    }
}

/// A fresh generation id.
#[must_use]
pub fn new_generation_id() -> String {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        filled +=
            rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty())
                .expect("the kernel's random source");
    }
    hex::encode(bytes)
}

/// The segments' lineage bytes of generation `id`.
#[must_use]
pub fn lineage(id: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    hex::decode_to_slice(id, &mut out).expect("a checked generation id");
    out
}

#[must_use]
pub fn is_generation_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[must_use]
pub fn snapshot_key(generation: &str, txid: u64) -> String {
    format!("snapshots/{generation}/{txid:016x}.db.zst")
}

#[must_use]
pub fn delta_key(generation: &str, txid: u64) -> String {
    format!("snapshots/{generation}/{txid:016x}.delta.zst")
}

#[must_use]
pub fn segment_key(generation: &str, first: u64, last: u64) -> String {
    format!("wal/{generation}/{first:016x}-{last:016x}.seg.zst")
}

#[must_use]
pub fn chunk_key(generation: &str, first: u64) -> String {
    format!("wal/{generation}/index-{first:016x}.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation(base: u64) -> Generation {
        Generation {
            id: new_generation_id(),
            created_unix_ms: 1,
            page_size: 4096,
            reason: "test".into(),
            snapshots: vec![Snapshot {
                txid: base,
                committed_unix_ns: 5,
                db_pages: 2,
                size: 10,
                sha256: "00".repeat(32),
                parent: None,
            }],
            chunks: Vec::new(),
            segments: Vec::new(),
        }
    }

    #[test]
    fn entries_move_into_chunks_and_the_manifest_round_trips() {
        let mut m = Manifest::new("app", 4096);
        m.generations.push(generation(7));
        let g = m.generations.last_mut().unwrap();
        let mut chunks = Vec::new();
        for i in 0..(CHUNK_ENTRIES as u64 * 2 + 3) {
            let first = 8 + i * 2;
            let entry = SegmentEntry {
                first,
                last: first + 1,
                last_unix_ns: i64::try_from(i).unwrap(),
                size: 1,
            };
            chunks.extend(g.push_segment(entry));
        }
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].1.segments.len(), CHUNK_ENTRIES);
        assert_eq!(chunks[1].0.first, chunks[0].0.last + 1);
        assert_eq!(g.segments.len(), 3);
        assert_eq!(g.last_txid(), 8 + (CHUNK_ENTRIES as u64 * 2 + 2) * 2 + 1);
        let parsed = Manifest::parse(&m.to_bytes(), MANIFEST_KEY).unwrap();
        assert_eq!(parsed, m);
    }

    fn snapshot(txid: u64, at: i64) -> Snapshot {
        Snapshot {
            txid,
            committed_unix_ns: at,
            db_pages: 2,
            size: 10,
            sha256: "00".repeat(32),
            parent: None,
        }
    }

    fn entry(first: u64, last: u64) -> SegmentEntry {
        SegmentEntry {
            first,
            last,
            last_unix_ns: i64::try_from(last).unwrap() * 10,
            size: 1,
        }
    }

    /// A delta base needs its parent's state: while it is kept, so is the parent from the
    /// snapshot it was computed against (here not the parent's latest one before the window),
    /// with the segments after it; once the delta generation has a full snapshot old enough, the
    /// parent and the delta go.
    #[test]
    fn a_kept_delta_base_keeps_what_restores_its_parent() {
        let mut m = Manifest::new("app", 4096);
        let mut a = generation(0);
        a.snapshots = vec![snapshot(0, 0), snapshot(30, 300), snapshot(60, 600)];
        for first in (1..=90).step_by(10) {
            a.push_segment(entry(first, first + 9));
        }
        let mut b = generation(0);
        b.snapshots = vec![Snapshot {
            parent: Some(Parent {
                generation: a.id.clone(),
                txid: 90,
                snapshot: 30,
            }),
            ..snapshot(0, 1000)
        }];
        b.push_segment(SegmentEntry {
            last_unix_ns: 1100,
            ..entry(1, 10)
        });
        m.generations = vec![a.clone(), b.clone()];
        Manifest::parse(&m.to_bytes(), MANIFEST_KEY).unwrap();

        let mut p = m.clone();
        let pruned = p.prune(1050);
        assert_eq!(p.generations.len(), 2);
        assert_eq!(
            p.generations[0].snapshots,
            vec![snapshot(30, 300), snapshot(60, 600)]
        );
        assert_eq!(p.generations[0].segments.first().unwrap().first, 31);
        assert_eq!(p.generations[1], b);
        assert!(pruned.keys.contains(&snapshot_key(&a.id, 0)));
        assert!(!pruned.keys.contains(&snapshot_key(&a.id, 30)));
        Manifest::parse(&p.to_bytes(), MANIFEST_KEY).unwrap();

        // B's full snapshot at 10 (time 1100) covers the window: A and the delta go.
        m.generations[1].snapshots.push(snapshot(10, 1100));
        let pruned = m.prune(1200);
        assert_eq!(m.generations.len(), 1);
        assert_eq!(m.generations[0].snapshots, vec![snapshot(10, 1100)]);
        assert!(pruned.keys.contains(&delta_key(&b.id, 0)));
        assert!(pruned.keys.contains(&snapshot_key(&a.id, 30)));
    }

    /// Times are txid × 10. Generation A: base 0, snapshot at 50; B (a break): base at 1000.
    #[test]
    fn pruning_keeps_exactly_what_restores_within_the_window_need() {
        let mut m = Manifest::new("app", 4096);
        let mut a = generation(0);
        a.snapshots = vec![snapshot(0, 0), snapshot(50, 500)];
        for first in (1..=90).step_by(10) {
            a.push_segment(entry(first, first + 9));
        }
        let mut b = generation(0);
        b.snapshots = vec![snapshot(0, 1000), snapshot(20, 1200)];
        for first in (1..=30).step_by(10) {
            b.push_segment(SegmentEntry {
                last_unix_ns: 1000 + i64::try_from(first + 9).unwrap() * 10,
                ..entry(first, first + 9)
            });
        }
        m.generations = vec![a.clone(), b.clone()];
        Manifest::parse(&m.to_bytes(), MANIFEST_KEY).unwrap();

        // Everything from time 600 on: A's snapshot at 50 (time 500) is the start; A's base and
        // the segments before 50 go; B is untouched (its first snapshot came later).
        let mut p = m.clone();
        let pruned = p.prune(600);
        assert_eq!(p.generations[0].snapshots, vec![snapshot(50, 500)]);
        assert_eq!(p.generations[0].segments.first().unwrap().first, 51);
        assert!(pruned.keys.contains(&snapshot_key(&a.id, 0)));
        assert!(pruned.keys.contains(&segment_key(&a.id, 41, 50)));
        assert!(!pruned.keys.contains(&segment_key(&a.id, 51, 60)));
        assert_eq!(p.generations[1], b);
        Manifest::parse(&p.to_bytes(), MANIFEST_KEY).unwrap();

        // From time 1100: B's base (1000) covers it, so A goes entirely.
        let mut p = m.clone();
        let pruned = p.prune(1100);
        assert_eq!(p.generations.len(), 1);
        assert_eq!(p.generations[0].id, b.id);
        assert!(pruned.keys.contains(&snapshot_key(&a.id, 50)));
        assert!(pruned.keys.contains(&segment_key(&a.id, 81, 90)));

        // A snapshot inside a segment: the straddling segment stays, and the manifest is valid.
        let mut c = generation(0);
        c.snapshots = vec![snapshot(0, 0), snapshot(15, 150)];
        c.push_segment(entry(1, 10));
        c.push_segment(entry(11, 20));
        c.push_segment(entry(21, 30));
        let mut m = Manifest::new("app", 4096);
        m.generations = vec![c.clone()];
        let pruned = m.prune(160);
        assert_eq!(m.generations[0].segments.first().unwrap().first, 11);
        assert_eq!(pruned.keys.len(), 2, "{pruned:?}");
        Manifest::parse(&m.to_bytes(), MANIFEST_KEY).unwrap();

        // Nothing older than the window: nothing pruned.
        let mut m = Manifest::new("app", 4096);
        m.generations = vec![c];
        assert!(m.prune(-1).is_empty());
    }

    #[test]
    fn gaps_unknown_formats_and_bad_ids_are_refused_naming_the_object() {
        let mut m = Manifest::new("app", 4096);
        m.generations.push(generation(0));
        let g = m.generations.last_mut().unwrap();
        g.push_segment(SegmentEntry {
            first: 2,
            last: 3,
            last_unix_ns: 0,
            size: 1,
        });
        let err = Manifest::parse(&m.to_bytes(), "sqlite/app/metadata.json").unwrap_err();
        assert!(
            err.to_string().contains("sqlite/app/metadata.json"),
            "{err}"
        );
        assert!(err.to_string().contains("segment 2..=3"), "{err}");

        let mut m = Manifest::new("app", 4096);
        m.format = 9;
        let err = Manifest::parse(&m.to_bytes(), MANIFEST_KEY).unwrap_err();
        assert!(
            matches!(err, ManifestError::Format { found: 9, .. }),
            "{err}"
        );

        let mut m = Manifest::new("app", 4096);
        m.generations.push(generation(0));
        m.generations[0].id = "../../x".into();
        assert!(Manifest::parse(&m.to_bytes(), MANIFEST_KEY).is_err());
    }
}
