//! The poststop hook's protocol: one JSON line in, one JSON line out (see the hook module for
//! the client). Kept apart from gRPC so the hook runs without an async runtime or HTTP/2.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{Control, ControlError};
use crate::snapshotter::persist::{FlushRequest, FlushTarget, FlushTicket};

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;
/// How long a client may take to send its line.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A hook's request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LineRequest {
    pub v: u32,
    pub op: String,
    #[serde(default)]
    pub origin: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub container_id: String,
    #[serde(default)]
    pub upper: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub wait_ms: u64,
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct LineResponse {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl LineResponse {
    fn error(e: &ControlError) -> Self {
        Self {
            ok: false,
            code: Some(e.line_code()),
            error: Some(crate::util::error_chain(e)),
            ..Self::default()
        }
    }
}

/// Serves one hook connection.
pub async fn handle(control: &Control, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(MAX_LINE as u64 + 1);
    let mut line = Vec::new();
    let read = tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let response = match read {
        Err(_) => LineResponse::error(&ControlError::invalid("no request line within 5 s")),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "hook connection failed");
            return;
        }
        Ok(Ok(_)) if line.len() > MAX_LINE => LineResponse::error(&ControlError::invalid(format!(
            "request line longer than {MAX_LINE} bytes"
        ))),
        Ok(Ok(_)) => answer(control, &line).await,
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    if let Err(e) = write.write_all(&out).await {
        tracing::debug!(error = %e, "cannot answer the hook (it gave up)");
    }
}

/// Parses and runs one request line.
pub async fn answer(control: &Control, line: &[u8]) -> LineResponse {
    let req: LineRequest = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => {
            return LineResponse::error(&ControlError::invalid(format!(
                "request is not the expected JSON object: {e}"
            )));
        }
    };
    match run(control, &req).await {
        Ok(r) => r,
        Err(e) => {
            if e.code() == tonic::Code::NotFound && req.wait_ms == 0 {
                // A container of another snapshotter, or one that never had an identity.
                return not_persisted();
            }
            tracing::warn!(container = %req.container_id, namespace = %req.namespace, origin = %req.origin,
                error = %crate::util::error_chain(&e), "hook flush request failed");
            LineResponse::error(&e)
        }
    }
}

fn not_persisted() -> LineResponse {
    LineResponse {
        ok: true,
        state: Some("not_persisted"),
        ..LineResponse::default()
    }
}

async fn run(control: &Control, req: &LineRequest) -> Result<LineResponse, ControlError> {
    if req.v != 1 {
        return Err(ControlError::invalid(format!(
            "protocol version {} is not supported (1 is)",
            req.v
        )));
    }
    if req.op != "flush" {
        return Err(ControlError::invalid(format!("unknown op {:?}", req.op)));
    }
    let target = if req.upper.is_empty() {
        if req.container_id.is_empty() {
            return Err(ControlError::invalid(
                "neither upper nor container_id given",
            ));
        }
        FlushTarget::Container {
            namespace: if req.namespace.is_empty() {
                "default".to_string()
            } else {
                req.namespace.clone()
            },
            id: req.container_id.clone(),
        }
    } else {
        FlushTarget::Upper(PathBuf::from(&req.upper))
    };
    let flush = FlushRequest {
        target,
        trigger: if req.origin.is_empty() {
            "hook".to_string()
        } else {
            req.origin.clone()
        },
        allow_running: false,
        stopped: req.status == "stopped",
    };
    let wait = (req.wait_ms > 0).then(|| Duration::from_millis(req.wait_ms));
    let (ticket, done) = control.flush(flush, wait).await?;
    let identity = Control::ticket_identity(&ticket).map(ToString::to_string);
    let request_id = match &ticket {
        FlushTicket::Recorded { id, .. } => Some(*id),
        FlushTicket::Queued { .. } => None,
        FlushTicket::NotPersisted => return Ok(not_persisted()),
    };
    Ok(match done {
        Some(d) => LineResponse {
            ok: true,
            state: Some("durable"),
            request_id,
            identity,
            digest: Some(d.digest),
            seq: Some(d.seq),
            ..LineResponse::default()
        },
        None => LineResponse {
            ok: true,
            state: Some("queued"),
            request_id,
            identity,
            ..LineResponse::default()
        },
    })
}
