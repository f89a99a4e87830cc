//! `zlayer-storage flush TARGET [--wait SECS]`: ask the daemon to sync a stopped container's
//! layer (its upper dir stays in place) to the store.

use anyhow::Context;
use zlayer_storage::Config;
use zlayer_storage::control::client;
use zlayer_storage::proto::control::{FlushRequest, flush_request::Target};

use super::{exit, print_json};
use crate::cli::FlushArgs;

pub async fn run(config: &Config, args: FlushArgs) -> anyhow::Result<u8> {
    let socket = &config.snapshotter.control_socket;
    let target = if args.target.contains('/') {
        Target::Identity(args.target.clone())
    } else {
        Target::ContainerId(args.target.clone())
    };
    let request = FlushRequest {
        target: Some(target),
        namespace: args.namespace.clone(),
        wait: args.wait.is_some(),
        timeout_ms: args.wait.unwrap_or(0).saturating_mul(1000),
        allow_running: args.allow_running,
        trigger: "cli".to_string(),
    };
    // Flushes of one identity coalesce, so a retry after a lost connection is safe.
    let reply = client::call(socket, |mut c| {
        let request = request.clone();
        async move { c.flush(request).await }
    })
    .await
    .with_context(|| format!("flush of {} failed", args.target))?;
    if args.json {
        print_json(&reply)?;
        return Ok(exit::OK);
    }
    match reply.state.as_str() {
        "durable" => {
            println!(
                "{}: durable as seq {} ({}{}{})",
                reply.identity,
                reply.seq,
                reply.digest.chars().take(12).collect::<String>(),
                if reply.unchanged { ", unchanged" } else { "" },
                if reply.crash_consistent {
                    ""
                } else {
                    ", NOT crash-consistent: the container was running"
                }
            );
        }
        "queued" => println!(
            "{}: flush queued (request {}); `zlayer-storage status` shows when it is durable",
            reply.identity, reply.request_id
        ),
        _ => println!(
            "{}: not persisted by zlayer-storage; nothing to flush",
            args.target
        ),
    }
    Ok(exit::OK)
}
