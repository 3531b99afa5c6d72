//! Reaching a service: choosing where a connection goes and opening the mTLS session.
//!
//! Local-first: a healthy local endpoint (round robin) is dialled directly; when none answers,
//! each remote cluster exporting the service is tried in order through the local gateway,
//! which answers with a reason code at once when it cannot serve, so the next cluster is
//! tried without waiting for a timeout. The server's SPIFFE ID must be one of the service's
//! identities; the gateway's is never involved.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::MeshService;
use isthmus_core::tls::{Identity, TrustBundles};
use isthmus_core::tunnel::{self, OpenRequest, ReasonCode};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Why no connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("service {0} has no healthy endpoint in this cluster and no reachable remote export")]
    NoRoute(String),
    #[error("connecting to {addr} failed: {reason}")]
    Connect { addr: SocketAddr, reason: String },
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
    next: AtomicUsize,
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
            next: AtomicUsize::new(0),
        }
    }

    /// Opens an mTLS session to `service` on `port`, local endpoints first.
    pub async fn connect(
        &self,
        service: &MeshService,
        port: u16,
    ) -> Result<(TlsStream<TcpStream>, Route), UpstreamError> {
        let healthy: Vec<_> = service
            .local_endpoints
            .iter()
            .filter(|e| e.healthy)
            .collect();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last_error = None;
        for i in 0..healthy.len() {
            let endpoint = healthy[(start + i) % healthy.len()];
            match self.dial_direct(service, endpoint.address).await {
                Ok(tls) => return Ok((tls, Route::Local(endpoint.address))),
                Err(e) => {
                    tracing::debug!(endpoint = %endpoint.address, error = %e, "local endpoint failed");
                    last_error = Some(e);
                }
            }
        }
        if let Some(gateway) = self.gateway {
            for remote in service.remote.iter().filter(|r| r.healthy_endpoints > 0) {
                match self
                    .dial_via_gateway(service, port, gateway, &remote.cluster, None)
                    .await
                {
                    Ok(tls) => return Ok((tls, Route::Remote(remote.cluster.clone()))),
                    Err(e) => {
                        tracing::debug!(cluster = %remote.cluster, error = %e, "remote cluster failed");
                        last_error = Some(e);
                    }
                }
            }
        }
        Err(last_error.unwrap_or_else(|| UpstreamError::NoRoute(service.key())))
    }

    /// Opens an mTLS session to one chosen upstream of `service`: a local endpoint directly,
    /// or a remote cluster through the gateway (with `subset`, `k=v[,k=v]`, for its endpoint
    /// choice).
    pub async fn connect_to(
        &self,
        service: &MeshService,
        port: u16,
        upstream: &crate::balance::Upstream,
        subset: Option<String>,
    ) -> Result<TlsStream<TcpStream>, UpstreamError> {
        match upstream {
            crate::balance::Upstream::Local(addr) => self.dial_direct(service, *addr).await,
            crate::balance::Upstream::Remote(cluster) => {
                let gateway = self
                    .gateway
                    .ok_or_else(|| UpstreamError::NoRoute(service.key()))?;
                self.dial_via_gateway(service, port, gateway, cluster, subset)
                    .await
            }
        }
    }

    async fn dial_direct(
        &self,
        service: &MeshService,
        addr: SocketAddr,
    ) -> Result<TlsStream<TcpStream>, UpstreamError> {
        let tcp = self.tcp(addr).await?;
        self.handshake(service, tcp, addr).await
    }

    async fn dial_via_gateway(
        &self,
        service: &MeshService,
        port: u16,
        gateway: SocketAddr,
        cluster: &str,
        subset: Option<String>,
    ) -> Result<TlsStream<TcpStream>, UpstreamError> {
        let mut tcp = self.tcp(gateway).await?;
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
            tunnel::write_request(&mut tcp, &request).await?;
            tunnel::read_response(&mut tcp).await
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
        self.handshake(service, tcp, gateway).await
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
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    async fn handshake(
        &self,
        service: &MeshService,
        tcp: TcpStream,
        addr: SocketAddr,
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
            &[],
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
