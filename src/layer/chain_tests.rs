//! Restores through a delta chain: the base streams while the deltas download beside it, and
//! a bad archive anywhere in the chain fails the restore closed, naming that archive.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::manifest::blob_key;
use super::testenv::SharedStore as Env;
use super::tests::{assert_no_spools, describe_tree, id, make_tree, random_bytes};
use super::*;
use crate::store::PutCondition;
use crate::util::error_chain;

/// Syncs `upper` on a node keeping chains of `deltas` deltas: one full layer, then `deltas`
/// small changes, so the current version is a delta on a chain of `deltas` archives.
async fn chained(env: &Env, upper: &Path, deltas: usize) -> ManifestEntry {
    let mut cfg = env.config("a");
    cfg.delta_chain_max = deltas;
    let a = LayerSyncManager::with_store(cfg, Arc::clone(&env.store))
        .await
        .unwrap();
    make_tree(upper, "a");
    std::fs::write(upper.join("big.bin"), random_bytes(4 << 20)).unwrap();
    // Past the racy margin: the first capture's index can trust what was written before it.
    tokio::time::sleep(Duration::from_millis(250)).await;
    a.sync_layer(&id("0"), upper).await.unwrap();
    for round in 1..=deltas {
        std::fs::write(upper.join("etc/app/config"), format!("round {round}\n")).unwrap();
        a.sync_layer(&id("0"), upper).await.unwrap();
    }
    let current = a.manifest(&id("0")).await.unwrap().unwrap().current;
    assert_eq!(current.chain.len(), deltas, "{current:?}");
    current
}

/// Flips a byte in the middle of `key`'s blob; returns the intact bytes.
async fn corrupt(env: &Env, key: &str) -> Vec<u8> {
    let intact = env.store.get_bytes(key).await.unwrap().unwrap();
    let mut bad = intact.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    env.store
        .put_bytes(key, bad, PutCondition::None)
        .await
        .unwrap();
    intact
}

/// A corrupt base, a corrupt delta in the middle of the chain and a missing one each fail the
/// restore naming that archive's key; an empty target stays empty, an absent one absent, and no
/// scratch file or staging dir stays behind. Repaired, the chain restores.
#[tokio::test]
async fn a_bad_archive_anywhere_in_a_chain_fails_the_restore_naming_it() {
    let env = Env::new();
    let upper = env.path("upper");
    let current = chained(&env, &upper, 2).await;
    let base = blob_key(&current.chain[0].digest);
    let middle = blob_key(&current.chain[1].digest);
    let (b, _) = env.counting_node("b", Duration::ZERO).await;
    let out = env.path("out");
    std::fs::create_dir(&out).unwrap();

    let fails_naming = |key: String, case: &'static str| {
        let (b, env, out) = (&b, &env, &out);
        async move {
            let empty = out.join(format!("{case}-empty"));
            std::fs::create_dir(&empty).unwrap();
            let err = b.restore_layer(&id("0"), &empty).await.unwrap_err();
            let msg = error_chain(&err);
            assert!(msg.contains(&key), "{case}: {msg}");
            assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0, "{case}");
            let absent = out.join(format!("{case}-absent"));
            b.restore_layer(&id("0"), &absent).await.unwrap_err();
            assert!(!absent.exists(), "{case}");
            let left: Vec<_> = std::fs::read_dir(out)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| n.to_string_lossy().starts_with('.'))
                .collect();
            assert!(left.is_empty(), "{case}: staging dirs left: {left:?}");
            assert_no_spools(env, "b");
        }
    };

    let intact = corrupt(&env, &middle).await;
    fails_naming(middle.clone(), "corrupt-delta").await;
    env.store
        .put_bytes(&middle, intact, PutCondition::None)
        .await
        .unwrap();

    let intact = corrupt(&env, &base).await;
    fails_naming(base.clone(), "corrupt-base").await;
    env.store
        .put_bytes(&base, intact.clone(), PutCondition::None)
        .await
        .unwrap();

    let delta = env.store.get_bytes(&middle).await.unwrap().unwrap();
    env.store.delete(&middle).await.unwrap();
    fails_naming(middle.clone(), "missing-delta").await;
    env.store
        .put_bytes(&middle, delta, PutCondition::None)
        .await
        .unwrap();

    let target = out.join("repaired");
    b.restore_layer(&id("0"), &target).await.unwrap().unwrap();
    assert_eq!(describe_tree(&upper), describe_tree(&target));
    assert_no_spools(&env, "b");
}

/// The deltas download while the base is being extracted, not before it: their downloads are
/// held until the base's largest file shows up in the staging dir, which only a base extracted
/// beside them can bring about.
#[tokio::test]
async fn the_deltas_download_while_the_base_is_extracted() {
    let env = Env::new();
    let upper = env.path("upper");
    let current = chained(&env, &upper, 2).await;
    let deltas = current
        .chain
        .iter()
        .skip(1)
        .map(|l| l.digest.as_str())
        .chain(std::iter::once(current.digest.as_str()))
        .map(blob_key)
        .collect();
    let (b, counting) = env.counting_node("b", Duration::ZERO).await;
    let out = env.path("out");
    std::fs::create_dir(&out).unwrap();
    *counting.hold_downloads.lock().unwrap() = Some((deltas, out.clone(), "big.bin".into()));

    let target = out.join("restored");
    b.restore_layer(&id("0"), &target).await.unwrap().unwrap();
    assert!(
        !counting.hold_timed_out.load(Ordering::SeqCst),
        "the deltas waited for an extraction that never started"
    );
    assert_eq!(describe_tree(&upper), describe_tree(&target));
    assert_no_spools(&env, "b");
}
