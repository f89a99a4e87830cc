//! Where an outbox item goes in the store's manifest, and the manifest edit that records it.

use crate::replicator::cache::{Item, ItemKind};
use crate::replicator::manifest::{self, Generation, Manifest, Parent, SegmentEntry, Snapshot};

pub(super) enum Placement {
    AlreadyThere,
    Append,
    Diverged(String),
}

/// Where `item` goes in `m`.
pub(super) fn placement(m: &Manifest, item: &Item) -> Placement {
    let g = m.generation(&item.generation);
    match (&item.kind, g) {
        (
            ItemKind::Snapshot {
                new_generation: Some(_),
                ..
            },
            Some(_),
        ) => Placement::AlreadyThere,
        (
            ItemKind::Snapshot {
                new_generation: Some(_),
                parent,
                ..
            },
            None,
        ) => match parent {
            Some(p) if !restorable(m, p) => Placement::Diverged(format!(
                "the delta base's parent, generation {} after transaction {} from its snapshot \
                 at {}, is not in the store's manifest",
                p.generation, p.txid, p.snapshot
            )),
            _ => Placement::Append,
        },
        (_, None) => Placement::Diverged(format!(
            "generation {} is not in the store's manifest",
            item.generation
        )),
        (ItemKind::Snapshot { txid, .. }, Some(g)) => {
            if g.snapshots.iter().any(|s| s.txid == *txid) {
                Placement::AlreadyThere
            } else if *txid <= g.last_txid() {
                Placement::Append
            } else {
                Placement::Diverged(format!(
                    "snapshot after transaction {txid} but the store ends at {}",
                    g.last_txid()
                ))
            }
        }
        (ItemKind::Segment { first, last, .. }, Some(g)) => {
            let end = g.last_txid();
            if *last <= end {
                Placement::AlreadyThere
            } else if *first == end + 1 {
                Placement::Append
            } else {
                Placement::Diverged(format!(
                    "segment {first}..={last} does not follow the store's transaction {end}"
                ))
            }
        }
    }
}

/// Whether `m` can restore a delta's parent: its generation, from that full snapshot, up to its
/// transaction.
fn restorable(m: &Manifest, p: &Parent) -> bool {
    m.generation(&p.generation).is_some_and(|g| {
        g.snapshots
            .iter()
            .any(|s| s.txid == p.snapshot && s.parent.is_none())
            && p.snapshot <= p.txid
            && (p.snapshot == p.txid || g.last_txid() >= p.txid)
    })
}

/// Adds `item` to `m`; returns an index chunk to store first, if one filled.
pub(super) fn apply(m: &mut Manifest, item: &Item) -> Option<(String, Vec<u8>)> {
    match &item.kind {
        ItemKind::Snapshot {
            txid,
            committed_unix_ns,
            db_pages,
            new_generation,
            parent,
        } => {
            let snap = Snapshot {
                txid: *txid,
                committed_unix_ns: *committed_unix_ns,
                db_pages: *db_pages,
                size: item.size,
                sha256: item.sha256.clone(),
                parent: parent.clone(),
            };
            if let Some(new) = new_generation {
                m.page_size = new.page_size;
                m.generations.push(Generation {
                    id: item.generation.clone(),
                    created_unix_ms: new.created_unix_ms,
                    page_size: new.page_size,
                    reason: new.reason.clone(),
                    snapshots: vec![snap],
                    chunks: Vec::new(),
                    segments: Vec::new(),
                });
            } else if let Some(g) = m.generation_mut(&item.generation) {
                g.snapshots.push(snap);
                g.snapshots.sort_by_key(|s| s.txid);
            }
            None
        }
        ItemKind::Segment {
            first,
            last,
            last_unix_ns,
            ..
        } => {
            let g = m.generation_mut(&item.generation)?;
            let entry = SegmentEntry {
                first: *first,
                last: *last,
                last_unix_ns: *last_unix_ns,
                size: item.size,
            };
            g.push_segment(entry).map(|(chunk, index)| {
                (
                    manifest::chunk_key(&g.id, chunk.first),
                    serde_json::to_vec(&index).expect("index serializes"),
                )
            })
        }
    }
}

/// The store key of an item's object.
#[must_use]
pub fn item_key(item: &Item) -> String {
    match item.kind {
        ItemKind::Snapshot {
            txid, ref parent, ..
        } => {
            if parent.is_some() {
                manifest::delta_key(&item.generation, txid)
            } else {
                manifest::snapshot_key(&item.generation, txid)
            }
        }
        ItemKind::Segment { first, last, .. } => {
            manifest::segment_key(&item.generation, first, last)
        }
    }
}

#[cfg(test)]
#[path = "placement_tests.rs"]
mod tests;
