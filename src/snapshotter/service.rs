//! gRPC adapter: protobuf requests in, [`Snapshotter`] calls on the blocking pool, protobuf out.
//!
//! The `snapshotter` field of each request (containerd's plugin name) is ignored: one daemon
//! serves one snapshotter. gRPC metadata is ignored too; the key is the identity.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::proto::snapshots as pb;
use crate::proto::snapshots::snapshots_server::Snapshots;
use crate::proto::types as pbtypes;

use super::core::Snapshotter;
use super::error::SnapshotError;
use super::types::{Info, Kind, Labels, Mount};

/// containerd's Go service sends List results in batches of this many.
const LIST_BATCH: usize = 100;

/// The Snapshots service over a shared [`Snapshotter`].
#[derive(Debug, Clone)]
pub struct SnapshotService {
    core: Arc<Snapshotter>,
}

impl SnapshotService {
    #[must_use]
    pub fn new(core: Arc<Snapshotter>) -> Self {
        Self { core }
    }

    /// Runs blocking core work off the async runtime.
    async fn run<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Snapshotter) -> Result<T, SnapshotError> + Send + 'static,
    {
        let core = Arc::clone(&self.core);
        let result = tokio::task::spawn_blocking(move || f(&core))
            .await
            .map_err(SnapshotError::Join)?;
        result.map_err(|e| {
            log_error(&e);
            Status::from(e)
        })
    }
}

/// Expected outcomes (NotFound, AlreadyExists, ...) are part of the protocol; only log the rest.
fn log_error(e: &SnapshotError) {
    match e.code() {
        tonic::Code::Internal | tonic::Code::Unavailable => {
            tracing::error!(error = %e.full_message(), "snapshot request failed");
        }
        _ => tracing::debug!(error = %e, "snapshot request refused"),
    }
}

fn labels(map: HashMap<String, String>) -> Labels {
    map.into_iter().collect()
}

/// Converts a native kind; the proxy client would read `Unknown` as Committed, so every
/// snapshot always carries its real kind.
#[must_use]
pub fn kind_to_proto(kind: Kind) -> pb::Kind {
    match kind {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    }
}

/// UTC time as a protobuf timestamp, nanoseconds intact.
#[must_use]
pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

#[must_use]
pub fn info_to_proto(info: Info) -> pb::Info {
    pb::Info {
        name: info.name,
        parent: info.parent,
        kind: kind_to_proto(info.kind) as i32,
        created_at: Some(timestamp(info.created)),
        updated_at: Some(timestamp(info.updated)),
        labels: info.labels.into_iter().collect(),
    }
}

#[must_use]
pub fn mounts_to_proto(mounts: Vec<Mount>) -> Vec<pbtypes::Mount> {
    mounts
        .into_iter()
        .map(|m| pbtypes::Mount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for SnapshotService {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let mounts = self
            .run(move |c| c.prepare(&r.key, &r.parent, labels(r.labels)))
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts_to_proto(mounts),
        }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let mounts = self
            .run(move |c| c.view(&r.key, &r.parent, labels(r.labels)))
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts_to_proto(mounts),
        }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = request.into_inner();
        let mounts = self.run(move |c| c.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse {
            mounts: mounts_to_proto(mounts),
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        self.run(move |c| c.commit(&r.name, &r.key, labels(r.labels)))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        self.run(move |c| c.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info = self.run(move |c| c.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info_to_proto(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info = r
            .info
            .ok_or(SnapshotError::MissingField { field: "info" })?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let updated = self
            .run(move |c| c.update(&info.name, &labels(info.labels), &paths))
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info_to_proto(updated)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        let infos = self.run(move |c| c.list(&r.filters)).await?;
        let mut batches = Vec::with_capacity(infos.len().div_ceil(LIST_BATCH));
        let mut infos = infos.into_iter().peekable();
        while infos.peek().is_some() {
            let info = infos.by_ref().take(LIST_BATCH).map(info_to_proto).collect();
            batches.push(Ok(pb::ListSnapshotsResponse { info }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = request.into_inner();
        let u = self.run(move |c| c.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.run(Snapshotter::cleanup).await?;
        Ok(Response::new(()))
    }
}
