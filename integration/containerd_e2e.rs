//! End-to-end scenarios with a real containerd 1.6 + runc and `zlayer-storage snapshotter`
//! (issue 3 §3). Each test owns a private containerd, snapshotter and store prefix.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use zlayer_storage::config::LayerStorageConfig;

use crate::util::containerd::{
    Containerd, ID_LABEL, Node, OVERLAYFS, SNAPSHOTTER, SnapshotterOptions, mounts_under,
    require_containerd, store_keys, uploads_in_progress, wait_until,
};
use crate::util::image::IMAGE_REF;

/// Changes a container makes to the image: new files, a changed mode, a symlink, a deleted image
/// file (a whiteout) and an image directory replaced by a new one (an opaque dir).
const WRITE_STATE: &str = "set -e
echo hello > /data/new.txt
chmod 600 /data/new.txt
mkdir -p /srv/app
echo cfg > /srv/app/config
ln -s /data/new.txt /data/link
rm /etc/motd
rm -rf /data/old
mkdir /data/old
echo new > /data/old/n";

/// Prints what [`WRITE_STATE`] changed, for a container that should see exactly that state.
const READ_STATE: &str = "cat /data/new.txt /srv/app/config /data/old/n /data/keep
stat -c %a /data/new.txt
readlink /data/link
ls -A /data/old
if test -e /etc/motd; then echo motd-present; else echo motd-absent; fi";

const EXPECTED_STATE: &str = "hello\ncfg\nnew\nkeep me\n600\n/data/new.txt\nn\nmotd-absent\n";

/// Garage-backed storage under a prefix unique to this test; `None` when Garage is missing and
/// the opt-out is set (see `util::require`).
pub(crate) fn garage_storage(test: &str) -> Option<LayerStorageConfig> {
    crate::util::garage::garage_or_skip(test).map(|g| g.config(test))
}

/// `ctr run` through zlayer, with `identity` as the snapshot label when given.
fn run_args<'a>(
    identity: Option<&'a str>,
    label: &'a mut String,
    rm: bool,
    id: &'a str,
    script: &'a str,
) -> Vec<&'a str> {
    let mut args = vec!["run"];
    if rm {
        args.push("--rm");
    }
    args.extend(["--snapshotter", SNAPSHOTTER]);
    if let Some(identity) = identity {
        *label = format!("{ID_LABEL}={identity}");
        args.extend(["--snapshotter-label", label.as_str()]);
    }
    args.extend([IMAGE_REF, id, "/bin/sh", "-c", script]);
    args
}

pub(crate) fn run_zlayer(
    c: &Containerd,
    identity: Option<&str>,
    rm: bool,
    id: &str,
    script: &str,
) -> String {
    let mut label = String::new();
    c.ctr_ok(&run_args(identity, &mut label, rm, id, script))
}

/// Runs `command` (a shell script) in a container `id` that is kept (not `--rm`), its stdout
/// redirected to a result file `/zl-result-<id>` that is then printed. Returns that file as read from the
/// container's upper dir, and `ctr`'s output. ctr of containerd 1.6 can lose a short-lived
/// task's stdout (`task.Delete` closes the output FIFOs before draining them; fixed upstream by
/// containerd#8643), so the file is the result and what was printed must be a prefix of it.
fn run_kept(
    c: &Containerd,
    identity: Option<&str>,
    id: &str,
    command: &str,
) -> (String, std::process::Output) {
    let file = format!("zl-result-{id}");
    let script = format!("{{ {command}\n}} > /{file} && cat /{file}");
    let mut label = String::new();
    let out = c.ctr(&run_args(identity, &mut label, false, id, &script));
    assert!(
        out.status.success(),
        "ctr run {id} failed:\n{}",
        describe_run(&out)
    );
    let path = upper_dir(c, id).join(&file);
    let result = fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{id} left no {}: {e}\n{}",
            path.display(),
            describe_run(&out)
        )
    });
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        result.starts_with(&*printed),
        "{id} printed something else than it wrote ({result:?}):\n{}",
        describe_run(&out)
    );
    if printed.len() < result.len() {
        eprintln!(
            "note: ctr lost {} of {} bytes of the stdout of {id} (containerd 1.6 FIFO race); using its result file",
            result.len() - printed.len(),
            result.len()
        );
    }
    (result, out)
}

/// `ctr run --rm` through `snapshotter`, with the command's stdout also written to a host dir
/// bind-mounted into the container, which is what is returned: ctr 1.6 can drop a task's
/// stdout (see [`run_kept`]), and a `--rm` container leaves no upper dir to read it from.
pub(crate) fn run_rm(
    c: &Containerd,
    snapshotter: &str,
    identity: Option<&str>,
    id: &str,
    command: &str,
) -> String {
    try_run_rm(c, snapshotter, identity, id, command).unwrap_or_else(|e| panic!("{e}"))
}

/// [`run_rm`], returning a failed run (or one that wrote no result) as its description.
pub(crate) fn try_run_rm(
    c: &Containerd,
    snapshotter: &str,
    identity: Option<&str>,
    id: &str,
    command: &str,
) -> Result<String, String> {
    let out_dir = tempfile::Builder::new()
        .prefix("zl-out-")
        .tempdir()
        .unwrap();
    let mount = format!(
        "type=bind,src={},dst=/zl-out,options=rbind:rw",
        out_dir.path().display()
    );
    let script = format!("{{ {command}\n}} > /zl-out/result && cat /zl-out/result");
    let mut args = vec![
        "run",
        "--rm",
        "--snapshotter",
        snapshotter,
        "--mount",
        &mount,
    ];
    let label = identity.map(|i| format!("{ID_LABEL}={i}"));
    if let Some(label) = &label {
        args.extend(["--snapshotter-label", label.as_str()]);
    }
    args.extend([IMAGE_REF, id, "/bin/sh", "-c", &script]);
    let out = c.ctr(&args);
    if !out.status.success() {
        return Err(format!("ctr run {id} failed:\n{}", describe_run(&out)));
    }
    let result = fs::read_to_string(out_dir.path().join("result"))
        .map_err(|e| format!("{id} wrote no result: {e}\n{}", describe_run(&out)))?;
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        result.starts_with(&*printed),
        "{id} printed something else than it wrote ({result:?}):\n{}",
        describe_run(&out)
    );
    Ok(result)
}

/// A `ctr` run's whole outcome, for failure messages.
pub(crate) fn describe_run(out: &std::process::Output) -> String {
    format!(
        "status: {}\nstdout: {:?}\nstderr: {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The hash in `sha256sum PATH`'s output, which must be exactly `<64 hex>  PATH\n`.
pub(crate) fn sha256sum_line<'a>(output: &'a str, path: &str) -> Option<&'a str> {
    let line = output.strip_suffix('\n')?;
    let (hash, rest) = line.split_once("  ")?;
    (rest == path
        && hash.len() == 64
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(hash)
}

/// The upper dir of an active snapshot, from `ctr snapshots mounts` (layout independent).
pub(crate) fn upper_dir(c: &Containerd, key: &str) -> PathBuf {
    let out = c.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        SNAPSHOTTER,
        "mounts",
        "/mnt",
        key,
    ]);
    let upper = out
        .split([',', ' ', '\n'])
        .find_map(|opt| opt.strip_prefix("upperdir="))
        .unwrap_or_else(|| panic!("no upperdir in mounts of {key}: {out}"));
    PathBuf::from(upper)
}

/// Waits until `identity`'s layer can be restored from the store by a separate CLI process
/// (which proves it is durable there), and returns the restored upper dir.
pub(crate) fn wait_durable(node: &Node, identity: &str, timeout: Duration) -> tempfile::TempDir {
    wait_durable_report(node, identity, timeout).0
}

/// [`wait_durable`], also returning what the CLI printed (the restored digest).
fn wait_durable_report(
    node: &Node,
    identity: &str,
    timeout: Duration,
) -> (tempfile::TempDir, String) {
    let deadline = Instant::now() + timeout;
    loop {
        let dir = tempfile::Builder::new()
            .prefix("zl-restored-")
            .tempdir()
            .unwrap();
        let target = dir.path().join("upper");
        let out = node
            .snapshotter
            .cli(&["restore", "--id", identity, &target.to_string_lossy()]);
        match out.status.code() {
            Some(0) => return (dir, String::from_utf8_lossy(&out.stdout).into_owned()),
            Some(4) => {}
            _ => panic!(
                "restore of {identity} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
        assert!(
            Instant::now() < deadline,
            "{identity} not durable after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub(crate) fn sha256_file(path: &Path) -> String {
    let mut hasher = Sha256::new();
    let mut f = fs::File::open(path).unwrap();
    std::io::copy(&mut f, &mut hasher).unwrap();
    hex::encode(hasher.finalize())
}

/// Checks the restored upper dir holds [`WRITE_STATE`]'s changes in overlay form.
fn assert_restored_upper(upper: &Path) {
    assert_eq!(
        fs::read_to_string(upper.join("data/new.txt")).unwrap(),
        "hello\n"
    );
    assert_eq!(
        fs::read_to_string(upper.join("data/old/n")).unwrap(),
        "new\n"
    );
    let motd = fs::symlink_metadata(upper.join("etc/motd")).unwrap();
    assert!(
        motd.file_type().is_char_device() && motd.rdev() == 0,
        "etc/motd is not a whiteout"
    );
    let mut buf = [0u8; 8];
    let n = rustix::fs::lgetxattr(upper.join("data/old"), "trusted.overlay.opaque", &mut buf)
        .expect("data/old is marked opaque");
    assert_eq!(&buf[..n], b"y");
    // Untouched image files are not part of the layer.
    assert!(!upper.join("data/keep").exists());
}

/// The harness itself, proven on containerd's built-in overlayfs with no snapshotter running
/// (containerd dials proxy plugins lazily, so an absent socket must not matter).
#[test]
fn harness_runs_busybox_on_builtin_overlayfs() {
    if !require_containerd() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("zl-ctd-")
        .tempdir()
        .unwrap();
    let containerd = Containerd::start(
        &dir.path().join("containerd"),
        &dir.path().join("absent.sock"),
    );
    containerd.import_image(OVERLAYFS);
    let out = run_rm(
        &containerd,
        OVERLAYFS,
        None,
        "c1",
        "echo hi; cat /etc/motd /data/old/a",
    );
    assert_eq!(out, "hi\nwelcome to the zlayer test image\nlower a\n");
    assert_eq!(containerd.ctr_ok(&["containers", "ls", "-q"]), "");
    let state = dir.path().join("containerd");
    drop(containerd);
    assert!(mounts_under(&state).is_empty());
}

/// A plain `ctr run --rm` through zlayer: image files readable, writes visible, and the
/// container's snapshot gone from containerd and from the snapshotter's disk afterwards.
#[test]
fn zlayer_runs_busybox() {
    if !require_containerd() {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let node = Node::start(SnapshotterOptions::local(store.path()));
    let out = run_rm(
        &node.containerd,
        SNAPSHOTTER,
        None,
        "c1",
        "cat /etc/motd /data/old/b; echo w > /tmp/w; cat /tmp/w; ls /data/old",
    );
    assert_eq!(out, "welcome to the zlayer test image\nlower b\nw\na\nb\n");
    let snaps = node
        .containerd
        .ctr_ok(&["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]);
    assert_eq!(
        snaps.lines().count(),
        2,
        "only the image layer remains: {snaps}"
    );
    assert!(snaps.contains("Committed"), "{snaps}");
    let dirs = node.snapshotter.root().join("snapshots");
    wait_until(
        "the container's snapshot dir to be cleaned up",
        Duration::from_secs(30),
        || fs::read_dir(&dirs).unwrap().count() == 1,
    );
}

/// Scenario 5: containerd GC (container removal, snapshot removal, image removal) leaves no
/// snapshot directory and nothing in the trash once Cleanup has run.
#[test]
fn gc_leaves_no_stray_dirs() {
    if !require_containerd() {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let node = Node::start(SnapshotterOptions::local(store.path()));
    let c = &node.containerd;
    for i in 0..3 {
        run_zlayer(
            c,
            None,
            true,
            &format!("rm{i}"),
            "echo x > /x; mkdir -p /d/e; echo y > /d/e/f",
        );
    }
    run_zlayer(c, None, false, "kept", "echo x > /x");
    c.ctr_ok(&["containers", "rm", "kept"]);
    c.ctr_ok(&[
        "containers",
        "create",
        "--snapshotter",
        SNAPSHOTTER,
        IMAGE_REF,
        "created",
    ]);
    c.ctr_ok(&["containers", "rm", "created"]);
    // Direct snapshot API use: an active, a view and a committed snapshot on the image layer.
    let listing = c.ctr_ok(&["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]);
    let parent = listing
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    c.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        SNAPSHOTTER,
        "prepare",
        "a1",
        &parent,
    ]);
    c.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        SNAPSHOTTER,
        "view",
        "v1",
        &parent,
    ]);
    c.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        SNAPSHOTTER,
        "commit",
        "a1-committed",
        "a1",
    ]);
    c.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        SNAPSHOTTER,
        "rm",
        "a1-committed",
    ]);
    // ctr 1.6 gives a view no `containerd.io/gc.root` label, so containerd's GC (scheduled by
    // the removals above) may remove it through the snapshotter first; either way it must go.
    let out = c.ctr(&["snapshots", "--snapshotter", SNAPSHOTTER, "rm", "v1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || stderr.contains("snapshot v1 does not exist"),
        "ctr snapshots rm v1 ({}): {stderr}",
        out.status
    );

    let root = node.snapshotter.root();
    let count = |d: &str| fs::read_dir(root.join(d)).map(|r| r.count()).unwrap_or(0);
    wait_until(
        "only the image layer's dir to remain",
        Duration::from_secs(30),
        || count("snapshots") == 1 && count("trash") == 0,
    );

    c.ctr_ok(&["images", "rm", "--sync", IMAGE_REF]);
    wait_until(
        "every snapshot dir and the trash to be empty",
        Duration::from_secs(30),
        || count("snapshots") == 0 && count("trash") == 0,
    );
    let listing = c.ctr_ok(&["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]);
    assert_eq!(listing.lines().count(), 1, "{listing}");
    assert!(mounts_under(&root).is_empty());
}

/// Scenario 4: under the default policy (`labeled`) a container without identity is never
/// persisted: its upper dir goes away with it and nothing reaches the store.
#[test]
fn unlabeled_container_uploads_nothing() {
    if !require_containerd() {
        return;
    }
    let Some(storage) = garage_storage("e2e-unlabeled") else {
        return;
    };
    let node = Node::start(SnapshotterOptions::new(storage.clone()));
    let c = &node.containerd;
    run_zlayer(
        c,
        None,
        false,
        "anon",
        "echo data > /data/new; rm /etc/motd; dd if=/dev/urandom of=/r bs=1M count=6 2>/dev/null",
    );
    let upper = upper_dir(c, "anon");
    assert!(
        upper.join("data/new").exists(),
        "{} holds the writes",
        upper.display()
    );
    c.ctr_ok(&["containers", "rm", "anon"]);
    wait_until(
        "the upper dir to be removed",
        Duration::from_secs(30),
        || !upper.exists(),
    );
    // Give a (wrong) background upload every chance to show up.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(store_keys(&storage), Vec::<String>::new());
    assert_eq!(uploads_in_progress(&storage), Vec::new());
    let outbox = node.snapshotter.root().join("outbox");
    assert!(
        fs::read_dir(&outbox).map(|r| r.count()).unwrap_or(0) == 0,
        "outbox not empty"
    );
}

/// Scenario 1: a container with an identity writes, deletes an image file and makes a directory
/// opaque; after `ctr rm` the layer becomes durable and a new container with the same identity
/// sees exactly that state.
#[test]
fn identity_round_trip() {
    if !require_containerd() {
        return;
    }
    let Some(storage) = garage_storage("e2e-roundtrip") else {
        return;
    };
    let node = Node::start(SnapshotterOptions::new(storage));
    let c = &node.containerd;
    run_zlayer(c, Some("web/0"), false, "c1", WRITE_STATE);
    c.ctr_ok(&["containers", "rm", "c1"]);
    let restored = wait_durable(&node, "web/0", Duration::from_secs(120));
    assert_restored_upper(&restored.path().join("upper"));

    assert_eq!(
        run_kept(c, Some("web/0"), "c2", READ_STATE).0,
        EXPECTED_STATE
    );
    // A different identity starts from the image.
    let other = run_rm(
        c,
        SNAPSHOTTER,
        Some("web/1"),
        "c3",
        "cat /etc/motd; ls -A /data/old",
    );
    assert_eq!(other, "welcome to the zlayer test image\na\nb\n");
}

/// Scenario 2: node loss. The snapshotter root, its state DB and containerd's root are wiped;
/// fresh daemons on the same bucket restore the identity.
#[test]
fn node_loss_restores_identity() {
    if !require_containerd() {
        return;
    }
    let Some(storage) = garage_storage("e2e-nodeloss") else {
        return;
    };
    let mut node = Node::start(SnapshotterOptions::new(storage));
    run_zlayer(&node.containerd, Some("db/0"), false, "c1", WRITE_STATE);
    node.containerd.ctr_ok(&["containers", "rm", "c1"]);
    drop(wait_durable(&node, "db/0", Duration::from_secs(120)));

    node.lose_disk_and_restart();
    let snaps = node
        .containerd
        .ctr_ok(&["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]);
    assert_eq!(
        snaps.lines().count(),
        2,
        "fresh node has only the image layer: {snaps}"
    );
    assert_eq!(
        run_kept(&node.containerd, Some("db/0"), "c1", READ_STATE).0,
        EXPECTED_STATE
    );
}

/// Scenario 3: kill -9 of the snapshotter while the layer uploads after `ctr rm`. containerd
/// keeps working, reconnects by itself once the snapshotter is back, and the upload resumes and
/// completes with the exact bytes.
#[test]
fn kill9_during_upload_resumes() {
    if !require_containerd() {
        return;
    }
    let Some(storage) = garage_storage("e2e-kill9") else {
        return;
    };
    let mut node = Node::start(SnapshotterOptions::new(storage.clone()));
    let (out, _) = run_kept(
        &node.containerd,
        Some("big/0"),
        "c1",
        "dd if=/dev/urandom of=/big bs=1M count=200 2>/dev/null && sha256sum /big",
    );
    let written = sha256sum_line(&out, "/big")
        .unwrap_or_else(|| panic!("c1 wrote {out:?}, not one sha256sum line for /big"))
        .to_string();
    node.containerd.ctr_ok(&["containers", "rm", "c1"]);
    wait_until(
        "a multipart upload with parts sent",
        Duration::from_secs(300),
        || {
            uploads_in_progress(&storage)
                .iter()
                .any(|(_, parts)| *parts >= 1)
        },
    );
    node.snapshotter.kill9();

    // containerd itself is unaffected while the snapshotter is down.
    let alive = run_rm(&node.containerd, OVERLAYFS, None, "t1", "echo alive");
    assert_eq!(alive, "alive\n");

    node.snapshotter.spawn();
    let mut attempt = 0;
    wait_until(
        "containerd to reach the restarted snapshotter",
        Duration::from_secs(30),
        || {
            attempt += 1;
            let id = format!("t2-{attempt}");
            node.containerd
                .ctr(&[
                    "run",
                    "--rm",
                    "--snapshotter",
                    SNAPSHOTTER,
                    IMAGE_REF,
                    &id,
                    "true",
                ])
                .status
                .success()
        },
    );

    let (restored, cli_said) = wait_durable_report(&node, "big/0", Duration::from_secs(600));
    assert_eq!(
        sha256_file(&restored.path().join("upper/big")),
        written,
        "CLI restore: {cli_said}"
    );
    assert_eq!(
        uploads_in_progress(&storage),
        Vec::new(),
        "the interrupted upload was completed"
    );
    let (seen, c2_run) = run_kept(&node.containerd, Some("big/0"), "c2", "sha256sum /big");
    eprintln!(
        "c2's restore: {}",
        node.snapshotter.log_lines_with(&["restored layer from"])
    );
    let seen_hash = sha256sum_line(&seen, "/big");
    if seen_hash != Some(written.as_str()) {
        let upper = upper_dir(&node.containerd, "c2");
        let big = upper.join("big");
        let on_disk = fs::metadata(&big).map_or_else(
            |e| format!("{}: {e}", big.display()),
            |m| format!("{} bytes, sha256 {}", m.len(), sha256_file(&big)),
        );
        panic!(
            "c2 saw {} instead of {written} (c2 wrote {seen:?})\nc2's ctr run:\n{}\n\
             c2's upper /big: {on_disk}\nCLI restore: {cli_said}\nsnapshotter's persistence trail:\n{}",
            if seen_hash.is_some() {
                "another /big"
            } else {
                "no sha256sum line"
            },
            describe_run(&c2_run),
            node.snapshotter.log_lines_with(PERSISTENCE_TRAIL)
        );
    }
}

/// Log messages that tell where an identity's layer went and where a restore got it from.
const PERSISTENCE_TRAIL: &[&str] = &[
    "snapshotter ready",
    "queued removed snapshot",
    "queued committed snapshot",
    "restored layer from",
    "no stored layer yet",
    "not restoring over it",
    "starting from the image",
    "layer synced",
    "layer restored",
    "queued layer done",
    "finished interrupted",
    "finishing interrupted sync",
    "resuming interrupted sync",
    "cleaned up streamed uploads",
    "failed; will retry",
    "re-adopting",
    "dropping it",
];

/// The shipped example config parses with every key known (the parser rejects unknown keys) and
/// passes validation.
#[test]
fn packaged_storage_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/storage.toml");
    let text = fs::read_to_string(&path).unwrap();
    let cfg = zlayer_storage::Config::from_toml(&text, &path).unwrap();
    cfg.storage.validate().unwrap();
    assert_eq!(
        cfg.snapshotter.persist,
        zlayer_storage::config::PersistPolicy::Labeled
    );
    assert_eq!(
        cfg.snapshotter.socket,
        Path::new("/run/zlayer-storage/snapshotter.sock")
    );
    // Every key that has a default is shown (set or commented out) in its section.
    let defaults = toml::Value::try_from(zlayer_storage::Config::default()).unwrap();
    let mut missing = Vec::new();
    for (section, keys) in defaults.as_table().unwrap() {
        let body = text
            .split(&format!("[{section}]\n"))
            .nth(1)
            .unwrap_or_else(|| panic!("no [{section}] in {}", path.display()));
        let body = body.split("\n[").next().unwrap_or_default();
        for key in keys.as_table().unwrap().keys() {
            let shown = body.lines().any(|l| {
                let l = l.trim_start_matches("# ");
                l.starts_with(&format!("{key} ="))
            });
            if !shown {
                missing.push(format!("[{section}] {key}"));
            }
        }
    }
    assert!(missing.is_empty(), "{} lacks {missing:?}", path.display());
}

/// The shipped containerd 1.6/1.7 snippet is accepted by containerd 1.6 and registers the proxy
/// plugin at the socket the example storage config uses.
#[test]
fn packaged_containerd_v2_config_is_accepted() {
    if !require_containerd() {
        return;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/containerd/config-v2.toml");
    let out = std::process::Command::new("/usr/bin/containerd")
        .arg("--config")
        .arg(&path)
        .args(["config", "dump"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(dump.contains("[proxy_plugins.zlayer]"), "{dump}");
    assert!(
        dump.contains(r#"address = "/run/zlayer-storage/snapshotter.sock""#),
        "{dump}"
    );
    assert!(dump.contains(r#"snapshotter = "zlayer""#), "{dump}");
}
