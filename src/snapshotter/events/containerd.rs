//! containerd's Events API as an [`EventSource`].
//!
//! containerd's gRPC server sends a stream's response headers only with its first message, so
//! `Subscribe` does not return until an event arrives: a quiet node would leave the watcher
//! unsure whether it is subscribed, and without a safe moment to reconcile. While the call is
//! pending we therefore publish a marker event on a topic of our own that the subscription's
//! filters include; the first message that comes back (the marker, or a real event) proves the
//! subscription is registered. A marker published before the registration is lost, so it is
//! repeated with backoff until the call returns.

use std::time::Duration;

use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::{PublishRequest, SubscribeRequest};
use tonic::transport::Channel;

use super::{DELETE_TOPIC, EXIT_TOPIC, EnvelopeStream, EventSource, EventsError, MAX_BACKOFF};

/// Topic of the marker event (not a containerd topic; components are identifiers).
pub const MARKER_TOPIC: &str = "/zlayer-storage/subscribed";
/// Namespace the marker is published in (no namespace record is created for it).
const MARKER_NAMESPACE: &str = "zlayer-storage";
/// `type_url` of the marker's empty payload.
const MARKER_TYPE: &str = "zlayer-storage/subscribed";
/// First delay between markers.
const FIRST_MARKER_DELAY: Duration = Duration::from_millis(100);
/// Bound on one marker publication.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(3);

/// containerd's Events API over the daemon's channel to containerd.
#[derive(Debug, Clone)]
pub struct ContainerdEvents {
    channel: Channel,
}

impl ContainerdEvents {
    /// A source on `channel` (a lazy channel; nothing is dialled until [`EventSource::subscribe`]).
    #[must_use]
    pub fn new(channel: Channel) -> Self {
        Self { channel }
    }

    /// The subscription's filters (any may match): the two task topics and our marker.
    #[must_use]
    pub fn filters() -> Vec<String> {
        [EXIT_TOPIC, DELETE_TOPIC, MARKER_TOPIC]
            .iter()
            .map(|t| format!("topic=={t:?}"))
            .collect()
    }

    async fn publish_marker(&self) -> Result<(), tonic::Status> {
        let mut request = tonic::Request::new(PublishRequest {
            topic: MARKER_TOPIC.to_string(),
            event: Some(prost_types::Any {
                type_url: MARKER_TYPE.to_string(),
                value: Vec::new(),
            }),
        });
        request.metadata_mut().insert(
            "containerd-namespace",
            tonic::metadata::MetadataValue::from_static(MARKER_NAMESPACE),
        );
        request.set_timeout(PUBLISH_TIMEOUT);
        EventsClient::new(self.channel.clone())
            .publish(request)
            .await
            .map(drop)
    }
}

#[async_trait::async_trait]
impl EventSource for ContainerdEvents {
    async fn subscribe(&self) -> Result<EnvelopeStream, EventsError> {
        let mut client = EventsClient::new(self.channel.clone());
        let call = client.subscribe(SubscribeRequest {
            filters: Self::filters(),
        });
        tokio::pin!(call);
        let mut delay = FIRST_MARKER_DELAY;
        let mut warned = false;
        loop {
            tokio::select! {
                biased;
                reply = &mut call => {
                    return match reply {
                        Ok(reply) => Ok(Box::pin(reply.into_inner())),
                        Err(status) => Err(EventsError::Subscribe { source: Box::new(status) }),
                    };
                }
                () = tokio::time::sleep(delay) => {}
            }
            // A failure here is the subscription's failure too (it ends the call), or a
            // containerd refusing markers: then only a real event confirms the subscription.
            if let Err(status) = self.publish_marker().await {
                if !warned && status.code() != tonic::Code::Unavailable {
                    tracing::warn!(error = %status, topic = MARKER_TOPIC,
                        "cannot publish the subscription marker; the first task event will confirm the subscription");
                    warned = true;
                } else {
                    tracing::debug!(error = %status, "cannot publish the subscription marker");
                }
            }
            delay = (delay * 2).min(MAX_BACKOFF);
        }
    }
}
