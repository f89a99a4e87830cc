//! `zlayer-storage rollback --id SERVICE/INSTANCE (--seq N | --at TIME)`: make a kept older
//! version the identity's current layer again, under a new, higher seq.

use anyhow::Context;
use zlayer_storage::Config;
use zlayer_storage::layer::LayerSyncManager;

use super::{exit, parse_id, print_json, selector};
use crate::cli::RollbackArgs;

pub async fn run(config: &Config, args: RollbackArgs) -> anyhow::Result<u8> {
    let id = parse_id(&args.id)?;
    let which = selector(args.seq, args.at);
    let manager = LayerSyncManager::new(config.storage.clone())
        .await
        .context("cannot open the layer store")?;
    let outcome = manager
        .rollback(&id, which)
        .await
        .with_context(|| format!("cannot roll {id} back"))?;
    if args.json {
        print_json(&outcome)?;
    } else if outcome.moved {
        println!(
            "rolled {id} back to seq {} (sha256:{}); it is current as seq {}",
            outcome.chosen.seq, outcome.chosen.digest, outcome.current.seq
        );
    } else {
        println!(
            "{id}: seq {} (sha256:{}) already is the current version; nothing changed",
            outcome.chosen.seq, outcome.chosen.digest
        );
    }
    Ok(exit::OK)
}
