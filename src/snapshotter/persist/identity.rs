//! Which identity, if any, an Active snapshot is persisted under.
//!
//! First match wins: the snapshot label [`SNAPSHOT_ID_LABEL`] (known at Prepare); then, once
//! the container record exists, its label [`CONTAINER_ID_LABEL`], then `nerdctl/name` (as
//! `<namespace>/<name>`, policy `named` or `all`); then, under policy `all`,
//! `<namespace>/<container id>`. Image-unpack snapshots and keys not of the form
//! `<ns>/<seq>/<name>` are never persisted.

use crate::config::PersistPolicy;
use crate::layer::types::ContainerLayerId;
use crate::snapshotter::containers::ContainerRecord;
use crate::snapshotter::hooks::ParentRef;
use crate::snapshotter::key::BackendKey;
use crate::snapshotter::types::{Kind, Labels};

use super::db::Resolution;
use super::error::{PersistError, Result};

/// Snapshot label naming the identity (`ctr run --snapshotter-label ...=SERVICE/INSTANCE`).
pub const SNAPSHOT_ID_LABEL: &str = "containerd.io/snapshot/zlayer.id";
/// Container label naming the identity (`ctr run --label zlayer.id=SERVICE/INSTANCE`).
pub const CONTAINER_ID_LABEL: &str = "zlayer.id";
/// Container label nerdctl sets from `--name`.
pub const NERDCTL_NAME_LABEL: &str = "nerdctl/name";

/// The parsed key of a snapshot that may be persisted: an Active container rootfs created
/// through containerd's metadata layer, not an image unpack.
#[must_use]
pub fn candidate<'a>(kind: Kind, backend_key: Option<BackendKey<'a>>) -> Option<BackendKey<'a>> {
    backend_key.filter(|k| kind == Kind::Active && !k.is_extract())
}

/// Parses an identity label value (`SERVICE/INSTANCE`); a bad value names the label.
pub fn parse_identity(key: &str, label: &str, value: &str) -> Result<ContainerLayerId> {
    let bad = || PersistError::BadIdentity {
        key: key.to_string(),
        label: label.to_string(),
        value: value.to_string(),
    };
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad());
    }
    ContainerLayerId::parse(value).ok_or_else(bad)
}

/// The identity named by the snapshot's own labels, if any.
pub fn from_snapshot_labels(key: &str, labels: &Labels) -> Result<Option<ContainerLayerId>> {
    labels
        .get(SNAPSHOT_ID_LABEL)
        .map(|v| parse_identity(key, SNAPSHOT_ID_LABEL, v))
        .transpose()
}

/// The decision once the container record is known, with where it came from.
pub fn from_container(
    key: &str,
    backend_key: &BackendKey<'_>,
    record: &ContainerRecord,
    policy: PersistPolicy,
) -> Result<(Resolution, &'static str)> {
    if !record.snapshot_key.is_empty() && record.snapshot_key != backend_key.name {
        // A container of that name exists but its rootfs is another snapshot.
        return Ok((Resolution::None, "container-uses-other-snapshot"));
    }
    if let Some(v) = record.labels.get(CONTAINER_ID_LABEL) {
        let id = parse_identity(key, CONTAINER_ID_LABEL, v)?;
        return Ok((Resolution::Identified(id), "container-label"));
    }
    if matches!(policy, PersistPolicy::Named | PersistPolicy::All)
        && let Some(name) = record
            .labels
            .get(NERDCTL_NAME_LABEL)
            .filter(|n| !n.is_empty())
    {
        let id = ContainerLayerId::new(backend_key.namespace, name.as_str());
        return Ok((Resolution::Identified(id), "nerdctl-name"));
    }
    if policy == PersistPolicy::All {
        let id = ContainerLayerId::new(backend_key.namespace, backend_key.name);
        return Ok((Resolution::Identified(id), "container-id"));
    }
    Ok((Resolution::None, "policy"))
}

/// The parent chain's stable names, nearest first: committed names without the
/// `<ns>/<seq>/` prefix (the image layers' chain IDs).
#[must_use]
pub fn base_of(parents: &[ParentRef<'_>]) -> Vec<String> {
    parents
        .iter()
        .map(|p| {
            BackendKey::parse(p.key)
                .map_or(p.key, |k| k.name)
                .to_string()
        })
        .collect()
}

/// A base for logs and error messages.
#[must_use]
pub fn describe_base(base: &[String]) -> String {
    if base.is_empty() {
        "(no parent)".to_string()
    } else {
        format!("[{}]", base.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn record(labels: &[(&str, &str)]) -> ContainerRecord {
        ContainerRecord {
            id: "c1".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            snapshot_key: "c1".into(),
        }
    }

    fn identified(s: &str, i: &str) -> Resolution {
        Resolution::Identified(ContainerLayerId::new(s, i))
    }

    #[test]
    fn only_active_container_snapshots_are_candidates() {
        let k = |s| BackendKey::parse(s);
        assert!(candidate(Kind::Active, k("default/3/c1")).is_some());
        assert!(candidate(Kind::View, k("default/3/c1")).is_none());
        assert!(candidate(Kind::Active, k("default/1/extract-1-x sha256:ab")).is_none());
        assert!(candidate(Kind::Active, k("/tmp/suite/work/preparing")).is_none());
        assert!(candidate(Kind::Active, None).is_none());
    }

    #[test]
    fn snapshot_label_is_parsed_and_bad_values_name_the_label() {
        let labels: Labels = [(SNAPSHOT_ID_LABEL.to_string(), "web/0".to_string())].into();
        assert_eq!(
            from_snapshot_labels("default/3/c1", &labels).unwrap(),
            Some(ContainerLayerId::new("web", "0"))
        );
        assert_eq!(from_snapshot_labels("k", &Labels::new()).unwrap(), None);
        for bad in ["web", "/0", "web/", "we b/0", ""] {
            let labels: Labels = [(SNAPSHOT_ID_LABEL.to_string(), bad.to_string())].into();
            let err = from_snapshot_labels("default/3/c1", &labels).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            let msg = err.to_string();
            assert!(
                msg.contains(SNAPSHOT_ID_LABEL) && msg.contains("default/3/c1"),
                "{msg}"
            );
        }
    }

    #[test]
    fn container_labels_follow_the_policy_order() {
        let key = BackendKey::parse("prod/9/c1").unwrap();
        let both = record(&[(CONTAINER_ID_LABEL, "db/1"), (NERDCTL_NAME_LABEL, "web")]);
        for policy in [
            PersistPolicy::Labeled,
            PersistPolicy::Named,
            PersistPolicy::All,
        ] {
            assert_eq!(
                from_container("prod/9/c1", &key, &both, policy).unwrap().0,
                identified("db", "1")
            );
        }
        let named = record(&[(NERDCTL_NAME_LABEL, "web")]);
        assert_eq!(
            from_container("k", &key, &named, PersistPolicy::Labeled)
                .unwrap()
                .0,
            Resolution::None
        );
        assert_eq!(
            from_container("k", &key, &named, PersistPolicy::Named)
                .unwrap()
                .0,
            identified("prod", "web")
        );
        let plain = record(&[]);
        assert_eq!(
            from_container("k", &key, &plain, PersistPolicy::Named)
                .unwrap()
                .0,
            Resolution::None
        );
        assert_eq!(
            from_container("k", &key, &plain, PersistPolicy::All)
                .unwrap()
                .0,
            identified("prod", "c1")
        );
        let other = ContainerRecord {
            snapshot_key: "c1-other".into(),
            ..record(&[(CONTAINER_ID_LABEL, "db/1")])
        };
        assert_eq!(
            from_container("k", &key, &other, PersistPolicy::All)
                .unwrap()
                .0,
            Resolution::None
        );
        let bad = record(&[(CONTAINER_ID_LABEL, "nope")]);
        let err = from_container("prod/9/c1", &key, &bad, PersistPolicy::All).unwrap_err();
        assert!(err.to_string().contains("label zlayer.id"), "{err}");
    }

    #[test]
    fn base_is_the_chain_without_namespace_and_seq() {
        let (a, b) = (Path::new("/a"), Path::new("/b"));
        let parents = [
            ParentRef {
                key: "default/4/sha256:top",
                fs: a,
            },
            ParentRef {
                key: "plain-key",
                fs: b,
            },
        ];
        assert_eq!(base_of(&parents), vec!["sha256:top", "plain-key"]);
        assert_eq!(describe_base(&[]), "(no parent)");
    }
}
