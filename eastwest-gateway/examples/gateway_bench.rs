//! The gateway benchmark (run it through `bench/gateway`): bulk transfer through
//! client → gateway(east) → QUIC → gateway(west) → sink, and in the same run through the
//! TLS-over-TCP transport and over one direct TCP connection, plus stream-open latency on an
//! established connection and the gateway-to-gateway handshake time.
//!
//! The client speaks the tunnel protocol to east's local port exactly as a sidecar does; the
//! sink stands in for the destination sidecar and discards what it reads. The payload is raw
//! bytes (no workload TLS inside), so the figures are the tunnel's own cost. Everything runs
//! in this process on loopback. Each measurement is taken `--runs` times with fresh gateways
//! and the median is reported.
//!
//! Usage: `gateway_bench [--seconds S] [--runs N] [--opens N]`

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_core::ca::CertificateAuthority;
use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::{ClusterInfo, Endpoint, MeshConfig, MeshService, ServicePort};
use isthmus_core::tls::{Identity, TrustBundles};
use isthmus_core::tunnel::{self, OpenRequest};
use isthmus_gateway::{GatewayHandle, GatewayOptions, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const PORT: u16 = 9000;
const CHUNK: usize = 256 * 1024;
/// Bytes before this much time into a transfer are not counted (slow start, task start-up).
const WARM_UP: Duration = Duration::from_millis(300);

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Args {
    seconds: f64,
    runs: usize,
    opens: usize,
}

fn args() -> Res<Args> {
    let mut a = Args {
        seconds: 2.0,
        runs: 3,
        opens: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--seconds" => a.seconds = value.parse()?,
            "--runs" => a.runs = value.parse()?,
            "--opens" => a.opens = value.parse()?,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    if a.runs == 0 || a.seconds <= 0.0 || a.opens == 0 {
        return Err("--runs, --seconds and --opens must be above zero".into());
    }
    Ok(a)
}

/// A TCP server that reads and discards, counting bytes.
struct Sink {
    addr: SocketAddr,
    bytes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn sink() -> Res<Sink> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let bytes = Arc::new(AtomicU64::new(0));
    let count = bytes.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut tcp, _)) = listener.accept().await {
            let count = count.clone();
            conns.spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    count.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    Ok(Sink { addr, bytes, task })
}

/// Two gateways (east, west) with their own CAs; west exports `sink.bench` backed by `sink`.
struct Pair {
    east: GatewayHandle,
    west: GatewayHandle,
    east_config: watch::Sender<Arc<MeshConfig>>,
    _west_config: watch::Sender<Arc<MeshConfig>>,
    clusters: Vec<ClusterInfo>,
}

fn identity(ca: &CertificateAuthority, td: &str) -> Res<Arc<Identity>> {
    let id = SpiffeId::gateway(td);
    let issued = ca.issue(&id, Duration::from_secs(3600))?;
    Ok(Identity::from_pem(
        id,
        &issued.cert_chain_pem,
        &issued.key_pem,
    )?)
}

async fn pair(transport: Transport, sink: SocketAddr) -> Res<Pair> {
    let (east_td, west_td) = ("east.isthmus.local", "west.isthmus.local");
    let east_ca = CertificateAuthority::generate(east_td)?;
    let west_ca = CertificateAuthority::generate(west_td)?;
    let trust = TrustBundles::new();
    trust.replace([(east_td, east_ca.cert_pem()), (west_td, west_ca.cert_pem())])?;
    let opts = |cluster: &str, identity| {
        let mut o = GatewayOptions::new(cluster, identity, trust.clone());
        o.quic_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        o.local_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        o.transport = transport;
        o
    };
    let (east_config, rx) = watch::channel(Arc::new(MeshConfig::default()));
    let east = isthmus_gateway::start(opts("east", identity(&east_ca, east_td)?), rx).await?;
    let (west_config, rx) = watch::channel(Arc::new(MeshConfig::default()));
    let west = isthmus_gateway::start(opts("west", identity(&west_ca, west_td)?), rx).await?;
    let info = |name: &str, td: &str, ca: &CertificateAuthority, gw: SocketAddr| ClusterInfo {
        name: name.into(),
        trust_domain: td.into(),
        gateway: Some(gw),
        ca_bundle_pem: ca.cert_pem().to_string(),
        locality: None,
    };
    let clusters = vec![
        info("east", east_td, &east_ca, east.quic_addr()),
        info("west", west_td, &west_ca, west.quic_addr()),
    ];
    let service = MeshService {
        name: "sink".into(),
        namespace: "bench".into(),
        vip: [240, 240, 0, 1].into(),
        ports: vec![ServicePort {
            name: "tcp".into(),
            port: PORT,
            ..ServicePort::default()
        }],
        identities: vec![],
        local_endpoints: vec![Endpoint {
            address: sink,
            labels: Default::default(),
            identity: String::new(),
            healthy: true,
            ports: Default::default(),
        }],
        remote: vec![],
        exported: true,
        headless: None,
    };
    let config = |cluster: &str, services| MeshConfig {
        version: 1,
        cluster: cluster.into(),
        services,
        clusters: clusters.clone(),
        ..MeshConfig::default()
    };
    west_config.send_replace(Arc::new(config("west", vec![service])));
    east_config.send_replace(Arc::new(config("east", vec![])));
    Ok(Pair {
        east,
        west,
        east_config,
        _west_config: west_config,
        clusters,
    })
}

impl Pair {
    /// Closes east's connection to west (by withdrawing west's gateway until the pool has
    /// dropped the connection, which ends `held`), so the next tunnel makes a new, resumed,
    /// handshake.
    async fn drop_connection(&self, mut held: TcpStream) -> Res<()> {
        let mut without = self.clusters.clone();
        without[1].gateway = None;
        let config = |clusters| {
            Arc::new(MeshConfig {
                version: 2,
                cluster: "east".into(),
                clusters,
                ..MeshConfig::default()
            })
        };
        self.east_config.send_replace(config(without));
        let mut buf = [0u8; 16];
        tokio::time::timeout(Duration::from_secs(5), held.read(&mut buf))
            .await
            .map_err(|_| "the pooled connection was not dropped")?
            .ok();
        self.east_config.send_replace(config(self.clusters.clone()));
        Ok(())
    }

    async fn shutdown(self) {
        self.east.shutdown().await;
        self.west.shutdown().await;
    }
}

/// Opens a tunnel as a sidecar does; returns the stream once the answer is Ok.
async fn open(local: SocketAddr) -> Res<TcpStream> {
    let mut tcp = TcpStream::connect(local).await?;
    tcp.set_nodelay(true)?;
    tunnel::write_request(&mut tcp, &OpenRequest::new("sink.bench", PORT, "west")).await?;
    let resp = tunnel::read_response(&mut tcp).await?;
    if !resp.is_ok() {
        return Err(format!("tunnel refused: {} {}", resp.code, resp.message).into());
    }
    // Gateways carry only tunnels that start as TLS does: the first record header and the
    // ClientHello type (the sink counts these six bytes with the rest).
    tcp.write_all(&[22, 3, 1, 0, 64, 1]).await?;
    Ok(tcp)
}

/// Pushes bytes over `streams` connections for `seconds`; returns Gbit/s delivered to the sink
/// after the warm-up.
async fn throughput(
    sink: &Sink,
    via: Option<SocketAddr>,
    streams: usize,
    seconds: f64,
) -> Res<f64> {
    let mut conns = Vec::new();
    for _ in 0..streams {
        conns.push(match via {
            Some(local) => open(local).await?,
            None => TcpStream::connect(sink.addr).await?,
        });
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for mut tcp in conns {
        let stop = stop.clone();
        writers.spawn(async move {
            let chunk = vec![0x5au8; CHUNK];
            while !stop.load(Ordering::Relaxed) {
                if tcp.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            let _ = tcp.shutdown().await;
        });
    }
    tokio::time::sleep(WARM_UP).await;
    let (b0, t0) = (sink.bytes.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let (b1, t1) = (sink.bytes.load(Ordering::Relaxed), Instant::now());
    stop.store(true, Ordering::Relaxed);
    while writers.join_next().await.is_some() {}
    Ok((b1 - b0) as f64 * 8.0 / (t1 - t0).as_secs_f64() / 1e9)
}

/// Latencies (ms) of `n` sequential tunnel opens on an established gateway connection.
async fn open_latencies(local: SocketAddr, n: usize) -> Res<Vec<f64>> {
    // Make sure the connection exists and is warm.
    for _ in 0..20 {
        drop(open(local).await?);
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let tcp = open(local).await?;
        out.push(started.elapsed().as_secs_f64() * 1e3);
        drop(tcp);
    }
    Ok(out)
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

fn median(values: &[f64]) -> f64 {
    percentile(values, 0.5)
}

#[derive(Default)]
struct Figures {
    quic_1: Vec<f64>,
    quic_16: Vec<f64>,
    tls_1: Vec<f64>,
    tls_16: Vec<f64>,
    tcp_1: Vec<f64>,
    tcp_16: Vec<f64>,
    open_p50: Vec<f64>,
    open_p99: Vec<f64>,
    tls_open_p50: Vec<f64>,
    tls_open_p99: Vec<f64>,
    handshake: Vec<f64>,
    handshake_resumed: Vec<f64>,
}

async fn one_run(a: &Args, f: &mut Figures) -> Res<()> {
    let sink = sink().await?;
    f.tcp_1.push(throughput(&sink, None, 1, a.seconds).await?);
    f.tcp_16.push(throughput(&sink, None, 16, a.seconds).await?);

    let quic = pair(Transport::Quic, sink.addr).await?;
    let local = quic.east.local_addr();
    let held = open(local).await?;
    let full = quic
        .east
        .metrics()
        .last_handshake_seconds("west")
        .ok_or("no handshake recorded")?;
    f.handshake.push(full * 1e3);
    quic.drop_connection(held).await?;
    // The pool closes the old connection asynchronously; wait until a new handshake happened.
    let deadline = Instant::now() + Duration::from_secs(5);
    let metrics = quic.east.metrics();
    let before = metrics.handshake_count("west", isthmus_gateway::metrics::Role::Client);
    while metrics.handshake_count("west", isthmus_gateway::metrics::Role::Client) == before {
        if Instant::now() > deadline {
            return Err("no reconnect after dropping the connection".into());
        }
        if let Ok(tcp) = open(local).await {
            drop(tcp);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if let Some(resumed) = metrics.last_handshake_seconds("west") {
        f.handshake_resumed.push(resumed * 1e3);
    }
    f.quic_1
        .push(throughput(&sink, Some(local), 1, a.seconds).await?);
    f.quic_16
        .push(throughput(&sink, Some(local), 16, a.seconds).await?);
    let lat = open_latencies(local, a.opens).await?;
    f.open_p50.push(percentile(&lat, 0.5));
    f.open_p99.push(percentile(&lat, 0.99));
    quic.shutdown().await;

    let tls = pair(Transport::TlsTcp, sink.addr).await?;
    let local = tls.east.local_addr();
    f.tls_1
        .push(throughput(&sink, Some(local), 1, a.seconds).await?);
    f.tls_16
        .push(throughput(&sink, Some(local), 16, a.seconds).await?);
    let lat = open_latencies(local, a.opens / 4).await?;
    f.tls_open_p50.push(percentile(&lat, 0.5));
    f.tls_open_p99.push(percentile(&lat, 0.99));
    tls.shutdown().await;
    Ok(())
}

/// `--sweep`: throughput for 1, 2, 4, 8 and 16 streams on each path, once.
async fn sweep(a: &Args) -> Res<()> {
    let sink = sink().await?;
    for transport in [Transport::Quic, Transport::TlsTcp] {
        let p = pair(transport, sink.addr).await?;
        for n in [1, 2, 4, 8, 16] {
            let started = Instant::now();
            let g = throughput(&sink, Some(p.east.local_addr()), n, a.seconds).await?;
            println!(
                "{transport:?} {n:>2} streams: {g:.2} Gbit/s ({:?})",
                started.elapsed()
            );
        }
        p.shutdown().await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Res<()> {
    isthmus_core::install_crypto_provider();
    if std::env::args().any(|a| a == "--sweep") {
        let a = Args {
            seconds: 1.5,
            runs: 1,
            opens: 1,
        };
        return sweep(&a).await;
    }
    let a = args()?;
    let mut f = Figures::default();
    for run in 1..=a.runs {
        one_run(&a, &mut f).await?;
        eprintln!(
            "run {run}: quic 1={:.2} 16={:.2}  tls 1={:.2} 16={:.2}  tcp 1={:.2} 16={:.2} Gbit/s; open p50={:.3} p99={:.3} ms; handshake {:.2} ms",
            f.quic_1[run - 1], f.quic_16[run - 1], f.tls_1[run - 1], f.tls_16[run - 1],
            f.tcp_1[run - 1], f.tcp_16[run - 1], f.open_p50[run - 1], f.open_p99[run - 1],
            f.handshake[run - 1],
        );
    }
    let m = |v: &Vec<f64>| median(v);
    println!(
        "gateway benchmark: medians of {} runs, {} s per transfer, loopback, one process",
        a.runs, a.seconds
    );
    println!("throughput (Gbit/s)        1 stream   16 streams");
    println!(
        "  QUIC tunnel              {:>8.2}   {:>10.2}",
        m(&f.quic_1),
        m(&f.quic_16)
    );
    println!(
        "  TLS-over-TCP tunnel      {:>8.2}   {:>10.2}",
        m(&f.tls_1),
        m(&f.tls_16)
    );
    println!(
        "  direct TCP               {:>8.2}   {:>10.2}",
        m(&f.tcp_1),
        m(&f.tcp_16)
    );
    println!(
        "ratios: QUIC/TLS 1 stream {:.2}, 16 streams {:.2}; QUIC/direct TCP 1 stream {:.2}",
        m(&f.quic_1) / m(&f.tls_1),
        m(&f.quic_16) / m(&f.tls_16),
        m(&f.quic_1) / m(&f.tcp_1)
    );
    println!(
        "tunnel open (sidecar's view: TCP connect + request + remote dial + answer), {} opens:",
        a.opens
    );
    println!(
        "  QUIC (established connection)  p50 {:.3} ms  p99 {:.3} ms",
        m(&f.open_p50),
        m(&f.open_p99)
    );
    println!(
        "  TLS-over-TCP (new TLS per tunnel, resumed)  p50 {:.3} ms  p99 {:.3} ms",
        m(&f.tls_open_p50),
        m(&f.tls_open_p99)
    );
    println!(
        "QUIC handshake: full {:.2} ms, resumed {:.2} ms",
        m(&f.handshake),
        if f.handshake_resumed.is_empty() {
            f64::NAN
        } else {
            m(&f.handshake_resumed)
        }
    );
    println!(
        "RESULT gateway quic_gbps_1={:.2} quic_gbps_16={:.2} tls_gbps_1={:.2} tcp_gbps_1={:.2} open_p99_ms={:.3} handshake_ms={:.2} ratio={:.2}",
        m(&f.quic_1), m(&f.quic_16), m(&f.tls_1), m(&f.tcp_1), m(&f.open_p99), m(&f.handshake),
        m(&f.quic_1) / m(&f.tls_1)
    );
    Ok(())
}
