//! The OCI state the runtime writes on a hook's stdin.
//!
//! At poststop runc sends `ociVersion`, `id`, `status` ("stopped"), `bundle` and `annotations`;
//! `pid` is absent. Fields this hook does not use are ignored, so a newer runtime adding some
//! does not break container deletes.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use serde::Deserialize;

use super::error::{HookError, Result};

/// Largest state document read from stdin. Kubernetes caps a pod's annotations at 256 KiB, so a
/// genuine state stays far below this.
pub const MAX_STATE_BYTES: u64 = 1024 * 1024;

/// The annotation CRI (containerd) puts on every container, `sandbox` on the pause container.
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI-O's equivalent of [`CRI_CONTAINER_TYPE`].
pub const CRIO_CONTAINER_TYPE: &str = "io.kubernetes.cri-o.ContainerType";

/// The fields of the OCI state the hook needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciState {
    /// Container id (non-empty).
    pub id: String,
    /// Absolute path of the bundle directory.
    pub bundle: PathBuf,
    /// `stopped` at poststop; `""` if the runtime left it out.
    pub status: String,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RawState {
    id: Option<String>,
    bundle: Option<String>,
    status: Option<String>,
    annotations: Option<BTreeMap<String, String>>,
}

impl OciState {
    /// Reads and parses the state from `input`, at most [`MAX_STATE_BYTES`].
    pub fn read_from(input: impl Read) -> Result<Self> {
        let mut buf = Vec::new();
        input
            .take(MAX_STATE_BYTES + 1)
            .read_to_end(&mut buf)
            .map_err(HookError::ReadState)?;
        if u64::try_from(buf.len()).is_ok_and(|n| n > MAX_STATE_BYTES) {
            return Err(HookError::StateTooLarge {
                limit: MAX_STATE_BYTES,
            });
        }
        Self::parse(&buf)
    }

    /// Parses a state document; names the missing or bad field.
    pub fn parse(json: &[u8]) -> Result<Self> {
        if json.iter().all(u8::is_ascii_whitespace) {
            return Err(HookError::EmptyState);
        }
        let raw: RawState = serde_json::from_slice(json).map_err(HookError::StateJson)?;
        let id = raw
            .id
            .filter(|id| !id.is_empty())
            .ok_or(HookError::StateField {
                field: "id",
                reason: "missing or empty",
            })?;
        let bundle = PathBuf::from(raw.bundle.ok_or(HookError::StateField {
            field: "bundle",
            reason: "missing",
        })?);
        if !bundle.is_absolute() {
            return Err(HookError::StateField {
                field: "bundle",
                reason: "not an absolute path",
            });
        }
        Ok(Self {
            id,
            bundle,
            status: raw.status.unwrap_or_default(),
            annotations: raw.annotations.unwrap_or_default(),
        })
    }

    /// A CRI pod sandbox (pause) container: it has no layer worth keeping.
    #[must_use]
    pub fn is_sandbox(&self) -> bool {
        [CRI_CONTAINER_TYPE, CRIO_CONTAINER_TYPE]
            .iter()
            .any(|k| self.annotations.get(*k).is_some_and(|v| v == "sandbox"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What containerd 1.6 + runc 1.1 send at poststop (containerd.md §15).
    const OBSERVED: &str = r#"{"ociVersion":"1.0.2-dev","id":"hk1","status":"stopped","bundle":"/run/containerd/io.containerd.runtime.v2.task/default/hk1","annotations":{"my.anno":"v"}}"#;

    #[test]
    fn parses_the_observed_poststop_state() {
        let s = OciState::parse(OBSERVED.as_bytes()).unwrap();
        assert_eq!(s.id, "hk1");
        assert_eq!(
            s.bundle,
            PathBuf::from("/run/containerd/io.containerd.runtime.v2.task/default/hk1")
        );
        assert_eq!(s.status, "stopped");
        assert_eq!(s.annotations["my.anno"], "v");
        assert!(!s.is_sandbox());
    }

    #[test]
    fn tolerates_unknown_fields_a_pid_and_missing_optional_ones() {
        let s = OciState::parse(
            br#"{"id":"c","bundle":"/b","pid":42,"future":{"x":[1]},"annotations":null}"#,
        )
        .unwrap();
        assert_eq!((s.status.as_str(), s.annotations.len()), ("", 0));
    }

    #[test]
    fn malformed_states_name_the_problem() {
        let err = |json: &str| OciState::parse(json.as_bytes()).unwrap_err().to_string();
        assert_eq!(err(""), "empty OCI state on stdin");
        assert_eq!(err(" \n"), "empty OCI state on stdin");
        assert!(err("{\"id\":").contains("not valid JSON"));
        assert!(err("[1]").contains("not valid JSON"));
        assert!(err(r#"{"bundle":"/b"}"#).contains("`id`"));
        assert!(err(r#"{"id":"","bundle":"/b"}"#).contains("`id`"));
        assert!(err(r#"{"id":"c"}"#).contains("`bundle`"));
        assert!(err(r#"{"id":"c","bundle":"rel/b"}"#).contains("absolute"));
        assert!(
            err(r#"{"id":"c","bundle":"/b","annotations":{"a":1}}"#).contains("not valid JSON")
        );
        for json in ["", "{", r#"{"id":"c"}"#] {
            assert!(
                OciState::parse(json.as_bytes())
                    .unwrap_err()
                    .is_invocation_error()
            );
        }
    }

    #[test]
    fn reading_is_bounded() {
        let mut big = br#"{"id":"c","bundle":"/b","annotations":{"a":""#.to_vec();
        big.resize(usize::try_from(MAX_STATE_BYTES).unwrap() + 10, b'x');
        big.extend_from_slice(br#""}}"#);
        let err = OciState::read_from(&big[..]).unwrap_err();
        assert!(matches!(err, HookError::StateTooLarge { .. }), "{err}");
        assert!(err.is_invocation_error());
        assert_eq!(OciState::read_from(OBSERVED.as_bytes()).unwrap().id, "hk1");
    }

    #[test]
    fn sandbox_containers_are_recognised_by_either_runtime_annotation() {
        let with = |k: &str, v: &str| {
            let mut s = OciState::parse(OBSERVED.as_bytes()).unwrap();
            s.annotations.insert(k.into(), v.into());
            s.is_sandbox()
        };
        assert!(with(CRI_CONTAINER_TYPE, "sandbox"));
        assert!(with(CRIO_CONTAINER_TYPE, "sandbox"));
        assert!(!with(CRI_CONTAINER_TYPE, "container"));
        assert!(!with("other", "sandbox"));
    }
}
