//! The inbound role: other clusters' gateways connect over QUIC and open one stream per
//! tunnelled connection; each is checked against the current configuration and joined to a
//! healthy local endpoint (the destination sidecar's mTLS listener).
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
use quinn::{Connection, Endpoint, Incoming, RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::endpoints::{self, Active, Balancer};
use crate::outbound::reject_bad_header;
use crate::quic::{self, codes};
use crate::relay::relay;
use crate::{log_panic, GatewayError, Stop};

/// How many endpoints one stream tries before answering `NoHealthyEndpoint`.
const MAX_DIAL_ATTEMPTS: usize = 3;

pub(crate) struct Inbound {
    pub cluster: String,
    pub config: watch::Receiver<Arc<MeshConfig>>,
    pub balancer: Arc<Balancer>,
    pub connect_timeout: Duration,
}

impl Inbound {
    /// Accepts peer gateways' connections until `stop` fires or the endpoint is closed; each
    /// connection (and each of its streams) is served by a task owned by this loop, and all of
    /// them have ended when it returns.
    pub(crate) async fn run(self: Arc<Self>, endpoint: Endpoint, mut stop: Stop) {
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
                            async move { this.serve_connection(incoming, stop).await }.instrument(span),
                        );
                    }
                    None => break,
                },
                Some(done) = tasks.join_next(), if !tasks.is_empty() => log_panic(done),
            }
        }
        tasks.shutdown().await;
        debug!("inbound role stopped");
    }

    async fn serve_connection(self: Arc<Self>, incoming: Incoming, mut stop: Stop) {
        let addr = incoming.remote_address();
        let conn = match self.handshake(incoming).await {
            Ok(conn) => conn,
            Err(e) => {
                // An unauthorised certificate ends up here: rustls refused it in the handshake.
                warn!(error = %e.chain(), "refused a gateway connection");
                return;
            }
        };
        let Some(peer) = quic::peer_id(&conn) else {
            warn!(%addr, "a gateway connection without a SPIFFE identity; closing");
            conn.close(codes::WRONG_PEER, b"no SPIFFE identity");
            return;
        };
        info!(%peer, "peer gateway connected");
        let mut streams = JoinSet::new();
        let reason = loop {
            tokio::select! {
                _ = stop.fired() => break quinn::ConnectionError::LocallyClosed,
                accepted = conn.accept_bi() => match accepted {
                    Ok((send, recv)) => {
                        let this = self.clone();
                        let peer = peer.clone();
                        streams.spawn(async move { this.serve_stream(&peer, send, recv).await });
                    }
                    Err(e) => break e,
                },
                Some(done) = streams.join_next(), if !streams.is_empty() => log_panic(done),
            }
        };
        streams.shutdown().await;
        info!(%peer, %reason, "peer gateway connection closed");
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

    async fn serve_stream(&self, peer: &SpiffeId, mut send: SendStream, mut recv: RecvStream) {
        let req = match tokio::time::timeout(self.connect_timeout, tunnel::read_request(&mut recv))
            .await
        {
            Err(_) => {
                let e = GatewayError::ReadRequestTimeout {
                    after: self.connect_timeout,
                };
                debug!(%peer, error = %e.chain(), "abandoning a silent stream");
                let _ = send.reset(codes::STREAM_ABORTED);
                return;
            }
            Ok(Err(e)) => {
                reject_bad_header(&mut send, e).await;
                return;
            }
            Ok(Ok(req)) => req,
        };
        let span = tracing::info_span!("tunnel", service = %req.service, port = req.port,
            source = %req.source_cluster, trace = req.trace_context.as_deref().unwrap_or(""));
        async move {
            let active = match self.open(peer, &req).await {
                Ok(opened) => opened,
                Err(response) => {
                    if tunnel::write_response(&mut send, &response).await.is_ok() {
                        let _ = send.shutdown().await;
                    }
                    return;
                }
            };
            let (tcp, active) = active;
            if let Err(e) = tunnel::write_response(&mut send, &OpenResponse::ok()).await {
                debug!(error = %GatewayError::WriteResponse(e).chain(), "peer went away");
                return;
            }
            info!(endpoint = %active.addr(), "tunnel open");
            match relay(tcp, send, recv).await {
                Ok(carried) => debug!(
                    up = carried.tcp_to_quic,
                    down = carried.quic_to_tcp,
                    "tunnel closed"
                ),
                Err(e) => debug!(error = %GatewayError::Relay(e).chain(), "tunnel aborted"),
            }
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
    let candidates = endpoints::candidates(&service.local_endpoints, req.subset.as_deref());
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
        };
        let cluster = |name: &str| ClusterInfo {
            name: name.into(),
            trust_domain: format!("{name}.isthmus.local"),
            gateway: None,
            ca_bundle_pem: String::new(),
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
