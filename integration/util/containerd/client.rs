//! Driving the fixtures without waiting on them: a `ctr` command to spawn in the background
//! (a run that blocks while its layer restores), and a Snapshots gRPC client on a snapshotter's
//! socket (calls that bypass containerd).

use std::path::Path;
use std::process::{Command, Stdio};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};
use zlayer_storage::proto::snapshots::snapshots_client::SnapshotsClient;

use super::Containerd;

impl Containerd {
    /// `ctr --address <ours> -n <ours> ARGS` as a command to spawn (stdin closed), killed after
    /// `limit_secs`; the caller chooses where its output goes.
    pub fn ctr_command(&self, limit_secs: u32, args: &[&str]) -> Command {
        let mut cmd = Command::new("timeout");
        cmd.args([
            "-k",
            "5",
            &limit_secs.to_string(),
            "/usr/bin/ctr",
            "--address",
        ])
        .arg(&self.address)
        .args(["--namespace", &self.namespace])
        .args(args)
        .stdin(Stdio::null());
        cmd
    }
}

/// A Snapshots API client on the unix socket `socket` (a snapshotter daemon's own socket).
pub async fn snapshots_client(socket: &Path) -> SnapshotsClient<Channel> {
    let socket = socket.to_path_buf();
    let channel = Endpoint::try_from("http://[::]:50051")
        .expect("static endpoint URI")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("connect to the snapshotter socket");
    SnapshotsClient::new(channel)
}
