//! The `[snapshotter]` and `[metrics]` sections.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Result, invalid};

/// Which container snapshots get persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PersistPolicy {
    /// Only snapshots with an explicit `zlayer.id` (snapshot label or container label).
    #[default]
    Labeled,
    /// Labeled ones plus containers with a name (`nerdctl/name`).
    Named,
    /// Every container snapshot; unlabeled ones are keyed `<namespace>/<container id>`.
    All,
}

/// What to do when a restored layer was recorded on a different base (parent chain).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnBaseChange {
    /// Restore anyway (the layer is a diff; it applies over any base), and log it.
    #[default]
    Restore,
    /// Start with an empty upper dir, and log it.
    Skip,
    /// Refuse the Prepare/Mounts.
    Fail,
}

/// Proxy snapshotter settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotterConfig {
    /// Snapshot directories, metadata and the outbox live here.
    pub root: PathBuf,
    /// Unix socket containerd dials (`[proxy_plugins.zlayer] address`).
    pub socket: PathBuf,
    /// containerd's socket, for container-label lookups and events.
    pub containerd_address: PathBuf,
    /// What gets persisted.
    pub persist: PersistPolicy,
    /// Behaviour when a layer's recorded base differs from the new container's base.
    pub on_base_change: OnBaseChange,
    /// How long Mounts waits for a container's layer to be restored before failing
    /// (`Unavailable`; the restore goes on and a retried Mounts waits for the same one).
    pub restore_timeout_secs: u64,
    /// Ask containerd for container labels (`zlayer.id`, nerdctl names). `false` for
    /// deployments that name identities only with snapshot labels: containerd is never asked,
    /// so its reachability does not matter.
    pub container_lookup: bool,
    /// Unix socket of the control API (flush, status, list, forget) and of the poststop hook.
    pub control_socket: PathBuf,
    /// Watch containerd's events and flush a container's layer when its task stops.
    pub watch_events: bool,
    /// After an init process exits, how long to wait for the task's delete (which unmounts the
    /// rootfs) before flushing the dead-but-mounted upper dir anyway.
    pub exit_grace_secs: u64,
    /// How long a flush request (CLI, hook with `--wait`) waits by default.
    pub flush_timeout_secs: u64,
    /// How often a running persisted container gets a crash-consistent checkpoint (its recovery
    /// point if the node dies); 0 = never. A container's `zlayer.checkpoint-interval` label
    /// (seconds) overrides it.
    pub checkpoint_interval_secs: u64,
    /// Longest a checkpoint may keep a container frozen (reaching the freeze plus the pass
    /// over what changed); past it the container is thawed and the checkpoint retried later.
    pub checkpoint_pause_ms: u64,
    /// Checkpoints running at once on this node.
    pub checkpoint_concurrency: usize,
}

impl SnapshotterConfig {
    /// Checks ranges and cross-field rules; names the offending key.
    pub fn validate(&self) -> Result<()> {
        if self.restore_timeout_secs == 0 {
            return Err(invalid("restore_timeout_secs", 0, "must be at least 1"));
        }
        if !self.container_lookup && self.persist == PersistPolicy::Named {
            return Err(invalid(
                "container_lookup",
                false,
                "persist = \"named\" needs container names, which only containerd can tell",
            ));
        }
        if self.flush_timeout_secs == 0 {
            return Err(invalid("flush_timeout_secs", 0, "must be at least 1"));
        }
        if self.checkpoint_pause_ms == 0 {
            return Err(invalid("checkpoint_pause_ms", 0, "must be at least 1"));
        }
        if self.checkpoint_concurrency == 0 {
            return Err(invalid("checkpoint_concurrency", 0, "must be at least 1"));
        }
        if self.control_socket == self.socket {
            return Err(invalid(
                "control_socket",
                self.control_socket.display(),
                "must differ from socket (the Snapshots API)",
            ));
        }
        Ok(())
    }
}

impl Default for SnapshotterConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/var/lib/zlayer-storage"),
            socket: PathBuf::from("/run/zlayer-storage/snapshotter.sock"),
            containerd_address: PathBuf::from("/run/containerd/containerd.sock"),
            persist: PersistPolicy::Labeled,
            on_base_change: OnBaseChange::Restore,
            restore_timeout_secs: 600,
            container_lookup: true,
            control_socket: PathBuf::from("/run/zlayer-storage/control.sock"),
            watch_events: true,
            exit_grace_secs: 3,
            flush_timeout_secs: 300,
            checkpoint_interval_secs: 300,
            checkpoint_pause_ms: 200,
            checkpoint_concurrency: 1,
        }
    }
}

/// Optional Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` serving `GET /metrics`; unset = no endpoint.
    pub address: Option<String>,
}

impl MetricsConfig {
    /// Checks that the address parses as a socket address.
    pub fn validate(&self) -> Result<()> {
        if let Some(a) = &self.address
            && a.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                "address",
                a,
                "must be host:port with a numeric address, e.g. 127.0.0.1:9464",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::Config;

    #[test]
    fn new_keys_have_defaults_and_bad_values_name_the_key() {
        let c = Config::default();
        assert_eq!(
            c.snapshotter.control_socket,
            Path::new("/run/zlayer-storage/control.sock")
        );
        assert!(c.snapshotter.watch_events);
        assert_eq!(c.storage.history_keep, 5);
        assert!(c.metrics.address.is_none());
        let bad = Config::from_toml("[metrics]\naddress = \"localhost\"\n", Path::new("/x.toml"))
            .unwrap();
        assert!(
            bad.metrics
                .validate()
                .unwrap_err()
                .to_string()
                .contains("address")
        );
        let same = Config::from_toml(
            "[snapshotter]\nsocket = \"/a.sock\"\ncontrol_socket = \"/a.sock\"\n",
            Path::new("/x.toml"),
        )
        .unwrap();
        let err = same.snapshotter.validate().unwrap_err().to_string();
        assert!(err.contains("control_socket"), "{err}");
        let keep =
            Config::from_toml("[storage]\nhistory_keep = 0\n", Path::new("/x.toml")).unwrap();
        assert!(
            keep.storage
                .validate()
                .unwrap_err()
                .to_string()
                .contains("history_keep")
        );
    }
}
