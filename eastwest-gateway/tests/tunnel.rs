//! The gateway pair end to end on loopback: tunnels that work, every refusal a caller can see,
//! and certificates that must not get through.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_core::identity::SpiffeId;
use isthmus_core::tls::{self, Identity, TrustBundles, MESH_SERVER_NAME};
use isthmus_core::tunnel::{self, OpenRequest, OpenResponse, ReasonCode};
use isthmus_gateway::ALPN;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn sidecar_bytes_cross_to_a_west_endpoint_and_back() {
    let c = TwoClusters::start().await;
    let mut req = request("ratings.default", "west");
    req.trace_context = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    let (mut tcp, resp) = open(c.east.handle.local_addr(), &req).await;
    assert_eq!(resp.code, ReasonCode::Ok, "{}", resp.message);

    assert_eq!(
        echo_round_trip(&mut tcp, b"hello west").await,
        b"hello west"
    );
    let big: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    assert_eq!(echo_round_trip(&mut tcp, &big).await, big);

    // Half-close: the endpoint sees our end of stream only after the tunnel carried it, and
    // still gets to answer before closing its side.
    tcp.write_all(b"last words").await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest, b"last words");
    assert_eq!(c.echo.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn concurrent_tunnels_each_carry_their_own_bytes() {
    let c = TwoClusters::start().await;
    let local = c.east.handle.local_addr();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..24u32 {
        tasks.spawn(async move {
            let (mut tcp, resp) = open(local, &request("ratings.default", "west")).await;
            assert!(resp.is_ok(), "{resp:?}");
            let data = format!("tunnel {i} says hi").repeat(100).into_bytes();
            assert_eq!(echo_round_trip(&mut tcp, &data).await, data);
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!(c.echo.accepted.load(Ordering::SeqCst), 24);
}

#[tokio::test]
async fn services_west_does_not_export_are_refused_with_unknown_service() {
    let mut c = TwoClusters::start().await;
    c.publish(vec![
        service("ratings", true, vec![endpoint(c.echo.addr, "v1", true)]),
        service("internal", false, vec![endpoint(c.echo.addr, "v1", true)]),
    ]);
    for name in [
        "internal.default",
        "nonexistent.default",
        "ratings.other-namespace",
    ] {
        let (_, resp) = open(c.east.handle.local_addr(), &request(name, "west")).await;
        assert_eq!(
            resp.code,
            ReasonCode::UnknownService,
            "{name}: {}",
            resp.message
        );
        assert!(resp.message.contains(name), "{}", resp.message);
    }
    let mut wrong_port = request("ratings.default", "west");
    wrong_port.port = SERVICE_PORT + 1;
    let (_, resp) = open(c.east.handle.local_addr(), &wrong_port).await;
    assert_eq!(resp.code, ReasonCode::UnknownService, "{}", resp.message);
    assert_eq!(c.echo.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_service_without_healthy_endpoints_is_refused_with_no_healthy_endpoint() {
    let mut c = TwoClusters::start().await;
    c.publish(vec![service(
        "ratings",
        true,
        vec![endpoint(c.echo.addr, "v1", false)],
    )]);
    let (_, resp) = open(
        c.east.handle.local_addr(),
        &request("ratings.default", "west"),
    )
    .await;
    assert_eq!(resp.code, ReasonCode::NoHealthyEndpoint, "{}", resp.message);

    // Healthy, but in another subset than the one asked for.
    c.publish(vec![service(
        "ratings",
        true,
        vec![endpoint(c.echo.addr, "v1", true)],
    )]);
    let mut v2 = request("ratings.default", "west");
    v2.subset = Some("version=v2".into());
    let (_, resp) = open(c.east.handle.local_addr(), &v2).await;
    assert_eq!(resp.code, ReasonCode::NoHealthyEndpoint, "{}", resp.message);
    assert_eq!(c.echo.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_endpoint_that_refuses_connections_is_reported_as_no_healthy_endpoint() {
    let mut c = TwoClusters::start().await;
    let closed = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    c.publish(vec![service(
        "ratings",
        true,
        vec![endpoint(closed, "v1", true)],
    )]);
    let (_, resp) = open(
        c.east.handle.local_addr(),
        &request("ratings.default", "west"),
    )
    .await;
    assert_eq!(resp.code, ReasonCode::NoHealthyEndpoint, "{}", resp.message);
}

#[tokio::test]
async fn subsets_route_only_to_matching_endpoints() {
    let mut c = TwoClusters::start().await;
    let v2 = echo_server().await;
    c.publish(vec![service(
        "ratings",
        true,
        vec![
            endpoint(c.echo.addr, "v1", true),
            endpoint(v2.addr, "v2", true),
        ],
    )]);
    for _ in 0..4 {
        let mut req = request("ratings.default", "west");
        req.subset = Some("v2".into());
        let (mut tcp, resp) = open(c.east.handle.local_addr(), &req).await;
        assert!(resp.is_ok(), "{resp:?}");
        assert_eq!(echo_round_trip(&mut tcp, b"v2?").await, b"v2?");
    }
    assert_eq!(v2.accepted.load(Ordering::SeqCst), 4);
    assert_eq!(c.echo.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn open_tunnels_spread_over_endpoints_by_load() {
    let mut c = TwoClusters::start().await;
    let other = echo_server().await;
    c.publish(vec![service(
        "ratings",
        true,
        vec![
            endpoint(c.echo.addr, "v1", true),
            endpoint(other.addr, "v1", true),
        ],
    )]);
    let mut held = Vec::new();
    for _ in 0..6 {
        let (mut tcp, resp) = open(
            c.east.handle.local_addr(),
            &request("ratings.default", "west"),
        )
        .await;
        assert!(resp.is_ok(), "{resp:?}");
        assert_eq!(echo_round_trip(&mut tcp, b"x").await, b"x");
        held.push(tcp);
    }
    assert_eq!(c.echo.accepted.load(Ordering::SeqCst), 3);
    assert_eq!(other.accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_cluster_with_no_known_gateway_is_unreachable_at_once() {
    let c = TwoClusters::start().await;
    c.east_sees_west_at(None);
    for target in ["west", "north"] {
        let started = Instant::now();
        let (_, resp) = open(
            c.east.handle.local_addr(),
            &request("ratings.default", target),
        )
        .await;
        assert_eq!(
            resp.code,
            ReasonCode::Unreachable,
            "{target}: {}",
            resp.message
        );
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn a_dead_gateway_address_is_unreachable_within_about_a_second() {
    let c = TwoClusters::start().await;
    // A UDP socket that never answers: the QUIC handshake gets no reply.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    c.east_sees_west_at(Some(silent.local_addr().unwrap()));
    let started = Instant::now();
    let (_, resp) = open(
        c.east.handle.local_addr(),
        &request("ratings.default", "west"),
    )
    .await;
    assert_eq!(resp.code, ReasonCode::Unreachable, "{}", resp.message);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );

    // Callers queued behind the failed attempt share its outcome instead of each waiting.
    let local = c.east.handle.local_addr();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        tasks.spawn(async move { open(local, &request("ratings.default", "west")).await.1 });
    }
    while let Some(resp) = tasks.join_next().await {
        assert_eq!(resp.unwrap().code, ReasonCode::Unreachable);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_request_for_the_gateways_own_cluster_is_a_bad_request() {
    let c = TwoClusters::start().await;
    let (_, resp) = open(
        c.east.handle.local_addr(),
        &request("ratings.default", "east"),
    )
    .await;
    assert_eq!(resp.code, ReasonCode::BadRequest, "{}", resp.message);
}

#[tokio::test]
async fn garbage_from_a_sidecar_gets_bad_request_and_the_gateway_keeps_serving() {
    let c = TwoClusters::start().await;
    let mut tcp = tokio::net::TcpStream::connect(c.east.handle.local_addr())
        .await
        .unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: ratings\r\n\r\n")
        .await
        .unwrap();
    let resp = tunnel::read_response(&mut tcp).await.unwrap();
    assert_eq!(resp.code, ReasonCode::BadRequest);
    assert!(
        resp.message.contains("not a tunnel header"),
        "{}",
        resp.message
    );

    // A well-framed header with a bad field is named in the answer.
    let mut tcp = tokio::net::TcpStream::connect(c.east.handle.local_addr())
        .await
        .unwrap();
    let mut bytes = request("ratings.default", "west").encode().unwrap();
    bytes[4] = 9; // version
    tcp.write_all(&bytes).await.unwrap();
    let resp = tunnel::read_response(&mut tcp).await.unwrap();
    assert_eq!(resp.code, ReasonCode::BadRequest);
    assert!(resp.message.contains("version 9"), "{}", resp.message);

    assert_tunnel_carries(&c, b"still here").await;
}

#[tokio::test]
async fn an_impostor_west_gateway_from_an_unknown_ca_is_refused_by_east() {
    let c = TwoClusters::start().await;
    // Same trust domain and gateway identity as west, but signed by a CA nobody trusts.
    let rogue_ca = ClusterCa::new("west");
    let rogue_trust = trust(&[&c.east_ca, &rogue_ca]);
    let impostor = start_gateway(
        options("west", rogue_ca.gateway_identity(), rogue_trust),
        config(
            "west",
            vec![service(
                "ratings",
                true,
                vec![endpoint(c.echo.addr, "v1", true)],
            )],
            vec![
                c.east_ca.info(Some(c.east.handle.quic_addr())),
                rogue_ca.info(None),
            ],
        ),
    )
    .await;
    c.east_sees_west_at(Some(impostor.handle.quic_addr()));
    let (_, resp) = open(
        c.east.handle.local_addr(),
        &request("ratings.default", "west"),
    )
    .await;
    assert_eq!(resp.code, ReasonCode::Unreachable, "{}", resp.message);
    assert!(resp.message.contains("handshake"), "{}", resp.message);
    assert_eq!(c.echo.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_impostor_east_gateway_from_an_unknown_ca_is_refused_by_west() {
    let c = TwoClusters::start().await;
    // Claims to be east's gateway with a certificate from a CA west does not trust; it trusts
    // west's real CA, so only west's check can stop it.
    let rogue_ca = ClusterCa::new("east");
    let rogue_trust = trust(&[&rogue_ca, &c.west_ca]);
    let impostor = start_gateway(
        options("east", rogue_ca.gateway_identity(), rogue_trust),
        config(
            "east",
            vec![],
            vec![
                rogue_ca.info(None),
                c.west_ca.info(Some(c.west.handle.quic_addr())),
            ],
        ),
    )
    .await;
    let (_, resp) = open(
        impostor.handle.local_addr(),
        &request("ratings.default", "west"),
    )
    .await;
    assert_eq!(resp.code, ReasonCode::Unreachable, "{}", resp.message);
    assert_eq!(c.echo.accepted.load(Ordering::SeqCst), 0);

    // The real east still gets through.
    let (_, resp) = open(
        c.east.handle.local_addr(),
        &request("ratings.default", "west"),
    )
    .await;
    assert!(resp.is_ok(), "{resp:?}");
}

#[tokio::test]
async fn a_gateway_of_a_cluster_that_is_not_a_member_is_forbidden() {
    let c = TwoClusters::start().await;
    // North's CA is in the bundles (so TLS admits it) but north is not in west's config.
    let north_ca = ClusterCa::new("north");
    c.trust
        .replace([
            (trust_domain("east").as_str(), c.east_ca.ca.cert_pem()),
            (trust_domain("west").as_str(), c.west_ca.ca.cert_pem()),
            (trust_domain("north").as_str(), north_ca.ca.cert_pem()),
        ])
        .unwrap();
    let north = start_gateway(
        options("north", north_ca.gateway_identity(), c.trust.clone()),
        config(
            "north",
            vec![],
            vec![
                north_ca.info(None),
                c.west_ca.info(Some(c.west.handle.quic_addr())),
            ],
        ),
    )
    .await;
    let (_, resp) = open(
        north.handle.local_addr(),
        &request("ratings.default", "west"),
    )
    .await;
    assert_eq!(resp.code, ReasonCode::Forbidden, "{}", resp.message);
    assert_eq!(c.echo.accepted.load(Ordering::SeqCst), 0);
}

/// A bare QUIC client presenting `identity`, connected to `gateway`.
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

/// Opens a stream, writes `bytes`, and reads the response (or the error that ended it).
async fn raw_exchange(conn: &quinn::Connection, bytes: &[u8]) -> Result<OpenResponse, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(bytes).await.map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(5), tunnel::read_response(&mut recv))
        .await
        .map_err(|_| "no response within 5s".to_string())?
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn garbage_on_a_quic_stream_is_answered_with_bad_request() {
    let c = TwoClusters::start().await;
    let (_ep, conn) = raw_quic_client(
        c.east_ca.gateway_identity(),
        c.trust.clone(),
        c.west.handle.quic_addr(),
    )
    .await;
    let conn = conn.unwrap();
    let resp = raw_exchange(&conn, b"\x16\x03\x01\x00\xa5garbage")
        .await
        .unwrap();
    assert_eq!(resp.code, ReasonCode::BadRequest, "{}", resp.message);

    // The connection survives a bad stream: a good request on it still works.
    let mut req = request("ratings.default", "west");
    req.source_cluster = "east".into();
    let resp = raw_exchange(&conn, &req.encode().unwrap()).await.unwrap();
    assert!(resp.is_ok(), "{resp:?}");
}

#[tokio::test]
async fn a_gateway_claiming_another_source_cluster_is_forbidden() {
    let c = TwoClusters::start().await;
    let (_ep, conn) = raw_quic_client(
        c.east_ca.gateway_identity(),
        c.trust.clone(),
        c.west.handle.quic_addr(),
    )
    .await;
    let conn = conn.unwrap();
    for claimed in ["west", "north", ""] {
        let mut req: OpenRequest = request("ratings.default", "west");
        req.source_cluster = claimed.into();
        let resp = raw_exchange(&conn, &req.encode().unwrap()).await.unwrap();
        assert_eq!(
            resp.code,
            ReasonCode::Forbidden,
            "{claimed:?}: {}",
            resp.message
        );
    }
    assert_eq!(c.echo.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_workload_certificate_is_not_accepted_as_a_gateway() {
    let c = TwoClusters::start().await;
    let workload = c
        .east_ca
        .identity(SpiffeId::new(&trust_domain("east"), "default", "sleep"));
    let (_ep, conn) = raw_quic_client(workload, c.trust.clone(), c.west.handle.quic_addr()).await;
    let outcome = match conn {
        Err(e) => Err(e.to_string()),
        Ok(conn) => {
            let mut req = request("ratings.default", "west");
            req.source_cluster = "east".into();
            raw_exchange(&conn, &req.encode().unwrap()).await
        }
    };
    assert!(
        outcome.is_err(),
        "a workload identity opened a tunnel: {outcome:?}"
    );
    assert_eq!(c.echo.accepted.load(Ordering::SeqCst), 0);
}
