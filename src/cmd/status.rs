//! `zlayer-storage status [--json]`

use anyhow::Context;
use zlayer_storage::Config;
use zlayer_storage::layer::LayerSyncManager;

use super::{exit, print_json};
use crate::cli::StatusArgs;

pub async fn run(config: &Config, args: StatusArgs) -> anyhow::Result<u8> {
    let manager = LayerSyncManager::new(config.storage.clone())
        .await
        .context("cannot open the layer store")?;
    let states = manager.status().await.context("cannot read sync state")?;
    if args.json {
        print_json(&states)?;
        return Ok(exit::OK);
    }
    if states.is_empty() {
        println!("no layers synced or restored on this node");
        return Ok(exit::OK);
    }
    println!(
        "{:<40} {:<14} {:<14} {:<20} PENDING",
        "IDENTITY", "LOCAL", "REMOTE", "LAST SYNC"
    );
    for s in &states {
        let short = |d: &Option<String>| {
            d.as_deref()
                .map_or("-".to_string(), |d| d.chars().take(12).collect())
        };
        let last = s.last_sync.map_or("-".to_string(), |t| {
            t.format("%Y-%m-%d %H:%M:%S").to_string()
        });
        let pending = s.pending_upload.as_ref().map_or("-".to_string(), |p| {
            format!("{}/{} parts", p.completed_parts.len(), p.total_parts)
        });
        println!(
            "{:<40} {:<14} {:<14} {:<20} {pending}",
            s.container_id.to_string(),
            short(&s.local_digest),
            short(&s.remote_digest),
            last
        );
    }
    Ok(exit::OK)
}
