//! `zlayer-storage status [--json]`

use anyhow::Context;
use zlayer_storage::Config;
use zlayer_storage::control::client;
use zlayer_storage::layer::LayerSyncManager;
use zlayer_storage::proto::control::{StatusRequest, StatusResponse};
use zlayer_storage::snapshotter::persist::{NodeStatus, node_status};

use super::{exit, print_json};
use crate::cli::StatusArgs;

pub async fn run(config: &Config, args: StatusArgs) -> anyhow::Result<u8> {
    let socket = &config.snapshotter.control_socket;
    let answered = client::call(socket, |mut c| async move {
        c.status(StatusRequest {
            identity: String::new(),
            remote: true,
        })
        .await
    })
    .await;
    // No daemon listening: fall back to the state on disk and the store.
    let reply = match answered {
        Err(client::CallError::Connect(_)) => None,
        other => Some(other.context("the daemon's status call failed")?),
    };
    if let Some(reply) = reply {
        if args.json {
            print_json(&serde_json::json!({ "daemon": reply }))?;
        } else {
            print_daemon(&reply);
        }
        return Ok(exit::OK);
    }
    let manager = LayerSyncManager::new(config.storage.clone())
        .await
        .context("cannot open the layer store")?;
    let states = manager.status().await.context("cannot read sync state")?;
    let root = config.snapshotter.root.clone();
    let node = tokio::task::spawn_blocking(move || node_status(&root))
        .await
        .context("status task failed")?
        .with_context(|| {
            format!(
                "cannot read the snapshotter state under {}",
                config.snapshotter.root.display()
            )
        })?;
    if args.json {
        print_json(&serde_json::json!({ "layers": states, "snapshotter": node }))?;
        return Ok(exit::OK);
    }
    if let Some(node) = &node {
        print_node(node);
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

/// Queued layers (with dead letters and their last error) and quarantined outbox entries.
fn print_node(node: &NodeStatus) {
    if !node.queued.is_empty() {
        println!(
            "queued layers of the snapshotter at {}:",
            node.root.display()
        );
        for q in &node.queued {
            let state = if q.dead { "DEAD LETTER" } else { "queued" };
            println!(
                "  {state:<11} {} seq {} (outbox {}, {}, {} attempts){}",
                q.identity,
                q.seq,
                q.outbox_id,
                q.location,
                q.attempts,
                q.last_error
                    .as_deref()
                    .map_or(String::new(), |e| format!(": {e}"))
            );
        }
    }
    for path in &node.quarantined {
        println!(
            "  QUARANTINED {} (outbox entry without a matching queued layer; inspect it, nothing was deleted)",
            path.display()
        );
    }
}

/// The running daemon's view: per identity, live snapshot, local/remote digest, queue, flushes.
fn print_daemon(s: &StatusResponse) {
    println!(
        "daemon: store {}, {} queued layers ({} dead letters), events watcher {}",
        s.store,
        s.outbox_layers,
        s.dead_letters,
        if s.events_connected {
            "connected"
        } else {
            "NOT connected"
        }
    );
    for q in &s.quarantined {
        println!("  QUARANTINED {q} (inspect it, nothing was deleted)");
    }
    if s.identities.is_empty() {
        println!("no identities on this node");
        return;
    }
    println!(
        "{:<32} {:<24} {:<14} {:<14} {:>6} {:<20} FLUSH",
        "IDENTITY", "SNAPSHOT", "LOCAL", "REMOTE", "SEQ", "LAST SYNC"
    );
    let short = |d: &str| {
        if d.is_empty() {
            "-".to_string()
        } else {
            d.chars().take(12).collect()
        }
    };
    for i in &s.identities {
        let last = chrono::DateTime::from_timestamp_millis(i.last_sync_unix_ms)
            .filter(|_| i.last_sync_unix_ms > 0)
            .map_or("-".to_string(), |t| {
                t.format("%Y-%m-%d %H:%M:%S").to_string()
            });
        let flush = i.flushes.first().map_or("-".to_string(), |f| {
            let err = if f.error.is_empty() {
                String::new()
            } else {
                format!(": {}", f.error)
            };
            format!("#{} {} ({}){err}", f.request_id, f.state, f.trigger)
        });
        let remote = if i.remote_error.is_empty() {
            short(&i.remote_digest)
        } else {
            "ERROR".to_string()
        };
        println!(
            "{:<32} {:<24} {:<14} {:<14} {:>6} {:<20} {flush}",
            i.identity,
            if i.snapshot_key.is_empty() {
                "-"
            } else {
                &i.snapshot_key
            },
            short(&i.local_digest),
            remote,
            i.remote_seq,
            last
        );
        for q in &i.queued {
            println!(
                "    {} seq {} (outbox {}, {}, {} attempts){}",
                if q.dead { "DEAD LETTER" } else { "queued" },
                q.seq,
                q.outbox_id,
                q.location,
                q.attempts,
                if q.last_error.is_empty() {
                    String::new()
                } else {
                    format!(": {}", q.last_error)
                }
            );
        }
        if !i.remote_error.is_empty() {
            println!("    store: {}", i.remote_error);
        }
        print_checkpoint(i);
    }
}

/// The identity's recovery point and last checkpoint, when it has either.
fn print_checkpoint(i: &zlayer_storage::proto::control::IdentityStatus) {
    if i.durable_unix_ms == 0 && i.checkpoint_attempted_unix_ms == 0 {
        return;
    }
    let age = |ms: i64| {
        let secs = (chrono::Utc::now().timestamp_millis() - ms).max(0) / 1000;
        format!("{secs} s ago")
    };
    let point = if i.durable_unix_ms > 0 {
        age(i.durable_unix_ms)
    } else {
        "none yet".to_string()
    };
    #[allow(clippy::cast_precision_loss)]
    let last = if i.checkpoint_attempted_unix_ms == 0 {
        "none yet".to_string()
    } else if i.checkpoint_failures > 0 {
        format!(
            "{} failed in a row, last {}: {}",
            i.checkpoint_failures,
            age(i.checkpoint_attempted_unix_ms),
            i.checkpoint_error
        )
    } else {
        format!(
            "last {}: frozen {:.1} ms, {} bytes",
            age(i.checkpoint_attempted_unix_ms),
            i.checkpoint_pause_us as f64 / 1000.0,
            i.checkpoint_bytes
        )
    };
    println!("    recovery point {point}; checkpoints: {last}");
}
