//! What a test does when a real component it needs is missing, and the record of the
//! real-component tests that ran.
//!
//! A missing component (Garage, containerd and friends, the Go conformance suite, root) fails the
//! test with a message naming it and how to install it. Setting `ZLAYER_TESTS_ALLOW_MISSING=1`
//! turns that into a skip with the same message printed. `integration/test.sh` installs
//! everything, so there nothing is ever skipped.
//!
//! Every test that got its component appends `<kind> <test>` to the file named by
//! `ZLAYER_TEST_REPORT` (set by `integration/test.sh`), which counts them at the end.

use std::io::Write;

/// Opt-out: with this set to `1`, a missing component skips the test instead of failing it.
pub const ALLOW_MISSING: &str = "ZLAYER_TESTS_ALLOW_MISSING";
/// File the real-component tests that ran are appended to.
pub const REPORT: &str = "ZLAYER_TEST_REPORT";

/// The kinds of real component counted in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// Garage, the S3 server.
    Garage,
    /// A private containerd with runc, umoci and busybox.
    Containerd,
    /// containerd's Go snapshotter test suite.
    Conformance,
    /// Root and overlayfs (mounts, ownership), nothing else.
    Root,
}

impl Component {
    fn name(self) -> &'static str {
        match self {
            Component::Garage => "garage",
            Component::Containerd => "containerd",
            Component::Conformance => "conformance",
            Component::Root => "root",
        }
    }
}

/// How to get root and overlayfs, for [`missing`].
pub const INSTALL_ROOT: &str = "run the tests as root on a kernel with overlayfs \
    (`sudo bash integration/test.sh`)";

/// Whether the opt-out is set.
fn allow_missing() -> bool {
    std::env::var(ALLOW_MISSING).is_ok_and(|v| v == "1")
}

/// The running test's name: the harness names each test's thread after it; `fallback` when the
/// test runs on the main thread (`--test-threads=1`).
fn current_test(fallback: &str) -> String {
    match std::thread::current().name() {
        Some(name) if name != "main" => name.to_string(),
        _ => fallback.to_string(),
    }
}

/// `test` cannot run because `what` is missing: panics naming it and `install`, or, with the
/// opt-out set, prints that and returns `false` so the test can return early.
#[must_use]
pub fn missing(test: &str, what: &str, install: &str) -> bool {
    let test = current_test(test);
    let msg = format!("{test} needs {what}; to install: {install}");
    assert!(
        allow_missing(),
        "{msg} (or set {ALLOW_MISSING}=1 to skip tests whose components are missing)"
    );
    eprintln!("skipped ({ALLOW_MISSING}=1): {msg}");
    false
}

/// Records that `test` runs against `component` (see the module docs).
pub fn ran(component: Component, test: &str) {
    let Some(path) = std::env::var_os(REPORT) else {
        return;
    };
    let line = format!("{} {}\n", component.name(), current_test(test));
    // One short write with O_APPEND: lines from parallel tests do not interleave.
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        panic!("append to {REPORT}={}: {e}", path.to_string_lossy());
    }
}

/// Root (and overlayfs) for `test`: `true` when present (recorded as a root test), otherwise
/// see [`missing`].
#[must_use]
pub fn root(test: &str) -> bool {
    if !rustix::process::geteuid().is_root() {
        return missing(test, "root", INSTALL_ROOT);
    }
    if !std::fs::read_to_string("/proc/filesystems").is_ok_and(|f| f.contains("overlay")) {
        return missing(test, "the overlay filesystem", INSTALL_ROOT);
    }
    ran(Component::Root, test);
    true
}

/// How to get root and a cgroup freezer, for [`missing`].
pub const INSTALL_FREEZER: &str = "run the tests as root on a host with a cgroup v1 `freezer` \
    hierarchy or a cgroup2 mount in /proc/self/mountinfo (`sudo bash integration/test.sh`)";

/// Root and a cgroup freezer (a v1 `freezer` hierarchy or cgroup2) for `test`: `true` when
/// present (recorded as a root test), otherwise see [`missing`].
#[must_use]
pub fn cgroup_freezer(test: &str) -> bool {
    if !rustix::process::geteuid().is_root() {
        return missing(test, "root", INSTALL_FREEZER);
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let has_freezer = mounts.lines().any(|l| {
        l.split_once(" - ").is_some_and(|(_, fs)| {
            let mut f = fs.split(' ');
            match (f.next(), f.nth(1)) {
                (Some("cgroup2"), _) => true,
                (Some("cgroup"), Some(opts)) => opts.split(',').any(|o| o == "freezer"),
                _ => false,
            }
        })
    });
    if !has_freezer {
        return missing(
            test,
            "a cgroup freezer (no v1 freezer hierarchy or cgroup2 mount is mounted)",
            INSTALL_FREEZER,
        );
    }
    ran(Component::Root, test);
    true
}
