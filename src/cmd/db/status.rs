//! `zlayer-storage db status [--db PATH…] [--json]`: from the running replicator, else from
//! the store's manifests and the local caches.

use std::time::Duration;

use zlayer_storage::Config;
use zlayer_storage::replicator::ReplicatorStatus;
use zlayer_storage::replicator::control::{self, DbControlError, DbRequest};

use crate::cli::DbStatusArgs;
use crate::cmd::{exit, human_bytes, print_json};

pub async fn run(config: &Config, args: DbStatusArgs) -> anyhow::Result<u8> {
    let socket = &config.replicate.control_socket;
    match control::request(socket, &DbRequest::Status, Duration::from_secs(5)).await {
        Ok(answer) => {
            let mut dbs = answer.databases;
            if !args.db.is_empty() {
                dbs.retain(|s| args.db.iter().any(|p| super::same_file(p, &s.db_path)));
            }
            show(&dbs, true, args.json)?;
            return Ok(exit::OK);
        }
        Err(DbControlError::Connect { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let mut dbs = Vec::new();
    for (path, name) in super::databases(config, &args.db) {
        let r = super::open(config, &path, name, false).await?;
        let mut status = r.status();
        match r.manifest().await {
            Ok(Some(m)) => {
                if let Some(g) = m.current() {
                    status.generation.clone_from(&g.id);
                    status.durable_txid = g.last_txid();
                    status.txid = g.last_txid();
                    status.last_sync =
                        chrono::DateTime::from_timestamp_nanos(g.last_unix_ns()).into();
                }
            }
            Ok(None) => status.last_error = Some("the store has no replica yet".into()),
            Err(e) => status.last_error = Some(format!("{e:#}")),
        }
        dbs.push(status);
    }
    show(&dbs, false, args.json)?;
    Ok(exit::OK)
}

fn show(dbs: &[ReplicatorStatus], running: bool, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&serde_json::json!({ "running": running, "databases": dbs }));
    }
    if !running {
        println!("replicator not running; from the store and the local cache:");
    }
    if dbs.is_empty() {
        println!("no databases (give --db PATH or list [[replicate.databases]])");
    }
    for s in dbs {
        println!("{} ({})", s.db_path.display(), s.name);
        println!("  store:       {}", s.store);
        println!(
            "  generation:  {}",
            if s.generation.is_empty() {
                "-"
            } else {
                &s.generation
            }
        );
        println!(
            "  position:    transaction {} read, {} in the store",
            s.txid, s.durable_txid
        );
        println!(
            "  last sync:   {}",
            s.last_sync
                .map_or_else(|| "never".to_string(), |t| t.to_rfc3339())
        );
        println!("  lag:         {} ms", s.lag_ms);
        println!(
            "  cache:       {} pending of {}{}",
            human_bytes(s.pending_bytes),
            human_bytes(s.cache_limit),
            if s.cache_full {
                " (FULL: reading and checkpointing paused)"
            } else {
                ""
            }
        );
        if let Some(e) = &s.last_error {
            println!("  last error:  {e}");
        }
    }
    Ok(())
}
