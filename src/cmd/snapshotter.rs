//! `zlayer-storage snapshotter`: serve the containerd Snapshots API until SIGTERM/SIGINT.

use std::sync::Arc;

use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use zlayer_storage::Config;
use zlayer_storage::LayerSyncManager;
use zlayer_storage::control::{self, Control};
use zlayer_storage::metrics::MetricsServer;
use zlayer_storage::snapshotter::containers::ContainerdContainers;
use zlayer_storage::snapshotter::events::{ContainerdEvents, WatchOptions, Watcher};
use zlayer_storage::snapshotter::persist::{CheckpointSettings, PersistOptions, Persistence};
use zlayer_storage::snapshotter::{Snapshotter, server};
use zlayer_storage::sys::overlay::OverlayFeatures;
use zlayer_storage::sys::systemd::{self, Activated};

use crate::cli::SnapshotterArgs;

use super::exit;

/// Opens the layer store and the snapshotter root (flags override the config file), starts
/// the upload worker and serves the socket. A signal stops accepting requests, lets in-flight
/// ones finish and stops the worker; queued uploads stay in the outbox and resume at the next
/// start. No state is deleted. Sockets passed by systemd (`activated`, by
/// `FileDescriptorName=`) are served instead of binding the configured paths; systemd hears
/// `READY=1` once they listen and `STOPPING=1` at the signal.
pub async fn run(
    config: &Config,
    args: &SnapshotterArgs,
    mut activated: Activated,
) -> anyhow::Result<u8> {
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

    let manager = LayerSyncManager::new(config.storage.clone())
        .await
        .context("cannot open the layer store")?;
    let features_root = root.clone();
    let features = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&features_root)?;
        Ok::<_, std::io::Error>(OverlayFeatures::detect(&features_root))
    })
    .await
    .context("snapshotter start-up task failed")?
    .with_context(|| format!("cannot create snapshotter root {}", root.display()))?;
    let containers = Arc::new(ContainerdContainers::new(&containerd));
    let persistence = Persistence::new(
        PersistOptions::from_config(&config.snapshotter, features),
        manager,
        Arc::clone(&containers) as _,
        tokio::runtime::Handle::current(),
    );

    let open_root = root.clone();
    let hooks = Arc::clone(&persistence);
    let core =
        tokio::task::spawn_blocking(move || Snapshotter::open_with(&open_root, features, hooks))
            .await
            .context("snapshotter start-up task failed")?
            .with_context(|| format!("cannot open snapshotter root {}", root.display()))?;
    let stop = CancellationToken::new();
    let metrics = start_metrics(config, &stop).await?;
    let listening = systemd::take_listener(&mut activated, systemd::SNAPSHOTTER_SOCKET, &socket)
        .context("cannot listen for the Snapshots API")?;
    let control_socket = systemd::take_listener(
        &mut activated,
        systemd::CONTROL_SOCKET,
        &config.snapshotter.control_socket,
    )
    .context("cannot listen for the control API")?;
    if !activated.is_empty() {
        tracing::warn!(names = ?activated.names(), "systemd passed sockets nothing here serves");
    }
    tracing::info!(
        root = %root.display(),
        index_off = features.index_off,
        userxattr = features.userxattr,
        persist = ?config.snapshotter.persist,
        on_base_change = ?config.snapshotter.on_base_change,
        restore_timeout_secs = config.snapshotter.restore_timeout_secs,
        container_lookup = config.snapshotter.container_lookup,
        containerd = %containerd.display(),
        store = %persistence.manager().store().describe(),
        "snapshotter ready"
    );
    let worker = persistence.spawn_worker(stop.clone());
    let flusher = persistence.spawn_flusher(stop.clone());
    persistence.configure_checkpoints(CheckpointSettings {
        interval: Duration::from_secs(config.snapshotter.checkpoint_interval_secs),
        pause: Duration::from_millis(config.snapshotter.checkpoint_pause_ms),
        concurrency: config.snapshotter.checkpoint_concurrency,
    });
    // Checkpoints freeze a container's processes, found through containerd's task.
    let checkpointer = config
        .snapshotter
        .container_lookup
        .then(|| persistence.spawn_checkpointer(stop.clone()));
    let (control_listener, control_file) = control_socket.into_tokio().with_context(|| {
        format!(
            "cannot serve {}",
            config.snapshotter.control_socket.display()
        )
    })?;
    let control = Control::new(
        Arc::clone(&persistence),
        Duration::from_secs(config.snapshotter.flush_timeout_secs),
    );
    let watcher = config.snapshotter.watch_events.then(|| {
        let opts = WatchOptions {
            exit_grace: Duration::from_secs(config.snapshotter.exit_grace_secs),
        };
        Watcher::new(
            Arc::clone(&persistence),
            Arc::clone(&containers) as _,
            opts,
            control.events_flag(),
            stop.clone(),
        )
        .spawn(ContainerdEvents::new(containers.channel()))
    });
    let control_stop = stop.clone();
    let control_path = control_file.path.clone();
    let control_task = tokio::spawn(async move {
        control::serve(
            control,
            control_listener,
            &control_path,
            control_stop.cancelled_owned(),
        )
        .await
    });
    notify("READY=1\nSTATUS=serving snapshots and control");
    let shutdown = async {
        shutdown_signal().await;
        notify("STOPPING=1");
    };
    let served = server::serve(Arc::new(core), listening, shutdown).await;
    stop.cancel();
    if let Err(e) = worker.await {
        tracing::warn!(error = %e, "upload worker ended abnormally");
    }
    if let Err(e) = flusher.await {
        tracing::warn!(error = %e, "flusher ended abnormally");
    }
    if let Some(c) = checkpointer
        && let Err(e) = c.await
    {
        tracing::warn!(error = %e, "checkpoint scheduler ended abnormally");
    }
    if let Some(watcher) = watcher
        && let Err(e) = watcher.await
    {
        tracing::warn!(error = %e, "events watcher ended abnormally");
    }
    match control_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %format!("{:#}", anyhow::Error::from(e)), "control server failed")
        }
        Err(e) => tracing::warn!(error = %e, "control server ended abnormally"),
    }
    control_file.remove();
    if let Some(m) = metrics
        && let Err(e) = m.await
    {
        tracing::warn!(error = %e, "metrics endpoint ended abnormally");
    }
    served?;
    Ok(exit::OK)
}

/// Binds `[metrics] address` when set (a bad or busy address fails the start, naming it) and
/// serves scrapes until `stop` is cancelled.
async fn start_metrics(
    config: &Config,
    stop: &CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(address) = &config.metrics.address else {
        return Ok(None);
    };
    let address = address
        .parse()
        .with_context(|| format!("[metrics] address {address:?} is not an ip:port"))?;
    let server = MetricsServer::bind(address).await?;
    tracing::info!(address = %server.local_addr(), "serving metrics at /metrics");
    Ok(Some(tokio::spawn(
        server.run(stop.clone().cancelled_owned()),
    )))
}

/// Tells systemd `state` when it asked (`NOTIFY_SOCKET`); a failure is only logged (a lost
/// `READY=1` makes systemd time the start out and restart us).
fn notify(state: &str) {
    match systemd::notify(state) {
        Ok(true) => tracing::debug!(state, "notified systemd"),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(error = %format!("{:#}", anyhow::Error::new(e)), "cannot notify systemd")
        }
    }
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
