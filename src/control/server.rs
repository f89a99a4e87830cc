//! Serving the control socket: each connection is gRPC (HTTP/2 prior knowledge) or, when its
//! first byte is `{`, one hook request line.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::service::ControlService;
use super::{Control, line};
use crate::proto::control::control_server::ControlServer;

/// A client must send its first byte within this time.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

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
pub async fn serve(
    control: Control,
    listener: UnixListener,
    path: &Path,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (grpc_tx, grpc_rx) = mpsc::channel::<std::io::Result<UnixStream>>(64);
    let accept_control = control.clone();
    let accept = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (tx, control) = (grpc_tx.clone(), accept_control.clone());
            tokio::spawn(async move { route(control, stream, tx).await });
        }
    });
    tracing::info!(socket = %path.display(), "serving control API");
    let result = tonic::transport::Server::builder()
        .add_service(ControlServer::new(ControlService::new(control)))
        .serve_with_incoming_shutdown(ReceiverStream::new(grpc_rx), shutdown)
        .await
        .map_err(|source| ServeError::Transport {
            path: path.to_path_buf(),
            source,
        });
    accept.abort();
    result
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
