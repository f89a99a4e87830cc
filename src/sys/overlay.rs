//! What the running kernel needs in overlay mount options, detected the way containerd does.

use std::path::Path;

/// Kernel-dependent overlay mount options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OverlayFeatures {
    /// Add `index=off`: the kernel has the `index` parameter, and an index would tie upper dirs
    /// to the lower dirs' file handles, which breaks reusing a committed layer under new uppers.
    pub index_off: bool,
    /// Add `userxattr`: unprivileged overlay in a user namespace must use `user.overlay.*` xattrs.
    pub userxattr: bool,
}

impl OverlayFeatures {
    /// Probes the host for a snapshotter rooted at `root`.
    #[must_use]
    pub fn detect(root: &Path) -> Self {
        Self {
            index_off: Path::new("/sys/module/overlay/parameters/index").exists(),
            userxattr: needs_userxattr(
                std::fs::read_to_string("/proc/self/uid_map")
                    .ok()
                    .as_deref(),
                kernel_release().as_deref(),
                is_tmpfs(root),
            ),
        }
    }
}

/// containerd's `NeedsUserXAttr`: never for the initial user namespace's root; never on tmpfs
/// (which rejects `user.*` xattrs); otherwise on kernels ≥ 5.11, which support the option.
/// Older kernels are treated as not needing it: containerd probes with a test mount there, but
/// those kernels cannot run unprivileged overlay with `userxattr` unless patched.
#[must_use]
pub fn needs_userxattr(
    uid_map: Option<&str>,
    kernel_release: Option<&str>,
    root_on_tmpfs: bool,
) -> bool {
    if !in_user_namespace(uid_map) || root_on_tmpfs {
        return false;
    }
    kernel_release
        .and_then(parse_kernel_version)
        .is_some_and(|v| v >= (5, 11))
}

/// True unless `/proc/self/uid_map` shows the full identity mapping of the initial namespace.
#[must_use]
pub fn in_user_namespace(uid_map: Option<&str>) -> bool {
    let Some(map) = uid_map else {
        return false;
    };
    let fields: Vec<&str> = map.split_whitespace().collect();
    fields != ["0", "0", "4294967295"]
}

/// `6.1.0-18-amd64` → `(6, 1)`.
#[must_use]
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn kernel_release() -> Option<String> {
    Some(
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()?
            .trim()
            .to_string(),
    )
}

#[allow(
    clippy::useless_conversion,
    reason = "f_type is i64 on x86_64 but narrower elsewhere"
)]
fn is_tmpfs(path: &Path) -> bool {
    // TMPFS_MAGIC from linux/magic.h.
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let mut p = path;
    // The root may not exist yet: probe its nearest existing ancestor.
    loop {
        if let Ok(st) = rustix::fs::statfs(p) {
            return i64::from(st.f_type) == TMPFS_MAGIC;
        }
        match p.parent() {
            Some(parent) => p = parent,
            None => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INITIAL: &str = "         0          0 4294967295\n";
    const ROOTLESS: &str = "         0       1000          1\n         1     100000      65536\n";

    #[test]
    fn initial_namespace_never_needs_userxattr() {
        assert!(!in_user_namespace(Some(INITIAL)));
        assert!(!needs_userxattr(Some(INITIAL), Some("6.18.0"), false));
    }

    #[test]
    fn user_namespace_on_new_kernel_needs_userxattr() {
        assert!(in_user_namespace(Some(ROOTLESS)));
        assert!(needs_userxattr(Some(ROOTLESS), Some("5.11.0"), false));
        assert!(needs_userxattr(
            Some(ROOTLESS),
            Some("6.1.0-18-amd64"),
            false
        ));
        assert!(!needs_userxattr(Some(ROOTLESS), Some("5.10.209"), false));
        assert!(
            !needs_userxattr(Some(ROOTLESS), Some("6.1.0"), true),
            "tmpfs"
        );
        assert!(!needs_userxattr(Some(ROOTLESS), None, false));
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_kernel_version("6.18.0-rc1"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.4"), Some((5, 4)));
        assert_eq!(parse_kernel_version("garbage"), None);
    }

    #[test]
    fn detect_on_this_host_is_consistent_with_its_probes() {
        let dir = std::env::temp_dir();
        let f = OverlayFeatures::detect(&dir);
        assert_eq!(
            f.index_off,
            Path::new("/sys/module/overlay/parameters/index").exists()
        );
        let uid_map = std::fs::read_to_string("/proc/self/uid_map").ok();
        if !in_user_namespace(uid_map.as_deref()) {
            assert!(!f.userxattr);
        }
    }
}
