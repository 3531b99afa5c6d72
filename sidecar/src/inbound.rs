//! Inbound: terminates mTLS from other sidecars and forwards to the local application.
//!
//! For HTTP ports every request gets `x-forwarded-client-cert: By=<this workload>;URI=<caller>`
//! (Envoy's format), replacing whatever the caller sent: only the identity proven by the
//! caller's certificate reaches the application.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::Protocol;
use isthmus_core::tls::Identity;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Mutex};

use crate::InboundPort;

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

type Body = BoxBody<Bytes, hyper::Error>;

pub(crate) async fn serve(
    listener: TcpListener,
    port: InboundPort,
    tls: Arc<rustls::ServerConfig>,
    identity: Arc<Identity>,
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
        let acceptor = acceptor.clone();
        let port = port.clone();
        let identity = identity.clone();
        connections.spawn(async move {
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
            match port.protocol {
                Protocol::Http => serve_http(tls, caller, identity.id().clone(), port.forward_to).await,
                _ => {
                    let mut tls = tls;
                    match TcpStream::connect(port.forward_to).await {
                        Ok(mut app) => {
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut app).await;
                        }
                        Err(e) => tracing::warn!(app = %port.forward_to, error = %e, "application unreachable"),
                    }
                }
            }
        });
        // Reap finished connection tasks so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
    }
    connections.abort_all();
}

async fn serve_http(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    caller: SpiffeId,
    own: SpiffeId,
    app: SocketAddr,
) {
    let xfcc = HeaderValue::from_str(&format!("By={own};URI={caller}")).ok();
    let upstream: Arc<Mutex<Option<hyper::client::conn::http1::SendRequest<Incoming>>>> =
        Arc::new(Mutex::new(None));
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let upstream = upstream.clone();
        let xfcc = xfcc.clone();
        async move {
            req.headers_mut().remove("x-forwarded-client-cert");
            if let Some(v) = xfcc {
                req.headers_mut().insert("x-forwarded-client-cert", v);
            }
            Ok::<_, hyper::Error>(forward_request(&upstream, app, req).await)
        }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
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
