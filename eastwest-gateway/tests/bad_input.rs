//! Bad input on every port is refused, counted, and never stops the gateway: garbage
//! datagrams on the QUIC port, malformed and unknown-version headers from sidecars and from
//! peer gateways, unauthorized certificates.

mod support;

use std::sync::Arc;
use std::time::Duration;

use isthmus_core::tls::{self, Identity, TrustBundles, MESH_SERVER_NAME};
use isthmus_core::tunnel::{self, ReasonCode};
use isthmus_gateway::metrics::{Rejection, Source};
use isthmus_gateway::{Metrics, ALPN};
use support::*;
use tokio::io::AsyncWriteExt;

async fn counted(metrics: &Arc<Metrics>, source: Source, reason: Rejection, at_least: u64) {
    let m = metrics.clone();
    eventually(
        Duration::from_secs(5),
        &format!("{at_least} {reason:?} rejections"),
        || {
            let m = m.clone();
            async move { (m.rejected_count(source, reason) >= at_least).then_some(()) }
        },
    )
    .await;
}

#[tokio::test]
async fn garbage_datagrams_on_the_quic_port_are_counted_by_kind() {
    let c = TwoClusters::start().await;
    assert_tunnel_carries(&c, b"still here").await;
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let west = c.west.handle.quic_addr();
    let m = c.west.handle.metrics();
    let total = |m: &Metrics| {
        [
            Rejection::GarbageDatagram,
            Rejection::UnknownQuicVersion,
            Rejection::UnknownConnectionId,
        ]
        .map(|r| m.rejected_count(Source::Peer, r))
        .iter()
        .sum::<u64>()
    };
    let mut noise = 0x2545_f491_u32;
    for i in 0..300u32 {
        let datagram: Vec<u8> = match i % 3 {
            // Not QUIC: fixed bit clear (a DNS query, say).
            0 => vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01],
            // A long header of a QUIC version nobody speaks here.
            1 => {
                let mut d = vec![0xc0, 0x1a, 0x2a, 0x3a, 0x4a, 8];
                d.extend_from_slice(&[0u8; 1200]);
                d
            }
            // Random bytes dressed as a short header.
            _ => (0..64)
                .map(|_| {
                    noise ^= noise << 13;
                    noise ^= noise >> 17;
                    noise ^= noise << 5;
                    noise as u8
                })
                .enumerate()
                .map(|(j, b)| if j == 0 { (b & 0x3f) | 0x40 } else { b })
                .collect(),
        };
        udp.send_to(&datagram, west).await.unwrap();
        if i % 10 == 9 {
            // Loopback drops datagrams a full socket buffer cannot take: send in batches.
            let m = m.clone();
            eventually(Duration::from_secs(5), "a batch counted", || {
                let m = m.clone();
                async move { (total(&m) > u64::from(i)).then_some(()) }
            })
            .await;
        }
    }
    counted(&m, Source::Peer, Rejection::GarbageDatagram, 100).await;
    counted(&m, Source::Peer, Rejection::UnknownQuicVersion, 100).await;
    counted(&m, Source::Peer, Rejection::UnknownConnectionId, 100).await;
    assert_tunnel_carries(&c, b"still here").await;
    // Real traffic is never counted as garbage.
    assert_eq!(
        m.rejected_count(Source::Peer, Rejection::GarbageDatagram),
        100
    );
    assert_eq!(
        m.rejected_count(Source::Peer, Rejection::UnknownConnectionId),
        100
    );
}

#[tokio::test]
async fn malformed_and_unknown_version_headers_from_sidecars_are_counted() {
    let c = TwoClusters::start().await;
    for _ in 0..3 {
        let mut tcp = tokio::net::TcpStream::connect(c.east.handle.local_addr())
            .await
            .unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let resp = tunnel::read_response(&mut tcp).await.unwrap();
        assert_eq!(resp.code, ReasonCode::BadRequest);
    }
    let mut tcp = tokio::net::TcpStream::connect(c.east.handle.local_addr())
        .await
        .unwrap();
    let mut bytes = request("ratings.default", "west").encode().unwrap();
    bytes[4] = 2; // a future version
    tcp.write_all(&bytes).await.unwrap();
    let resp = tunnel::read_response(&mut tcp).await.unwrap();
    assert_eq!(resp.code, ReasonCode::BadRequest);
    assert!(resp.message.contains("version 2"), "{}", resp.message);
    let m = c.east.handle.metrics();
    assert_eq!(
        m.rejected_count(Source::Local, Rejection::MalformedHeader),
        3
    );
    assert_eq!(
        m.rejected_count(Source::Local, Rejection::UnsupportedHeaderVersion),
        1
    );
    assert_tunnel_carries(&c, b"still here").await;
}

async fn raw_quic_client(
    identity: Arc<Identity>,
    trust: Arc<TrustBundles>,
    gateway: std::net::SocketAddr,
) -> (
    quinn::Endpoint,
    Result<quinn::Connection, quinn::ConnectionError>,
) {
    let tls = tls::client_config(identity, trust, tls::accept_gateways(), &[ALPN]).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint.connect(gateway, MESH_SERVER_NAME).unwrap().await;
    (endpoint, conn)
}

#[tokio::test]
async fn malformed_headers_on_quic_streams_are_counted_and_the_connection_survives() {
    let c = TwoClusters::start().await;
    let (_ep, conn) = raw_quic_client(
        c.east_ca.gateway_identity(),
        c.trust.clone(),
        c.west.handle.quic_addr(),
    )
    .await;
    let conn = conn.unwrap();
    for bytes in [&b"\x16\x03\x01\x00\xa5garbage"[..], b"ISTH\x07\x01\x00\x00"] {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        let resp = tunnel::read_response(&mut recv).await.unwrap();
        assert_eq!(resp.code, ReasonCode::BadRequest, "{}", resp.message);
    }
    let m = c.west.handle.metrics();
    assert_eq!(
        m.rejected_count(Source::Peer, Rejection::MalformedHeader),
        1
    );
    assert_eq!(
        m.rejected_count(Source::Peer, Rejection::UnsupportedHeaderVersion),
        1
    );
    assert!(conn.close_reason().is_none());
}

#[tokio::test]
async fn unauthorized_certificates_are_counted_as_failed_handshakes() {
    let c = TwoClusters::start().await;
    // East's name, a CA west does not trust.
    let rogue = ClusterCa::new("east");
    let rogue_trust = trust(&[&rogue, &c.west_ca]);
    for _ in 0..3 {
        let (_ep, conn) = raw_quic_client(
            rogue.gateway_identity(),
            rogue_trust.clone(),
            c.west.handle.quic_addr(),
        )
        .await;
        // The client may think it is connected until the server's refusal arrives.
        if let Ok(conn) = conn {
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
        }
    }
    let m = c.west.handle.metrics();
    counted(&m, Source::Peer, Rejection::HandshakeFailed, 3).await;
    assert_tunnel_carries(&c, b"still here").await;
}

#[tokio::test]
async fn a_verified_gateway_of_no_member_cluster_is_counted_as_unauthorized() {
    let c = TwoClusters::start().await;
    let north = ClusterCa::new("north");
    c.trust
        .replace([
            (trust_domain("east").as_str(), c.east_ca.ca.cert_pem()),
            (trust_domain("west").as_str(), c.west_ca.ca.cert_pem()),
            (trust_domain("north").as_str(), north.ca.cert_pem()),
        ])
        .unwrap();
    let (_ep, conn) = raw_quic_client(
        north.gateway_identity(),
        c.trust.clone(),
        c.west.handle.quic_addr(),
    )
    .await;
    let conn = conn.unwrap();
    let mut req = request("ratings.default", "west");
    req.source_cluster = "north".into();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    tunnel::write_request(&mut send, &req).await.unwrap();
    let resp = tunnel::read_response(&mut recv).await.unwrap();
    assert_eq!(resp.code, ReasonCode::Forbidden, "{}", resp.message);
    let m = c.west.handle.metrics();
    assert_eq!(
        m.rejected_count(Source::Peer, Rejection::UnauthorizedPeer),
        1
    );
}

/// A tunnel from east's sidecar port to west's ratings that west has answered `Ok`, before
/// any payload.
async fn opened_tunnel(c: &TwoClusters) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(c.east.handle.local_addr())
        .await
        .unwrap();
    tunnel::write_request(&mut tcp, &request("ratings.default", "west"))
        .await
        .unwrap();
    let resp = tunnel::read_response(&mut tcp).await.unwrap();
    assert!(resp.is_ok(), "{resp:?}");
    tcp
}

#[tokio::test]
async fn a_tunnel_that_does_not_start_with_a_tls_client_hello_never_leaves_the_cluster() {
    let c = TwoClusters::start().await;
    let m = c.east.handle.metrics();
    for plaintext in [
        &b"GET / HTTP/1.1\r\nHost: ratings\r\n\r\n"[..],
        b"PRI * HTTP/2.0\r\n",
    ] {
        let mut tcp = opened_tunnel(&c).await;
        tcp.write_all(plaintext).await.unwrap();
        // Refused with a reset: nothing comes back, not even the echo of what was sent.
        let mut back = Vec::new();
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut back),
        )
        .await
        .expect("the gateway closes the connection");
        assert!(
            read.is_err() || back.is_empty(),
            "plaintext crossed: {:?}",
            String::from_utf8_lossy(&back)
        );
    }
    assert_eq!(m.rejected_count(Source::Local, Rejection::NotTls), 2);
    // East reset the peer streams with NOT_TLS, so west counts the refusals too.
    let west = c.west.handle.metrics();
    counted(&west, Source::Peer, Rejection::NotTls, 2).await;

    // A caller that goes away before sending anything is not a plaintext caller: neither
    // side counts it.
    drop(opened_tunnel(&c).await);
    // A tunnel that starts as TLS does is carried as before (and the one above has ended
    // by the time this one is through).
    assert_tunnel_carries(&c, b"still here").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(m.rejected_count(Source::Local, Rejection::NotTls), 2);
    assert_eq!(west.rejected_count(Source::Peer, Rejection::NotTls), 2);
}

#[tokio::test]
async fn a_peer_stream_that_does_not_start_with_a_tls_client_hello_never_reaches_the_endpoint() {
    // A member's gateway that skips its own check (compromised, or another implementation):
    // the receiving gateway checks again before it writes a byte to the endpoint.
    let c = TwoClusters::start().await;
    let (_ep, conn) = raw_quic_client(
        c.east_ca.gateway_identity(),
        c.trust.clone(),
        c.west.handle.quic_addr(),
    )
    .await;
    let conn = conn.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut req = request("ratings.default", "west");
    req.source_cluster = "east".into();
    tunnel::write_request(&mut send, &req).await.unwrap();
    let resp = tunnel::read_response(&mut recv).await.unwrap();
    assert!(resp.is_ok(), "{resp:?}");
    send.write_all(b"GET / HTTP/1.1\r\nHost: ratings\r\n\r\n")
        .await
        .unwrap();
    // The stream is reset; the echo endpoint sends nothing back because it got nothing.
    let read = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(64 * 1024))
        .await
        .expect("the gateway ends the stream");
    assert!(
        read.as_ref().map_or(true, |back| back.is_empty()),
        "plaintext reached the endpoint: {read:?}"
    );
    let m = c.west.handle.metrics();
    counted(&m, Source::Peer, Rejection::NotTls, 1).await;
    assert!(conn.close_reason().is_none(), "only the stream is refused");
    // A tunnel that starts as TLS does is carried as before.
    assert_tunnel_carries(&c, b"still here").await;
}
