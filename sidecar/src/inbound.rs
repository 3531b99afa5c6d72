//! Inbound: terminates mTLS from other sidecars, authorizes, and forwards to the application.
//!
//! Per connection: the first byte tells TLS (a ClientHello, 0x16) from plaintext. Plaintext is
//! refused unless a PeerAuthentication makes the workload PERMISSIVE (the default is STRICT).
//! The caller's SPIFFE ID comes from its certificate. For HTTP ports every request is
//! authorized against the AuthorizationPolicies (403 `RBAC: access denied` when denied) and
//! gets `x-forwarded-client-cert: By=<this workload>;URI=<caller>` (Envoy's format), replacing
//! whatever the caller sent: only the identity proven by the certificate reaches the app. For
//! opaque TCP ports the connection is authorized once, then bytes are copied.
//!
//! HTTP arrives as HTTP/1.1 or HTTP/2 (the ALPN the caller negotiated); a port whose protocol
//! was not declared is served at L7 exactly when the caller offered an HTTP ALPN
//! ([`crate::protocol`]). Towards the application, HTTP/2 (cleartext, prior knowledge) is
//! spoken for `http2`/`grpc` ports and gRPC requests, HTTP/1.1 otherwise, over connections
//! shared by all callers of the port. Every request and connection is counted with Istio's
//! metrics as `reporter="destination"`.

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
use tokio::sync::watch;

use crate::authz::{authorize, mtls_mode, Inbound, MtlsMode, Verdict, Workload};
use crate::pool::{Conn, Pool};
use crate::protocol;
use crate::InboundPort;

/// How long a client may take to start and finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The first byte of a TLS record carrying a handshake message.
const TLS_HANDSHAKE: u8 = 0x16;

type Body = BoxBody<Bytes, hyper::Error>;

/// A workload's RequestAuthentication rules and the config version they were compiled from.
pub(crate) type CompiledAuthn = (u64, Arc<crate::authn::Rules>);

/// The policy view of one workload: who may call it, and whether plaintext is accepted; and
/// what its destination-side metrics say about it.
#[derive(Clone)]
pub(crate) struct Guard {
    pub config: watch::Receiver<Arc<MeshConfig>>,
    pub workload: Workload,
    pub cluster: String,
    pub metrics: crate::metrics::Metrics,
    /// How request paths are normalized before authorization (and forwarded so).
    pub paths: isthmus_core::http_path::PathNormalization,
    pub limits: crate::limits::Limits,
    /// The workload's RequestAuthentication rules, compiled for the config version beside.
    pub authn: Arc<std::sync::Mutex<Option<CompiledAuthn>>>,
}

impl Guard {
    fn check(&self, req: &Inbound<'_>) -> Verdict {
        authorize(&self.config.borrow(), &self.workload, req)
    }

    /// The RequestAuthentication rules in force (compiled once per config version).
    fn authn_rules(&self) -> Arc<crate::authn::Rules> {
        let mut cached = self.authn.lock().unwrap_or_else(|e| e.into_inner());
        let version = self.config.borrow().version;
        match &*cached {
            Some((v, rules)) if *v == version => rules.clone(),
            _ => {
                let config = self.config.borrow().clone();
                let rules = Arc::new(crate::authn::Rules::for_workload(&config, &self.workload));
                *cached = Some((config.version, rules.clone()));
                rules
            }
        }
    }

    /// Whether the workload's `port` accepts plaintext (PeerAuthentication PERMISSIVE there).
    fn plaintext_allowed(&self, port: u16) -> bool {
        mtls_mode(&self.config.borrow(), &self.workload, port) == MtlsMode::Permissive
    }
}

/// How an inbound listener learns where the application is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// The port's `forward_to`, with its declared protocol (local mode).
    Declared,
    /// Each connection's original destination (`SO_ORIGINAL_DST`: the pod's IP and the port
    /// the caller dialled, before `isthmus sidecar init`'s redirect), protocol detected.
    Redirected,
}

pub(crate) async fn serve(
    listener: TcpListener,
    port: InboundPort,
    target: Target,
    tls: Arc<rustls::ServerConfig>,
    identity: Arc<Identity>,
    guard: Guard,
    mut stop: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let apps: Arc<Pool<(SocketAddr, bool)>> = Arc::default();
    crate::pool::expire_idle(Arc::downgrade(&apps));
    let admission =
        crate::limits::Admission::new(&guard.limits, guard.metrics.refused("inbound", "limit"));
    // The bound address, which discovery lists among the service's endpoints.
    let mut port = port;
    if let Ok(bound) = listener.local_addr() {
        port.listen = bound;
    }
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((tcp, peer)) = accepted else { continue };
        let Some(slot) = admission.admit() else {
            tracing::debug!(%peer, "inbound listener at its connection limit; closed");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, port, identity, guard, apps) = (
            acceptor.clone(),
            port.clone(),
            identity.clone(),
            guard.clone(),
            apps.clone(),
        );
        connections.spawn(async move {
            let _slot = slot;
            let port = match target {
                Target::Declared => port,
                Target::Redirected => match crate::redirect::original_destination(&tcp) {
                    // Made straight to the inbound port, not redirected: forwarding it would
                    // dial the listener itself.
                    Ok(dst) if tcp.local_addr().is_ok_and(|local| local == dst) => {
                        tracing::info!(%peer, "connection made straight to the inbound port, not redirected; closed");
                        guard.metrics.refused("inbound", "not_redirected").inc();
                        return;
                    }
                    // Listed among the service's endpoints as pod IP and target port.
                    Ok(dst) => InboundPort {
                        listen: dst,
                        forward_to: dst,
                        protocol: Protocol::Auto,
                    },
                    Err(e) => {
                        tracing::info!(%peer, error = %e, "connection to the inbound port was not redirected; closed");
                        return;
                    }
                },
            };
            let mut first = [0u8; 1];
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
                Ok(Ok(1)) => {}
                _ => return,
            }
            if first[0] != TLS_HANDSHAKE {
                if guard.plaintext_allowed(port.forward_to.port()) {
                    let http = match port.protocol {
                        Protocol::Auto => crate::outbound::detect_http(&tcp).await,
                        p => p.is_http(),
                    };
                    let conn = Connection { caller: None, own: identity.id().clone(), http };
                    serve_stream(tcp, conn, &port, guard, apps).await;
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
            let session = tls.get_ref().1;
            let Some(caller) = isthmus_core::tls::peer_identity(session.peer_certificates()) else {
                tracing::info!(%peer, "inbound peer presented no SPIFFE identity");
                return;
            };
            let http = protocol::inbound_is_http(port.protocol, session.alpn_protocol());
            let conn = Connection { caller: Some(caller), own: identity.id().clone(), http };
            serve_stream(tls, conn, &port, guard, apps).await;
        });
        // Reap finished connection tasks so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
    }
    connections.abort_all();
}

/// Who is on the other end of one inbound connection, and how it is served.
struct Connection {
    /// The caller's SPIFFE ID (None: plaintext, PERMISSIVE).
    caller: Option<SpiffeId>,
    own: SpiffeId,
    /// Served at L7 (else relayed as opaque TCP).
    http: bool,
}

async fn serve_stream<S>(
    stream: S,
    conn: Connection,
    port: &InboundPort,
    guard: Guard,
    apps: Arc<Pool<(SocketAddr, bool)>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if conn.http {
        return serve_http(stream, conn, port.clone(), guard, apps).await;
    }
    let caller = conn.caller;
    let req = Inbound {
        caller: caller.as_ref(),
        port: port.forward_to.port(),
        method: None,
        path: None,
        headers: None,
        auth: None,
    };
    if let Verdict::Deny(why) = guard.check(&req) {
        tracing::info!(caller = ?caller.as_ref().map(|c| c.to_string()), %why, "inbound connection denied");
        return;
    }
    let mut stream = stream;
    match TcpStream::connect(port.forward_to).await {
        Ok(mut app) => {
            let reporter = guard.tcp_reporter(caller.as_ref());
            let (name, namespace) = guard.destination(port);
            let labels = reporter.labels((&name, &namespace), guard.cluster.clone());
            reporter.opened(&labels);
            let copied =
                crate::limits::relay(&mut stream, &mut app, guard.limits.tcp_idle_timeout).await;
            // Sent to the peer (the caller) is what came from the application.
            let (received, sent) = copied.map_or((0, 0), |c| c);
            reporter.closed(&labels, sent, received);
        }
        Err(e) => {
            tracing::warn!(app = %port.forward_to, error = %e, "application unreachable")
        }
    }
}

impl Guard {
    /// The service this workload's port serves (name, namespace), for metrics: the one
    /// listing this sidecar's listener among its local endpoints, else the workload's `app`
    /// label.
    fn destination(&self, port: &InboundPort) -> (String, String) {
        let config = self.config.borrow();
        let found = config.services.iter().find(|s| {
            s.local_endpoints.iter().any(|e| {
                e.address == port.listen
                    || (port.listen.ip().is_unspecified() && e.address.port() == port.listen.port())
            })
        });
        match found {
            Some(s) => (s.name.clone(), s.namespace.clone()),
            None => (
                self.workload
                    .labels
                    .get("app")
                    .cloned()
                    .unwrap_or_else(|| "unknown".into()),
                self.workload.namespace.clone(),
            ),
        }
    }

    /// The cluster whose trust domain issued `caller`'s identity.
    fn caller_cluster(&self, caller: Option<&SpiffeId>) -> String {
        let Some(caller) = caller else {
            return "unknown".into();
        };
        self.config
            .borrow()
            .clusters
            .iter()
            .find(|c| c.trust_domain == caller.trust_domain())
            .map_or_else(|| "unknown".into(), |c| c.name.clone())
    }

    /// Reports TCP metrics as the destination, with the caller as the source.
    fn tcp_reporter(&self, caller: Option<&SpiffeId>) -> crate::metrics::TcpReporter {
        crate::metrics::TcpReporter {
            metrics: self.metrics.clone(),
            reporter: "destination",
            workload: caller.map_or_else(|| "unknown".into(), |c| c.service_account().to_string()),
            namespace: caller.map_or_else(|| "unknown".into(), |c| c.namespace().to_string()),
            cluster: self.caller_cluster(caller),
        }
    }
}

async fn serve_http<S>(
    stream: S,
    conn: Connection,
    port: InboundPort,
    guard: Guard,
    apps: Arc<Pool<(SocketAddr, bool)>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let xfcc = conn
        .caller
        .as_ref()
        .and_then(|c| HeaderValue::from_str(&format!("By={};URI={c}", conn.own)).ok());
    let destination = Arc::new(guard.destination(&port));
    let source_cluster = guard.caller_cluster(conn.caller.as_ref());
    let caller = Arc::new(conn.caller);
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let (apps, xfcc, caller, guard, port, destination, source_cluster) = (
            apps.clone(),
            xfcc.clone(),
            caller.clone(),
            guard.clone(),
            port.clone(),
            destination.clone(),
            source_cluster.clone(),
        );
        async move {
            let started = tokio::time::Instant::now();
            // Authorization and the application see one normalized path.
            match isthmus_core::http_path::normalize_uri(req.uri(), guard.paths) {
                Ok(Some(normal)) => *req.uri_mut() = normal,
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %e, path = %req.uri().path(), "request refused");
                    return Ok(error_response(StatusCode::BAD_REQUEST, format!("{e}\n")));
                }
            }
            let grpc = protocol::is_grpc(req.headers());
            let request_bytes = protocol::content_length(req.headers());
            let now = isthmus_core::clock::unix_ms() / 1000;
            let (mut parts, body) = req.into_parts();
            let auth = match guard
                .authn_rules()
                .authenticate(&parts.uri, &mut parts.headers, now)
            {
                crate::authn::Outcome::Refused(refusal) => Err(refusal),
                crate::authn::Outcome::Verified(v) => Ok(Some(v)),
                crate::authn::Outcome::Anonymous => Ok(None),
            };
            let mut req = Request::from_parts(parts, body);
            let verdict = match &auth {
                Err(_) => Verdict::Allow,
                Ok(auth) => guard.check(&Inbound {
                    caller: caller.as_ref().as_ref(),
                    port: port.forward_to.port(),
                    method: Some(req.method().as_str()),
                    path: Some(req.uri().path()),
                    headers: Some(req.headers()),
                    auth: auth.as_deref(),
                }),
            };
            let (resp, flags) = if let Err(refusal) = auth {
                tracing::debug!(reason = refusal.reason(), %refusal, path = %req.uri().path(), "token refused");
                guard.metrics.jwt_refused(refusal.reason()).inc();
                let mut resp = error_response(StatusCode::UNAUTHORIZED, format!("{refusal}\n"));
                resp.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    crate::authn::challenge(req.uri(), req.headers()),
                );
                (resp, "-")
            } else if let Verdict::Deny(why) = verdict {
                tracing::debug!(%why, path = %req.uri().path(), "request denied");
                let resp = error_response(StatusCode::FORBIDDEN, "RBAC: access denied\n".into());
                (resp, "DENY")
            } else {
                req.headers_mut().remove("x-forwarded-client-cert");
                if let Some(v) = xfcc {
                    req.headers_mut().insert("x-forwarded-client-cert", v);
                }
                (
                    forward_request(&apps, &port, req, guard.limits.tcp_idle_timeout).await,
                    "-",
                )
            };
            let caller = caller.as_ref().as_ref();
            let labels = crate::metrics::RequestLabels {
                reporter: "destination".into(),
                source_workload: caller
                    .map_or_else(|| "unknown".into(), |c| c.service_account().to_string()),
                source_workload_namespace: caller
                    .map_or_else(|| "unknown".into(), |c| c.namespace().to_string()),
                source_principal: caller.map_or_else(|| "unknown".into(), |c| c.to_string()),
                source_cluster,
                destination_service: format!(
                    "{}.{}.svc.cluster.local",
                    destination.0, destination.1
                ),
                destination_service_name: destination.0.clone(),
                destination_service_namespace: destination.1.clone(),
                destination_cluster: guard.cluster.clone(),
                request_protocol: if grpc { "grpc" } else { "http" }.into(),
                response_code: resp.status().as_u16().to_string(),
                response_flags: flags.into(),
                connection_security_policy: if caller.is_some() {
                    "mutual_tls"
                } else {
                    "none"
                }
                .into(),
            };
            guard.metrics.request(
                &labels,
                started.elapsed().as_secs_f64() * 1000.0,
                request_bytes,
                protocol::content_length(resp.headers()),
            );
            Ok::<_, hyper::Error>(resp)
        }
    });
    if let Err(e) = crate::protocol::server_builder()
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(error = %e, "inbound HTTP connection ended with an error");
    }
}

/// Sends one authorized request to the application, over a shared connection of the version
/// the port calls for; an accepted upgrade (101) joins the two upgraded connections.
async fn forward_request(
    apps: &Pool<(SocketAddr, bool)>,
    port: &InboundPort,
    mut req: Request<Incoming>,
    idle: std::time::Duration,
) -> Response<Body> {
    let app = port.forward_to;
    let upgrade = protocol::is_upgrade(req.version(), req.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let h2 = !upgrade && protocol::app_hop_is_h2(port.protocol, req.version(), req.headers());
    let (mut parts, body) = req.into_parts();
    let version = if h2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    protocol::for_version(&mut parts, version, &app.to_string());
    let req = Request::from_parts(parts, body.boxed());
    let pooled = if upgrade {
        None
    } else {
        apps.take(&(app, h2), h2)
    };
    let mut conn = match pooled {
        Some(c) => c,
        None => match connect_app(app, h2).await {
            Ok(c) => c,
            Err(e) => {
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    format!("application at {app} unreachable: {e}\n"),
                )
            }
        },
    };
    match conn.send(req).await {
        Ok(mut resp) => {
            match downstream_upgrade {
                Some(down) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                    crate::pool::join_upgrades(down, hyper::upgrade::on(&mut resp), idle);
                }
                _ => apps.put((app, h2), conn),
            }
            resp.map(|b| b.boxed())
        }
        Err(e) => error_response(
            StatusCode::BAD_GATEWAY,
            format!("application request failed: {e}\n"),
        ),
    }
}

async fn connect_app(app: SocketAddr, h2: bool) -> Result<Conn, String> {
    let tcp = TcpStream::connect(app).await.map_err(|e| e.to_string())?;
    if crate::upstream::is_self_connected(&tcp) {
        return Err("connection refused (the socket connected to itself)".to_string());
    }
    let _ = tcp.set_nodelay(true);
    Conn::handshake(tcp, h2).await.map_err(|e| e.to_string())
}

fn error_response(status: StatusCode, text: String) -> Response<Body> {
    let body = Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp
}
