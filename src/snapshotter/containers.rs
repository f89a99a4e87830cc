//! Looking up a container record in containerd (Containers API), for identity resolution.
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

/// Container records by (namespace, id).
#[async_trait::async_trait]
pub trait ContainerLookup: Send + Sync + std::fmt::Debug {
    /// `Ok(None)` when the namespace has no such container (yet).
    async fn get(&self, namespace: &str, id: &str) -> Result<Option<ContainerRecord>, LookupError>;
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
}

#[async_trait::async_trait]
impl ContainerLookup for ContainerdContainers {
    async fn get(&self, namespace: &str, id: &str) -> Result<Option<ContainerRecord>, LookupError> {
        let mut request = tonic::Request::new(GetContainerRequest { id: id.to_string() });
        let ns = namespace.parse().map_err(|_| LookupError::BadNamespace {
            value: namespace.to_string(),
        })?;
        request.metadata_mut().insert("containerd-namespace", ns);
        request.set_timeout(LOOKUP_TIMEOUT);
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
