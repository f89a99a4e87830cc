//! `sys::freezer` against the real kernel: child cgroups of every freezer hierarchy this host
//! mounts (a v1 `freezer` one and cgroup2 on hybrid hosts, cgroup2 alone on pure v2 hosts), real
//! processes moved into them, and a real task in uninterruptible sleep for the timeout.
//!
//! Needs root and a freezer hierarchy (`require::cgroup_freezer`); the timeout test also needs
//! `/dev/fuse`. Every cgroup, process and mount is cleaned up by guards, also on failure.

use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rustix::fs::{Mode, OFlags};
use rustix::mount::{MountFlags, UnmountFlags};
use zlayer_storage::sys::freezer::{DEFAULT_BUDGET, FreezeState, Freezer, FreezerError, Kind};

use crate::util::require;

/// A freezer hierarchy mounted here.
#[derive(Debug, Clone)]
struct Hierarchy {
    kind: Kind,
    mount: PathBuf,
}

/// Every freezer hierarchy in this process's mount table (first mount of each kind).
fn hierarchies() -> Vec<Hierarchy> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let mut out: Vec<Hierarchy> = Vec::new();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let mut post = post.split(' ');
        let (Some(fs_type), Some(opts)) = (post.next(), post.nth(1)) else {
            continue;
        };
        let kind = match fs_type {
            "cgroup2" => Kind::V2,
            "cgroup" if opts.split(',').any(|o| o == "freezer") => Kind::V1,
            _ => continue,
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        // Only whole hierarchies (root "/"), so the test's cgroups are where we expect them.
        if pre.get(3) != Some(&"/") || out.iter().any(|h| h.kind == kind) {
            continue;
        }
        out.push(Hierarchy {
            kind,
            mount: PathBuf::from(pre[4]),
        });
    }
    assert!(
        !out.is_empty(),
        "no freezer hierarchy in /proc/self/mountinfo"
    );
    out
}

/// A child cgroup for one test with the processes moved into it. Drop thaws it, kills the
/// processes and removes it.
struct TestCgroup {
    kind: Kind,
    dir: PathBuf,
    children: Vec<Child>,
}

impl TestCgroup {
    fn new(h: &Hierarchy, tag: &str) -> TestCgroup {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = h.mount.join(format!(
            "zlfreezer-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        TestCgroup {
            kind: h.kind,
            dir,
            children: Vec::new(),
        }
    }

    /// Moves `child` in; returns its pid.
    fn adopt(&mut self, child: Child) -> u32 {
        let pid = child.id();
        self.children.push(child);
        fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", self.dir.display()));
        pid
    }

    /// Freezes (`true`) or thaws by hand, as a user pause (`ctr task pause`) would.
    fn set_frozen(&self, frozen: bool) {
        let (file, value) = match (self.kind, frozen) {
            (Kind::V1, true) => ("freezer.state", "FROZEN"),
            (Kind::V1, false) => ("freezer.state", "THAWED"),
            (Kind::V2, true) => ("cgroup.freeze", "1"),
            (Kind::V2, false) => ("cgroup.freeze", "0"),
        };
        fs::write(self.dir.join(file), value)
            .unwrap_or_else(|e| panic!("write {value} to {}: {e}", self.dir.display()));
    }

    fn freezer(&self) -> Freezer {
        Freezer::at(&self.dir).unwrap_or_else(|e| panic!("Freezer::at: {e}"))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Thaw first: a task frozen by the v1 freezer does not die until thawed.
        let (file, value) = match self.kind {
            Kind::V1 => ("freezer.state", "THAWED"),
            Kind::V2 => ("cgroup.freeze", "0"),
        };
        let _ = fs::write(self.dir.join(file), value);
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for _ in 0..200 {
            if fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("could not remove test cgroup {}", self.dir.display());
    }
}

/// A shell loop writing an ever-growing counter to `file`, as fast as it can.
fn counter(file: &Path) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg(r#"i=0; while :; do i=$((i+1)); echo $i > "$0.tmp"; mv -f "$0.tmp" "$0"; done"#)
        .arg(file)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sh")
}

fn sleeper() -> Child {
    Command::new("sleep")
        .arg("1000")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sleep")
}

fn read_counter(file: &Path) -> u64 {
    fs::read_to_string(file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until `f` holds or `limit` passes.
/// Freezes a cgroup whose loop forks all the time, within the default budget. Under a loaded
/// machine a fork storm can keep one attempt from finishing in time; that attempt must have
/// thawed the cgroup, and the next is tried, as the daemon retries a checkpoint.
fn freeze_busy(freezer: &Freezer, kind: Kind) -> zlayer_storage::sys::freezer::FrozenGuard {
    for _ in 0..4 {
        match freezer.freeze(DEFAULT_BUDGET) {
            Ok(g) => return g,
            Err(FreezerError::Timeout { .. }) => {
                assert_eq!(
                    freezer.state().unwrap(),
                    FreezeState::Thawed,
                    "{kind:?}: a timed-out freeze left the cgroup frozen"
                );
            }
            Err(e) => panic!("{kind:?} freeze: {e}"),
        }
    }
    freezer
        .freeze(DEFAULT_BUDGET)
        .unwrap_or_else(|e| panic!("{kind:?} freeze: {e}"))
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    f()
}

/// The scheduler state letter of a task (`R`, `S`, `D`, ...).
fn task_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

fn task_comm(pid: u32) -> Option<String> {
    Some(
        fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()?
            .trim()
            .to_string(),
    )
}

/// Whether this process sits in its hierarchy's root cgroup for `kind`.
fn self_in_root(kind: Kind) -> bool {
    let own = fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    own.lines().any(|l| {
        let mut p = l.splitn(3, ':');
        let (id, ctl, path) = (p.next(), p.next(), p.next());
        let ours = match kind {
            Kind::V1 => ctl.is_some_and(|c| c.split(',').any(|c| c == "freezer")),
            Kind::V2 => id == Some("0") && ctl == Some(""),
        };
        ours && path == Some("/")
    })
}

#[test]
fn freezing_stops_a_busy_process_and_thawing_resumes_it() {
    if !require::cgroup_freezer("freezing_stops_a_busy_process_and_thawing_resumes_it") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for h in hierarchies() {
        let mut cg = TestCgroup::new(&h, "busy");
        let count = tmp.path().join(format!("count-{:?}", h.kind));
        let pid = cg.adopt(counter(&count));
        assert!(
            wait_until(Duration::from_secs(5), || read_counter(&count) > 10),
            "the counter process does not count"
        );

        let freezer = Freezer::of_pid(pid).unwrap_or_else(|e| panic!("of_pid({pid}): {e}"));
        // The v1 freezer is preferred when the task is in a non-root v1 freezer cgroup; a
        // task only in a v2 child (its v1 freezer cgroup being ours, the root) resolves to v2.
        if h.kind == Kind::V1 || self_in_root(Kind::V1) {
            assert_eq!(freezer.dir(), cg.dir, "of_pid found another cgroup");
            assert_eq!(freezer.kind(), h.kind);
        }
        let freezer = cg.freezer();
        assert_eq!(freezer.state().unwrap(), FreezeState::Thawed);

        let guard = freeze_busy(&freezer, h.kind);
        assert!(!guard.already_frozen());
        assert!(guard.waited() <= DEFAULT_BUDGET, "{:?}", guard.waited());
        eprintln!("{:?}: busy loop frozen in {:?}", h.kind, guard.waited());
        assert_eq!(freezer.state().unwrap(), FreezeState::Frozen);
        let before = fs::read_to_string(&count).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            fs::read_to_string(&count).unwrap(),
            before,
            "{:?}: the counter moved while frozen",
            h.kind
        );
        // Measured on 6.18: a task frozen by v1 shows as D (TASK_FROZEN), by v2 as S (it
        // waits in the signal-delivery trap).
        let expected = if h.kind == Kind::V1 { 'D' } else { 'S' };
        assert_eq!(
            task_state(pid),
            Some(expected),
            "{:?}: frozen task's state",
            h.kind
        );

        guard.thaw().unwrap();
        assert_eq!(freezer.state().unwrap(), FreezeState::Thawed);
        let frozen_at: u64 = before.trim().parse().unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || read_counter(&count)
                > frozen_at + 10),
            "{:?}: the counter did not resume after the thaw",
            h.kind
        );

        // Drop thaws as well.
        let guard = freeze_busy(&freezer, h.kind);
        assert_eq!(freezer.state().unwrap(), FreezeState::Frozen);
        drop(guard);
        assert_eq!(freezer.state().unwrap(), FreezeState::Thawed);

        // An idle task freezes too (the latency of the common case, logged).
        let mut idle = TestCgroup::new(&h, "idle");
        let idle_pid = idle.adopt(sleeper());
        assert!(wait_until(Duration::from_secs(5), || task_state(idle_pid) == Some('S')));
        let guard = idle.freezer().freeze(DEFAULT_BUDGET).unwrap();
        eprintln!("{:?}: idle sleep frozen in {:?}", h.kind, guard.waited());
        guard.thaw().unwrap();
    }
}

#[test]
fn a_user_paused_container_is_never_thawed_by_us() {
    if !require::cgroup_freezer("a_user_paused_container_is_never_thawed_by_us") {
        return;
    }
    for h in hierarchies() {
        let mut cg = TestCgroup::new(&h, "paused");
        cg.adopt(sleeper());
        let freezer = cg.freezer();
        cg.set_frozen(true);
        assert!(
            wait_until(Duration::from_secs(5), || freezer.state().unwrap()
                == FreezeState::Frozen),
            "{:?}: the user pause did not freeze",
            h.kind
        );

        let guard = freezer.freeze(DEFAULT_BUDGET).unwrap();
        assert!(guard.already_frozen(), "{:?}", h.kind);
        guard.thaw().unwrap();
        assert_eq!(
            freezer.state().unwrap(),
            FreezeState::Frozen,
            "{:?}",
            h.kind
        );

        let guard = freezer.freeze(DEFAULT_BUDGET).unwrap();
        assert!(guard.already_frozen());
        drop(guard);
        assert_eq!(
            freezer.state().unwrap(),
            FreezeState::Frozen,
            "{:?}",
            h.kind
        );
        // The user's resume still works.
        cg.set_frozen(false);
        assert_eq!(freezer.state().unwrap(), FreezeState::Thawed);
    }
}

/// A FUSE mount whose server never answers: a request to it waits until the connection is
/// aborted, which dropping this does (closing the device, then a lazy unmount).
struct DeadFuse {
    dir: tempfile::TempDir,
    dev: Option<OwnedFd>,
}

impl DeadFuse {
    fn mount() -> DeadFuse {
        let dir = tempfile::tempdir().unwrap();
        // Close-on-exec: no child may hold the device, or closing ours would not abort.
        let dev = rustix::fs::open("/dev/fuse", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
            .expect("open /dev/fuse");
        let data = format!("fd={},rootmode=40000,user_id=0,group_id=0", dev.as_raw_fd());
        let data = std::ffi::CString::new(data).unwrap();
        rustix::mount::mount(
            "zlfreezer-test",
            dir.path(),
            "fuse",
            MountFlags::NOSUID | MountFlags::NODEV,
            data.as_c_str(),
        )
        .expect("mount fuse");
        DeadFuse {
            dir,
            dev: Some(dev),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for DeadFuse {
    fn drop(&mut self) {
        drop(self.dev.take());
        let _ = rustix::mount::unmount(self.dir.path(), UnmountFlags::DETACH);
    }
}

/// Kills and reaps a process on drop.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_task_in_uninterruptible_sleep_times_out_and_is_thawed_again() {
    let test = "a_task_in_uninterruptible_sleep_times_out_and_is_thawed_again";
    if !require::cgroup_freezer(test) {
        return;
    }
    if !Path::new("/dev/fuse").exists()
        && !require::missing(test, "/dev/fuse (the fuse module)", "modprobe fuse")
    {
        return;
    }
    for h in hierarchies() {
        // Field-tested recipe for a task the freezer cannot freeze (kernel 6.18): a `mkdir` on
        // a FUSE mount whose server never answers holds the directory's lock exclusively while
        // its LOOKUP waits (that wait is freezable). A `stat` of another name in the same
        // directory then waits for that lock in plain uninterruptible sleep (D), which no
        // freezer, v1 or v2, can interrupt.
        let fuse = DeadFuse::mount();
        let mut cg = TestCgroup::new(&h, "dstate");
        let holder = Reap(
            Command::new("mkdir")
                .arg(fuse.path().join("held"))
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn mkdir"),
        );
        assert!(
            wait_until(Duration::from_secs(5), || task_state(holder.0.id())
                == Some('D')),
            "the mkdir on the dead FUSE mount does not block"
        );
        let mut waiter = Command::new("sh")
            .arg("-c")
            .arg(r#"read _; exec stat "$0""#)
            .arg(fuse.path().join("other"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sh");
        let mut go = waiter.stdin.take().unwrap();
        let pid = cg.adopt(waiter);
        go.write_all(b"go\n").unwrap();
        drop(go);
        // Blocked for good: `stat` itself (not the shell, nor a page-in during the exec) in D,
        // and still there a while later.
        let blocked = || {
            task_comm(pid).as_deref() == Some("stat") && task_state(pid) == Some('D') && {
                std::thread::sleep(Duration::from_millis(50));
                task_state(pid) == Some('D')
            }
        };
        assert!(
            wait_until(Duration::from_secs(5), blocked),
            "the stat did not block in D state"
        );

        let freezer = cg.freezer();
        let start = Instant::now();
        let err = freezer.freeze(DEFAULT_BUDGET).map(|g| g.waited());
        let took = start.elapsed();
        let Err(err) = err else {
            panic!("{:?}: a task in D state froze in {err:?}", h.kind);
        };
        let msg = err.to_string();
        eprintln!("{:?}: gave up after {took:?}: {msg}", h.kind);
        assert!(matches!(err, FreezerError::Timeout { .. }), "{err:?}");
        assert!(
            msg.contains("did not freeze within 200 ms") && msg.contains("thawed it again"),
            "{msg}"
        );
        assert!(msg.contains(&cg.dir.display().to_string()), "{msg}");
        assert!(
            msg.contains(&format!("{pid} (stat)")),
            "names the D task: {msg}"
        );
        assert!(took >= DEFAULT_BUDGET, "gave up early: {took:?}");
        assert!(
            took < DEFAULT_BUDGET + Duration::from_millis(100),
            "overran the budget: {took:?}"
        );
        assert_eq!(freezer.state().unwrap(), FreezeState::Thawed, "left frozen");

        // Somebody else's freeze that cannot finish is waited for, and left alone.
        cg.set_frozen(true);
        assert_eq!(freezer.state().unwrap(), FreezeState::Freezing);
        let err = freezer.freeze(Duration::from_millis(20)).unwrap_err();
        assert!(
            matches!(err, FreezerError::ForeignFreezing { .. }),
            "{err:?}"
        );
        assert_eq!(freezer.state().unwrap(), FreezeState::Freezing, "touched");
        cg.set_frozen(false);

        // Abort the connection: both tasks get ENOTCONN and exit.
        drop(fuse);
        assert!(
            wait_until(Duration::from_secs(5), || task_state(pid)
                .is_none_or(|s| s == 'Z')),
            "the stat did not end after the FUSE abort"
        );
        drop(holder);
    }
}

#[test]
fn the_root_cgroup_is_refused() {
    if !require::cgroup_freezer("the_root_cgroup_is_refused") {
        return;
    }
    let hs = hierarchies();
    for h in &hs {
        match Freezer::at(&h.mount) {
            Err(FreezerError::RootCgroup { path }) => assert_eq!(path, h.mount),
            other => panic!("Freezer::at({}) = {other:?}", h.mount.display()),
        }
    }
    // A task in the root cgroup of every hierarchy.
    let mut child = Reap(sleeper());
    let pid = child.0.id();
    for h in &hs {
        fs::write(h.mount.join("cgroup.procs"), pid.to_string()).unwrap();
    }
    match Freezer::of_pid(pid) {
        Err(e @ FreezerError::RootCgroup { .. }) => {
            assert!(e.to_string().contains("freeze the whole host"), "{e}")
        }
        other => panic!("Freezer::of_pid of a root task = {other:?}"),
    }
    let _ = child.0.kill();
}
