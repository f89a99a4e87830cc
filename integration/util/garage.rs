//! A single-node Garage on loopback, shared by every test of the process.
//!
//! Started once (free ports, data in a temp dir, `server --single-node --default-bucket`), it
//! runs under a small `sh` supervisor whose stdin is a pipe from this process: when the test
//! binary exits, the pipe closes, and the supervisor kills Garage and removes its directory.
//! Each test gets its own key prefix through [`Garage::config`].
//!
//! The binary comes from `$GARAGE_BIN`, `~/.cargo/bin/garage` or `PATH`. Without it a test
//! fails naming it, unless the opt-out is set (see [`super::require`]); then it skips.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use zlayer_storage::config::{BackendKind, LayerStorageConfig, MIN_PART_SIZE};

use super::require::{self, Component};

pub const BUCKET: &str = "zlayer-test";
pub const ACCESS_KEY: &str = "GKzlayertest0001";
const SECRET_KEY: &str = "zlayer-test-secret-key-0123456789";
const REGION: &str = "garage";

/// A running Garage; see the module docs.
#[derive(Debug)]
pub struct Garage {
    endpoint: String,
    secret_file: PathBuf,
    // Keeps the supervisor alive; its EOF is the shutdown signal.
    _supervisor: Mutex<(Child, ChildStdin)>,
}

static GARAGE: OnceLock<Result<Garage, String>> = OnceLock::new();
static PREFIX_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The shared Garage (the test is recorded as a Garage test), or `None` when it is not
/// installed and the opt-out is set; without the opt-out a missing Garage fails the test.
pub fn garage_or_skip(test: &str) -> Option<&'static Garage> {
    let Some(bin) = find_binary() else {
        let _skip = require::missing(
            test,
            "the garage binary ($GARAGE_BIN, ~/.cargo/bin/garage or PATH)",
            "`cargo install garage --version 2.5.0 --locked` (`bash integration/test.sh` does this)",
        );
        return None;
    };
    match GARAGE.get_or_init(|| Garage::start(&bin)) {
        Ok(g) => {
            require::ran(Component::Garage, test);
            Some(g)
        }
        Err(e) => panic!("{test}: cannot start garage: {e}"),
    }
}

fn find_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GARAGE_BIN") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/garage"));
    let path_dirs = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("garage"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    home.into_iter().chain(path_dirs).find(|p| p.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral loopback port")
}

fn random_hex(salt: &str) -> String {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(format!("{:?}", SystemTime::now()).as_bytes());
    hex::encode(h.finalize())
}

impl Garage {
    fn start(bin: &Path) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("zlayer-garage-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?
            .keep();
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let config = format!(
            r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "{token}"
"#,
            d = dir.display(),
            secret = random_hex("rpc"),
            token = random_hex("admin"),
        );
        let cfg_path = dir.join("garage.toml");
        std::fs::write(&cfg_path, config).map_err(|e| format!("write config: {e}"))?;
        let secret_file = dir.join("secret-key");
        std::fs::write(&secret_file, format!("{SECRET_KEY}\n"))
            .map_err(|e| format!("write secret: {e}"))?;
        // The store refuses a secret file readable by group or others.
        let private = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600);
        std::fs::set_permissions(&secret_file, private)
            .map_err(|e| format!("chmod secret: {e}"))?;
        let log = dir.join("garage.log");
        // The supervisor: start garage, wait for EOF on stdin, then kill it and clean up.
        let script = r#"
            "$GARAGE" -c "$DIR/garage.toml" server --single-node --default-bucket >"$DIR/garage.log" 2>&1 &
            pid=$!
            cat >/dev/null
            kill -9 "$pid" 2>/dev/null
            wait "$pid" 2>/dev/null
            rm -rf "$DIR"
        "#;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("GARAGE", bin)
            .env("DIR", &dir)
            .env("GARAGE_DEFAULT_ACCESS_KEY", ACCESS_KEY)
            .env("GARAGE_DEFAULT_SECRET_KEY", SECRET_KEY)
            .env("GARAGE_DEFAULT_BUCKET", BUCKET)
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn supervisor: {e}"))?;
        let stdin = child.stdin.take().ok_or("supervisor has no stdin")?;
        let garage = Self {
            endpoint: format!("http://127.0.0.1:{s3}"),
            secret_file,
            _supervisor: Mutex::new((child, stdin)),
        };
        if let Err(e) = garage.wait_ready(s3) {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: String = tail.lines().rev().take(30).collect::<Vec<_>>().join("\n");
            return Err(format!("{e}; garage log (last lines, reversed):\n{tail}"));
        }
        Ok(garage)
    }

    /// Waits until the port accepts connections and a real write/list through the SDK works
    /// (the single-node layout and default bucket are created asynchronously at startup).
    fn wait_ready(&self, port: u16) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("s3 port never opened".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let cfg = self.config("ready-probe");
        let probe = std::thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let mut last = String::new();
                while Instant::now() < deadline {
                    let attempt = async {
                        let store = zlayer_storage::store::S3Store::open(&cfg)
                            .await
                            .map_err(|e| format!("{e:#}"))?;
                        let client = store.client();
                        client
                            .put_object()
                            .bucket(BUCKET)
                            .key("ready-probe/x")
                            .body(b"x".to_vec().into())
                            .send()
                            .await
                            .map_err(|e| {
                                format!("{}", aws_sdk_s3::error::DisplayErrorContext(e))
                            })?;
                        client
                            .delete_object()
                            .bucket(BUCKET)
                            .key("ready-probe/x")
                            .send()
                            .await
                            .map_err(|e| {
                                format!("{}", aws_sdk_s3::error::DisplayErrorContext(e))
                            })?;
                        Ok::<_, String>(())
                    };
                    match attempt.await {
                        Ok(()) => return Ok(()),
                        Err(e) => last = e,
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(format!("s3 api not ready: {last}"))
            })
        });
        probe
            .join()
            .map_err(|_| "readiness probe panicked".to_string())?
    }

    #[must_use]
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// An s3 store config for this Garage with a fresh prefix `{test}-{n}-{nanos}/`.
    #[must_use]
    pub fn config(&self, test: &str) -> LayerStorageConfig {
        self.config_via(test, &self.endpoint)
    }

    /// Like [`Garage::config`] but talking to `endpoint` (e.g. a fault-injecting proxy).
    #[must_use]
    pub fn config_via(&self, test: &str, endpoint: &str) -> LayerStorageConfig {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = PREFIX_COUNTER.fetch_add(1, Ordering::Relaxed);
        LayerStorageConfig {
            backend: BackendKind::S3,
            bucket: BUCKET.to_string(),
            prefix: format!("{test}-{n}-{nanos}/"),
            region: Some(REGION.to_string()),
            endpoint_url: Some(endpoint.to_string()),
            force_path_style: Some(true),
            access_key_id: Some(ACCESS_KEY.to_string()),
            secret_access_key_file: Some(self.secret_file.clone()),
            part_size_bytes: MIN_PART_SIZE,
            max_concurrent_uploads: 4,
            max_retries: 4,
            ..LayerStorageConfig::default()
        }
    }
}
