//! The daemon's control API on its own unix socket: flush a stopped container's layer, show
//! and steer what the daemon does (`proto/zlayer/control/v1/control.proto`). The same socket
//! answers the poststop hook's one-line JSON protocol ([`line`]), told apart from gRPC by the
//! first byte, so the hook needs no HTTP/2 stack.

pub mod client;
mod error;
pub mod line;
mod server;
mod service;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use error::ControlError;
pub use server::{ServeError, serve};
pub use service::ControlService;

use crate::layer::types::ContainerLayerId;
use crate::snapshotter::persist::{FlushDone, FlushRequest, FlushTicket, Persistence};

/// What the control API works on.
#[derive(Debug, Clone)]
pub struct Control {
    persistence: Arc<Persistence>,
    /// Default wait of a flush that asks to wait without a timeout.
    flush_timeout: Duration,
    /// Whether the events watcher is subscribed (for `status`).
    events_connected: Arc<AtomicBool>,
}

impl Control {
    #[must_use]
    pub fn new(persistence: Arc<Persistence>, flush_timeout: Duration) -> Self {
        Self {
            persistence,
            flush_timeout,
            events_connected: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The flag the events watcher keeps up to date.
    #[must_use]
    pub fn events_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.events_connected)
    }

    fn events_connected(&self) -> bool {
        self.events_connected.load(Ordering::Relaxed)
    }

    /// Records a flush and, when `wait` is given, waits for it to be durable.
    pub async fn flush(
        &self,
        req: FlushRequest,
        wait: Option<Duration>,
    ) -> Result<(FlushTicket, Option<FlushDone>), ControlError> {
        let ticket = self.persistence.request_flush(req).await?;
        let done = match (&ticket, wait) {
            (FlushTicket::NotPersisted, _) | (_, None) => None,
            (t, Some(timeout)) => {
                let timeout = if timeout.is_zero() {
                    self.flush_timeout
                } else {
                    timeout
                };
                Some(self.persistence.wait_flush(t, timeout).await?)
            }
        };
        Ok((ticket, done))
    }

    /// Identity of a ticket, if any.
    fn ticket_identity(t: &FlushTicket) -> Option<&ContainerLayerId> {
        match t {
            FlushTicket::Recorded { identity, .. } | FlushTicket::Queued { identity } => {
                Some(identity)
            }
            FlushTicket::NotPersisted => None,
        }
    }
}

impl Control {
    /// Identities in the store (the cross-node view).
    pub async fn list(&self) -> Result<crate::proto::control::ListResponse, ControlError> {
        Err(ControlError::invalid("list: not yet"))
    }

    /// Drops `identity`'s manifest from the store.
    pub async fn forget(&self, identity: &ContainerLayerId) -> Result<bool, ControlError> {
        let _ = identity;
        Err(ControlError::invalid("forget: not yet"))
    }
}
