//! Serving the Snapshots API on a unix socket, plus the trash sweeper.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

use crate::proto::snapshots::snapshots_server::SnapshotsServer;
use crate::sys::systemd::Listening;

use super::core::Snapshotter;
use super::service::SnapshotService;

/// The sweeper also runs this often without being signalled, to finish work left by a crash.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Failures to set up or run the socket server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot serve on socket {path}")]
    Listener {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server on {path} failed")]
    Transport {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Serves `core` on `socket` (bound here, or passed by systemd) until `shutdown` resolves.
/// In-flight requests finish; no state is deleted on the way out, only the socket file, and
/// that only when the daemon bound it: systemd's socket stays open across the restart, so
/// containerd's next connection waits for the next start instead of being refused.
pub async fn serve(
    core: Arc<Snapshotter>,
    socket: Listening,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let path = socket.file.path.clone();
    let (listener, file) = socket.into_tokio().map_err(|source| ServeError::Listener {
        path: path.clone(),
        source,
    })?;
    tracing::info!(
        socket = %path.display(),
        inherited = file.inherited,
        root = %core.root().display(),
        "serving snapshots"
    );
    let stop = CancellationToken::new();
    let sweeper = tokio::spawn(sweep_trash(Arc::clone(&core), stop.clone()));
    let result = tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(SnapshotService::new(core)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|source| ServeError::Transport {
            path: path.clone(),
            source,
        });
    stop.cancel();
    if let Err(e) = sweeper.await {
        tracing::warn!(error = %e, "trash sweeper ended abnormally");
    }
    file.remove();
    tracing::info!(socket = %path.display(), "snapshotter stopped");
    result
}

/// Deletes removed snapshots' directories outside any request, when signalled and periodically.
pub async fn sweep_trash(core: Arc<Snapshotter>, stop: CancellationToken) {
    loop {
        let c = Arc::clone(&core);
        match tokio::task::spawn_blocking(move || c.sweep()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::debug!(entries = n, "emptied trash"),
            Ok(Err(e)) => tracing::warn!(error = %e.full_message(), "cannot empty trash"),
            Err(e) => tracing::warn!(error = %e, "trash sweep task failed"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = core.trash_ready() => {}
            () = tokio::time::sleep(SWEEP_INTERVAL) => {}
        }
    }
}
