//! Mount construction, identical to containerd's overlay snapshotter (`overlay.go` `mounts`).

use std::path::Path;

use crate::sys::overlay::OverlayFeatures;

use super::types::{Kind, Mount};

/// Mounts for a snapshot whose own directory holds `fs` (and `work` when Active), given its
/// parents' `fs` directories nearest first. Committed snapshots have no mounts; callers check.
#[must_use]
pub fn build(
    kind: Kind,
    own_fs: &Path,
    own_work: &Path,
    parents: &[&Path],
    features: OverlayFeatures,
) -> Vec<Mount> {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    if parents.is_empty() {
        // Overlay needs at least one lower dir: a parentless snapshot is its own directory.
        let mode = if kind == Kind::View { "ro" } else { "rw" };
        return vec![bind(path(own_fs), mode)];
    }
    if kind != Kind::Active && parents.len() == 1 {
        // A view of a single layer is that layer, read-only.
        return vec![bind(path(parents[0]), "ro")];
    }
    let mut options = Vec::new();
    if features.index_off {
        options.push("index=off".to_string());
    }
    if features.userxattr {
        options.push("userxattr".to_string());
    }
    if kind == Kind::Active {
        options.push(format!("workdir={}", path(own_work)));
        options.push(format!("upperdir={}", path(own_fs)));
    }
    let lower: Vec<String> = parents.iter().map(|p| path(p)).collect();
    options.push(format!("lowerdir={}", lower.join(":")));
    vec![Mount {
        kind: "overlay".to_string(),
        source: "overlay".to_string(),
        options,
    }]
}

fn bind(source: String, mode: &str) -> Mount {
    Mount {
        kind: "bind".to_string(),
        source,
        options: vec![mode.to_string(), "rbind".to_string()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: OverlayFeatures = OverlayFeatures {
        index_off: false,
        userxattr: false,
    };
    const INDEX: OverlayFeatures = OverlayFeatures {
        index_off: true,
        userxattr: false,
    };
    const BOTH: OverlayFeatures = OverlayFeatures {
        index_off: true,
        userxattr: true,
    };

    fn p(s: &str) -> &Path {
        Path::new(s)
    }

    fn opts(m: &[Mount]) -> Vec<&str> {
        m[0].options.iter().map(String::as_str).collect()
    }

    #[test]
    fn parentless_active_is_a_rw_bind_of_its_own_fs() {
        let m = build(
            Kind::Active,
            p("/r/snapshots/1/fs"),
            p("/r/snapshots/1/work"),
            &[],
            BOTH,
        );
        assert_eq!(m.len(), 1);
        assert_eq!(
            (m[0].kind.as_str(), m[0].source.as_str()),
            ("bind", "/r/snapshots/1/fs")
        );
        assert_eq!(opts(&m), ["rw", "rbind"]);
    }

    #[test]
    fn parentless_view_is_a_ro_bind() {
        let m = build(
            Kind::View,
            p("/r/snapshots/1/fs"),
            p("/r/snapshots/1/work"),
            &[],
            INDEX,
        );
        assert_eq!(m[0].source, "/r/snapshots/1/fs");
        assert_eq!(opts(&m), ["ro", "rbind"]);
    }

    #[test]
    fn single_parent_view_binds_the_parent_read_only() {
        let m = build(
            Kind::View,
            p("/r/snapshots/5/fs"),
            p("/r/snapshots/5/work"),
            &[p("/r/snapshots/1/fs")],
            BOTH,
        );
        assert_eq!(
            (m[0].kind.as_str(), m[0].source.as_str()),
            ("bind", "/r/snapshots/1/fs")
        );
        assert_eq!(opts(&m), ["ro", "rbind"]);
    }

    #[test]
    fn active_with_parent_matches_the_observed_overlay_options() {
        // Observed from containerd: Prepare("default/3/c1", ...) on a host with the index parameter.
        let m = build(
            Kind::Active,
            p("/r/snapshots/2/fs"),
            p("/r/snapshots/2/work"),
            &[p("/r/snapshots/1/fs")],
            INDEX,
        );
        assert_eq!(
            (m[0].kind.as_str(), m[0].source.as_str()),
            ("overlay", "overlay")
        );
        assert_eq!(
            opts(&m),
            [
                "index=off",
                "workdir=/r/snapshots/2/work",
                "upperdir=/r/snapshots/2/fs",
                "lowerdir=/r/snapshots/1/fs"
            ]
        );
    }

    #[test]
    fn lowerdir_lists_nearest_parent_first() {
        let parents = [
            p("/r/snapshots/4/fs"),
            p("/r/snapshots/3/fs"),
            p("/r/snapshots/1/fs"),
        ];
        let m = build(
            Kind::Active,
            p("/r/snapshots/6/fs"),
            p("/r/snapshots/6/work"),
            &parents,
            PLAIN,
        );
        assert_eq!(
            opts(&m).last().copied(),
            Some("lowerdir=/r/snapshots/4/fs:/r/snapshots/3/fs:/r/snapshots/1/fs")
        );
        assert!(!opts(&m).contains(&"index=off"));
    }

    #[test]
    fn userxattr_follows_index_off_and_precedes_dirs() {
        let m = build(
            Kind::Active,
            p("/r/s/2/fs"),
            p("/r/s/2/work"),
            &[p("/r/s/1/fs")],
            BOTH,
        );
        assert_eq!(
            opts(&m)[..3],
            ["index=off", "userxattr", "workdir=/r/s/2/work"]
        );
    }

    #[test]
    fn multi_parent_view_is_a_lower_only_overlay() {
        let parents = [p("/r/snapshots/4/fs"), p("/r/snapshots/1/fs")];
        let m = build(
            Kind::View,
            p("/r/snapshots/7/fs"),
            p("/r/snapshots/7/work"),
            &parents,
            INDEX,
        );
        assert_eq!(m[0].kind, "overlay");
        assert_eq!(
            opts(&m),
            ["index=off", "lowerdir=/r/snapshots/4/fs:/r/snapshots/1/fs"]
        );
    }
}
