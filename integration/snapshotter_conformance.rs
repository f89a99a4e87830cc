//! The snapshotter daemon against containerd's own snapshotter test suite (Go, over the socket)
//! and against our generated gRPC client: error codes, List batching, restart, socket handling.
//!
//! Needs root (the suite mounts overlays) and Go with Debian's containerd sources
//! (`golang-github-containerd-containerd-dev`). A missing piece fails the test naming it, unless
//! the opt-out is set (see `util::require`).

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tonic::Code;
use tonic::transport::Channel;
use zlayer_storage::proto::snapshots as pb;
use zlayer_storage::proto::snapshots::snapshots_client::SnapshotsClient;

use crate::util::require::{self, Component};

const BIN: &str = env!("CARGO_BIN_EXE_zlayer-storage");
const GOCODE: &str = "/usr/share/gocode/src/github.com/containerd/containerd/snapshots/testsuite";

/// Root, Go and containerd's Go sources for the suite (recorded as a conformance test).
fn require_go_suite(test: &str) -> bool {
    if !is_root() {
        return require::missing(test, "root", require::INSTALL_ROOT);
    }
    if !have_go_suite() {
        return require::missing(
            test,
            "go and containerd's Go sources",
            "`apt-get install golang-go golang-github-containerd-containerd-dev` \
             (`bash integration/test.sh` does this)",
        );
    }
    require::ran(Component::Conformance, test);
    true
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn have_go_suite() -> bool {
    Path::new(GOCODE).is_dir()
        && Command::new("go")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
}

/// Builds the Go test binaries once per test process, under cargo's per-target scratch dir
/// (rebuilt every run, so they always match the sources); returns their directory.
fn go_binaries() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-testsuite");
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/go-testsuite/build.sh");
        let status = Command::new("sh").arg(&script).arg(&out).status().unwrap();
        assert!(status.success(), "{} failed", script.display());
        out
    })
}

/// Result of one `-test.v` run of a top-level Go test.
#[derive(Debug)]
struct GoRun {
    passed: Vec<String>,
    skipped: Vec<String>,
    failed: Vec<String>,
    success: bool,
    output: String,
}

fn run_go_suite(test: &str) -> GoRun {
    let out = Command::new(go_binaries().join("suite.test"))
        .args([
            "-test.v",
            "-test.run",
            &format!("^{test}$"),
            "-test.timeout",
            "10m",
        ])
        .env("ZLAYER_STORAGE_BIN", BIN)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let collect = |verdict: &str| -> Vec<String> {
        let prefix = format!("--- {verdict}: {test}/");
        output
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix(&prefix))
            .map(|rest| {
                rest.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    };
    GoRun {
        passed: collect("PASS"),
        skipped: collect("SKIP"),
        failed: collect("FAIL"),
        success: out.status.success(),
        output,
    }
}

fn assert_full_pass(run: &GoRun) {
    let tail: String = run
        .output
        .lines()
        .rev()
        .take(80)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        run.failed.is_empty(),
        "failed subtests {:?}\n{tail}",
        run.failed
    );
    assert!(run.success, "go suite failed\n{tail}");
    assert_eq!(run.passed.len(), 20, "passed: {:?}\n{tail}", run.passed);
    assert_eq!(run.skipped, vec!["Rename".to_string()], "{tail}");
}

#[test]
fn containerd_testsuite_passes_against_the_daemon() {
    if !require_go_suite("containerd_testsuite_passes_against_the_daemon") {
        return;
    }
    assert_full_pass(&run_go_suite("TestZlayer"));
}

#[test]
fn containerd_testsuite_baseline_overlay_passes_through_the_same_proxy() {
    // The reference the benchmark compares against must itself be conformant through the harness.
    if !require_go_suite("containerd_testsuite_baseline_overlay_passes_through_the_same_proxy") {
        return;
    }
    assert_full_pass(&run_go_suite("TestOverlayBaseline"));
}

/// A `zlayer-storage snapshotter` process on a private root and socket.
struct Daemon {
    child: Child,
    root: PathBuf,
    socket: PathBuf,
}

impl Daemon {
    fn start(dir: &Path) -> Self {
        let config = dir.join("zlayer.toml");
        // The layer store, staging dir and state DB (opened for persistence) stay inside dir.
        // No containerd runs here: identities come only from snapshot labels, or every Mounts
        // of a container-like key would fail closed on the lookup.
        let storage = format!(
            "[storage]\nlocal_store_dir = {:?}\nstaging_dir = {:?}\nstate_db_path = {:?}\n\
             [snapshotter]\ncontainer_lookup = false\ncontrol_socket = {:?}\n",
            dir.join("store"),
            dir.join("staging"),
            dir.join("state.sqlite"),
            dir.join("run/control.sock")
        );
        std::fs::write(&config, storage).unwrap();
        let root = dir.join("root");
        let socket = dir.join("run/snapshotter.sock");
        let child = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .arg("snapshotter")
            .arg("--root")
            .arg(&root)
            .arg("--socket")
            .arg(&socket)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut d = Self {
            child,
            root,
            socket,
        };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("snapshotter exited early: {status}");
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("snapshotter did not listen on {}", self.socket.display());
    }

    /// SIGTERM and wait; returns the exit code.
    fn terminate(&mut self) -> Option<i32> {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "snapshotter ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    async fn client(&self) -> SnapshotsClient<Channel> {
        crate::util::containerd::snapshots_client(&self.socket).await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prepare_req(key: &str, parent: &str) -> pb::PrepareSnapshotRequest {
    pb::PrepareSnapshotRequest {
        snapshotter: "zlayer".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    }
}

fn commit_req(name: &str, key: &str) -> pb::CommitSnapshotRequest {
    pb::CommitSnapshotRequest {
        snapshotter: "zlayer".into(),
        name: name.into(),
        key: key.into(),
        labels: HashMap::new(),
    }
}

/// The status code of a call expected to fail.
fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    r.unwrap_err().code()
}

async fn list(
    c: &mut SnapshotsClient<Channel>,
    filters: &[&str],
) -> Result<Vec<Vec<pb::Info>>, tonic::Status> {
    let mut stream = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "zlayer".into(),
            filters: filters.iter().map(|s| s.to_string()).collect(),
        })
        .await?
        .into_inner();
    let mut batches = Vec::new();
    while let Some(batch) = stream.message().await? {
        batches.push(batch.info);
    }
    Ok(batches)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_answers_with_containerd_codes_and_batches_list() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let mut c = daemon.client().await;

    let m = c
        .prepare(prepare_req("default/1/base", ""))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m.len(), 1);
    assert_eq!(
        (m[0].r#type.as_str(), m[0].options.clone()),
        ("bind", vec!["rw".to_string(), "rbind".to_string()])
    );
    assert_eq!(
        m[0].source,
        daemon.root.join("snapshots/1/fs").display().to_string()
    );
    c.commit(commit_req("default/2/sha256:base", "default/1/base"))
        .await
        .unwrap();
    c.prepare(prepare_req("default/3/c1", "default/2/sha256:base"))
        .await
        .unwrap();

    assert_eq!(
        code(c.prepare(prepare_req("default/3/c1", "")).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.prepare(prepare_req("x", "missing")).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.prepare(prepare_req("x", "default/3/c1")).await),
        Code::InvalidArgument
    );
    let remove = |key: &str| pb::RemoveSnapshotRequest {
        snapshotter: "zlayer".into(),
        key: key.into(),
    };
    let err = c.remove(remove("default/2/sha256:base")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("remove"), "{}", err.message());
    assert_eq!(
        code(c.commit(commit_req("n", "default/2/sha256:base")).await),
        Code::FailedPrecondition
    );
    let mounts = |key: &str| pb::MountsRequest {
        snapshotter: "zlayer".into(),
        key: key.into(),
    };
    assert_eq!(
        code(c.mounts(mounts("default/2/sha256:base")).await),
        Code::FailedPrecondition
    );
    assert_eq!(code(c.mounts(mounts("nope")).await), Code::NotFound);
    let bad_update = pb::UpdateSnapshotRequest {
        snapshotter: "zlayer".into(),
        info: Some(pb::Info {
            name: "default/3/c1".into(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["parent".into()],
        }),
    };
    assert_eq!(code(c.update(bad_update).await), Code::InvalidArgument);
    assert_eq!(
        list(&mut c, &["kind=="]).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // Stat and List agree, with real kinds.
    let listed: Vec<pb::Info> = list(&mut c, &[]).await.unwrap().concat();
    assert_eq!(listed.len(), 2);
    for info in &listed {
        let stat = c
            .stat(pb::StatSnapshotRequest {
                snapshotter: "zlayer".into(),
                key: info.name.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(&stat, info);
        assert_ne!(stat.kind, pb::Kind::Unknown as i32);
    }

    // List streams in batches of 100.
    for i in 0..230 {
        c.prepare(prepare_req(&format!("default/{}/bulk{i}", i + 10), ""))
            .await
            .unwrap();
    }
    let sizes: Vec<usize> = list(&mut c, &[])
        .await
        .unwrap()
        .iter()
        .map(Vec::len)
        .collect();
    assert_eq!(sizes, vec![100, 100, 32]);
    let filtered = list(&mut c, &["name~=bulk1[0-9]$", "kind==committed"])
        .await
        .unwrap()
        .concat();
    assert_eq!(filtered.len(), 11);

    let usage = c
        .usage(pb::UsageRequest {
            snapshotter: "zlayer".into(),
            key: "default/3/c1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(usage.inodes, 1);
    c.cleanup(pb::CleanupRequest {
        snapshotter: "zlayer".into(),
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_every_mount_and_replaces_a_stale_socket() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(dir.path());
    let meta = std::fs::metadata(&daemon.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    let mut c = daemon.client().await;
    let m = c
        .prepare(prepare_req("default/1/l", ""))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    std::fs::write(Path::new(&m[0].source).join("file"), b"layer").unwrap();
    c.commit(commit_req("default/2/sha256:l", "default/1/l"))
        .await
        .unwrap();
    let before = c
        .prepare(prepare_req("default/3/c1", "default/2/sha256:l"))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    drop(c);

    assert_eq!(daemon.terminate(), Some(0), "clean exit on SIGTERM");
    assert!(
        daemon.root.join("snapshots/1/fs/file").is_file(),
        "state survives shutdown"
    );
    assert!(daemon.root.join("metadata.db").is_file());

    // A socket file left behind by a crash must not stop the next start.
    drop(std::os::unix::net::UnixListener::bind(&daemon.socket).unwrap());
    assert!(daemon.socket.exists());
    let daemon2 = Daemon::start(dir.path());
    let mut c = daemon2.client().await;
    let after = c
        .mounts(pb::MountsRequest {
            snapshotter: "zlayer".into(),
            key: "default/3/c1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(after, before);
    assert_eq!(list(&mut c, &[]).await.unwrap().concat().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_socket_is_not_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let _daemon = Daemon::start(dir.path());
    // Same socket, other root: the second daemon must refuse rather than steal the socket.
    let config = dir.path().join("zlayer.toml");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args(["snapshotter", "--root"])
        .arg(dir.path().join("root2"))
        .arg("--socket")
        .arg(dir.path().join("run/snapshotter.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another process is serving"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_upper_dirs_take_the_parents_owner() {
    if !require::root("new_upper_dirs_take_the_parents_owner") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let mut c = daemon.client().await;
    let m = c
        .prepare(prepare_req("default/1/l", ""))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    std::os::unix::fs::chown(&m[0].source, Some(1234), Some(2345)).unwrap();
    c.commit(commit_req("default/2/sha256:l", "default/1/l"))
        .await
        .unwrap();
    let m = c
        .prepare(prepare_req("default/3/c", "default/2/sha256:l"))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let upper = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .unwrap();
    let meta = std::fs::metadata(upper).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1234, 2345));
}
