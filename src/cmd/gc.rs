//! `zlayer-storage gc [--dry-run] [--json]`: abort stale multipart uploads, finish interrupted
//! ones, queue the snapshotter's dead-letter layers again, trim manifest history and delete
//! layers no manifest references. A dry run only reports the trimming and deleting.

use anyhow::Context;
use zlayer_storage::Config;
use zlayer_storage::layer::{GcOptions, GcReport, LayerSyncManager};
use zlayer_storage::snapshotter::persist::retry_dead_letters;

use super::{exit, human_bytes, print_json};
use crate::cli::GcArgs;

pub async fn run(config: &Config, args: GcArgs) -> anyhow::Result<u8> {
    let manager = LayerSyncManager::new(config.storage.clone())
        .await
        .context("cannot open the layer store")?;
    let revived = if args.dry_run {
        0
    } else {
        let root = config.snapshotter.root.clone();
        tokio::task::spawn_blocking(move || retry_dead_letters(&root))
            .await
            .context("gc task failed")?
            .with_context(|| {
                format!(
                    "cannot revive dead-letter layers of the snapshotter at {}",
                    config.snapshotter.root.display()
                )
            })?
    };
    let report = manager
        .gc_with(GcOptions {
            dry_run: args.dry_run,
        })
        .await
        .context("garbage collection failed")?;
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        value["dead_letters_requeued"] = revived.into();
        print_json(&value)?;
        return Ok(exit::OK);
    }
    if revived > 0 {
        println!(
            "gc: {revived} dead-letter layers queued again (the snapshotter retries them within a minute)"
        );
    }
    print_report(&report, config.storage.gc_grace_secs);
    Ok(exit::OK)
}

fn print_report(r: &GcReport, grace_secs: u64) {
    let would = if r.dry_run { "would be " } else { "" };
    if r.dry_run {
        println!("gc: dry run, nothing changed");
    } else {
        println!(
            "gc: {} stale uploads aborted, {} interrupted syncs finished, {} stale spool files removed",
            r.aborted_uploads, r.resumed, r.spools_removed
        );
    }
    for key in &r.deleted {
        println!("  {would}deleted: {key}");
    }
    println!(
        "gc: {} objects ({}) no manifest references {would}deleted; {} manifests {would}trimmed to history_keep ({} versions dropped)",
        r.objects_deleted,
        human_bytes(r.bytes_deleted),
        r.manifests_trimmed,
        r.versions_dropped
    );
    println!(
        "gc: kept {} unreferenced layers written within gc_grace_secs ({grace_secs} s) and {} still uploading on this node",
        r.young_kept, r.pending_kept
    );
    if r.manifests_untrimmed > 0 {
        println!(
            "gc: {} manifests keep more than history_keep versions but were not trimmed: the store does not enforce conditional writes (their next sync trims them)",
            r.manifests_untrimmed
        );
    }
}
