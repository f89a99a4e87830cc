//! The scrape endpoint: `GET /metrics` over HTTP/1.1, every other path 404.
//!
//! Each connection serves one request (no keep-alive) and is bounded in time, and only a few
//! are served at once, so a slow or stuck client can neither pile up tasks nor hold the
//! endpoint.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ACCEPT, ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{Format, encode};

/// Connections served at once; further ones wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed after this long, whatever it is doing.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed accept (e.g. out of file descriptors) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Why the metrics endpoint cannot run.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {address}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the local address of the metrics listener bound to {address}")]
    LocalAddr {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// A bound metrics endpoint, not yet serving. Binding first lets the daemon refuse to start
/// on a configured address it cannot use, before it reports ready.
#[derive(Debug)]
pub struct MetricsServer {
    listener: TcpListener,
    local: SocketAddr,
}

impl MetricsServer {
    /// Listens on `address` (port 0 picks a free port; see [`Self::local_addr`]).
    pub async fn bind(address: SocketAddr) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| MetricsError::Bind { address, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| MetricsError::LocalAddr { address, source })?;
        Ok(Self { listener, local })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Serves scrapes until `shutdown` resolves; connections still open then are dropped.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                a = accept(&self.listener, &slots) => a,
            };
            let (stream, peer, slot) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(address = %self.local, error = %e, "cannot accept a metrics connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            connections.spawn(async move {
                let _slot = slot;
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service_fn(respond));
                match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics connection failed"),
                    Err(_) => tracing::debug!(%peer, "metrics connection timed out"),
                }
            });
        }
        connections.shutdown().await;
    }
}

/// Binds `address` and serves scrapes until `shutdown` resolves.
pub async fn serve(
    address: SocketAddr,
    shutdown: impl Future<Output = ()>,
) -> Result<(), MetricsError> {
    MetricsServer::bind(address).await?.run(shutdown).await;
    Ok(())
}

/// Waits for a free connection slot, then for a connection.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> io::Result<(
    tokio::net::TcpStream,
    SocketAddr,
    tokio::sync::OwnedSemaphorePermit,
)> {
    let slot = Arc::clone(slots)
        .acquire_owned()
        .await
        .map_err(io::Error::other)?;
    let (stream, peer) = listener.accept().await?;
    Ok((stream, peer, slot))
}

async fn respond(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != "/metrics" {
        return Ok(text(
            StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics\n",
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(resp);
    }
    let accept = req.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
    let format = Format::from_accept(accept);
    Ok(match encode(format) {
        Ok(body) => {
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            );
            resp
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode metrics");
            text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n")
        }
    })
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
