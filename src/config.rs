//! Configuration: one TOML file (`/etc/zlayer/storage.toml` by default), strict parsing, env overrides.
//!
//! Every section rejects unknown keys so a typo fails loudly instead of silently using a default.
//! Secrets never come from flags: S3 credentials come from the AWS environment/profile chain or from
//! `secret_access_key_file`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default location of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/zlayer/storage.toml";

/// S3 requires parts of at least 5 MiB (except the last); Garage does not enforce it, so we do.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// S3's upper bound for one part.
pub const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;

/// Errors from loading or validating configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("invalid value {value:?} for {key}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
}

type Result<T> = std::result::Result<T, ConfigError>;

/// Which object store backs the layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// A local directory (the embedded default; also works on NFS).
    #[default]
    Local,
    /// Any S3-compatible service.
    S3,
}

/// When the AWS SDK adds request checksums; some S3-compatible services reject the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ChecksumMode {
    #[default]
    WhenSupported,
    WhenRequired,
}

/// Layer storage settings: the original `LayerStorageConfig` fields plus backend selection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LayerStorageConfig {
    /// Which backend stores objects.
    pub backend: BackendKind,
    /// Root of the local-directory store (backend = "local").
    pub local_store_dir: PathBuf,
    /// S3 bucket name (required for backend = "s3").
    pub bucket: String,
    /// Key prefix for every object, e.g. `layers/`.
    pub prefix: String,
    /// AWS region; defaults to the SDK chain, or `us-east-1` with a custom endpoint.
    pub region: Option<String>,
    /// Custom S3 endpoint (MinIO, R2, B2, Garage, ...).
    pub endpoint_url: Option<String>,
    /// Path-style addressing; defaults to true when `endpoint_url` is set.
    pub force_path_style: Option<bool>,
    /// Static access key id; otherwise the AWS credential chain (env, profile, IMDS) is used.
    pub access_key_id: Option<String>,
    /// File holding the secret access key (never put the secret itself in the config).
    pub secret_access_key_file: Option<PathBuf>,
    /// Server-side encryption: `AES256` or `aws:kms`.
    pub sse: Option<String>,
    /// KMS key id when `sse = "aws:kms"`.
    pub sse_kms_key_id: Option<String>,
    /// Request checksum policy of the SDK.
    pub checksum_calculation: ChecksumMode,
    /// Local spool/staging directory for archives in flight.
    pub staging_dir: PathBuf,
    /// SQLite state database.
    pub state_db_path: PathBuf,
    /// Multipart part size in bytes (≥ 5 MiB).
    pub part_size_bytes: u64,
    /// Parts in flight per upload.
    pub max_concurrent_uploads: usize,
    /// zstd level (1-22).
    pub compression_level: i32,
    /// zstd worker threads (≥ 1; the output bytes are identical for any value ≥ 1).
    pub compression_workers: u32,
    /// Incomplete multipart uploads older than this are aborted by `gc`.
    pub abort_stale_uploads_after_secs: u64,
    /// Largest uncompressed archive a restore accepts (zstd-bomb guard).
    pub max_restore_bytes: u64,
    /// Largest uncompressed/compressed ratio a restore accepts (zstd-bomb guard).
    pub max_expansion_ratio: u64,
    /// Retries for transient S3 failures.
    pub max_retries: u32,
}

impl Default for LayerStorageConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::Local,
            local_store_dir: PathBuf::from("/var/lib/zlayer/store"),
            bucket: String::new(),
            prefix: "layers/".to_string(),
            region: None,
            endpoint_url: None,
            force_path_style: None,
            access_key_id: None,
            secret_access_key_file: None,
            sse: None,
            sse_kms_key_id: None,
            checksum_calculation: ChecksumMode::WhenSupported,
            staging_dir: PathBuf::from("/var/lib/zlayer/staging"),
            state_db_path: PathBuf::from("/var/lib/zlayer/layer-state.sqlite"),
            part_size_bytes: 64 * 1024 * 1024,
            max_concurrent_uploads: 4,
            compression_level: 3,
            compression_workers: 2,
            abort_stale_uploads_after_secs: 2 * 24 * 3600,
            max_restore_bytes: 256 * 1024 * 1024 * 1024,
            max_expansion_ratio: 2000,
            max_retries: 8,
        }
    }
}

impl LayerStorageConfig {
    /// Checks ranges and cross-field rules; names the offending key.
    pub fn validate(&self) -> Result<()> {
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&self.part_size_bytes) {
            return Err(invalid(
                "part_size_bytes",
                self.part_size_bytes,
                "must be between 5 MiB and 5 GiB",
            ));
        }
        if self.max_concurrent_uploads == 0 {
            return Err(invalid("max_concurrent_uploads", 0, "must be at least 1"));
        }
        if !(1..=22).contains(&self.compression_level) {
            return Err(invalid(
                "compression_level",
                self.compression_level,
                "must be between 1 and 22",
            ));
        }
        if self.compression_workers == 0 {
            return Err(invalid(
                "compression_workers",
                0,
                "must be at least 1 (0 selects zstd's single-thread mode, which produces different bytes)",
            ));
        }
        if self.backend == BackendKind::S3 && self.bucket.is_empty() {
            return Err(invalid("bucket", "", "required when backend = \"s3\""));
        }
        if let Some(sse) = &self.sse
            && sse != "AES256"
            && sse != "aws:kms"
        {
            return Err(invalid("sse", sse, "must be \"AES256\" or \"aws:kms\""));
        }
        if self.max_expansion_ratio == 0 {
            return Err(invalid("max_expansion_ratio", 0, "must be at least 1"));
        }
        Ok(())
    }

    /// Applies `ZLAYER_STORAGE_<FIELD>` overrides (upper-case field names).
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<()> {
        let get = |k: &str| env(&format!("ZLAYER_STORAGE_{k}"));
        if let Some(v) = get("BACKEND") {
            self.backend = match v.as_str() {
                "local" => BackendKind::Local,
                "s3" => BackendKind::S3,
                _ => return Err(invalid("ZLAYER_STORAGE_BACKEND", v, "must be local or s3")),
            };
        }
        if let Some(v) = get("LOCAL_STORE_DIR") {
            self.local_store_dir = v.into();
        }
        if let Some(v) = get("BUCKET") {
            self.bucket = v;
        }
        if let Some(v) = get("PREFIX") {
            self.prefix = v;
        }
        if let Some(v) = get("REGION") {
            self.region = Some(v);
        }
        if let Some(v) = get("ENDPOINT_URL") {
            self.endpoint_url = Some(v);
        }
        if let Some(v) = get("FORCE_PATH_STYLE") {
            self.force_path_style = Some(parse_env("ZLAYER_STORAGE_FORCE_PATH_STYLE", &v)?);
        }
        if let Some(v) = get("STAGING_DIR") {
            self.staging_dir = v.into();
        }
        if let Some(v) = get("STATE_DB_PATH") {
            self.state_db_path = v.into();
        }
        if let Some(v) = get("PART_SIZE_BYTES") {
            self.part_size_bytes = parse_env("ZLAYER_STORAGE_PART_SIZE_BYTES", &v)?;
        }
        if let Some(v) = get("MAX_CONCURRENT_UPLOADS") {
            self.max_concurrent_uploads = parse_env("ZLAYER_STORAGE_MAX_CONCURRENT_UPLOADS", &v)?;
        }
        if let Some(v) = get("COMPRESSION_LEVEL") {
            self.compression_level = parse_env("ZLAYER_STORAGE_COMPRESSION_LEVEL", &v)?;
        }
        Ok(())
    }

    /// Path-style addressing actually used (custom endpoints rarely have wildcard DNS).
    #[must_use]
    pub fn path_style(&self) -> bool {
        self.force_path_style.unwrap_or(self.endpoint_url.is_some())
    }
}

/// Which container snapshots get persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PersistPolicy {
    /// Only snapshots with an explicit `zlayer.id` (snapshot label or container label).
    #[default]
    Labeled,
    /// Labeled ones plus containers with a name (`nerdctl/name`).
    Named,
    /// Every container snapshot; unlabeled ones are keyed `<namespace>/<container id>`.
    All,
}

/// What to do when a restored layer was recorded on a different base (parent chain).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnBaseChange {
    /// Restore anyway (the layer is a diff; it applies over any base), and log it.
    #[default]
    Restore,
    /// Start with an empty upper dir, and log it.
    Skip,
    /// Refuse the Prepare/Mounts.
    Fail,
}

/// Proxy snapshotter settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotterConfig {
    /// Snapshot directories, metadata and the outbox live here.
    pub root: PathBuf,
    /// Unix socket containerd dials (`[proxy_plugins.zlayer] address`).
    pub socket: PathBuf,
    /// containerd's socket, for container-label lookups and events.
    pub containerd_address: PathBuf,
    /// What gets persisted.
    pub persist: PersistPolicy,
    /// Behaviour when a layer's recorded base differs from the new container's base.
    pub on_base_change: OnBaseChange,
    /// How long Mounts waits for a container's layer to be restored before failing
    /// (`Unavailable`; the restore goes on and a retried Mounts waits for the same one).
    pub restore_timeout_secs: u64,
    /// Ask containerd for container labels (`zlayer.id`, nerdctl names). `false` for
    /// deployments that name identities only with snapshot labels: containerd is never asked,
    /// so its reachability does not matter.
    pub container_lookup: bool,
}

impl SnapshotterConfig {
    /// Checks ranges and cross-field rules; names the offending key.
    pub fn validate(&self) -> Result<()> {
        if self.restore_timeout_secs == 0 {
            return Err(invalid("restore_timeout_secs", 0, "must be at least 1"));
        }
        if !self.container_lookup && self.persist == PersistPolicy::Named {
            return Err(invalid(
                "container_lookup",
                false,
                "persist = \"named\" needs container names, which only containerd can tell",
            ));
        }
        Ok(())
    }
}

impl Default for SnapshotterConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/var/lib/zlayer-storage"),
            socket: PathBuf::from("/run/zlayer-storage/snapshotter.sock"),
            containerd_address: PathBuf::from("/run/containerd/containerd.sock"),
            persist: PersistPolicy::Labeled,
            on_base_change: OnBaseChange::Restore,
            restore_timeout_secs: 600,
            container_lookup: true,
        }
    }
}

/// Log output settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Emit JSON lines instead of text.
    pub json: bool,
    /// `tracing` filter, e.g. `info,zlayer_storage=debug`; `RUST_LOG` wins.
    pub filter: Option<String>,
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub storage: LayerStorageConfig,
    pub snapshotter: SnapshotterConfig,
    pub log: LogConfig,
}

impl Config {
    /// Parses TOML text; `path` is only used in error messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Loads `path`; a missing file is only accepted when it is the default path (built-in defaults).
    pub fn load(path: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let mut cfg = match std::fs::read_to_string(&path) {
            Ok(text) => Self::from_toml(&text, &path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Self::default(),
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        cfg.storage.apply_env(env)?;
        cfg.storage.validate()?;
        cfg.snapshotter.validate()?;
        Ok(cfg)
    }
}

fn invalid(key: &'static str, value: impl ToString, reason: &'static str) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        reason,
    }
}

fn parse_env<T: std::str::FromStr>(key: &'static str, v: &str) -> Result<T> {
    v.parse()
        .map_err(|_| invalid(key, v, "cannot be parsed as the expected type"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_original_design() {
        let c = LayerStorageConfig::default();
        assert_eq!(c.prefix, "layers/");
        assert_eq!(c.part_size_bytes, 64 * 1024 * 1024);
        assert_eq!(c.max_concurrent_uploads, 4);
        assert_eq!(c.compression_level, 3);
        assert_eq!(c.staging_dir, PathBuf::from("/var/lib/zlayer/staging"));
        assert_eq!(
            c.state_db_path,
            PathBuf::from("/var/lib/zlayer/layer-state.sqlite")
        );
        c.validate().unwrap();
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let err =
            Config::from_toml("[storage]\nbukket = \"x\"\n", Path::new("/x.toml")).unwrap_err();
        let chain = format!("{:?}", err);
        assert!(chain.contains("bukket"), "{chain}");
    }

    #[test]
    fn small_part_size_is_rejected() {
        let cfg =
            Config::from_toml("[storage]\npart_size_bytes = 1024\n", Path::new("/x.toml")).unwrap();
        let err = cfg.storage.validate().unwrap_err();
        assert!(err.to_string().contains("part_size_bytes"));
    }

    #[test]
    fn s3_needs_bucket() {
        let cfg = Config::from_toml("[storage]\nbackend = \"s3\"\n", Path::new("/x.toml")).unwrap();
        assert!(
            cfg.storage
                .validate()
                .unwrap_err()
                .to_string()
                .contains("bucket")
        );
    }

    #[test]
    fn env_overrides_apply_and_bad_values_name_the_variable() {
        let mut c = LayerStorageConfig::default();
        c.apply_env(&|k| match k {
            "ZLAYER_STORAGE_BUCKET" => Some("b".into()),
            "ZLAYER_STORAGE_BACKEND" => Some("s3".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.bucket, "b");
        assert_eq!(c.backend, BackendKind::S3);
        let err = c
            .apply_env(&|k| (k == "ZLAYER_STORAGE_PART_SIZE_BYTES").then(|| "lots".to_string()))
            .unwrap_err();
        assert!(err.to_string().contains("ZLAYER_STORAGE_PART_SIZE_BYTES"));
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/zlayer.toml")), &|_| None).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/zlayer.toml"));
    }
}
