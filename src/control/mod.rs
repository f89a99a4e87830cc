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
        let ids = self
            .persistence
            .manager()
            .list_identities()
            .await
            .map_err(|source| ControlError::Layer {
                op: "list",
                identity: "the identities in the store".to_string(),
                source: Box::new(source),
            })?;
        Ok(crate::proto::control::ListResponse {
            identities: ids
                .into_iter()
                .map(|i| crate::proto::control::StoredIdentity {
                    identity: i.identity.to_string(),
                    digest: i.digest,
                    seq: i.seq,
                    compressed_size_bytes: i.compressed_size_bytes,
                    size_bytes: i.size_bytes,
                    created_unix_ms: i.created_at.timestamp_millis(),
                    versions: u32::try_from(i.versions).unwrap_or(u32::MAX),
                })
                .collect(),
        })
    }

    /// Drops `identity`'s manifest from the store; refused while this node holds it in a
    /// live snapshot or has layers of it queued (they would bring it back, or be lost).
    pub async fn forget(&self, identity: &ContainerLayerId) -> Result<bool, ControlError> {
        let p = Arc::clone(&self.persistence);
        let (live, queued) = tokio::task::spawn_blocking(move || {
            Ok::<_, ControlError>((p.live_identities()?, p.queued()?))
        })
        .await
        .map_err(|e| ControlError::invalid(format!("forget task failed: {e}")))??;
        if let Some((_, key)) = live.iter().find(|(i, _)| i == identity) {
            return Err(ControlError::InUse {
                identity: identity.to_string(),
                reason: format!("held by live snapshot {key}"),
            });
        }
        let n = queued.iter().filter(|r| &r.identity == identity).count();
        if n > 0 {
            return Err(ControlError::InUse {
                identity: identity.to_string(),
                reason: format!("{n} layers of it are queued for upload"),
            });
        }
        let forgotten = self
            .persistence
            .manager()
            .forget(identity)
            .await
            .map_err(|source| ControlError::Layer {
                op: "forget",
                identity: identity.to_string(),
                source: Box::new(source),
            })?;
        tracing::warn!(%identity, manifest_deleted = forgotten.manifest_deleted, "identity forgotten");
        Ok(forgotten.manifest_deleted)
    }
}
