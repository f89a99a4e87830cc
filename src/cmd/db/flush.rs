//! `zlayer-storage db flush --db PATH [--timeout SECS]`

use std::time::Duration;

use anyhow::Context;
use zlayer_storage::Config;
use zlayer_storage::replicator::control::{self, DbRequest};

use crate::cli::DbFlushArgs;
use crate::cmd::exit;

pub async fn run(config: &Config, args: DbFlushArgs) -> anyhow::Result<u8> {
    let socket = &config.replicate.control_socket;
    let timeout = Duration::from_secs(args.timeout.max(1));
    let req = DbRequest::Flush {
        db: args.db.clone(),
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
    };
    // The replicator answers within `timeout`; a little more for the socket itself.
    let answer = control::request(socket, &req, timeout + Duration::from_secs(5))
        .await
        .with_context(|| format!("flush of {} failed", args.db))?;
    if !answer.ok {
        anyhow::bail!(
            "flush of {} failed: {}",
            args.db,
            answer.error.unwrap_or_default()
        );
    }
    for s in &answer.databases {
        println!(
            "{}: durable through transaction {} of generation {}",
            s.db_path.display(),
            s.durable_txid,
            s.generation
        );
    }
    Ok(exit::OK)
}
