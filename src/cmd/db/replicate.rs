//! `zlayer-storage db replicate [--db PATH…] [-- CMD ARGS…]`
//!
//! Sidecar: replicate until SIGTERM/SIGINT, then ship what is left. Wrapper: restore missing
//! databases, start CMD, forward signals to it, and when it exits ship everything and exit with
//! its code (128 + signal when a signal ended it).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use zlayer_storage::Config;
use zlayer_storage::replicator::SqliteReplicator;
use zlayer_storage::replicator::control;

use crate::cli::DbReplicateArgs;
use crate::cmd::{UsageError, exit};

/// Signals passed on to the app in wrapper mode.
const FORWARDED: [(SignalKind, rustix::process::Signal); 6] = [
    (SignalKind::terminate(), rustix::process::Signal::TERM),
    (SignalKind::interrupt(), rustix::process::Signal::INT),
    (SignalKind::hangup(), rustix::process::Signal::HUP),
    (SignalKind::quit(), rustix::process::Signal::QUIT),
    (SignalKind::user_defined1(), rustix::process::Signal::USR1),
    (SignalKind::user_defined2(), rustix::process::Signal::USR2),
];

pub async fn run(config: &Config, args: DbReplicateArgs) -> anyhow::Result<u8> {
    let entries = super::databases(config, &args.db);
    if entries.is_empty() {
        return Err(UsageError(
            "no database to replicate: give --db PATH or list [[replicate.databases]] in the config"
                .to_string(),
        )
        .into());
    }
    let wrapper = !args.command.is_empty();
    let mut replicators = Vec::new();
    for (path, name) in entries {
        // A wrapped app must find its database: restore it first when it is missing.
        let auto_restore = wrapper || config.replicate.auto_restore;
        let r = super::open(config, &path, name, auto_restore).await?;
        r.start()
            .await
            .with_context(|| format!("cannot start replicating {}", path.display()))?;
        tracing::info!(db = %path.display(), name = r.name(), "replicating");
        replicators.push(Arc::new(r));
    }
    let dbs = Arc::new(replicators);
    let listener = control::bind(&config.replicate.control_socket)?;
    let server = tokio::spawn(control::serve(listener, Arc::clone(&dbs)));
    let code = if wrapper {
        run_app(&args.command).await?
    } else {
        wait_for_stop().await?;
        exit::OK
    };
    let stop_timeout = Duration::from_secs(args.stop_timeout);
    let mut failed = false;
    for r in dbs.iter() {
        if let Err(e) = stop(r, stop_timeout).await {
            tracing::error!(db = %r.db_path().display(), error = %format!("{e:#}"), "final flush failed; the cache keeps what was not shipped");
            failed = true;
        }
    }
    server.abort();
    let _ = std::fs::remove_file(&config.replicate.control_socket);
    if wrapper || !failed {
        Ok(code)
    } else {
        Ok(exit::FAILURE)
    }
}

/// Ships what is left, then stops.
async fn stop(r: &SqliteReplicator, timeout: Duration) -> anyhow::Result<()> {
    let flushed = r.flush_within(timeout).await;
    r.stop(Duration::from_secs(1)).await?;
    flushed?;
    Ok(())
}

async fn wait_for_stop() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping: shipping what is left");
    Ok(())
}

/// Runs the app to its end, passing signals on; returns its exit code.
async fn run_app(command: &[String]) -> anyhow::Result<u8> {
    let mut child = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .spawn()
        .with_context(|| format!("cannot start {}", command[0]))?;
    let pid = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(i32::try_from(id).ok()?))
        .context("the app has no process id")?;
    let mut streams = Vec::new();
    for (kind, sig) in FORWARDED {
        streams.push((signal(kind).context("cannot watch signals")?, sig));
    }
    let forward = async {
        loop {
            let received = futures::future::select_all(
                streams
                    .iter_mut()
                    .map(|(s, sig)| Box::pin(async move { s.recv().await.map(|()| *sig) })),
            )
            .await
            .0;
            if let Some(sig) = received {
                let _ = rustix::process::kill_process(pid, sig);
            }
        }
    };
    let status = tokio::select! {
        status = child.wait() => status.context("cannot wait for the app")?,
        () = forward => unreachable!("forwarding never ends"),
    };
    use std::os::unix::process::ExitStatusExt;
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(1),
        (None, Some(s)) => u8::try_from(128 + s).unwrap_or(255),
        (None, None) => 1,
    };
    tracing::info!(code, "app exited; shipping what is left");
    Ok(code)
}
