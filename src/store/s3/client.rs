//! Client setup: [`S3Store::open`] turns the `[storage]` settings into an SDK client with our
//! retry, timeout, checksum and server-side-encryption settings.

use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    StalledStreamProtectionConfig,
};
use aws_sdk_s3::types::ServerSideEncryption;
use tokio::sync::OnceCell;

use super::{S3Store, stream};
use crate::config::{ChecksumMode, LayerStorageConfig, MAX_PART_SIZE, MIN_PART_SIZE};
use crate::store::error::Result;
use crate::store::{StoreError, normalize_prefix};

impl S3Store {
    /// Builds the client from `cfg`: static credentials when `access_key_id` is set (secret
    /// from `secret_access_key_file`), otherwise the AWS default chain (env, profile, IMDS).
    pub async fn open(cfg: &LayerStorageConfig) -> Result<Self> {
        if cfg.bucket.is_empty() {
            return Err(config_err("bucket is required for the s3 backend"));
        }
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&cfg.part_size_bytes) {
            return Err(config_err(format!(
                "part_size_bytes {} is outside 5 MiB..=5 GiB",
                cfg.part_size_bytes
            )));
        }
        let prefix = normalize_prefix(&cfg.prefix)?;
        let creds = match (&cfg.access_key_id, &cfg.secret_access_key_file) {
            (Some(id), Some(file)) => {
                let secret = tokio::fs::read_to_string(file).await.map_err(|source| {
                    StoreError::ReadSecret {
                        path: file.clone(),
                        source,
                    }
                })?;
                Some(Credentials::new(
                    id,
                    secret.trim(),
                    None,
                    None,
                    "zlayer-config",
                ))
            }
            (Some(_), None) => {
                return Err(config_err(
                    "access_key_id is set but secret_access_key_file is not",
                ));
            }
            (None, Some(_)) => {
                return Err(config_err(
                    "secret_access_key_file is set but access_key_id is not",
                ));
            }
            (None, None) => None,
        };
        // A custom endpoint rarely has a meaningful region; SigV4 still needs one.
        let region = cfg
            .region
            .clone()
            .or_else(|| cfg.endpoint_url.as_ref().map(|_| "us-east-1".to_string()));
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(r) = region {
            loader = loader.region(Region::new(r));
        }
        if let Some(c) = creds {
            loader = loader.credentials_provider(c);
        }
        let sdk = loader.load().await;
        let (req_ck, resp_ck) = match cfg.checksum_calculation {
            ChecksumMode::WhenSupported => (
                RequestChecksumCalculation::WhenSupported,
                ResponseChecksumValidation::WhenSupported,
            ),
            ChecksumMode::WhenRequired => (
                RequestChecksumCalculation::WhenRequired,
                ResponseChecksumValidation::WhenRequired,
            ),
        };
        let mut builder = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(cfg.path_style())
            .request_checksum_calculation(req_ck)
            .response_checksum_validation(resp_ck)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(cfg.max_retries.saturating_add(1))
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(20)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .build(),
            )
            .stalled_stream_protection(
                StalledStreamProtectionConfig::enabled()
                    .grace_period(Duration::from_secs(30))
                    .build(),
            );
        if let Some(ep) = &cfg.endpoint_url {
            builder = builder.endpoint_url(ep);
        }
        let sse = cfg.sse.as_deref().map(|s| {
            (
                ServerSideEncryption::from(s),
                cfg.sse_kms_key_id.clone().filter(|_| s == "aws:kms"),
            )
        });
        Ok(Self {
            client: Client::from_conf(builder.build()),
            bucket: cfg.bucket.clone(),
            prefix,
            part_size: cfg.part_size_bytes,
            concurrency: cfg.max_concurrent_uploads.max(1),
            max_retries: cfg.max_retries,
            sse,
            conditional: OnceCell::new(),
            node: stream::node_scope(&cfg.state_db_path),
        })
    }
}

fn config_err(reason: impl Into<String>) -> StoreError {
    StoreError::Config {
        reason: reason.into(),
    }
}
