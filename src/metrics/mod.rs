//! Prometheus metrics of the daemon, and the endpoint serving them ([`MetricsServer`]).
//!
//! One process-global registry, created on first use. Recording is a few atomic operations, so
//! code records unconditionally; the values are only read when `[metrics] address` is set and
//! something scrapes it. Names are prefixed `zlayer_` and in base units; labels come from
//! the closed enums below only, never from a container or an identity, so the number of series
//! stays fixed.
//!
//! This module depends on no other module of the crate: anything may call it.

mod server;

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

pub use server::{MetricsError, MetricsServer, serve};

/// What asked for a flush or a sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// The OCI poststop hook.
    Hook,
    /// containerd's task events.
    Event,
    /// The reconcile pass after (re)connecting to containerd's events.
    Reconcile,
    /// The operator CLI.
    Cli,
    /// The control API called by something else than the CLI.
    Api,
    /// A removed snapshot's layer, uploaded from the outbox.
    Remove,
}

/// How a flush ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A new layer is in the store.
    Durable,
    /// The store already had this upper dir's layer: nothing was uploaded.
    Unchanged,
    Failed,
}

/// Where a restored layer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RestoreSource {
    /// Downloaded from the object store.
    Store,
    /// Copied from a queued layer in the local outbox (its upload still pending).
    Outbox,
}

/// What failed, for `zlayer_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The object store failed or could not be reached.
    Store,
    /// A local layer could not be read, packed or written.
    Local,
    /// containerd could not tell a container's labels.
    Lookup,
    /// A layer could not be restored.
    Restore,
    /// A flush failed.
    Flush,
    /// A malformed request on the hook's line protocol.
    HookProtocol,
}

impl Trigger {
    pub const ALL: [Self; 6] = [
        Self::Hook,
        Self::Event,
        Self::Reconcile,
        Self::Cli,
        Self::Api,
        Self::Remove,
    ];

    /// The trigger named `name` (as [`Self::as_str`] spells it); `None` for any other name,
    /// which callers count as [`Self::Api`] so a client cannot add label values.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hook => "hook",
            Self::Event => "event",
            Self::Reconcile => "reconcile",
            Self::Cli => "cli",
            Self::Api => "api",
            Self::Remove => "remove",
        }
    }
}

impl Outcome {
    /// A successful flush: [`Self::Unchanged`] when nothing had to be uploaded.
    pub fn succeeded(unchanged: bool) -> Self {
        if unchanged {
            Self::Unchanged
        } else {
            Self::Durable
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Durable => "durable",
            Self::Unchanged => "unchanged",
            Self::Failed => "failed",
        }
    }
}

impl RestoreSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Store => "store",
            Self::Outbox => "outbox",
        }
    }
}

impl ErrorKind {
    pub const ALL: [Self; 6] = [
        Self::Store,
        Self::Local,
        Self::Lookup,
        Self::Restore,
        Self::Flush,
        Self::HookProtocol,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Store => "store",
            Self::Local => "local",
            Self::Lookup => "lookup",
            Self::Restore => "restore",
            Self::Flush => "flush",
            Self::HookProtocol => "hook_protocol",
        }
    }
}

macro_rules! label_value {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    )*};
}
label_value!(Trigger, Outcome, RestoreSource, ErrorKind);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FlushLabels {
    trigger: Trigger,
    outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TriggerLabels {
    trigger: Trigger,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SourceLabels {
    source: RestoreSource,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: ErrorKind,
}

/// Bucket bounds in seconds for flush, sync and restore durations: an unchanged flush costs a
/// fingerprint walk (milliseconds), a large layer's upload takes minutes.
const DURATION_BUCKETS: [f64; 17] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0,
    1800.0,
];

#[derive(Debug, Clone, Copy)]
struct DurationHistogram;

impl MetricConstructor<Histogram> for DurationHistogram {
    fn new_metric(&self) -> Histogram {
        Histogram::new(DURATION_BUCKETS)
    }
}

type Durations<L> = Family<L, Histogram, DurationHistogram>;

/// How a checkpoint of a running container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckpointOutcome {
    /// A new version is current.
    Durable,
    /// Nothing changed since the current version.
    Unchanged,
    /// The pause overran its budget or the freezer did not freeze in time.
    PauseTimeout,
    Failed,
}

impl CheckpointOutcome {
    const ALL: [Self; 4] = [
        Self::Durable,
        Self::Unchanged,
        Self::PauseTimeout,
        Self::Failed,
    ];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Durable => "durable",
            Self::Unchanged => "unchanged",
            Self::PauseTimeout => "pause_timeout",
            Self::Failed => "failed",
        }
    }
}

label_value!(CheckpointOutcome);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CheckpointLabels {
    outcome: CheckpointOutcome,
}

/// Pause bounds in seconds: the default budget is 0.2 s.
const PAUSE_BUCKETS: [f64; 11] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.5, 1.0,
];
/// Compressed bytes a checkpoint uploads: from a few KiB of changes to a full layer.
const BYTES_BUCKETS: [f64; 10] = [
    1024.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
    268_435_456.0,
    1_073_741_824.0,
];

#[derive(Debug)]
struct Metrics {
    registry: Registry,
    flush_duration: Durations<FlushLabels>,
    sync_duration: Durations<TriggerLabels>,
    restore_duration: Durations<SourceLabels>,
    upload_bytes: Counter,
    download_bytes: Counter,
    errors: Family<KindLabels, Counter>,
    flush_requests: Family<TriggerLabels, Counter>,
    outbox_layers: Gauge,
    dead_letter_layers: Gauge,
    flush_queue: Gauge,
    last_successful_flush: Gauge<f64, AtomicU64>,
    events_connected: Gauge,
    checkpoints: Family<CheckpointLabels, Counter>,
    checkpoint_pause: Histogram,
    checkpoint_bytes: Histogram,
    oldest_recovery_point: Gauge<f64, AtomicU64>,
}

impl Metrics {
    fn new() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("zlayer"),
            flush_duration: Family::new_with_constructor(DurationHistogram),
            sync_duration: Family::new_with_constructor(DurationHistogram),
            restore_duration: Family::new_with_constructor(DurationHistogram),
            upload_bytes: Counter::default(),
            download_bytes: Counter::default(),
            errors: Family::default(),
            flush_requests: Family::default(),
            outbox_layers: Gauge::default(),
            dead_letter_layers: Gauge::default(),
            flush_queue: Gauge::default(),
            last_successful_flush: Gauge::default(),
            events_connected: Gauge::default(),
            checkpoints: Family::default(),
            checkpoint_pause: Histogram::new(PAUSE_BUCKETS),
            checkpoint_bytes: Histogram::new(BYTES_BUCKETS),
            oldest_recovery_point: Gauge::default(),
        };
        for outcome in CheckpointOutcome::ALL {
            drop(m.checkpoints.get_or_create(&CheckpointLabels { outcome }));
        }
        // Counters of every label value exist from the start, so `rate()` and `increase()` see
        // the first increment instead of a series appearing at 1.
        for kind in ErrorKind::ALL {
            drop(m.errors.get_or_create(&KindLabels { kind }));
        }
        for trigger in Trigger::ALL {
            drop(m.flush_requests.get_or_create(&TriggerLabels { trigger }));
        }
        let r = &mut m.registry;
        r.register_with_unit(
            "flush_duration",
            "Time from a flush request being recorded to its layer being durable (or the flush failing), retries included",
            Unit::Seconds,
            m.flush_duration.clone(),
        );
        r.register_with_unit(
            "sync_duration",
            "Time to sync one layer to the store (successful syncs only)",
            Unit::Seconds,
            m.sync_duration.clone(),
        );
        r.register_with_unit(
            "restore_duration",
            "Time to restore one layer into a new upper dir (successful restores only)",
            Unit::Seconds,
            m.restore_duration.clone(),
        );
        r.register_with_unit(
            "upload",
            "Compressed bytes of layer archives this process wrote to the store",
            Unit::Bytes,
            m.upload_bytes.clone(),
        );
        r.register_with_unit(
            "download",
            "Compressed bytes of layer archives this process downloaded from the store",
            Unit::Bytes,
            m.download_bytes.clone(),
        );
        r.register("errors", "Failures by kind", m.errors.clone());
        r.register(
            "flush_requests",
            "Flush requests received, by what sent them",
            m.flush_requests.clone(),
        );
        r.register(
            "outbox_layers",
            "Layers of removed snapshots not yet in the store, dead letters included",
            m.outbox_layers.clone(),
        );
        r.register(
            "dead_letter_layers",
            "Queued layers no longer retried until the next start or gc",
            m.dead_letter_layers.clone(),
        );
        r.register(
            "flush_queue",
            "Flushes requested and not yet finished",
            m.flush_queue.clone(),
        );
        r.register_with_unit(
            "last_successful_flush_timestamp",
            "Unix time of the last flush that left a layer durable",
            Unit::Seconds,
            m.last_successful_flush.clone(),
        );
        r.register(
            "events_connected",
            "1 while containerd's event stream is connected, else 0",
            m.events_connected.clone(),
        );
        r.register(
            "checkpoints",
            "Checkpoints of running containers, by how they ended",
            m.checkpoints.clone(),
        );
        r.register_with_unit(
            "checkpoint_pause",
            "How long a checkpoint kept its container frozen",
            Unit::Seconds,
            m.checkpoint_pause.clone(),
        );
        r.register_with_unit(
            "checkpoint_upload",
            "Compressed bytes a successful checkpoint uploaded (both passes)",
            Unit::Bytes,
            m.checkpoint_bytes.clone(),
        );
        r.register_with_unit(
            "oldest_recovery_point_age",
            "Age of the oldest recovery point among running persisted containers: what the worst of them would lose if the node died now",
            Unit::Seconds,
            m.oldest_recovery_point.clone(),
        );
        m
    }

    fn flush_finished(&self, trigger: Trigger, outcome: Outcome, took: Duration) {
        self.flush_duration
            .get_or_create(&FlushLabels { trigger, outcome })
            .observe(took.as_secs_f64());
        match outcome {
            Outcome::Durable | Outcome::Unchanged => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                self.last_successful_flush.set(now.as_secs_f64());
            }
            Outcome::Failed => self.error(ErrorKind::Flush),
        }
    }

    fn flush_requested(&self, trigger: Trigger) {
        self.flush_requests
            .get_or_create(&TriggerLabels { trigger })
            .inc();
    }

    fn sync_finished(&self, trigger: Trigger, took: Duration) {
        self.sync_duration
            .get_or_create(&TriggerLabels { trigger })
            .observe(took.as_secs_f64());
    }

    fn restore_finished(&self, source: RestoreSource, took: Duration) {
        self.restore_duration
            .get_or_create(&SourceLabels { source })
            .observe(took.as_secs_f64());
    }

    fn error(&self, kind: ErrorKind) {
        self.errors.get_or_create(&KindLabels { kind }).inc();
    }

    fn set_outbox(&self, queued: usize, dead: usize) {
        self.outbox_layers.set(to_gauge(queued));
        self.dead_letter_layers.set(to_gauge(dead));
    }

    fn encode(&self, format: Format) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        match format {
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
            }
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
            }
        }
        Ok(out)
    }
}

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

fn to_gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A flush ended after `took`. A durable or unchanged one also sets the last-success
/// timestamp; a failed one also counts an error of kind `flush`.
pub fn flush_finished(trigger: Trigger, outcome: Outcome, took: Duration) {
    metrics().flush_finished(trigger, outcome, took);
}

/// A flush was requested.
pub fn flush_requested(trigger: Trigger) {
    metrics().flush_requested(trigger);
}

/// A layer sync succeeded after `took`.
pub fn sync_finished(trigger: Trigger, took: Duration) {
    metrics().sync_finished(trigger, took);
}

/// A layer restore succeeded after `took`.
pub fn restore_finished(source: RestoreSource, took: Duration) {
    metrics().restore_finished(source, took);
}

/// `bytes` of a layer archive were written to the store.
pub fn uploaded(bytes: u64) {
    metrics().upload_bytes.inc_by(bytes);
}

/// `bytes` of a layer archive were downloaded from the store.
pub fn downloaded(bytes: u64) {
    metrics().download_bytes.inc_by(bytes);
}

/// Counts one failure of `kind`.
pub fn error(kind: ErrorKind) {
    metrics().error(kind);
}

/// The outbox now holds `queued` layers, `dead` of them dead letters.
pub fn set_outbox(queued: usize, dead: usize) {
    metrics().set_outbox(queued, dead);
}

/// `n` flush requests are recorded and not yet finished.
pub fn set_flush_queue(n: usize) {
    metrics().flush_queue.set(to_gauge(n));
}

/// A checkpoint ended; `pause` and `bytes` when it got that far.
pub fn checkpoint_finished(
    outcome: CheckpointOutcome,
    pause: Option<Duration>,
    bytes: Option<u64>,
) {
    let m = metrics();
    m.checkpoints
        .get_or_create(&CheckpointLabels { outcome })
        .inc();
    if let Some(p) = pause {
        m.checkpoint_pause.observe(p.as_secs_f64());
    }
    if let Some(b) = bytes {
        #[allow(clippy::cast_precision_loss)]
        m.checkpoint_bytes.observe(b as f64);
    }
}

/// The oldest recovery point among running persisted containers is `age` old.
pub fn set_oldest_recovery_point(age: Duration) {
    metrics().oldest_recovery_point.set(age.as_secs_f64());
}

/// Whether containerd's event stream is connected.
pub fn set_events_connected(connected: bool) {
    metrics().events_connected.set(i64::from(connected));
}

/// The exposition formats a scrape can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Format {
    /// The `Content-Type` of a response in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// OpenMetrics when the `Accept` header offers it (as Prometheus does), else the classic
    /// text format, which every scraper and a human with curl can read.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Prometheus,
        }
    }
}

/// Every metric, encoded in `format`.
pub fn encode(format: Format) -> Result<String, std::fmt::Error> {
    metrics().encode(format)
}

#[cfg(test)]
mod tests;
