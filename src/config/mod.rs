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

mod replicate;
mod snapshotter;
pub use replicate::{DatabaseEntry, ReplicateConfig, default_name, validate_name};
pub use snapshotter::{MetricsConfig, OnBaseChange, PersistPolicy, SnapshotterConfig};

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
    /// Versions of each identity's layer kept (current included); older ones are dropped from
    /// the manifest and their blobs collected by `gc`.
    pub history_keep: usize,
    /// `gc` deletes a blob no manifest references only when it is older than this, so a sync
    /// in flight on another node (blob uploaded, manifest not yet moved) is never hit.
    pub gc_grace_secs: u64,
    /// Deltas a version may sit on before a sync writes a full layer again (0: every sync
    /// writes a full layer). A sync uploads a delta when this node's index of the identity
    /// matches the manifest's current version.
    pub delta_chain_max: usize,
    /// A sync writes a full layer again once a chain's deltas add up to this share (percent)
    /// of its base's compressed size, so a restore never reads much more than a full layer.
    pub delta_max_percent: u64,
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
            history_keep: 5,
            gc_grace_secs: 24 * 3600,
            delta_chain_max: 10,
            delta_max_percent: 50,
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
        if self.history_keep == 0 {
            return Err(invalid(
                "history_keep",
                0,
                "must be at least 1 (the current version)",
            ));
        }
        if self.max_expansion_ratio == 0 {
            return Err(invalid("max_expansion_ratio", 0, "must be at least 1"));
        }
        Ok(())
    }

    /// Path-style addressing actually used (custom endpoints rarely have wildcard DNS).
    #[must_use]
    pub fn path_style(&self) -> bool {
        self.force_path_style.unwrap_or(self.endpoint_url.is_some())
    }
}

/// Declares the `ZLAYER_STORAGE_<KEY>` override of every `[storage]` key and the function that
/// applies them; the variable is the key in upper case (a test checks the list against the
/// struct's fields, so a new key without an override fails it).
macro_rules! storage_env_overrides {
    ($($field:ident => $var:literal),* $(,)?) => {
        /// `(key, variable)` for every `[storage]` key, in declaration order.
        pub const STORAGE_ENV_OVERRIDES: &[(&str, &str)] = &[$((stringify!($field), $var)),*];

        impl LayerStorageConfig {
            /// Applies the `ZLAYER_STORAGE_<KEY>` overrides (see [`STORAGE_ENV_OVERRIDES`]).
            /// An empty value unsets an optional key; a value that does not parse is an error
            /// naming the variable.
            pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<()> {
                $(
                    if let Some(v) = env($var) {
                        self.$field = FromEnv::from_env($var, &v)?;
                    }
                )*
                Ok(())
            }
        }
    };
}

storage_env_overrides! {
    backend => "ZLAYER_STORAGE_BACKEND",
    local_store_dir => "ZLAYER_STORAGE_LOCAL_STORE_DIR",
    bucket => "ZLAYER_STORAGE_BUCKET",
    prefix => "ZLAYER_STORAGE_PREFIX",
    region => "ZLAYER_STORAGE_REGION",
    endpoint_url => "ZLAYER_STORAGE_ENDPOINT_URL",
    force_path_style => "ZLAYER_STORAGE_FORCE_PATH_STYLE",
    access_key_id => "ZLAYER_STORAGE_ACCESS_KEY_ID",
    secret_access_key_file => "ZLAYER_STORAGE_SECRET_ACCESS_KEY_FILE",
    sse => "ZLAYER_STORAGE_SSE",
    sse_kms_key_id => "ZLAYER_STORAGE_SSE_KMS_KEY_ID",
    checksum_calculation => "ZLAYER_STORAGE_CHECKSUM_CALCULATION",
    staging_dir => "ZLAYER_STORAGE_STAGING_DIR",
    state_db_path => "ZLAYER_STORAGE_STATE_DB_PATH",
    part_size_bytes => "ZLAYER_STORAGE_PART_SIZE_BYTES",
    max_concurrent_uploads => "ZLAYER_STORAGE_MAX_CONCURRENT_UPLOADS",
    compression_level => "ZLAYER_STORAGE_COMPRESSION_LEVEL",
    compression_workers => "ZLAYER_STORAGE_COMPRESSION_WORKERS",
    abort_stale_uploads_after_secs => "ZLAYER_STORAGE_ABORT_STALE_UPLOADS_AFTER_SECS",
    max_restore_bytes => "ZLAYER_STORAGE_MAX_RESTORE_BYTES",
    max_expansion_ratio => "ZLAYER_STORAGE_MAX_EXPANSION_RATIO",
    max_retries => "ZLAYER_STORAGE_MAX_RETRIES",
    history_keep => "ZLAYER_STORAGE_HISTORY_KEEP",
    gc_grace_secs => "ZLAYER_STORAGE_GC_GRACE_SECS",
    delta_chain_max => "ZLAYER_STORAGE_DELTA_CHAIN_MAX",
    delta_max_percent => "ZLAYER_STORAGE_DELTA_MAX_PERCENT",
}

/// A `[storage]` value parsed from its environment variable `var`.
trait FromEnv: Sized {
    fn from_env(var: &'static str, v: &str) -> Result<Self>;
}

impl FromEnv for String {
    fn from_env(_: &'static str, v: &str) -> Result<Self> {
        Ok(v.to_string())
    }
}

impl FromEnv for PathBuf {
    fn from_env(_: &'static str, v: &str) -> Result<Self> {
        Ok(v.into())
    }
}

/// Numbers and booleans, by their `FromStr`.
macro_rules! from_env_by_parse {
    ($($t:ty),*) => {$(
        impl FromEnv for $t {
            fn from_env(var: &'static str, v: &str) -> Result<Self> {
                parse_env(var, v)
            }
        }
    )*};
}
from_env_by_parse!(bool, i32, u32, u64, usize);

/// Enums, by the same names as in the file (`"s3"`, `"when_required"`).
macro_rules! from_env_by_serde {
    ($($t:ty => $allowed:literal),*) => {$(
        impl FromEnv for $t {
            fn from_env(var: &'static str, v: &str) -> Result<Self> {
                use serde::de::IntoDeserializer;
                let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
                    v.into_deserializer();
                Self::deserialize(de).map_err(|_| invalid(var, v, $allowed))
            }
        }
    )*};
}
from_env_by_serde!(
    BackendKind => "must be local or s3",
    ChecksumMode => "must be when_supported or when_required"
);

/// Optional keys: an empty value unsets them.
impl<T: FromEnv> FromEnv for Option<T> {
    fn from_env(var: &'static str, v: &str) -> Result<Self> {
        if v.is_empty() {
            Ok(None)
        } else {
            T::from_env(var, v).map(Some)
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
    pub metrics: MetricsConfig,
    pub replicate: ReplicateConfig,
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
        cfg.metrics.validate()?;
        cfg.replicate.validate()?;
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

    /// Every override: the value it is given and the field it must produce (as JSON).
    const OVERRIDE_CASES: &[(&str, &str, &str)] = &[
        ("ZLAYER_STORAGE_BACKEND", "s3", r#""s3""#),
        (
            "ZLAYER_STORAGE_LOCAL_STORE_DIR",
            "/srv/store",
            r#""/srv/store""#,
        ),
        ("ZLAYER_STORAGE_BUCKET", "b", r#""b""#),
        ("ZLAYER_STORAGE_PREFIX", "p/", r#""p/""#),
        ("ZLAYER_STORAGE_REGION", "eu-west-3", r#""eu-west-3""#),
        ("ZLAYER_STORAGE_ENDPOINT_URL", "http://s3", r#""http://s3""#),
        ("ZLAYER_STORAGE_FORCE_PATH_STYLE", "false", "false"),
        ("ZLAYER_STORAGE_ACCESS_KEY_ID", "GK1", r#""GK1""#),
        (
            "ZLAYER_STORAGE_SECRET_ACCESS_KEY_FILE",
            "/etc/s",
            r#""/etc/s""#,
        ),
        ("ZLAYER_STORAGE_SSE", "aws:kms", r#""aws:kms""#),
        ("ZLAYER_STORAGE_SSE_KMS_KEY_ID", "k", r#""k""#),
        (
            "ZLAYER_STORAGE_CHECKSUM_CALCULATION",
            "when_required",
            r#""when_required""#,
        ),
        ("ZLAYER_STORAGE_STAGING_DIR", "/st", r#""/st""#),
        ("ZLAYER_STORAGE_STATE_DB_PATH", "/db", r#""/db""#),
        ("ZLAYER_STORAGE_PART_SIZE_BYTES", "8388608", "8388608"),
        ("ZLAYER_STORAGE_MAX_CONCURRENT_UPLOADS", "9", "9"),
        ("ZLAYER_STORAGE_COMPRESSION_LEVEL", "7", "7"),
        ("ZLAYER_STORAGE_COMPRESSION_WORKERS", "5", "5"),
        ("ZLAYER_STORAGE_ABORT_STALE_UPLOADS_AFTER_SECS", "60", "60"),
        ("ZLAYER_STORAGE_MAX_RESTORE_BYTES", "1024", "1024"),
        ("ZLAYER_STORAGE_MAX_EXPANSION_RATIO", "50", "50"),
        ("ZLAYER_STORAGE_MAX_RETRIES", "1", "1"),
        ("ZLAYER_STORAGE_HISTORY_KEEP", "9", "9"),
        ("ZLAYER_STORAGE_DELTA_CHAIN_MAX", "4", "4"),
        ("ZLAYER_STORAGE_DELTA_MAX_PERCENT", "30", "30"),
        ("ZLAYER_STORAGE_GC_GRACE_SECS", "60", "60"),
    ];

    fn as_json(c: &LayerStorageConfig) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(c).unwrap() {
            serde_json::Value::Object(m) => m,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn every_storage_key_has_an_env_override_named_after_it() {
        let fields: Vec<String> = as_json(&LayerStorageConfig::default())
            .keys()
            .cloned()
            .collect();
        let mut keys: Vec<String> = STORAGE_ENV_OVERRIDES
            .iter()
            .map(|(k, _)| (*k).to_string())
            .collect();
        keys.sort();
        let mut sorted_fields = fields.clone();
        sorted_fields.sort();
        assert_eq!(keys, sorted_fields, "[storage] keys without an override");
        for (key, var) in STORAGE_ENV_OVERRIDES {
            assert_eq!(*var, format!("ZLAYER_STORAGE_{}", key.to_uppercase()));
        }
        let mut tested: Vec<&str> = OVERRIDE_CASES.iter().map(|(v, _, _)| *v).collect();
        let mut vars: Vec<&str> = STORAGE_ENV_OVERRIDES.iter().map(|(_, v)| *v).collect();
        tested.sort_unstable();
        vars.sort_unstable();
        assert_eq!(tested, vars, "OVERRIDE_CASES must cover every override");
    }

    #[test]
    fn each_env_override_sets_exactly_its_key() {
        let default = as_json(&LayerStorageConfig::default());
        let key_of = |var: &str| {
            STORAGE_ENV_OVERRIDES
                .iter()
                .find(|(_, v)| *v == var)
                .map(|(k, _)| *k)
                .unwrap()
        };
        for (var, value, want) in OVERRIDE_CASES {
            let mut c = LayerStorageConfig::default();
            c.apply_env(&|k| (k == *var).then(|| (*value).to_string()))
                .unwrap_or_else(|e| panic!("{var}={value}: {e}"));
            let got = as_json(&c);
            let want: serde_json::Value = serde_json::from_str(want).unwrap();
            let key = key_of(var);
            assert_eq!(got[key], want, "{var}={value}");
            assert_ne!(
                got[key], default[key],
                "{var}: pick a non-default test value"
            );
            for (k, v) in &got {
                if k != key {
                    assert_eq!(v, &default[k], "{var} also changed {k}");
                }
            }
        }
    }

    #[test]
    fn env_overrides_unset_optional_keys_and_name_the_variable_on_bad_values() {
        let mut c = LayerStorageConfig {
            region: Some("r".into()),
            force_path_style: Some(true),
            ..LayerStorageConfig::default()
        };
        c.apply_env(&|k| {
            matches!(
                k,
                "ZLAYER_STORAGE_REGION" | "ZLAYER_STORAGE_FORCE_PATH_STYLE"
            )
            .then(String::new)
        })
        .unwrap();
        assert_eq!((c.region, c.force_path_style), (None, None));
        for (var, bad) in [
            ("ZLAYER_STORAGE_BACKEND", "ftp"),
            ("ZLAYER_STORAGE_CHECKSUM_CALCULATION", "always"),
            ("ZLAYER_STORAGE_FORCE_PATH_STYLE", "yes please"),
            ("ZLAYER_STORAGE_PART_SIZE_BYTES", "lots"),
            ("ZLAYER_STORAGE_MAX_CONCURRENT_UPLOADS", "-1"),
            ("ZLAYER_STORAGE_COMPRESSION_LEVEL", "3.5"),
            ("ZLAYER_STORAGE_COMPRESSION_WORKERS", "x"),
            ("ZLAYER_STORAGE_ABORT_STALE_UPLOADS_AFTER_SECS", "1d"),
            ("ZLAYER_STORAGE_MAX_RESTORE_BYTES", "1G"),
            ("ZLAYER_STORAGE_MAX_EXPANSION_RATIO", ""),
            ("ZLAYER_STORAGE_MAX_RETRIES", "many"),
        ] {
            let err = LayerStorageConfig::default()
                .apply_env(&|k| (k == var).then(|| bad.to_string()))
                .unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { key, .. } if *key == var),
                "{err:?}"
            );
            assert!(err.to_string().contains(var), "{err}");
        }
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/zlayer.toml")), &|_| None).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/zlayer.toml"));
    }
}
