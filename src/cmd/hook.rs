//! `zlayer-storage hook poststop [--wait SECS] [--socket PATH]`: the OCI poststop hook.
//!
//! Exit codes (runc turns a failing poststop hook into a failing `runc delete`):
//! - 0: the daemon answered (queued, durable, or nothing to persist); also every runtime
//!   problem (daemon down, socket missing, timeout, error answer, store down, unreadable
//!   config), after exactly one line on stderr naming it. The layer is still synced when the
//!   container is removed.
//! - 2: malformed invocation: bad arguments (clap), or state JSON on stdin that is empty,
//!   oversized, not JSON, or lacks `id`/`bundle`; one line on stderr naming what is wrong.
//!
//! Quiet on success unless `-v`. Needs no environment (runc may pass none: no PATH, no HOME);
//! the socket comes from `--socket`, else the config (built-in defaults when the default file
//! is absent).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use zlayer_storage::Config;
use zlayer_storage::hook::wire::{ErrorCode, FlushResponse};
use zlayer_storage::hook::{self, OciState, Outcome};

use super::{exit, one_line};
use crate::cli::HookCommand;

/// Runs the hook; returns the exit code.
pub fn run(config: Option<&Path>, verbose: u8, command: &HookCommand) -> u8 {
    let HookCommand::Poststop(args) = command;
    let state = match OciState::read_from(std::io::stdin().lock()) {
        Ok(state) => state,
        Err(e) => {
            say(&format!("{:#}", anyhow::Error::new(e)));
            return exit::USAGE;
        }
    };
    let who = match hook::containerd_namespace(&state.bundle, &state.id) {
        Some(namespace) => format!("{namespace}/{}", state.id),
        None => state.id.clone(),
    };
    if state.is_sandbox() {
        if verbose > 0 {
            say(&format!("container {who}: pod sandbox, skipped"));
        }
        return exit::OK;
    }
    let socket = match socket(config, args.socket.as_deref()) {
        Ok(socket) => socket,
        Err(e) => {
            say(&format!("container {who} not flushed: {e:#}"));
            return exit::OK;
        }
    };
    let wait = Duration::from_secs(args.wait.unwrap_or(0));
    match hook::poststop(&state, &socket, wait) {
        Ok(Outcome::SkippedSandbox) => {}
        Ok(Outcome::Answered(response)) => report(&who, &response, wait, verbose),
        Err(e) => {
            debug_assert!(!e.is_invocation_error());
            say(&format!(
                "container {who} not flushed: {:#}",
                anyhow::Error::new(e)
            ));
        }
    }
    exit::OK
}

/// `--socket`, else `[snapshotter] control_socket` from the config.
fn socket(config: Option<&Path>, flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(socket) = flag {
        return Ok(socket.to_path_buf());
    }
    let config = Config::load(config, &|k| std::env::var(k).ok())?;
    Ok(config.snapshotter.control_socket)
}

/// One line for an error answer or a timeout; success only with `-v`.
fn report(who: &str, response: &FlushResponse, wait: Duration, verbose: u8) {
    let line = match response {
        FlushResponse::Error {
            code: ErrorCode::Timeout,
            error,
        } => format!(
            "container {who}: layer not durable within {} s, the flush goes on: {error}",
            wait.as_secs()
        ),
        FlushResponse::Error { code, error } => format!(
            "container {who} not flushed: the daemon answered {}: {error}",
            code.as_str()
        ),
        _ if verbose == 0 => return,
        FlushResponse::Queued { identity, .. } => format!(
            "container {who}: flush of {} queued",
            identity.as_deref().unwrap_or("its layer")
        ),
        FlushResponse::Durable {
            identity,
            digest,
            seq,
            ..
        } => format!(
            "container {who}: {} durable (seq {seq}, {digest})",
            identity.as_deref().unwrap_or("its layer")
        ),
        FlushResponse::NotPersisted => format!("container {who}: not persisted, nothing to flush"),
    };
    say(&line);
}

/// One line on stderr. A write error is ignored: failing here would fail `runc delete`.
fn say(line: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "zlayer-storage hook poststop: {}",
        one_line(line)
    );
}
