//! How the reading thread waits: for a request, a change in the database's directory, or a
//! timeout. While writes come in it wakes on a short timer to batch them; an idle database only
//! wakes when its directory changes (inotify) or its slow timer fires, so it costs no CPU.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, SendError, Sender, TryRecvError};
use std::time::Duration;

use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec, eventfd, poll};
use rustix::fs::inotify::{self, CreateFlags, WatchFlags};

use super::Request;

/// Sends requests to a reading thread and wakes it.
#[derive(Debug, Clone)]
pub struct EngineSender {
    tx: Sender<Request>,
    wake: Arc<OwnedFd>,
}

impl EngineSender {
    pub fn send(&self, request: Request) -> Result<(), SendError<Request>> {
        self.tx.send(request)?;
        // Fails only when the counter is saturated: a wake is pending anyway.
        let _ = rustix::io::write(&*self.wake, &1u64.to_ne_bytes());
        Ok(())
    }
}

/// What ended a wait.
#[derive(Debug)]
pub enum Waited {
    Request(Request),
    /// Something in the database's directory changed.
    Changed,
    Timeout,
    /// Every sender is gone.
    Disconnected,
}

/// The reading thread's side.
#[derive(Debug)]
pub struct Waiter {
    rx: Receiver<Request>,
    wake: Arc<OwnedFd>,
    watch: Option<OwnedFd>,
}

/// A request channel whose sends wake the waiter.
pub fn channel() -> std::io::Result<(EngineSender, Waiter)> {
    let (tx, rx) = mpsc::channel();
    let wake = Arc::new(eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?);
    let sender = EngineSender {
        tx,
        wake: Arc::clone(&wake),
    };
    Ok((
        sender,
        Waiter {
            rx,
            wake,
            watch: None,
        },
    ))
}

impl Waiter {
    /// Watches `dir` (the database's directory) for writes, creations, removals and renames.
    /// Without a watch, [`Waiter::can_sleep`] is false and the caller keeps polling.
    pub fn watch(&mut self, dir: &Path) {
        let watch = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC).and_then(|fd| {
            let flags = WatchFlags::MODIFY
                | WatchFlags::CREATE
                | WatchFlags::DELETE
                | WatchFlags::MOVED_FROM
                | WatchFlags::MOVED_TO;
            inotify::add_watch(&fd, dir, flags)?;
            Ok(fd)
        });
        match watch {
            Ok(fd) => self.watch = Some(fd),
            Err(e) => {
                tracing::debug!(dir = %dir.display(), error = %e, "no inotify watch; polling")
            }
        }
    }

    /// Whether changes wake the waiter (so long timeouts lose nothing).
    #[must_use]
    pub fn can_sleep(&self) -> bool {
        self.watch.is_some()
    }

    /// Waits up to `timeout` for a request or, when `on_change`, a change in the directory.
    /// Pending change events are consumed either way.
    pub fn wait(&mut self, timeout: Duration, on_change: bool) -> Waited {
        match self.rx.try_recv() {
            Ok(r) => return Waited::Request(r),
            Err(TryRecvError::Disconnected) => return Waited::Disconnected,
            Err(TryRecvError::Empty) => {}
        }
        let ts = Timespec {
            tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        let mut fds = vec![PollFd::new(&*self.wake, PollFlags::IN)];
        if on_change && let Some(w) = &self.watch {
            fds.push(PollFd::new(w, PollFlags::IN));
        }
        // An interrupted wait is a short one; the caller's loop carries on.
        let _ = poll(&mut fds, Some(&ts));
        drop(fds);
        drain(&self.wake);
        let changed = self.watch.as_ref().is_some_and(drain);
        match self.rx.try_recv() {
            Ok(r) => Waited::Request(r),
            Err(TryRecvError::Disconnected) => Waited::Disconnected,
            Err(TryRecvError::Empty) if changed => Waited::Changed,
            Err(TryRecvError::Empty) => Waited::Timeout,
        }
    }
}

/// Reads a non-blocking descriptor empty; whether anything was there.
fn drain(fd: &OwnedFd) -> bool {
    let mut buf = [0u8; 4096];
    let mut any = false;
    while let Ok(n) = rustix::io::read(fd, &mut buf) {
        if n == 0 {
            break;
        }
        any = true;
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn requests_and_changes_end_a_wait_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut w) = channel().unwrap();
        w.watch(dir.path());
        assert!(w.can_sleep());

        let started = Instant::now();
        assert!(matches!(
            w.wait(Duration::from_millis(50), true),
            Waited::Timeout
        ));
        assert!(started.elapsed() >= Duration::from_millis(45));

        std::fs::write(dir.path().join("app.db-wal"), b"x").unwrap();
        let started = Instant::now();
        assert!(matches!(
            w.wait(Duration::from_secs(5), true),
            Waited::Changed
        ));
        assert!(started.elapsed() < Duration::from_secs(1));
        // Consumed: the next wait times out.
        assert!(matches!(
            w.wait(Duration::from_millis(10), true),
            Waited::Timeout
        ));

        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            tx.send(Request::Stop).unwrap();
            tx
        });
        let started = Instant::now();
        assert!(matches!(
            w.wait(Duration::from_secs(5), true),
            Waited::Request(Request::Stop)
        ));
        assert!(started.elapsed() < Duration::from_secs(1));
        drop(sender.join().unwrap());
        assert!(matches!(
            w.wait(Duration::from_secs(5), true),
            Waited::Disconnected
        ));
    }
}
