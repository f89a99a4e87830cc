//! Binding the daemon's unix sockets when nothing (systemd) handed them over: a stale socket
//! left by a crash is replaced, a live one or a non-socket file is refused.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Mode of the daemon's sockets: root and the socket's group (containerd runs as root).
pub const SOCKET_MODE: u32 = 0o660;

/// Failures to bind a socket path.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot prepare socket {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("another process is serving {path}")]
    InUse { path: PathBuf },
}

/// Binds `path` (parent created, a stale socket replaced, mode [`SOCKET_MODE`]).
pub fn bind_unix(path: &Path) -> Result<UnixListener, SocketError> {
    let err = |source| SocketError::Prepare {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A live peer answers; a stale socket left by a crash refuses the connection.
            if UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => {
            return Err(SocketError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(err)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_replaces_stale_refuses_live_and_non_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/s.sock");
        let live = bind_unix(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, SOCKET_MODE);
        assert!(matches!(
            bind_unix(&path),
            Err(SocketError::InUse { path: p }) if p == path
        ));
        drop(live);
        // The file stays behind, as after a crash: a stale socket is replaced.
        assert!(path.exists());
        let _again = bind_unix(&path).unwrap();

        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        let err = bind_unix(&file).unwrap_err();
        assert!(matches!(err, SocketError::NotASocket { .. }), "{err}");
        assert!(err.to_string().contains("plain"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }
}
