//! Gateways over time: start-up checks, peers that die, go silent, restart or move, idle
//! tunnels kept alive, and shutdown.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_core::identity::SpiffeId;
use isthmus_core::tunnel::ReasonCode;
use isthmus_gateway::{GatewayError, DEFAULT_IDLE_TIMEOUT};
use support::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Waits for the far end to close `tcp` and returns how long that took.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let outcome = tokio::time::timeout(within, tcp.read(&mut buf)).await;
    match outcome {
        Ok(Ok(0)) | Ok(Err(_)) => started.elapsed(),
        Ok(Ok(n)) => panic!("expected the tunnel to close, got {n} bytes"),
        Err(_) => panic!("the tunnel was still open after {within:?}"),
    }
}

#[tokio::test]
async fn a_silent_peer_is_declared_dead_within_about_a_second_and_its_tunnels_close() {
    let c = TwoClusters::start().await;
    let relay = udp_relay(c.west.handle.quic_addr()).await;
    c.east_sees_west_at(Some(relay.addr));
    let (mut tcp, resp) = open(
        c.east.handle.local_addr(),
        &request("ratings.default", "west"),
    )
    .await;
    assert!(resp.is_ok(), "{resp:?}");
    assert_eq!(echo_round_trip(&mut tcp, b"before").await, b"before");

    // Every packet is now lost, and nothing is closed: only keep-alives can tell.
    relay.dropping.store(true, Ordering::SeqCst);
    let took = closed_within(&mut tcp, Duration::from_secs(5)).await;
    assert!(
        took < DEFAULT_IDLE_TIMEOUT * 2,
        "dead peer noticed after {took:?}"
    );

    let (_, resp) = open(
        c.east.handle.local_addr(),
        &request("ratings.default", "west"),
    )
    .await;
    assert_eq!(resp.code, ReasonCode::Unreachable, "{}", resp.message);

    // When the path heals, east reconnects on its own.
    relay.dropping.store(false, Ordering::SeqCst);
    let local = c.east.handle.local_addr();
    let mut tcp = eventually(
        Duration::from_secs(10),
        "a tunnel after the path healed",
        || async move {
            let (tcp, resp) = open(local, &request("ratings.default", "west")).await;
            resp.is_ok().then_some(tcp)
        },
    )
    .await;
    assert_eq!(echo_round_trip(&mut tcp, b"after").await, b"after");
}

#[tokio::test]
async fn a_restarted_peer_gateway_is_reconnected_and_old_tunnels_close_at_once() {
    let TwoClusters {
        east_ca,
        west_ca,
        trust,
        east,
        west,
        echo,
    } = TwoClusters::start().await;
    let (mut tcp, resp) = open(
        east.handle.local_addr(),
        &request("ratings.default", "west"),
    )
    .await;
    assert!(resp.is_ok(), "{resp:?}");
    assert_eq!(echo_round_trip(&mut tcp, b"one").await, b"one");

    let west_addr = west.handle.quic_addr();
    let west_config = west.config.borrow().clone();
    west.handle.shutdown().await;
    // A clean shutdown sends CONNECTION_CLOSE: no need to wait for the idle timeout.
    let took = closed_within(&mut tcp, Duration::from_secs(5)).await;
    assert!(
        took < Duration::from_millis(900),
        "old tunnel closed after {took:?}"
    );

    let mut opts = options("west", west_ca.gateway_identity(), trust.clone());
    opts.quic_listen = west_addr;
    let _west = start_gateway(opts, (*west_config).clone()).await;
    let local = east.handle.local_addr();
    let mut tcp = eventually(
        Duration::from_secs(10),
        "a tunnel to the restarted west",
        || async move {
            let (tcp, resp) = open(local, &request("ratings.default", "west")).await;
            resp.is_ok().then_some(tcp)
        },
    )
    .await;
    assert_eq!(echo_round_trip(&mut tcp, b"two").await, b"two");
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 2);
    drop(east_ca);
}

#[tokio::test]
async fn a_peer_gateway_that_moved_is_followed_to_its_new_address() {
    let c = TwoClusters::start().await;
    let (mut tcp, resp) = open(
        c.east.handle.local_addr(),
        &request("ratings.default", "west"),
    )
    .await;
    assert!(resp.is_ok(), "{resp:?}");
    assert_eq!(echo_round_trip(&mut tcp, b"old").await, b"old");

    // A second west gateway with its own endpoint; east is told west's gateway moved there.
    let moved_echo = echo_server().await;
    let moved = start_gateway(
        options("west", c.west_ca.gateway_identity(), c.trust.clone()),
        config(
            "west",
            vec![service(
                "ratings",
                true,
                vec![endpoint(moved_echo.addr, "v1", true)],
            )],
            c.clusters(),
        ),
    )
    .await;
    c.east_sees_west_at(Some(moved.handle.quic_addr()));
    let (mut tcp, resp) = open(
        c.east.handle.local_addr(),
        &request("ratings.default", "west"),
    )
    .await;
    assert!(resp.is_ok(), "{resp:?}");
    assert_eq!(echo_round_trip(&mut tcp, b"new").await, b"new");
    assert_eq!(moved_echo.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(c.echo.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_idle_tunnel_outlives_the_idle_timeout_on_keep_alives() {
    let c = TwoClusters::start().await;
    let (mut tcp, resp) = open(
        c.east.handle.local_addr(),
        &request("ratings.default", "west"),
    )
    .await;
    assert!(resp.is_ok(), "{resp:?}");
    // Nothing to wait for here: the point is that idle time passes and nothing breaks.
    tokio::time::sleep(DEFAULT_IDLE_TIMEOUT * 2).await;
    assert_eq!(
        echo_round_trip(&mut tcp, b"still open").await,
        b"still open"
    );
}

#[tokio::test]
async fn shutdown_closes_the_local_listener_and_ends_tunnels() {
    let TwoClusters {
        east, echo, west, ..
    } = TwoClusters::start().await;
    let local = east.handle.local_addr();
    let (mut tcp, resp) = open(local, &request("ratings.default", "west")).await;
    assert!(resp.is_ok(), "{resp:?}");
    east.handle.shutdown().await;
    closed_within(&mut tcp, Duration::from_secs(5)).await;
    assert!(
        TcpStream::connect(local).await.is_err(),
        "the local listener is still open"
    );
    drop((echo, west));
}

#[tokio::test]
async fn invalid_options_are_refused_by_name() {
    let east = ClusterCa::new("east");
    let trust = trust(&[&east]);
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(config("east", vec![], vec![])));

    let mut opts = options("east", east.gateway_identity(), trust.clone());
    opts.keep_alive = opts.idle_timeout;
    let err = isthmus_gateway::start(opts, rx.clone()).await.unwrap_err();
    assert!(
        matches!(
            err,
            GatewayError::InvalidOptions {
                field: "keep_alive",
                ..
            }
        ),
        "{err}"
    );

    let workload = east.identity(SpiffeId::new(&trust_domain("east"), "default", "sleep"));
    let err = isthmus_gateway::start(options("east", workload, trust.clone()), rx.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            GatewayError::InvalidOptions {
                field: "identity",
                ..
            }
        ),
        "{err}"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut opts = options("east", east.gateway_identity(), trust);
    opts.local_listen = taken.local_addr().unwrap();
    let err = isthmus_gateway::start(opts, rx).await.unwrap_err();
    assert!(matches!(err, GatewayError::BindLocal { .. }), "{err}");
}
