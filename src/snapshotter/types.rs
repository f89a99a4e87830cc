//! Native snapshot types; the gRPC adapter converts them to and from the protobuf messages.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};

/// Snapshot kind, as in containerd's `snapshots.Kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Read-only, created by View; cannot be committed.
    View,
    /// Read-write, created by Prepare; can be committed.
    Active,
    /// Immutable, created by Commit; the only kind that can be a parent.
    Committed,
}

impl Kind {
    /// The lowercase name containerd's filters compare against (`kind==active`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::View => "view",
            Self::Active => "active",
            Self::Committed => "committed",
        }
    }

    /// Integer stored in the metadata database (the protobuf enum values).
    #[must_use]
    pub(crate) fn to_db(self) -> i64 {
        match self {
            Self::View => 1,
            Self::Active => 2,
            Self::Committed => 3,
        }
    }

    pub(crate) fn from_db(v: i64) -> Option<Self> {
        match v {
            1 => Some(Self::View),
            2 => Some(Self::Active),
            3 => Some(Self::Committed),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Labels of a snapshot; ordered so listings and stored JSON are deterministic.
pub type Labels = BTreeMap<String, String>;

/// What Stat, Update and List report for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The backend key (`<namespace>/<seq>/<name>` when containerd is the caller).
    pub name: String,
    /// Backend key of the parent; empty when there is none.
    pub parent: String,
    pub kind: Kind,
    pub created: DateTime<Utc>,
    pub updated: DateTime<Utc>,
    pub labels: Labels,
}

/// Disk usage of a snapshot's own directory (not its parents).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Allocated bytes (`st_blocks * 512`).
    pub size: i64,
    /// Distinct inodes, the directory itself included.
    pub inodes: i64,
}

/// A mount the caller (the shim or the testsuite) performs; the snapshotter never mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// One field path of an Update request; only labels are mutable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelPath {
    /// `labels`, or no paths at all: replace every label.
    All,
    /// `labels.<key>`: set that label from the request, or delete it when absent or empty.
    One(String),
}

impl LabelPath {
    /// Parses Update field paths; `None` is the first path that is not a label path.
    pub fn parse_all(paths: &[String]) -> Result<Vec<Self>, &str> {
        if paths.is_empty() {
            return Ok(vec![Self::All]);
        }
        paths
            .iter()
            .map(|p| match p.as_str() {
                "labels" => Ok(Self::All),
                other => match other.strip_prefix("labels.") {
                    Some(k) => Ok(Self::One(k.to_string())),
                    None => Err(other),
                },
            })
            .collect()
    }

    /// Applies `paths` in order to `current`, taking values from `given`; empty values are dropped.
    #[must_use]
    pub fn apply(paths: &[Self], current: &Labels, given: &Labels) -> Labels {
        let mut out = current.clone();
        for path in paths {
            match path {
                Self::All => out = given.clone(),
                Self::One(k) => match given.get(k) {
                    Some(v) => {
                        out.insert(k.clone(), v.clone());
                    }
                    None => {
                        out.remove(k);
                    }
                },
            }
        }
        out.retain(|_, v| !v.is_empty());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn paths(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn no_paths_replaces_all_labels() {
        let ops = LabelPath::parse_all(&[]).unwrap();
        assert_eq!(ops, vec![LabelPath::All]);
        let out = LabelPath::apply(&ops, &labels(&[("a", "1")]), &labels(&[("b", "2")]));
        assert_eq!(out, labels(&[("b", "2")]));
    }

    #[test]
    fn single_label_paths_set_and_delete() {
        // The testsuite's Update case: l1 set, l2 absent from the request so deleted, l4 ignored.
        let ops = LabelPath::parse_all(&paths(&["labels.l1", "labels.l2"])).unwrap();
        let current = labels(&[("l1", "v1"), ("l2", "v2"), ("l3", "v3")]);
        let given = labels(&[("l1", "updated"), ("l4", "v4")]);
        assert_eq!(
            LabelPath::apply(&ops, &current, &given),
            labels(&[("l1", "updated"), ("l3", "v3")])
        );
    }

    #[test]
    fn empty_value_deletes_and_dotted_keys_survive() {
        let ops = LabelPath::parse_all(&paths(&["labels.containerd.io/snapshot/x"])).unwrap();
        assert_eq!(ops, vec![LabelPath::One("containerd.io/snapshot/x".into())]);
        let current = labels(&[("containerd.io/snapshot/x", "1"), ("k", "v")]);
        let given = labels(&[("containerd.io/snapshot/x", "")]);
        assert_eq!(
            LabelPath::apply(&ops, &current, &given),
            labels(&[("k", "v")])
        );
    }

    #[test]
    fn labels_path_replaces_all() {
        let ops = LabelPath::parse_all(&paths(&["labels"])).unwrap();
        let out = LabelPath::apply(&ops, &labels(&[("a", "1")]), &labels(&[("l4", "v4")]));
        assert_eq!(out, labels(&[("l4", "v4")]));
    }

    #[test]
    fn other_paths_are_rejected_by_name() {
        assert_eq!(
            LabelPath::parse_all(&paths(&["labels.a", "parent"])),
            Err("parent")
        );
        assert_eq!(LabelPath::parse_all(&paths(&["name"])), Err("name"));
        assert_eq!(LabelPath::parse_all(&paths(&["labelsx"])), Err("labelsx"));
    }

    #[test]
    fn kind_round_trips_through_the_database_encoding() {
        for k in [Kind::View, Kind::Active, Kind::Committed] {
            assert_eq!(Kind::from_db(k.to_db()), Some(k));
        }
        assert_eq!(Kind::from_db(0), None);
        assert_eq!(Kind::Committed.to_string(), "committed");
    }
}
