//! Serving the Snapshots API on a unix socket, plus the trash sweeper.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

use crate::proto::snapshots::snapshots_server::SnapshotsServer;

use super::core::Snapshotter;
use super::service::SnapshotService;

/// The sweeper also runs this often without being signalled, to finish work left by a crash.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Failures to set up or run the socket server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot prepare socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("another process is serving {path}")]
    InUse { path: PathBuf },
    #[error("gRPC server on {path} failed")]
    Transport {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Binds `socket` (parent created, a stale socket replaced, mode 0660).
pub fn bind(socket: &Path) -> Result<UnixListener, ServeError> {
    let err = |source| ServeError::Socket {
        path: socket.to_path_buf(),
        source,
    };
    if let Some(parent) = socket.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    match std::fs::symlink_metadata(socket) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A live peer answers; a stale socket left by a crash refuses the connection.
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Err(ServeError::InUse {
                    path: socket.to_path_buf(),
                });
            }
            std::fs::remove_file(socket).map_err(err)?;
        }
        Ok(_) => {
            return Err(ServeError::NotASocket {
                path: socket.to_path_buf(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(socket).map_err(err)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(listener)
}

/// Serves `core` on `socket` until `shutdown` resolves. In-flight requests finish; no state is
/// deleted on the way out (only the socket file).
pub async fn serve(
    core: Arc<Snapshotter>,
    socket: &Path,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let listener = bind(socket)?;
    tracing::info!(socket = %socket.display(), root = %core.root().display(), "serving snapshots");
    let stop = CancellationToken::new();
    let sweeper = tokio::spawn(sweep_trash(Arc::clone(&core), stop.clone()));
    let result = tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(SnapshotService::new(core)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|source| ServeError::Transport {
            path: socket.to_path_buf(),
            source,
        });
    stop.cancel();
    if let Err(e) = sweeper.await {
        tracing::warn!(error = %e, "trash sweeper ended abnormally");
    }
    if let Err(e) = std::fs::remove_file(socket) {
        tracing::debug!(socket = %socket.display(), error = %e, "cannot remove socket");
    }
    tracing::info!(socket = %socket.display(), "snapshotter stopped");
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
