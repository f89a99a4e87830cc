//! The hostile-archive corpus (`integration/fixtures/archive`) through the production restore:
//! every archive is published as an identity's current layer the way a sync lays it out (blob
//! `{prefix}{digest}.tar.zst`, `{digest}.meta.json`, `manifests/{identity}.json`), in the
//! local-directory store and in Garage, and restored with `LayerSyncManager::restore_layer`,
//! which extracts while the download fills the spool.
//!
//! Each restore must fail with the corpus's expected error, leave the target as it was (absent,
//! or an empty dir), leave no staging dir next to it and write nothing anywhere else under the
//! test's temp root (the store, the staging dir and canary dirs around the target included).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Utc;
use sha2::{Digest, Sha256};
use zlayer_storage::config::{BackendKind, LayerStorageConfig};
use zlayer_storage::layer::manifest::{blob_key, manifest_key, meta_key};
use zlayer_storage::layer::{
    ArchiveFormat, LayerError, LayerManifest, LayerMeta, ManifestEntry, TAR_FORMAT,
    TAR_FORMAT_VERSION, zstd_library_version,
};
use zlayer_storage::store::{ObjectStore, PutCondition};
use zlayer_storage::{ContainerLayerId, LayerSyncManager};

use crate::archive_overlay::{expected_cases, fixtures};
use crate::util::garage::garage_or_skip;

/// The zstd bomb, which the restore limits treat differently depending on the declared size.
const BOMB: &str = "zstd_bomb";
/// Where the absolute-path cases of the corpus point; must never appear.
const ABSOLUTE_ESCAPES: [&str; 2] = ["/tmp/zlayer-hostile-target", "/abs-escape"];

/// One restore to attempt: a corpus archive, the uncompressed size its manifest declares, and
/// the expected `ArchiveError` variant.
#[derive(Debug)]
struct Case {
    name: String,
    data: Vec<u8>,
    declared_size: u64,
    expect: String,
}

/// Bytes of uncompressed tar a zstd stream yields before it ends or breaks: what a sync of the
/// same tar would have declared as `size_bytes`.
fn decodable_len(data: &[u8]) -> u64 {
    let Ok(mut dec) = zstd::stream::read::Decoder::new(data) else {
        return 0;
    };
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    while let Ok(k) = dec.read(&mut buf) {
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    n
}

/// Every corpus archive with the size a sync would declare. The bomb is a legitimate layer when
/// its manifest declares its real size (256 MiB of zeros), so it is published twice instead:
/// with no declared size (limits from the config: ratio cap) and with a declared size far below
/// what it expands to (a forged manifest: size cap).
fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for (name, expect) in expected_cases() {
        let data = fs::read(fixtures().join(format!("{name}.tar.zst"))).unwrap();
        if name == BOMB {
            out.push(Case {
                name: format!("{name}-undeclared"),
                data: data.clone(),
                declared_size: 0,
                expect,
            });
            out.push(Case {
                name: format!("{name}-understated"),
                data,
                declared_size: 1 << 20,
                expect: "TooLarge".into(),
            });
        } else {
            out.push(Case {
                declared_size: decodable_len(&data),
                name,
                data,
                expect,
            });
        }
    }
    assert_eq!(out.len(), 46, "corpus size changed: {out:?}");
    out
}

/// Stores `case` as `id`'s current layer: blob, metadata and manifest under the store's prefix.
async fn publish(store: &Arc<dyn ObjectStore>, id: &ContainerLayerId, case: &Case) -> String {
    let digest = hex::encode(Sha256::digest(&case.data));
    let entry = ManifestEntry {
        digest: digest.clone(),
        compressed_size_bytes: case.data.len() as u64,
        size_bytes: case.declared_size,
        uncompressed_digest: String::new(),
        file_count: 1,
        created_at: Utc::now(),
        seq: 1,
        base: None,
        rolled_back_from: None,
        chain: Vec::new(),
    };
    let meta = LayerMeta {
        identity: id.clone(),
        snapshot: entry.snapshot(false),
        format: ArchiveFormat {
            tar_format: TAR_FORMAT.into(),
            tar_format_version: TAR_FORMAT_VERSION,
            compression: "zstd".into(),
            zstd_level: 3,
            zstd_workers: 1,
            zstd_library_version: zstd_library_version().into(),
            uncompressed_digest: String::new(),
            uncompressed_size: case.declared_size,
            skipped_sockets: 0,
            overlay_parameters: BTreeMap::new(),
        },
    };
    let manifest = LayerManifest::new(id.clone(), entry);
    let objects = [
        (blob_key(&digest), case.data.clone()),
        (meta_key(&digest), serde_json::to_vec_pretty(&meta).unwrap()),
        (
            manifest_key(id),
            serde_json::to_vec_pretty(&manifest).unwrap(),
        ),
    ];
    for (key, data) in objects {
        store
            .put_bytes(&key, data, PutCondition::None)
            .await
            .unwrap_or_else(|e| panic!("{}: put {key}: {e:#}", case.name));
    }
    digest
}

/// Type, size and mtime of every path under `root` (directories by type only: creating and
/// removing a staging dir changes the parent's mtime, which is not a write outside).
fn tree(root: &Path) -> BTreeMap<PathBuf, (u32, u64, i64, i64)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let m = fs::symlink_metadata(&path).unwrap();
            let kind = m.mode() & libc::S_IFMT;
            if m.is_dir() {
                todo.push(path.clone());
                out.insert(path, (kind, 0, 0, 0));
            } else {
                out.insert(path, (kind, m.len(), m.mtime(), m.mtime_nsec()));
            }
        }
    }
    out
}

/// The restore environment: store, staging dir, state DB and target with canaries around it.
struct Env {
    root: tempfile::TempDir,
    manager: LayerSyncManager,
    /// `root/canary-a/canary-b`: the target's parent; the corpus escapes at most `../../`.
    parent: PathBuf,
}

impl Env {
    async fn new(mut cfg: LayerStorageConfig) -> Self {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        cfg.staging_dir = r.join("node/staging");
        cfg.state_db_path = r.join("node/state.sqlite");
        if cfg.backend == BackendKind::Local {
            cfg.local_store_dir = r.join("store");
        }
        let manager = LayerSyncManager::new(cfg).await.unwrap();
        let parent = r.join("canary-a/canary-b");
        fs::create_dir_all(&parent).unwrap();
        fs::write(r.join("canary-a/file"), b"a").unwrap();
        fs::write(parent.join("file"), b"b").unwrap();
        Env {
            root,
            manager,
            parent,
        }
    }

    /// Publishes and restores every case, into an absent target and into an empty one.
    async fn restore_all(&self) {
        let mut failures = Vec::new();
        for case in cases() {
            let id = ContainerLayerId::new("hostile", &case.name);
            publish(self.manager.store(), &id, &case).await;
            for existing_target in [false, true] {
                if let Err(e) = self.restore_one(&id, &case, existing_target).await {
                    failures.push(e);
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        for p in ABSOLUTE_ESCAPES {
            assert!(!Path::new(p).exists(), "{p} was created");
        }
    }

    async fn restore_one(
        &self,
        id: &ContainerLayerId,
        case: &Case,
        existing_target: bool,
    ) -> Result<(), String> {
        let name = format!(
            "{} (target {})",
            case.name,
            if existing_target {
                "empty dir"
            } else {
                "absent"
            }
        );
        let target = self.parent.join("target");
        if existing_target {
            fs::create_dir(&target).unwrap();
        }
        let before = tree(self.root.path());
        let result = self.manager.restore_layer(id, &target).await;
        let after = tree(self.root.path());
        let outcome = match result {
            Err(LayerError::Unpack { source, .. }) => {
                let got = format!("{source:?}");
                if got.starts_with(&case.expect) {
                    Ok(())
                } else {
                    Err(format!("{name}: expected {}, got {got}", case.expect))
                }
            }
            Err(other) => Err(format!("{name}: expected {}, got {other:?}", case.expect)),
            Ok(snapshot) => Err(format!("{name}: restored {snapshot:?}")),
        };
        let changed = diff(&before, &after);
        let leftovers: Vec<String> = fs::read_dir(&self.parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("staging"))
            .collect();
        let target_now: Vec<PathBuf> = after
            .keys()
            .filter(|p| p.starts_with(&target))
            .cloned()
            .collect();
        if existing_target {
            fs::remove_dir(&target).unwrap();
        }
        outcome?;
        if !changed.is_empty() {
            return Err(format!("{name}: written outside the target: {changed:?}"));
        }
        if !leftovers.is_empty() {
            return Err(format!(
                "{name}: staging left next to the target: {leftovers:?}"
            ));
        }
        let want: Vec<PathBuf> = if existing_target {
            vec![target]
        } else {
            Vec::new()
        };
        if target_now != want {
            return Err(format!("{name}: target touched: {target_now:?}"));
        }
        Ok(())
    }
}

/// Paths added, removed or changed between two [`tree`]s, except the state DB's own files.
fn diff(
    before: &BTreeMap<PathBuf, (u32, u64, i64, i64)>,
    after: &BTreeMap<PathBuf, (u32, u64, i64, i64)>,
) -> Vec<PathBuf> {
    let paths: BTreeSet<&PathBuf> = before.keys().chain(after.keys()).collect();
    paths
        .into_iter()
        .filter(|p| before.get(*p) != after.get(*p))
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("state.sqlite"))
        })
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_corpus_through_restore_from_the_local_store() {
    let env = Env::new(LayerStorageConfig {
        backend: BackendKind::Local,
        prefix: "layers/".into(),
        ..LayerStorageConfig::default()
    })
    .await;
    // The objects land where a sync puts them.
    let case = &cases()[0];
    let id = ContainerLayerId::new("layout", &case.name);
    let digest = publish(env.manager.store(), &id, case).await;
    let store = env.root.path().join("store/layers");
    for rel in [
        format!("{digest}.tar.zst"),
        format!("{digest}.meta.json"),
        format!("manifests/{}.json", id.to_key()),
    ] {
        assert!(store.join(&rel).is_file(), "{rel} not in the store");
    }
    env.restore_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_corpus_through_restore_from_garage() {
    let Some(g) = garage_or_skip("hostile_corpus_through_restore_from_garage") else {
        return;
    };
    let env = Env::new(g.config("hostile-corpus")).await;
    env.restore_all().await;
}
