//! `zlayer-storage hook poststop` as runc runs it: the real binary, an empty environment, the
//! OCI state on stdin, and a listener of our own standing in for the daemon's control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::require;

const BIN: &str = env!("CARGO_BIN_EXE_zlayer-storage");

/// Runs the hook with no environment at all (runc may pass none), `stdin` as the state.
fn hook(args: &[&str], stdin: &[u8]) -> (Output, Duration) {
    let mut child = Command::new(BIN)
        .args(args)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (out, started.elapsed())
}

fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Exit 0 and exactly one stderr line, which it returns.
fn one_line_exit_0(out: &Output) -> String {
    let lines = stderr_lines(out);
    assert_eq!(out.status.code(), Some(0), "stderr: {lines:?}");
    assert_eq!(lines.len(), 1, "expected one stderr line: {lines:?}");
    assert!(out.stdout.is_empty());
    lines[0].clone()
}

/// A bundle dir with containerd's layout (`…/io.containerd.runtime.v2.task/<ns>/<id>`).
fn bundle(root: &Path, namespace: &str, id: &str) -> PathBuf {
    let b = root
        .join("io.containerd.runtime.v2.task")
        .join(namespace)
        .join(id);
    std::fs::create_dir_all(b.join("rootfs")).unwrap();
    b
}

fn state(id: &str, bundle: &Path, annotations: Value) -> Vec<u8> {
    // As runc sends it at poststop: no pid.
    serde_json::to_vec(&json!({
        "ociVersion": "1.0.2-dev",
        "id": id,
        "status": "stopped",
        "bundle": bundle,
        "annotations": annotations,
    }))
    .unwrap()
}

/// Stands in for the daemon: accepts one connection, reads the request line, waits `delay`,
/// answers `answer` (nothing if empty) and returns the request line.
fn daemon(socket: &Path, answer: &'static str, delay: Duration) -> JoinHandle<String> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        std::thread::sleep(delay);
        if !answer.is_empty() {
            // The hook may have given up already (timeout tests).
            let _ = writeln!(reader.get_mut(), "{answer}");
        }
        line
    })
}

const QUEUED: &str = r#"{"ok":true,"state":"queued","request_id":3,"identity":"web/0"}"#;

#[test]
fn daemon_absent_exits_0_after_one_line_without_waiting() {
    let t = tempfile::tempdir().unwrap();
    let socket = t.path().join("control.sock");
    let b = bundle(t.path(), "default", "c1");
    let (out, took) = hook(
        &["hook", "poststop", "--socket", socket.to_str().unwrap()],
        &state("c1", &b, json!({})),
    );
    let line = one_line_exit_0(&out);
    assert!(line.contains("default/c1"), "{line}");
    assert!(line.contains(socket.to_str().unwrap()), "{line}");
    assert!(line.contains("cannot reach"), "{line}");
    assert!(
        took < Duration::from_millis(1500),
        "a missing socket must fail at once, not after a timeout: {took:?}"
    );
}

#[test]
fn without_a_config_file_the_default_control_socket_is_used() {
    let t = tempfile::tempdir().unwrap();
    let b = bundle(t.path(), "default", "c1");
    let (out, _) = hook(&["hook", "poststop"], &state("c1", &b, json!({})));
    let line = one_line_exit_0(&out);
    let default_socket = "/run/zlayer-storage/control.sock";
    if !Path::new("/etc/zlayer/storage.toml").exists() && !Path::new(default_socket).exists() {
        assert!(line.contains(default_socket), "{line}");
    }
}

#[test]
fn malformed_invocations_exit_2_naming_the_problem() {
    let t = tempfile::tempdir().unwrap();
    let socket = t.path().join("control.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    let args = ["hook", "poststop", "--socket", socket.to_str().unwrap()];
    let cases: &[(&str, &str)] = &[
        ("", "empty OCI state"),
        ("   \n", "empty OCI state"),
        ("not json", "not valid JSON"),
        (r#"{"id":"c1","bundle":"/b""#, "not valid JSON"),
        (r#"{"bundle":"/run/b"}"#, "`id`"),
        (r#"{"id":"","bundle":"/run/b"}"#, "`id`"),
        (r#"{"id":"c1","status":"stopped"}"#, "`bundle`"),
        (r#"{"id":"c1","bundle":"relative/b"}"#, "absolute"),
    ];
    for (stdin, expected) in cases {
        let (out, _) = hook(&args, stdin.as_bytes());
        let lines = stderr_lines(&out);
        assert_eq!(out.status.code(), Some(2), "{stdin:?}: {lines:?}");
        assert_eq!(lines.len(), 1, "{stdin:?}: {lines:?}");
        assert!(lines[0].contains(expected), "{stdin:?}: {lines:?}");
    }
    let valid = br#"{"id":"c1","bundle":"/run/b"}"#;
    for bad_args in [
        &["hook", "poststop", "--wait", "soon"][..],
        &["hook", "poststop", "--wait", "-1"],
        &["hook", "poststop", "--bogus"],
        &["hook", "prestart"],
        &["hook"],
    ] {
        let (out, _) = hook(bad_args, valid);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{bad_args:?}: {:?}",
            stderr_lines(&out)
        );
        assert!(!out.stderr.is_empty(), "{bad_args:?}");
    }
    assert_eq!(
        listener.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "a malformed invocation reached the daemon"
    );
}

#[test]
fn sends_one_request_line_and_stays_quiet_on_success() {
    let t = tempfile::tempdir().unwrap();
    let socket = t.path().join("control.sock");
    // The socket comes from the config file here (from --socket elsewhere).
    let config = t.path().join("storage.toml");
    std::fs::write(
        &config,
        format!(
            "[snapshotter]\ncontrol_socket = {:?}\n",
            socket.to_str().unwrap()
        ),
    )
    .unwrap();
    let b = bundle(t.path(), "ns1", "c1");
    let server = daemon(&socket, QUEUED, Duration::ZERO);
    let (out, _) = hook(
        &["--config", config.to_str().unwrap(), "hook", "poststop"],
        &state(
            "c1",
            &b,
            json!({"io.kubernetes.cri.container-type": "container"}),
        ),
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", stderr_lines(&out));
    assert!(
        out.stderr.is_empty() && out.stdout.is_empty(),
        "{:?}",
        stderr_lines(&out)
    );
    let line = server.join().unwrap();
    assert!(
        line.ends_with('\n') && line.matches('\n').count() == 1,
        "{line:?}"
    );
    // Nothing mounted at the rootfs: no upper, the daemon resolves by namespace and id.
    let request: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        request,
        json!({"v": 1, "op": "flush", "origin": "hook", "namespace": "ns1",
               "container_id": "c1", "status": "stopped", "wait_ms": 0})
    );
}

#[test]
fn the_upper_dir_comes_from_the_overlay_mounted_at_the_rootfs() {
    if !require::root("the_upper_dir_comes_from_the_overlay_mounted_at_the_rootfs") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    // Spaces make mountinfo escape both the mount point and the upperdir option (\040).
    let base = t.path().join("with space");
    let b = bundle(&base, "default", "c2");
    let (lower, upper, work) = (base.join("lower"), base.join("up per"), base.join("work"));
    for d in [&lower, &upper, &work] {
        std::fs::create_dir_all(d).unwrap();
    }
    let mount = MountGuard::overlay(&lower, &upper, &work, &b.join("rootfs"));
    let socket = t.path().join("control.sock");
    let server = daemon(&socket, QUEUED, Duration::ZERO);
    let (out, _) = hook(
        &["hook", "poststop", "--socket", socket.to_str().unwrap()],
        &state("c2", &b, json!({})),
    );
    drop(mount);
    assert_eq!(out.status.code(), Some(0), "{:?}", stderr_lines(&out));
    let request: Value = serde_json::from_str(&server.join().unwrap()).unwrap();
    assert_eq!(
        request["upper"],
        json!(upper.to_str().unwrap()),
        "{request}"
    );
    assert_eq!(request["namespace"], "default");
    assert_eq!(request["container_id"], "c2");
}

#[test]
fn wait_waits_for_the_durable_answer() {
    let t = tempfile::tempdir().unwrap();
    let socket = t.path().join("control.sock");
    let b = bundle(t.path(), "default", "c3");
    let delay = Duration::from_millis(2500);
    let server = daemon(
        &socket,
        r#"{"ok":true,"state":"durable","request_id":4,"identity":"web/0","digest":"ab12","seq":7}"#,
        delay,
    );
    let (out, took) = hook(
        &[
            "hook",
            "poststop",
            "--wait",
            "5",
            "--socket",
            socket.to_str().unwrap(),
        ],
        &state("c3", &b, json!({})),
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", stderr_lines(&out));
    assert!(out.stderr.is_empty(), "{:?}", stderr_lines(&out));
    // 2.5 s is past the 2 s answer timeout of a hook without --wait.
    assert!(took >= delay, "returned before the answer: {took:?}");
    let request: Value = serde_json::from_str(&server.join().unwrap()).unwrap();
    assert_eq!(request["wait_ms"], 5000);
}

#[test]
fn a_silent_daemon_costs_at_most_the_answer_timeout() {
    let t = tempfile::tempdir().unwrap();
    let socket = t.path().join("control.sock");
    let b = bundle(t.path(), "default", "c4");
    let server = daemon(&socket, "", Duration::from_secs(4));
    let (out, took) = hook(
        &["hook", "poststop", "--socket", socket.to_str().unwrap()],
        &state("c4", &b, json!({})),
    );
    let line = one_line_exit_0(&out);
    assert!(
        line.contains("no answer") && line.contains("2000 ms"),
        "{line}"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(4),
        "{took:?}"
    );
    server.join().unwrap();
}

#[test]
fn error_answers_are_logged_in_one_line_and_exit_0() {
    let t = tempfile::tempdir().unwrap();
    let socket = t.path().join("control.sock");
    let b = bundle(t.path(), "default", "c5");
    let server = daemon(
        &socket,
        r#"{"ok":false,"code":"unavailable","error":"store unreachable"}"#,
        Duration::ZERO,
    );
    let (out, _) = hook(
        &["hook", "poststop", "--socket", socket.to_str().unwrap()],
        &state("c5", &b, json!({})),
    );
    let line = one_line_exit_0(&out);
    assert!(
        line.contains("default/c5")
            && line.contains("unavailable")
            && line.contains("store unreachable"),
        "{line}"
    );
    server.join().unwrap();
}

#[test]
fn pod_sandboxes_are_skipped_without_connecting() {
    let t = tempfile::tempdir().unwrap();
    let socket = t.path().join("control.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    let b = bundle(t.path(), "k8s.io", "pause1");
    let (out, _) = hook(
        &["hook", "poststop", "--socket", socket.to_str().unwrap()],
        &state(
            "pause1",
            &b,
            json!({"io.kubernetes.cri.container-type": "sandbox"}),
        ),
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", stderr_lines(&out));
    assert!(out.stderr.is_empty(), "{:?}", stderr_lines(&out));
    assert_eq!(
        listener.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "the hook connected for a sandbox"
    );
}

/// A mount point, detached on drop.
pub(crate) struct MountGuard(pub(crate) PathBuf);

impl MountGuard {
    /// Mounts an overlay of `lower` with `upper` and `work` at `target`.
    fn overlay(lower: &Path, upper: &Path, work: &Path, target: &Path) -> Self {
        let data = std::ffi::CString::new(format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        ))
        .unwrap();
        rustix::mount::mount(
            "overlay",
            target,
            "overlay",
            rustix::mount::MountFlags::empty(),
            data.as_c_str(),
        )
        .unwrap_or_else(|e| panic!("mount overlay at {}: {e}", target.display()));
        Self(target.to_path_buf())
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}
