//! `zlayer-storage sync --id SERVICE/INSTANCE UPPER`

use anyhow::Context;
use zlayer_storage::Config;
use zlayer_storage::layer::{LayerSyncManager, SyncOptions};

use super::progress::Bar;
use super::{display_path, exit, human_bytes, parse_id, print_json};
use crate::cli::SyncArgs;

pub async fn run(config: &Config, args: SyncArgs) -> anyhow::Result<u8> {
    let id = parse_id(&args.id)?;
    let manager = LayerSyncManager::new(config.storage.clone())
        .await
        .context("cannot open the layer store")?;
    let bar = Bar::for_terminal();
    let opts = SyncOptions {
        progress: bar.as_ref().map(|(_, p)| p.clone()),
        ..SyncOptions::default()
    };
    let result = manager.sync_layer_detailed(&id, &args.upper, opts).await;
    if let Some((bar, _)) = &bar {
        bar.finish();
    }
    let outcome =
        result.with_context(|| format!("cannot sync {id} from {}", display_path(&args.upper)))?;
    if args.json {
        print_json(&outcome)?;
    } else {
        let s = &outcome.snapshot;
        let what = if s.unchanged { "unchanged" } else { "synced" };
        let mut line = format!(
            "{what} {id}: sha256:{} ({} in {} entries, {} compressed)",
            s.digest,
            human_bytes(s.size_bytes),
            s.file_count,
            human_bytes(s.compressed_size_bytes)
        );
        if let Some(u) = &outcome.upload {
            line.push_str(&format!(
                ", parts sent {}/{} (reused {})",
                u.parts_sent, u.parts_total, u.parts_reused
            ));
        }
        if !s.unchanged && !outcome.manifest_moved {
            line.push_str(", manifest not moved (a newer sync exists)");
        }
        println!("{line}");
    }
    Ok(exit::OK)
}
