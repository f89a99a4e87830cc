//! The gRPC `Control` service over [`Control`].

use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{Control, ControlError};
use crate::layer::types::ContainerLayerId;
use crate::proto::control as pb;
use crate::proto::control::control_server::Control as ControlRpc;
use crate::snapshotter::key::BackendKey;
use crate::snapshotter::persist::{FlushRequest, FlushTarget, FlushTicket};

/// The gRPC adapter.
#[derive(Debug, Clone)]
pub struct ControlService {
    control: Control,
}

impl ControlService {
    #[must_use]
    pub fn new(control: Control) -> Self {
        Self { control }
    }
}

/// Newest flush requests shown per identity.
const FLUSHES_SHOWN: i64 = 5;

fn parse_identity(s: &str) -> Result<ContainerLayerId, ControlError> {
    ContainerLayerId::parse(s)
        .ok_or_else(|| ControlError::invalid(format!("identity {s:?} is not SERVICE/INSTANCE")))
}

fn unix_ms(ns: i64) -> i64 {
    ns / 1_000_000
}

/// The flush target a request names.
fn flush_target(req: &pb::FlushRequest) -> Result<FlushTarget, ControlError> {
    let namespace = if req.namespace.is_empty() {
        "default".to_string()
    } else {
        req.namespace.clone()
    };
    match &req.target {
        Some(pb::flush_request::Target::ContainerId(id)) if !id.is_empty() => {
            Ok(FlushTarget::Container {
                namespace,
                id: id.clone(),
            })
        }
        Some(pb::flush_request::Target::SnapshotKey(k)) if !k.is_empty() => {
            Ok(if BackendKey::parse(k).is_some() {
                FlushTarget::BackendKey(k.clone())
            } else {
                FlushTarget::Container {
                    namespace,
                    id: k.clone(),
                }
            })
        }
        Some(pb::flush_request::Target::Identity(i)) => {
            Ok(FlushTarget::Identity(parse_identity(i)?))
        }
        _ => Err(ControlError::invalid(
            "name a container_id, snapshot_key or identity",
        )),
    }
}

#[tonic::async_trait]
impl ControlRpc for ControlService {
    async fn flush(
        &self,
        request: Request<pb::FlushRequest>,
    ) -> Result<Response<pb::FlushResponse>, Status> {
        let req = request.into_inner();
        let target = flush_target(&req)?;
        let trigger = if req.trigger.is_empty() {
            "api".to_string()
        } else {
            req.trigger.clone()
        };
        let flush = FlushRequest {
            target,
            trigger,
            allow_running: req.allow_running,
            stopped: false,
        };
        let wait = req.wait.then(|| Duration::from_millis(req.timeout_ms));
        let (ticket, done) = self.control.flush(flush, wait).await?;
        let mut resp = pb::FlushResponse {
            identity: Control::ticket_identity(&ticket)
                .map(ToString::to_string)
                .unwrap_or_default(),
            request_id: match &ticket {
                FlushTicket::Recorded { id, .. } => u64::try_from(*id).unwrap_or(0),
                _ => 0,
            },
            state: match &ticket {
                FlushTicket::NotPersisted => "not_persisted",
                _ => "queued",
            }
            .to_string(),
            crash_consistent: !req.allow_running,
            ..pb::FlushResponse::default()
        };
        if let Some(d) = done {
            resp.state = "durable".to_string();
            resp.digest = d.digest;
            resp.seq = d.seq;
            resp.unchanged = d.unchanged;
            resp.crash_consistent = d.crash_consistent;
        }
        Ok(Response::new(resp))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let req = request.into_inner();
        let only = if req.identity.is_empty() {
            None
        } else {
            Some(parse_identity(&req.identity)?)
        };
        Ok(Response::new(self.control.status(only, req.remote).await?))
    }

    async fn list(
        &self,
        _request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        Ok(Response::new(self.control.list().await?))
    }

    async fn forget(
        &self,
        request: Request<pb::ForgetRequest>,
    ) -> Result<Response<pb::ForgetResponse>, Status> {
        let identity = parse_identity(&request.into_inner().identity)?;
        let removed = self.control.forget(&identity).await?;
        Ok(Response::new(pb::ForgetResponse { removed }))
    }

    async fn checkpoint(
        &self,
        request: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        let req = request.into_inner().target.unwrap_or_default();
        let target = flush_target(&req)?;
        let trigger = if req.trigger.is_empty() {
            "api"
        } else {
            req.trigger.as_str()
        };
        let done = self
            .control
            .persistence
            .checkpoint_now(target, trigger)
            .await
            .map_err(ControlError::from)?;
        Ok(Response::new(pb::CheckpointResponse {
            identity: done.identity.to_string(),
            digest: done.digest,
            seq: done.seq,
            unchanged: done.unchanged,
            pause_us: u64::try_from(done.paused.as_micros()).unwrap_or(u64::MAX),
            bytes: done.bytes,
            at_unix_ms: unix_ms(done.at_ns),
            user_paused: done.user_paused,
        }))
    }
}

impl Control {
    /// Per-identity state on this node (and in the store when `remote`).
    pub async fn status(
        &self,
        only: Option<ContainerLayerId>,
        remote: bool,
    ) -> Result<pb::StatusResponse, ControlError> {
        let p = std::sync::Arc::clone(&self.persistence);
        let (live, queued, manager_states) = {
            let p2 = std::sync::Arc::clone(&p);
            let (live, queued) = tokio::task::spawn_blocking(move || {
                Ok::<_, ControlError>((p2.live_identities()?, p2.queued()?))
            })
            .await
            .map_err(|e| ControlError::invalid(format!("status task failed: {e}")))??;
            let states = p
                .manager()
                .status()
                .await
                .map_err(|source| ControlError::Layer {
                    op: "read sync state of",
                    identity: "all identities".to_string(),
                    source: Box::new(source),
                })?;
            (live, queued, states)
        };
        let mut ids: Vec<ContainerLayerId> = live
            .iter()
            .map(|(i, _)| i.clone())
            .chain(queued.iter().map(|r| r.identity.clone()))
            .chain(manager_states.iter().map(|s| s.container_id.clone()))
            .collect();
        ids.sort_by_key(ToString::to_string);
        ids.dedup();
        if let Some(o) = &only {
            ids.retain(|i| i == o);
            if ids.is_empty() {
                ids.push(o.clone());
            }
        }
        let mut out = pb::StatusResponse {
            outbox_layers: queued.len() as u64,
            dead_letters: queued.iter().filter(|r| r.dead).count() as u64,
            store: p.manager().store().describe(),
            events_connected: self.events_connected(),
            ..pb::StatusResponse::default()
        };
        if let Some(dir) = p.outbox_dir().and_then(|d| d.parent()) {
            out.quarantined = crate::snapshotter::persist::node_status(dir)
                .ok()
                .flatten()
                .map(|s| {
                    s.quarantined
                        .iter()
                        .map(|q| q.display().to_string())
                        .collect()
                })
                .unwrap_or_default();
        }
        for id in ids {
            let mut st = pb::IdentityStatus {
                identity: id.to_string(),
                snapshot_key: live
                    .iter()
                    .find(|(i, _)| *i == id)
                    .map(|(_, k)| k.clone())
                    .unwrap_or_default(),
                ..pb::IdentityStatus::default()
            };
            if let Some(s) = manager_states.iter().find(|s| s.container_id == id) {
                st.local_digest = s
                    .remote_digest
                    .clone()
                    .or_else(|| s.local_digest.clone())
                    .unwrap_or_default();
                st.last_sync_unix_ms = s.last_sync.map_or(0, |t| t.timestamp_millis());
                st.upload_bytes_done = s.pending_upload.as_ref().map_or(0, |u| {
                    (u.completed_parts.len() as u64 * u.part_size).min(u.total_size)
                });
            }
            st.queued = queued
                .iter()
                .filter(|r| r.identity == id)
                .map(|r| pb::QueuedLayer {
                    outbox_id: r.id,
                    seq: r.seq,
                    location: format!("{:?}", r.location).to_lowercase(),
                    attempts: r.attempts,
                    dead: r.dead,
                    last_error: r.last_error.clone().unwrap_or_default(),
                    queued_unix_ms: unix_ms(r.created_ns),
                })
                .collect();
            let (p3, id3) = (std::sync::Arc::clone(&p), id.clone());
            let (flushes, synced, checkpoint) = tokio::task::spawn_blocking(move || {
                Ok::<_, ControlError>((
                    p3.recent_flushes(&id3, FLUSHES_SHOWN)?,
                    p3.synced_seq(&id3)?,
                    p3.checkpoint_state(&id3)?,
                ))
            })
            .await
            .map_err(|e| ControlError::invalid(format!("status task failed: {e}")))??;
            st.synced_seq = synced;
            if let Some(c) = checkpoint {
                st.durable_unix_ms = c.durable_ns.map_or(0, unix_ms);
                st.checkpoint_attempted_unix_ms = unix_ms(c.attempted_ns);
                st.checkpoint_failures = c.failures;
                st.checkpoint_error = c.last_error.unwrap_or_default();
                st.checkpoint_pause_us = c.pause_us.map_or(0, |v| u64::try_from(v).unwrap_or(0));
                st.checkpoint_bytes = c.bytes.map_or(0, |v| u64::try_from(v).unwrap_or(0));
            }
            st.flushes = flushes
                .into_iter()
                .map(|f| pb::FlushState {
                    request_id: u64::try_from(f.id).unwrap_or(0),
                    state: f.state.as_str().to_string(),
                    trigger: f.trigger,
                    requested_unix_ms: unix_ms(f.requested_ns),
                    finished_unix_ms: f.finished_ns.map_or(0, unix_ms),
                    digest: f.digest.unwrap_or_default(),
                    seq: f.seq.unwrap_or(0),
                    error: f.error.unwrap_or_default(),
                })
                .collect();
            if remote {
                match p.manager().manifest(&id).await {
                    Ok(Some(m)) => {
                        st.remote_digest = m.current.digest;
                        st.remote_seq = m.current.seq;
                    }
                    Ok(None) => {}
                    Err(e) => st.remote_error = crate::util::error_chain(&e),
                }
            }
            out.identities.push(st);
        }
        Ok(out)
    }
}
