//! Configuration updates, static stability, binding and shutdown of a running proxy.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use isthmus_dns::{start, DnsError};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::time::Instant;

/// Asks for `name` until the answer satisfies `done`, failing after a deadline.
async fn poll_until(
    server: SocketAddr,
    name: &str,
    done: impl Fn(&hickory_proto::op::Message) -> bool,
) {
    let deadline = Instant::now() + ANSWER_WAIT;
    loop {
        let resp = udp_query(server, &request(name, RecordType::A)).await;
        if done(&resp) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never gave the expected answer; last: {resp}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_new_config_snapshot_is_reflected_in_answers() {
    let (dns, tx) = proxy(shop()).await;
    let api = "api.shop.svc.clusterset.local.";
    let resp = udp_query(dns.udp_addr(), &request(api, RecordType::A)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NXDomain);

    // api appears, web moves to a new VIP.
    tx.send_replace(config(
        2,
        vec![
            service("web", "240.240.0.100", &[]),
            service("api", "240.240.0.2", &[]),
        ],
    ));
    poll_until(dns.udp_addr(), api, |r| {
        a_answers(r) == vec![Ipv4Addr::new(240, 240, 0, 2)]
    })
    .await;
    poll_until(dns.udp_addr(), "web.shop.svc.clusterset.local.", |r| {
        a_answers(r) == vec![Ipv4Addr::new(240, 240, 0, 100)]
    })
    .await;

    // And api goes away again.
    tx.send_replace(config(3, vec![service("web", "240.240.0.100", &[])]));
    poll_until(dns.udp_addr(), api, |r| {
        r.metadata.response_code == ResponseCode::NXDomain
    })
    .await;
    dns.shutdown().await;
}

#[tokio::test]
async fn answers_continue_after_the_config_sender_is_dropped() {
    let (dns, tx) = proxy(shop()).await;
    tx.send_replace(config(2, vec![service("api", "240.240.0.2", &[])]));
    // The control plane goes away right after its last snapshot.
    drop(tx);
    for _ in 0..3 {
        let resp = udp_query(
            dns.udp_addr(),
            &request("api.shop.svc.clusterset.local.", RecordType::A),
        )
        .await;
        assert_eq!(a_answers(&resp), vec![Ipv4Addr::new(240, 240, 0, 2)]);
        let resp = tcp_query(
            dns.tcp_addr(),
            &request("api.shop.svc.clusterset.local.", RecordType::A),
        )
        .await;
        assert_eq!(a_answers(&resp), vec![Ipv4Addr::new(240, 240, 0, 2)]);
    }
    dns.shutdown().await;
}

#[tokio::test]
async fn port_zero_binds_udp_and_tcp_on_the_same_port() {
    let (dns, _tx) = proxy(shop()).await;
    assert_ne!(dns.udp_addr().port(), 0);
    assert_eq!(dns.udp_addr(), dns.tcp_addr());
    assert_eq!(dns.udp_addr().ip(), Ipv4Addr::LOCALHOST);
    dns.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_both_sockets() {
    let (dns, _tx) = proxy(shop()).await;
    let addr = dns.udp_addr();
    // An open client connection must not keep anything alive.
    let mut client = TcpStream::connect(addr).await.unwrap();
    tcp_exchange(
        &mut client,
        &request("web.shop.svc.clusterset.local.", RecordType::A),
    )
    .await;

    dns.shutdown().await;

    assert!(
        TcpStream::connect(addr).await.is_err(),
        "something still accepts TCP on {addr}"
    );
    UdpSocket::bind(addr)
        .await
        .expect("the UDP port is still bound");
    TcpListener::bind(addr)
        .await
        .expect("the TCP port is still bound");
}

#[tokio::test]
async fn a_zero_upstream_timeout_is_rejected() {
    let (_tx, rx) = watch::channel(shop());
    let err = start(options(vec![], Duration::ZERO), rx)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            DnsError::InvalidOption {
                field: "upstream_timeout",
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn binding_a_taken_port_names_the_operation() {
    let taken = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let (_tx, rx) = watch::channel(shop());
    let mut opts = options(vec![], Duration::from_secs(1));
    opts.listen = taken.local_addr().unwrap();
    let err = start(opts, rx).await.unwrap_err();
    assert!(matches!(err, DnsError::BindUdp { .. }), "{err}");
    assert!(std::error::Error::source(&err).is_some());
}

#[tokio::test]
async fn a_config_change_reaches_answers_within_100_ms() {
    // A mesh of a thousand services, so that rebuilding the table is part of what is measured.
    let services: Vec<_> = (0..1000u32)
        .map(|i| {
            let vip = format!("240.240.{}.{}", i / 250, i % 250 + 1);
            service(
                &format!("svc{i}"),
                &vip,
                &[("http", 80, isthmus_core::mesh::Protocol::Http)],
            )
        })
        .collect();
    let (dns, tx) = proxy(config(1, services.clone())).await;
    let name = "late.shop.svc.clusterset.local.";
    let resp = udp_query(dns.udp_addr(), &request(name, RecordType::A)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NXDomain);

    let mut next = services;
    next.push(service("late", "240.240.9.9", &[]));
    let sent = Instant::now();
    tx.send_replace(config(2, next));
    // Ask again and again, without pausing, until the new service answers.
    let deadline = sent + ANSWER_WAIT;
    loop {
        let resp = udp_query(dns.udp_addr(), &request(name, RecordType::A)).await;
        if a_answers(&resp) == vec![Ipv4Addr::new(240, 240, 9, 9)] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the change never arrived: {resp}"
        );
    }
    let elapsed = sent.elapsed();
    assert!(
        elapsed < Duration::from_millis(100),
        "the change took {elapsed:?} to reach answers"
    );
    dns.shutdown().await;
}
