use super::*;
use crate::replicator::cache::NewGeneration;

fn full(txid: u64) -> Snapshot {
    Snapshot {
        txid,
        committed_unix_ns: 1,
        db_pages: 2,
        size: 10,
        sha256: "00".repeat(32),
        parent: None,
    }
}

/// A manifest with one generation: a full base at 0, a full snapshot at 10, segments to 20.
fn stored() -> (Manifest, String) {
    let id = manifest::new_generation_id();
    let mut g = Generation {
        id: id.clone(),
        created_unix_ms: 1,
        page_size: 4096,
        reason: "test".into(),
        snapshots: vec![full(0), full(10)],
        chunks: Vec::new(),
        segments: Vec::new(),
    };
    for first in [1, 11] {
        g.push_segment(SegmentEntry {
            first,
            last: first + 9,
            last_unix_ns: 2,
            size: 1,
        });
    }
    let mut m = Manifest::new("app", 4096);
    m.generations.push(g);
    (m, id)
}

fn delta_item(parent: Parent) -> Item {
    Item {
        number: 7,
        generation: manifest::new_generation_id(),
        kind: ItemKind::Snapshot {
            txid: 0,
            committed_unix_ns: 3,
            db_pages: 2,
            new_generation: Some(NewGeneration {
                reason: "break".into(),
                page_size: 4096,
                created_unix_ms: 3,
            }),
            parent: Some(parent),
        },
        size: 5,
        sha256: "11".repeat(32),
    }
}

/// A delta base is appended only when the store can build its parent's state: that generation,
/// from that full snapshot, up to that transaction. Otherwise the history diverged (the engine
/// then starts over from a full snapshot).
#[test]
fn a_delta_base_goes_in_only_when_its_parent_state_is_restorable() {
    let (m, id) = stored();
    let parent = |generation: &str, txid, snapshot| Parent {
        generation: generation.to_string(),
        txid,
        snapshot,
    };
    for ok in [parent(&id, 20, 10), parent(&id, 15, 0), parent(&id, 10, 10)] {
        let item = delta_item(ok.clone());
        assert!(matches!(placement(&m, &item), Placement::Append), "{ok:?}");
        let mut edited = m.clone();
        apply(&mut edited, &item);
        let base = &edited.generations[1].snapshots[0];
        assert_eq!(base.parent, Some(ok));
        assert_eq!(base.key(&item.generation), item_key(&item));
        assert!(item_key(&item).ends_with(".delta.zst"));
    }
    let other = manifest::new_generation_id();
    for bad in [
        parent(&other, 20, 10),
        parent(&id, 21, 10),
        parent(&id, 20, 5),
        parent(&id, 5, 10),
    ] {
        assert!(
            matches!(
                placement(&m, &delta_item(bad.clone())),
                Placement::Diverged(_)
            ),
            "{bad:?}"
        );
    }
}
