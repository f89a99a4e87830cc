//! `zlayer-storage snapshotter`: serve the containerd Snapshots API until SIGTERM/SIGINT.

use std::sync::Arc;

use anyhow::Context;
use zlayer_storage::Config;
use zlayer_storage::snapshotter::{Snapshotter, server};

use crate::cli::SnapshotterArgs;

use super::exit;

/// Opens the snapshotter root (flags override the config file) and serves the socket.
/// A signal stops accepting requests, lets in-flight ones finish, and deletes no state.
pub async fn run(config: &Config, args: &SnapshotterArgs) -> anyhow::Result<u8> {
    let root = args
        .root
        .clone()
        .unwrap_or_else(|| config.snapshotter.root.clone());
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| config.snapshotter.socket.clone());
    let containerd = args
        .containerd_address
        .clone()
        .unwrap_or_else(|| config.snapshotter.containerd_address.clone());
    // Used by persistence (container-label lookups); the plain snapshotter does not dial it.
    tracing::debug!(containerd = %containerd.display(), "containerd address");

    let open_root = root.clone();
    let core = tokio::task::spawn_blocking(move || Snapshotter::open(&open_root))
        .await
        .context("snapshotter start-up task failed")?
        .with_context(|| format!("cannot open snapshotter root {}", root.display()))?;
    let features = core.features();
    tracing::info!(
        root = %root.display(),
        index_off = features.index_off,
        userxattr = features.userxattr,
        "snapshotter ready"
    );
    server::serve(Arc::new(core), &socket, shutdown_signal()).await?;
    Ok(exit::OK)
}

/// Resolves on SIGTERM or SIGINT. If the handlers cannot be installed, only SIGINT via
/// `ctrl_c` is awaited, and failing that the server runs until killed.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
                _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "cannot install signal handlers");
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}
