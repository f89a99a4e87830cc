//! The synchronous client side of the hook line protocol: std sockets with deadlines, no async
//! runtime, so the hook's own work stays in the low milliseconds.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use super::error::{HookError, Result};
use super::wire::{self, FlushRequest, FlushResponse};

/// Pause between connect attempts while the daemon's accept backlog is full.
const BACKLOG_RETRY: Duration = Duration::from_millis(5);

/// Connects to `socket` within `timeout`. A unix-socket connect only blocks when the listener's
/// backlog is full; the socket is non-blocking, so that case shows as `EAGAIN` and is retried
/// until the deadline instead of hanging.
pub fn connect(socket: &Path, timeout: Duration) -> Result<UnixStream> {
    let err = |e: Errno| HookError::Connect {
        socket: socket.to_path_buf(),
        source: e.into(),
    };
    let addr = SocketAddrUnix::new(socket).map_err(err)?;
    let deadline = Instant::now() + timeout;
    loop {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .map_err(err)?;
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => {
                let stream = UnixStream::from(fd);
                stream
                    .set_nonblocking(false)
                    .map_err(|source| HookError::Connect {
                        socket: socket.to_path_buf(),
                        source,
                    })?;
                return Ok(stream);
            }
            Err(Errno::AGAIN | Errno::INTR) if Instant::now() < deadline => {
                std::thread::sleep(BACKLOG_RETRY);
            }
            Err(Errno::AGAIN) => {
                return Err(HookError::ConnectTimeout {
                    socket: socket.to_path_buf(),
                    timeout_ms: timeout.as_millis(),
                });
            }
            Err(e) => return Err(err(e)),
        }
    }
}

/// Sends `request` on `stream` and reads the one-line answer, all within `answer_timeout`
/// after the request is written. `socket` only names the peer in errors.
pub fn exchange(
    mut stream: UnixStream,
    socket: &Path,
    request: &FlushRequest,
    answer_timeout: Duration,
) -> Result<FlushResponse> {
    let send_err = |source| HookError::Send {
        socket: socket.to_path_buf(),
        source,
    };
    stream
        .set_write_timeout(Some(answer_timeout))
        .map_err(send_err)?;
    stream
        .write_all(&wire::encode_request(request))
        .map_err(send_err)?;
    // Half-close: the request is complete. A daemon that already answered and closed makes
    // this fail harmlessly, so its result is not needed.
    let _ = stream.shutdown(Shutdown::Write);

    let deadline = Instant::now() + answer_timeout;
    let timed_out = || HookError::AnswerTimeout {
        socket: socket.to_path_buf(),
        timeout_ms: answer_timeout.as_millis(),
    };
    let mut line = Vec::with_capacity(256);
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(timed_out)?;
        stream
            .set_read_timeout(Some(left))
            .map_err(|source| HookError::Receive {
                socket: socket.to_path_buf(),
                source,
            })?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out());
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(HookError::Receive {
                    socket: socket.to_path_buf(),
                    source,
                });
            }
        };
        if n == 0 {
            if line.is_empty() {
                return Err(HookError::NoAnswer {
                    socket: socket.to_path_buf(),
                });
            }
            break;
        }
        line.extend_from_slice(&chunk[..n]);
        if let Some(end) = line.iter().position(|b| *b == b'\n') {
            line.truncate(end + 1);
            break;
        }
        if line.len() > wire::MAX_LINE {
            break;
        }
    }
    wire::parse_response(&line).map_err(|source| HookError::BadAnswer {
        socket: socket.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    use super::*;
    use crate::hook::wire::{ErrorCode, sample_request as request};

    /// A listener that reads one line and replies `answer` (raw bytes) after `delay`.
    fn serve(
        dir: &Path,
        answer: &'static [u8],
        delay: Duration,
    ) -> (std::path::PathBuf, std::thread::JoinHandle<Vec<u8>>) {
        let path = dir.join("c.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = std::io::BufReader::new(stream);
            let mut got = Vec::new();
            reader.read_until(b'\n', &mut got).unwrap();
            std::thread::sleep(delay);
            let _ = reader.get_mut().write_all(answer);
            got
        });
        (path, handle)
    }

    #[test]
    fn sends_one_line_and_parses_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let (path, server) = serve(
            dir.path(),
            b"{\"ok\":false,\"code\":\"not_found\",\"error\":\"no such container\"}\n",
            Duration::ZERO,
        );
        let stream = connect(&path, Duration::from_secs(1)).unwrap();
        let answer = exchange(stream, &path, &request(), Duration::from_secs(5)).unwrap();
        assert_eq!(
            answer,
            FlushResponse::Error {
                code: ErrorCode::NotFound,
                error: "no such container".into()
            }
        );
        assert_eq!(server.join().unwrap(), wire::encode_request(&request()));
    }

    #[test]
    fn a_silent_daemon_is_a_timeout_naming_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let (path, server) = serve(dir.path(), b"", Duration::from_millis(600));
        let stream = connect(&path, Duration::from_secs(1)).unwrap();
        let err = exchange(stream, &path, &request(), Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, HookError::AnswerTimeout { .. }), "{err}");
        assert!(err.to_string().contains("c.sock"), "{err}");
        assert!(!err.is_invocation_error());
        server.join().unwrap();
    }

    /// What `exchange` makes of a daemon that replies `answer` and closes.
    fn exchange_with(answer: &'static [u8]) -> Result<FlushResponse> {
        let dir = tempfile::tempdir().unwrap();
        let (path, server) = serve(dir.path(), answer, Duration::ZERO);
        let stream = connect(&path, Duration::from_secs(1)).unwrap();
        let result = exchange(stream, &path, &request(), Duration::from_secs(5));
        server.join().unwrap();
        result
    }

    #[test]
    fn closing_without_an_answer_and_garbage_are_reported() {
        let err = exchange_with(b"").unwrap_err();
        assert!(matches!(err, HookError::NoAnswer { .. }), "{err}");
        let err = exchange_with(b"PRI * HTTP/2.0").unwrap_err();
        assert!(matches!(err, HookError::BadAnswer { .. }), "{err}");
        // An answer without its newline still counts once the daemon closes.
        assert_eq!(
            exchange_with(br#"{"ok":true,"state":"not_persisted"}"#).unwrap(),
            FlushResponse::NotPersisted
        );
    }

    #[test]
    fn connect_failures_name_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.sock");
        let err = connect(&missing, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, HookError::Connect { .. }), "{err}");
        assert!(err.to_string().contains("absent.sock"), "{err}");
        // A socket file nobody listens on.
        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        let err = connect(&stale, Duration::from_secs(1)).unwrap_err();
        let chain = crate::util::error_chain(&err);
        assert!(
            chain.contains("stale.sock") && chain.contains("refused"),
            "{chain}"
        );
        // Longer than sun_path.
        let long = dir.path().join("x".repeat(200));
        assert!(matches!(
            connect(&long, Duration::from_secs(1)),
            Err(HookError::Connect { .. })
        ));
    }

    #[test]
    fn a_full_backlog_times_out_instead_of_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busy.sock");
        // Backlog 0 and never accepting: after a connection or two, connects get EAGAIN.
        let fd = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
        rustix::net::bind(&fd, &SocketAddrUnix::new(&path).unwrap()).unwrap();
        rustix::net::listen(&fd, 0).unwrap();
        let mut held = Vec::new();
        let started = Instant::now();
        let err = loop {
            match connect(&path, Duration::from_millis(150)) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() < 64, "the backlog never filled");
        };
        assert!(matches!(err, HookError::ConnectTimeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
