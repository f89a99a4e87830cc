//! systemd integration without libsystemd: readiness notification (`sd_notify(3)` protocol)
//! and socket activation (`sd_listen_fds(3)` protocol).
//!
//! With socket activation systemd owns the listening sockets and keeps them open while the
//! daemon restarts: containerd's connections wait in the socket's backlog instead of being
//! refused, so a restart or an upgrade is invisible to it. Without activation (manual runs)
//! the daemon binds the paths itself.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::io::FdFlags;
use rustix::net::{AddressFamily, SocketType};

use super::socket::{SocketError, bind_unix};

/// `FileDescriptorName=` of the Snapshots API socket (packaging/systemd/zlayer-snapshotter.socket).
pub const SNAPSHOTTER_SOCKET: &str = "snapshotter";
/// `FileDescriptorName=` of the control socket (packaging/systemd/zlayer-control.socket).
pub const CONTROL_SOCKET: &str = "control";

/// The first inherited descriptor (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;
/// Name systemd gives a descriptor when `LISTEN_FDNAMES` is absent.
const UNNAMED: &str = "unknown";

/// Failures of notification or socket activation.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("cannot send {state:?} to the systemd notify socket {socket:?}")]
    Notify {
        socket: OsString,
        state: String,
        #[source]
        source: io::Error,
    },
    #[error("NOTIFY_SOCKET={socket:?} is neither a path nor an @abstract name")]
    NotifyAddress { socket: OsString },
    #[error("socket activation: invalid {var}={value:?}: {reason}")]
    Env {
        var: &'static str,
        value: OsString,
        reason: &'static str,
    },
    #[error("socket activation: inherited fd {fd} ({name}) is not open")]
    NotOpen {
        fd: RawFd,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("socket activation: cannot inspect inherited fd {fd} ({name})")]
    Inspect {
        fd: RawFd,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "socket activation: inherited fd {fd} ({name}) is not a listening unix stream socket \
         ({found}); check ListenStream= in the socket unit"
    )]
    NotAUnixListener {
        fd: RawFd,
        name: String,
        found: String,
    },
    #[error(
        "socket activation: {count} sockets are named {name:?}, expected one; give each \
         socket unit one ListenStream= and its own FileDescriptorName="
    )]
    DuplicateName { name: String, count: usize },
    #[error(transparent)]
    Bind(#[from] SocketError),
}

type Result<T> = std::result::Result<T, SystemdError>;

/// Sends `state` (newline-separated `KEY=VALUE` assignments such as `READY=1`) to the service
/// manager named by `$NOTIFY_SOCKET`. Returns `Ok(false)` without doing anything when the
/// variable is unset (not started by systemd, or not `Type=notify`).
pub fn notify(state: &str) -> Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) if !socket.is_empty() => notify_to(&socket, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `state` as one datagram to `socket`: a filesystem path (`/…`) or an abstract name
/// (`@…`, the form systemd uses for its own socket).
pub fn notify_to(socket: &OsStr, state: &str) -> Result<()> {
    let bytes = socket.as_bytes();
    let err = |source| SystemdError::Notify {
        socket: socket.to_os_string(),
        state: state.to_string(),
        source,
    };
    let addr = match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(Path::new(socket)).map_err(err)?,
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]).map_err(err)?,
        _ => {
            return Err(SystemdError::NotifyAddress {
                socket: socket.to_os_string(),
            });
        }
    };
    let sock = UnixDatagram::unbound().map_err(err)?;
    let sent = sock.send_to_addr(state.as_bytes(), &addr).map_err(err)?;
    if sent != state.len() {
        return Err(err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("datagram truncated to {sent} of {} bytes", state.len()),
        )));
    }
    Ok(())
}

/// The listening sockets systemd passed to this process, by `FileDescriptorName=`.
#[derive(Debug, Default)]
pub struct Activated {
    listeners: Vec<(String, UnixListener)>,
}

/// Set once the inherited descriptors have been adopted: they are owned by exactly one
/// [`OwnedFd`] each, so a second adoption must not happen.
static TAKEN: AtomicBool = AtomicBool::new(false);

impl Activated {
    /// Adopts the descriptors named by `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` (from
    /// fd 3 on) when `LISTEN_PID` is this process, marks them close-on-exec, checks that each
    /// is a listening unix stream socket, and unsets the three variables so no child process
    /// mistakes them for its own. Not activated (no or another `LISTEN_PID`): empty. A second
    /// call returns an empty set.
    ///
    /// # Safety
    /// Call it while the process is still single-threaded (it changes the environment), and
    /// before anything in the process could have closed or reused descriptors from 3 on.
    pub unsafe fn take_from_env() -> Result<Self> {
        if TAKEN.swap(true, Ordering::SeqCst) {
            return Ok(Self::default());
        }
        let vars = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"].map(std::env::var_os);
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            // SAFETY: the caller guarantees that no other thread reads or writes the
            // environment concurrently.
            unsafe { std::env::remove_var(var) };
        }
        let [pid, fds, names] = vars;
        let wanted = parse_env(
            pid.as_deref(),
            fds.as_deref(),
            names.as_deref(),
            std::process::id(),
        )?;
        let mut listeners = Vec::with_capacity(wanted.len());
        for (fd, name) in wanted {
            // SAFETY: LISTEN_PID names this process, so systemd passed `fd` to it; `TAKEN`
            // makes this the only adoption, and the caller guarantees nothing else in the
            // process has closed or reused it.
            let listener = unsafe { adopt(fd, &name) }?;
            listeners.push((name, listener));
        }
        Ok(Self { listeners })
    }

    /// Wraps already-open listeners (tests, or a caller that adopted them itself).
    #[must_use]
    pub fn from_listeners(listeners: Vec<(String, UnixListener)>) -> Self {
        Self { listeners }
    }

    /// Whether no socket was passed (or all were taken).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty()
    }

    /// Names of the sockets not taken yet (for a warning: nobody serves them).
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        self.listeners.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Removes and returns the socket named `name`; an error if several carry that name.
    pub fn take(&mut self, name: &str) -> Result<Option<UnixListener>> {
        let count = self.listeners.iter().filter(|(n, _)| n == name).count();
        if count > 1 {
            return Err(SystemdError::DuplicateName {
                name: name.to_string(),
                count,
            });
        }
        Ok(self
            .listeners
            .iter()
            .position(|(n, _)| n == name)
            .map(|i| self.listeners.remove(i).1))
    }
}

/// A socket a server listens on, and its file.
#[derive(Debug)]
pub struct Listening {
    pub listener: UnixListener,
    pub file: SocketFile,
}

impl Listening {
    /// The listener for a tokio server (non-blocking), and the file to remove after it stopped.
    pub fn into_tokio(self) -> io::Result<(tokio::net::UnixListener, SocketFile)> {
        self.listener.set_nonblocking(true)?;
        Ok((
            tokio::net::UnixListener::from_std(self.listener)?,
            self.file,
        ))
    }
}

/// The path of a served socket, and whether systemd owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketFile {
    /// The inherited socket's own path, else the configured one.
    pub path: PathBuf,
    /// Passed by systemd: the file belongs to the socket unit, so the daemon neither
    /// replaces, chmods nor removes it.
    pub inherited: bool,
}

impl SocketFile {
    /// Removes the socket file after the server stopped, unless systemd owns it (then it
    /// keeps listening for the next start).
    pub fn remove(&self) {
        if self.inherited {
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::debug!(socket = %self.path.display(), error = %e, "cannot remove socket");
        }
    }
}

/// The socket named `name` from `activated` when systemd passed one, else `fallback` bound
/// here (stale socket replaced, mode 0660). An inherited socket whose path differs from
/// `fallback` is served anyway, with a warning: clients configured with `fallback` will not
/// reach it.
pub fn take_listener(activated: &mut Activated, name: &str, fallback: &Path) -> Result<Listening> {
    let Some(listener) = activated.take(name)? else {
        return Ok(Listening {
            listener: bind_unix(fallback)?,
            file: SocketFile {
                path: fallback.to_path_buf(),
                inherited: false,
            },
        });
    };
    let own = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    if own.as_deref() != Some(fallback) {
        tracing::warn!(
            name,
            inherited = ?own,
            configured = %fallback.display(),
            "socket passed by systemd is not at the configured path"
        );
    }
    Ok(Listening {
        listener,
        file: SocketFile {
            path: own.unwrap_or_else(|| fallback.to_path_buf()),
            inherited: true,
        },
    })
}

/// The (fd, name) pairs that `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES` pass to process
/// `my_pid`: none when `LISTEN_PID` is unset or names another process (the variables were
/// inherited from a parent), an error when they are malformed or disagree.
fn parse_env(
    pid: Option<&OsStr>,
    fds: Option<&OsStr>,
    names: Option<&OsStr>,
    my_pid: u32,
) -> Result<Vec<(RawFd, String)>> {
    let env = |var, value: &OsStr, reason| SystemdError::Env {
        var,
        value: value.to_os_string(),
        reason,
    };
    let Some(pid) = pid else {
        return Ok(Vec::new());
    };
    let pid_value: u32 = pid
        .to_str()
        .and_then(|s| s.parse().ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| env("LISTEN_PID", pid, "not a process id"))?;
    if pid_value != my_pid {
        tracing::debug!(
            listen_pid = pid_value,
            pid = my_pid,
            "LISTEN_PID names another process; not socket-activated"
        );
        return Ok(Vec::new());
    }
    let Some(fds) = fds else {
        return Err(env("LISTEN_PID", pid, "set without LISTEN_FDS"));
    };
    let count: RawFd = fds
        .to_str()
        .and_then(|s| s.parse().ok())
        .filter(|n| (0..=RawFd::MAX - LISTEN_FDS_START).contains(n))
        .ok_or_else(|| env("LISTEN_FDS", fds, "not a descriptor count"))?;
    let count_usize = usize::try_from(count).unwrap_or(0);
    let names: Vec<String> = match names {
        None => vec![UNNAMED.to_string(); count_usize],
        Some(raw) => {
            let text = raw
                .to_str()
                .ok_or_else(|| env("LISTEN_FDNAMES", raw, "not UTF-8"))?;
            let split: Vec<String> = if count == 0 && text.is_empty() {
                Vec::new()
            } else {
                text.split(':').map(str::to_string).collect()
            };
            if split.len() != count_usize {
                return Err(env(
                    "LISTEN_FDNAMES",
                    raw,
                    "the number of names differs from LISTEN_FDS",
                ));
            }
            split
        }
    };
    Ok((LISTEN_FDS_START..LISTEN_FDS_START + count)
        .zip(names)
        .collect())
}

/// Takes ownership of `fd`, marks it close-on-exec and checks that it is a listening unix
/// stream socket (closing it otherwise).
///
/// # Safety
/// `fd` must not be owned by anything else in the process (it is closed when the result, or
/// the error path, drops it).
unsafe fn adopt(fd: RawFd, name: &str) -> Result<UnixListener> {
    // SAFETY: F_GETFD only reads the descriptor flags; an invalid fd yields EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(SystemdError::NotOpen {
            fd,
            name: name.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` is open (checked above) and the caller guarantees nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let inspect = |source: rustix::io::Errno| SystemdError::Inspect {
        fd,
        name: name.to_string(),
        source: source.into(),
    };
    rustix::io::fcntl_setfd(&owned, FdFlags::CLOEXEC).map_err(inspect)?;
    let not_listener = |found: String| SystemdError::NotAUnixListener {
        fd,
        name: name.to_string(),
        found,
    };
    let domain = match rustix::net::sockopt::socket_domain(&owned) {
        Ok(d) => d,
        Err(rustix::io::Errno::NOTSOCK) => return Err(not_listener("not a socket".into())),
        Err(e) => return Err(inspect(e)),
    };
    if domain != AddressFamily::UNIX {
        return Err(not_listener(format!("address family {}", domain.as_raw())));
    }
    let kind = rustix::net::sockopt::socket_type(&owned).map_err(inspect)?;
    if kind != SocketType::STREAM {
        return Err(not_listener(format!("socket type {}", kind.as_raw())));
    }
    if !rustix::net::sockopt::socket_acceptconn(&owned).map_err(inspect)? {
        return Err(not_listener("not listening".into()));
    }
    Ok(UnixListener::from(owned))
}

#[cfg(test)]
mod tests {
    use std::os::fd::IntoRawFd;
    use std::time::Duration;

    use super::*;

    fn os(s: &str) -> Option<&OsStr> {
        Some(OsStr::new(s))
    }

    #[test]
    fn listen_env_is_parsed_like_sd_listen_fds_with_names() {
        let me = 4242;
        // Not activated: no LISTEN_PID, or another process's.
        assert!(parse_env(None, os("2"), None, me).unwrap().is_empty());
        assert!(parse_env(os("1"), os("2"), None, me).unwrap().is_empty());
        assert_eq!(
            parse_env(os("4242"), os("2"), os("snapshotter:control"), me).unwrap(),
            vec![(3, "snapshotter".to_string()), (4, "control".to_string())]
        );
        assert_eq!(
            parse_env(os("4242"), os("2"), None, me).unwrap(),
            vec![(3, "unknown".to_string()), (4, "unknown".to_string())]
        );
        assert!(
            parse_env(os("4242"), os("0"), os(""), me)
                .unwrap()
                .is_empty()
        );
        for (pid, fds, names, var) in [
            ("x", "1", Some("a"), "LISTEN_PID"),
            ("0", "1", Some("a"), "LISTEN_PID"),
            ("4242", "-1", None, "LISTEN_FDS"),
            ("4242", "two", None, "LISTEN_FDS"),
            ("4242", "2", Some("only-one"), "LISTEN_FDNAMES"),
            ("4242", "1", Some("a:b"), "LISTEN_FDNAMES"),
        ] {
            let err = parse_env(os(pid), os(fds), names.map(OsStr::new), me).unwrap_err();
            assert!(
                matches!(&err, SystemdError::Env { var: v, .. } if *v == var),
                "{pid} {fds} {names:?}: {err}"
            );
        }
        let err = parse_env(os("4242"), None, None, me).unwrap_err();
        assert!(err.to_string().contains("without LISTEN_FDS"), "{err}");
    }

    #[test]
    fn adopt_accepts_only_listening_unix_stream_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // SAFETY: the fd comes from `into_raw_fd`, so nothing else owns it.
        let adopted = unsafe { adopt(listener.into_raw_fd(), "snapshotter") }.unwrap();
        let flags = rustix::io::fcntl_getfd(&adopted).unwrap();
        assert!(flags.contains(FdFlags::CLOEXEC));
        assert_eq!(
            adopted.local_addr().unwrap().as_pathname(),
            Some(path.as_path())
        );

        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = a.into_raw_fd();
        // SAFETY: as above.
        let err = unsafe { adopt(fd, "control") }.unwrap_err();
        assert!(
            matches!(&err, SystemdError::NotAUnixListener { name, found, .. }
                if name == "control" && found == "not listening"),
            "{err}"
        );
        assert!(
            err.to_string().contains(&format!("fd {fd} (control)")),
            "{err}"
        );

        let dgram = UnixDatagram::unbound().unwrap();
        // SAFETY: as above.
        let err = unsafe { adopt(dgram.into_raw_fd(), "d") }.unwrap_err();
        assert!(err.to_string().contains("socket type"), "{err}");

        let file = tempfile::tempfile().unwrap();
        // SAFETY: as above.
        let err = unsafe { adopt(file.into_raw_fd(), "f") }.unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");

        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // SAFETY: as above.
        let err = unsafe { adopt(tcp.into_raw_fd(), "t") }.unwrap_err();
        assert!(err.to_string().contains("address family"), "{err}");
    }

    #[test]
    fn take_listener_prefers_the_inherited_socket_and_binds_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let inherited_path = dir.path().join("snapshotter.sock");
        let held = UnixListener::bind(&inherited_path).unwrap();
        let mut activated = Activated::from_listeners(vec![
            ("snapshotter".to_string(), held),
            (
                "extra".to_string(),
                UnixListener::bind(dir.path().join("x")).unwrap(),
            ),
        ]);
        let got = take_listener(&mut activated, "snapshotter", &inherited_path).unwrap();
        assert!(got.file.inherited);
        assert_eq!(got.file.path, inherited_path);
        got.file.remove();
        assert!(inherited_path.exists(), "systemd's socket file was removed");

        let control = dir.path().join("run/control.sock");
        let bound = take_listener(&mut activated, "control", &control).unwrap();
        assert!(!bound.file.inherited);
        assert!(control.exists());
        bound.file.remove();
        assert!(!control.exists());
        assert_eq!(activated.names(), ["extra"]);

        let mut dup = Activated::from_listeners(vec![
            (
                "c".to_string(),
                UnixListener::bind(dir.path().join("c1")).unwrap(),
            ),
            (
                "c".to_string(),
                UnixListener::bind(dir.path().join("c2")).unwrap(),
            ),
        ]);
        let err = take_listener(&mut dup, "c", &control).unwrap_err();
        assert!(
            matches!(err, SystemdError::DuplicateName { count: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn notify_reaches_path_and_abstract_datagram_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        notify_to(path.as_os_str(), "READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");

        let name = format!("zlayer-test-notify-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abstract_server = UnixDatagram::bind_addr(&addr).unwrap();
        abstract_server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        notify_to(OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let n = abstract_server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");

        let err = notify_to(OsStr::new("vsock:2:1234"), "READY=1").unwrap_err();
        assert!(matches!(err, SystemdError::NotifyAddress { .. }), "{err}");
        drop(server);
        let err = notify_to(path.as_os_str(), "READY=1").unwrap_err();
        assert!(err.to_string().contains("READY=1"), "{err}");
    }
}
