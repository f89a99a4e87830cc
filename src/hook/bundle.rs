//! What a bundle path tells: containerd's runc shim puts bundles at
//! `<state>/io.containerd.runtime.v2.task/<namespace>/<container id>`.

use std::path::Path;

/// Directory names under containerd's state dir that hold `<namespace>/<id>` bundles: the v2
/// shim's, and the v1 runtime's (containerd 1.x).
const TASK_DIRS: &[&str] = &[
    "io.containerd.runtime.v2.task",
    "io.containerd.runtime.v1.linux",
];

/// The containerd namespace of the bundle of container `id`, when the path has containerd's
/// layout and ends in that id.
#[must_use]
pub fn containerd_namespace(bundle: &Path, id: &str) -> Option<String> {
    let mut parts = bundle.components().rev().map(|c| c.as_os_str());
    let (last, namespace, task_dir) = (parts.next()?, parts.next()?, parts.next()?);
    if last != id || !TASK_DIRS.iter().any(|d| task_dir == *d) {
        return None;
    }
    let namespace = namespace.to_str()?;
    (!namespace.is_empty() && namespace != "/").then(|| namespace.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(bundle: &str, id: &str) -> Option<String> {
        containerd_namespace(Path::new(bundle), id)
    }

    #[test]
    fn namespace_comes_from_containerds_layout() {
        assert_eq!(
            ns(
                "/run/containerd/io.containerd.runtime.v2.task/default/c1",
                "c1"
            )
            .as_deref(),
            Some("default")
        );
        assert_eq!(
            ns(
                "/run/containerd/io.containerd.runtime.v2.task/k8s.io/abc/",
                "abc"
            )
            .as_deref(),
            Some("k8s.io"),
            "a trailing slash does not matter"
        );
        assert_eq!(
            ns("/tmp/s/io.containerd.runtime.v1.linux/moby/x", "x").as_deref(),
            Some("moby")
        );
    }

    #[test]
    fn other_layouts_give_no_namespace() {
        assert_eq!(
            ns(
                "/run/containerd/io.containerd.runtime.v2.task/default/c1",
                "c2"
            ),
            None
        );
        assert_eq!(
            ns(
                "/var/lib/containers/storage/overlay-containers/c1/userdata",
                "c1"
            ),
            None
        );
        assert_eq!(ns("/io.containerd.runtime.v2.task/c1", "c1"), None);
        assert_eq!(ns("/c1", "c1"), None);
        assert_eq!(ns("/", "c1"), None);
    }
}
