//! Command-line interface (clap derive). Each subcommand maps to one file in `cmd/`.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
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
    /// Restore the identity's current layer (or a kept older version) into a new directory.
    Restore(RestoreArgs),
    /// Make a kept older version of an identity's layer current again (in the store).
    Rollback(RollbackArgs),
    /// List the identities in the store, or the kept versions of one.
    Ls(LsArgs),
    /// Show sync state and pending uploads.
    Status(StatusArgs),
    /// Finish interrupted uploads, abort stale ones, trim manifest history and delete layers no
    /// manifest references.
    Gc(GcArgs),
    /// Print version information.
    Version,
    /// Run the containerd proxy snapshotter.
    Snapshotter(Box<SnapshotterArgs>),
    /// OCI runtime hooks (runc runs them with the container's state on stdin).
    #[command(subcommand)]
    Hook(HookCommand),
    /// Ask the running daemon to sync a stopped container's layer to the store now.
    Flush(FlushArgs),
    /// Ask the running daemon for a crash-consistent checkpoint of a running container now
    /// (frozen for at most checkpoint_pause_ms); exits 0 once it is durable in the store.
    Checkpoint(CheckpointArgs),
    /// Drop an identity's layer from the store (asks for confirmation).
    Forget(ForgetArgs),
    /// SQLite databases replicated to the store: WAL shipped continuously, restored latest or
    /// as of any commit.
    #[command(subcommand)]
    Db(DbCommand),
}

#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Replicate databases while they run (sidecar), or run CMD with them (wrapper: restore
    /// what is missing, start CMD, forward signals, flush when it exits, exit with its code).
    Replicate(DbReplicateArgs),
    /// Ask the running replicator to ship everything committed so far; exits 0 once durable.
    Flush(DbFlushArgs),
    /// Restore a database (latest, or as of a time or transaction) from the store.
    Restore(DbRestoreArgs),
    /// Generation, position, last sync, lag, pending bytes and errors per database.
    Status(DbStatusArgs),
}

#[derive(Debug, Args)]
pub struct DbReplicateArgs {
    /// A database to replicate (repeatable); without any, the config's [[replicate.databases]].
    #[arg(long = "db", value_name = "PATH")]
    pub db: Vec<PathBuf>,
    /// On exit, how long to keep shipping what is left before leaving it in the cache.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub stop_timeout: u64,
    /// The app to run (wrapper mode), after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct DbFlushArgs {
    /// The database (its path or its store name).
    #[arg(long = "db", value_name = "PATH")]
    pub db: String,
    /// Longest wait for the store.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct DbRestoreArgs {
    /// The database whose replica to restore (names it in the store unless the config does).
    #[arg(long = "db", value_name = "PATH")]
    pub db: PathBuf,
    /// Where to write it [default: the database path].
    #[arg(long, value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// The state as of this time (every transaction committed at or before it).
    #[arg(long, value_parser = parse_time, conflicts_with = "txid")]
    pub timestamp: Option<DateTime<Utc>>,
    /// The state right after this transaction (of --generation, default the latest).
    #[arg(long)]
    pub txid: Option<u64>,
    #[arg(long, requires = "txid")]
    pub generation: Option<String>,
    /// Replace an existing file (and its -wal/-shm).
    #[arg(long)]
    pub force: bool,
    /// Skip `PRAGMA integrity_check` (checksums are still verified).
    #[arg(long)]
    pub no_integrity_check: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DbStatusArgs {
    /// Only these databases [default: all].
    #[arg(long = "db", value_name = "PATH")]
    pub db: Vec<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ForgetArgs {
    /// Identity as SERVICE/INSTANCE.
    pub id: String,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
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

#[derive(Debug, Args)]
pub struct CheckpointArgs {
    /// A container id (in --namespace), or an identity SERVICE/INSTANCE.
    pub target: String,
    /// containerd namespace of a container id.
    #[arg(long, default_value = "default")]
    pub namespace: String,
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
    /// Restore the kept version with this seq instead of the current one (`ls --id` lists them).
    #[arg(long, conflicts_with = "at")]
    pub seq: Option<u64>,
    /// Restore the newest kept version created at or before this RFC 3339 time
    /// (e.g. 2025-01-31T12:00:00Z).
    #[arg(long, value_parser = parse_time)]
    pub at: Option<DateTime<Utc>>,
    /// Write opaque markers as `user.overlay.opaque` (for overlay mounts with `userxattr`).
    #[arg(long)]
    pub userxattr: bool,
    /// Print the restored snapshot as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// Identity as SERVICE/INSTANCE.
    #[arg(long)]
    pub id: String,
    /// The kept version with this seq (`ls --id` lists them).
    #[arg(long, required_unless_present = "at", conflicts_with = "at")]
    pub seq: Option<u64>,
    /// The newest kept version created at or before this RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    pub at: Option<DateTime<Utc>>,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// List the kept versions of this identity (SERVICE/INSTANCE) instead.
    #[arg(long)]
    pub id: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Print what would be trimmed and deleted; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses an RFC 3339 time (`--at`).
fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("expected an RFC 3339 time such as 2025-01-31T12:00:00Z: {e}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_in_any_offset() {
        let t = parse_time("2025-01-31T13:00:00+01:00").unwrap();
        assert_eq!(t, parse_time("2025-01-31T12:00:00Z").unwrap());
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn rollback_needs_exactly_one_of_seq_and_at() {
        let parse =
            |args: &[&str]| Cli::try_parse_from(["zlayer-storage", "rollback"].iter().chain(args));
        assert!(parse(&["--id", "a/b"]).is_err());
        assert!(parse(&["--id", "a/b", "--seq", "1", "--at", "2025-01-31T12:00:00Z"]).is_err());
        assert!(parse(&["--id", "a/b", "--seq", "1"]).is_ok());
        assert!(parse(&["--id", "a/b", "--at", "2025-01-31T12:00:00Z"]).is_ok());
    }
}
