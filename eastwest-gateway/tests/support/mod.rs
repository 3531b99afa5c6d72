//! Shared pieces of the gateway tests: per-cluster CAs and identities, hand-built mesh
//! configurations, echo endpoints, gateways on loopback port 0, and a sidecar-like client.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isthmus_core::ca::CertificateAuthority;
use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::{ClusterInfo, Endpoint, MeshConfig, MeshService, Protocol};
use isthmus_core::tls::{Identity, TrustBundles};
use isthmus_core::tunnel::{self, OpenRequest, OpenResponse};
use isthmus_gateway::{GatewayHandle, GatewayOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub const SERVICE_PORT: u16 = 9080;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub fn trust_domain(cluster: &str) -> String {
    format!("{cluster}.isthmus.local")
}

/// A cluster's CA and its trust domain.
pub struct ClusterCa {
    pub name: String,
    pub ca: CertificateAuthority,
}

impl ClusterCa {
    pub fn new(name: &str) -> Self {
        isthmus_core::install_crypto_provider();
        ClusterCa {
            name: name.into(),
            ca: CertificateAuthority::generate(&trust_domain(name)).unwrap(),
        }
    }

    pub fn identity(&self, id: SpiffeId) -> Arc<Identity> {
        let issued = self.ca.issue(&id, Duration::from_secs(3600)).unwrap();
        Identity::from_pem(id, &issued.cert_chain_pem, &issued.key_pem).unwrap()
    }

    pub fn gateway_identity(&self) -> Arc<Identity> {
        self.identity(SpiffeId::gateway(&trust_domain(&self.name)))
    }

    pub fn info(&self, gateway: Option<SocketAddr>) -> ClusterInfo {
        ClusterInfo {
            name: self.name.clone(),
            trust_domain: trust_domain(&self.name),
            gateway,
            ca_bundle_pem: self.ca.cert_pem().to_string(),
            locality: None,
        }
    }
}

/// Trust bundles holding the given CAs.
pub fn trust(cas: &[&ClusterCa]) -> Arc<TrustBundles> {
    let trust = TrustBundles::new();
    let names: Vec<String> = cas.iter().map(|c| trust_domain(&c.name)).collect();
    trust
        .replace(
            names
                .iter()
                .zip(cas)
                .map(|(td, c)| (td.as_str(), c.ca.cert_pem())),
        )
        .unwrap();
    trust
}

pub fn endpoint(address: SocketAddr, version: &str, healthy: bool) -> Endpoint {
    Endpoint {
        address,
        labels: BTreeMap::from([("version".to_string(), version.to_string())]),
        identity: "spiffe://west.isthmus.local/ns/default/sa/ratings".into(),
        healthy,
        ports: Default::default(),
    }
}

pub fn service(name: &str, exported: bool, endpoints: Vec<Endpoint>) -> MeshService {
    MeshService {
        local_endpoints: endpoints,
        exported,
        ..isthmus_testkit::mesh::service(
            name,
            "default",
            "240.240.0.1",
            &[("tcp", SERVICE_PORT, Protocol::Tcp)],
        )
    }
}

pub fn config(cluster: &str, services: Vec<MeshService>, clusters: Vec<ClusterInfo>) -> MeshConfig {
    MeshConfig {
        version: 1,
        cluster: cluster.into(),
        services,
        clusters,
        policies: Vec::new(),
    }
}

pub fn options(cluster: &str, identity: Arc<Identity>, trust: Arc<TrustBundles>) -> GatewayOptions {
    let mut opts = GatewayOptions::new(cluster, identity, trust);
    opts.quic_listen = "127.0.0.1:0".parse().unwrap();
    opts.local_listen = "127.0.0.1:0".parse().unwrap();
    opts.connect_timeout = CONNECT_TIMEOUT;
    opts
}

/// A gateway and the sender of its configuration.
pub struct Gw {
    pub handle: GatewayHandle,
    pub config: watch::Sender<Arc<MeshConfig>>,
}

pub async fn start_gateway(opts: GatewayOptions, config: MeshConfig) -> Gw {
    let (tx, rx) = watch::channel(Arc::new(config));
    let handle = isthmus_gateway::start(opts, rx).await.unwrap();
    Gw { handle, config: tx }
}

/// A plain TCP echo server standing in for a destination sidecar's inbound listener. It
/// echoes until the client half-closes, then closes its side.
pub struct Echo {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn echo_server() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            conns.spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Echo {
        addr,
        accepted,
        task,
    }
}

/// This process's resident memory, from /proc/self/status (VmRSS), in bytes.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/self/status");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS value");
    kb * 1024
}

/// The first bytes of a TLS ClientHello (record header and handshake type): gateways carry
/// only tunnels that start with them, so tests that relay plain bytes send these first.
pub const CLIENT_HELLO_PREFIX: [u8; 6] = [22, 3, 1, 0, 64, 1];

/// What a sidecar does: connect to the local gateway, send the request, read the response;
/// then, on Ok, start as a TLS client would (the [`CLIENT_HELLO_PREFIX`], which the echo
/// endpoints send back and this reads), so the rest of the stream is the test's own.
pub async fn open(local: SocketAddr, req: &OpenRequest) -> (TcpStream, OpenResponse) {
    let (mut tcp, resp) = open_to_sink(local, req).await;
    if resp.is_ok() {
        // A tunnel that breaks here (the failure tests break them on purpose) fails the
        // caller's own round trip next, as it would have without the prefix.
        let mut back = [0u8; 6];
        let echoed = tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut back)).await;
        if matches!(echoed, Ok(Ok(_))) {
            assert_eq!(back, CLIENT_HELLO_PREFIX);
        }
    }
    (tcp, resp)
}

/// Like [`open`], for an endpoint that does not echo: the prefix is sent, not read back.
pub async fn open_to_sink(local: SocketAddr, req: &OpenRequest) -> (TcpStream, OpenResponse) {
    let mut tcp = TcpStream::connect(local).await.unwrap();
    tunnel::write_request(&mut tcp, req).await.unwrap();
    let resp = tunnel::read_response(&mut tcp).await.unwrap();
    if resp.is_ok() {
        let _ = tcp.write_all(&CLIENT_HELLO_PREFIX).await;
    }
    (tcp, resp)
}

pub fn request(service: &str, target: &str) -> OpenRequest {
    OpenRequest::new(service, SERVICE_PORT, target)
}

/// Sends `data` through an open tunnel and reads the echo back.
pub async fn echo_round_trip(tcp: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    tcp.write_all(data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut back))
        .await
        .expect("echo within 5s")
        .unwrap();
    back
}

/// Polls `check` until it yields a value, failing the test after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// East and west gateways on loopback, each with its own CA, trusting each other; west
/// exports `ratings.default` backed by an echo server.
/// Opens a tunnel from east to `ratings.default` in west and checks `payload` makes the round
/// trip through the echo server.
pub async fn assert_tunnel_carries(c: &TwoClusters, payload: &[u8]) {
    let (mut tcp, resp) = open(
        c.east.handle.local_addr(),
        &request("ratings.default", "west"),
    )
    .await;
    assert!(resp.is_ok(), "{resp:?}");
    assert_eq!(echo_round_trip(&mut tcp, payload).await, payload);
}

pub struct TwoClusters {
    pub east_ca: ClusterCa,
    pub west_ca: ClusterCa,
    pub trust: Arc<TrustBundles>,
    pub east: Gw,
    pub west: Gw,
    pub echo: Echo,
}

impl TwoClusters {
    pub async fn start() -> Self {
        Self::start_with(isthmus_gateway::Transport::Quic).await
    }

    pub async fn start_with(transport: isthmus_gateway::Transport) -> Self {
        let east_ca = ClusterCa::new("east");
        let west_ca = ClusterCa::new("west");
        let trust = trust(&[&east_ca, &west_ca]);
        let echo = echo_server().await;
        let mut east_opts = options("east", east_ca.gateway_identity(), trust.clone());
        east_opts.transport = transport;
        let east = start_gateway(east_opts, MeshConfig::default()).await;
        let mut west_opts = options("west", west_ca.gateway_identity(), trust.clone());
        west_opts.transport = transport;
        let west = start_gateway(west_opts, MeshConfig::default()).await;
        let mut c = TwoClusters {
            east_ca,
            west_ca,
            trust,
            east,
            west,
            echo,
        };
        c.publish(vec![service(
            "ratings",
            true,
            vec![endpoint(c.echo.addr, "v1", true)],
        )]);
        c
    }

    pub fn clusters(&self) -> Vec<ClusterInfo> {
        self.clusters_with_west_gateway(Some(self.west.handle.quic_addr()))
    }

    pub fn clusters_with_west_gateway(&self, west: Option<SocketAddr>) -> Vec<ClusterInfo> {
        vec![
            self.east_ca.info(Some(self.east.handle.quic_addr())),
            self.west_ca.info(west),
        ]
    }

    /// Sets west's services and both clusters' membership.
    pub fn publish(&mut self, west_services: Vec<MeshService>) {
        let clusters = self.clusters();
        self.west
            .config
            .send_replace(Arc::new(config("west", west_services, clusters.clone())));
        self.east
            .config
            .send_replace(Arc::new(config("east", vec![], clusters)));
    }

    /// Sets both clusters' services (east's too, for tunnels from west to east).
    pub fn publish_both(
        &mut self,
        east_services: Vec<MeshService>,
        west_services: Vec<MeshService>,
    ) {
        let clusters = self.clusters();
        self.west
            .config
            .send_replace(Arc::new(config("west", west_services, clusters.clone())));
        self.east
            .config
            .send_replace(Arc::new(config("east", east_services, clusters)));
    }

    /// Points east's view of west's gateway at `addr` (or nowhere).
    pub fn east_sees_west_at(&self, addr: Option<SocketAddr>) {
        let clusters = self.clusters_with_west_gateway(addr);
        self.east
            .config
            .send_replace(Arc::new(config("east", vec![], clusters)));
    }
}

impl TwoClusters {
    /// Takes east's gateway out of west's view, so west cannot dial east on its own (as a
    /// killed west could not).
    pub fn west_forgets_east(&self) {
        let clusters = vec![
            self.east_ca.info(None),
            self.west_ca.info(Some(self.west.handle.quic_addr())),
        ];
        self.west
            .config
            .send_replace(Arc::new(config("west", vec![], clusters)));
    }
}

/// A UDP relay between a client and `target` that can be told to drop everything, making the
/// peer behind it look dead without closing anything.
pub struct UdpBlackhole {
    pub addr: SocketAddr,
    pub dropping: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Drop for UdpBlackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn udp_relay(target: SocketAddr) -> UdpBlackhole {
    let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(target).await.unwrap();
    let addr = front.local_addr().unwrap();
    let dropping = Arc::new(AtomicBool::new(false));
    let flag = dropping.clone();
    let client: Mutex<Option<SocketAddr>> = Mutex::new(None);
    let task = tokio::spawn(async move {
        let mut up = vec![0u8; 65536];
        let mut down = vec![0u8; 65536];
        loop {
            tokio::select! {
                got = front.recv_from(&mut up) => {
                    let Ok((n, from)) = got else { continue };
                    *client.lock().unwrap() = Some(from);
                    if !flag.load(Ordering::SeqCst) {
                        let _ = back.send(&up[..n]).await;
                    }
                }
                got = back.recv(&mut down) => {
                    let Ok(n) = got else { continue };
                    let to = *client.lock().unwrap();
                    if let (false, Some(to)) = (flag.load(Ordering::SeqCst), to) {
                        let _ = front.send_to(&down[..n], to).await;
                    }
                }
            }
        }
    });
    UdpBlackhole {
        addr,
        dropping,
        task,
    }
}
