//! Quiescing one container through its cgroup freezer, for a bounded time.
//!
//! A checkpoint captures a running container's upper dir as of one instant by pausing the
//! container around the capture. FIFREEZE does not work on overlayfs, and freezing a whole
//! filesystem would pause every container on it anyway; the cgroup freezer stops exactly the
//! tasks of one container.
//!
//! Both freezer interfaces are supported:
//! - cgroup v1 (`freezer.state`: write `FROZEN`, it reads `FREEZING` until every task is
//!   frozen, then `FROZEN`; write `THAWED` to resume). runc uses it on hybrid hosts, where
//!   `/sys/fs/cgroup` is a tmpfs of v1 hierarchies and cgroup2 is mounted at
//!   `/sys/fs/cgroup/unified`.
//! - cgroup v2 (`cgroup.freeze`: write `1`, `cgroup.events` says `frozen 1` once done, and
//!   the kernel notifies pollers of that file (`POLLPRI`) when it changes; write `0` to resume).
//!
//! Safety rules, all enforced here rather than left to callers:
//! - The pause is bounded: [`Freezer::freeze`] waits at most its budget and, if the cgroup is
//!   not frozen by then (a task in uninterruptible sleep cannot be frozen, e.g. one blocked on
//!   a lock held by a hung FUSE request), thaws it again before returning the error. A
//!   container is never left frozen by a failed attempt.
//! - A cgroup that is already frozen (or being frozen) when we start was paused by someone
//!   else, typically the user (`ctr task pause`): we never thaw it.
//! - The root cgroup of a hierarchy (the whole host) and a cgroup holding this process (we
//!   would freeze ourselves and never thaw) are refused.
//!
//! One race is left to callers: a user pause that lands while we hold our own freeze is undone
//! by our thaw, since the kernel keeps one frozen bit per cgroup. Callers should only
//! checkpoint tasks containerd reports as running, and keep the pause short (it is, by budget).
//!
//! Everything here blocks (short sleeps or `poll(2)` of at most a millisecond while waiting);
//! async callers use `spawn_blocking`.

use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};

use crate::util::mountinfo::unescape;

/// The default pause budget of a checkpoint.
pub const DEFAULT_BUDGET: Duration = Duration::from_millis(200);

/// Longest single wait between two looks at the state while freezing: the budget is a few
/// hundred milliseconds, so a look at least every millisecond keeps the pause close to the
/// time the kernel actually needs.
const MAX_POLL: Duration = Duration::from_millis(1);
/// First wait of the v1 back-off (v1 has no change notification); an idle cgroup is often
/// frozen by the first look after the write.
const FIRST_POLL: Duration = Duration::from_micros(50);
/// How many tasks in uninterruptible sleep a timeout error names at most.
const MAX_STUCK_NAMED: usize = 8;

/// Which freezer interface a cgroup has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// cgroup v1 `freezer` controller: `freezer.state`.
    V1,
    /// cgroup v2 core freezer: `cgroup.freeze` and `cgroup.events`.
    V2,
}

/// A cgroup's freezer state as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeState {
    /// Running.
    Thawed,
    /// A freeze was requested and some task is not frozen yet.
    Freezing,
    /// Every task is frozen.
    Frozen,
}

/// Failures of locating, freezing or thawing a cgroup. Every variant names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum FreezerError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path}: unexpected content {content:?}")]
    Parse { path: PathBuf, content: String },
    #[error("no freezer cgroup for the process in {path}: {reason}")]
    NoCgroup { path: PathBuf, reason: String },
    #[error(
        "refusing to freeze {path}: it is the root cgroup of its hierarchy, freezing it would \
         freeze the whole host"
    )]
    RootCgroup { path: PathBuf },
    #[error(
        "refusing to freeze {path}: this process is in it ({own}), it would freeze itself and \
         never thaw"
    )]
    OwnCgroup { path: PathBuf, own: PathBuf },
    #[error(
        "{path} is not a freezable cgroup: it has neither freezer.state (cgroup v1) nor \
         cgroup.freeze (cgroup v2)"
    )]
    NotAFreezer { path: PathBuf },
    #[error(
        "cgroup {path} did not freeze within {} (a task may be in uninterruptible sleep{}); \
         thawed it again", ms(*budget), stuck_list(*kind, stuck)
    )]
    Timeout {
        path: PathBuf,
        kind: Kind,
        budget: Duration,
        /// Tasks seen in uninterruptible sleep (`D`) after the budget ran out, as
        /// `pid (comm)`; empty when none was seen. Under v1 a frozen task shows as `D` as
        /// well, so there the list also holds the tasks that did freeze.
        stuck: Vec<String>,
    },
    #[error(
        "cgroup {path} did not freeze within {} and thawing it again failed, the container \
         stays frozen until it is thawed by hand ({thaw_hint}): {source}", ms(*budget)
    )]
    ThawAfterTimeout {
        path: PathBuf,
        budget: Duration,
        thaw_hint: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "cgroup {path} was already being frozen by someone else and was not frozen within {}; \
         left as it was", ms(*budget)
    )]
    ForeignFreezing { path: PathBuf, budget: Duration },
}

/// `200 ms`, or `0.25 ms` below a millisecond.
fn ms(d: Duration) -> String {
    if d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.2} ms", d.as_secs_f64() * 1000.0)
    }
}

fn stuck_list(kind: Kind, stuck: &[String]) -> String {
    match kind {
        _ if stuck.is_empty() => String::new(),
        Kind::V1 => format!(
            "; in D state, frozen ones included (v1 shows them as D): {}",
            stuck.join(", ")
        ),
        Kind::V2 => format!("; in D state: {}", stuck.join(", ")),
    }
}

/// One container's freezer cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freezer {
    kind: Kind,
    dir: PathBuf,
}

impl Freezer {
    /// The freezer cgroup of the task `pid` (a container's init pid), from `/proc/<pid>/cgroup`
    /// and this process's mount table: its v1 `freezer` cgroup when it is in a non-root one
    /// (runc on hybrid hosts), otherwise its cgroup v2 cgroup. Refuses a root cgroup.
    pub fn of_pid(pid: u32) -> Result<Freezer, FreezerError> {
        let proc_path = PathBuf::from(format!("/proc/{pid}/cgroup"));
        let proc_cgroup = read(&proc_path)?;
        let mounts = read(Path::new("/proc/self/mountinfo"))?;
        let (kind, dir) =
            locate(&proc_cgroup, &cgroup_mounts(&mounts)).map_err(|reason| match reason {
                Locate::Root(path) => FreezerError::RootCgroup { path },
                Locate::Missing(reason) => FreezerError::NoCgroup {
                    path: proc_path.clone(),
                    reason,
                },
            })?;
        Freezer::checked(kind, dir)
    }

    /// The cgroup directory `dir`, v1 or v2 by the files it has. Refuses a hierarchy's root.
    pub fn at(dir: impl AsRef<Path>) -> Result<Freezer, FreezerError> {
        let dir = dir.as_ref();
        let dir = dir.canonicalize().map_err(|source| FreezerError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        let mounts = read(Path::new("/proc/self/mountinfo"))?;
        if cgroup_mounts(&mounts).iter().any(|m| m.mount_point == dir) {
            return Err(FreezerError::RootCgroup { path: dir });
        }
        let kind = if dir.join("freezer.state").exists() {
            Kind::V1
        } else if dir.join("cgroup.freeze").exists() {
            Kind::V2
        } else {
            return Err(FreezerError::NotAFreezer { path: dir });
        };
        Freezer::checked(kind, dir)
    }

    fn checked(kind: Kind, dir: PathBuf) -> Result<Freezer, FreezerError> {
        let state_file = match kind {
            Kind::V1 => "freezer.state",
            Kind::V2 => "cgroup.freeze",
        };
        if !dir.join(state_file).exists() {
            return Err(FreezerError::NotAFreezer { path: dir });
        }
        Ok(Freezer { kind, dir })
    }

    /// The freezer interface of this cgroup.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The cgroup directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The command that thaws this cgroup by hand, for messages.
    pub fn thaw_hint(&self) -> String {
        match self.kind {
            Kind::V1 => format!("echo THAWED > {}", self.dir.join("freezer.state").display()),
            Kind::V2 => format!("echo 0 > {}", self.dir.join("cgroup.freeze").display()),
        }
    }

    /// Thaws the cgroup whoever froze it: only for a cgroup this daemon recorded freezing and
    /// could not thaw (killed mid-pause); a user's pause is never undone through this.
    pub fn thaw(&self) -> Result<(), FreezerError> {
        self.write_state(false)
    }

    /// The current state. Under v1, frozen by an ancestor reads `Frozen` too; under v2 an
    /// ancestor's freeze shows as `frozen 1` in `cgroup.events` while `cgroup.freeze` is 0,
    /// which is `Frozen` as well.
    pub fn state(&self) -> Result<FreezeState, FreezerError> {
        match self.kind {
            Kind::V1 => {
                let path = self.dir.join("freezer.state");
                parse_v1_state(&path, &read(&path)?)
            }
            Kind::V2 => {
                let events = self.dir.join("cgroup.events");
                if parse_v2_frozen(&events, &read(&events)?)? {
                    return Ok(FreezeState::Frozen);
                }
                let freeze = self.dir.join("cgroup.freeze");
                match read(&freeze)?.trim() {
                    "0" => Ok(FreezeState::Thawed),
                    "1" => Ok(FreezeState::Freezing),
                    other => Err(FreezerError::Parse {
                        path: freeze,
                        content: other.to_string(),
                    }),
                }
            }
        }
    }

    /// Freezes the cgroup and waits at most `budget` for every task to be frozen.
    ///
    /// - Frozen in time: a guard that thaws on [`FrozenGuard::thaw`] or drop.
    /// - Not frozen in time: thaws it again and returns [`FreezerError::Timeout`] (or
    ///   [`FreezerError::ThawAfterTimeout`] if even that failed).
    /// - Already frozen before we start (a user pause, or an ancestor's): a guard with
    ///   `already_frozen()` that never thaws. Already being frozen by someone else: waits for
    ///   that within the budget the same way, and never thaws it
    ///   ([`FreezerError::ForeignFreezing`] if it does not finish).
    pub fn freeze(&self, budget: Duration) -> Result<FrozenGuard, FreezerError> {
        self.refuse_own_cgroup()?;
        let start = Instant::now();
        match self.state()? {
            FreezeState::Frozen => return Ok(self.guard(start.elapsed(), true)),
            FreezeState::Freezing => {
                return if self.wait_frozen(start, budget)? {
                    Ok(self.guard(start.elapsed(), true))
                } else {
                    Err(FreezerError::ForeignFreezing {
                        path: self.dir.clone(),
                        budget,
                    })
                };
            }
            FreezeState::Thawed => {}
        }
        let start = Instant::now();
        self.write_state(true)?;
        let frozen = match self.wait_frozen(start, budget) {
            Ok(frozen) => frozen,
            Err(e) => {
                // Cannot tell: do not leave it frozen on our account.
                if let Err(thaw) = self.write_state(false) {
                    tracing::error!(cgroup = %self.dir.display(), error = %thaw,
                        "thawing after a failed wait for the freeze failed");
                }
                return Err(e);
            }
        };
        if frozen {
            return Ok(self.guard(start.elapsed(), false));
        }
        // Which tasks are stuck, looked at while still freezing (cheap: this is the error path).
        let stuck = self.uninterruptible_tasks();
        if let Err(e) = self.write_state(false) {
            let source = match e {
                FreezerError::Write { source, .. } => source,
                other => io::Error::other(other.to_string()),
            };
            return Err(FreezerError::ThawAfterTimeout {
                path: self.dir.clone(),
                budget,
                thaw_hint: self.thaw_hint(),
                source,
            });
        }
        tracing::warn!(cgroup = %self.dir.display(), budget_ms = budget.as_millis() as u64,
            stuck = ?stuck, "cgroup did not freeze in time; thawed it again");
        Err(FreezerError::Timeout {
            path: self.dir.clone(),
            kind: self.kind,
            budget,
            stuck,
        })
    }

    fn guard(&self, waited: Duration, already_frozen: bool) -> FrozenGuard {
        FrozenGuard {
            freezer: self.clone(),
            waited,
            already_frozen,
            frozen_at: Instant::now(),
            thawed: false,
        }
    }

    /// Writes the freeze request (`true`) or the thaw (`false`).
    fn write_state(&self, freeze: bool) -> Result<(), FreezerError> {
        let (file, value) = match (self.kind, freeze) {
            (Kind::V1, true) => ("freezer.state", "FROZEN"),
            (Kind::V1, false) => ("freezer.state", "THAWED"),
            (Kind::V2, true) => ("cgroup.freeze", "1"),
            (Kind::V2, false) => ("cgroup.freeze", "0"),
        };
        let path = self.dir.join(file);
        OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(value.as_bytes()))
            .map_err(|source| FreezerError::Write {
                path,
                value,
                source,
            })
    }

    /// Waits until the cgroup reads frozen or `budget` since `start` has passed; `Ok(false)` on
    /// the latter. Looks at least once, even with a zero budget.
    fn wait_frozen(&self, start: Instant, budget: Duration) -> Result<bool, FreezerError> {
        let deadline = start + budget;
        match self.kind {
            Kind::V1 => {
                let path = self.dir.join("freezer.state");
                let mut pause = FIRST_POLL;
                loop {
                    // Reading freezer.state is also what lets the kernel move FREEZING to FROZEN.
                    if parse_v1_state(&path, &read(&path)?)? == FreezeState::Frozen {
                        return Ok(true);
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(false);
                    }
                    std::thread::sleep(pause.min(deadline - now));
                    pause = (pause * 2).min(MAX_POLL);
                }
            }
            Kind::V2 => {
                let path = self.dir.join("cgroup.events");
                let file = File::open(&path).map_err(|source| FreezerError::Read {
                    path: path.clone(),
                    source,
                })?;
                let mut buf = [0u8; 256];
                loop {
                    // Reading arms the notification; a change after it wakes poll with POLLPRI.
                    let n = file
                        .read_at(&mut buf, 0)
                        .map_err(|source| FreezerError::Read {
                            path: path.clone(),
                            source,
                        })?;
                    if parse_v2_frozen(&path, &String::from_utf8_lossy(&buf[..n]))? {
                        return Ok(true);
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(false);
                    }
                    let wait = (deadline - now).min(MAX_POLL);
                    let timeout = Timespec {
                        tv_sec: 0,
                        tv_nsec: wait.subsec_nanos().into(),
                    };
                    let mut fds = [PollFd::new(&file, PollFlags::PRI)];
                    match rustix::event::poll(&mut fds, Some(&timeout)) {
                        Ok(_) | Err(rustix::io::Errno::INTR) => {}
                        Err(e) => {
                            return Err(FreezerError::Read {
                                path,
                                source: e.into(),
                            });
                        }
                    }
                }
            }
        }
    }

    /// Refuses a cgroup that holds this process, or an ancestor of the one that does.
    fn refuse_own_cgroup(&self) -> Result<(), FreezerError> {
        let own = read(Path::new("/proc/self/cgroup"))?;
        let mounts = read(Path::new("/proc/self/mountinfo"))?;
        let mounts = cgroup_mounts(&mounts);
        let parsed = parse_proc_cgroup(&own);
        let own_path = match self.kind {
            Kind::V1 => parsed.v1_freezer,
            Kind::V2 => parsed.v2,
        };
        let Some(own_path) = own_path else {
            return Ok(());
        };
        let wanted = match self.kind {
            Kind::V1 => MountKind::V1Freezer,
            Kind::V2 => MountKind::V2,
        };
        for m in mounts.iter().filter(|m| m.kind == wanted) {
            if let Some(own_dir) = m.dir_of(&own_path)
                && own_dir.starts_with(&self.dir)
            {
                return Err(FreezerError::OwnCgroup {
                    path: self.dir.clone(),
                    own: own_dir,
                });
            }
        }
        Ok(())
    }

    /// `pid (comm)` of up to [`MAX_STUCK_NAMED`] tasks of the cgroup in uninterruptible sleep.
    fn uninterruptible_tasks(&self) -> Vec<String> {
        let list = match self.kind {
            Kind::V1 => "tasks",
            Kind::V2 => "cgroup.threads",
        };
        let Ok(tids) = std::fs::read_to_string(self.dir.join(list)) else {
            return Vec::new();
        };
        tids.lines()
            .filter_map(|tid| {
                let stat = std::fs::read_to_string(format!("/proc/{}/stat", tid.trim())).ok()?;
                let (comm, state) = parse_stat_state(&stat)?;
                (state == 'D').then(|| format!("{} ({comm})", tid.trim()))
            })
            .take(MAX_STUCK_NAMED)
            .collect()
    }
}

/// A cgroup frozen by [`Freezer::freeze`]. Thaws on [`FrozenGuard::thaw`] or, best effort
/// (failures logged), on drop; never when the cgroup was already frozen by someone else.
#[must_use = "dropping the guard thaws the container at once"]
pub struct FrozenGuard {
    freezer: Freezer,
    waited: Duration,
    already_frozen: bool,
    frozen_at: Instant,
    thawed: bool,
}

impl fmt::Debug for FrozenGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrozenGuard")
            .field("cgroup", &self.freezer.dir)
            .field("waited", &self.waited)
            .field("already_frozen", &self.already_frozen)
            .field("thawed", &self.thawed)
            .finish()
    }
}

impl FrozenGuard {
    /// How long the cgroup took to reach frozen after the freeze was requested.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// Whether the cgroup was frozen before we started (a user pause): then it is never thawed
    /// by this guard.
    pub fn already_frozen(&self) -> bool {
        self.already_frozen
    }

    /// How long the cgroup has been frozen so far (since it reached frozen).
    pub fn frozen_for(&self) -> Duration {
        self.frozen_at.elapsed()
    }

    /// The frozen cgroup.
    pub fn freezer(&self) -> &Freezer {
        &self.freezer
    }

    /// Thaws the cgroup (nothing when it was already frozen). A cgroup that vanished meanwhile
    /// (the container exited and was cleaned up) has nothing left to thaw: `Ok`.
    pub fn thaw(mut self) -> Result<(), FreezerError> {
        self.thaw_once()
    }

    fn thaw_once(&mut self) -> Result<(), FreezerError> {
        if self.thawed || self.already_frozen {
            return Ok(());
        }
        self.thawed = true;
        match self.freezer.write_state(false) {
            Err(FreezerError::Write { source, .. })
                if source.kind() == io::ErrorKind::NotFound
                    || source.raw_os_error() == Some(libc::ENODEV) =>
            {
                tracing::debug!(cgroup = %self.freezer.dir.display(),
                    "cgroup gone before the thaw; nothing to thaw");
                Ok(())
            }
            other => other,
        }
    }
}

impl Drop for FrozenGuard {
    fn drop(&mut self) {
        if let Err(e) = self.thaw_once() {
            tracing::error!(cgroup = %self.freezer.dir.display(), error = %e,
                hint = %self.freezer.thaw_hint(), "thawing a frozen container failed");
        }
    }
}

fn read(path: &Path) -> Result<String, FreezerError> {
    std::fs::read_to_string(path).map_err(|source| FreezerError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_v1_state(path: &Path, content: &str) -> Result<FreezeState, FreezerError> {
    match content.trim() {
        "THAWED" => Ok(FreezeState::Thawed),
        "FREEZING" => Ok(FreezeState::Freezing),
        "FROZEN" => Ok(FreezeState::Frozen),
        other => Err(FreezerError::Parse {
            path: path.to_path_buf(),
            content: other.to_string(),
        }),
    }
}

/// The `frozen` key of a v2 `cgroup.events`.
fn parse_v2_frozen(path: &Path, content: &str) -> Result<bool, FreezerError> {
    let value = content.lines().find_map(|l| l.strip_prefix("frozen "));
    match value.map(str::trim) {
        Some("0") => Ok(false),
        Some("1") => Ok(true),
        _ => Err(FreezerError::Parse {
            path: path.to_path_buf(),
            content: content.to_string(),
        }),
    }
}

/// `(comm, state)` from a `/proc/<pid>/stat` line; comm may hold spaces and parentheses, so the
/// state is what follows the last `)`.
fn parse_stat_state(stat: &str) -> Option<(&str, char)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    let state = stat.get(close + 1..)?.trim_start().chars().next()?;
    Some((comm, state))
}

/// A task's cgroup paths of interest, from `/proc/<pid>/cgroup`.
#[derive(Debug, Default, PartialEq, Eq)]
struct ProcCgroup {
    /// Path in the v1 hierarchy that has the `freezer` controller.
    v1_freezer: Option<String>,
    /// Path in the v2 hierarchy (`0::`).
    v2: Option<String>,
}

/// Parses `/proc/<pid>/cgroup`: `hierarchy-id:controllers:path` lines; v2 is `0::path`.
fn parse_proc_cgroup(text: &str) -> ProcCgroup {
    let mut out = ProcCgroup::default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            out.v2 = Some(path.to_string());
        } else if controllers.split(',').any(|c| c == "freezer") {
            out.v1_freezer = Some(path.to_string());
        }
    }
    out
}

/// Which cgroup hierarchy a mount shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MountKind {
    V1Freezer,
    /// A v1 hierarchy without the freezer controller.
    V1Other,
    V2,
}

/// A cgroup filesystem mount, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgroupMount {
    kind: MountKind,
    /// The cgroup the mount shows, within its hierarchy (`/` unless a subtree is bind mounted).
    root: String,
    mount_point: PathBuf,
}

impl CgroupMount {
    /// The directory of the cgroup `path` (as `/proc/<pid>/cgroup` gives it) under this mount;
    /// `None` when the mount does not show it.
    fn dir_of(&self, path: &str) -> Option<PathBuf> {
        let rel = if self.root == "/" {
            path.strip_prefix('/')?
        } else {
            let rest = path.strip_prefix(self.root.as_str())?;
            if rest.is_empty() {
                rest
            } else {
                rest.strip_prefix('/')?
            }
        };
        if rel.split('/').any(|c| c == "..") {
            return None;
        }
        Some(if rel.is_empty() {
            self.mount_point.clone()
        } else {
            self.mount_point.join(rel)
        })
    }
}

/// The cgroup and cgroup2 mounts in a mountinfo text (`proc(5)`: `id parent major:minor root
/// mount-point options [optional fields] - fstype source super-options`).
fn cgroup_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let mut post = post.split(' ');
            let (fstype, _source, options) = (post.next()?, post.next()?, post.next()?);
            let kind = match fstype {
                "cgroup2" => MountKind::V2,
                "cgroup" if options.split(',').any(|o| o == "freezer") => MountKind::V1Freezer,
                "cgroup" => MountKind::V1Other,
                _ => return None,
            };
            Some(CgroupMount {
                kind,
                root: String::from_utf8_lossy(&unescape(pre.get(3)?.as_bytes())).into_owned(),
                mount_point: PathBuf::from(OsString::from_vec(unescape(pre.get(4)?.as_bytes()))),
            })
        })
        .collect()
}

/// Why [`locate`] found no cgroup.
#[derive(Debug, PartialEq, Eq)]
enum Locate {
    /// The task is in the root cgroup (the path is the hierarchy's mount point).
    Root(PathBuf),
    Missing(String),
}

/// The freezer cgroup directory of a task: its v1 freezer cgroup if that is not the root and the
/// freezer hierarchy is mounted here, else its v2 cgroup.
fn locate(proc_cgroup: &str, mounts: &[CgroupMount]) -> Result<(Kind, PathBuf), Locate> {
    let parsed = parse_proc_cgroup(proc_cgroup);
    let find = |kind: MountKind, path: &str| {
        mounts
            .iter()
            .filter(|m| m.kind == kind)
            .find_map(|m| m.dir_of(path).map(|d| (d, m.mount_point.clone())))
    };
    if let Some(path) = parsed.v1_freezer.as_deref().filter(|p| *p != "/")
        && let Some((dir, mount)) = find(MountKind::V1Freezer, path)
        && dir != mount
    {
        return Ok((Kind::V1, dir));
    }
    let Some(path) = parsed.v2.as_deref() else {
        return Err(Locate::Missing(match parsed.v1_freezer {
            Some(p) if p != "/" => format!(
                "in v1 freezer cgroup {p}, but no freezer hierarchy showing it is mounted here, \
                 and in no cgroup v2 cgroup"
            ),
            Some(_) => "in the root v1 freezer cgroup and in no cgroup v2 cgroup".to_string(),
            None => "in neither a v1 freezer nor a cgroup v2 cgroup".to_string(),
        }));
    };
    let Some((dir, mount)) = find(MountKind::V2, path) else {
        return Err(Locate::Missing(format!(
            "in cgroup v2 cgroup {path}, but no cgroup2 mount showing it is mounted here"
        )));
    };
    if dir == mount {
        // Root of v2, and v1 (if any) was the root too or not usable.
        return Err(Locate::Root(dir));
    }
    Ok((Kind::V2, dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This host's layout: v1 hierarchies on a tmpfs and cgroup2 at /sys/fs/cgroup/unified.
    const HYBRID: &str = "\
22 1 0:20 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
23 22 0:21 / /sys/fs/cgroup rw,relatime shared:8 - tmpfs tmpfs rw,mode=755
24 23 0:22 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
25 23 0:23 / /sys/fs/cgroup/cpu rw,relatime shared:10 - cgroup cgroup rw,cpu
26 23 0:24 / /sys/fs/cgroup/freezer rw,relatime shared:11 - cgroup cgroup rw,freezer
27 23 0:25 / /sys/fs/cgroup/memory rw,relatime shared:12 - cgroup cgroup rw,memory
";
    const PURE_V2: &str = "\
30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
";

    fn mounts(text: &str) -> Vec<CgroupMount> {
        cgroup_mounts(text)
    }

    #[test]
    fn mountinfo_gives_the_cgroup_mounts_and_their_kind() {
        let m = mounts(HYBRID);
        assert_eq!(m.len(), 4, "{m:?}");
        assert_eq!(m[0].kind, MountKind::V2);
        assert_eq!(m[0].mount_point, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(m[1].kind, MountKind::V1Other);
        assert_eq!(m[2].kind, MountKind::V1Freezer);
        assert_eq!(m[2].mount_point, Path::new("/sys/fs/cgroup/freezer"));
        assert_eq!(m[2].root, "/");
    }

    #[test]
    fn mountinfo_optional_fields_escapes_and_co_mounted_controllers() {
        let text = "\
40 23 0:30 / /mnt/cg\\040x rw,relatime shared:1 master:2 - cgroup none rw,cpu,freezer,name=x
41 23 0:31 /kubepods /host/freezer rw - cgroup cgroup rw,freezer
";
        let m = mounts(text);
        assert_eq!(m[0].kind, MountKind::V1Freezer);
        assert_eq!(m[0].mount_point, Path::new("/mnt/cg x"));
        assert_eq!(m[1].root, "/kubepods");
    }

    #[test]
    fn proc_cgroup_lines() {
        let text =
            "9:name=systemd:/x\n6:freezer:/default/abc\n4:cpu,cpuacct:/y\n0::/user.slice/a:b\n";
        let p = parse_proc_cgroup(text);
        assert_eq!(p.v1_freezer.as_deref(), Some("/default/abc"));
        // A path may hold ':'.
        assert_eq!(p.v2.as_deref(), Some("/user.slice/a:b"));
        let co = parse_proc_cgroup("3:cpu,freezer:/k\n");
        assert_eq!(co.v1_freezer.as_deref(), Some("/k"));
        assert_eq!(co.v2, None);
        assert_eq!(parse_proc_cgroup("garbage\n\n"), ProcCgroup::default());
    }

    #[test]
    fn a_runc_container_on_a_hybrid_host_uses_the_v1_freezer() {
        let proc = "6:freezer:/default/c1\n4:memory:/default/c1\n0::/default/c1\n";
        assert_eq!(
            locate(proc, &mounts(HYBRID)),
            Ok((Kind::V1, PathBuf::from("/sys/fs/cgroup/freezer/default/c1")))
        );
    }

    #[test]
    fn root_v1_freezer_falls_back_to_v2() {
        let proc = "6:freezer:/\n0::/system.slice/x.service\n";
        assert_eq!(
            locate(proc, &mounts(HYBRID)),
            Ok((
                Kind::V2,
                PathBuf::from("/sys/fs/cgroup/unified/system.slice/x.service")
            ))
        );
        // Pure v2 host: the cgroup2 mount is /sys/fs/cgroup itself.
        assert_eq!(
            locate("0::/k8s/pod/c\n", &mounts(PURE_V2)),
            Ok((Kind::V2, PathBuf::from("/sys/fs/cgroup/k8s/pod/c")))
        );
    }

    #[test]
    fn the_root_cgroup_is_refused() {
        let proc = "6:freezer:/\n0::/\n";
        assert_eq!(
            locate(proc, &mounts(HYBRID)),
            Err(Locate::Root(PathBuf::from("/sys/fs/cgroup/unified")))
        );
        assert_eq!(
            locate("0::/\n", &mounts(PURE_V2)),
            Err(Locate::Root(PathBuf::from("/sys/fs/cgroup")))
        );
    }

    #[test]
    fn unmounted_hierarchies_and_foreign_paths_are_missing() {
        // v1 freezer path but no freezer mount, and no v2 line.
        let Err(Locate::Missing(reason)) = locate("6:freezer:/a\n", &mounts(PURE_V2)) else {
            panic!("expected Missing");
        };
        assert!(reason.contains("no freezer hierarchy"), "{reason}");
        // A bind-mounted subtree does not show cgroups outside it.
        let sub = "41 23 0:31 /kubepods /host/freezer rw - cgroup cgroup rw,freezer\n";
        assert!(locate("6:freezer:/other\n", &mounts(sub)).is_err());
        assert_eq!(
            locate("6:freezer:/kubepods/p1\n", &mounts(sub)),
            Ok((Kind::V1, PathBuf::from("/host/freezer/p1")))
        );
        // ... and its own root is the root of what we see: refused (as Missing, no v2 line).
        assert!(locate("6:freezer:/kubepods\n", &mounts(sub)).is_err());
        // No "/kubepodsX" confusion with "/kubepods".
        assert!(locate("6:freezer:/kubepodsX/p\n", &mounts(sub)).is_err());
        // ".." never leaves the mount.
        assert!(locate("0::/../etc\n", &mounts(PURE_V2)).is_err());
    }

    #[test]
    fn state_files() {
        let p = Path::new("/x/freezer.state");
        assert_eq!(parse_v1_state(p, "FROZEN\n").unwrap(), FreezeState::Frozen);
        assert_eq!(
            parse_v1_state(p, "FREEZING\n").unwrap(),
            FreezeState::Freezing
        );
        assert_eq!(parse_v1_state(p, "THAWED\n").unwrap(), FreezeState::Thawed);
        let e = parse_v1_state(p, "bogus").unwrap_err().to_string();
        assert!(e.contains("/x/freezer.state") && e.contains("bogus"), "{e}");
        let ev = Path::new("/x/cgroup.events");
        assert!(parse_v2_frozen(ev, "populated 1\nfrozen 1\n").unwrap());
        assert!(!parse_v2_frozen(ev, "populated 0\nfrozen 0\n").unwrap());
        assert!(parse_v2_frozen(ev, "populated 1\n").is_err());
    }

    #[test]
    fn stat_state_survives_odd_comms() {
        assert_eq!(parse_stat_state("12 (sh) S 1 12"), Some(("sh", 'S')));
        assert_eq!(parse_stat_state("13 (a) b) D 1 13"), Some(("a) b", 'D')));
        assert_eq!(parse_stat_state("nonsense"), None);
    }

    #[test]
    fn messages_name_the_cgroup_and_the_budget() {
        let e = FreezerError::Timeout {
            path: PathBuf::from("/sys/fs/cgroup/unified/x"),
            kind: Kind::V2,
            budget: DEFAULT_BUDGET,
            stuck: vec!["42 (stat)".into()],
        };
        assert_eq!(
            e.to_string(),
            "cgroup /sys/fs/cgroup/unified/x did not freeze within 200 ms (a task may be in \
             uninterruptible sleep; in D state: 42 (stat)); thawed it again"
        );
        let v1 = FreezerError::Timeout {
            path: PathBuf::from("/sys/fs/cgroup/freezer/x"),
            kind: Kind::V1,
            budget: DEFAULT_BUDGET,
            stuck: Vec::new(),
        };
        assert_eq!(
            v1.to_string(),
            "cgroup /sys/fs/cgroup/freezer/x did not freeze within 200 ms (a task may be in \
             uninterruptible sleep); thawed it again"
        );
        assert_eq!(ms(Duration::from_micros(250)), "0.25 ms");
        let root = FreezerError::RootCgroup {
            path: PathBuf::from("/sys/fs/cgroup/freezer"),
        };
        assert!(root.to_string().contains("root cgroup"), "{root}");
    }
}
