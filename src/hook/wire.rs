//! The hook line protocol on the control socket: one JSON line each way.
//!
//! The control socket serves gRPC, but a connection whose first byte is `{` speaks this instead,
//! so the poststop hook needs neither an HTTP/2 stack nor an async runtime. The client sends one
//! [`FlushRequest`] line (at most [`MAX_LINE`] bytes, ending in `\n`); the daemon answers one
//! [`FlushResponse`] line and closes. Both sides use [`parse_request`]/[`encode_request`] and
//! [`parse_response`]/[`encode_response`], so the two ends cannot drift apart.

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// Longest line either side sends or accepts, newline included.
pub const MAX_LINE: usize = 64 * 1024;

/// What the hook sends as `origin`.
pub const ORIGIN_HOOK: &str = "hook";

/// Errors from reading a protocol line.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("line of {len} bytes exceeds the {MAX_LINE}-byte limit")]
    TooLong { len: usize },
    #[error("empty line")]
    Empty,
    #[error("unsupported protocol version {version} (this build speaks {VERSION})")]
    Version { version: u64 },
    #[error("malformed request")]
    Request(#[source] serde_json::Error),
    #[error("malformed response")]
    Response(#[source] serde_json::Error),
    #[error("response with ok = {ok} lacks {field}")]
    MissingField { ok: bool, field: &'static str },
}

/// The only operation of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Sync the container's upper dir to the store as its identity's current layer.
    Flush,
}

/// Client → daemon. Unknown fields are refused, so a misspelt `upper` fails loudly instead of
/// making the daemon resolve another snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlushRequest {
    /// Protocol version ([`VERSION`]).
    pub v: u32,
    pub op: Op,
    /// Who asks (`"hook"` from the poststop hook); for logs and metrics.
    pub origin: String,
    /// containerd namespace; `""` when unknown.
    pub namespace: String,
    /// The OCI state's `id`.
    pub container_id: String,
    /// `upperdir=` of the overlay at `<bundle>/rootfs`; `None` when not found (the daemon then
    /// resolves the snapshot by namespace and container id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper: Option<String>,
    /// The OCI state's `status`: the daemon skips its "is it still running?" check only for
    /// `"stopped"`.
    #[serde(default)]
    pub status: String,
    /// 0: answer once the request is recorded durably; otherwise answer once the layer is in
    /// the store, or with [`ErrorCode::Timeout`] after this many milliseconds.
    #[serde(default)]
    pub wait_ms: u64,
}

/// Why the daemon refused or could not complete a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed.
    Invalid,
    /// No snapshot matches.
    NotFound,
    /// The container is still running (and the request did not say it stopped).
    FailedPrecondition,
    /// The daemon cannot serve it now (store down, shutting down).
    Unavailable,
    /// `wait_ms` passed before the layer was durable; the flush goes on.
    Timeout,
    /// A bug or an unexpected local failure.
    Internal,
}

impl ErrorCode {
    /// The name used on the wire.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Invalid => "invalid",
            ErrorCode::NotFound => "not_found",
            ErrorCode::FailedPrecondition => "failed_precondition",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
        }
    }
}

/// Daemon → client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlushResponse {
    /// Recorded durably: a daemon crash after this still flushes at restart. `request_id` is
    /// absent when the request joined one already queued (coalesced).
    Queued {
        request_id: Option<u64>,
        identity: Option<String>,
    },
    /// The layer is in the store.
    Durable {
        request_id: Option<u64>,
        identity: Option<String>,
        digest: String,
        seq: u64,
    },
    /// The snapshot is not persisted (not ours, or no identity): nothing to do.
    NotPersisted,
    /// Refused or failed.
    Error { code: ErrorCode, error: String },
}

/// `state` of a successful answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum AnswerState {
    Queued,
    Durable,
    NotPersisted,
}

/// The flat JSON shape of [`FlushResponse`]; unknown fields are tolerated so a newer daemon
/// may add some.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RawResponse {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state: Option<AnswerState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    code: Option<ErrorCode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The line without its `\n` (and `\r`), after the length check.
fn strip_line(line: &[u8]) -> Result<&[u8], WireError> {
    if line.len() > MAX_LINE {
        return Err(WireError::TooLong { len: line.len() });
    }
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(WireError::Empty);
    }
    Ok(line)
}

/// Parses one request line (with or without its `\n`). A wrong `v` is reported as
/// [`WireError::Version`] before any other field is looked at.
pub fn parse_request(line: &[u8]) -> Result<FlushRequest, WireError> {
    #[derive(Deserialize)]
    struct VersionOnly {
        v: Option<u64>,
    }
    let line = strip_line(line)?;
    let version = serde_json::from_slice::<VersionOnly>(line)
        .map_err(WireError::Request)?
        .v;
    match version {
        Some(v) if v == u64::from(VERSION) => {}
        Some(version) => return Err(WireError::Version { version }),
        // Missing `v`: let the full parse name the field.
        None => {}
    }
    serde_json::from_slice(line).map_err(WireError::Request)
}

/// The request as one line, `\n` included.
#[must_use]
pub fn encode_request(request: &FlushRequest) -> Vec<u8> {
    to_line(request)
}

/// Parses one response line (with or without its `\n`).
pub fn parse_response(line: &[u8]) -> Result<FlushResponse, WireError> {
    let line = strip_line(line)?;
    let RawResponse {
        ok,
        state,
        request_id,
        identity,
        digest,
        seq,
        code,
        error,
    } = serde_json::from_slice(line).map_err(WireError::Response)?;
    let missing = |field| WireError::MissingField { ok, field };
    if !ok {
        return Ok(FlushResponse::Error {
            code: code.ok_or_else(|| missing("code"))?,
            error: error.unwrap_or_default(),
        });
    }
    Ok(match state.ok_or_else(|| missing("state"))? {
        AnswerState::Queued => FlushResponse::Queued {
            request_id,
            identity,
        },
        AnswerState::Durable => FlushResponse::Durable {
            request_id,
            identity,
            digest: digest.ok_or_else(|| missing("digest"))?,
            seq: seq.ok_or_else(|| missing("seq"))?,
        },
        AnswerState::NotPersisted => FlushResponse::NotPersisted,
    })
}

/// The response as one line, `\n` included.
#[must_use]
pub fn encode_response(response: &FlushResponse) -> Vec<u8> {
    let raw = match response.clone() {
        FlushResponse::Queued {
            request_id,
            identity,
        } => RawResponse {
            ok: true,
            state: Some(AnswerState::Queued),
            request_id,
            identity,
            ..RawResponse::default()
        },
        FlushResponse::Durable {
            request_id,
            identity,
            digest,
            seq,
        } => RawResponse {
            ok: true,
            state: Some(AnswerState::Durable),
            request_id,
            identity,
            digest: Some(digest),
            seq: Some(seq),
            ..RawResponse::default()
        },
        FlushResponse::NotPersisted => RawResponse {
            ok: true,
            state: Some(AnswerState::NotPersisted),
            ..RawResponse::default()
        },
        FlushResponse::Error { code, error } => RawResponse {
            ok: false,
            code: Some(code),
            error: Some(error),
            ..RawResponse::default()
        },
    };
    to_line(&raw)
}

impl FlushResponse {
    /// The answer to a line that [`parse_request`] refused.
    #[must_use]
    pub fn invalid(err: &WireError) -> Self {
        FlushResponse::Error {
            code: ErrorCode::Invalid,
            error: crate::util::error_chain(err),
        }
    }
}

fn to_line(value: &impl Serialize) -> Vec<u8> {
    // Serializing these plain structs (strings, integers, unit enums) cannot fail.
    let mut out = serde_json::to_vec(value).unwrap_or_default();
    out.push(b'\n');
    out
}

/// The protocol's example request, for tests here and in the client.
#[cfg(test)]
pub(crate) fn sample_request() -> FlushRequest {
    FlushRequest {
        v: VERSION,
        op: Op::Flush,
        origin: ORIGIN_HOOK.into(),
        namespace: "default".into(),
        container_id: "c1".into(),
        upper: Some("/var/lib/zlayer-storage/snapshots/7/fs".into()),
        status: "stopped".into(),
        wait_ms: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::sample_request as request;

    #[test]
    fn request_round_trips_as_one_line_in_the_documented_shape() {
        let line = encode_request(&request());
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        assert_eq!(line.last(), Some(&b'\n'));
        let text = std::str::from_utf8(&line).unwrap();
        assert_eq!(
            text,
            "{\"v\":1,\"op\":\"flush\",\"origin\":\"hook\",\"namespace\":\"default\",\
             \"container_id\":\"c1\",\"upper\":\"/var/lib/zlayer-storage/snapshots/7/fs\",\
             \"status\":\"stopped\",\"wait_ms\":0}\n"
        );
        assert_eq!(parse_request(&line).unwrap(), request());
        // Without the newline, and with CRLF.
        assert_eq!(parse_request(&line[..line.len() - 1]).unwrap(), request());
        let mut crlf = line[..line.len() - 1].to_vec();
        crlf.extend_from_slice(b"\r\n");
        assert_eq!(parse_request(&crlf).unwrap(), request());
    }

    #[test]
    fn request_without_upper_omits_it_and_defaults_apply() {
        let r = FlushRequest {
            upper: None,
            ..request()
        };
        let line = encode_request(&r);
        assert!(!String::from_utf8_lossy(&line).contains("upper"));
        let parsed = parse_request(
            br#"{"v":1,"op":"flush","origin":"cli","namespace":"","container_id":"x"}"#,
        )
        .unwrap();
        assert_eq!(parsed.upper, None);
        assert_eq!(parsed.status, "");
        assert_eq!(parsed.wait_ms, 0);
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let err = |line: &[u8]| crate::util::error_chain(&parse_request(line).unwrap_err());
        assert!(
            matches!(
                parse_request(br#"{"v":2,"op":"whatever"}"#),
                Err(WireError::Version { version: 2 })
            ),
            "the version is checked before the other fields"
        );
        assert!(err(br#"{"op":"flush"}"#).contains("`v`"));
        assert!(
            err(br#"{"v":1,"op":"drop","origin":"h","namespace":"","container_id":"c"}"#)
                .contains("drop")
        );
        assert!(
            err(br#"{"v":1,"op":"flush","origin":"h","namespace":"","container_id":"c","uper":"/x"}"#)
                .contains("uper")
        );
        assert!(err(b"{\"v\":1,").contains("malformed request"));
        assert!(matches!(parse_request(b"\n"), Err(WireError::Empty)));
        assert!(matches!(parse_request(b""), Err(WireError::Empty)));
        let long = vec![b' '; MAX_LINE + 1];
        assert!(matches!(
            parse_request(&long),
            Err(WireError::TooLong { len }) if len == MAX_LINE + 1
        ));
        let invalid = FlushResponse::invalid(&parse_request(b"[").unwrap_err());
        assert!(matches!(
            invalid,
            FlushResponse::Error { code: ErrorCode::Invalid, ref error } if error.starts_with("malformed request: ")
        ));
    }

    #[test]
    fn responses_round_trip_in_the_documented_shape() {
        let cases = [
            (
                FlushResponse::Queued {
                    request_id: Some(12),
                    identity: Some("svc/inst".into()),
                },
                r#"{"ok":true,"state":"queued","request_id":12,"identity":"svc/inst"}"#,
            ),
            (
                FlushResponse::Queued {
                    request_id: None,
                    identity: None,
                },
                r#"{"ok":true,"state":"queued"}"#,
            ),
            (
                FlushResponse::Durable {
                    request_id: Some(12),
                    identity: Some("svc/inst".into()),
                    digest: "ab12".into(),
                    seq: 7,
                },
                r#"{"ok":true,"state":"durable","request_id":12,"identity":"svc/inst","digest":"ab12","seq":7}"#,
            ),
            (
                FlushResponse::NotPersisted,
                r#"{"ok":true,"state":"not_persisted"}"#,
            ),
            (
                FlushResponse::Error {
                    code: ErrorCode::FailedPrecondition,
                    error: "running".into(),
                },
                r#"{"ok":false,"code":"failed_precondition","error":"running"}"#,
            ),
        ];
        for (response, json) in cases {
            let line = encode_response(&response);
            assert_eq!(line, format!("{json}\n").into_bytes());
            assert_eq!(parse_response(&line).unwrap(), response);
        }
        for code in [
            ErrorCode::Invalid,
            ErrorCode::NotFound,
            ErrorCode::FailedPrecondition,
            ErrorCode::Unavailable,
            ErrorCode::Timeout,
            ErrorCode::Internal,
        ] {
            assert_eq!(
                serde_json::to_string(&code).unwrap(),
                format!("\"{}\"", code.as_str())
            );
        }
    }

    #[test]
    fn responses_tolerate_new_fields_and_name_missing_ones() {
        assert_eq!(
            parse_response(br#"{"ok":true,"state":"not_persisted","reason":"no identity"}"#)
                .unwrap(),
            FlushResponse::NotPersisted
        );
        assert!(matches!(
            parse_response(
                br#"{"ok":true,"state":"durable","request_id":1,"identity":"a/b","seq":2}"#
            ),
            Err(WireError::MissingField {
                ok: true,
                field: "digest"
            })
        ));
        assert!(matches!(
            parse_response(br#"{"ok":false,"error":"x"}"#),
            Err(WireError::MissingField {
                ok: false,
                field: "code"
            })
        ));
        assert!(matches!(
            parse_response(br#"{"ok":false,"code":"exploded"}"#),
            Err(WireError::Response(_))
        ));
        assert!(matches!(
            parse_response(b"HTTP/2 garbage"),
            Err(WireError::Response(_))
        ));
    }
}
