//! The inbound role: other clusters' gateways open one stream per tunnelled connection (on a
//! QUIC connection either side dialled, or as a TLS-over-TCP connection); each is checked
//! against the current configuration and joined to a healthy local endpoint (the destination
//! sidecar's mTLS listener).
//!
//! Per stream, in order: read the [`OpenRequest`]; check that the peer gateway's cluster (from
//! its verified certificate) is the request's source cluster and that this cluster is the
//! target; find the service, exported, with the port; pick the least-loaded healthy endpoint
//! in the subset and connect to it; answer Ok and relay. Refusals carry a reason code so the
//! caller can fail over at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::MeshConfig;
use isthmus_core::tunnel::{self, OpenRequest, OpenResponse, ReasonCode};
use quinn::{Connection, Endpoint, Incoming};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::endpoints::{self, Active, Balancer};
use crate::header::reject_bad_header;
use crate::log_limit::LogLimiter;
use crate::metrics::{Direction, Metrics, Rejection, Role, Source, UNKNOWN_PEER};
use crate::peers::{Established, Peers};
use crate::quic::{self, codes};
use crate::relay::{relay_and_log, PeerRead, PeerWrite};
use crate::{log_panic, tls_only, GatewayError, Stop};

/// How many endpoints one stream tries before answering `NoHealthyEndpoint`.
const MAX_DIAL_ATTEMPTS: usize = 3;

pub(crate) struct Inbound {
    pub cluster: String,
    pub config: watch::Receiver<Arc<MeshConfig>>,
    pub balancer: Arc<Balancer>,
    pub connect_timeout: Duration,
    pub peers: Arc<Peers>,
    pub metrics: Arc<Metrics>,
    pub log: Arc<LogLimiter>,
}

impl Inbound {
    /// Accepts peer gateways' connections, and serves the connections this gateway dialled
    /// (`dialled`), until `stop` fires or the endpoint is closed; each connection (and each of
    /// its streams) is served by a task owned by this loop, and all of them have ended when it
    /// returns.
    pub(crate) async fn run(
        self: Arc<Self>,
        endpoint: Endpoint,
        mut dialled: mpsc::UnboundedReceiver<Established>,
        mut stop: Stop,
    ) {
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                _ = stop.fired() => break,
                incoming = endpoint.accept() => match incoming {
                    Some(incoming) => {
                        let this = self.clone();
                        let stop = stop.clone();
                        let span = tracing::info_span!("inbound", from = %incoming.remote_address());
                        tasks.spawn(
                            async move { this.accept(incoming, stop).await }.instrument(span),
                        );
                    }
                    None => break,
                },
                Some(established) = dialled.recv() => {
                    let this = self.clone();
                    let stop = stop.clone();
                    let span = tracing::info_span!("inbound", to = %established.cluster);
                    tasks.spawn(async move {
                        let Established { conn, cluster } = established;
                        if let Some(peer) = quic::peer_id(&conn) {
                            this.serve_connection(conn, peer, cluster, stop).await;
                        }
                    }.instrument(span));
                }
                Some(done) = tasks.join_next(), if !tasks.is_empty() => log_panic(done),
            }
        }
        tasks.shutdown().await;
        debug!("inbound role stopped");
    }

    /// Completes a peer's handshake, works out its cluster, offers the connection to the pool,
    /// and serves its streams.
    async fn accept(self: Arc<Self>, incoming: Incoming, stop: Stop) {
        let addr = incoming.remote_address();
        let conn = match self.handshake(incoming).await {
            Ok(conn) => conn,
            Err(e) => {
                // An unauthorised certificate ends up here: rustls refused it in the handshake.
                self.refused(addr, Rejection::HandshakeFailed, &e.chain());
                return;
            }
        };
        let Some(peer) = quic::peer_id(&conn) else {
            self.refused(addr, Rejection::UnauthorizedPeer, "no SPIFFE identity");
            conn.close(codes::WRONG_PEER, b"no SPIFFE identity");
            return;
        };
        let cluster = self.peer_cluster(&peer, addr);
        self.metrics.handshake_done(&cluster, Role::Server);
        info!(%peer, "peer gateway connected");
        if cluster != UNKNOWN_PEER {
            self.peers.adopt(&cluster, &conn).await;
        }
        self.serve_connection(conn, peer, cluster, stop).await;
    }

    /// The member cluster `peer` belongs to, or [`UNKNOWN_PEER`] (counted and logged: its
    /// streams will be refused as forbidden).
    pub(crate) fn peer_cluster(&self, peer: &SpiffeId, addr: SocketAddr) -> String {
        let config = self.config.borrow().clone();
        match quic::peer_cluster(&config, peer) {
            Some(cluster) => cluster.to_string(),
            None => {
                let why = format!("{peer} belongs to no member cluster");
                self.refused(addr, Rejection::UnauthorizedPeer, &why);
                UNKNOWN_PEER.to_string()
            }
        }
    }

    /// Counts a refused peer and logs it at most once per address, kind and interval.
    pub(crate) fn refused(&self, addr: SocketAddr, reason: Rejection, detail: &str) {
        self.metrics.reject(Source::Peer, reason);
        if let Some(suppressed) = self
            .log
            .admit(&format!("peer {} {}", addr.ip(), reason.as_str()))
        {
            warn!(%addr, reason = reason.as_str(), error = %detail, suppressed, "refused a gateway connection");
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        conn: Connection,
        peer: SpiffeId,
        cluster: String,
        mut stop: Stop,
    ) {
        let mut streams = JoinSet::new();
        let reason = loop {
            tokio::select! {
                _ = stop.fired() => break quinn::ConnectionError::LocallyClosed,
                accepted = conn.accept_bi() => match accepted {
                    Ok((send, recv)) => {
                        let this = self.clone();
                        let peer = peer.clone();
                        let cluster = cluster.clone();
                        let from = conn.remote_address();
                        streams.spawn(async move {
                            this.serve_stream(&peer, &cluster, from, send, recv).await
                        });
                    }
                    Err(e) => break e,
                },
                Some(done) = streams.join_next(), if !streams.is_empty() => log_panic(done),
            }
        };
        streams.shutdown().await;
        debug!(%peer, %reason, "peer gateway connection closed");
    }

    async fn handshake(&self, incoming: Incoming) -> Result<Connection, GatewayError> {
        let addr = incoming.remote_address();
        let connecting = incoming
            .accept()
            .map_err(|source| GatewayError::Accept { addr, source })?;
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Err(_) => Err(GatewayError::AcceptTimeout {
                addr,
                after: self.connect_timeout,
            }),
            Ok(Err(source)) => Err(GatewayError::Accept { addr, source }),
            Ok(Ok(conn)) => Ok(conn),
        }
    }

    /// Serves one tunnel opened by `peer` (of member cluster `cluster`, or [`UNKNOWN_PEER`]).
    pub(crate) async fn serve_stream<W, R>(
        &self,
        peer: &SpiffeId,
        cluster: &str,
        from: SocketAddr,
        mut send: W,
        mut recv: R,
    ) where
        W: AsyncWrite + PeerWrite + Unpin,
        R: AsyncRead + PeerRead + Unpin,
    {
        let req = match tokio::time::timeout(self.connect_timeout, tunnel::read_request(&mut recv))
            .await
        {
            Err(_) => {
                let e = GatewayError::ReadRequestTimeout {
                    after: self.connect_timeout,
                };
                debug!(%peer, error = %e.chain(), "abandoning a silent stream");
                send.abort();
                return;
            }
            Ok(Err(e)) => {
                let who = format!("{cluster} {}", from.ip());
                reject_bad_header(&mut send, e, &self.metrics, &self.log, Source::Peer, &who).await;
                return;
            }
            Ok(Ok(req)) => req,
        };
        let span = tracing::info_span!("tunnel", service = %req.service, port = req.port,
            source = %req.source_cluster, trace = req.trace_context.as_deref().unwrap_or(""));
        async move {
            let (tcp, active) = match self.open(peer, &req).await {
                Ok(opened) => opened,
                Err(response) => {
                    self.metrics
                        .stream_answered(cluster, Direction::Inbound, response.code);
                    if tunnel::write_response(&mut send, &response).await.is_ok() {
                        let _ = send.shutdown().await;
                    }
                    return;
                }
            };
            self.metrics
                .stream_answered(cluster, Direction::Inbound, ReasonCode::Ok);
            if let Err(e) = tunnel::write_response(&mut send, &OpenResponse::ok()).await {
                debug!(error = %GatewayError::WriteResponse(e).chain(), "peer went away");
                return;
            }
            // Only TLS crosses clusters, checked here too: a compromised member's gateway could
            // skip its own check. Refused, the stream is reset and the endpoint connection
            // closed unused (it received nothing).
            let mut tcp = tcp;
            let prefix = match tls_only::read_client_hello(&mut recv, self.connect_timeout).await
            {
                Ok(prefix) => prefix,
                Err(tls_only::NoClientHello::Ended(reason)) => {
                    debug!(from = %cluster, %reason, "tunnel ended before it carried anything");
                    send.abort();
                    recv.abort();
                    return;
                }
                Err(tls_only::NoClientHello::NotTls(reason)) => {
                    self.metrics.reject(Source::Peer, Rejection::NotTls);
                    if let Some(suppressed) = self.log.admit(&format!("not_tls {cluster}")) {
                        warn!(from = %cluster, %reason, suppressed, "refusing a tunnel that is not TLS");
                    }
                    send.abort();
                    recv.abort();
                    return;
                }
            };
            debug!(endpoint = %active.addr(), "tunnel open");
            let _open = self.metrics.open_stream(cluster, Direction::Inbound);
            let counters = self.metrics.byte_counters(cluster);
            if let Err(e) = tcp.write_all(&prefix).await {
                debug!(error = %e, "endpoint closed before the ClientHello");
                send.abort();
                recv.abort();
                return;
            }
            counters.received.inc_by(u64::from(tls_only::PREFIX_LEN_U8));
            relay_and_log(tcp, send, recv, &counters).await;
            drop(active);
        }
        .instrument(span)
        .await
    }

    /// Routes a request to a connected local endpoint, or says why not.
    async fn open(
        &self,
        peer: &SpiffeId,
        req: &OpenRequest,
    ) -> Result<(TcpStream, Active), OpenResponse> {
        let config = self.config.borrow().clone();
        let candidates = route(&config, &self.cluster, peer, req)?;
        self.dial(candidates).await
    }

    /// Connects to the least-loaded candidate, moving on to the next on failure, within one
    /// connect timeout overall.
    async fn dial(
        &self,
        mut candidates: Vec<SocketAddr>,
    ) -> Result<(TcpStream, Active), OpenResponse> {
        let total = candidates.len();
        let mut last_error = None;
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        for _ in 0..MAX_DIAL_ATTEMPTS.min(total) {
            let Some(active) = self.balancer.pick(&candidates) else {
                break;
            };
            let addr = active.addr();
            let dialled = tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await;
            match dialled {
                // On one host, a dial to a dead endpoint's free port can connect the socket
                // to itself (TCP simultaneous open): that is a refusal, not an endpoint.
                Ok(Ok(tcp)) if matches!((tcp.local_addr(), tcp.peer_addr()), (Ok(l), Ok(p)) if l == p) =>
                {
                    let e = GatewayError::DialEndpoint {
                        addr,
                        source: std::io::Error::new(
                            std::io::ErrorKind::ConnectionRefused,
                            "the socket connected to itself: nothing listens there",
                        ),
                    };
                    warn!(error = %e.chain(), "local endpoint refused the tunnel");
                    last_error = Some(e);
                }
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    return Ok((tcp, active));
                }
                Ok(Err(source)) => {
                    let e = GatewayError::DialEndpoint { addr, source };
                    warn!(error = %e.chain(), "local endpoint refused the tunnel");
                    last_error = Some(e);
                }
                Err(_) => {
                    last_error = Some(GatewayError::DialEndpointTimeout {
                        addr,
                        after: self.connect_timeout,
                    });
                    break;
                }
            }
            candidates.retain(|c| *c != addr);
        }
        let detail = last_error.map_or_else(String::new, |e| e.chain());
        Err(refuse(
            ReasonCode::NoHealthyEndpoint,
            format!("none of the {total} healthy endpoint(s) could be connected: {detail}"),
        ))
    }
}

/// Decides whether `peer` may open `req` here, and if so which endpoints may serve it.
fn route(
    config: &MeshConfig,
    cluster: &str,
    peer: &SpiffeId,
    req: &OpenRequest,
) -> Result<Vec<SocketAddr>, OpenResponse> {
    let Some(peer_cluster) = quic::peer_cluster(config, peer) else {
        return Err(refuse(
            ReasonCode::Forbidden,
            format!("{peer} belongs to no member cluster"),
        ));
    };
    if req.source_cluster != peer_cluster {
        return Err(refuse(
            ReasonCode::Forbidden,
            format!(
                "the request claims source cluster {:?} but comes from the gateway of {peer_cluster}",
                req.source_cluster
            ),
        ));
    }
    if req.target_cluster != cluster {
        return Err(refuse(
            ReasonCode::BadRequest,
            format!(
                "this is the gateway of cluster {cluster}, not {}",
                req.target_cluster
            ),
        ));
    }
    let Some((name, namespace)) = req.service_parts() else {
        return Err(refuse(
            ReasonCode::BadRequest,
            format!("bad service name {:?}", req.service),
        ));
    };
    let service = config
        .service(namespace, name)
        .filter(|s| s.exported)
        .ok_or_else(|| {
            refuse(
                ReasonCode::UnknownService,
                format!("cluster {cluster} exports no service {}", req.service),
            )
        })?;
    if !service.ports.is_empty() && service.port(req.port).is_none() {
        return Err(refuse(
            ReasonCode::UnknownService,
            format!("service {} has no port {}", req.service, req.port),
        ));
    }
    let candidates =
        endpoints::candidates(&service.local_endpoints, req.subset.as_deref(), req.port);
    if candidates.is_empty() {
        let subset = req
            .subset
            .as_deref()
            .map(|s| format!(" in subset {s}"))
            .unwrap_or_default();
        return Err(refuse(
            ReasonCode::NoHealthyEndpoint,
            format!(
                "service {} has no healthy endpoint{subset} in cluster {cluster}",
                req.service
            ),
        ));
    }
    Ok(candidates)
}

fn refuse(code: ReasonCode, message: String) -> OpenResponse {
    warn!(%code, %message, "refusing a tunnel");
    OpenResponse::new(code, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_core::mesh::{ClusterInfo, Endpoint, MeshService, ServicePort};
    use std::collections::BTreeMap;

    fn config() -> MeshConfig {
        let ep = |port: u16, healthy| Endpoint {
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            labels: BTreeMap::from([("version".to_string(), "v1".to_string())]),
            identity: String::new(),
            healthy,
            ports: Default::default(),
        };
        let service = |name: &str, exported, endpoints| MeshService {
            name: name.into(),
            namespace: "default".into(),
            vip: [240, 240, 0, 1].into(),
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                ..ServicePort::default()
            }],
            identities: vec![],
            local_endpoints: endpoints,
            remote: vec![],
            exported,
            headless: None,
        };
        let cluster = |name: &str| ClusterInfo {
            name: name.into(),
            trust_domain: format!("{name}.isthmus.local"),
            gateway: None,
            ca_bundle_pem: String::new(),
            locality: None,
        };
        MeshConfig {
            version: 1,
            cluster: "west".into(),
            services: vec![
                service("ratings", true, vec![ep(1, true), ep(2, false)]),
                service("internal", false, vec![ep(3, true)]),
                service("down", true, vec![ep(4, false)]),
            ],
            clusters: vec![cluster("east"), cluster("west")],
            policies: Vec::new(),
        }
    }

    fn request(service: &str) -> OpenRequest {
        let mut req = OpenRequest::new(service, 80, "west");
        req.source_cluster = "east".into();
        req
    }

    fn east() -> SpiffeId {
        SpiffeId::gateway("east.isthmus.local")
    }

    fn code(r: Result<Vec<SocketAddr>, OpenResponse>) -> ReasonCode {
        r.map_or_else(|resp| resp.code, |_| ReasonCode::Ok)
    }

    #[test]
    fn an_exported_service_routes_to_its_healthy_endpoints() {
        let eps = route(&config(), "west", &east(), &request("ratings.default")).unwrap();
        assert_eq!(eps, vec![SocketAddr::from(([127, 0, 0, 1], 1))]);
    }

    #[test]
    fn refusals_carry_the_reason_code_a_caller_can_fail_over_on() {
        let c = config();
        assert_eq!(
            code(route(&c, "west", &east(), &request("nope.default"))),
            ReasonCode::UnknownService
        );
        assert_eq!(
            code(route(&c, "west", &east(), &request("internal.default"))),
            ReasonCode::UnknownService
        );
        assert_eq!(
            code(route(&c, "west", &east(), &request("down.default"))),
            ReasonCode::NoHealthyEndpoint
        );
        let mut wrong_port = request("ratings.default");
        wrong_port.port = 81;
        assert_eq!(
            code(route(&c, "west", &east(), &wrong_port)),
            ReasonCode::UnknownService
        );
        let mut v2 = request("ratings.default");
        v2.subset = Some("v2".into());
        assert_eq!(
            code(route(&c, "west", &east(), &v2)),
            ReasonCode::NoHealthyEndpoint
        );
        let mut elsewhere = request("ratings.default");
        elsewhere.target_cluster = "north".into();
        assert_eq!(
            code(route(&c, "west", &east(), &elsewhere)),
            ReasonCode::BadRequest
        );
    }

    #[test]
    fn a_gateway_cannot_speak_for_another_cluster() {
        let c = config();
        let mut spoofed = request("ratings.default");
        spoofed.source_cluster = "west".into();
        assert_eq!(
            code(route(&c, "west", &east(), &spoofed)),
            ReasonCode::Forbidden
        );
        let stranger = SpiffeId::gateway("north.isthmus.local");
        assert_eq!(
            code(route(&c, "west", &stranger, &request("ratings.default"))),
            ReasonCode::Forbidden
        );
    }
}
