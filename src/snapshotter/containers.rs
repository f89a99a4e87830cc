//! Looking up a container record in containerd (Containers API), for identity resolution, and
//! its task's state (Tasks API), so a running container is not flushed by accident.
//!
//! At Prepare the container record does not exist yet; by the second Mounts it does, and its
//! labels (`zlayer.id`, `nerdctl/name`) may name the identity. The lookup sits behind
//! [`ContainerLookup`] so tests can answer without a containerd.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::GetContainerRequest;
use containerd_client::services::v1::containers_client::ContainersClient;
use tonic::transport::{Channel, Endpoint};

/// How long one lookup may take; Mounts waits for it.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// What the snapshotter needs from a container record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerRecord {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    /// The client snapshot key of the container's rootfs (normally equal to the id).
    pub snapshot_key: String,
}

/// Why a lookup gave no answer (as opposed to "no such container").
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("containerd lookup of container {namespace}/{id} failed")]
    Rpc {
        namespace: String,
        id: String,
        #[source]
        source: Box<tonic::Status>,
    },
    #[error("containerd lookup of container {namespace}/{id} timed out")]
    Timeout { namespace: String, id: String },
    #[error("{value:?} cannot be sent as a containerd namespace")]
    BadNamespace { value: String },
}

/// State of a container's task (init process), as far as a flush cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStatus {
    /// No task: never started, or deleted.
    Absent,
    Created,
    Running,
    Paused,
    Pausing,
    Stopped,
    Unknown,
}

impl TaskStatus {
    /// Whether the container's processes may still write to its upper dir.
    #[must_use]
    pub fn may_write(self) -> bool {
        matches!(
            self,
            Self::Created | Self::Running | Self::Paused | Self::Pausing | Self::Unknown
        )
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Absent => "absent",
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Pausing => "pausing",
            Self::Stopped => "stopped",
            Self::Unknown => "unknown",
        }
    }
}

/// Container records and task states by (namespace, id).
#[async_trait::async_trait]
pub trait ContainerLookup: Send + Sync + std::fmt::Debug {
    /// `Ok(None)` when the namespace has no such container (yet).
    async fn get(&self, namespace: &str, id: &str) -> Result<Option<ContainerRecord>, LookupError>;
    /// The state of the container's task.
    async fn task_status(&self, namespace: &str, id: &str) -> Result<TaskStatus, LookupError>;
    /// The state of the container's task and its init process id (0 when there is none or
    /// the lookup cannot tell, as for lookups that only know states).
    async fn task(&self, namespace: &str, id: &str) -> Result<(TaskStatus, u32), LookupError> {
        Ok((self.task_status(namespace, id).await?, 0))
    }
}

/// The containerd Containers API over its unix socket. The channel connects lazily, so the
/// snapshotter can start before containerd, and reconnects after containerd restarts.
#[derive(Debug, Clone)]
pub struct ContainerdContainers {
    address: PathBuf,
    channel: Channel,
}

impl ContainerdContainers {
    /// A client for the socket at `address`; nothing is dialled until the first lookup.
    #[must_use]
    pub fn new(address: &Path) -> Self {
        let path = address.to_path_buf();
        let channel = Endpoint::from_static("http://[::]")
            .connect_timeout(LOOKUP_TIMEOUT)
            .connect_with_connector_lazy(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }));
        Self {
            address: address.to_path_buf(),
            channel,
        }
    }

    /// The socket this client dials.
    #[must_use]
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// The channel to containerd (shared by the events watcher).
    #[must_use]
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }
}

/// `request` with the namespace header and the lookup timeout set.
fn namespaced<T>(namespace: &str, message: T) -> Result<tonic::Request<T>, LookupError> {
    let mut request = tonic::Request::new(message);
    let ns = namespace.parse().map_err(|_| LookupError::BadNamespace {
        value: namespace.to_string(),
    })?;
    request.metadata_mut().insert("containerd-namespace", ns);
    request.set_timeout(LOOKUP_TIMEOUT);
    Ok(request)
}

#[async_trait::async_trait]
impl ContainerLookup for ContainerdContainers {
    async fn get(&self, namespace: &str, id: &str) -> Result<Option<ContainerRecord>, LookupError> {
        let request = namespaced(namespace, GetContainerRequest { id: id.to_string() })?;
        let mut client = ContainersClient::new(self.channel.clone());
        let call = tokio::time::timeout(LOOKUP_TIMEOUT, client.get(request));
        let reply = match call.await {
            Err(_) => {
                return Err(LookupError::Timeout {
                    namespace: namespace.to_string(),
                    id: id.to_string(),
                });
            }
            Ok(reply) => reply,
        };
        match reply {
            Ok(reply) => Ok(reply.into_inner().container.map(|c| ContainerRecord {
                id: c.id,
                labels: c.labels.into_iter().collect(),
                snapshot_key: c.snapshot_key,
            })),
            // containerd validates ids: a key that is no valid container id has no record.
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::NotFound | tonic::Code::InvalidArgument
                ) =>
            {
                Ok(None)
            }
            Err(s) => Err(LookupError::Rpc {
                namespace: namespace.to_string(),
                id: id.to_string(),
                source: Box::new(s),
            }),
        }
    }

    async fn task_status(&self, namespace: &str, id: &str) -> Result<TaskStatus, LookupError> {
        Ok(self.get_task(namespace, id).await?.0)
    }

    async fn task(&self, namespace: &str, id: &str) -> Result<(TaskStatus, u32), LookupError> {
        self.get_task(namespace, id).await
    }
}

impl ContainerdContainers {
    async fn get_task(&self, namespace: &str, id: &str) -> Result<(TaskStatus, u32), LookupError> {
        use containerd_client::services::v1::GetRequest;
        use containerd_client::services::v1::tasks_client::TasksClient;
        use containerd_client::types::v1::Status;
        let request = namespaced(
            namespace,
            GetRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            },
        )?;
        let mut client = TasksClient::new(self.channel.clone());
        let reply = tokio::time::timeout(LOOKUP_TIMEOUT, client.get(request))
            .await
            .map_err(|_| LookupError::Timeout {
                namespace: namespace.to_string(),
                id: id.to_string(),
            })?;
        match reply {
            Ok(reply) => {
                let Some(process) = reply.into_inner().process else {
                    return Ok((TaskStatus::Absent, 0));
                };
                let status = match Status::try_from(process.status) {
                    Ok(Status::Created) => TaskStatus::Created,
                    Ok(Status::Running) => TaskStatus::Running,
                    Ok(Status::Stopped) => TaskStatus::Stopped,
                    Ok(Status::Paused) => TaskStatus::Paused,
                    Ok(Status::Pausing) => TaskStatus::Pausing,
                    Ok(Status::Unknown) | Err(_) => TaskStatus::Unknown,
                };
                Ok((status, process.pid))
            }
            Err(s) if s.code() == tonic::Code::NotFound => Ok((TaskStatus::Absent, 0)),
            Err(s) => Err(LookupError::Rpc {
                namespace: namespace.to_string(),
                id: id.to_string(),
                source: Box::new(s),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_absent_containerd_is_an_error_not_a_missing_record() {
        let d = tempfile::tempdir().unwrap();
        let c = ContainerdContainers::new(&d.path().join("containerd.sock"));
        let err = c.get("default", "c1").await.unwrap_err();
        assert!(matches!(err, LookupError::Rpc { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn a_namespace_that_is_no_header_value_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let c = ContainerdContainers::new(&d.path().join("containerd.sock"));
        let err = c.get("bad\nns", "c1").await.unwrap_err();
        assert!(matches!(err, LookupError::BadNamespace { .. }), "{err:?}");
    }
}
