//! The poststop hook end to end: runc runs it from `runc delete`, the real daemon flushes the
//! container's zlayer snapshot, and the layer is in the store (Garage) when the delete returns.
//! With the daemon down the delete still succeeds.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::containerd_e2e::garage_storage;
use crate::hook::MountGuard;
use crate::util::containerd::{
    Containerd, ID_LABEL, Node, SNAPSHOTTER, SnapshotterOptions, require_containerd, wait_until,
};
use crate::util::image::IMAGE_REF;

const BIN: &str = env!("CARGO_BIN_EXE_zlayer-storage");

/// A runc container whose rootfs is a zlayer snapshot with an identity, mounted the way the
/// runc shim mounts it (`<bundle>/rootfs`), and whose spec runs our poststop hook.
struct HookedContainer {
    id: String,
    runc_root: PathBuf,
    bundle: PathBuf,
    _rootfs: MountGuard,
}

impl HookedContainer {
    fn new(c: &Containerd, dir: &Path, id: &str, identity: &str, hook_args: &[&str]) -> Self {
        // containerd's layout, so the hook also derives a namespace.
        let bundle = dir.join("io.containerd.runtime.v2.task/default").join(id);
        let rootfs = bundle.join("rootfs");
        std::fs::create_dir_all(&rootfs).unwrap();
        // The snapshot (key = container id) carries the identity label, as with `ctr run`.
        let label = format!("{ID_LABEL}={identity}");
        c.ctr_ok(&[
            "containers",
            "create",
            "--snapshotter",
            SNAPSHOTTER,
            "--snapshotter-label",
            &label,
            IMAGE_REF,
            id,
        ]);
        let mount = c.ctr_ok(&[
            "snapshots",
            "--snapshotter",
            SNAPSHOTTER,
            "mounts",
            rootfs.to_str().unwrap(),
            id,
        ]);
        run_ok(Command::new("sh").arg("-c").arg(mount.trim()));
        let guard = MountGuard(rootfs);

        let runc_root = dir.join("runc");
        run_ok(
            Command::new("runc")
                .arg("spec")
                .arg("--bundle")
                .arg(&bundle),
        );
        let config = bundle.join("config.json");
        let mut spec: Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
        spec["process"]["terminal"] = json!(false);
        spec["process"]["args"] = json!(["/bin/sh", "-c", "echo durable > /hook.txt"]);
        spec["process"]["env"] = json!(["PATH=/bin"]);
        spec["root"] = json!({"path": "rootfs", "readonly": false});
        spec["linux"]["cgroupsPath"] = json!(format!("/zlayer-hook-test/{id}"));
        let mut args = vec![json!("zlayer-storage")];
        args.extend(hook_args.iter().map(|a| json!(a)));
        // No `env`: like runc under a shim, the hook may get nearly nothing.
        spec["hooks"] = json!({"poststop": [{"path": BIN, "args": args, "timeout": 60}]});
        std::fs::write(&config, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
        Self {
            id: id.to_string(),
            runc_root,
            bundle,
            _rootfs: guard,
        }
    }

    fn runc(&self) -> Command {
        let mut cmd = Command::new("runc");
        cmd.arg("--root").arg(&self.runc_root);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// `runc run -d`, then waits for the process to exit.
    fn run_to_exit(&self) {
        run_ok(
            self.runc()
                .args(["run", "-d", "--bundle"])
                .arg(&self.bundle)
                .arg(&self.id)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        wait_until(
            &format!("container {} to exit", self.id),
            Duration::from_secs(30),
            || {
                let out = self.runc().args(["state", &self.id]).output().unwrap();
                serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|s| s["status"] == "stopped")
            },
        );
    }

    /// `runc delete` (which runs the poststop hook) and how long it took.
    fn delete(&self) -> (Output, Duration) {
        let started = Instant::now();
        let out = self.runc().args(["delete", &self.id]).output().unwrap();
        (out, started.elapsed())
    }
}

impl Drop for HookedContainer {
    fn drop(&mut self) {
        let _ = self.runc().args(["delete", "--force", &self.id]).output();
    }
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn runc_delete_returns_with_the_layer_durable_and_survives_a_dead_daemon() {
    if !require_containerd() {
        return;
    }
    let Some(storage) = garage_storage("hook_runc") else {
        return;
    };
    let mut node = Node::start(SnapshotterOptions::new(storage));
    let control = node.snapshotter.control_socket();
    let control = control.to_str().unwrap();
    let dir = tempfile::Builder::new()
        .prefix("zl-hook-")
        .tempdir()
        .unwrap();
    let pid = std::process::id();
    // Unique container ids and identities per test process; the hook waits up to 30 s.
    let hooked = |n: char| {
        let identity = format!("hook{pid}/{n}");
        let container = HookedContainer::new(
            &node.containerd,
            dir.path(),
            &format!("hk{pid}{n}"),
            &identity,
            &["hook", "poststop", "--wait", "30", "--socket", control],
        );
        container.run_to_exit();
        (container, identity)
    };

    // Daemon up, --wait: the layer is in the store when `runc delete` returns.
    let (waited, identity1) = hooked('a');
    let (out, took) = waited.delete();
    assert!(
        out.status.success(),
        "runc delete failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = dir.path().join("restored");
    let cli = node
        .snapshotter
        .cli(&["restore", "--id", &identity1, restored.to_str().unwrap()]);
    assert!(
        cli.status.success(),
        "the layer of {identity1} is not in the store right after runc delete ({took:?}): {}\n{}",
        String::from_utf8_lossy(&cli.stderr),
        node.snapshotter.log_lines_with(&["flush", "hook"])
    );
    assert_eq!(
        std::fs::read_to_string(restored.join("hook.txt")).unwrap(),
        "durable\n"
    );
    drop(waited);

    // Daemon down: the delete still succeeds, at once.
    let (orphan, _) = hooked('b');
    node.snapshotter.stop();
    let (out, took) = orphan.delete();
    assert!(
        out.status.success(),
        "runc delete failed with the daemon down: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took < Duration::from_secs(5),
        "runc delete waited for a dead daemon: {took:?}"
    );
    drop(orphan);
}
