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

use crate::answer::Transport;
use crate::cache::{CachePolicy, ReplyCache};
use crate::forward::{Forwarder, MAX_MESSAGE};
use crate::handler::{resolve, Shared, Step, Worker};
use crate::inflight::Inflight;
use crate::live_table::LiveTable;
use crate::metrics::Metrics;
use crate::{DnsError, DnsOptions};

/// Forwarded UDP questions in flight at once, over all workers; more are dropped, and the
/// client retries.
const MAX_UDP_IN_FLIGHT: usize = 1024;
/// Open TCP client connections at once; more are closed at once.
const MAX_TCP_CONNECTIONS: usize = 256;
/// How long a TCP client may stay silent (between or inside messages).
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Attempts at finding a port free for both UDP and TCP when asked for port 0.
const BIND_ATTEMPTS: usize = 16;
/// Datagrams a UDP worker reads without yielding, once the socket is readable.
const UDP_BATCH: usize = 64;
/// The most UDP workers.
const MAX_UDP_WORKERS: usize = 64;
/// UDP socket buffer size asked for (both directions).
const UDP_BUFFER: usize = 4 << 20;
/// Whether each UDP worker gets its own socket (SO_REUSEPORT) rather than sharing one.
const SOCKET_PER_WORKER: bool = cfg!(target_os = "linux");

/// A running DNS proxy.
///
/// Dropping the handle also stops the proxy's tasks, without waiting for them; call
/// [`DnsHandle::shutdown`] to wait until every socket is closed.
#[derive(Debug)]
pub struct DnsHandle {
    udp_addr: SocketAddr,
    tcp_addr: SocketAddr,
    metrics: Metrics,
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

    /// The proxy's metrics; [`Metrics::register`] them to serve them.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
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
    if opts.udp_workers > MAX_UDP_WORKERS {
        return Err(DnsError::InvalidOption {
            field: "udp_workers",
            value: format!("{} (at most {MAX_UDP_WORKERS})", opts.udp_workers),
        });
    }
    let workers = match opts.udp_workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_UDP_WORKERS)),
        n => n,
    };
    let sockets = if SOCKET_PER_WORKER { workers } else { 1 };
    let (udp, tcp) = bind(opts.listen, sockets).await?;
    let udp_addr = udp[0].local_addr().map_err(|source| DnsError::LocalAddr {
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
        cache_entries = opts.cache_entries,
        max_cache_ttl = opts.max_cache_ttl,
        max_negative_ttl = opts.max_negative_ttl,
        udp_workers = workers,
        "DNS proxy listening"
    );

    let metrics = Metrics::new();
    let policy = CachePolicy {
        max_ttl: opts.max_cache_ttl,
        max_negative_ttl: opts.max_negative_ttl,
    };
    let shared = Arc::new(Shared {
        table: LiveTable::new(config.clone()),
        forwarder: Forwarder::new(upstreams, opts.upstream_timeout),
        cache: ReplyCache::new(opts.cache_entries, policy),
        inflight: Inflight::default(),
        metrics: metrics.clone(),
        ttl: opts.ttl,
    });
    let (shutdown, stop) = watch::channel(false);
    let udp: Vec<Arc<UdpSocket>> = udp.into_iter().map(Arc::new).collect();
    let mut tasks = Vec::with_capacity(workers + 2);
    for index in 0..workers {
        let worker = Worker::new(shared.clone(), config.clone());
        tasks.push(tokio::spawn(serve_udp(
            udp[index % udp.len()].clone(),
            worker,
            shared.clone(),
            MAX_UDP_IN_FLIGHT.div_ceil(workers),
            stop.clone(),
        )));
    }
    tasks.push(tokio::spawn(serve_tcp(
        tcp,
        shared.clone(),
        config.clone(),
        stop.clone(),
    )));
    tasks.push(tokio::spawn(follow_config(config, shared, stop)));
    Ok(DnsHandle {
        udp_addr,
        tcp_addr,
        metrics,
        shutdown,
        tasks,
    })
}
/// Binds `sockets` UDP sockets and the TCP listener on the same address. With port 0, the
/// first UDP socket picks the port and the others take the same one; TCP takes it too,
/// retrying with a new port when TCP finds it taken. Several UDP sockets share the port with
/// SO_REUSEPORT, so the kernel spreads clients over them (and over the workers reading them).
async fn bind(
    listen: SocketAddr,
    sockets: usize,
) -> Result<(Vec<UdpSocket>, TcpListener), DnsError> {
    let attempts = if listen.port() == 0 { BIND_ATTEMPTS } else { 1 };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let first = udp_socket(listen, sockets > 1).map_err(|source| DnsError::BindUdp {
            addr: listen,
            source,
        })?;
        let addr = first.local_addr().map_err(|source| DnsError::LocalAddr {
            transport: "udp",
            source,
        })?;
        match TcpListener::bind(addr).await {
            Ok(tcp) => {
                let mut udp = vec![first];
                for _ in 1..sockets {
                    udp.push(
                        udp_socket(addr, true)
                            .map_err(|source| DnsError::BindUdp { addr, source })?,
                    );
                }
                return Ok((udp, tcp));
            }
            Err(source) if attempt >= attempts => {
                return Err(DnsError::BindTcp { addr, source });
            }
            Err(error) => debug!(%addr, %error, "TCP port taken; trying another"),
        }
    }
}

/// One UDP socket on `addr`, with large buffers (to absorb bursts; the kernel caps them at
/// `net.core.rmem_max` / `wmem_max`) and, when asked, SO_REUSEPORT.
fn udp_socket(addr: SocketAddr, reuse_port: bool) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    #[cfg(target_os = "linux")]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = reuse_port;
    if let Err(error) = socket.set_recv_buffer_size(UDP_BUFFER) {
        debug!(%error, "cannot enlarge the UDP receive buffer");
    }
    if let Err(error) = socket.set_send_buffer_size(UDP_BUFFER) {
        debug!(%error, "cannot enlarge the UDP send buffer");
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
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
                    let state = shared.table.current();
                    warn!(
                        version = state.table.version(),
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

/// One UDP worker: several share the socket. Local and cached answers are sent inline;
/// each forwarded question gets its own task.
async fn serve_udp(
    socket: Arc<UdpSocket>,
    mut worker: Worker,
    shared: Arc<Shared>,
    max_in_flight: usize,
    mut stop: watch::Receiver<bool>,
) {
    let mut in_flight = JoinSet::new();
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            received = socket.recv_from(&mut buf) => {
                let mut first = Some(received);
                // Once the socket is readable, drain what is queued before polling again. A
                // datagram is only taken off the socket when it is about to be handled: one
                // read past the end of the batch would be lost.
                for _ in 0..UDP_BATCH {
                    let received = match first.take() {
                        Some(received) => received,
                        None => socket.try_recv_from(&mut buf),
                    };
                    let (len, peer) = match received {
                        Ok(received) => received,
                        Err(error) => {
                            if error.kind() != std::io::ErrorKind::WouldBlock {
                                debug!(%error, "UDP receive failed");
                            }
                            break;
                        }
                    };
                    let now = tokio::time::Instant::now().into_std();
                    match worker.handle(&buf[..len], Transport::Udp, now) {
                        Step::Reply => send_udp(&socket, &worker.out, peer).await,
                        Step::Drop => {}
                        Step::Forward(job) => {
                            if in_flight.len() >= max_in_flight {
                                debug!(%peer, "too many forwarded questions in flight; dropping");
                            } else {
                                let socket = socket.clone();
                                let shared = shared.clone();
                                in_flight.spawn(async move {
                                    if let Some(reply) = resolve(&shared, job).await {
                                        send_udp(&socket, &reply, peer).await;
                                    }
                                });
                            }
                        }
                    }
                }
            }
        }
    }
    in_flight.shutdown().await;
}

async fn send_udp(socket: &UdpSocket, reply: &[u8], peer: SocketAddr) {
    match socket.try_send_to(reply, peer) {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
            if let Err(error) = socket.send_to(reply, peer).await {
                debug!(%peer, %error, "UDP send failed");
            }
        }
        Err(error) => debug!(%peer, %error, "UDP send failed"),
    }
}

async fn serve_tcp(
    listener: TcpListener,
    shared: Arc<Shared>,
    config: watch::Receiver<Arc<MeshConfig>>,
    mut stop: watch::Receiver<bool>,
) {
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
                let worker = Worker::new(shared.clone(), config.clone());
                connections.spawn(serve_tcp_client(stream, peer, worker, shared.clone()));
            }
        }
    }
    connections.shutdown().await;
}

/// Answers length-prefixed messages on one connection, in order, until the client closes it,
/// goes quiet for [`TCP_IDLE`], or sends something unanswerable.
async fn serve_tcp_client(
    mut stream: TcpStream,
    peer: SocketAddr,
    mut worker: Worker,
    shared: Arc<Shared>,
) {
    let mut framed = Vec::new();
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
        let now = tokio::time::Instant::now().into_std();
        let forwarded;
        let reply: &[u8] = match worker.handle(&packet, Transport::Tcp, now) {
            Step::Reply => &worker.out,
            Step::Forward(job) => match resolve(&shared, job).await {
                Some(reply) => {
                    forwarded = reply;
                    &forwarded
                }
                None => return,
            },
            // A client sending garbage over TCP has lost the framing; hang up.
            Step::Drop => return,
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            debug!(%peer, len = reply.len(), "reply too long for TCP framing");
            return;
        };
        framed.clear();
        framed.extend_from_slice(&reply_len.to_be_bytes());
        framed.extend_from_slice(reply);
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
