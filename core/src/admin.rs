//! The admin HTTP server every daemon runs (default port 15020).
//!
//! - `GET /metrics`: the component's Prometheus registry in text exposition format.
//! - `GET /ready`: 200 once the component is ready, 503 before.
//! - `GET /debug/config`: the component's current effective configuration as JSON, to
//!   loopback clients only unless the component's `listen.exposeDebug` is true (it lists the
//!   mesh's topology and endpoint addresses; `kubectl port-forward` arrives from loopback).
//!
//! Runs one accept task; [`AdminHandle::shutdown`] stops it and closes the port. At most
//! [`MAX_CONNECTIONS`] connections at once (more are closed as they are accepted), each with
//! [`HEADER_TIMEOUT`] to send its request head.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

mod component;
pub use component::ComponentAdmin;

/// Produces the JSON served at `/debug/config`.
pub type DebugConfig = Arc<dyn Fn() -> String + Send + Sync>;

/// Connections the admin port holds at once (a scraper, a probe, an operator).
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send its request head.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What the admin server serves.
#[derive(Clone)]
pub struct AdminState {
    pub registry: Arc<Registry>,
    pub ready: watch::Receiver<bool>,
    pub debug_config: DebugConfig,
    /// Serve `/debug/config` to clients other than loopback ones.
    pub expose_debug: bool,
}

/// Where an admin server listens, and whether it shows `/debug/config` beyond loopback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminListen {
    pub addr: SocketAddr,
    pub expose_debug: bool,
}

impl From<SocketAddr> for AdminListen {
    /// `/debug/config` to loopback clients only.
    fn from(addr: SocketAddr) -> Self {
        AdminListen {
            addr,
            expose_debug: false,
        }
    }
}

/// A running admin server.
pub struct AdminHandle {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl AdminHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes the listener and waits for the accept task to end.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Starts the admin server on `listen` (port 0 picks one).
pub async fn serve(listen: SocketAddr, state: AdminState) -> std::io::Result<AdminHandle> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let (stop, mut stopped) = watch::channel(false);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stopped.changed() => break,
                accepted = listener.accept() => accepted,
            };
            let Ok((tcp, remote)) = accepted else {
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%remote, "admin port at its connection limit; closing");
                continue;
            };
            let state = state.clone();
            let mut conn_stopped = stopped.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(respond(&state, remote, &req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(tcp), service);
                tokio::select! {
                    _ = conn => {}
                    _ = conn_stopped.changed() => {}
                }
            });
        }
    });
    Ok(AdminHandle { addr, stop, task })
}

fn respond(
    state: &AdminState,
    remote: SocketAddr,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served here\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &state.registry) {
                Ok(()) => {
                    let mut resp = text(StatusCode::OK, out);
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    resp
                }
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding metrics: {e}\n"),
                ),
            }
        }
        "/ready" => {
            if *state.ready.borrow() {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
            }
        }
        "/debug/config" if !debug_allowed(state.expose_debug, remote) => text(
            StatusCode::FORBIDDEN,
            "/debug/config is served to loopback clients only (it lists the mesh's \
                 topology); set listen.exposeDebug: true in the component's config to serve \
                 it to others, or use kubectl port-forward\n"
                .into(),
        ),
        "/debug/config" => {
            let mut resp = text(StatusCode::OK, (state.debug_config)());
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            resp
        }
        other => text(
            StatusCode::NOT_FOUND,
            format!("no such admin path {other:?}; try /metrics, /ready or /debug/config\n"),
        ),
    }
}

/// Whether `/debug/config` is served to a client at `remote`.
fn debug_allowed(expose: bool, remote: SocketAddr) -> bool {
    expose || remote.ip().to_canonical().is_loopback()
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn debug_config_goes_to_loopback_clients_unless_exposed() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        for local in [
            "127.0.0.1:5000",
            "127.9.9.9:1",
            "[::1]:5000",
            "[::ffff:127.0.0.1]:5000",
        ] {
            assert!(debug_allowed(false, at(local)), "{local}");
        }
        for remote in ["10.1.2.3:5000", "[fd00::1]:5000", "[::ffff:10.0.0.1]:1"] {
            assert!(!debug_allowed(false, at(remote)), "{remote}");
            assert!(debug_allowed(true, at(remote)), "{remote}");
        }
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_readiness_and_config() {
        let mut registry = Registry::with_prefix("isthmus_test");
        let counter = Counter::<u64>::default();
        registry.register("hits", "test hits", counter.clone());
        counter.inc();
        let (ready_tx, ready) = watch::channel(false);
        let state = AdminState {
            registry: Arc::new(registry),
            ready,
            debug_config: Arc::new(|| "{\"cluster\":\"east\"}".to_string()),
            expose_debug: false,
        };
        let admin = serve("127.0.0.1:0".parse().unwrap(), state).await.unwrap();
        let addr = admin.addr();
        assert!(get(addr, "/ready").await.starts_with("HTTP/1.1 503"));
        ready_tx.send(true).unwrap();
        assert!(get(addr, "/ready").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/metrics")
            .await
            .contains("isthmus_test_hits_total 1"));
        assert!(get(addr, "/debug/config")
            .await
            .contains("\"cluster\":\"east\""));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        admin.shutdown().await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
