//! The TLS-over-TCP transport ([`crate::Transport::TlsTcp`]): one mutual-TLS 1.3 TCP
//! connection per tunnel, to the peer gateway's address over TCP (ALPN [`crate::ALPN_TCP`]).
//!
//! It exists for networks that block UDP and as the benchmark's baseline. It is deliberately
//! simple: no multiplexing, so each tunnel pays a TCP and a TLS handshake (resumed after the
//! first, through the same session caches as QUIC), and gets the kernel's per-flow congestion
//! control and no head-of-line blocking between tunnels. The header exchange, routing,
//! metrics and relaying are the QUIC transport's, over a different stream type.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::tls;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::inbound::Inbound;
use crate::metrics::{Metrics, PeerLabels, Rejection, Role};
use crate::peers::PeerTarget;
use crate::quic;
use crate::{accept, GatewayError, Stop};

/// Accepts TLS-over-TCP tunnels from peer gateways until `stop` fires.
pub(crate) async fn serve(
    inbound: Arc<Inbound>,
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    stop: Stop,
) {
    let acceptor = TlsAcceptor::from(config);
    accept::serve_tcp(listener, stop, "inbound-tls", |tcp, from| {
        accept(inbound.clone(), acceptor.clone(), tcp, from)
    })
    .await;
}

async fn accept(inbound: Arc<Inbound>, acceptor: TlsAcceptor, tcp: TcpStream, from: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let after = inbound.connect_timeout;
    let tls = match tokio::time::timeout(after, acceptor.accept(tcp)).await {
        Err(_) => {
            let e = GatewayError::AcceptTimeout { addr: from, after };
            inbound.refused(from, Rejection::HandshakeFailed, &e.chain());
            return;
        }
        Ok(Err(source)) => {
            let e = GatewayError::TlsAccept { addr: from, source };
            inbound.refused(from, Rejection::HandshakeFailed, &e.chain());
            return;
        }
        Ok(Ok(tls)) => tls,
    };
    let Some(peer) = tls::peer_identity(tls.get_ref().1.peer_certificates()) else {
        inbound.refused(from, Rejection::UnauthorizedPeer, "no SPIFFE identity");
        return;
    };
    let cluster = inbound.peer_cluster(&peer, from);
    inbound.metrics.handshake_done(&cluster, Role::Server);
    let (recv, send) = tokio::io::split(tls);
    inbound
        .serve_stream(&peer, &cluster, from, send, recv)
        .await;
}

/// Opens one TLS-over-TCP connection to `target`'s gateway, checking that it is that
/// cluster's gateway.
pub(crate) async fn open(
    target: &PeerTarget,
    config: Arc<rustls::ClientConfig>,
    timeout: Duration,
    metrics: &Metrics,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, GatewayError> {
    let started = tokio::time::Instant::now();
    let connected = tokio::time::timeout(timeout, connect(target, config)).await;
    let result = match connected {
        Err(_) => Err(GatewayError::HandshakeTimeout {
            cluster: target.cluster.clone(),
            addr: target.addr,
            after: timeout,
        }),
        Ok(result) => result,
    };
    let labels = PeerLabels {
        peer: target.cluster.clone(),
    };
    match &result {
        Ok(_) => metrics.handshake_took(&target.cluster, started.elapsed().as_secs_f64()),
        Err(_) => {
            metrics.connect_failures.get_or_create(&labels).inc();
        }
    }
    result
}

async fn connect(
    target: &PeerTarget,
    config: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, GatewayError> {
    let failed = |source| GatewayError::TlsConnect {
        cluster: target.cluster.clone(),
        addr: target.addr,
        source,
    };
    let tcp = TcpStream::connect(target.addr).await.map_err(failed)?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(quic::server_name(&target.cluster))
        .map_err(|e| failed(std::io::Error::other(e)))?;
    let tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(failed)?;
    let peer = tls::peer_identity(tls.get_ref().1.peer_certificates());
    let expected = peer.as_ref().is_some_and(|id| {
        id.is_gateway() && id.trust_domain().eq_ignore_ascii_case(&target.trust_domain)
    });
    if !expected {
        return Err(GatewayError::WrongPeer {
            cluster: target.cluster.clone(),
            addr: target.addr,
            trust_domain: target.trust_domain.clone(),
            found: peer.map_or_else(|| "no SPIFFE identity".to_string(), |id| id.to_string()),
        });
    }
    Ok(tls)
}
