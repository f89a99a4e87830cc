//! Connecting to a running daemon's control socket (the CLI's side).

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
