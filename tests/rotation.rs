//! Workload certificates rotate at half their lifetime without failing requests: a demo
//! federation whose control planes sign 3-second certificates, under steady cross-cluster
//! load on a kept-alive connection and on fresh ones, for longer than a whole lifetime.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use isthmus_demo::probe::call_sample;
use isthmus_demo::{vip_of, Demo, DemoOptions, SAMPLE_PORT};

const LIFETIME: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_at_half_life_without_failing_requests() {
    let demo = Demo::start(DemoOptions {
        cert_lifetime: LIFETIME,
        ..DemoOptions::fast(100)
    })
    .await
    .unwrap();
    let east = demo.cluster("east").unwrap();
    let central = demo.cluster("central").unwrap();
    // ratings runs only in central: every call crosses both gateways.
    let deadline = Instant::now() + Duration::from_secs(15);
    let vip = loop {
        // Bound first: a watch guard held across the call below would block the sidecar's
        // own reads of the configuration once an update is waiting (a deadlock).
        let found = vip_of(&east.config.borrow(), "ratings");
        if let Some(vip) = found {
            let addr = SocketAddr::new(vip, SAMPLE_PORT);
            if call_sample(addr).await.is_ok() {
                break addr;
            }
        }
        assert!(
            Instant::now() < deadline,
            "ratings never became reachable from east"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ratings = central
        .workloads
        .iter()
        .find(|w| w.service == "ratings")
        .expect("central runs ratings");
    let (client_cert, server_cert) = (east.client_identity.leaf_der(), ratings.identity.leaf_der());

    // One connection kept alive from the app for the whole test (the sidecar keeps its mTLS
    // session to ratings pooled too), and a fresh connection every 100 ms.
    let tcp = tokio::net::TcpStream::connect(vip).await.unwrap();
    let (mut kept, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let started = Instant::now();
    let run_for = LIFETIME * 2;
    let (mut ok, mut failed, mut fresh_ok) = (0u32, Vec::new(), 0u32);
    let mut next_fresh = Instant::now();
    while started.elapsed() < run_for {
        let req = http::Request::get("/")
            .header("host", "ratings")
            .body(Empty::<Bytes>::new())
            .unwrap();
        match kept.send_request(req).await {
            Ok(resp) if resp.status() == 200 => {
                let _ = resp.into_body().collect().await;
                ok += 1;
            }
            Ok(resp) => failed.push(format!("kept: HTTP {}", resp.status())),
            Err(e) => panic!("the kept-alive connection failed after {ok} requests: {e}"),
        }
        if Instant::now() >= next_fresh {
            match call_sample(vip).await {
                Ok(_) => fresh_ok += 1,
                Err(e) => failed.push(format!("fresh at {:?}: {e:#}", started.elapsed())),
            }
            next_fresh += Duration::from_millis(100);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(
        ok > 50 && fresh_ok > 20,
        "too little load: {ok} kept, {fresh_ok} fresh"
    );
    // Both ends rotated.
    assert_ne!(
        east.client_identity.leaf_der(),
        client_cert,
        "the caller never rotated"
    );
    assert_ne!(
        ratings.identity.leaf_der(),
        server_cert,
        "ratings never rotated"
    );
    // The first certificates have expired by now; a new mTLS handshake with east's caller
    // identity to ratings' sidecar succeeds, so both ends present valid rotated ones.
    let config = east.config.borrow().clone();
    let status = fresh_handshake(
        &east.client_identity,
        &config,
        ratings.sidecar.inbound_addrs()[0],
    )
    .await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    demo.shutdown().await;
}

/// Handshakes with `identity` to a sidecar's inbound port, trusting the members in `config`,
/// and returns the status line of a GET.
async fn fresh_handshake(
    identity: &std::sync::Arc<isthmus_core::tls::Identity>,
    config: &isthmus_core::mesh::MeshConfig,
    addr: SocketAddr,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let trust = isthmus_core::tls::TrustBundles::new();
    trust
        .replace(
            config
                .clusters
                .iter()
                .map(|c| (c.trust_domain.as_str(), c.ca_bundle_pem.as_str())),
        )
        .unwrap();
    let tls = isthmus_core::tls::client_config(
        identity.clone(),
        trust,
        isthmus_core::tls::accept_any_member(),
        &[b"http/1.1"],
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(isthmus_core::tls::mesh_server_name(), tcp)
        .await
        .expect("a handshake with the rotated certificates");
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: ratings\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw);
    text.lines().next().unwrap_or("").to_string()
}
