//! The daemon's Prometheus endpoint (`[metrics] address`), scraped over plain TCP.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tonic::transport::Channel;
use zlayer_storage::config::{BackendKind, Config};
use zlayer_storage::proto::snapshots as pb;
use zlayer_storage::proto::snapshots::snapshots_client::SnapshotsClient;

use crate::util::containerd::{
    ID_LABEL, SNAPSHOTTER, SnapshotterDaemon, SnapshotterOptions, snapshots_client, wait_until,
};

/// A loopback port nothing listens on right now.
fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    l.local_addr().expect("local address")
}

/// One HTTP/1.1 GET of `path`; the whole response (the server closes after one request).
fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to the metrics endpoint {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("read the response to GET {path} from {addr}: {e}"));
    out
}

/// The value of the sample `series VALUE` in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn has_sample(text: &str, series: &str) -> bool {
    sample(text, series).is_some()
}

/// The body of `GET /metrics`.
fn scrape(addr: SocketAddr) -> String {
    let resp = get(addr, "/metrics");
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => body.to_string(),
        _ => panic!("scrape of {addr} failed:\n{resp}"),
    }
}

/// A daemon on a local store with metrics on a free loopback port; its dir (delete it last).
fn start_daemon() -> (tempfile::TempDir, SocketAddr, SnapshotterDaemon) {
    let dir = tempfile::Builder::new()
        .prefix("zl-metrics-")
        .tempdir()
        .unwrap();
    let addr = free_port();
    let options = SnapshotterOptions::local(&dir.path().join("store"))
        .with_snapshotter_key("container_lookup", false)
        .with_metrics_address(&addr.to_string());
    let daemon = SnapshotterDaemon::start(
        &dir.path().join("snapshotter"),
        &dir.path().join("zlayer.sock"),
        &dir.path().join("no-containerd.sock"),
        options,
    );
    (dir, addr, daemon)
}

/// The daemon's Snapshots API, called as containerd would.
struct Snapshots {
    rt: tokio::runtime::Runtime,
    client: SnapshotsClient<Channel>,
}

fn call<T>(what: &str, reply: Result<tonic::Response<T>, tonic::Status>) -> T {
    reply.unwrap_or_else(|e| panic!("{what}: {e}")).into_inner()
}

impl Snapshots {
    fn connect(socket: &Path) -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let client = rt.block_on(snapshots_client(socket));
        Self { rt, client }
    }

    /// An empty committed image layer; its name.
    fn base(&mut self) -> &'static str {
        let (key, name) = ("default/1/extract-1 sha256:base", "default/2/sha256:base");
        let prepare = pb::PrepareSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
            ..Default::default()
        };
        call(
            "prepare base",
            self.rt.block_on(self.client.prepare(prepare)),
        );
        let commit = pb::CommitSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            name: name.into(),
            key: key.into(),
            labels: HashMap::new(),
        };
        call("commit base", self.rt.block_on(self.client.commit(commit)));
        name
    }

    /// Prepares `key` on `parent` for `identity` and waits (Mounts) for its restore; returns
    /// the upper dir.
    fn container(&mut self, key: &str, parent: &str, identity: &str) -> PathBuf {
        let prepare = pb::PrepareSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
            parent: parent.into(),
            labels: HashMap::from([(ID_LABEL.to_string(), identity.to_string())]),
        };
        call(key, self.rt.block_on(self.client.prepare(prepare)));
        let mounts = pb::MountsRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
        };
        let m = call(key, self.rt.block_on(self.client.mounts(mounts))).mounts;
        m.first()
            .and_then(|m| m.options.iter().find_map(|o| o.strip_prefix("upperdir=")))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("no upperdir in the mounts of {key}: {m:?}"))
    }

    fn remove(&mut self, key: &str) {
        let remove = pb::RemoveSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
        };
        call(key, self.rt.block_on(self.client.remove(remove)));
    }
}

#[test]
fn daemon_serves_metrics_counts_bad_hook_lines_and_stops_serving_at_shutdown() {
    let (_dir, addr, mut daemon) = start_daemon();

    let ok = get(addr, "/metrics");
    let (head, body) = ok
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {ok}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    for (name, kind) in [
        ("zlayer_outbox_layers", "gauge"),
        ("zlayer_dead_letter_layers", "gauge"),
        ("zlayer_upload_bytes_total", "counter"),
        ("zlayer_errors_total", "counter"),
    ] {
        assert!(
            body.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} missing:\n{body}"
        );
    }
    assert!(has_sample(body, "zlayer_outbox_layers"), "{body}");
    assert!(
        has_sample(body, r#"zlayer_errors_total{kind="store"}"#),
        "{body}"
    );

    // A malformed hook line on the control socket counts as a hook protocol error.
    let protocol = r#"zlayer_errors_total{kind="hook_protocol"}"#;
    assert_eq!(sample(body, protocol), Some(0.0), "{body}");
    let mut hook = UnixStream::connect(daemon.control_socket()).unwrap();
    hook.write_all(b"{\"v\":9,\"op\":\"flush\"}\n").unwrap();
    let mut answer = String::new();
    hook.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("\"invalid\""), "{answer}");
    assert_eq!(sample(&scrape(addr), protocol), Some(1.0));

    let missing = get(addr, "/");
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let other = get(addr, "/metrics/extra");
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");

    daemon.stop();
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "the endpoint still accepts after the daemon stopped"
    );
    assert!(daemon.log().contains("serving metrics"), "{}", daemon.log());
}

#[test]
fn daemon_refuses_to_start_on_a_busy_metrics_address_and_names_it() {
    let dir = tempfile::Builder::new()
        .prefix("zl-metrics-busy-")
        .tempdir()
        .unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let d = dir.path();
    let mut cfg = Config::default();
    cfg.storage.backend = BackendKind::Local;
    cfg.storage.local_store_dir = d.join("store");
    cfg.storage.staging_dir = d.join("staging");
    cfg.storage.state_db_path = d.join("state.sqlite");
    cfg.snapshotter.root = d.join("root");
    cfg.snapshotter.socket = d.join("zlayer.sock");
    cfg.snapshotter.control_socket = d.join("control.sock");
    cfg.snapshotter.containerd_address = d.join("no-containerd.sock");
    cfg.snapshotter.container_lookup = false;
    cfg.metrics.address = Some(addr.to_string());
    let config = d.join("storage.toml");
    std::fs::write(&config, toml::to_string(&cfg).unwrap()).unwrap();

    let out = Command::new("timeout")
        .args(["-k", "5", "60"])
        .arg(env!("CARGO_BIN_EXE_zlayer-storage"))
        .arg("--config")
        .arg(&config)
        .arg("snapshotter")
        .env_remove("ZLAYER_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("run zlayer-storage snapshotter");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && out.status.code() != Some(124),
        "started (or hung) on a busy metrics address: {:?}\n{stderr}",
        out.status
    );
    assert!(
        stderr.contains(&addr.to_string()),
        "the error does not name {addr}:\n{stderr}"
    );
    assert!(
        !Path::new(&cfg.snapshotter.socket).exists(),
        "the Snapshots socket was created although the start failed"
    );
    drop(taken);
}

/// A removed snapshot's layer goes through the outbox to the store (the worker's sync, the
/// uploaded bytes, the emptied outbox), comes back in the next container (restore from the
/// store, downloaded bytes), and a CLI flush of that one shows as a durable flush.
#[test]
fn remove_restore_and_flush_show_in_the_metrics() {
    let (_dir, addr, daemon) = start_daemon();
    let synced = r#"zlayer_sync_duration_seconds_count{trigger="remove"}"#;
    assert_eq!(sample(&scrape(addr), synced), None, "nothing synced yet");

    let mut snapshots = Snapshots::connect(daemon.socket());
    let base = snapshots.base();
    let upper = snapshots.container("default/3/c1", base, "metrics/0");
    std::fs::write(upper.join("data"), vec![7u8; 64 * 1024]).unwrap();
    snapshots.remove("default/3/c1");

    let mut last = String::new();
    wait_until(
        "the removed layer's sync to show in the metrics",
        Duration::from_secs(60),
        || {
            last = scrape(addr);
            sample(&last, synced) == Some(1.0)
        },
    );
    assert!(
        sample(&last, "zlayer_upload_bytes_total").is_some_and(|b| b > 0.0),
        "{last}"
    );
    assert_eq!(sample(&last, "zlayer_outbox_layers"), Some(0.0), "{last}");
    assert_eq!(
        sample(&last, "zlayer_dead_letter_layers"),
        Some(0.0),
        "{last}"
    );
    assert_eq!(
        sample(&last, r#"zlayer_errors_total{kind="local"}"#),
        Some(0.0),
        "{last}"
    );

    // The next container of the identity restores that layer from the store.
    let restored = r#"zlayer_restore_duration_seconds_count{source="store"}"#;
    assert_eq!(sample(&last, restored), None, "{last}");
    let upper = snapshots.container("default/4/c2", base, "metrics/0");
    assert_eq!(
        std::fs::read(upper.join("data")).unwrap(),
        vec![7u8; 64 * 1024]
    );
    let after = scrape(addr);
    assert_eq!(sample(&after, restored), Some(1.0), "{after}");
    assert!(
        sample(&after, "zlayer_download_bytes_total").is_some_and(|b| b > 0.0),
        "{after}"
    );

    // A CLI flush of the new container's changes (no containerd here to say it stopped).
    std::fs::write(upper.join("more"), b"flushed\n").unwrap();
    let out = daemon.cli(&["flush", "metrics/0", "--wait", "60", "--allow-running"]);
    assert!(
        out.status.success(),
        "flush failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flushed = scrape(addr);
    for (series, want) in [
        (r#"zlayer_flush_requests_total{trigger="cli"}"#, 1.0),
        (
            r#"zlayer_flush_duration_seconds_count{trigger="cli",outcome="durable"}"#,
            1.0,
        ),
        (r#"zlayer_errors_total{kind="flush"}"#, 0.0),
    ] {
        assert_eq!(sample(&flushed, series), Some(want), "{series}:\n{flushed}");
    }
    assert!(
        sample(&flushed, "zlayer_last_successful_flush_timestamp_seconds").is_some_and(|t| t > 0.0),
        "{flushed}"
    );
}
