//! The OCI poststop hook: tells the daemon "this container stopped, flush its layer now".
//!
//! runc runs poststop hooks inside `runc delete` and turns a failing hook into a failing delete,
//! and CRI gives the whole task delete 10 s. So this path is synchronous (std sockets, no async
//! runtime), bounded in time (connect ≤ [`CONNECT_TIMEOUT`], answer ≤ [`ANSWER_TIMEOUT`] or
//! the caller's wait + 1 s), and its runtime failures are the caller's to log, never to fail on
//! (see [`HookError::is_invocation_error`]).
//!
//! The snapshot is named by the `upperdir=` of the overlay still mounted at `<bundle>/rootfs`
//! (the runc shim unmounts it only after `runc delete` returns), plus namespace and container id
//! for the daemon to fall back on. The hook is only a timing signal: the daemon already knows
//! every snapshot's upper dir, and coalesces repeated requests (a retried delete sends two).
//!
//! [`wire`] holds the line protocol both ends speak.

mod bundle;
mod client;
mod error;
mod mountinfo;
mod state;
pub mod wire;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use bundle::containerd_namespace;
pub use error::HookError;
pub use mountinfo::overlay_upper;
pub use state::{CRI_CONTAINER_TYPE, CRIO_CONTAINER_TYPE, MAX_STATE_BYTES, OciState};
use wire::{FlushRequest, FlushResponse, Op};

/// Longest wait for the daemon to accept the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait for the answer when not waiting for the upload (the daemon only has to record
/// the request).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Slack on top of `--wait` for the daemon's own `timeout` answer to arrive.
const WAIT_SLACK: Duration = Duration::from_secs(1);

/// What the hook did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A pod sandbox: nothing sent.
    SkippedSandbox,
    /// The daemon's answer (which may be an error answer).
    Answered(FlushResponse),
}

/// The flush request for the container in `state`, with the upper dir found in `mountinfo`
/// (the text of `/proc/self/mountinfo`; `None` if it could not be read).
#[must_use]
pub fn request_for(state: &OciState, mountinfo: Option<&[u8]>, wait: Duration) -> FlushRequest {
    let upper = mountinfo
        .and_then(|m| rootfs_upper(m, &state.bundle))
        .and_then(|p| p.into_os_string().into_string().ok());
    FlushRequest {
        v: wire::VERSION,
        op: Op::Flush,
        origin: wire::ORIGIN_HOOK.to_string(),
        namespace: containerd_namespace(&state.bundle, &state.id).unwrap_or_default(),
        container_id: state.id.clone(),
        upper,
        status: state.status.clone(),
        wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
    }
}

/// The upper dir of the overlay at `<bundle>/rootfs`; the bundle's canonical path is tried too,
/// since mountinfo shows resolved paths and a bundle path may pass through a symlink.
fn rootfs_upper(mountinfo: &[u8], bundle: &Path) -> Option<PathBuf> {
    overlay_upper(mountinfo, &bundle.join("rootfs")).or_else(|| {
        let real = std::fs::canonicalize(bundle).ok()?;
        (real != bundle)
            .then(|| overlay_upper(mountinfo, &real.join("rootfs")))
            .flatten()
    })
}

/// Asks the daemon on `socket` to flush the container in `state`; with a non-zero `wait`, the
/// answer comes once the layer is durable (or with a `timeout` code after `wait`).
pub fn poststop(state: &OciState, socket: &Path, wait: Duration) -> error::Result<Outcome> {
    if state.is_sandbox() {
        return Ok(Outcome::SkippedSandbox);
    }
    // Unreadable mountinfo only costs the shortcut: the daemon resolves by container id.
    let mountinfo = std::fs::read("/proc/self/mountinfo").ok();
    let request = request_for(state, mountinfo.as_deref(), wait);
    let answer_timeout = if wait.is_zero() {
        ANSWER_TIMEOUT
    } else {
        wait + WAIT_SLACK
    };
    let stream = client::connect(socket, CONNECT_TIMEOUT)?;
    let response = client::exchange(stream, socket, &request, answer_timeout)?;
    Ok(Outcome::Answered(response))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(annotations: &[(&str, &str)]) -> OciState {
        OciState {
            id: "c1".into(),
            bundle: "/run/containerd/io.containerd.runtime.v2.task/default/c1".into(),
            status: "stopped".into(),
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        }
    }

    #[test]
    fn the_request_carries_namespace_id_upper_status_and_wait() {
        let mountinfo = b"301 25 0:55 / /run/containerd/io.containerd.runtime.v2.task/default/c1/rootfs rw - overlay overlay rw,lowerdir=/l,upperdir=/zl/snapshots/7/fs,workdir=/w\n";
        let r = request_for(&state(&[]), Some(mountinfo), Duration::from_secs(30));
        assert_eq!(r.v, wire::VERSION);
        assert_eq!(r.origin, "hook");
        assert_eq!(r.namespace, "default");
        assert_eq!(r.container_id, "c1");
        assert_eq!(r.upper.as_deref(), Some("/zl/snapshots/7/fs"));
        assert_eq!(r.status, "stopped");
        assert_eq!(r.wait_ms, 30_000);
        // No mount (already unmounted, or a VM runtime): no upper; unknown layout: no namespace.
        let mut other = state(&[]);
        other.bundle = "/var/run/crio/c1".into();
        let r = request_for(&other, None, Duration::ZERO);
        assert_eq!((r.namespace.as_str(), r.upper, r.wait_ms), ("", None, 0));
    }

    #[test]
    fn sandboxes_are_skipped_without_touching_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("c.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let outcome = poststop(
            &state(&[(CRI_CONTAINER_TYPE, "sandbox")]),
            &socket,
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(outcome, Outcome::SkippedSandbox);
        assert_eq!(
            listener.accept().unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock,
            "the hook connected for a sandbox"
        );
    }
}
