//! Inbound: terminates mTLS from other sidecars, authorizes, and forwards to the application.
//!
//! Per connection: the first byte tells TLS (a ClientHello, 0x16) from plaintext. Plaintext is
//! refused unless a PeerAuthentication makes the workload PERMISSIVE (the default is STRICT).
//! The caller's SPIFFE ID comes from its certificate. For HTTP ports every request is
//! authorized against the AuthorizationPolicies (403 `RBAC: access denied` when denied) and
//! gets `x-forwarded-client-cert: By=<this workload>;URI=<caller>` (Envoy's format), replacing
//! whatever the caller sent: only the identity proven by the certificate reaches the app. For
//! opaque TCP ports the connection is authorized once, then bytes are copied.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::{MeshConfig, Protocol};
use isthmus_core::tls::Identity;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Mutex};

use crate::authz::{authorize, mtls_mode, Inbound, MtlsMode, Verdict, Workload};
use crate::InboundPort;

/// How long a client may take to start and finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The first byte of a TLS record carrying a handshake message.
const TLS_HANDSHAKE: u8 = 0x16;

type Body = BoxBody<Bytes, hyper::Error>;

/// The policy view of one workload: who may call it, and whether plaintext is accepted.
#[derive(Clone)]
pub(crate) struct Guard {
    pub config: watch::Receiver<Arc<MeshConfig>>,
    pub workload: Workload,
}

impl Guard {
    fn check(&self, req: &Inbound<'_>) -> Verdict {
        authorize(&self.config.borrow(), &self.workload, req)
    }

    fn plaintext_allowed(&self) -> bool {
        mtls_mode(&self.config.borrow(), &self.workload) == MtlsMode::Permissive
    }
}

pub(crate) async fn serve(
    listener: TcpListener,
    port: InboundPort,
    tls: Arc<rustls::ServerConfig>,
    identity: Arc<Identity>,
    guard: Guard,
    mut stop: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((tcp, peer)) = accepted else { continue };
        let _ = tcp.set_nodelay(true);
        let (acceptor, port, identity, guard) = (
            acceptor.clone(),
            port.clone(),
            identity.clone(),
            guard.clone(),
        );
        connections.spawn(async move {
            let mut first = [0u8; 1];
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
                Ok(Ok(1)) => {}
                _ => return,
            }
            if first[0] != TLS_HANDSHAKE {
                if guard.plaintext_allowed() {
                    serve_stream(tcp, None, identity.id().clone(), &port, guard).await;
                } else {
                    tracing::info!(%peer, "plaintext refused: mutual TLS is STRICT for this workload");
                }
                return;
            }
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "inbound mTLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "inbound mTLS handshake timed out");
                    return;
                }
            };
            let Some(caller) = isthmus_core::tls::peer_identity(tls.get_ref().1.peer_certificates()) else {
                tracing::info!(%peer, "inbound peer presented no SPIFFE identity");
                return;
            };
            serve_stream(tls, Some(caller), identity.id().clone(), &port, guard).await;
        });
        // Reap finished connection tasks so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
    }
    connections.abort_all();
}

async fn serve_stream<S>(
    stream: S,
    caller: Option<SpiffeId>,
    own: SpiffeId,
    port: &InboundPort,
    guard: Guard,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let app_port = port.forward_to.port();
    match port.protocol {
        Protocol::Http => serve_http(stream, caller, own, port.forward_to, guard).await,
        _ => {
            let req = Inbound {
                caller: caller.as_ref(),
                port: app_port,
                method: None,
                path: None,
                headers: None,
            };
            if let Verdict::Deny(why) = guard.check(&req) {
                tracing::info!(caller = ?caller.as_ref().map(|c| c.to_string()), %why, "inbound connection denied");
                return;
            }
            let mut stream = stream;
            match TcpStream::connect(port.forward_to).await {
                Ok(mut app) => {
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut app).await;
                }
                Err(e) => {
                    tracing::warn!(app = %port.forward_to, error = %e, "application unreachable")
                }
            }
        }
    }
}

async fn serve_http<S>(
    stream: S,
    caller: Option<SpiffeId>,
    own: SpiffeId,
    app: SocketAddr,
    guard: Guard,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let xfcc = caller
        .as_ref()
        .and_then(|c| HeaderValue::from_str(&format!("By={own};URI={c}")).ok());
    let upstream: Arc<Mutex<Option<hyper::client::conn::http1::SendRequest<Incoming>>>> =
        Arc::new(Mutex::new(None));
    let caller = Arc::new(caller);
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let (upstream, xfcc, caller, guard) = (
            upstream.clone(),
            xfcc.clone(),
            caller.clone(),
            guard.clone(),
        );
        async move {
            let verdict = guard.check(&Inbound {
                caller: caller.as_ref().as_ref(),
                port: app.port(),
                method: Some(req.method().as_str()),
                path: Some(req.uri().path()),
                headers: Some(req.headers()),
            });
            if let Verdict::Deny(why) = verdict {
                tracing::debug!(%why, path = %req.uri().path(), "request denied");
                return Ok::<_, hyper::Error>(error_response(
                    StatusCode::FORBIDDEN,
                    "RBAC: access denied\n".into(),
                ));
            }
            req.headers_mut().remove("x-forwarded-client-cert");
            if let Some(v) = xfcc {
                req.headers_mut().insert("x-forwarded-client-cert", v);
            }
            Ok(forward_request(&upstream, app, req).await)
        }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await
    {
        tracing::debug!(error = %e, "inbound HTTP connection ended with an error");
    }
}

async fn forward_request(
    upstream: &Mutex<Option<hyper::client::conn::http1::SendRequest<Incoming>>>,
    app: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let mut guard = upstream.lock().await;
    let usable = match guard.as_mut() {
        Some(sender) => sender.ready().await.is_ok(),
        None => false,
    };
    if !usable {
        match connect_app(app).await {
            Ok(sender) => *guard = Some(sender),
            Err(e) => {
                *guard = None;
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    format!("application at {app} unreachable: {e}\n"),
                );
            }
        }
    }
    let Some(sender) = guard.as_mut() else {
        return error_response(
            StatusCode::BAD_GATEWAY,
            "no connection to the application\n".into(),
        );
    };
    match sender.send_request(req).await {
        Ok(resp) => resp.map(|b| b.boxed()),
        Err(e) => {
            *guard = None;
            error_response(
                StatusCode::BAD_GATEWAY,
                format!("application request failed: {e}\n"),
            )
        }
    }
}

async fn connect_app(
    app: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Incoming>, String> {
    let tcp = TcpStream::connect(app).await.map_err(|e| e.to_string())?;
    if crate::upstream::is_self_connected(&tcp) {
        return Err("connection refused (the socket connected to itself)".to_string());
    }
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "application connection ended");
        }
    });
    Ok(sender)
}

fn error_response(status: StatusCode, text: String) -> Response<Body> {
    let body = Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp
}
