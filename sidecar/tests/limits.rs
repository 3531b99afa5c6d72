//! What one client can hold of a sidecar, through real sockets: connections per listener
//! (the one past the limit closed at once and counted) and relayed connections idle too long.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_core::ca::CertificateAuthority;
use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::{MeshConfig, Protocol};
use isthmus_core::tls::{Identity, TrustBundles};
use isthmus_sidecar::limits::Limits;
use isthmus_sidecar::metrics::Metrics;
use isthmus_testkit::mesh;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const TD: &str = "limits.isthmus.local";
const PORT: u16 = 7000;
const IDLE: Duration = Duration::from_millis(600);

/// A TCP app that echoes what it reads.
async fn echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn identity(ca: &CertificateAuthority, sa: &str) -> Arc<Identity> {
    let id = SpiffeId::new(TD, "default", sa);
    let issued = ca.issue(&id, Duration::from_secs(600)).unwrap();
    Identity::from_pem(id, &issued.cert_chain_pem, &issued.key_pem).unwrap()
}

/// Sends one byte and reads it back: the connection works end to end.
async fn round_trip(tcp: &mut TcpStream) -> bool {
    if tcp.write_all(b"x").await.is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut byte)).await,
        Ok(Ok(1))
    )
}

/// Whether the sidecar closed `tcp` within `within` (EOF or reset on read).
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(within, tcp.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_take_a_bounded_number_of_connections_and_idle_relays_are_closed() {
    isthmus_core::install_crypto_provider();
    let ca = CertificateAuthority::generate(TD).unwrap();
    let trust = TrustBundles::new();
    trust.replace([(TD, ca.cert_pem())]).unwrap();
    let app = echo().await;
    let (tx, rx) = watch::channel(Arc::new(MeshConfig::default()));
    let client_metrics = Metrics::default();
    let limits = Limits {
        max_connections_per_listener: 3,
        tcp_idle_timeout: IDLE,
    };
    let options = |id, inbound, outbound, metrics| isthmus_sidecar::SidecarOptions {
        cluster: "test".into(),
        identity: id,
        trust: trust.clone(),
        labels: BTreeMap::new(),
        outbound,
        inbound,
        gateway: None,
        connect_timeout: Duration::from_secs(2),
        metrics,
        access_log: Default::default(),
        path_normalization: Default::default(),
        limits,
    };
    let server = isthmus_sidecar::start(
        options(
            identity(&ca, "echo"),
            vec![isthmus_sidecar::InboundPort {
                listen: "127.0.0.1:0".parse().unwrap(),
                forward_to: app,
                protocol: Protocol::Tcp,
            }],
            false,
            Metrics::default(),
        ),
        rx.clone(),
    )
    .await
    .unwrap();
    let client = isthmus_sidecar::start(
        options(identity(&ca, "sleep"), vec![], true, client_metrics.clone()),
        rx.clone(),
    )
    .await
    .unwrap();
    let vip: IpAddr = "127.64.0.1".parse().unwrap();
    tx.send_replace(Arc::new(MeshConfig {
        version: 1,
        cluster: "test".into(),
        services: vec![mesh::served(
            TD,
            "echo",
            vip,
            &[("tcp-echo", PORT, Protocol::Tcp)],
            &[server.inbound_addrs()[0]],
        )],
        clusters: vec![mesh::member("test", TD, ca.cert_pem())],
        policies: vec![],
    }));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut held = Vec::new();
    while held.is_empty() {
        if let Ok(mut tcp) = TcpStream::connect((vip, PORT)).await {
            if round_trip(&mut tcp).await {
                held.push(tcp);
                continue;
            }
        }
        assert!(Instant::now() < deadline, "the VIP listener never came up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Three connections at once work; a fourth is closed as it is accepted, and counted.
    for _ in 0..2 {
        let mut tcp = TcpStream::connect((vip, PORT)).await.unwrap();
        assert!(round_trip(&mut tcp).await);
        held.push(tcp);
    }
    let mut fourth = TcpStream::connect((vip, PORT)).await.unwrap();
    assert!(closed_within(&mut fourth, Duration::from_secs(2)).await);
    let refused = client_metrics
        .connections_refused
        .get_or_create(&isthmus_sidecar::metrics::RefusedLabels {
            listener: "outbound".into(),
            reason: "limit".into(),
        })
        .get();
    assert_eq!(refused, 1);
    // The three still work, and a freed slot serves again.
    for tcp in &mut held {
        assert!(round_trip(tcp).await);
    }
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut again = loop {
        let mut tcp = TcpStream::connect((vip, PORT)).await.unwrap();
        if round_trip(&mut tcp).await {
            break tcp;
        }
        assert!(Instant::now() < deadline, "the freed slot never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // Idle: a connection busy every 150 ms outlives the idle timeout several times over;
    // the quiet ones are closed once it passes.
    let started = Instant::now();
    while started.elapsed() < IDLE * 3 {
        assert!(round_trip(&mut again).await, "a busy relay was closed");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    for tcp in &mut held {
        assert!(
            closed_within(tcp, Duration::from_secs(1)).await,
            "an idle relay was left open"
        );
    }
    client.shutdown().await;
    server.shutdown().await;
}
