//! The daemon's side of the poststop hook's protocol: one JSON line in, one JSON line out
//! ([`crate::hook::wire`]). Kept apart from gRPC so the hook runs without an async runtime or
//! HTTP/2.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{Control, ControlError};
use crate::hook::wire::{self, ErrorCode, FlushResponse, MAX_LINE};
use crate::snapshotter::persist::{FlushRequest, FlushTarget, FlushTicket};

/// How long a client may take to send its line.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

fn error(code: ErrorCode, e: &dyn std::error::Error) -> FlushResponse {
    FlushResponse::Error {
        code,
        error: crate::util::error_chain(e),
    }
}

/// Serves one hook connection.
pub async fn handle(control: &Control, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(MAX_LINE as u64 + 1);
    let mut line = Vec::new();
    let read = tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let response = match read {
        Err(_) => error(
            ErrorCode::Invalid,
            &ControlError::invalid("no request line within 5 s"),
        ),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "hook connection failed");
            return;
        }
        Ok(Ok(_)) => answer(control, &line).await,
    };
    if let Err(e) = write.write_all(&wire::encode_response(&response)).await {
        tracing::debug!(error = %e, "cannot answer the hook (it gave up)");
    }
}

/// Parses and runs one request line.
pub async fn answer(control: &Control, line: &[u8]) -> FlushResponse {
    let req = match wire::parse_request(line) {
        Ok(r) => r,
        Err(e) => return error(ErrorCode::Invalid, &e),
    };
    match run(control, &req).await {
        Ok(r) => r,
        // A container of another snapshotter, or one that never had an identity.
        Err(e) if e.code() == tonic::Code::NotFound => FlushResponse::NotPersisted,
        Err(e) => {
            tracing::warn!(container = %req.container_id, namespace = %req.namespace, origin = %req.origin,
                error = %crate::util::error_chain(&e), "hook flush request failed");
            error(e.line_code(), &e)
        }
    }
}

async fn run(control: &Control, req: &wire::FlushRequest) -> Result<FlushResponse, ControlError> {
    let target = match req.upper.as_deref() {
        Some(upper) if !upper.is_empty() => FlushTarget::Upper(PathBuf::from(upper)),
        _ if req.container_id.is_empty() => {
            return Err(ControlError::invalid(
                "neither upper nor container_id given",
            ));
        }
        _ => FlushTarget::Container {
            namespace: if req.namespace.is_empty() {
                "default".to_string()
            } else {
                req.namespace.clone()
            },
            id: req.container_id.clone(),
        },
    };
    let flush = FlushRequest {
        target,
        trigger: if req.origin.is_empty() {
            wire::ORIGIN_HOOK.to_string()
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
        FlushTicket::Recorded { id, .. } => u64::try_from(*id).ok(),
        FlushTicket::Queued { .. } => None,
        FlushTicket::NotPersisted => return Ok(FlushResponse::NotPersisted),
    };
    Ok(match done {
        Some(d) => FlushResponse::Durable {
            request_id,
            identity,
            digest: d.digest,
            seq: d.seq,
        },
        None => FlushResponse::Queued {
            request_id,
            identity,
        },
    })
}
