//! A multi-port service whose endpoint serves its ports at different target ports (as a
//! Kubernetes Service's `targetPort`s): each service port reaches its own target.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_core::ca::CertificateAuthority;
use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::{Endpoint, MeshConfig, MeshService, Protocol};
use isthmus_core::tls::{Identity, TrustBundles};
use isthmus_sidecar::metrics::Metrics;
use isthmus_testkit::mesh;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const TD: &str = "ports.isthmus.local";

/// A TCP app that greets every connection with `marker`.
async fn greeter(marker: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let _ = tcp.write_all(marker.as_bytes()).await;
        }
    });
    addr
}

fn identity(ca: &CertificateAuthority, sa: &str) -> Arc<Identity> {
    let id = SpiffeId::new(TD, "default", sa);
    let issued = ca.issue(&id, Duration::from_secs(600)).unwrap();
    Identity::from_pem(id, &issued.cert_chain_pem, &issued.key_pem).unwrap()
}

async fn read_marker(vip: IpAddr, port: u16) -> String {
    let mut tcp = TcpStream::connect((vip, port)).await.unwrap();
    let mut buf = [0u8; 3];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn each_service_port_reaches_its_own_target_port() {
    isthmus_core::install_crypto_provider();
    let ca = CertificateAuthority::generate(TD).unwrap();
    let trust = TrustBundles::new();
    trust.replace([(TD, ca.cert_pem())]).unwrap();
    let (one, two) = (greeter("one").await, greeter("two").await);
    let (tx, rx) = watch::channel(Arc::new(MeshConfig::default()));
    let options = |id, inbound, outbound| isthmus_sidecar::SidecarOptions {
        cluster: "test".into(),
        identity: id,
        trust: trust.clone(),
        labels: BTreeMap::new(),
        outbound,
        inbound,
        gateway: None,
        connect_timeout: Duration::from_secs(2),
        metrics: Metrics::default(),
        access_log: Default::default(),
        path_normalization: Default::default(),
        limits: Default::default(),
    };
    // The server's sidecar serves two ports of the same IP, one per application port.
    let inbound = |forward_to| isthmus_sidecar::InboundPort {
        listen: "127.0.0.1:0".parse().unwrap(),
        forward_to,
        protocol: Protocol::Tcp,
    };
    let server = isthmus_sidecar::start(
        options(
            identity(&ca, "multi"),
            vec![inbound(one), inbound(two)],
            false,
        ),
        rx.clone(),
    )
    .await
    .unwrap();
    let (first, second) = (server.inbound_addrs()[0], server.inbound_addrs()[1]);
    let client = isthmus_sidecar::start(options(identity(&ca, "sleep"), vec![], true), rx.clone())
        .await
        .unwrap();
    let vip: IpAddr = "127.61.0.1".parse().unwrap();
    tx.send_replace(Arc::new(MeshConfig {
        version: 1,
        cluster: "test".into(),
        services: vec![MeshService {
            local_endpoints: vec![Endpoint {
                ports: [(7071, second.port())].into(),
                ..mesh::endpoint(first, &SpiffeId::new(TD, "default", "multi").to_string())
            }],
            ..mesh::served(
                TD,
                "multi",
                vip,
                &[
                    ("tcp-one", 7070, Protocol::Tcp),
                    ("tcp-two", 7071, Protocol::Tcp),
                ],
                &[],
            )
        }],
        clusters: vec![mesh::member("test", TD, ca.cert_pem())],
        policies: vec![],
    }));
    let deadline = Instant::now() + Duration::from_secs(5);
    for p in [7070, 7071] {
        while TcpStream::connect((vip, p)).await.is_err() {
            assert!(Instant::now() < deadline, "the VIP listener never came up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert_eq!(read_marker(vip, 7070).await, "one");
    assert_eq!(read_marker(vip, 7071).await, "two");
    assert_eq!(read_marker(vip, 7070).await, "one");
    client.shutdown().await;
    server.shutdown().await;
}
