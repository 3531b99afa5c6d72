//! The connection between two gateways: one connection used both ways, resumed handshakes,
//! fast failure signals when the peer dies, a peer restarted under load, and the
//! TLS-over-TCP transport.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_core::mesh::MeshConfig;
use isthmus_core::tunnel::ReasonCode;
use isthmus_gateway::metrics::{Direction, Role};
use isthmus_gateway::Transport;
use support::*;
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn one_connection_carries_tunnels_both_ways() {
    let mut c = TwoClusters::start().await;
    let east_echo = echo_server().await;
    c.publish_both(
        vec![service(
            "details",
            true,
            vec![endpoint(east_echo.addr, "v1", true)],
        )],
        vec![service(
            "ratings",
            true,
            vec![endpoint(c.echo.addr, "v1", true)],
        )],
    );
    assert_tunnel_carries(&c, b"east to west").await;

    // West calls east on the connection east dialled (west adopts it once it is accepted).
    let west_local = c.west.handle.local_addr();
    let mut back = eventually(
        Duration::from_secs(5),
        "a tunnel from west to east",
        || async move {
            let (tcp, resp) = open(west_local, &request("details.default", "east")).await;
            resp.is_ok().then_some(tcp)
        },
    )
    .await;
    assert_eq!(
        echo_round_trip(&mut back, b"west to east").await,
        b"west to east"
    );

    let east = c.east.handle.metrics();
    let west = c.west.handle.metrics();
    assert_eq!(east.handshake_count("west", Role::Client), 1);
    assert_eq!(west.handshake_count("east", Role::Server), 1);
    assert_eq!(
        west.handshake_count("east", Role::Client),
        0,
        "west dialled its own connection"
    );
    assert_eq!(east.handshake_count("west", Role::Server), 0);
    assert_eq!(
        west.stream_count("east", Direction::Outbound, ReasonCode::Ok),
        1
    );
    assert_eq!(
        east.stream_count("west", Direction::Inbound, ReasonCode::Ok),
        1
    );
}

#[tokio::test]
async fn a_reconnect_resumes_the_tls_session() {
    let c = TwoClusters::start().await;
    let local = c.east.handle.local_addr();
    let (mut tcp, resp) = open(local, &request("ratings.default", "west")).await;
    assert!(resp.is_ok(), "{resp:?}");
    assert_eq!(echo_round_trip(&mut tcp, b"first").await, b"first");
    let east = c.east.handle.metrics();
    let west = c.west.handle.metrics();
    assert_eq!(east.resumption_count(Role::Client), 0);

    // West's gateway disappears from east's view (east closes the connection, and the open
    // tunnel with it) and comes back: a new connection.
    c.east_sees_west_at(None);
    let mut buf = [0u8; 8];
    let ended = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
    assert!(matches!(ended, Ok(Ok(0)) | Ok(Err(_))), "{ended:?}");
    c.east_sees_west_at(Some(c.west.handle.quic_addr()));
    let east2 = east.clone();
    eventually(Duration::from_secs(10), "a second handshake", || {
        let east = east2.clone();
        async move {
            let (tcp, resp) = open(local, &request("ratings.default", "west")).await;
            drop(tcp);
            (resp.is_ok() && east.handshake_count("west", Role::Client) == 2).then_some(())
        }
    })
    .await;
    assert_eq!(
        east.resumption_count(Role::Client),
        1,
        "east offered no ticket"
    );
    assert_eq!(
        west.resumption_count(Role::Server),
        1,
        "west did not resume the session"
    );
}

#[tokio::test]
async fn a_killed_peer_is_noticed_within_a_second_and_callers_fail_over_at_once() {
    let c = TwoClusters::start().await;
    let relay = udp_relay(c.west.handle.quic_addr()).await;
    c.east_sees_west_at(Some(relay.addr));
    let local = c.east.handle.local_addr();
    let (mut tcp, resp) = open(local, &request("ratings.default", "west")).await;
    assert!(resp.is_ok(), "{resp:?}");
    assert_eq!(echo_round_trip(&mut tcp, b"alive").await, b"alive");

    // Like a SIGKILL or a cut cable: no close, no answer, only silence. A dead west cannot
    // dial east either (it would otherwise, and east would rightly adopt that connection).
    c.west_forgets_east();
    relay.dropping.store(true, Ordering::SeqCst);
    let killed = Instant::now();
    let mut buf = [0u8; 8];
    let ended = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
    assert!(matches!(ended, Ok(Ok(0)) | Ok(Err(_))), "{ended:?}");
    let noticed = killed.elapsed();
    assert!(
        noticed < Duration::from_millis(1500),
        "noticed after {noticed:?}"
    );

    // From now on the local sidecars hear Unreachable at once, not after a handshake timeout.
    for _ in 0..5 {
        let asked = Instant::now();
        let (_, resp) = open(local, &request("ratings.default", "west")).await;
        assert_eq!(resp.code, ReasonCode::Unreachable, "{}", resp.message);
        assert!(
            asked.elapsed() < Duration::from_millis(200),
            "answered after {:?}",
            asked.elapsed()
        );
    }
    let east = c.east.handle.metrics();
    assert!(east.stream_count("west", Direction::Outbound, ReasonCode::Unreachable) >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_gateway_restarted_under_load_costs_a_bounded_outage() {
    let TwoClusters {
        west_ca,
        trust,
        east,
        west,
        echo,
        east_ca,
        ..
    } = TwoClusters::start().await;
    let local = east.handle.local_addr();
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let slowest_failure = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (ok, failed, slowest, stop) = (
            ok.clone(),
            failed.clone(),
            slowest_failure.clone(),
            stop.clone(),
        );
        load.spawn(async move {
            // Bounded: stops when told, or after 20 s whatever happens.
            let until = Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::SeqCst) && Instant::now() < until {
                let asked = Instant::now();
                let (mut tcp, resp) = open(local, &request("ratings.default", "west")).await;
                if resp.is_ok() {
                    let mut buf = [0u8; 4];
                    use tokio::io::AsyncWriteExt;
                    let good = tcp.write_all(b"load").await.is_ok()
                        && tokio::time::timeout(Duration::from_secs(2), tcp.read_exact(&mut buf))
                            .await
                            .is_ok_and(|r| r.is_ok());
                    if good {
                        ok.fetch_add(1, Ordering::SeqCst);
                    } else {
                        // A tunnel the restart broke: count it, and pace like a refusal.
                        failed.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                } else {
                    assert_eq!(resp.code, ReasonCode::Unreachable, "{}", resp.message);
                    failed.fetch_add(1, Ordering::SeqCst);
                    let took = asked.elapsed();
                    {
                        let mut s = slowest.lock().unwrap();
                        *s = (*s).max(took);
                    }
                    // A sidecar would try elsewhere; here, pace the retries.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
    }
    eventually(Duration::from_secs(5), "traffic flowing", || {
        let ok = ok.clone();
        async move { (ok.load(Ordering::SeqCst) >= 50).then_some(()) }
    })
    .await;

    let west_addr = west.handle.quic_addr();
    let west_config = west.config.borrow().clone();
    // The outage starts when the shutdown does (tunnels break as it closes the endpoint).
    let down_at = Instant::now();
    west.handle.shutdown().await;
    let mut opts = options("west", west_ca.gateway_identity(), trust.clone());
    opts.quic_listen = west_addr;
    let _west = start_gateway(opts, (*west_config).clone()).await;

    let ok_at_restart = ok.load(Ordering::SeqCst);
    eventually(Duration::from_secs(10), "traffic flowing again", || {
        let ok = ok.clone();
        async move { (ok.load(Ordering::SeqCst) >= ok_at_restart + 50).then_some(()) }
    })
    .await;
    let outage = down_at.elapsed();
    stop.store(true, Ordering::SeqCst);
    while let Some(done) = load.join_next().await {
        done.unwrap();
    }
    let failures = failed.load(Ordering::SeqCst);
    let slowest = *slowest_failure.lock().unwrap();
    eprintln!("restart: {failures} failed requests, traffic back after {outage:?}, slowest refusal {slowest:?}");
    assert!(
        outage < Duration::from_secs(4),
        "traffic back only after {outage:?}"
    );
    // Refusals come at once (no caller waits out a handshake timeout), so failures are
    // bounded by the outage at the callers' retry pace: 4 callers, one try per >=10 ms.
    assert!(
        slowest < Duration::from_millis(2500),
        "a refusal took {slowest:?}"
    );
    assert!(
        failures <= 4 * (outage.as_millis() as usize / 10 + 1) + 8,
        "{failures} failures"
    );
    drop((echo, east_ca, east));
}

#[tokio::test]
async fn the_tls_over_tcp_transport_carries_tunnels_and_refusals() {
    let mut c = TwoClusters::start_with(Transport::TlsTcp).await;
    let local = c.east.handle.local_addr();
    for i in 0..3 {
        let (mut tcp, resp) = open(local, &request("ratings.default", "west")).await;
        assert!(resp.is_ok(), "{resp:?}");
        let data = format!("over tls {i}").repeat(1000).into_bytes();
        assert_eq!(echo_round_trip(&mut tcp, &data).await, data);
    }
    c.publish(vec![service(
        "ratings",
        true,
        vec![endpoint(c.echo.addr, "v1", false)],
    )]);
    let (_, resp) = open(local, &request("ratings.default", "west")).await;
    assert_eq!(resp.code, ReasonCode::NoHealthyEndpoint, "{}", resp.message);
    let (_, resp) = open(local, &request("nope.default", "west")).await;
    assert_eq!(resp.code, ReasonCode::UnknownService, "{}", resp.message);
    let east = c.east.handle.metrics();
    assert_eq!(east.handshake_count("west", Role::Client), 5);
    assert!(
        east.resumption_count(Role::Client) >= 4,
        "later tunnels resume the TLS session"
    );
    assert_eq!(c.echo.accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_peer_refused_for_want_of_its_bundle_is_dialled_again_as_soon_as_the_bundle_arrives() {
    let c = TwoClusters::start().await;
    // East does not trust west's CA yet: the handshake fails and east backs off.
    let east_td = isthmus_core::identity::default_trust_domain("east");
    c.trust
        .replace([(east_td.as_str(), c.east_ca.ca.cert_pem())])
        .unwrap();
    let (_, resp) = open(
        c.east.handle.local_addr(),
        &request("ratings.default", "west"),
    )
    .await;
    assert!(!resp.is_ok(), "{resp:?}");
    let failures = || {
        c.east
            .handle
            .metrics()
            .connect_failures
            .get_or_create(&isthmus_gateway::metrics::PeerLabels {
                peer: "west".into(),
            })
            .get()
    };
    // Six failed dials: the next one is 3.2 s to 4.8 s away by the backoff.
    eventually(Duration::from_secs(15), "six failed dials", || async {
        (failures() >= 6).then_some(())
    })
    .await;

    // West's bundle arrives: the tunnel works well before the backoff would have retried.
    c.trust
        .replace([
            (east_td.as_str(), c.east_ca.ca.cert_pem()),
            (
                isthmus_core::identity::default_trust_domain("west").as_str(),
                c.west_ca.ca.cert_pem(),
            ),
        ])
        .unwrap();
    eventually(Duration::from_millis(1500), "a tunnel to west", || async {
        let (_, resp) = open(
            c.east.handle.local_addr(),
            &request("ratings.default", "west"),
        )
        .await;
        resp.is_ok().then_some(())
    })
    .await;
}

#[tokio::test]
async fn gateways_connect_as_soon_as_the_configuration_names_them() {
    // Each gateway trusts only its own CA at first, as when a peer's bundle has not arrived.
    let east_ca = ClusterCa::new("east");
    let west_ca = ClusterCa::new("west");
    let east_trust = trust(&[&east_ca]);
    let west_trust = trust(&[&west_ca]);
    let east = start_gateway(
        options("east", east_ca.gateway_identity(), east_trust.clone()),
        MeshConfig::default(),
    )
    .await;
    let west = start_gateway(
        options("west", west_ca.gateway_identity(), west_trust.clone()),
        MeshConfig::default(),
    )
    .await;
    let clusters = vec![
        east_ca.info(Some(east.handle.quic_addr())),
        west_ca.info(Some(west.handle.quic_addr())),
    ];
    west.config
        .send_replace(Arc::new(config("west", vec![], clusters.clone())));
    east.config
        .send_replace(Arc::new(config("east", vec![], clusters)));

    // East (sorting first) dials west without any tunnel; the handshake fails for want of
    // the other's bundle, and the pair stays apart.
    eventually(Duration::from_secs(5), "east's first attempt", || async {
        (east.handle.metrics().connect_failure_count("west") > 0).then_some(())
    })
    .await;
    assert!(east.handle.connected_peers().await.is_empty());

    // The bundles arrive: connected at once (well before the reconnect backoff's cap), both
    // ways on one connection, with no tunnel opened.
    let arrived = Instant::now();
    for t in [&east_trust, &west_trust] {
        t.replace([
            (trust_domain("east").as_str(), east_ca.ca.cert_pem()),
            (trust_domain("west").as_str(), west_ca.ca.cert_pem()),
        ])
        .unwrap();
    }
    eventually(
        Duration::from_secs(5),
        "both gateways connected",
        || async {
            let east_sees = east.handle.connected_peers().await.contains("west");
            let west_sees = west.handle.connected_peers().await.contains("east");
            (east_sees && west_sees).then_some(())
        },
    )
    .await;
    assert!(
        arrived.elapsed() < Duration::from_secs(2),
        "connected {:?} after the bundles arrived",
        arrived.elapsed()
    );
    let (em, wm) = (east.handle.metrics(), west.handle.metrics());
    assert_eq!(
        wm.handshake_count("east", Role::Client),
        0,
        "west adopted east's connection"
    );
    assert_eq!(
        em.stream_count("west", Direction::Outbound, ReasonCode::Ok),
        0,
        "no tunnel was needed"
    );
}
