//! systemd's side of socket activation, played by the test: it binds the snapshotter socket
//! once and holds it for the daemon's whole life, hands it to every daemon process as fd 3
//! (`LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES`), and receives the daemon's `sd_notify`
//! messages on a datagram socket of its own (`NOTIFY_SOCKET`).

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The descriptor a socket-activated daemon finds its first socket on (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// The socket held across daemon restarts, and the daemon's notifications.
#[derive(Debug)]
pub struct Activation {
    listener: UnixListener,
    notify: UnixDatagram,
    notify_path: PathBuf,
    /// Every notification received so far, in order (e.g. `READY=1\nSTATUS=…`, `STOPPING=1`).
    pub messages: Vec<String>,
}

impl Activation {
    /// Binds `socket` (what a socket unit's `ListenStream=` does) and a notify socket in `dir`.
    pub fn bind(socket: &Path, dir: &Path) -> Self {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)
            .unwrap_or_else(|e| panic!("bind activation socket {}: {e}", socket.display()));
        let notify_path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path)
            .unwrap_or_else(|e| panic!("bind notify socket {}: {e}", notify_path.display()));
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("notify socket timeout");
        Self {
            listener,
            notify,
            notify_path,
            messages: Vec::new(),
        }
    }

    /// `bin ARGS` as systemd would start it: the held socket as fd 3 named `snapshotter`,
    /// `LISTEN_PID` set to the daemon's own pid by a shell that then execs it.
    pub fn command(&self, bin: &Path, args: &[&std::ffi::OsStr]) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(r#"export LISTEN_PID=$$; exec "$0" "$@""#)
            .arg(bin)
            .args(args)
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "snapshotter")
            .env("NOTIFY_SOCKET", &self.notify_path);
        inherit_as_fd3(&mut cmd, self.listener.as_raw_fd());
        cmd
    }

    /// Forgets notifications of earlier daemon processes (before a respawn).
    pub fn drain(&mut self) {
        while let Some(m) = self.recv() {
            self.messages.push(m);
        }
    }

    /// Waits until `child` sends `READY=1`; panics with `log()` if it exits or times out.
    pub fn wait_ready(&mut self, child: &mut Child, timeout: Duration, log: impl Fn() -> String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("snapshotter exited during startup: {status}\n{}", log());
            }
            if let Some(m) = self.recv() {
                let ready = m.lines().any(|l| l == "READY=1");
                self.messages.push(m);
                if ready {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "snapshotter sent no READY=1 within {timeout:?}\n{}",
                log()
            );
        }
    }

    /// How many notifications contained the line `line`.
    pub fn count(&self, line: &str) -> usize {
        self.messages
            .iter()
            .filter(|m| m.lines().any(|l| l == line))
            .count()
    }

    fn recv(&self) -> Option<String> {
        let mut buf = [0u8; 4096];
        self.notify
            .recv(&mut buf)
            .ok()
            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

/// Makes `fd` the child's fd 3 (without close-on-exec), as systemd passes its first socket.
/// `fd` must stay open until the child is spawned.
pub fn inherit_as_fd3(cmd: &mut Command, fd: RawFd) {
    // SAFETY: the closure runs in the forked child before exec and only calls dup2/fcntl,
    // which are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if fd == FIRST_FD {
                // dup2 onto itself keeps close-on-exec set; clear it instead.
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, FIRST_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
