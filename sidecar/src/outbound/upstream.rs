//! Reaching a service: choosing where a connection goes and opening the mTLS session.
//!
//! Where a connection goes is the failover table's active priority (`crate::failover`):
//! local endpoints first, dialled directly; remote clusters through the local gateway, which
//! answers with a reason code at once when it cannot serve. Every failure is reported to
//! [`Health`], so the next attempt already goes elsewhere. The server's SPIFFE ID must be one
//! of the service's identities; the gateway's is never involved.
//!
//! One endpoint of a headless service (behind its own VIP) is reached by
//! [`Connector::connect_endpoint`]: that endpoint or nothing, never a failover.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::{HeadlessEndpoint, MeshConfig, MeshService};
use isthmus_core::tls::{Identity, TrustBundles};
use isthmus_core::tunnel::{self, OpenRequest, ReasonCode};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::balance::Upstream;
use crate::failover::Health;

/// Why no connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("service {0} has no healthy endpoint in this cluster and no reachable remote export")]
    NoRoute(String),
    #[error("connecting to {addr} failed: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("endpoint {endpoint} of headless service {service} in this cluster is not ready")]
    EndpointNotReady { service: String, endpoint: String },
    #[error(
        "{service} already has {max} open connections (its DestinationRule's \
         connectionPool.tcp.maxConnections): overflow"
    )]
    Overflow { service: String, max: u32 },
    #[error("the gateway refused the stream to {cluster}: {code:?} {message}")]
    Refused {
        cluster: String,
        code: ReasonCode,
        message: String,
    },
}

/// Opens mTLS sessions to services on behalf of one workload.
pub struct Connector {
    cluster: String,
    identity: Arc<Identity>,
    trust: Arc<TrustBundles>,
    gateway: Option<SocketAddr>,
    timeout: Duration,
    health: Arc<Health>,
}

/// Where a session ended up, for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Local(SocketAddr),
    Remote(String),
}

impl Connector {
    pub fn new(
        cluster: String,
        identity: Arc<Identity>,
        trust: Arc<TrustBundles>,
        gateway: Option<SocketAddr>,
        timeout: Duration,
    ) -> Self {
        Connector {
            cluster,
            identity,
            trust,
            gateway,
            timeout,
            health: Arc::new(Health::default()),
        }
    }

    /// What this sidecar knows of its upstreams' health.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Whether a gateway is configured (remote clusters are reachable at all).
    pub fn has_gateway(&self) -> bool {
        self.gateway.is_some()
    }

    /// Opens an mTLS session to one endpoint of a headless service: a local one directly, a
    /// remote one through the gateway with the subset that selects it
    /// ([`HeadlessEndpoint::selector`]). The application chose that endpoint, so nothing else
    /// is tried, and a failure says nothing about the rest of the service's health.
    pub async fn connect_endpoint(
        &self,
        config: &MeshConfig,
        service: &MeshService,
        endpoint: &HeadlessEndpoint,
        port: u16,
    ) -> Result<(TlsStream<TcpStream>, Route), UpstreamError> {
        if endpoint.cluster == config.cluster {
            let local = service
                .local_endpoint(endpoint)
                .filter(|e| e.healthy)
                .ok_or_else(|| UpstreamError::EndpointNotReady {
                    service: service.key(),
                    endpoint: endpoint.id.clone(),
                })?;
            let upstream = Upstream::Local(local.address);
            let tls = self
                .connect_to(service, port, &upstream, None, None)
                .await?;
            Ok((tls, Route::Local(local.address)))
        } else {
            let upstream = Upstream::Remote(endpoint.cluster.clone());
            let subset = Some(endpoint.selector());
            let tls = self
                .connect_to(service, port, &upstream, subset, None)
                .await?;
            Ok((tls, Route::Remote(endpoint.cluster.clone())))
        }
    }

    /// Tells [`Health`] about a failure that means the upstream cannot serve now; returns
    /// whether it did (a refusal such as `Forbidden` or `Overloaded` says nothing about
    /// health).
    pub fn record_failure(
        &self,
        service: &MeshService,
        port: u16,
        upstream: &Upstream,
        e: &UpstreamError,
    ) -> bool {
        match (upstream, e) {
            (Upstream::Local(addr), UpstreamError::Connect { reason, .. }) => {
                self.health.endpoint_failed(*addr, reason);
                true
            }
            (
                Upstream::Remote(cluster),
                UpstreamError::Refused {
                    code:
                        code @ (ReasonCode::Unreachable
                        | ReasonCode::NoHealthyEndpoint
                        | ReasonCode::UnknownService),
                    message,
                    ..
                },
            ) => {
                self.health
                    .cluster_failed(cluster, &format!("{code:?}: {message}"), service, port);
                true
            }
            _ => false,
        }
    }

    /// Asks the gateway for a tunnel to `service` in `cluster` and closes it at once: Ok when
    /// the remote side could serve.
    pub async fn probe_remote(
        &self,
        service: &MeshService,
        port: u16,
        cluster: &str,
    ) -> Result<(), UpstreamError> {
        let gateway = self
            .gateway
            .ok_or_else(|| UpstreamError::NoRoute(service.key()))?;
        let mut tcp = self.tcp(gateway).await?;
        self.open_tunnel(&mut tcp, service, port, gateway, cluster, None)
            .await
    }

    /// Opens an mTLS session to one chosen upstream of `service`: a local endpoint directly,
    /// or a remote cluster through the gateway (with `subset`, `k=v[,k=v]`, for its endpoint
    /// choice). `alpn` is the one application protocol offered (`h2` or `http/1.1` when the
    /// session carries HTTP, none for opaque TCP), which also tells the destination sidecar
    /// how to serve a port whose protocol was detected rather than declared.
    pub async fn connect_to(
        &self,
        service: &MeshService,
        port: u16,
        upstream: &crate::balance::Upstream,
        subset: Option<String>,
        alpn: Option<&'static [u8]>,
    ) -> Result<TlsStream<TcpStream>, UpstreamError> {
        match upstream {
            crate::balance::Upstream::Local(addr) => {
                self.dial_direct(service, port, *addr, alpn).await
            }
            crate::balance::Upstream::Remote(cluster) => {
                let gateway = self
                    .gateway
                    .ok_or_else(|| UpstreamError::NoRoute(service.key()))?;
                self.dial_via_gateway(service, port, gateway, cluster, subset, alpn)
                    .await
            }
        }
    }

    async fn dial_direct(
        &self,
        service: &MeshService,
        port: u16,
        addr: SocketAddr,
        alpn: Option<&'static [u8]>,
    ) -> Result<TlsStream<TcpStream>, UpstreamError> {
        // The endpoint is known by its address; the port called may be served elsewhere on
        // its IP (a Kubernetes service's target port).
        let target = service
            .local_endpoints
            .iter()
            .find(|e| e.address == addr)
            .map(|e| e.dial(port))
            .unwrap_or(addr);
        let tcp = self.tcp(target).await?;
        let tls = self.handshake(service, tcp, addr, alpn).await?;
        self.health.endpoint_ok(addr);
        Ok(tls)
    }

    async fn dial_via_gateway(
        &self,
        service: &MeshService,
        port: u16,
        gateway: SocketAddr,
        cluster: &str,
        subset: Option<String>,
        alpn: Option<&'static [u8]>,
    ) -> Result<TlsStream<TcpStream>, UpstreamError> {
        let mut tcp = self.tcp(gateway).await?;
        self.open_tunnel(&mut tcp, service, port, gateway, cluster, subset)
            .await?;
        self.health.cluster_ok(cluster);
        self.handshake(service, tcp, gateway, alpn).await
    }

    /// Sends the tunnel header for `service` in `cluster` and reads the gateway's answer: Ok
    /// when the tunnel is open, [`UpstreamError::Refused`] with the gateway's reason when not.
    async fn open_tunnel(
        &self,
        tcp: &mut TcpStream,
        service: &MeshService,
        port: u16,
        gateway: SocketAddr,
        cluster: &str,
        subset: Option<String>,
    ) -> Result<(), UpstreamError> {
        let request = OpenRequest {
            service: service.key(),
            port,
            subset,
            target_cluster: cluster.to_string(),
            source_cluster: self.cluster.clone(),
            trace_context: None,
        };
        let failed = |e: tunnel::TunnelError| UpstreamError::Connect {
            addr: gateway,
            reason: e.to_string(),
        };
        let answer = tokio::time::timeout(self.timeout, async {
            tunnel::write_request(tcp, &request).await?;
            tunnel::read_response(tcp).await
        })
        .await
        .map_err(|_| UpstreamError::Connect {
            addr: gateway,
            reason: "the gateway did not answer in time".into(),
        })?
        .map_err(failed)?;
        if answer.code != ReasonCode::Ok {
            return Err(UpstreamError::Refused {
                cluster: cluster.to_string(),
                code: answer.code,
                message: answer.message,
            });
        }
        Ok(())
    }

    async fn tcp(&self, addr: SocketAddr) -> Result<TcpStream, UpstreamError> {
        let tcp = tokio::time::timeout(self.timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| UpstreamError::Connect {
                addr,
                reason: "timed out".into(),
            })?
            .map_err(|e| UpstreamError::Connect {
                addr,
                reason: e.to_string(),
            })?;
        if is_self_connected(&tcp) {
            return Err(UpstreamError::Connect {
                addr,
                reason:
                    "connection refused (nothing listens there: the socket connected to itself)"
                        .into(),
            });
        }
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    async fn handshake(
        &self,
        service: &MeshService,
        tcp: TcpStream,
        addr: SocketAddr,
        alpn: Option<&'static [u8]>,
    ) -> Result<TlsStream<TcpStream>, UpstreamError> {
        let allowed: Vec<SpiffeId> = service
            .identities
            .iter()
            .filter_map(|i| i.parse().ok())
            .collect();
        let accept: isthmus_core::tls::AcceptPeer = Arc::new(move |id| allowed.contains(id));
        let config = isthmus_core::tls::client_config(
            self.identity.clone(),
            self.trust.clone(),
            accept,
            alpn.as_slice(),
        )
        .map_err(|e| UpstreamError::Connect {
            addr,
            reason: e.to_string(),
        })?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        tokio::time::timeout(
            self.timeout,
            connector.connect(isthmus_core::tls::mesh_server_name(), tcp),
        )
        .await
        .map_err(|_| UpstreamError::Connect {
            addr,
            reason: "TLS handshake timed out".into(),
        })?
        .map_err(|e| UpstreamError::Connect {
            addr,
            reason: format!("TLS handshake: {e}"),
        })
    }
}

/// Whether `tcp` is connected to itself: on one host, a connect to a port nobody listens on
/// can pick that very port as its source and complete a TCP simultaneous open with itself.
/// The port of a dead endpoint is free for exactly that, so such a connection means "down".
pub fn is_self_connected(tcp: &TcpStream) -> bool {
    matches!((tcp.local_addr(), tcp.peer_addr()), (Ok(l), Ok(p)) if l == p)
}
