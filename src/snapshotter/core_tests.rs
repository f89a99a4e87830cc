//! Core semantics without mounting anything (no root needed).

use std::os::unix::fs::PermissionsExt;
use std::sync::Mutex as StdMutex;

use super::*;

const FEATURES: OverlayFeatures = OverlayFeatures {
    index_off: true,
    userxattr: false,
};

fn open(root: &Path) -> Snapshotter {
    Snapshotter::open_with(root, FEATURES, Arc::new(NoPersistence)).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Creates `key` as a committed snapshot on `parent` with one file.
fn layer(s: &Snapshotter, key: &str, parent: &str) {
    let tmp = format!("{key}-active");
    let m = s.prepare(&tmp, parent, Labels::new()).unwrap();
    let upper = upper_of(&m);
    fs::write(upper.join(key), key).unwrap();
    s.commit(key, &tmp, Labels::new()).unwrap();
}

fn upper_of(m: &[Mount]) -> PathBuf {
    if m[0].kind == "bind" {
        return PathBuf::from(&m[0].source);
    }
    let o = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .unwrap();
    PathBuf::from(o)
}

fn code(e: SnapshotError) -> tonic::Code {
    e.code()
}

#[test]
fn prepare_creates_numbered_dirs_with_containerd_modes() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let m = s
        .prepare("default/1/c1", "", labels(&[("a", "1")]))
        .unwrap();
    let dir = d.path().join("snapshots/1");
    assert_eq!(
        m,
        vec![Mount {
            kind: "bind".into(),
            source: dir.join("fs").display().to_string(),
            options: vec!["rw".into(), "rbind".into()],
        }]
    );
    let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(dir.join("fs")), 0o755);
    assert_eq!(mode(dir.join("work")), 0o711);
    assert_eq!(mode(d.path().join("snapshots")), 0o700);
    assert!(d.path().join("metadata.db").is_file());
    // No temp leftovers.
    let names: Vec<_> = fs::read_dir(d.path().join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("1")]);

    let v = s.view("default/2/v", "", Labels::new()).unwrap();
    assert_eq!(v[0].options, vec!["ro", "rbind"]);
    assert!(!d.path().join("snapshots/2/work").exists());
}

#[test]
fn stat_and_list_agree_field_for_field() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    layer(&s, "base", "");
    s.prepare("c1", "base", labels(&[("containerd.io/gc.root", "x")]))
        .unwrap();
    s.view("v1", "base", Labels::new()).unwrap();
    let listed = s.list(&[]).unwrap();
    assert_eq!(listed.len(), 3);
    for info in &listed {
        assert_eq!(&s.stat(&info.name).unwrap(), info);
    }
    let c1 = s.stat("c1").unwrap();
    assert_eq!((c1.kind, c1.parent.as_str()), (Kind::Active, "base"));
    assert_eq!(c1.created, c1.updated);
    assert_eq!(c1.labels, labels(&[("containerd.io/gc.root", "x")]));
}

#[test]
fn duplicate_keys_and_bad_parents_use_containerd_codes() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    s.prepare("k", "", Labels::new()).unwrap();
    assert_eq!(
        code(s.prepare("k", "", Labels::new()).unwrap_err()),
        tonic::Code::AlreadyExists
    );
    assert_eq!(
        code(s.view("k", "", Labels::new()).unwrap_err()),
        tonic::Code::AlreadyExists
    );
    assert_eq!(
        code(s.prepare("x", "missing", Labels::new()).unwrap_err()),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(s.prepare("x", "k", Labels::new()).unwrap_err()),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(s.prepare("", "", Labels::new()).unwrap_err()),
        tonic::Code::InvalidArgument
    );
    let long = labels(&[("l", &"v".repeat(4096))]);
    assert_eq!(
        code(s.prepare("y", "", long).unwrap_err()),
        tonic::Code::InvalidArgument
    );
    // Failed creates leave no directories behind.
    assert_eq!(fs::read_dir(d.path().join("snapshots")).unwrap().count(), 1);
}

#[test]
fn overlay_mounts_list_parents_nearest_first() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    layer(&s, "l1", "");
    layer(&s, "l2", "l1");
    let m = s.prepare("top", "l2", Labels::new()).unwrap();
    let snap = |id: u32| d.path().join("snapshots").join(id.to_string());
    assert_eq!(m[0].kind, "overlay");
    assert_eq!(
        m[0].options,
        vec![
            "index=off".to_string(),
            format!("workdir={}", snap(3).join("work").display()),
            format!("upperdir={}", snap(3).join("fs").display()),
            format!(
                "lowerdir={}:{}",
                snap(2).join("fs").display(),
                snap(1).join("fs").display()
            ),
        ]
    );
    assert_eq!(s.mounts("top").unwrap(), m);
    let v = s.view("v", "l2", Labels::new()).unwrap();
    assert_eq!(
        v[0].options.last().unwrap(),
        &format!(
            "lowerdir={}:{}",
            snap(2).join("fs").display(),
            snap(1).join("fs").display()
        )
    );
    let v1 = s.view("v1", "l1", Labels::new()).unwrap();
    assert_eq!(
        (v1[0].kind.as_str(), v1[0].source.clone()),
        ("bind", snap(1).join("fs").display().to_string())
    );
    assert_eq!(
        code(s.mounts("l1").unwrap_err()),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(code(s.mounts("nope").unwrap_err()), tonic::Code::NotFound);
}

#[test]
fn commit_reuses_the_directory_and_keeps_only_commit_labels() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let m = s.prepare("a", "", labels(&[("active", "1")])).unwrap();
    fs::write(upper_of(&m).join("f"), vec![7u8; 10_000]).unwrap();
    s.commit("c", "a", labels(&[("commit", "1")])).unwrap();
    assert_eq!(code(s.stat("a").unwrap_err()), tonic::Code::NotFound);
    let c = s.stat("c").unwrap();
    assert_eq!(
        (c.kind, c.labels.clone()),
        (Kind::Committed, labels(&[("commit", "1")]))
    );
    assert_eq!(c.created, c.updated);
    assert_eq!(
        fs::read(d.path().join("snapshots/1/fs/f")).unwrap().len(),
        10_000
    );
    let u = s.usage("c").unwrap();
    assert_eq!(u.inodes, 2);
    assert!(u.size >= 10_000, "{u:?}");

    s.prepare("a2", "", Labels::new()).unwrap();
    assert_eq!(
        code(s.commit("c", "a2", Labels::new()).unwrap_err()),
        tonic::Code::AlreadyExists
    );
    assert_eq!(
        code(s.commit("c2", "missing", Labels::new()).unwrap_err()),
        tonic::Code::NotFound
    );
    s.view("v", "c", Labels::new()).unwrap();
    assert_eq!(
        code(s.commit("c3", "v", Labels::new()).unwrap_err()),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(
        code(s.commit("c4", "c", Labels::new()).unwrap_err()),
        tonic::Code::FailedPrecondition
    );
}

#[test]
fn usage_is_live_for_active_stored_for_committed_zero_for_view() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let m = s.prepare("a", "", Labels::new()).unwrap();
    let empty = s.usage("a").unwrap();
    assert_eq!(empty.inodes, 1);
    fs::write(upper_of(&m).join("f"), vec![1u8; 50_000]).unwrap();
    let grown = s.usage("a").unwrap();
    assert_eq!(grown.inodes, 2);
    assert!(grown.size > empty.size);
    s.commit("c", "a", Labels::new()).unwrap();
    // Stored at Commit: later changes on disk do not show.
    fs::write(d.path().join("snapshots/1/fs/g"), b"x").unwrap();
    assert_eq!(s.usage("c").unwrap(), grown);
    s.view("v", "c", Labels::new()).unwrap();
    assert_eq!(s.usage("v").unwrap(), Usage::default());
    assert_eq!(code(s.usage("nope").unwrap_err()), tonic::Code::NotFound);
}

#[test]
fn remove_is_immediate_and_directories_go_through_the_trash() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    layer(&s, "base", "");
    s.prepare("c", "base", Labels::new()).unwrap();
    let err = s.remove("base").unwrap_err();
    assert_eq!(code(err), tonic::Code::FailedPrecondition);
    s.remove("c").unwrap();
    assert_eq!(code(s.stat("c").unwrap_err()), tonic::Code::NotFound);
    assert!(!d.path().join("snapshots/2").exists());
    assert_eq!(fs::read_dir(d.path().join("trash")).unwrap().count(), 1);
    // The key is reusable at once.
    s.prepare("c", "base", Labels::new()).unwrap();
    s.remove("c").unwrap();
    s.remove("base").unwrap();
    assert_eq!(code(s.remove("base").unwrap_err()), tonic::Code::NotFound);
    assert_eq!(s.sweep().unwrap(), 3);
    assert_eq!(fs::read_dir(d.path().join("snapshots")).unwrap().count(), 0);
}

#[test]
fn update_changes_labels_only() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    s.prepare("a", "", labels(&[("l1", "v1"), ("l2", "v2")]))
        .unwrap();
    let before = s.stat("a").unwrap();
    let info = s
        .update(
            "a",
            &labels(&[("l1", "new"), ("l3", "x")]),
            &["labels.l1".into(), "labels.l2".into()],
        )
        .unwrap();
    assert_eq!(info.labels, labels(&[("l1", "new")]));
    assert_eq!(info.created, before.created);
    assert!(info.updated > before.updated);
    assert_eq!(s.stat("a").unwrap(), info);
    let info = s.update("a", &labels(&[("z", "1")]), &[]).unwrap();
    assert_eq!(info.labels, labels(&[("z", "1")]));
    let err = s
        .update("a", &Labels::new(), &["parent".into()])
        .unwrap_err();
    assert_eq!(code(err), tonic::Code::InvalidArgument);
    assert_eq!(
        s.stat("a").unwrap().labels,
        labels(&[("z", "1")]),
        "a rejected update changes nothing"
    );
    assert_eq!(
        code(s.update("nope", &Labels::new(), &[]).unwrap_err()),
        tonic::Code::NotFound
    );
}

#[test]
fn list_filters_and_rejects_bad_filters() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    layer(&s, "base", "");
    s.prepare("c", "base", labels(&[("x", "1")])).unwrap();
    let names = |f: &[&str]| -> Vec<String> {
        let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
        s.list(&f).unwrap().into_iter().map(|i| i.name).collect()
    };
    assert_eq!(names(&["kind==committed"]), ["base"]);
    assert_eq!(names(&["parent==base,labels.x"]), ["c"]);
    assert_eq!(names(&["name==base", "name==c"]), ["base", "c"]);
    assert_eq!(
        code(s.list(&["kind==".into()]).unwrap_err()),
        tonic::Code::InvalidArgument
    );
}

#[test]
fn snapshot_ref_of_an_existing_layer_is_already_exists() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let ref_labels = labels(&[(SNAPSHOT_REF_LABEL, "sha256:abc")]);
    s.prepare("default/1/extract-1 sha256:abc", "", ref_labels.clone())
        .unwrap();
    s.commit(
        "default/2/sha256:abc",
        "default/1/extract-1 sha256:abc",
        ref_labels.clone(),
    )
    .unwrap();
    let err = s
        .prepare("default/3/extract-2 sha256:abc", "", ref_labels.clone())
        .unwrap_err();
    assert_eq!(code(err), tonic::Code::AlreadyExists);
    // The lookup containerd performs next finds it.
    let found = s
        .list(&[r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="""#.to_string()])
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].name, "default/2/sha256:abc");
    // Another parent is another layer.
    layer(&s, "other", "");
    s.prepare("default/4/extract-3 sha256:abc", "other", ref_labels)
        .unwrap();
}

#[test]
fn restart_keeps_records_and_paths_and_collects_debris() {
    let d = tempfile::tempdir().unwrap();
    let mounts_before;
    {
        let s = open(d.path());
        layer(&s, "base", "");
        mounts_before = s.prepare("c", "base", Labels::new()).unwrap();
        fs::write(upper_of(&mounts_before).join("data"), b"keep").unwrap();
    }
    // Debris a crash could leave: an interrupted create and a directory without a record.
    fs::create_dir_all(d.path().join("snapshots/new-123-4-5/fs")).unwrap();
    fs::create_dir_all(d.path().join("snapshots/99/fs")).unwrap();
    let s = open(d.path());
    assert_eq!(s.mounts("c").unwrap(), mounts_before);
    assert_eq!(
        fs::read(upper_of(&mounts_before).join("data")).unwrap(),
        b"keep"
    );
    assert!(!d.path().join("snapshots/new-123-4-5").exists());
    assert!(!d.path().join("snapshots/99").exists());
    assert_eq!(s.list(&[]).unwrap().len(), 2);
    // New ids continue after the old ones, past the debris id too once it is trashed.
    s.prepare("d", "", Labels::new()).unwrap();
    s.cleanup().unwrap();
    assert_eq!(fs::read_dir(d.path().join("trash")).unwrap().count(), 0);
    assert!(upper_of(&mounts_before).join("data").exists());
}

#[test]
fn start_up_finishes_committed_creates_whose_rename_was_lost() {
    let d = tempfile::tempdir().unwrap();
    {
        let s = open(d.path());
        layer(&s, "base", "");
        s.prepare("c", "base", Labels::new()).unwrap();
        s.view("v", "", Labels::new()).unwrap();
    }
    let snaps = d.path().join("snapshots");
    // Power loss after the record committed: one rename lost, one directory lost entirely.
    fs::rename(snaps.join("2"), snaps.join("new-2")).unwrap();
    fs::remove_dir_all(snaps.join("3")).unwrap();
    let s = open(d.path());
    assert!(snaps.join("2/fs").is_dir() && snaps.join("2/work").is_dir());
    assert!(!snaps.join("new-2").exists());
    assert!(
        snaps.join("3/fs").is_dir(),
        "an empty view layout is recreated"
    );
    assert!(!snaps.join("3/work").exists());
    assert_eq!(s.mounts("c").unwrap()[0].kind, "overlay");
    assert!(
        snaps.join("1/fs/base").is_file(),
        "committed layers are untouched"
    );
}

#[test]
fn a_second_daemon_on_the_same_root_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let _s = open(d.path());
    let err = Snapshotter::open_with(d.path(), FEATURES, Arc::new(NoPersistence)).unwrap_err();
    assert!(matches!(err, SnapshotError::RootInUse { .. }), "{err:?}");
}

#[test]
fn cleanup_removes_only_unreferenced_directories() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    s.prepare("a", "", Labels::new()).unwrap();
    fs::create_dir_all(d.path().join("snapshots/stray/fs")).unwrap();
    s.cleanup().unwrap();
    assert!(d.path().join("snapshots/1/fs").is_dir());
    assert!(!d.path().join("snapshots/stray").exists());
    assert_eq!(fs::read_dir(d.path().join("trash")).unwrap().count(), 0);
}

/// Records hook calls; can fail one hook or claim removed directories.
#[derive(Debug, Default)]
struct Recorder {
    calls: StdMutex<Vec<String>>,
    fail_prepare: bool,
    fail_commit: bool,
    claim_into: Option<PathBuf>,
}

impl PersistenceHooks for Recorder {
    fn on_prepare(&self, e: &SnapshotEvent<'_>) -> Result<()> {
        let parents: Vec<String> = e.parents.iter().map(|p| p.key.to_string()).collect();
        self.calls.lock().unwrap().push(format!(
            "prepare {} {} parents={} upper_exists={} ns={:?}",
            e.key,
            e.kind,
            parents.join(","),
            e.upper.is_dir(),
            e.backend_key.map(|k| k.namespace)
        ));
        if self.fail_prepare {
            return Err(SnapshotError::Unavailable {
                key: e.key.to_string(),
                reason: "store down".into(),
            });
        }
        Ok(())
    }

    fn on_mounts(&self, e: &SnapshotEvent<'_>) -> Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("mounts {} parents={}", e.key, e.parents.len()));
        Ok(())
    }

    fn on_commit(&self, e: &CommitEvent<'_>) -> Result<()> {
        self.calls.lock().unwrap().push(format!(
            "commit {} -> {} active_labels={}",
            e.key,
            e.name,
            e.active_labels.len()
        ));
        if self.fail_commit {
            return Err(SnapshotError::Unavailable {
                key: e.key.to_string(),
                reason: "queue full".into(),
            });
        }
        Ok(())
    }

    fn on_remove(&self, e: &RemoveEvent<'_>) -> Result<RemoveDisposition> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("remove {} {}", e.key, e.kind));
        match &self.claim_into {
            Some(outbox) => {
                fs::rename(e.snapshot_dir, outbox.join(e.key.replace('/', "_"))).unwrap();
                Ok(RemoveDisposition::Claimed)
            }
            None => Ok(RemoveDisposition::Trash),
        }
    }
}

#[test]
fn hooks_see_keys_parents_and_upper_dirs() {
    let d = tempfile::tempdir().unwrap();
    let outbox = d.path().join("outbox");
    fs::create_dir(&outbox).unwrap();
    let rec = Arc::new(Recorder {
        claim_into: Some(outbox.clone()),
        ..Recorder::default()
    });
    let s = Snapshotter::open_with(&d.path().join("root"), FEATURES, rec.clone()).unwrap();
    s.prepare("default/1/l", "", labels(&[("a", "1")])).unwrap();
    s.commit("default/2/sha256:l", "default/1/l", Labels::new())
        .unwrap();
    let m = s
        .prepare("default/3/c1", "default/2/sha256:l", Labels::new())
        .unwrap();
    fs::write(upper_of(&m).join("state"), b"persist me").unwrap();
    s.mounts("default/3/c1").unwrap();
    s.remove("default/3/c1").unwrap();
    assert_eq!(
        *rec.calls.lock().unwrap(),
        vec![
            "prepare default/1/l active parents= upper_exists=true ns=Some(\"default\")",
            "commit default/1/l -> default/2/sha256:l active_labels=1",
            "prepare default/3/c1 active parents=default/2/sha256:l upper_exists=true ns=Some(\"default\")",
            "mounts default/3/c1 parents=1",
            "remove default/3/c1 active",
        ]
    );
    // Claimed: the directory is in the outbox, not in the trash.
    assert_eq!(
        fs::read(outbox.join("default_3_c1/fs/state")).unwrap(),
        b"persist me"
    );
    assert_eq!(
        fs::read_dir(d.path().join("root/trash")).unwrap().count(),
        0
    );
    assert_eq!(
        code(s.stat("default/3/c1").unwrap_err()),
        tonic::Code::NotFound
    );
}

#[test]
fn failing_hooks_roll_back() {
    let d = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recorder {
        fail_prepare: true,
        ..Recorder::default()
    });
    let s = Snapshotter::open_with(d.path(), FEATURES, rec).unwrap();
    let err = s.prepare("a", "", Labels::new()).unwrap_err();
    assert_eq!(code(err), tonic::Code::Unavailable);
    assert_eq!(code(s.stat("a").unwrap_err()), tonic::Code::NotFound);
    assert_eq!(fs::read_dir(d.path().join("snapshots")).unwrap().count(), 0);
    drop(s);

    let d = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recorder {
        fail_commit: true,
        ..Recorder::default()
    });
    let s = Snapshotter::open_with(d.path(), FEATURES, rec).unwrap();
    s.prepare("a", "", Labels::new()).unwrap();
    assert_eq!(
        code(s.commit("c", "a", Labels::new()).unwrap_err()),
        tonic::Code::Unavailable
    );
    assert_eq!(
        s.stat("a").unwrap().kind,
        Kind::Active,
        "the commit was rolled back"
    );
    assert_eq!(code(s.stat("c").unwrap_err()), tonic::Code::NotFound);
}
