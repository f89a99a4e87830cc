//! `zlayer-storage gc`: abort stale multipart uploads, finish interrupted ones, and queue the
//! snapshotter's dead-letter layers again.

use anyhow::Context;
use zlayer_storage::Config;
use zlayer_storage::layer::LayerSyncManager;
use zlayer_storage::snapshotter::persist::retry_dead_letters;

use super::exit;

pub async fn run(config: &Config) -> anyhow::Result<u8> {
    let manager = LayerSyncManager::new(config.storage.clone())
        .await
        .context("cannot open the layer store")?;
    let root = config.snapshotter.root.clone();
    let revived = tokio::task::spawn_blocking(move || retry_dead_letters(&root))
        .await
        .context("gc task failed")?
        .with_context(|| {
            format!(
                "cannot revive dead-letter layers of the snapshotter at {}",
                config.snapshotter.root.display()
            )
        })?;
    if revived > 0 {
        println!(
            "gc: {revived} dead-letter layers queued again (the snapshotter retries them within a minute)"
        );
    }
    let report = manager.gc().await.context("garbage collection failed")?;
    println!(
        "gc: {} stale uploads aborted, {} interrupted syncs finished, {} stale spool files removed",
        report.aborted_uploads, report.resumed, report.spools_removed
    );
    Ok(exit::OK)
}
