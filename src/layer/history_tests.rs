//! Versions, listing, rollback, forget and store garbage collection, against the local store.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::manifest::{blob_key, manifest_key, meta_key};
use super::testenv::SharedStore as Env;
use super::tests::{describe_tree, id, interrupted_sync, make_tree};
use super::types::{ContainerLayerId, LayerSnapshot};
use super::*;
use crate::store::{PutCondition, UploadJournal};
use crate::util::error_chain;

const HOUR: u64 = 3600;

/// Node `name` over the shared store, keeping `keep` versions with a grace period of `grace`.
async fn node(env: &Env, name: &str, keep: usize, grace: u64) -> LayerSyncManager {
    let mut cfg = env.config(name);
    cfg.history_keep = keep;
    cfg.gc_grace_secs = grace;
    LayerSyncManager::with_store(cfg, Arc::clone(&env.store))
        .await
        .unwrap()
}

/// [`node`] that writes every version as a full layer (no delta chains keeping old blobs).
async fn full_node(env: &Env, name: &str, keep: usize, grace: u64) -> LayerSyncManager {
    let mut cfg = env.config(name);
    cfg.history_keep = keep;
    cfg.gc_grace_secs = grace;
    cfg.delta_chain_max = 0;
    LayerSyncManager::with_store(cfg, Arc::clone(&env.store))
        .await
        .unwrap()
}

/// Syncs `n` different trees as `ident` on `m`; returns their dirs and snapshots, oldest first.
async fn versions(
    env: &Env,
    m: &LayerSyncManager,
    ident: &str,
    n: usize,
) -> Vec<(PathBuf, LayerSnapshot)> {
    let mut out = Vec::new();
    let mut i = 0;
    while out.len() < n {
        i += 1;
        let dir = env.path(&format!("{ident}-v{i}"));
        if dir.exists() {
            continue;
        }
        make_tree(&dir, &format!("{ident}-{i}"));
        let snap = m.sync_layer(&id(ident), &dir).await.unwrap();
        out.push((dir, snap));
    }
    out
}

/// Restores version `which` of `ident` into `target` with default options.
async fn restore(
    m: &LayerSyncManager,
    ident: &str,
    which: VersionSelector,
    target: &std::path::Path,
) -> Result<Option<LayerSnapshot>, LayerError> {
    m.restore_version(&id(ident), which, target, RestoreOptions::default())
        .await
}

fn object_path(env: &Env, key: &str) -> PathBuf {
    env.dir.path().join("store/layers").join(key)
}

/// Makes `key` look written `secs` ago.
fn age(env: &Env, key: &str, secs: u64) {
    let file = std::fs::File::open(object_path(env, key)).unwrap();
    file.set_modified(SystemTime::now() - Duration::from_secs(secs))
        .unwrap();
}

/// Ages both objects of `digest`.
fn age_layer(env: &Env, digest: &str, secs: u64) {
    age(env, &blob_key(digest), secs);
    age(env, &meta_key(digest), secs);
}

fn stored(env: &Env, digest: &str) -> (bool, bool) {
    (
        object_path(env, &blob_key(digest)).exists(),
        object_path(env, &meta_key(digest)).exists(),
    )
}

#[tokio::test]
async fn history_is_trimmed_to_history_keep_and_blobs_stay() {
    let env = Env::new();
    let m = node(&env, "a", 3, HOUR).await;
    let v = versions(&env, &m, "0", 5).await;
    let manifest = m.manifest(&id("0")).await.unwrap().unwrap();
    let kept: Vec<&str> = manifest.versions().map(|e| e.digest.as_str()).collect();
    assert_eq!(
        kept,
        [&v[4].1.digest, &v[3].1.digest, &v[2].1.digest].map(String::as_str)
    );
    // Syncing never deletes: the dropped versions' blobs wait for gc.
    for (_, snap) in &v {
        assert_eq!(stored(&env, &snap.digest), (true, true));
    }
    // history_keep = 1 keeps only the current version.
    let one = node(&env, "b", 1, HOUR).await;
    versions(&env, &one, "1", 2).await;
    let m1 = one.manifest(&id("1")).await.unwrap().unwrap();
    assert!(m1.history.is_empty());
}

#[tokio::test]
async fn list_identities_shows_every_identity_in_the_store() {
    let env = Env::new();
    let (a, b) = (
        node(&env, "a", 5, HOUR).await,
        node(&env, "b", 5, HOUR).await,
    );
    assert!(a.list_identities().await.unwrap().is_empty());
    let v0 = versions(&env, &a, "0", 3).await;
    let v1 = versions(&env, &b, "1", 1).await;
    let odd = ContainerLayerId::new("ns_x", "a/b c");
    let odd_dir = env.path("odd");
    make_tree(&odd_dir, "odd");
    let odd_snap = b.sync_layer(&odd, &odd_dir).await.unwrap();

    // Node b lists what node a wrote too: the store is the cross-node view.
    let list = b.list_identities().await.unwrap();
    let ids: Vec<_> = list.iter().map(|s| s.identity.clone()).collect();
    assert_eq!(ids, [odd.clone(), id("0"), id("1")]);
    let s0 = &list[1];
    assert_eq!(s0.digest, v0[2].1.digest);
    assert_eq!(s0.versions, 3);
    assert_eq!(s0.compressed_size_bytes, v0[2].1.compressed_size_bytes);
    assert_eq!(s0.size_bytes, v0[2].1.size_bytes);
    assert_eq!(s0.created_at, v0[2].1.created_at);
    let m0 = a.manifest(&id("0")).await.unwrap().unwrap();
    assert_eq!(s0.seq, m0.current.seq);
    assert_eq!(list[2].digest, v1[0].1.digest);
    assert_eq!(list[2].versions, 1);
    assert_eq!(list[0].digest, odd_snap.digest);
}

#[tokio::test]
async fn a_manifest_that_cannot_be_read_fails_the_listing_naming_it() {
    let env = Env::new();
    let m = node(&env, "a", 5, HOUR).await;
    versions(&env, &m, "0", 1).await;
    env.store
        .put_bytes(
            "manifests/svc_9.json",
            b"{ not json".to_vec(),
            PutCondition::None,
        )
        .await
        .unwrap();
    let err = error_chain(&m.list_identities().await.unwrap_err());
    assert!(err.contains("manifests/svc_9.json"), "{err}");

    // A manifest stored under another identity's key is refused too.
    env.store.delete("manifests/svc_9.json").await.unwrap();
    let good = env
        .store
        .get_bytes(&manifest_key(&id("0")))
        .await
        .unwrap()
        .unwrap();
    env.store
        .put_bytes("manifests/svc_7.json", good, PutCondition::None)
        .await
        .unwrap();
    let err = error_chain(&m.list_identities().await.unwrap_err());
    assert!(
        err.contains("manifests/svc_7.json") && err.contains("svc/0"),
        "{err}"
    );
}

#[tokio::test]
async fn restore_of_an_old_version_by_seq_or_time_gives_exactly_its_content() {
    let env = Env::new();
    let m = node(&env, "a", 5, HOUR).await;
    let (d0, s0) = {
        let v = versions(&env, &m, "0", 1).await;
        v.into_iter().next().unwrap()
    };
    let between = chrono::Utc::now();
    let rest = versions(&env, &m, "0", 2).await;
    let manifest = m.manifest(&id("0")).await.unwrap().unwrap();
    let seq0 = manifest.history.last().unwrap().seq;
    assert_eq!(manifest.history.last().unwrap().digest, s0.digest);

    let r = node(&env, "b", 5, HOUR).await;
    let by_seq = env.path("by-seq");
    let snap = restore(&r, "0", VersionSelector::Seq(seq0), &by_seq)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snap.digest, s0.digest);
    assert_eq!(describe_tree(&d0), describe_tree(&by_seq));

    let by_time = env.path("by-time");
    restore(&r, "0", VersionSelector::At(between), &by_time)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(describe_tree(&d0), describe_tree(&by_time));

    // The node records the old version as its local one and the store's current as remote.
    let state = r.status().await.unwrap().pop().unwrap();
    assert_eq!(state.local_digest.as_deref(), Some(s0.digest.as_str()));
    assert_eq!(
        state.remote_digest.as_deref(),
        Some(rest[1].1.digest.as_str())
    );

    // Absent versions: an error naming the identity and what was asked; target untouched.
    let none = env.path("none");
    let err = restore(&r, "0", VersionSelector::Seq(999), &none)
        .await
        .unwrap_err();
    assert!(matches!(err, LayerError::NoSuchVersion { .. }));
    let msg = err.to_string();
    assert!(msg.contains("svc/0") && msg.contains("seq 999"), "{msg}");
    assert!(
        msg.contains(&format!("seq {seq0}")),
        "lists what is kept: {msg}"
    );
    let before = between - chrono::Duration::hours(1);
    let err = restore(&r, "0", VersionSelector::At(before), &none)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("svc/0") && err.contains("created at or before"),
        "{err}"
    );
    assert!(!none.exists());
    // An identity without manifest is still "nothing to restore".
    let unknown = restore(&r, "x", VersionSelector::Seq(1), &none)
        .await
        .unwrap();
    assert!(unknown.is_none());
}

#[tokio::test]
async fn rollback_makes_old_content_current_under_a_higher_seq() {
    let env = Env::new();
    let m = node(&env, "a", 5, HOUR).await;
    let v = versions(&env, &m, "0", 3).await;
    let before = m.manifest(&id("0")).await.unwrap().unwrap();
    let seq0 = before.history[1].seq;

    let b = node(&env, "b", 5, HOUR).await;
    let out = b
        .rollback(&id("0"), VersionSelector::Seq(seq0))
        .await
        .unwrap();
    assert!(out.moved);
    assert_eq!(out.chosen.digest, v[0].1.digest);
    assert!(out.current.seq > before.current.seq);
    let after = m.manifest(&id("0")).await.unwrap().unwrap();
    assert_eq!(after.current, out.current);
    assert_eq!(after.current.rolled_back_from, Some(seq0));
    assert_eq!(
        after.history[0], before.current,
        "the replaced current heads the history"
    );

    // A plain restore now gives the old content.
    let target = env.path("restored");
    m.restore_layer(&id("0"), &target).await.unwrap().unwrap();
    assert_eq!(describe_tree(&v[0].0), describe_tree(&target));

    // Undo: roll back to the version that was replaced.
    let undo = b
        .rollback(&id("0"), VersionSelector::Seq(before.current.seq))
        .await
        .unwrap();
    assert!(undo.current.seq > out.current.seq);
    assert_eq!(undo.current.digest, v[2].1.digest);
    // The current version: nothing to do.
    let same = b
        .rollback(&id("0"), VersionSelector::Seq(undo.current.seq))
        .await
        .unwrap();
    assert!(!same.moved);
    // A later sync still moves forward past the rollback.
    let newer = env.path("newer");
    make_tree(&newer, "newer");
    m.sync_layer(&id("0"), &newer).await.unwrap();
    let last = m.manifest(&id("0")).await.unwrap().unwrap();
    assert!(last.current.seq > undo.current.seq);

    let err = b
        .rollback(&id("0"), VersionSelector::Seq(seq0 + 100))
        .await
        .unwrap_err();
    assert!(matches!(err, LayerError::NoSuchVersion { .. }), "{err}");
    let err = b
        .rollback(&id("nope"), VersionSelector::Seq(1))
        .await
        .unwrap_err();
    assert!(matches!(err, LayerError::NoManifest { .. }), "{err}");
    assert!(err.to_string().contains("svc/nope"));
}

#[tokio::test]
async fn rollback_refuses_a_version_whose_blob_is_gone() {
    let env = Env::new();
    let m = node(&env, "a", 5, HOUR).await;
    let v = versions(&env, &m, "0", 2).await;
    env.store.delete(&blob_key(&v[0].1.digest)).await.unwrap();
    let before = m.manifest(&id("0")).await.unwrap().unwrap();
    let err = m
        .rollback(&id("0"), VersionSelector::Seq(before.history[0].seq))
        .await
        .unwrap_err();
    assert!(matches!(err, LayerError::MissingBlob { .. }), "{err}");
    assert_eq!(m.manifest(&id("0")).await.unwrap().unwrap(), before);
}

/// Identity `0` with 4 versions on a node keeping 2: v0 and v1 unreferenced, v2 and v3 kept.
async fn two_dropped(env: &Env, grace: u64) -> (LayerSyncManager, Vec<(PathBuf, LayerSnapshot)>) {
    let m = node(env, "a", 2, grace).await;
    let v = versions(env, &m, "0", 4).await;
    (m, v)
}

#[tokio::test]
async fn gc_deletes_only_unreferenced_layers_older_than_the_grace_period() {
    let env = Env::new();
    let (m, v) = two_dropped(&env, HOUR).await;
    let other = versions(&env, &m, "1", 1).await;
    age_layer(&env, &v[0].1.digest, 2 * HOUR); // unreferenced, old: goes
    age(&env, &blob_key(&v[1].1.digest), 2 * HOUR); // unreferenced, metadata young: stays
    age_layer(&env, &v[2].1.digest, 2 * HOUR); // referenced by history, old: stays
    age_layer(&env, &other[0].1.digest, 2 * HOUR); // another identity's current: stays
    env.store
        .put_bytes("notes/readme.txt", b"not ours".to_vec(), PutCondition::None)
        .await
        .unwrap();
    age(&env, "notes/readme.txt", 2 * HOUR);

    let report = m.gc().await.unwrap();
    let d0 = &v[0].1.digest;
    assert_eq!(report.deleted, [meta_key(d0), blob_key(d0)], "sorted");
    assert_eq!(report.objects_deleted, 2);
    let meta_len = std::fs::metadata(object_path(&env, &meta_key(&v[1].1.digest)))
        .unwrap()
        .len();
    assert!(report.bytes_deleted > v[0].1.compressed_size_bytes);
    assert!(report.bytes_deleted < v[0].1.compressed_size_bytes + 2 * meta_len);
    assert_eq!(report.young_kept, 1);
    assert_eq!(stored(&env, d0), (false, false));
    for keep in [&v[1], &v[2], &v[3], &other[0]] {
        assert_eq!(stored(&env, &keep.1.digest), (true, true));
    }
    assert!(object_path(&env, "notes/readme.txt").exists());

    // Once v1 is old too, the next run takes it; nothing referenced ever goes.
    age(&env, &meta_key(&v[1].1.digest), 2 * HOUR);
    let report = m.gc().await.unwrap();
    assert_eq!(report.objects_deleted, 2);
    assert_eq!(stored(&env, &v[1].1.digest), (false, false));
    for (dir, snap) in [&v[2], &v[3]] {
        let target = env.path(&format!("restored-{}", &snap.digest[..8]));
        let which = VersionSelector::Seq(
            m.manifest(&id("0"))
                .await
                .unwrap()
                .unwrap()
                .versions()
                .find(|e| e.digest == snap.digest)
                .unwrap()
                .seq,
        );
        restore(&m, "0", which, &target).await.unwrap().unwrap();
        assert_eq!(describe_tree(dir), describe_tree(&target));
    }
}

#[tokio::test]
async fn gc_dry_run_reports_and_deletes_nothing() {
    let env = Env::new();
    let (m, v) = two_dropped(&env, HOUR).await;
    age_layer(&env, &v[0].1.digest, 2 * HOUR);
    age_layer(&env, &v[1].1.digest, 2 * HOUR);
    let listing = env.store.list("").await.unwrap();

    let dry = m.gc_with(GcOptions { dry_run: true }).await.unwrap();
    assert!(dry.dry_run);
    assert_eq!(dry.objects_deleted, 4);
    assert_eq!(env.store.list("").await.unwrap(), listing);

    let real = m.gc().await.unwrap();
    assert_eq!(real.deleted, dry.deleted);
    assert_eq!(real.bytes_deleted, dry.bytes_deleted);
    assert_eq!(stored(&env, &v[0].1.digest), (false, false));
}

#[tokio::test]
async fn an_unreadable_manifest_stops_gc_before_it_deletes_anything() {
    let env = Env::new();
    let (m, v) = two_dropped(&env, HOUR).await;
    age_layer(&env, &v[0].1.digest, 2 * HOUR);
    let bad = manifest_key(&id("broken"));
    env.store
        .put_bytes(&bad, b"{\"version\": 1".to_vec(), PutCondition::None)
        .await
        .unwrap();
    let listing = env.store.list("").await.unwrap();
    for dry_run in [true, false] {
        let err = m.gc_with(GcOptions { dry_run }).await.unwrap_err();
        assert!(error_chain(&err).contains(&bad), "{}", error_chain(&err));
        assert_eq!(env.store.list("").await.unwrap(), listing);
    }
}

#[tokio::test]
async fn gc_trims_manifests_over_history_keep_then_collects_their_old_blobs() {
    let env = Env::new();
    let wide = full_node(&env, "a", 10, HOUR).await;
    let v = versions(&env, &wide, "0", 5).await;
    for (_, snap) in &v[..4] {
        age_layer(&env, &snap.digest, 2 * HOUR);
    }
    let narrow = node(&env, "b", 2, HOUR).await;
    let dry = narrow.gc_with(GcOptions { dry_run: true }).await.unwrap();
    assert_eq!((dry.manifests_trimmed, dry.versions_dropped), (1, 3));
    assert_eq!(
        wide.manifest(&id("0"))
            .await
            .unwrap()
            .unwrap()
            .versions()
            .count(),
        5
    );

    let report = narrow.gc().await.unwrap();
    assert_eq!((report.manifests_trimmed, report.versions_dropped), (1, 3));
    let trimmed = wide.manifest(&id("0")).await.unwrap().unwrap();
    let kept: Vec<_> = trimmed.versions().map(|e| e.digest.clone()).collect();
    assert_eq!(kept, [v[4].1.digest.clone(), v[3].1.digest.clone()]);
    assert_eq!(report.objects_deleted, 6, "v0..v2, blob and metadata each");
    for (i, (_, snap)) in v.iter().enumerate() {
        let present = i >= 3;
        assert_eq!(stored(&env, &snap.digest), (present, present), "v{i}");
    }
    // Nothing left to do.
    let again = narrow.gc().await.unwrap();
    assert_eq!((again.manifests_trimmed, again.objects_deleted), (0, 0));
}

#[tokio::test]
async fn gc_spares_layers_being_published_or_uploaded() {
    let env = Env::new();
    let (m, v) = two_dropped(&env, HOUR).await;
    let (d0, d1) = (&v[0].1.digest, &v[1].1.digest);
    age_layer(&env, d0, 2 * HOUR);
    age_layer(&env, d1, 2 * HOUR);
    // A sync elsewhere publishing d0's content again rewrites its metadata before it moves
    // its manifest: the old blob must survive.
    let meta = env.store.get_bytes(&meta_key(d0)).await.unwrap().unwrap();
    env.store
        .put_bytes(&meta_key(d0), meta, PutCondition::None)
        .await
        .unwrap();
    // This node has a multipart upload of d1 in its journal.
    let db = StateDb::open(&env.config("a").state_db_path).unwrap();
    db.begin_upload(&crate::types::PendingUpload {
        upload_id: "u1".into(),
        object_key: blob_key(d1),
        total_parts: 2,
        completed_parts: Default::default(),
        part_size: 5 << 20,
        local_tarball_path: env.path("spool"),
        started_at: chrono::Utc::now(),
        digest: d1.to_string(),
        total_size: 6 << 20,
    })
    .await
    .unwrap();

    let report = m.gc().await.unwrap();
    assert_eq!(report.objects_deleted, 0, "{report:?}");
    assert_eq!((report.young_kept, report.pending_kept), (1, 1));
    assert_eq!(stored(&env, d0), (true, true));
    assert_eq!(stored(&env, d1), (true, true));
}

/// The metadata is HEADed again right before the delete: a publish of the same content that
/// rewrote it after the listing (here: while the manifests were read) keeps the layer.
#[tokio::test]
async fn gc_spares_a_layer_republished_after_its_listing() {
    let env = Env::new();
    let (_m, v) = two_dropped(&env, HOUR).await;
    let d0 = &v[0].1.digest;
    age_layer(&env, d0, 48 * HOUR); // the counting node's grace is the default 24 h
    let (gc_node, counting) = env.counting_node("gc", Duration::ZERO).await;
    let meta = env.store.get_bytes(&meta_key(d0)).await.unwrap().unwrap();
    *counting.put_before_manifest_get.lock().unwrap() = Some((meta_key(d0), meta));
    let mut report = gc_node.gc().await.unwrap();
    assert!(counting.put_before_manifest_get.lock().unwrap().is_none());
    assert_eq!(report.objects_deleted, 0, "{report:?}");
    assert_eq!(stored(&env, d0), (true, true));
    // Untouched from then on, it goes once it is old again.
    age_layer(&env, d0, 48 * HOUR);
    report = gc_node.gc().await.unwrap();
    assert_eq!(report.objects_deleted, 2);
}

#[tokio::test]
async fn forget_drops_the_manifest_and_local_record_and_gc_takes_the_blobs_later() {
    let env = Env::new();
    let m = node(&env, "a", 5, HOUR).await;
    let v = versions(&env, &m, "0", 2).await;
    versions(&env, &m, "1", 1).await;

    let gone = m.forget(&id("0")).await.unwrap();
    assert!(gone.manifest_deleted && gone.local_record_removed);
    assert_eq!(gone.current.unwrap().digest, v[1].1.digest);
    assert!(m.manifest(&id("0")).await.unwrap().is_none());
    let ids: Vec<_> = m
        .list_identities()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.identity)
        .collect();
    assert_eq!(ids, [id("1")]);
    assert!(
        m.status()
            .await
            .unwrap()
            .iter()
            .all(|s| s.container_id != id("0"))
    );
    assert!(
        m.restore_layer(&id("0"), env.path("none"))
            .await
            .unwrap()
            .is_none()
    );

    // Blobs stay until they are older than the grace period.
    assert_eq!(m.gc().await.unwrap().objects_deleted, 0);
    for (_, snap) in &v {
        age_layer(&env, &snap.digest, 2 * HOUR);
    }
    assert_eq!(m.gc().await.unwrap().objects_deleted, 4);

    // Forgetting what is not there is not an error.
    let none = m.forget(&id("0")).await.unwrap();
    assert!(!none.manifest_deleted && !none.local_record_removed && none.current.is_none());
}

#[tokio::test]
async fn forget_drops_interrupted_syncs_and_unreadable_manifests() {
    let (env, _upper, m, _) = interrupted_sync().await;
    let gone = m.forget(&id("0")).await.unwrap();
    assert_eq!(gone.intents_dropped, 1);
    assert_eq!(m.resume_pending().await.unwrap(), 0);
    assert!(m.manifest(&id("0")).await.unwrap().is_none());

    let key = manifest_key(&id("2"));
    env.store
        .put_bytes(&key, b"garbage".to_vec(), PutCondition::None)
        .await
        .unwrap();
    let gone = m.forget(&id("2")).await.unwrap();
    assert!(gone.manifest_deleted && gone.current.is_none());
    assert!(!env.store.exists(&key).await.unwrap());
}
