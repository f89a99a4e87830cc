//! Command-line interface (clap derive). Each subcommand maps to one file in `cmd/`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Persistent container upper layers kept in S3.
#[derive(Debug, Parser)]
#[command(name = "zlayer-storage", version, about)]
pub struct Cli {
    /// Configuration file [default: /etc/zlayer/storage.toml, built-in defaults if absent].
    #[arg(long, global = true, env = "ZLAYER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
    /// More logging (-v, -vv, -vvv; one-shot commands default to warnings, daemons to info).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Archive an upper dir and upload it as the identity's current layer.
    Sync(SyncArgs),
    /// Restore the identity's current layer into a new directory.
    Restore(RestoreArgs),
    /// Show sync state and pending uploads.
    Status(StatusArgs),
    /// Abort stale multipart uploads and finish interrupted ones.
    Gc,
    /// Print version information.
    Version,
    /// Run the containerd proxy snapshotter.
    Snapshotter(Box<SnapshotterArgs>),
    /// OCI runtime hooks (runc runs them with the container's state on stdin).
    #[command(subcommand)]
    Hook(HookCommand),
    /// Ask the running daemon to sync a stopped container's layer to the store now.
    Flush(FlushArgs),
}

#[derive(Debug, Args)]
pub struct FlushArgs {
    /// A container id (in --namespace), or an identity SERVICE/INSTANCE.
    pub target: String,
    /// containerd namespace of a container id.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Wait until the layer is durable in the store, at most SECS (0 = the daemon's
    /// flush_timeout_secs); without it, return once the request is recorded.
    #[arg(long, value_name = "SECS")]
    pub wait: Option<u64>,
    /// Flush even if the container is running. The result is NOT crash-consistent: files
    /// being written may be captured half-written, like a copy taken while they change.
    #[arg(long)]
    pub allow_running: bool,
    /// Print the reply as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum HookCommand {
    /// Ask the daemon to flush the stopped container's layer (OCI `poststop` stage).
    ///
    /// Exit status: 0 when the request was answered, and also on every runtime problem (daemon
    /// down, timeout, error answer), after one line on stderr, so `runc delete` never fails
    /// because of this hook; 2 for a malformed invocation (bad arguments, unreadable or
    /// incomplete state JSON on stdin).
    Poststop(PoststopArgs),
}

#[derive(Debug, Args)]
pub struct PoststopArgs {
    /// Wait up to SECS for the layer to be durable in the store (default: return once the
    /// daemon has recorded the request).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub wait: Option<u64>,
    /// Control socket of the daemon [default: `[snapshotter] control_socket` of the config].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Identity as SERVICE/INSTANCE.
    #[arg(long)]
    pub id: String,
    /// The upper dir to archive.
    pub upper: PathBuf,
    /// Print the resulting snapshot as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Identity as SERVICE/INSTANCE.
    #[arg(long)]
    pub id: String,
    /// Target directory (must not exist, or be empty).
    pub target: PathBuf,
    /// Write opaque markers as `user.overlay.opaque` (for overlay mounts with `userxattr`).
    #[arg(long)]
    pub userxattr: bool,
    /// Print the restored snapshot as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SnapshotterArgs {
    /// Snapshotter root (snapshot dirs, metadata, outbox).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Unix socket to serve the Snapshots API on.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// containerd socket for container-label lookups.
    #[arg(long)]
    pub containerd_address: Option<PathBuf>,
}
