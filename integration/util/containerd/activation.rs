//! systemd's side of socket activation, played by the test: it binds the snapshotter and control
//! sockets once and holds them for the daemon's whole life, hands them to every daemon process
//! as fds 3 and 4 (`LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES`), and receives the daemon's
//! `sd_notify` messages on a datagram socket of its own (`NOTIFY_SOCKET`).

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
    control: UnixListener,
    notify: UnixDatagram,
    notify_path: PathBuf,
    /// Every notification received so far, in order (e.g. `READY=1\nSTATUS=…`, `STOPPING=1`).
    pub messages: Vec<String>,
}

impl Activation {
    /// Binds `socket` and `control` (what the socket units' `ListenStream=` do) and a notify
    /// socket in `dir`.
    pub fn bind(socket: &Path, control: &Path, dir: &Path) -> Self {
        let listen = |path: &Path| {
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path)
                .unwrap_or_else(|e| panic!("bind activation socket {}: {e}", path.display()))
        };
        let listener = listen(socket);
        let control = listen(control);
        let notify_path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path)
            .unwrap_or_else(|e| panic!("bind notify socket {}: {e}", notify_path.display()));
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("notify socket timeout");
        Self {
            listener,
            control,
            notify,
            notify_path,
            messages: Vec::new(),
        }
    }

    /// `bin ARGS` as systemd would start it: the held sockets as fd 3 (`snapshotter`) and fd 4
    /// (`control`), `LISTEN_PID` set to the daemon's own pid by a shell that then execs it.
    pub fn command(&self, bin: &Path, args: &[&std::ffi::OsStr]) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(r#"export LISTEN_PID=$$; exec "$0" "$@""#)
            .arg(bin)
            .args(args)
            .env("LISTEN_FDS", "2")
            .env("LISTEN_FDNAMES", "snapshotter:control")
            .env("NOTIFY_SOCKET", &self.notify_path);
        inherit_from_fd3(
            &mut cmd,
            [self.listener.as_raw_fd(), self.control.as_raw_fd()],
        );
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

/// Makes `fds` the child's fds 3, 4, … (without close-on-exec), as systemd passes sockets.
/// They must stay open until the child is spawned.
pub fn inherit_from_fd3<const N: usize>(cmd: &mut Command, fds: [RawFd; N]) {
    // SAFETY: the closure runs in the forked child before exec and only calls fcntl, dup2 and
    // close, which are async-signal-safe, on a stack array.
    unsafe {
        cmd.pre_exec(move || {
            let top = FIRST_FD + RawFd::try_from(N).unwrap_or(RawFd::MAX - FIRST_FD);
            // Copies above the target range first, so no dup2 overwrites a later source.
            let mut high = [0 as RawFd; N];
            for (h, fd) in high.iter_mut().zip(fds) {
                *h = libc::fcntl(fd, libc::F_DUPFD, top);
                if *h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (target, h) in (FIRST_FD..).zip(high) {
                if libc::dup2(h, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(h);
            }
            Ok(())
        });
    }
}
