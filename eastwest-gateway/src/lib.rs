//! isthmus-gateway: the east-west gateway, which carries local sidecars' connections to other
//! clusters over QUIC and delivers other clusters' connections to local endpoints.
//!
//! One gateway runs per cluster, or several replicas behind one address ([`start_replica`],
//! `replica.rs`). It has two roles on one QUIC endpoint:
//!
//! - **Outbound** (`outbound.rs`): local sidecars connect over TCP to
//!   [`GatewayOptions::local_listen`] and send an [`OpenRequest`]. The gateway carries the
//!   connection as one bidirectional stream of a long-lived QUIC connection to the target
//!   cluster's gateway (`peers.rs`: one connection per pair of gateways, whichever side
//!   dialled it, reconnected with backoff when it dies), relays the remote [`OpenResponse`],
//!   then relays raw bytes both ways.
//! - **Inbound** (`inbound.rs`): peer gateways connect to
//!   [`GatewayOptions::quic_listen`] and open streams; each request is checked against the
//!   current [`MeshConfig`] (service exported, healthy endpoints) and joined to the
//!   least-loaded healthy local endpoint, the destination sidecar's mTLS listener.
//!
//! Gateway-to-gateway QUIC is mutual TLS 1.3 with gateway SPIFFE identities of member trust
//! domains only (ALPN [`ALPN`]); the peer's cluster is the member whose trust domain matches
//! its certificate. Keep-alives ([`GatewayOptions::keep_alive`]) and the idle timeout
//! ([`GatewayOptions::idle_timeout`]) make a dead peer noticed within about a second, which
//! ends its tunnels and lets callers fail over. The payload is the workloads' own mTLS: the
//! gateway never decrypts it, and never sees workload plaintext.
//!
//! Tasks, all ended by [`GatewayHandle::shutdown`] (or by dropping the handle):
//! - the outbound accept loop, and one task per sidecar connection;
//! - the inbound accept loop, one task per peer gateway connection, and one per stream;
//! - with [`Transport::TlsTcp`], the TLS-over-TCP accept loop and one task per connection;
//! - the pool's watcher (drops connections to clusters that left, samples round-trip times),
//!   one loss watcher per pooled connection and a reconnect task per peer that is down.
//!
//! Bad input (garbage datagrams on the QUIC port, failed handshakes and unauthorized
//! certificates, malformed or unknown-version headers) is refused, counted in [`Metrics`] and
//! logged at most once per peer and interval. The design, with limits and the metrics list, is
//! in `docs/gateway.md`.
//!
//! Tunnel refusals use the reason codes of [`isthmus_core::tunnel::ReasonCode`], so callers
//! can retry elsewhere at once instead of waiting for a timeout.
//!
//! [`daemon::Daemon`] is the `isthmus gateway` daemon: [`config`] read from its file, attached
//! to its control plane for its identity and the config stream, plus its admin server.

// Code that ships: no unwrap on what input or the network can make fail, no silent lossy
// casts (see [workspace.lints] in the root Cargo.toml).
#![warn(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::mesh::MeshConfig;
use isthmus_core::tls::{Identity, TrustBundles};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

mod accept;
pub mod config;
pub mod daemon;
mod endpoints;
mod error;
mod header;
mod inbound;
mod log_limit;
pub mod metrics;
mod outbound;
mod peers;
mod quic;
mod relay;
mod replica;
mod tls_only;
mod tls_tcp;
mod udp_screen;

pub use error::GatewayError;
pub use isthmus_core::tunnel::{OpenRequest, OpenResponse, ReasonCode};
pub use metrics::Metrics;
pub use quic::{ALPN, ALPN_TCP};
pub use replica::{ReplicaSet, SECRET_LEN};

/// The default UDP port for QUIC between gateways.
pub const DEFAULT_QUIC_PORT: u16 = 15443;
/// The default TCP port for local sidecars' connections bound for other clusters.
pub const DEFAULT_LOCAL_PORT: u16 = 15444;
/// The default keep-alive interval between gateways.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_millis(250);
/// The default idle timeout: a peer silent this long is dead.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// The default bound on a QUIC handshake, an endpoint dial, and a header exchange.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How gateways carry tunnels to each other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// One long-lived QUIC connection per pair of gateways, one stream per tunnel (UDP on
    /// `quic_listen`). The default.
    #[default]
    Quic,
    /// One mutual-TLS 1.3 TCP connection per tunnel (TCP on the `quic_listen` address), for
    /// networks that block UDP and as the benchmark's baseline. Both gateways of a pair must
    /// use it; a gateway with this transport also still accepts QUIC.
    TlsTcp,
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "quic" => Ok(Transport::Quic),
            "tls-tcp" => Ok(Transport::TlsTcp),
            other => Err(format!(
                "unknown transport {other:?} (expected quic or tls-tcp)"
            )),
        }
    }
}

/// What a gateway needs to start.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// This gateway's cluster name.
    pub cluster: String,
    /// UDP address for QUIC between gateways; port 0 picks one.
    pub quic_listen: SocketAddr,
    /// TCP address local sidecars connect to; port 0 picks one.
    pub local_listen: SocketAddr,
    /// This cluster's gateway SPIFFE identity (`.../ns/isthmus-system/sa/eastwest-gateway`).
    pub identity: Arc<Identity>,
    /// Every member's trust bundle, kept up to date by the caller.
    pub trust: Arc<TrustBundles>,
    /// How often to ping an otherwise idle peer connection.
    pub keep_alive: Duration,
    /// How long a silent peer connection lives; must exceed `keep_alive`.
    pub idle_timeout: Duration,
    /// Bound on a QUIC handshake, on dialling a local endpoint, and on waiting for a tunnel
    /// header (the remote gateway's response may take twice this).
    pub connect_timeout: Duration,
    /// How tunnels travel to other gateways.
    pub transport: Transport,
}

impl GatewayOptions {
    /// Options with the default ports (all interfaces) and timeouts.
    pub fn new(
        cluster: impl Into<String>,
        identity: Arc<Identity>,
        trust: Arc<TrustBundles>,
    ) -> Self {
        GatewayOptions {
            cluster: cluster.into(),
            quic_listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_QUIC_PORT)),
            local_listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_LOCAL_PORT)),
            identity,
            trust,
            keep_alive: DEFAULT_KEEP_ALIVE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            transport: Transport::Quic,
        }
    }

    fn validate(&self) -> Result<(), GatewayError> {
        let invalid = |field, reason: String| Err(GatewayError::InvalidOptions { field, reason });
        if self.cluster.is_empty() {
            return invalid("cluster", "must not be empty".into());
        }
        if !self.identity.id().is_gateway() {
            return invalid(
                "identity",
                format!("{} is not a gateway identity", self.identity.id()),
            );
        }
        if self.keep_alive.is_zero() || self.keep_alive >= self.idle_timeout {
            return invalid(
                "keep_alive",
                format!(
                    "{:?} must be above zero and below the idle timeout ({:?})",
                    self.keep_alive, self.idle_timeout
                ),
            );
        }
        if self.connect_timeout.is_zero() {
            return invalid("connect_timeout", "must be above zero".into());
        }
        Ok(())
    }
}

/// A running gateway. [`GatewayHandle::shutdown`] stops it and waits until every task has
/// ended and both ports are released; dropping the handle stops it without waiting.
#[derive(Debug)]
pub struct GatewayHandle {
    cluster: String,
    quic_addr: SocketAddr,
    local_addr: SocketAddr,
    idle_timeout: Duration,
    /// Started with [`start_replica`]: the ports are shared with siblings.
    shared: bool,
    metrics: Arc<Metrics>,
    /// The pool of connections to peer gateways (weak: the pool holds the dialling endpoint,
    /// whose port must be released once the gateway has shut down).
    peers: std::sync::Weak<peers::Peers>,
    /// The listening endpoint, then (replicas only) the dialling one; empty once shut down.
    endpoints: Vec<quinn::Endpoint>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// The signal that tells every long-running task to wind down. It also fires when the
/// [`GatewayHandle`] (which holds the sender) is dropped.
#[derive(Debug, Clone)]
pub(crate) struct Stop(watch::Receiver<bool>);

impl Stop {
    /// Resolves once the gateway is stopping.
    pub(crate) async fn fired(&mut self) {
        let _ = self.0.wait_for(|stopping| *stopping).await;
    }
}

/// Logs a task that ended in a panic (a bug: input and network failures never panic).
pub(crate) fn log_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!(error = %e, "a gateway task panicked");
        }
    }
}

/// Starts a gateway: binds the QUIC endpoint and the local listener, then runs the roles until
/// shutdown. `config` is the cluster's current mesh configuration; every decision reads the
/// latest value, and the gateway keeps its last view if the sender goes away.
///
/// The gateway owns its ports; a second gateway on the same addresses fails to bind. To run
/// several replicas behind one address, use [`start_replica`].
pub async fn start(
    opts: GatewayOptions,
    config: watch::Receiver<Arc<MeshConfig>>,
) -> Result<GatewayHandle, GatewayError> {
    start_with(opts, None, config).await
}

/// Starts one replica of a cluster's gateway: like [`start`], but the QUIC port (and the
/// TLS-over-TCP port) and the local port are shared with the other replicas started with the
/// same [`ReplicaSet`] on the same addresses, and the replicas' shared keys let a survivor
/// reset a dead replica's connections so its peers reconnect at once (see
/// [`ReplicaSet`]). The first replica may bind port 0; the others bind the ports it got.
pub async fn start_replica(
    opts: GatewayOptions,
    replicas: &ReplicaSet,
    config: watch::Receiver<Arc<MeshConfig>>,
) -> Result<GatewayHandle, GatewayError> {
    start_with(opts, Some(replicas), config).await
}

async fn start_with(
    opts: GatewayOptions,
    replicas: Option<&ReplicaSet>,
    config: watch::Receiver<Arc<MeshConfig>>,
) -> Result<GatewayHandle, GatewayError> {
    opts.validate()?;
    let shared = replicas.is_some();
    // A lone gateway still keys its resets and connection IDs, with a secret of its own.
    let replicas = replicas.cloned().unwrap_or_else(ReplicaSet::generate);
    let metrics = Arc::new(Metrics::default());
    let log = Arc::new(log_limit::LogLimiter::new(log_limit::LOG_INTERVAL));
    let tls = quic::TlsConfigs::new(&opts, &metrics)?;
    let (udp, tls_listener) = bind_peer_sockets(&opts, shared)?;
    let listen = quic::endpoint(
        &opts,
        udp,
        &tls,
        &replicas,
        true,
        metrics.clone(),
        log.clone(),
    )?;
    let mut opened = vec![listen.clone()];
    let close_all = |opened: &[quinn::Endpoint]| {
        for e in opened {
            e.close(quic::codes::SHUTDOWN, b"start-up failed");
        }
    };
    let quic_addr = match listen.local_addr() {
        Ok(addr) => addr,
        Err(source) => {
            close_all(&opened);
            return Err(GatewayError::BindQuic {
                addr: opts.quic_listen,
                source,
            });
        }
    };
    let bound = async {
        // Replicas dial from a port of their own; see `replica.rs`.
        let dial = if shared {
            let addr = SocketAddr::new(quic_addr.ip(), 0);
            let udp = replica::bind_udp(addr, false)
                .map_err(|source| GatewayError::BindQuic { addr, source })?;
            quic::endpoint(
                &opts,
                udp,
                &tls,
                &replicas,
                false,
                metrics.clone(),
                log.clone(),
            )?
        } else {
            listen.clone()
        };
        let local_error = |source| GatewayError::BindLocal {
            addr: opts.local_listen,
            source,
        };
        let listener = replica::bind_tcp(opts.local_listen, shared)
            .and_then(TcpListener::from_std)
            .map_err(local_error)?;
        let local_addr = listener.local_addr().map_err(local_error)?;
        let tls_listener = match tls_listener {
            None => None,
            Some(l) => {
                Some(
                    TcpListener::from_std(l).map_err(|source| GatewayError::BindTlsTcp {
                        addr: quic_addr,
                        source,
                    })?,
                )
            }
        };
        Ok::<_, GatewayError>((dial, listener, local_addr, tls_listener))
    }
    .await;
    let (dial, listener, local_addr, tls_listener) = match bound {
        Ok(bound) => bound,
        Err(e) => {
            close_all(&opened);
            return Err(e);
        }
    };
    if shared {
        opened.push(dial.clone());
    }

    let (stop, stop_rx) = watch::channel(false);
    let (serve_tx, serve_rx) = tokio::sync::mpsc::unbounded_channel();
    let peers = Arc::new(peers::Peers::new(
        opts.cluster.clone(),
        opts.transport == Transport::Quic,
        dial,
        config.clone(),
        opts.trust.clone(),
        opts.connect_timeout,
        metrics.clone(),
        serve_tx,
        Stop(stop_rx.clone()),
    ));
    let outbound = Arc::new(outbound::Outbound {
        cluster: opts.cluster.clone(),
        peers: peers.clone(),
        connect_timeout: opts.connect_timeout,
        transport: opts.transport,
        tls_client: tls.tcp_client.clone(),
        metrics: metrics.clone(),
        log: log.clone(),
    });
    let inbound = Arc::new(inbound::Inbound {
        cluster: opts.cluster.clone(),
        config: config.clone(),
        balancer: endpoints::Balancer::new(),
        connect_timeout: opts.connect_timeout,
        peers: peers.clone(),
        metrics: metrics.clone(),
        log,
    });
    let mut tasks = vec![
        tokio::spawn(outbound.run(listener, Stop(stop_rx.clone()))),
        tokio::spawn(peers.clone().watch(Stop(stop_rx.clone()))),
    ];
    if let Some(tls_listener) = tls_listener {
        tasks.push(tokio::spawn(tls_tcp::serve(
            inbound.clone(),
            tls_listener,
            tls.tcp_server.clone(),
            Stop(stop_rx.clone()),
        )));
    }
    tasks.push(tokio::spawn(inbound.run(listen, serve_rx, Stop(stop_rx))));
    info!(
        cluster = %opts.cluster,
        identity = %opts.identity.id(),
        quic = %quic_addr,
        local = %local_addr,
        replica = shared,
        transport = ?opts.transport,
        keep_alive = ?opts.keep_alive,
        idle_timeout = ?opts.idle_timeout,
        connect_timeout = ?opts.connect_timeout,
        stream_receive_window = quic::STREAM_RECEIVE_WINDOW,
        receive_window = quic::RECEIVE_WINDOW,
        send_window = quic::SEND_WINDOW,
        trust_domains = ?opts.trust.trust_domains(),
        "east-west gateway started"
    );
    Ok(GatewayHandle {
        cluster: opts.cluster,
        quic_addr,
        local_addr,
        idle_timeout: opts.idle_timeout,
        shared,
        metrics,
        peers: Arc::downgrade(&peers),
        endpoints: opened,
        stop,
        tasks,
    })
}

/// Binds the UDP socket for QUIC and, with [`Transport::TlsTcp`], a TCP listener on the same
/// address and port (`shared`: ports replicas can share). With port 0 the TCP port is picked
/// first and UDP follows it; a port already taken over UDP is retried a few times with another.
fn bind_peer_sockets(
    opts: &GatewayOptions,
    shared: bool,
) -> Result<(std::net::UdpSocket, Option<std::net::TcpListener>), GatewayError> {
    let udp_error = |source| GatewayError::BindQuic {
        addr: opts.quic_listen,
        source,
    };
    let tcp_error = |source| GatewayError::BindTlsTcp {
        addr: opts.quic_listen,
        source,
    };
    if opts.transport == Transport::Quic {
        let udp = replica::bind_udp(opts.quic_listen, shared).map_err(udp_error)?;
        return Ok((udp, None));
    }
    let mut attempts = 0;
    loop {
        attempts += 1;
        let tcp = replica::bind_tcp(opts.quic_listen, shared).map_err(tcp_error)?;
        let addr = tcp.local_addr().map_err(tcp_error)?;
        match replica::bind_udp(addr, shared) {
            Ok(udp) => return Ok((udp, Some(tcp))),
            Err(e) if opts.quic_listen.port() == 0 && attempts < 16 => {
                tracing::debug!(%addr, error = %e, "udp port taken; picking another");
            }
            Err(e) => return Err(udp_error(e)),
        }
    }
}

impl GatewayHandle {
    /// The cluster this gateway serves.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The bound UDP address for QUIC from other gateways (publish this as the cluster's
    /// gateway address).
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// The bound TCP address for local sidecars.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// This gateway's metrics; [`Metrics::register`] them with the admin server's registry.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The member clusters whose gateway this one holds a live QUIC connection to (dialled
    /// or adopted). With the QUIC transport the gateway connects to every peer as soon as the
    /// configuration names it, so this fills without traffic.
    pub async fn connected_peers(&self) -> std::collections::BTreeSet<String> {
        match self.peers.upgrade() {
            Some(peers) => peers.connected().await,
            None => Default::default(),
        }
    }

    /// Closes the QUIC endpoint (peers see the connections close at once) and the local
    /// listener, ends every task and waits for them, then waits (up to the idle timeout) for
    /// the UDP port to be released so a new gateway can bind it straight away.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        for endpoint in &self.endpoints {
            endpoint.close(quic::codes::SHUTDOWN, b"gateway shutting down");
        }
        for task in std::mem::take(&mut self.tasks) {
            log_panic(task.await);
        }
        for endpoint in std::mem::take(&mut self.endpoints) {
            // Let the close frames go out without hanging on an unresponsive peer.
            let _ = tokio::time::timeout(self.idle_timeout, endpoint.wait_idle()).await;
        }
        // quinn's endpoint driver (its own task) owns the socket and lets go of it shortly
        // after the last handle is dropped. (A replica's siblings keep the shared port, and a
        // restarted replica joins them anyway: nothing to wait for.)
        let deadline = tokio::time::Instant::now() + self.idle_timeout;
        while !self.shared
            && std::net::UdpSocket::bind(self.quic_addr).is_err()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        info!(cluster = %self.cluster, "east-west gateway stopped");
    }
}

impl Drop for GatewayHandle {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        for endpoint in std::mem::take(&mut self.endpoints) {
            endpoint.close(quic::codes::SHUTDOWN, b"gateway dropped");
        }
        for task in &self.tasks {
            task.abort();
        }
    }
}
