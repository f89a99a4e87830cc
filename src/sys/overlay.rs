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
        Self::detect_on(&RealHost, root)
    }

    /// The decision for the answers `host` gives (the seam tests feed other kernels through).
    #[must_use]
    pub fn detect_on(host: &dyn HostProbe, root: &Path) -> Self {
        Self {
            index_off: host.has_index_parameter(),
            userxattr: needs_userxattr(
                host.uid_map().as_deref(),
                host.kernel_release().as_deref(),
                host.is_tmpfs(root),
            ),
        }
    }
}

/// The questions the probe asks the kernel.
pub trait HostProbe {
    /// Whether `/sys/module/overlay/parameters/index` exists (the kernel knows `index=`).
    fn has_index_parameter(&self) -> bool;
    /// `/proc/self/uid_map`, if readable.
    fn uid_map(&self) -> Option<String>;
    /// `/proc/sys/kernel/osrelease`, trimmed.
    fn kernel_release(&self) -> Option<String>;
    /// Whether `path` (or its nearest existing ancestor) is on tmpfs.
    fn is_tmpfs(&self, path: &Path) -> bool;
}

/// The running kernel.
#[derive(Debug, Clone, Copy)]
pub struct RealHost;

impl HostProbe for RealHost {
    fn has_index_parameter(&self) -> bool {
        Path::new("/sys/module/overlay/parameters/index").exists()
    }
    fn uid_map(&self) -> Option<String> {
        std::fs::read_to_string("/proc/self/uid_map").ok()
    }
    fn kernel_release(&self) -> Option<String> {
        kernel_release()
    }
    fn is_tmpfs(&self, path: &Path) -> bool {
        is_tmpfs(path)
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

    /// Canned kernel answers; remembers which path was asked about tmpfs.
    struct FakeHost {
        index: bool,
        uid_map: Option<&'static str>,
        release: Option<&'static str>,
        tmpfs: bool,
        asked: std::cell::RefCell<Vec<std::path::PathBuf>>,
    }

    impl HostProbe for FakeHost {
        fn has_index_parameter(&self) -> bool {
            self.index
        }
        fn uid_map(&self) -> Option<String> {
            self.uid_map.map(str::to_string)
        }
        fn kernel_release(&self) -> Option<String> {
            self.release.map(str::to_string)
        }
        fn is_tmpfs(&self, path: &Path) -> bool {
            self.asked.borrow_mut().push(path.to_path_buf());
            self.tmpfs
        }
    }

    #[test]
    fn probe_decides_from_the_kernels_answers() {
        /// (index parameter, uid_map, release, root on tmpfs) → (index_off, userxattr)
        type Case = (
            bool,
            Option<&'static str>,
            Option<&'static str>,
            bool,
            (bool, bool),
        );
        let cases: &[Case] = &[
            (true, Some(INITIAL), Some("6.18.44"), false, (true, false)),
            (false, Some(INITIAL), Some("4.9.0"), false, (false, false)),
            (
                true,
                Some(ROOTLESS),
                Some("6.1.0-18-amd64"),
                false,
                (true, true),
            ),
            (false, Some(ROOTLESS), Some("5.11.0"), false, (false, true)),
            (true, Some(ROOTLESS), Some("5.10.209"), false, (true, false)),
            (true, Some(ROOTLESS), Some("6.6.0"), true, (true, false)),
            (true, Some(ROOTLESS), None, false, (true, false)),
            (true, None, Some("6.6.0"), false, (true, false)),
        ];
        let root = Path::new("/var/lib/zlayer-storage");
        for &(index, uid_map, release, tmpfs, (index_off, userxattr)) in cases {
            let host = FakeHost {
                index,
                uid_map,
                release,
                tmpfs,
                asked: Default::default(),
            };
            let f = OverlayFeatures::detect_on(&host, root);
            let case =
                format!("index={index} uid_map={uid_map:?} release={release:?} tmpfs={tmpfs}");
            assert_eq!((f.index_off, f.userxattr), (index_off, userxattr), "{case}");
            let asked = host.asked.borrow();
            assert!(asked.iter().all(|p| p == root), "{case}: probed {asked:?}");
        }
    }

    /// Checks the probe against the kernel itself: `index=off` must be accepted by a real
    /// overlay mount exactly when the probe adds it, the options it picks must mount, and
    /// `userxattr` must be chosen exactly when `trusted.overlay.*` cannot be written.
    #[test]
    fn detected_options_match_what_this_kernel_accepts() {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test needs root: it mounts overlayfs"
        );
        let t = tempfile::tempdir().unwrap();
        let f = OverlayFeatures::detect(t.path());
        let attempts = std::cell::Cell::new(0u32);
        let try_mount = |opts: &[&str]| -> rustix::io::Result<()> {
            attempts.set(attempts.get() + 1);
            let case = t.path().join(format!("mount{}", attempts.get()));
            for d in ["lower", "upper", "work", "merged"] {
                std::fs::create_dir_all(case.join(d)).unwrap();
            }
            let mut data = format!(
                "lowerdir={},upperdir={},workdir={}",
                case.join("lower").display(),
                case.join("upper").display(),
                case.join("work").display()
            );
            for o in opts {
                data.push(',');
                data.push_str(o);
            }
            let merged = case.join("merged");
            rustix::mount::mount(
                "overlay",
                &merged,
                "overlay",
                rustix::mount::MountFlags::empty(),
                std::ffi::CString::new(data).unwrap().as_c_str(),
            )?;
            rustix::mount::unmount(&merged, rustix::mount::UnmountFlags::empty()).unwrap();
            Ok(())
        };
        try_mount(&[]).expect("a plain overlay mount works here");
        // The harness notices a rejected option.
        assert!(try_mount(&["zlayer_no_such_option=1"]).is_err());
        assert_eq!(
            try_mount(&["index=off"]).is_ok(),
            f.index_off,
            "the kernel's answer to index=off disagrees with the probe"
        );
        let mut chosen = Vec::new();
        if f.index_off {
            chosen.push("index=off");
        }
        if f.userxattr {
            chosen.push("userxattr");
        }
        try_mount(&chosen)
            .unwrap_or_else(|e| panic!("detected options {chosen:?} do not mount: {e}"));
        if !is_tmpfs(t.path()) {
            let probe = t.path().join("xattr-probe");
            std::fs::write(&probe, b"").unwrap();
            let trusted_works = rustix::fs::setxattr(
                &probe,
                "trusted.overlay.opaque",
                b"y",
                rustix::fs::XattrFlags::empty(),
            )
            .is_ok();
            assert_eq!(
                f.userxattr, !trusted_works,
                "userxattr must be chosen exactly when trusted.overlay.* cannot be written"
            );
        }
    }
}
