//! One file per subcommand; each turns arguments into library calls.
//!
//! Exit codes (documented in the README):
//! - 0: success
//! - 1: runtime failure (I/O, object store, archive, state database)
//! - 2: usage error (bad flags or arguments; clap uses it too)
//! - 3: configuration error (unreadable or invalid config file, bad `ZLAYER_STORAGE_*` value,
//!   a socket passed by systemd that is not a listening unix stream socket)
//! - 4: not found: the identity has no layer in the store, or not the version asked for
//!
//! `hook poststop` has its own policy (0 on every runtime problem, 2 for a malformed
//! invocation; see `hook.rs`).
//!
//! Errors are printed once, here, as one line with the whole cause chain.

mod checkpoint;
mod db;
mod flush;
mod forget;
mod gc;
mod hook;
mod ls;
mod progress;
mod restore;
mod rollback;
mod snapshotter;
mod status;
mod sync;
mod version;

use std::path::Path;

use chrono::{DateTime, SecondsFormat, Utc};
use zlayer_storage::layer::{LayerError, VersionSelector};
use zlayer_storage::store::StoreError;
use zlayer_storage::sys::systemd::Activated;
use zlayer_storage::{Config, ContainerLayerId};

use crate::cli::{Cli, Command};
use crate::observability;

/// Process exit codes.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const CONFIG: u8 = 3;
    pub const NOT_FOUND: u8 = 4;
}

/// Runs the chosen subcommand and returns the process exit code.
pub fn dispatch(cli: Cli) -> u8 {
    match &cli.command {
        Command::Version => {
            version::run();
            return exit::OK;
        }
        // Runs inside `runc delete`: before any logging set-up or async runtime, and with its
        // own exit-code policy (see `hook.rs`).
        Command::Hook(command) => return hook::run(cli.config.as_deref(), cli.verbose, command),
        _ => {}
    }
    let config = match Config::load(cli.config.as_deref(), &|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            report(&anyhow::Error::new(e));
            return exit::CONFIG;
        }
    };
    let kind = match cli.command {
        Command::Snapshotter(_) | Command::Db(crate::cli::DbCommand::Replicate(_)) => {
            observability::Kind::Daemon
        }
        _ => observability::Kind::OneShot,
    };
    observability::init(
        cli.log_json || config.log.json,
        cli.verbose,
        config.log.filter.as_deref(),
        kind,
    );
    // Sockets passed by systemd are adopted before the runtime starts threads: adopting them
    // unsets LISTEN_* in the environment.
    let activated = match cli.command {
        // SAFETY: still single-threaded, and nothing has touched descriptors from 3 on.
        Command::Snapshotter(_) => match unsafe { Activated::take_from_env() } {
            Ok(a) => a,
            Err(e) => {
                report(&anyhow::Error::new(e));
                return exit::CONFIG;
            }
        },
        _ => Activated::default(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report(&anyhow::Error::new(e).context("cannot start the async runtime"));
            return exit::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Sync(args) => sync::run(&config, args).await,
            Command::Restore(args) => restore::run(&config, args).await,
            Command::Rollback(args) => rollback::run(&config, args).await,
            Command::Ls(args) => ls::run(&config, args).await,
            Command::Status(args) => status::run(&config, args).await,
            Command::Gc(args) => gc::run(&config, args).await,
            // Both handled above, before the runtime exists.
            Command::Version | Command::Hook(_) => Ok(exit::OK),
            Command::Snapshotter(args) => snapshotter::run(&config, &args, activated).await,
            Command::Flush(args) => flush::run(&config, args).await,
            Command::Checkpoint(args) => checkpoint::run(&config, args).await,
            Command::Forget(args) => forget::run(&config, args).await,
            Command::Db(command) => db::run(&config, command).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            report(&e);
            exit_code_for(&e)
        }
    }
}

/// Usage and configuration problems found after startup keep their own exit codes.
fn exit_code_for(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<UsageError>().is_some() {
        return exit::USAGE;
    }
    let absent = e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<LayerError>(),
            Some(LayerError::NoSuchVersion { .. } | LayerError::NoManifest { .. })
        ) || matches!(
            cause.downcast_ref::<zlayer_storage::replicator::ReplicatorError>(),
            Some(zlayer_storage::replicator::ReplicatorError::NoReplica { .. })
        )
    });
    if absent {
        return exit::NOT_FOUND;
    }
    let config = e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<LayerError>(),
            Some(LayerError::Config(_))
        ) || cause
            .downcast_ref::<StoreError>()
            .or_else(|| cause.downcast_ref::<Box<StoreError>>().map(|b| &**b))
            .is_some_and(|e| {
                matches!(
                    e,
                    StoreError::Config { .. }
                        | StoreError::ReadSecret { .. }
                        | StoreError::SecretFileTooOpen { .. }
                )
            })
    });
    if config { exit::CONFIG } else { exit::FAILURE }
}

/// Prints the error and its causes on one line (some causes, e.g. TOML errors, span lines).
fn report(e: &anyhow::Error) {
    eprintln!("zlayer-storage: {}", one_line(&format!("{e:#}")));
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A bad argument discovered after clap parsing (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Parses `--id SERVICE/INSTANCE`.
fn parse_id(s: &str) -> anyhow::Result<ContainerLayerId> {
    ContainerLayerId::parse(s).ok_or_else(|| {
        UsageError(format!(
            "invalid --id {s:?}: expected SERVICE/INSTANCE with both parts non-empty"
        ))
        .into()
    })
}

/// Prints `value` as one JSON document on stdout.
fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Human-readable size for summaries.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `--seq N` / `--at TIME` (clap lets at most one through), else the current version.
fn selector(seq: Option<u64>, at: Option<DateTime<Utc>>) -> VersionSelector {
    match (seq, at) {
        (Some(seq), _) => VersionSelector::Seq(seq),
        (None, Some(t)) => VersionSelector::At(t),
        (None, None) => VersionSelector::Current,
    }
}

/// A time as printed by `ls` (UTC, seconds), accepted back by `--at`.
fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Resolves a path argument for messages (no canonicalisation: the target may not exist yet).
fn display_path(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_parsing_is_a_usage_error() {
        let err = parse_id("noslash").unwrap_err();
        assert!(err.downcast_ref::<UsageError>().is_some());
        assert!(err.to_string().contains("noslash"));
        assert_eq!(
            parse_id("web/0").unwrap(),
            ContainerLayerId::new("web", "0")
        );
    }

    #[test]
    fn config_problems_found_late_exit_3() {
        let e = anyhow::Error::new(LayerError::OpenStore(Box::new(StoreError::Config {
            reason: "x".into(),
        })))
        .context("cannot open the layer store");
        assert_eq!(exit_code_for(&e), exit::CONFIG);
        let e = anyhow::Error::new(LayerError::OpenStore(Box::new(
            StoreError::SecretFileTooOpen {
                path: "/etc/zlayer/s3-secret".into(),
                mode: 0o644,
            },
        )));
        assert_eq!(exit_code_for(&e), exit::CONFIG);
        let e = anyhow::Error::new(std::io::Error::other("boom")).context("sync");
        assert_eq!(exit_code_for(&e), exit::FAILURE);
    }

    #[test]
    fn an_absent_identity_or_version_exits_4() {
        let id = ContainerLayerId::new("web", "0");
        let e = anyhow::Error::new(LayerError::NoManifest { id: id.clone() }).context("rollback");
        assert_eq!(exit_code_for(&e), exit::NOT_FOUND);
        let e = anyhow::Error::new(LayerError::NoSuchVersion {
            id,
            which: VersionSelector::Seq(3),
            kept: "seq 4".into(),
        });
        assert_eq!(exit_code_for(&e), exit::NOT_FOUND);
        assert_eq!(selector(None, None), VersionSelector::Current);
        assert_eq!(selector(Some(2), None), VersionSelector::Seq(2));
    }

    #[test]
    fn multi_line_causes_are_joined() {
        assert_eq!(
            one_line("a: parse error\n  |\n2 | x = 1\n\nunknown"),
            "a: parse error | 2 | x = 1 unknown"
        );
    }

    #[test]
    fn human_bytes_picks_units() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
