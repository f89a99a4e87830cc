//! `zlayer-storage ls [--id SERVICE/INSTANCE] [--json]`: the identities in the store (one LIST
//! and a GET per manifest), or the kept versions of one.

use anyhow::Context;
use zlayer_storage::Config;
use zlayer_storage::layer::{LayerSyncManager, ManifestEntry};

use super::{exit, human_bytes, parse_id, print_json, rfc3339};
use crate::cli::LsArgs;

pub async fn run(config: &Config, args: LsArgs) -> anyhow::Result<u8> {
    let manager = LayerSyncManager::new(config.storage.clone())
        .await
        .context("cannot open the layer store")?;
    if let Some(id) = &args.id {
        let id = parse_id(id)?;
        let Some(manifest) = manager
            .manifest(&id)
            .await
            .with_context(|| format!("cannot read the manifest of {id}"))?
        else {
            eprintln!("zlayer-storage: {id} has no layer in the store");
            return Ok(exit::NOT_FOUND);
        };
        if args.json {
            print_json(&manifest)?;
        } else {
            print_versions(&manifest.current, &manifest.history);
        }
        return Ok(exit::OK);
    }
    let identities = manager
        .list_identities()
        .await
        .context("cannot list the identities in the store")?;
    if args.json {
        print_json(&identities)?;
        return Ok(exit::OK);
    }
    if identities.is_empty() {
        println!("no identities in the store");
        return Ok(exit::OK);
    }
    println!(
        "{:<40} {:>6} {:>11} {:<20} VERSIONS",
        "IDENTITY", "SEQ", "SIZE", "CREATED (UTC)"
    );
    for i in &identities {
        println!(
            "{:<40} {:>6} {:>11} {:<20} {}",
            i.identity.to_string(),
            i.seq,
            human_bytes(i.compressed_size_bytes),
            rfc3339(i.created_at),
            i.versions
        );
    }
    Ok(exit::OK)
}

/// One line per kept version, current first.
fn print_versions(current: &ManifestEntry, history: &[ManifestEntry]) {
    println!(
        "{:>6} {:<14} {:>11} {:>11} {:<20} NOTE",
        "SEQ", "DIGEST", "SIZE", "UNPACKED", "CREATED (UTC)"
    );
    for (i, e) in std::iter::once(current).chain(history).enumerate() {
        let mut note = if i == 0 { "current" } else { "" }.to_string();
        if let Some(from) = e.rolled_back_from {
            note.push_str(&format!(
                "{}rolled back from seq {from}",
                if note.is_empty() { "" } else { ", " }
            ));
        }
        println!(
            "{:>6} {:<14} {:>11} {:>11} {:<20} {note}",
            e.seq,
            e.digest.chars().take(12).collect::<String>(),
            human_bytes(e.compressed_size_bytes),
            human_bytes(e.size_bytes),
            rfc3339(e.created_at),
        );
    }
}
