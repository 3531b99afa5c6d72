//! The outbound role: local sidecars connect over TCP, say which remote service they want,
//! and get their connection carried to the target cluster's gateway: as one stream of the
//! pooled QUIC connection, or (with [`Transport::TlsTcp`]) as one TLS-over-TCP connection.
//!
//! Per connection, in order: read the [`OpenRequest`]; find the target cluster's gateway in
//! the current configuration; get the pooled connection (connecting if needed); open a
//! stream, send the request stamped with this cluster as the source; relay the remote
//! gateway's [`OpenResponse`] to the sidecar; on Ok, relay bytes until both sides are done.
//! Any failure to reach the peer is answered `Unreachable` at once, so the sidecar can fail
//! over instead of waiting.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::tunnel::{self, OpenRequest, OpenResponse, ReasonCode};
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn, Instrument};

use crate::header::reject_bad_header;
use crate::log_limit::LogLimiter;
use crate::metrics::{Direction, Metrics, Rejection, Source, UNKNOWN_PEER};
use crate::peers::{PeerTarget, Peers};
use crate::relay::{relay_and_log, PeerRead, PeerWrite};
use crate::{accept, tls_only, tls_tcp, GatewayError, Stop, Transport};

/// [`tls_only::PREFIX_LEN`] as the byte counters count.
const PREFIX_LEN_U64: u64 = tls_only::PREFIX_LEN as u64;

pub(crate) struct Outbound {
    pub cluster: String,
    pub peers: Arc<Peers>,
    pub connect_timeout: Duration,
    pub transport: Transport,
    pub tls_client: Arc<rustls::ClientConfig>,
    pub metrics: Arc<Metrics>,
    pub log: Arc<LogLimiter>,
}

impl Outbound {
    /// Accepts sidecar connections until `stop` fires; each is served by a task owned by this
    /// loop, and all of them have ended when it returns (the listener is closed with it).
    pub(crate) async fn run(self: Arc<Self>, listener: TcpListener, stop: Stop) {
        accept::serve_tcp(listener, stop, "outbound", |tcp, from| {
            let this = self.clone();
            async move { this.serve(tcp, from).await }
        })
        .await;
    }

    async fn serve(&self, mut tcp: TcpStream, from: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        let req = match tokio::time::timeout(self.connect_timeout, tunnel::read_request(&mut tcp))
            .await
        {
            Err(_) => {
                let e = GatewayError::ReadRequestTimeout {
                    after: self.connect_timeout,
                };
                debug!(error = %e.chain(), "closing a silent local connection");
                return;
            }
            Ok(Err(e)) => {
                let who = from.ip().to_string();
                reject_bad_header(&mut tcp, e, &self.metrics, &self.log, Source::Local, &who).await;
                return;
            }
            Ok(Ok(req)) => req,
        };
        let span = tracing::info_span!("tunnel", service = %req.service, port = req.port,
            target = %req.target_cluster);
        self.carry(tcp, req).instrument(span).await
    }

    /// Opens the tunnel to the remote gateway, answers the sidecar, and relays on success.
    async fn carry(&self, mut tcp: TcpStream, mut req: OpenRequest) {
        let target = match self.target(&req) {
            Ok(target) => target,
            Err(response) => {
                self.answer(&mut tcp, UNKNOWN_PEER, response).await;
                return;
            }
        };
        if !req.source_cluster.is_empty() && req.source_cluster != self.cluster {
            debug!(claimed = %req.source_cluster, "replacing the sidecar's source cluster");
        }
        req.source_cluster = self.cluster.clone();
        let peer = target.cluster.as_str();
        match self.transport {
            Transport::Quic => match self.open_quic(&target).await {
                Ok((send, recv)) => self.exchange(tcp, peer, &req, send, recv).await,
                Err(response) => self.answer(&mut tcp, peer, response).await,
            },
            Transport::TlsTcp => {
                let opened = tls_tcp::open(
                    &target,
                    self.tls_client.clone(),
                    self.connect_timeout,
                    &self.metrics,
                )
                .await;
                match opened {
                    Ok(tls) => {
                        let (recv, send) = tokio::io::split(tls);
                        self.exchange(tcp, peer, &req, send, recv).await
                    }
                    Err(e) => {
                        let response = refuse(ReasonCode::Unreachable, e.chain());
                        self.answer(&mut tcp, peer, response).await
                    }
                }
            }
        }
    }

    /// Sends the request on a fresh peer stream, relays the remote answer to the sidecar, and
    /// on Ok relays bytes until both sides are done.
    async fn exchange<W, R>(
        &self,
        mut tcp: TcpStream,
        peer: &str,
        req: &OpenRequest,
        mut send: W,
        mut recv: R,
    ) where
        W: AsyncWrite + PeerWrite + Unpin,
        R: AsyncRead + PeerRead + Unpin,
    {
        let response = match self.request(req, &mut send, &mut recv).await {
            Ok(response) => response,
            Err(e) => {
                send.abort();
                recv.abort();
                let response = refuse(ReasonCode::Unreachable, e.chain());
                self.answer(&mut tcp, peer, response).await;
                return;
            }
        };
        if !response.is_ok() {
            info!(code = %response.code, message = %response.message, "remote gateway refused");
            self.answer(&mut tcp, peer, response).await;
            return;
        }
        self.metrics
            .stream_answered(peer, Direction::Outbound, ReasonCode::Ok);
        if let Err(e) = tunnel::write_response(&mut tcp, &response).await {
            debug!(error = %GatewayError::WriteResponse(e).chain(), "sidecar went away");
            send.abort();
            recv.abort();
            return;
        }
        // Only TLS crosses clusters: nothing is forwarded until the caller's first bytes are
        // a ClientHello. Refused, the caller's connection is reset and the peer stream
        // aborted (the Ok above was the remote's; nothing reached the endpoint).
        let prefix = match tls_only::read_client_hello(&mut tcp, self.connect_timeout).await {
            Ok(prefix) => prefix,
            Err(tls_only::NoClientHello::Ended(reason)) => {
                debug!(%reason, "tunnel ended before it carried anything");
                send.abort();
                recv.abort();
                return;
            }
            Err(tls_only::NoClientHello::NotTls(reason)) => {
                self.metrics.reject(Source::Local, Rejection::NotTls);
                let who = tcp
                    .peer_addr()
                    .map_or_else(|_| "?".into(), |a| a.ip().to_string());
                if let Some(suppressed) = self.log.admit(&format!("not_tls {who}")) {
                    warn!(from = %who, %reason, suppressed, "refusing a tunnel that is not TLS");
                }
                send.abort_not_tls();
                recv.abort();
                // Closed with a reset, so the caller sees a refusal rather than an end of stream.
                let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                return;
            }
        };
        debug!("tunnel open");
        let _open = self.metrics.open_stream(peer, Direction::Outbound);
        let counters = self.metrics.byte_counters(peer);
        if let Err(e) = send
            .write_bytes(bytes::Bytes::copy_from_slice(&prefix))
            .await
        {
            debug!(error = %e, "peer stream closed before the ClientHello");
            recv.abort();
            return;
        }
        counters.sent.inc_by(PREFIX_LEN_U64);
        relay_and_log(tcp, send, recv, &counters).await;
    }

    /// Writes the request and waits for the remote gateway's response.
    async fn request<W, R>(
        &self,
        req: &OpenRequest,
        send: &mut W,
        recv: &mut R,
    ) -> Result<OpenResponse, GatewayError>
    where
        W: AsyncWrite + Unpin,
        R: AsyncRead + Unpin,
    {
        tunnel::write_request(send, req)
            .await
            .map_err(GatewayError::WriteRequest)?;
        // The remote gateway may spend up to its own connect timeout dialling an endpoint.
        let wait = self.connect_timeout * 2;
        match tokio::time::timeout(wait, tunnel::read_response(recv)).await {
            Err(_) => Err(GatewayError::ReadResponseTimeout { after: wait }),
            Ok(Err(e)) => Err(GatewayError::ReadResponse(e)),
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// Answers the sidecar with a refusal and closes.
    async fn answer(&self, tcp: &mut TcpStream, peer: &str, response: OpenResponse) {
        self.metrics
            .stream_answered(peer, Direction::Outbound, response.code);
        if tunnel::write_response(tcp, &response).await.is_ok() {
            let _ = tcp.shutdown().await;
        }
    }

    /// The peer gateway for `req`, or the refusal to send the sidecar.
    fn target(&self, req: &OpenRequest) -> Result<PeerTarget, OpenResponse> {
        if req.target_cluster == self.cluster {
            return Err(refuse(
                ReasonCode::BadRequest,
                format!(
                    "cluster {} is this gateway's own cluster; connect to the service directly",
                    self.cluster
                ),
            ));
        }
        self.peers
            .target(&req.target_cluster)
            .map_err(|reason| refuse(ReasonCode::Unreachable, reason))
    }

    /// Opens a stream on the pooled connection. A pooled connection can die between uses
    /// without the pool noticing yet; opening on it then fails at once, and the pool is asked
    /// once more (it then fails fast or hands out a newer connection).
    async fn open_quic(
        &self,
        target: &PeerTarget,
    ) -> Result<(SendStream, RecvStream), OpenResponse> {
        let mut retried = false;
        loop {
            let conn = self
                .peers
                .connection(target)
                .await
                .map_err(|e| refuse(ReasonCode::Unreachable, e.chain()))?;
            match tokio::time::timeout(self.connect_timeout, conn.open_bi()).await {
                Err(_) => {
                    let e = GatewayError::OpenStreamTimeout {
                        cluster: target.cluster.clone(),
                        after: self.connect_timeout,
                    };
                    return Err(refuse(ReasonCode::Overloaded, e.chain()));
                }
                Ok(Ok(streams)) => return Ok(streams),
                Ok(Err(source)) if retried => {
                    let e = GatewayError::OpenStream {
                        cluster: target.cluster.clone(),
                        source,
                    };
                    return Err(refuse(ReasonCode::Unreachable, e.chain()));
                }
                Ok(Err(source)) => {
                    debug!(error = %source, "pooled connection is dead; asking the pool again");
                    retried = true;
                }
            }
        }
    }
}

fn refuse(code: ReasonCode, message: String) -> OpenResponse {
    warn!(%code, %message, "refusing a tunnel");
    OpenResponse::new(code, message)
}
