//! `zlayer-storage db restore --db PATH [--output OUT] [--timestamp T | --txid N] [--force]`

use anyhow::Context;
use zlayer_storage::Config;
use zlayer_storage::replicator::restore::{RestoreOptions, Target};

use crate::cli::DbRestoreArgs;
use crate::cmd::{exit, print_json};

pub async fn run(config: &Config, args: DbRestoreArgs) -> anyhow::Result<u8> {
    let (path, name) = super::databases(config, std::slice::from_ref(&args.db))
        .pop()
        .expect("one database asked for");
    let replicator = super::open(config, &path, name, false).await?;
    let target = match (args.timestamp, args.txid) {
        (Some(t), _) => Target::Time(
            t.timestamp_nanos_opt()
                .context("--timestamp out of range")?,
        ),
        (None, Some(txid)) => Target::Txid {
            generation: args.generation.clone(),
            txid,
        },
        (None, None) => Target::Latest,
    };
    let opts = RestoreOptions {
        target,
        integrity_check: !args.no_integrity_check && config.replicate.integrity_check,
        force: args.force,
        ..RestoreOptions::default()
    };
    let dest = args.output.clone().unwrap_or(path);
    let restored = replicator
        .restore_to(&dest, &opts)
        .await
        .with_context(|| format!("restore of {} failed", replicator.name()))?;
    if args.json {
        print_json(&serde_json::json!({
            "output": dest,
            "generation": restored.generation,
            "txid": restored.txid,
            "committed_unix_ns": restored.committed_unix_ns,
            "db_pages": restored.db_pages,
            "downloaded_bytes": restored.downloaded_bytes,
        }))?;
    } else {
        let when = chrono::DateTime::from_timestamp_nanos(restored.committed_unix_ns);
        println!(
            "restored {} as of transaction {} of generation {} (committed {}) into {}",
            replicator.name(),
            restored.txid,
            restored.generation,
            when.to_rfc3339(),
            dest.display()
        );
    }
    Ok(exit::OK)
}
