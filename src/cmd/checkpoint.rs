//! `zlayer-storage checkpoint TARGET`: ask the daemon for a crash-consistent checkpoint of a
//! running container now.

use anyhow::Context;
use zlayer_storage::Config;
use zlayer_storage::control::client;
use zlayer_storage::proto::control::{CheckpointRequest, FlushRequest, flush_request::Target};

use super::{exit, print_json};
use crate::cli::CheckpointArgs;

pub async fn run(config: &Config, args: CheckpointArgs) -> anyhow::Result<u8> {
    let socket = &config.snapshotter.control_socket;
    let target = if args.target.contains('/') {
        Target::Identity(args.target.clone())
    } else {
        Target::ContainerId(args.target.clone())
    };
    let request = CheckpointRequest {
        target: Some(FlushRequest {
            target: Some(target),
            namespace: args.namespace.clone(),
            trigger: "cli".to_string(),
            ..FlushRequest::default()
        }),
    };
    // A second checkpoint after a lost connection only stores the same state again.
    let reply = client::call(socket, |mut c| {
        let request = request.clone();
        async move { c.checkpoint(request).await }
    })
    .await
    .with_context(|| format!("checkpoint of {} failed", args.target))?;
    if args.json {
        print_json(&reply)?;
        return Ok(exit::OK);
    }
    #[allow(clippy::cast_precision_loss)]
    let pause_ms = reply.pause_us as f64 / 1000.0;
    println!(
        "{}: durable as seq {} ({}{}), frozen {pause_ms:.1} ms, {} bytes uploaded{}",
        reply.identity,
        reply.seq,
        reply.digest.chars().take(12).collect::<String>(),
        if reply.unchanged { ", unchanged" } else { "" },
        reply.bytes,
        if reply.user_paused {
            "; the container was paused by its user and stays paused"
        } else {
            ""
        }
    );
    Ok(exit::OK)
}
