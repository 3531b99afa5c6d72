//! The async layer: sockets, the UDP and TCP loops, the config follower, and the handle that
//! stops them.
//!
//! Every task watches one shutdown channel. [`DnsHandle::shutdown`] signals it and waits for
//! the loops; each loop then stops its own child tasks (forwarded questions, TCP connections)
//! and waits for them, so when `shutdown` returns no task holds a socket any more.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::mesh::MeshConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tracing::{debug, info, warn};

use crate::answer::{handle_packet, servfail, Action, Transport};
use crate::forward::{Forwarder, MAX_MESSAGE};
use crate::live_table::LiveTable;
use crate::{DnsError, DnsOptions};

/// Forwarded UDP questions in flight at once (each holds a 64 KiB receive buffer); more are
/// dropped, and the client retries.
const MAX_UDP_IN_FLIGHT: usize = 256;
/// Open TCP client connections at once; more are closed at once.
const MAX_TCP_CONNECTIONS: usize = 256;
/// How long a TCP client may stay silent (between or inside messages).
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Attempts at finding a port free for both UDP and TCP when asked for port 0.
const BIND_ATTEMPTS: usize = 16;

/// A running DNS proxy.
///
/// Dropping the handle also stops the proxy's tasks, without waiting for them; call
/// [`DnsHandle::shutdown`] to wait until every socket is closed.
#[derive(Debug)]
pub struct DnsHandle {
    udp_addr: SocketAddr,
    tcp_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl DnsHandle {
    /// The address the UDP socket is bound to.
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    /// The address the TCP listener is bound to (same IP and port as UDP).
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// Stops every task and waits until they have closed their sockets.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            if let Err(error) = task.await {
                warn!(%error, "a DNS task ended abnormally");
            }
        }
        info!(udp = %self.udp_addr, tcp = %self.tcp_addr, "DNS proxy stopped");
    }
}

/// What the loops share.
struct Shared {
    table: LiveTable,
    forwarder: Forwarder,
    ttl: u32,
}

/// Binds the UDP socket and TCP listener on `opts.listen` and starts answering, from the
/// snapshot in `config` and every later one.
///
/// Returns once both sockets are bound and the first table is built: the proxy is ready.
pub async fn start(
    opts: DnsOptions,
    config: watch::Receiver<Arc<MeshConfig>>,
) -> Result<DnsHandle, DnsError> {
    if opts.upstream_timeout.is_zero() {
        return Err(DnsError::InvalidOption {
            field: "upstream_timeout",
            value: "0s (must be positive)".into(),
        });
    }
    let (udp, tcp) = bind(opts.listen).await?;
    let udp_addr = udp.local_addr().map_err(|source| DnsError::LocalAddr {
        transport: "udp",
        source,
    })?;
    let tcp_addr = tcp.local_addr().map_err(|source| DnsError::LocalAddr {
        transport: "tcp",
        source,
    })?;

    // Forwarding to ourselves would loop every outside question until it timed out.
    let mut upstreams = opts.upstreams.clone();
    upstreams.retain(|upstream| {
        let own = *upstream == udp_addr;
        if own {
            warn!(%upstream, "ignoring an upstream that is this proxy itself");
        }
        !own
    });
    if upstreams.is_empty() {
        warn!("no upstream resolvers: names outside the mesh will get SERVFAIL");
    }
    info!(
        udp = %udp_addr,
        tcp = %tcp_addr,
        upstreams = ?upstreams,
        upstream_timeout = ?opts.upstream_timeout,
        ttl = opts.ttl,
        "DNS proxy listening"
    );

    let shared = Arc::new(Shared {
        table: LiveTable::new(config.clone()),
        forwarder: Forwarder::new(upstreams, opts.upstream_timeout),
        ttl: opts.ttl,
    });
    let (shutdown, stop) = watch::channel(false);
    let tasks = vec![
        tokio::spawn(serve_udp(Arc::new(udp), shared.clone(), stop.clone())),
        tokio::spawn(serve_tcp(tcp, shared.clone(), stop.clone())),
        tokio::spawn(follow_config(config, shared, stop)),
    ];
    Ok(DnsHandle {
        udp_addr,
        tcp_addr,
        shutdown,
        tasks,
    })
}

/// Binds UDP and TCP on the same address. With port 0, UDP picks the port and TCP takes the
/// same one, retrying with a new port when TCP finds it taken.
async fn bind(listen: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let attempts = if listen.port() == 0 { BIND_ATTEMPTS } else { 1 };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let udp = UdpSocket::bind(listen)
            .await
            .map_err(|source| DnsError::BindUdp {
                addr: listen,
                source,
            })?;
        let addr = udp.local_addr().map_err(|source| DnsError::LocalAddr {
            transport: "udp",
            source,
        })?;
        match TcpListener::bind(addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(source) if attempt >= attempts => {
                return Err(DnsError::BindTcp { addr, source });
            }
            Err(error) => debug!(%addr, %error, "TCP port taken; trying another"),
        }
    }
}

/// Rebuilds the table on every new snapshot (so queries rarely pay for it) and notes when the
/// control plane goes away. The table itself never goes away.
async fn follow_config(
    mut config: watch::Receiver<Arc<MeshConfig>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            changed = config.changed() => match changed {
                Ok(()) => {
                    shared.table.current();
                }
                Err(_) => {
                    let table = shared.table.current();
                    warn!(
                        version = table.version(),
                        "mesh configuration channel closed; answering from the last table"
                    );
                    // Nothing more will arrive; wait for shutdown only.
                    let _ = stop.changed().await;
                    return;
                }
            },
        }
    }
}

async fn serve_udp(socket: Arc<UdpSocket>, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut in_flight = JoinSet::new();
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            received = socket.recv_from(&mut buf) => {
                let (len, peer) = match received {
                    Ok(received) => received,
                    Err(error) => {
                        debug!(%error, "UDP receive failed");
                        continue;
                    }
                };
                let table = shared.table.current();
                match handle_packet(&table, &buf[..len], Transport::Udp, shared.ttl) {
                    Action::Reply(reply) => send_udp(&socket, &reply, peer).await,
                    Action::Drop => {}
                    Action::Forward { request } => {
                        if in_flight.len() >= MAX_UDP_IN_FLIGHT {
                            debug!(%peer, "too many forwarded questions in flight; dropping");
                            continue;
                        }
                        let packet = buf[..len].to_vec();
                        let socket = socket.clone();
                        let shared = shared.clone();
                        in_flight.spawn(async move {
                            let reply = match shared.forwarder.forward(&packet, Transport::Udp).await {
                                Ok(reply) => Some(reply),
                                Err(_) => servfail(&request),
                            };
                            if let Some(reply) = reply {
                                send_udp(&socket, &reply, peer).await;
                            }
                        });
                    }
                }
            }
        }
    }
    in_flight.shutdown().await;
}

async fn send_udp(socket: &UdpSocket, reply: &[u8], peer: SocketAddr) {
    if let Err(error) = socket.send_to(reply, peer).await {
        debug!(%peer, %error, "UDP send failed");
    }
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        debug!(%error, "TCP accept failed");
                        continue;
                    }
                };
                if connections.len() >= MAX_TCP_CONNECTIONS {
                    debug!(%peer, "too many TCP clients; closing the new connection");
                    continue;
                }
                connections.spawn(serve_tcp_client(stream, peer, shared.clone()));
            }
        }
    }
    connections.shutdown().await;
}

/// Answers length-prefixed messages on one connection, in order, until the client closes it,
/// goes quiet for [`TCP_IDLE`], or sends something unanswerable.
async fn serve_tcp_client(mut stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    loop {
        let mut len = [0u8; 2];
        match timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let mut packet = vec![0u8; usize::from(u16::from_be_bytes(len))];
        match timeout(TCP_IDLE, stream.read_exact(&mut packet)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let table = shared.table.current();
        let reply = match handle_packet(&table, &packet, Transport::Tcp, shared.ttl) {
            Action::Reply(reply) => reply,
            Action::Forward { request } => {
                match shared.forwarder.forward(&packet, Transport::Tcp).await {
                    Ok(reply) => reply,
                    Err(_) => match servfail(&request) {
                        Some(reply) => reply,
                        None => return,
                    },
                }
            }
            // A client sending garbage over TCP has lost the framing; hang up.
            Action::Drop => return,
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            debug!(%peer, len = reply.len(), "reply too long for TCP framing");
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&reply_len.to_be_bytes());
        framed.extend_from_slice(&reply);
        match timeout(TCP_IDLE, stream.write_all(&framed)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                debug!(%peer, %error, "TCP write failed");
                return;
            }
            Err(_) => {
                debug!(%peer, "TCP client stopped reading");
                return;
            }
        }
    }
}
