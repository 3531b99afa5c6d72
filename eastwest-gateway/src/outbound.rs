//! The outbound role: local sidecars connect over TCP, say which remote service they want,
//! and get their connection carried as one stream of the pooled QUIC connection to the
//! target cluster's gateway.
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

use isthmus_core::mesh::MeshConfig;
use isthmus_core::tunnel::{self, OpenRequest, OpenResponse, ReasonCode, TunnelError};
use quinn::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::peers::{PeerTarget, Peers};
use crate::relay::relay;
use crate::{log_panic, GatewayError, Stop};

pub(crate) struct Outbound {
    pub cluster: String,
    pub config: watch::Receiver<Arc<MeshConfig>>,
    pub peers: Arc<Peers>,
    pub connect_timeout: Duration,
}

/// An established tunnel to a remote gateway, waiting for payload.
struct Opened {
    response: OpenResponse,
    send: SendStream,
    recv: RecvStream,
}

impl Outbound {
    /// Accepts sidecar connections until `stop` fires; each is served by a task owned by this
    /// loop, and all of them have ended when it returns (the listener is closed with it).
    pub(crate) async fn run(self: Arc<Self>, listener: TcpListener, mut stop: Stop) {
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                _ = stop.fired() => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, from)) => {
                        let this = self.clone();
                        let span = tracing::info_span!("outbound", %from);
                        tasks.spawn(async move { this.serve(tcp).await }.instrument(span));
                    }
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        warn!(error = %e, "accepting a local connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(done) = tasks.join_next(), if !tasks.is_empty() => log_panic(done),
            }
        }
        drop(listener);
        tasks.shutdown().await;
        debug!("outbound role stopped");
    }

    async fn serve(&self, mut tcp: TcpStream) {
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
                reject_bad_header(&mut tcp, e).await;
                return;
            }
            Ok(Ok(req)) => req,
        };
        let span = tracing::info_span!("tunnel", service = %req.service, port = req.port,
            target = %req.target_cluster);
        async move {
            match self.open(req).await {
                Ok(opened) => {
                    if let Err(e) = tunnel::write_response(&mut tcp, &opened.response).await {
                        debug!(error = %GatewayError::WriteResponse(e).chain(), "sidecar went away");
                        return;
                    }
                    match relay(tcp, opened.send, opened.recv).await {
                        Ok(carried) => debug!(up = carried.tcp_to_quic,
                            down = carried.quic_to_tcp, "tunnel closed"),
                        Err(e) => debug!(error = %GatewayError::Relay(e).chain(), "tunnel aborted"),
                    }
                }
                Err(response) => {
                    if tunnel::write_response(&mut tcp, &response).await.is_ok() {
                        let _ = tcp.shutdown().await;
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Opens the tunnel to the remote gateway. `Err` carries the response for the sidecar:
    /// the remote gateway's refusal, or this gateway's own reason.
    async fn open(&self, mut req: OpenRequest) -> Result<Opened, OpenResponse> {
        if req.target_cluster == self.cluster {
            return Err(refuse(
                ReasonCode::BadRequest,
                format!(
                    "cluster {} is this gateway's own cluster; connect to the service directly",
                    self.cluster
                ),
            ));
        }
        let target = self.target(&req.target_cluster)?;
        if !req.source_cluster.is_empty() && req.source_cluster != self.cluster {
            debug!(claimed = %req.source_cluster, "replacing the sidecar's source cluster");
        }
        req.source_cluster = self.cluster.clone();
        let (mut send, mut recv) = self.open_stream(&target).await.map_err(|e| {
            let code = match e {
                GatewayError::OpenStreamTimeout { .. } => ReasonCode::Overloaded,
                _ => ReasonCode::Unreachable,
            };
            refuse(code, e.chain())
        })?;
        tunnel::write_request(&mut send, &req).await.map_err(|e| {
            refuse(
                ReasonCode::Unreachable,
                GatewayError::WriteRequest(e).chain(),
            )
        })?;
        // The remote gateway may spend up to its own connect timeout dialling an endpoint.
        let wait = self.connect_timeout * 2;
        let response = match tokio::time::timeout(wait, tunnel::read_response(&mut recv)).await {
            Err(_) => GatewayError::ReadResponseTimeout { after: wait },
            Ok(Err(e)) => GatewayError::ReadResponse(e),
            Ok(Ok(response)) => {
                if response.is_ok() {
                    info!("tunnel open");
                    return Ok(Opened {
                        response,
                        send,
                        recv,
                    });
                }
                info!(code = %response.code, message = %response.message, "remote gateway refused");
                return Err(response);
            }
        };
        let _ = send.reset(crate::quic::codes::STREAM_ABORTED);
        Err(refuse(ReasonCode::Unreachable, response.chain()))
    }

    /// The gateway address and trust domain of `cluster`, from the current configuration.
    fn target(&self, cluster: &str) -> Result<PeerTarget, OpenResponse> {
        let config = self.config.borrow().clone();
        let info = config.cluster_info(cluster).ok_or_else(|| {
            refuse(
                ReasonCode::Unreachable,
                format!("cluster {cluster} is not a member of the mesh"),
            )
        })?;
        let addr: SocketAddr = info.gateway.ok_or_else(|| {
            refuse(
                ReasonCode::Unreachable,
                format!("cluster {cluster} has no known gateway"),
            )
        })?;
        Ok(PeerTarget {
            cluster: cluster.to_string(),
            addr,
            trust_domain: info.trust_domain.clone(),
        })
    }

    /// Opens a stream on the pooled connection. A pooled connection can die between uses
    /// without us noticing yet; opening on it then fails at once, and one fresh connection is
    /// tried before giving up.
    async fn open_stream(
        &self,
        target: &PeerTarget,
    ) -> Result<(SendStream, RecvStream), GatewayError> {
        let mut retried = false;
        loop {
            let conn = self.peers.connection(target).await?;
            match tokio::time::timeout(self.connect_timeout, conn.open_bi()).await {
                Err(_) => {
                    return Err(GatewayError::OpenStreamTimeout {
                        cluster: target.cluster.clone(),
                        after: self.connect_timeout,
                    })
                }
                Ok(Ok(streams)) => return Ok(streams),
                Ok(Err(source)) if retried => {
                    return Err(GatewayError::OpenStream {
                        cluster: target.cluster.clone(),
                        source,
                    })
                }
                Ok(Err(source)) => {
                    debug!(error = %source, "pooled connection is dead; reconnecting once");
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

/// Answers a malformed header with `BadRequest` (when the sidecar can still hear it) and logs.
pub(crate) async fn reject_bad_header<W>(w: &mut W, e: TunnelError)
where
    W: tokio::io::AsyncWrite + Unpin,
{
    match e {
        TunnelError::Read(_) | TunnelError::UnexpectedEof { .. } => {
            debug!(error = %GatewayError::ReadRequest(e).chain(), "connection ended before its request");
        }
        e => {
            let e = GatewayError::ReadRequest(e);
            warn!(error = %e.chain(), "rejecting a malformed open request");
            let response = OpenResponse::new(ReasonCode::BadRequest, e.chain());
            if tunnel::write_response(w, &response).await.is_ok() {
                let _ = w.shutdown().await;
            }
        }
    }
}
