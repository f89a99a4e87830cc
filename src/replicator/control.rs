//! The running replicator's unix socket: `db flush` and `db status` ask it, one JSON line each
//! way per connection (no HTTP stack for a two-call protocol).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::handle::{ReplicatorStatus, SqliteReplicator};

/// Longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum DbRequest {
    /// Ship everything committed to `db` (a path or a store name) and answer once durable.
    Flush {
        db: String,
        timeout_ms: u64,
    },
    Status,
}

/// The answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DbResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub databases: Vec<ReplicatorStatus>,
}

/// Failures talking to the replicator; each names the socket.
#[derive(Debug, thiserror::Error)]
pub enum DbControlError {
    #[error("cannot reach the replicator at {path} (is `zlayer-storage db replicate` running?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("replicator socket {path}: {reason}")]
    Protocol { path: PathBuf, reason: String },
    #[error("replicator socket {path}: no answer within {0:?}", .waited)]
    Timeout { path: PathBuf, waited: Duration },
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds `path` (0660, its directory created), replacing a stale socket file.
pub fn bind(path: &Path) -> Result<UnixListener, DbControlError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| DbControlError::Listen {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another replicator answers there",
        )));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(listener)
}

/// Answers requests about `dbs` until the task is dropped.
pub async fn serve(listener: UnixListener, dbs: Arc<Vec<Arc<SqliteReplicator>>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer(stream, Arc::clone(&dbs)));
            }
            Err(e) => {
                tracing::warn!(error = %e, "replicator socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(stream: UnixStream, dbs: Arc<Vec<Arc<SqliteReplicator>>>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_LINE));
    let response = match reader.read_line(&mut line).await {
        Ok(_) => match serde_json::from_str::<DbRequest>(&line) {
            Ok(req) => handle(req, &dbs).await,
            Err(e) => failure(format!("malformed request: {e}")),
        },
        Err(e) => failure(format!("cannot read the request: {e}")),
    };
    let mut out = serde_json::to_vec(&response).expect("response serializes");
    out.push(b'\n');
    let _ = write.write_all(&out).await;
}

async fn handle(req: DbRequest, dbs: &[Arc<SqliteReplicator>]) -> DbResponse {
    match req {
        DbRequest::Status => DbResponse {
            ok: true,
            error: None,
            databases: dbs.iter().map(|d| d.status()).collect(),
        },
        DbRequest::Flush { db, timeout_ms } => {
            let Some(r) = find(dbs, &db) else {
                return failure(format!("no replicated database {db}"));
            };
            let timeout = Duration::from_millis(timeout_ms.max(1));
            match r.flush_within(timeout).await {
                Ok(()) => DbResponse {
                    ok: true,
                    error: None,
                    databases: vec![r.status()],
                },
                Err(e) => failure(super::error_chain(&e)),
            }
        }
    }
}

/// The replicator of `db`: its path (as given or canonical) or its store name.
fn find<'a>(dbs: &'a [Arc<SqliteReplicator>], db: &str) -> Option<&'a Arc<SqliteReplicator>> {
    let canonical = std::fs::canonicalize(db).ok();
    dbs.iter().find(|r| {
        let path = r.db_path();
        r.name() == db
            || path == Path::new(db)
            || canonical.is_some() && std::fs::canonicalize(path).ok() == canonical
    })
}

fn failure(error: String) -> DbResponse {
    DbResponse {
        ok: false,
        error: Some(error),
        databases: Vec::new(),
    }
}

/// Sends `req` to the replicator at `path` and waits at most `timeout` for the answer.
pub async fn request(
    path: &Path,
    req: &DbRequest,
    timeout: Duration,
) -> Result<DbResponse, DbControlError> {
    let protocol = |reason: String| DbControlError::Protocol {
        path: path.to_path_buf(),
        reason,
    };
    let exchange = async {
        let mut stream =
            UnixStream::connect(path)
                .await
                .map_err(|source| DbControlError::Connect {
                    path: path.to_path_buf(),
                    source,
                })?;
        let mut line = serde_json::to_vec(req).expect("request serializes");
        line.push(b'\n');
        stream
            .write_all(&line)
            .await
            .map_err(|e| protocol(e.to_string()))?;
        let mut answer = String::new();
        BufReader::new(stream)
            .read_line(&mut answer)
            .await
            .map_err(|e| protocol(e.to_string()))?;
        serde_json::from_str::<DbResponse>(&answer)
            .map_err(|e| protocol(format!("malformed answer: {e}")))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| DbControlError::Timeout {
            path: path.to_path_buf(),
            waited: timeout,
        })?
}
