//! The `zlayer-storage snapshotter` daemon as a test fixture: generated config, kill -9, restart
//! on the same directories, wipe (node loss), and a view of what reached the object store.

use std::fs::{self, File, OpenOptions};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use zlayer_storage::config::{
    BackendKind, Config, LayerStorageConfig, OnBaseChange, PersistPolicy,
};

use super::activation::Activation;
use super::procs::{signal, stop_child};

/// The binary under test: cargo's build for this test run, or `$ZLAYER_STORAGE_BIN` (e.g. a
/// release build) when set.
pub fn bin() -> PathBuf {
    std::env::var_os("ZLAYER_STORAGE_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_zlayer-storage")),
        PathBuf::from,
    )
}

/// Every object key (S3, under the configured prefix) or relative file path (local) in the store.
pub fn store_keys(storage: &LayerStorageConfig) -> Vec<String> {
    match storage.backend {
        BackendKind::Local => {
            let mut out = Vec::new();
            walk_files(&storage.local_store_dir, &storage.local_store_dir, &mut out);
            out.sort();
            out
        }
        BackendKind::S3 => {
            let client = s3_client(storage);
            block_on(async {
                let mut keys = Vec::new();
                let mut pages = client
                    .list_objects_v2()
                    .bucket(&storage.bucket)
                    .prefix(&storage.prefix)
                    .into_paginator()
                    .send();
                while let Some(page) = pages.next().await {
                    let page = page.expect("list objects in the test bucket");
                    keys.extend(
                        page.contents()
                            .iter()
                            .filter_map(|o| o.key().map(str::to_string)),
                    );
                }
                keys.sort();
                keys
            })
        }
    }
}

/// Multipart uploads in progress under the store's prefix: (key, parts uploaded so far).
pub fn uploads_in_progress(storage: &LayerStorageConfig) -> Vec<(String, usize)> {
    assert_eq!(
        storage.backend,
        BackendKind::S3,
        "multipart uploads exist only in S3"
    );
    let client = s3_client(storage);
    block_on(async {
        let listed = client
            .list_multipart_uploads()
            .bucket(&storage.bucket)
            .prefix(&storage.prefix)
            .send()
            .await
            .expect("list multipart uploads");
        let mut out = Vec::new();
        for upload in listed.uploads() {
            let (Some(key), Some(id)) = (upload.key(), upload.upload_id()) else {
                continue;
            };
            // The upload may complete between the two calls; then it no longer counts.
            if let Ok(parts) = client
                .list_parts()
                .bucket(&storage.bucket)
                .key(key)
                .upload_id(id)
                .send()
                .await
            {
                out.push((key.to_string(), parts.parts().len()));
            }
        }
        out
    })
}

fn walk_files(base: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk_files(base, &p, out);
        } else if let Ok(rel) = p.strip_prefix(base) {
            out.push(rel.to_string_lossy().into_owned());
        }
    }
}

fn s3_client(storage: &LayerStorageConfig) -> aws_sdk_s3::Client {
    use aws_sdk_s3::config::{BehaviorVersion, Builder, Credentials, Region};
    let secret_file = storage
        .secret_access_key_file
        .as_ref()
        .expect("test S3 config has a secret file");
    let secret = fs::read_to_string(secret_file).expect("read S3 secret file");
    let conf = Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(
            storage
                .endpoint_url
                .as_deref()
                .expect("test S3 config has an endpoint"),
        )
        .region(Region::new(
            storage
                .region
                .clone()
                .unwrap_or_else(|| "us-east-1".to_string()),
        ))
        .credentials_provider(Credentials::new(
            storage
                .access_key_id
                .as_deref()
                .expect("test S3 config has a key id"),
            secret.trim(),
            None,
            None,
            "zlayer-e2e",
        ))
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

/// File name of a daemon's control socket in its directory.
const CONTROL_SOCKET_FILE: &str = "control.sock";

/// Settings of one snapshotter daemon.
#[derive(Debug, Clone)]
pub struct SnapshotterOptions {
    /// The store; `staging_dir` and `state_db_path` are replaced by paths in the daemon's dir.
    pub storage: LayerStorageConfig,
    pub persist: PersistPolicy,
    pub on_base_change: OnBaseChange,
    /// Extra `[snapshotter]` keys written verbatim into both configs (daemon and CLI), e.g.
    /// `restore_timeout_secs` or `container_lookup`.
    pub snapshotter_extra: toml::Table,
    /// `[snapshotter] containerd_address` to write instead of the node's real containerd socket
    /// (e.g. a path where nothing listens).
    pub containerd_address: Option<PathBuf>,
    /// `[metrics] address` (daemon config only); `None` = no endpoint.
    pub metrics_address: Option<String>,
    /// Socket-activate the daemon: the fixture holds the socket (see [`Activation`]).
    pub socket_activation: bool,
}

impl SnapshotterOptions {
    /// Defaults of the shipped config (policy `labeled`) on the given store.
    pub fn new(storage: LayerStorageConfig) -> Self {
        Self {
            storage,
            persist: PersistPolicy::default(),
            on_base_change: OnBaseChange::default(),
            snapshotter_extra: toml::Table::new(),
            containerd_address: None,
            metrics_address: None,
            socket_activation: false,
        }
    }

    /// Adds a `[snapshotter]` key that [`Config`] may not know (yet); see `snapshotter_extra`.
    #[must_use]
    pub fn with_snapshotter_key(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        self.snapshotter_extra.insert(key.to_string(), value.into());
        self
    }

    /// Points the daemon at `address` instead of the node's containerd.
    #[must_use]
    pub fn with_containerd_address(mut self, address: &Path) -> Self {
        self.containerd_address = Some(address.to_path_buf());
        self
    }

    /// Serves metrics on `address` (`ip:port`).
    #[must_use]
    pub fn with_metrics_address(mut self, address: &str) -> Self {
        self.metrics_address = Some(address.to_string());
        self
    }

    /// Starts the daemon the way systemd's socket units do (see [`Activation`]).
    #[must_use]
    pub fn with_socket_activation(mut self) -> Self {
        self.socket_activation = true;
        self
    }

    /// A local-directory store at `dir`, with 5 MiB parts.
    pub fn local(dir: &Path) -> Self {
        let storage = LayerStorageConfig {
            backend: BackendKind::Local,
            local_store_dir: dir.to_path_buf(),
            part_size_bytes: zlayer_storage::config::MIN_PART_SIZE,
            ..LayerStorageConfig::default()
        };
        Self::new(storage)
    }
}

/// A running (or stopped) `zlayer-storage snapshotter` with all its state under one directory.
#[derive(Debug)]
pub struct SnapshotterDaemon {
    dir: PathBuf,
    socket: PathBuf,
    config_path: PathBuf,
    cli_config_path: PathBuf,
    log_path: PathBuf,
    options: SnapshotterOptions,
    child: Option<Child>,
    /// The held socket and received notifications, when socket-activated.
    pub activation: Option<Activation>,
}

impl SnapshotterDaemon {
    /// Writes the config under `dir` and starts the daemon; returns once the socket accepts.
    pub fn start(
        dir: &Path,
        socket: &Path,
        containerd_address: &Path,
        options: SnapshotterOptions,
    ) -> Self {
        fs::create_dir_all(dir).expect("create snapshotter dir");
        let mut daemon = Self {
            dir: dir.to_path_buf(),
            socket: socket.to_path_buf(),
            config_path: dir.join("storage.toml"),
            cli_config_path: dir.join("cli.toml"),
            log_path: dir.join("snapshotter.log"),
            activation: options
                .socket_activation
                .then(|| Activation::bind(socket, &dir.join(CONTROL_SOCKET_FILE), dir)),
            options,
            child: None,
        };
        daemon.write_configs(containerd_address);
        daemon.spawn();
        daemon
    }

    fn write_configs(&self, containerd_address: &Path) {
        let mut cfg = Config {
            storage: self.options.storage.clone(),
            ..Config::default()
        };
        let s = &mut cfg.storage;
        s.staging_dir = self.staging_dir();
        s.state_db_path = self.state_db_path();
        cfg.snapshotter.root = self.root();
        cfg.snapshotter.socket = self.socket.clone();
        // Never the default /run/zlayer-storage/control.sock: two test daemons would collide.
        cfg.snapshotter.control_socket = self.control_socket();
        cfg.snapshotter.containerd_address = self
            .options
            .containerd_address
            .clone()
            .unwrap_or_else(|| containerd_address.to_path_buf());
        cfg.snapshotter.persist = self.options.persist;
        cfg.snapshotter.on_base_change = self.options.on_base_change;
        cfg.metrics.address = self.options.metrics_address.clone();
        fs::write(&self.config_path, self.config_text(&cfg)).expect("write config");
        cfg.metrics.address = None;

        // The CLI gets its own state DB and staging dir so it never contends with the daemon.
        cfg.storage.staging_dir = self.dir.join("cli-staging");
        cfg.storage.state_db_path = self.dir.join("cli-state.sqlite");
        fs::write(&self.cli_config_path, self.config_text(&cfg)).expect("write cli config");
    }

    /// `cfg` as TOML, with [`SnapshotterOptions::snapshotter_extra`] merged into `[snapshotter]`.
    fn config_text(&self, cfg: &Config) -> String {
        let mut table = toml::Table::try_from(cfg).expect("config as a TOML table");
        let section = table
            .entry("snapshotter")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("[snapshotter] is a table");
        for (key, value) in &self.options.snapshotter_extra {
            section.insert(key.clone(), value.clone());
        }
        toml::to_string(&table).expect("serialize config")
    }

    /// Starts the daemon process on the existing config and waits for its socket.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "snapshotter already running");
        let (out, err) = log_file(&self.log_path);
        let bin = bin();
        let args = [
            "--config".as_ref(),
            self.config_path.as_os_str(),
            "snapshotter".as_ref(),
        ];
        let mut cmd = match self.activation.as_mut() {
            Some(a) => {
                a.drain();
                a.command(&bin, &args)
            }
            None => {
                let mut c = Command::new(&bin);
                c.args(args);
                c
            }
        };
        let child = cmd
            .env("RUST_LOG", "info,zlayer_storage=debug")
            .env("NO_COLOR", "1")
            .env_remove("ZLAYER_CONFIG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(30));
    }

    fn wait_ready(&mut self, timeout: Duration) {
        if let Some(mut activation) = self.activation.take() {
            // The held socket accepts connections before the daemon serves: wait for READY=1.
            let log_path = self.log_path.clone();
            let child = self.child.as_mut().expect("snapshotter spawned");
            activation.wait_ready(child, timeout, || {
                fs::read_to_string(&log_path).unwrap_or_default()
            });
            self.activation = Some(activation);
            return;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                panic!(
                    "snapshotter exited during startup: {status}\n{}",
                    self.log()
                );
            }
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "snapshotter socket not ready after {timeout:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, no chance to clean up (the crash case).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), Signal::KILL);
            let _ = child.wait();
        }
    }

    /// Graceful stop (SIGTERM, SIGKILL after 10 s).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(10));
        }
    }

    /// Stops the daemon and removes its root, state DB and staging dir: a node that lost its disk.
    pub fn wipe(&mut self) {
        self.kill9();
        for dir in [
            self.root(),
            self.staging_dir(),
            self.dir.join("cli-staging"),
        ] {
            if dir.exists() {
                fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("wipe {}: {e}", dir.display()));
            }
        }
        for db in [self.state_db_path(), self.dir.join("cli-state.sqlite")] {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let _ = fs::remove_file(format!("{}{suffix}", db.display()));
            }
        }
    }

    /// Snapshotter root (`[snapshotter] root`).
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// State database path (`[storage] state_db_path`).
    pub fn state_db_path(&self) -> PathBuf {
        self.dir.join("state.sqlite")
    }

    /// Staging dir (`[storage] staging_dir`).
    pub fn staging_dir(&self) -> PathBuf {
        self.dir.join("staging")
    }

    /// Download spools of restores in progress (`restore*` in the staging dir's `tmp/`): a
    /// restore from the store is running while one exists.
    pub fn restore_spools(&self) -> Vec<PathBuf> {
        fs::read_dir(self.staging_dir().join("tmp"))
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("restore"))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How many restores from the store finished so far (the manager's "layer restored" line).
    pub fn restores_finished(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("layer restored"))
            .count()
    }

    /// The socket containerd dials.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The config the CLI runs with ([`SnapshotterDaemon::cli`]).
    pub fn cli_config_path(&self) -> PathBuf {
        self.cli_config_path.clone()
    }

    /// The control socket (flush, status; the hook's protocol).
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join(CONTROL_SOCKET_FILE)
    }

    /// Everything the daemon logged so far (across restarts).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The log lines containing any of `needles`, for failure messages.
    pub fn log_lines_with(&self, needles: &[&str]) -> String {
        self.log()
            .lines()
            .filter(|l| needles.iter().any(|n| l.contains(n)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Runs the CLI (`zlayer-storage --config <cli config> ARGS`) against the same store with a
    /// private state DB, e.g. `restore --id web/0 DIR` to prove a layer is durable.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .args(["-k", "5", "300"])
            .arg(bin())
            .arg("--config")
            .arg(&self.cli_config_path)
            .args(args)
            .env_remove("ZLAYER_CONFIG")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin().display()))
    }
}

impl Drop for SnapshotterDaemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- snapshotter log ({}) ---\n{}",
                self.log_path.display(),
                tail(&self.log(), 200)
            );
            keep_log(&self.log_path, "snapshotter");
        }
        self.stop();
    }
}

/// Environment variable naming a directory where the full daemon logs of a failing test are
/// copied (the fixtures' temp dirs, logs included, are deleted when the test ends).
pub const KEEP_LOGS_ENV: &str = "ZLAYER_E2E_KEEP_LOGS";

/// Copies `log` into `$ZLAYER_E2E_KEEP_LOGS` (when set) as `<test>-<pid>-<n>-<what>.log` and
/// says where; for rare failures whose log would otherwise be gone with the temp dir.
pub fn keep_log(log: &Path, what: &str) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let Some(dir) = std::env::var_os(KEEP_LOGS_ENV).map(PathBuf::from) else {
        return;
    };
    let test: String = std::thread::current()
        .name()
        .unwrap_or("test")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dest = dir.join(format!("{test}-{}-{n}-{what}.log", std::process::id()));
    match fs::create_dir_all(&dir).and_then(|()| fs::copy(log, &dest)) {
        Ok(_) => eprintln!("--- full {what} log kept at {} ---", dest.display()),
        Err(e) => eprintln!(
            "--- cannot keep the {what} log in {}: {e} ---",
            dir.display()
        ),
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Opens (creating) a log file for a child's stdout and stderr.
pub fn log_file(path: &Path) -> (File, File) {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open log file");
    (f.try_clone().expect("dup log"), f)
}
