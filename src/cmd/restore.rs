//! `zlayer-storage restore --id SERVICE/INSTANCE [--seq N | --at TIME] TARGET`

use anyhow::Context;
use zlayer_storage::Config;
use zlayer_storage::archive::XattrNs;
use zlayer_storage::layer::{LayerSyncManager, RestoreOptions};

use super::progress::Bar;
use super::{display_path, exit, human_bytes, parse_id, print_json, selector};
use crate::cli::RestoreArgs;

pub async fn run(config: &Config, args: RestoreArgs) -> anyhow::Result<u8> {
    let id = parse_id(&args.id)?;
    let manager = LayerSyncManager::new(config.storage.clone())
        .await
        .context("cannot open the layer store")?;
    let bar = Bar::for_terminal();
    let opts = RestoreOptions {
        xattr_ns: if args.userxattr {
            XattrNs::User
        } else {
            XattrNs::Trusted
        },
        progress: bar.as_ref().map(|(_, p)| p.clone()),
    };
    let which = selector(args.seq, args.at);
    let result = manager
        .restore_version(&id, which, &args.target, opts)
        .await;
    if let Some((bar, _)) = &bar {
        bar.finish();
    }
    let restored = result
        .with_context(|| format!("cannot restore {id} into {}", display_path(&args.target)))?;
    let Some(snapshot) = restored else {
        eprintln!("zlayer-storage: nothing to restore: {id} has no layer in the store");
        return Ok(exit::NOT_FOUND);
    };
    if args.json {
        print_json(&snapshot)?;
    } else {
        println!(
            "restored {id} into {}: sha256:{} ({} in {} entries)",
            display_path(&args.target),
            snapshot.digest,
            human_bytes(snapshot.size_bytes),
            snapshot.file_count
        );
    }
    Ok(exit::OK)
}
