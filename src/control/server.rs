//! Serving the control socket: each connection is gRPC (HTTP/2 prior knowledge) or, when its
//! first byte is `{`, one hook request line.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;

use super::service::ControlService;
use super::{Control, line};
use crate::proto::control::control_server::ControlServer;

/// A client must send its first byte within this time.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for connections accepted before it began.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Failures to run the control server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server on control socket {path} failed")]
    Transport {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Serves `control` on `listener` (already bound, mode set) until `shutdown` resolves.
///
/// Shutdown stops accepting first, so connections still in the backlog wait for the next process
/// (systemd keeps the socket open) instead of being accepted and then dropped; connections
/// already accepted are answered before the gRPC server drains and returns.
pub async fn serve(
    control: Control,
    listener: UnixListener,
    path: &Path,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (grpc_tx, grpc_rx) = mpsc::channel::<std::io::Result<UnixStream>>(64);
    tracing::info!(socket = %path.display(), "serving control API");
    // The gRPC server ends when its incoming stream does, i.e. once the accept loop and every
    // routed connection have dropped their senders; a never-resolving signal still makes it
    // drain its open connections gracefully rather than cut them.
    let grpc = tonic::transport::Server::builder()
        .add_service(ControlServer::new(ControlService::new(control.clone())))
        .serve_with_incoming_shutdown(ReceiverStream::new(grpc_rx), std::future::pending());
    let (result, ()) = tokio::join!(grpc, accept(control, listener, grpc_tx, shutdown));
    result.map_err(|source| ServeError::Transport {
        path: path.to_path_buf(),
        source,
    })
}

/// Accepts and routes connections until `shutdown`, then waits (at most [`DRAIN_TIMEOUT`]) for
/// the connections being routed.
async fn accept(
    control: Control,
    listener: UnixListener,
    grpc: mpsc::Sender<std::io::Result<UnixStream>>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut routing = JoinSet::new();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = routing.join_next() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    routing.spawn(route(control.clone(), stream, grpc.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    drop(grpc);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while routing.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = routing.len(),
            "control connections still unanswered at shutdown; closing them"
        );
    }
}

/// Hands a connection to the hook handler or to the gRPC server by its first byte.
async fn route(
    control: Control,
    stream: UnixStream,
    grpc: mpsc::Sender<std::io::Result<UnixStream>>,
) {
    let mut first = [0u8; 1];
    match tokio::time::timeout(FIRST_BYTE_TIMEOUT, peek(&stream, &mut first)).await {
        Ok(Ok(1)) if first[0] == b'{' => line::handle(&control, stream).await,
        Ok(Ok(1)) => {
            let _ = grpc.send(Ok(stream)).await;
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "control connection failed"),
        Err(_) => tracing::debug!("control connection sent nothing; closed"),
    }
}

/// Reads the first bytes without consuming them (tokio's `UnixStream` has no `peek`).
async fn peek(stream: &UnixStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_io(tokio::io::Interest::READABLE, || {
            rustix::net::recv(stream, &mut *buf, rustix::net::RecvFlags::PEEK)
                .map(|(n, _)| n)
                .map_err(std::io::Error::from)
        }) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}
