//! A private containerd 1.6 per test, wired to a private `zlayer-storage snapshotter`.
//!
//! Everything lives in one temp dir: containerd's root, state, sockets and config, and the
//! snapshotter's root, state DB, staging dir and config. Each containerd uses its own namespace,
//! so runc's state (`/run/containerd/runc/<ns>`) and cgroups never collide with another test's or
//! the host's containerd; shim sockets are keyed by our socket path. Drop kills tasks, containerd,
//! leftover shims, and unmounts whatever is still mounted under the temp dir.

mod activation;
mod client;
mod procs;
mod snapshotter;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use activation::inherit_from_fd3;
pub use client::snapshots_client;
pub use procs::{mounts_under, unmount_under, wait_until};
pub use snapshotter::{
    SnapshotterDaemon, SnapshotterOptions, store_keys, tail, uploads_in_progress,
};

use super::image::{IMAGE_BASE, busybox_archive};
use super::require::{self, Component};

/// Name of the proxy plugin in containerd's config (`--snapshotter zlayer`).
pub const SNAPSHOTTER: &str = "zlayer";
/// containerd's built-in overlay snapshotter (the baseline).
pub const OVERLAYFS: &str = "overlayfs";
/// The snapshot label that carries a container's persistent identity.
pub const ID_LABEL: &str = "containerd.io/snapshot/zlayer.id";

/// Whether the machine can run these tests (recorded as a containerd test); a missing piece
/// fails the test naming it, unless the opt-out is set (see [`super::require`]).
pub fn require_containerd() -> bool {
    let mut missing = Vec::new();
    if !rustix::process::geteuid().is_root() {
        missing.push("root".to_string());
    }
    for bin in [
        "/usr/bin/containerd",
        "/usr/bin/ctr",
        "/usr/bin/containerd-shim-runc-v2",
        "/usr/bin/umoci",
    ] {
        if !Path::new(bin).exists() {
            missing.push(bin.to_string());
        }
    }
    if !Path::new("/usr/sbin/runc").exists() && !Path::new("/usr/bin/runc").exists() {
        missing.push("runc".to_string());
    }
    if !Path::new("/bin/busybox").exists() {
        missing.push("/bin/busybox (busybox-static)".to_string());
    }
    if !fs::read_to_string("/proc/filesystems").is_ok_and(|f| f.contains("overlay")) {
        missing.push("overlay filesystem".to_string());
    }
    if missing.is_empty() {
        require::ran(Component::Containerd, "containerd-e2e");
        return true;
    }
    require::missing(
        "containerd-e2e",
        &missing.join(", "),
        "as root, `apt-get install containerd runc umoci busybox-static` on a kernel with \
         overlayfs (`bash integration/test.sh` does this)",
    )
}

/// A unique containerd namespace per fixture in this process.
fn fresh_namespace() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "zl{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A private containerd daemon.
#[derive(Debug)]
pub struct Containerd {
    dir: PathBuf,
    address: PathBuf,
    namespace: String,
    config_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

impl Containerd {
    /// Writes a config under `dir` (root, state, sockets; CRI off; `[proxy_plugins.zlayer]` at
    /// `proxy_socket`) and starts containerd; returns once `ctr version` answers.
    pub fn start(dir: &Path, proxy_socket: &Path) -> Self {
        fs::create_dir_all(dir).expect("create containerd dir");
        let address = dir.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{address}.ttrpc"

[debug]
  address = "{dir}/debug.sock"
  level = "info"

[metrics]
  address = ""

[proxy_plugins.{SNAPSHOTTER}]
  type = "snapshot"
  address = "{proxy}"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            address = address.display(),
            dir = dir.display(),
            proxy = proxy_socket.display(),
        );
        let config_path = dir.join("config.toml");
        fs::write(&config_path, config).expect("write containerd config");
        let mut c = Self {
            dir: dir.to_path_buf(),
            address,
            namespace: fresh_namespace(),
            config_path,
            log_path: dir.join("containerd.log"),
            child: None,
        };
        c.spawn();
        c
    }

    /// Starts the daemon on the existing config (after [`Containerd::stop`]).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "containerd already running");
        let (out, err) = snapshotter::log_file(&self.log_path);
        let child = Command::new("/usr/bin/containerd")
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start /usr/bin/containerd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                panic!("containerd exited during startup: {status}\n{}", self.log());
            }
            if self.ctr(&["version"]).status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containerd not ready after 30 s\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills every task, stops containerd, kills leftover shims and unmounts leftovers.
    pub fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        let tasks = self.ctr(&["tasks", "ls", "-q"]);
        for id in String::from_utf8_lossy(&tasks.stdout).split_whitespace() {
            let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
            let _ = self.ctr(&["tasks", "rm", "-f", id]);
        }
        if let Some(mut child) = self.child.take() {
            procs::stop_child(&mut child, Duration::from_secs(10));
        }
        procs::kill_shims_of(&self.address);
        unmount_under(&self.dir);
        let runc_state = Path::new("/run/containerd/runc").join(&self.namespace);
        let _ = fs::remove_dir_all(runc_state);
    }

    /// SIGKILLs the containerd process alone: its shims and tasks live on, as when containerd
    /// crashes; [`Containerd::spawn`] starts it again on the same state.
    pub fn kill_daemon(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Removes containerd's root and state (after [`Containerd::stop`]): a node that lost its disk.
    pub fn wipe(&mut self) {
        assert!(self.child.is_none(), "stop containerd before wiping it");
        for d in ["root", "state"] {
            let p = self.dir.join(d);
            if p.exists() {
                fs::remove_dir_all(&p).unwrap_or_else(|e| panic!("wipe {}: {e}", p.display()));
            }
        }
    }

    /// `ctr --address <ours> -n <ours> ARGS`, killed after 180 s.
    /// The containerd namespace this fixture's containers live in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .args(["-k", "5", "180", "/usr/bin/ctr", "--address"])
            .arg(&self.address)
            .args(["--namespace", &self.namespace])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    /// Like [`Containerd::ctr`] but asserts success; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Imports the busybox test image and unpacks it into `snapshotter`.
    pub fn import_image(&self, snapshotter: &str) {
        let archive = busybox_archive().to_string_lossy().into_owned();
        self.ctr_ok(&[
            "images",
            "import",
            "--base-name",
            IMAGE_BASE,
            "--snapshotter",
            snapshotter,
            &archive,
        ]);
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- containerd log ({}) ---\n{}",
                self.log_path.display(),
                tail(&self.log(), 80)
            );
            snapshotter::keep_log(&self.log_path, "containerd");
        }
        self.stop();
    }
}

/// One node: a snapshotter and a containerd that uses it, in one temp dir.
#[derive(Debug)]
pub struct Node {
    // Field order is drop order: containerd (and its shims/mounts) before the snapshotter.
    pub containerd: Containerd,
    pub snapshotter: SnapshotterDaemon,
    dir: tempfile::TempDir,
}

impl Node {
    /// Starts the snapshotter, then containerd (the documented start order), and imports the
    /// test image into both `zlayer` and `overlayfs`.
    pub fn start(options: SnapshotterOptions) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("zl-node-")
            .tempdir()
            .expect("node temp dir");
        let socket = dir.path().join("zlayer.sock");
        let containerd_dir = dir.path().join("containerd");
        let snapshotter = SnapshotterDaemon::start(
            &dir.path().join("snapshotter"),
            &socket,
            &containerd_dir.join("containerd.sock"),
            options,
        );
        let containerd = Containerd::start(&containerd_dir, &socket);
        let node = Self {
            containerd,
            snapshotter,
            dir,
        };
        node.containerd.import_image(SNAPSHOTTER);
        node.containerd.import_image(OVERLAYFS);
        node
    }

    /// Node loss: stop everything, wipe the snapshotter's root, state DB and staging dir and
    /// containerd's root and state, then start both fresh (same store) and import the image again.
    pub fn lose_disk_and_restart(&mut self) {
        self.containerd.stop();
        self.wipe_and_start_fresh();
    }

    /// Wipes both daemons' disks (both stopped) and starts them fresh with the image imported.
    fn wipe_and_start_fresh(&mut self) {
        self.snapshotter.wipe();
        self.containerd.wipe();
        self.snapshotter.spawn();
        self.containerd.spawn();
        self.containerd.import_image(SNAPSHOTTER);
        self.containerd.import_image(OVERLAYFS);
    }
}

impl Node {
    /// Sudden node loss: SIGKILL the snapshotter, containerd, its shims and every process whose
    /// command line holds `marker` (the containers), with nothing stopped first; then unmount,
    /// wipe both daemons' disks and start both fresh (same store), as on a replacement node.
    pub fn crash_and_lose_disk(&mut self, marker: &str) {
        self.snapshotter.kill9();
        self.containerd.kill_daemon();
        procs::kill_shims_of(&self.containerd.address);
        let victims: Vec<u32> = procs::processes()
            .into_iter()
            .filter(|p| p.argv.iter().any(|a| a.contains(marker)))
            .map(|p| p.pid)
            .collect();
        for pid in &victims {
            // A container the dead snapshotter left frozen would hold its SIGKILL pending.
            thaw_cgroup_of(*pid);
            procs::signal(*pid, rustix::process::Signal::KILL);
        }
        wait_until(
            "the killed containers to exit",
            Duration::from_secs(30),
            || {
                victims
                    .iter()
                    .all(|p| !Path::new(&format!("/proc/{p}")).exists())
            },
        );
        unmount_under(self.dir.path());
        let runc_state = Path::new("/run/containerd/runc").join(&self.containerd.namespace);
        let _ = fs::remove_dir_all(runc_state);
        self.wipe_and_start_fresh();
    }
}

/// The freezer cgroup dir of `pid` (v1 `freezer` line, else the v2 path under the cgroup2
/// mount), if it is not the root.
pub fn freezer_of(pid: u32) -> Option<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if path == "/" {
            continue;
        }
        let rel = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "freezer") {
            return Some(Path::new("/sys/fs/cgroup/freezer").join(rel));
        }
        if controllers.is_empty() {
            for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
                let dir = Path::new(root).join(rel);
                if dir.join("cgroup.freeze").exists() {
                    return Some(dir);
                }
            }
        }
    }
    None
}

/// Whether the freezer cgroup `dir` is frozen (v1 `freezer.state`, v2 `cgroup.freeze`).
pub fn cgroup_frozen(dir: &Path) -> bool {
    fs::read_to_string(dir.join("freezer.state"))
        .map(|s| s.trim() != "THAWED")
        .or_else(|_| fs::read_to_string(dir.join("cgroup.freeze")).map(|s| s.trim() == "1"))
        .unwrap_or(false)
}

fn thaw_cgroup_of(pid: u32) {
    if let Some(dir) = freezer_of(pid) {
        let _ = fs::write(dir.join("freezer.state"), "THAWED");
        let _ = fs::write(dir.join("cgroup.freeze"), "0");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.containerd.stop();
        self.snapshotter.stop();
        unmount_under(self.dir.path());
    }
}
