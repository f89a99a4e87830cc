//! `zlayer-storage gc`: abort stale multipart uploads, finish interrupted ones.

use anyhow::Context;
use zlayer_storage::Config;
use zlayer_storage::layer::LayerSyncManager;

use super::exit;

pub async fn run(config: &Config) -> anyhow::Result<u8> {
    let manager = LayerSyncManager::new(config.storage.clone())
        .await
        .context("cannot open the layer store")?;
    let report = manager.gc().await.context("garbage collection failed")?;
    println!(
        "gc: {} stale uploads aborted, {} interrupted syncs finished, {} stale spool files removed",
        report.aborted_uploads, report.resumed, report.spools_removed
    );
    Ok(exit::OK)
}
