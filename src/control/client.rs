//! Connecting to a running daemon's control socket (the CLI's side).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::proto::control::control_client::ControlClient;

/// How long connecting may take; a daemon that is up answers at once.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the daemon cannot be reached.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot connect to the zlayer-storage daemon at {path} (is `zlayer-storage snapshotter` running?)"
)]
pub struct ConnectError {
    pub path: PathBuf,
    #[source]
    pub source: tonic::transport::Error,
}

/// A client of the control socket at `path`; fails at once when nothing listens there.
pub async fn connect(path: &Path) -> Result<ControlClient<Channel>, ConnectError> {
    let socket = path.to_path_buf();
    let channel = Endpoint::from_static("http://[::]")
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|source| ConnectError {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(ControlClient::new(channel))
}

/// Attempts of a call whose connection failed before the daemon answered.
const CALL_ATTEMPTS: u32 = 5;

/// Pause between those attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Why a call through the control socket failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The daemon's answer, or a transport failure that outlasted every retry.
    #[error("{} ({:?})", .0.message(), .0.code())]
    Status(tonic::Status),
}

/// Whether `status` is the connection failing before the daemon answered (a daemon that is
/// stopping closes connections it accepted but had not started serving) rather than an answer.
/// Statuses the daemon sends carry no local source; transport failures do.
pub fn is_transport_failure(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Cancelled || std::error::Error::source(status).is_some()
}

/// Runs `op` (an idempotent call) on a fresh connection to the daemon at `path`, reconnecting
/// when the connection fails before an answer: under socket activation the new connection
/// waits in the socket's backlog for the restarted daemon, so a restart is invisible here.
pub async fn call<T, F, Fut>(path: &Path, mut op: F) -> Result<T, CallError>
where
    F: FnMut(ControlClient<Channel>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut attempt = 1;
    loop {
        let client = connect(path).await?;
        match op(client).await {
            Ok(reply) => return Ok(reply.into_inner()),
            Err(status) if attempt < CALL_ATTEMPTS && is_transport_failure(&status) => {
                tracing::debug!(attempt, error = %status, "control call lost its connection; retrying");
                attempt += 1;
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(status) => return Err(CallError::Status(status)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::{Request, Response, Status};

    use super::*;
    use crate::proto::control::control_server::{Control, ControlServer};
    use crate::proto::control::{
        CheckpointRequest, CheckpointResponse, FlushRequest, FlushResponse, ForgetRequest,
        ForgetResponse, ListRequest, ListResponse, StatusRequest, StatusResponse,
    };

    /// Answers `Status` with a marker store name and counts the calls; the other calls fail
    /// with a daemon-side status, which must never be retried.
    struct Answering(Arc<AtomicUsize>);

    #[tonic::async_trait]
    impl Control for Answering {
        async fn flush(&self, _: Request<FlushRequest>) -> Result<Response<FlushResponse>, Status> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Err(Status::unavailable("store down"))
        }
        async fn status(
            &self,
            _: Request<StatusRequest>,
        ) -> Result<Response<StatusResponse>, Status> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(Response::new(StatusResponse {
                store: "answered".into(),
                ..Default::default()
            }))
        }
        async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
            Err(Status::unimplemented("list"))
        }
        async fn forget(
            &self,
            _: Request<ForgetRequest>,
        ) -> Result<Response<ForgetResponse>, Status> {
            Err(Status::unimplemented("forget"))
        }
        async fn checkpoint(
            &self,
            _: Request<CheckpointRequest>,
        ) -> Result<Response<CheckpointResponse>, Status> {
            Err(Status::unimplemented("checkpoint"))
        }
    }

    /// A socket whose first `drop_first` connections are closed once the client has sent its
    /// request bytes (what a stopping daemon does to a connection it had not started serving);
    /// later ones are served by [`Answering`].
    fn daemon(path: &Path, drop_first: usize) -> Arc<AtomicUsize> {
        let calls = Arc::new(AtomicUsize::new(0));
        let listener = UnixListener::bind(path).unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<tokio::net::UnixStream>>(4);
        let service = ControlServer::new(Answering(Arc::clone(&calls)));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(ReceiverStream::new(rx)),
        );
        tokio::spawn(async move {
            for n in 0.. {
                let (mut stream, _) = listener.accept().await.unwrap();
                if n < drop_first {
                    let mut buf = [0u8; 64];
                    let _ = stream.read(&mut buf).await;
                    drop(stream);
                } else {
                    tx.send(Ok(stream)).await.unwrap();
                }
            }
        });
        calls
    }

    #[tokio::test]
    async fn a_connection_closed_before_the_answer_is_retried_on_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let calls = daemon(&path, 2);
        let reply = call(&path, |mut c| async move {
            c.status(StatusRequest::default()).await
        })
        .await
        .expect("answered on the third connection");
        assert_eq!(reply.store, "answered");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_daemons_own_errors_are_not_retried() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let calls = daemon(&path, 0);
        let err = call(&path, |mut c| async move {
            c.flush(FlushRequest::default()).await
        })
        .await
        .unwrap_err();
        let CallError::Status(status) = err else {
            panic!("expected the daemon's status, got {err:?}");
        };
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(!is_transport_failure(&status));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "called once");
    }

    #[tokio::test]
    async fn a_daemon_that_never_answers_fails_after_the_retries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let calls = daemon(&path, usize::MAX);
        let err = call(&path, |mut c| async move {
            c.status(StatusRequest::default()).await
        })
        .await
        .unwrap_err();
        let CallError::Status(status) = err else {
            panic!("expected a transport status, got {err:?}");
        };
        assert!(is_transport_failure(&status), "{status:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}
