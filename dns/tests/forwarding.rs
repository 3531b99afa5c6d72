//! Questions outside the mesh go to fake upstream resolvers on 127.0.0.1.

mod common;

use std::time::Duration;

use common::*;
use hickory_proto::op::{Edns, Message, ResponseCode};
use hickory_proto::rr::RecordType;
use isthmus_dns::start;
use tokio::sync::watch;

#[tokio::test]
async fn outside_names_are_forwarded_and_relayed_with_the_client_id() {
    let upstream = udp_upstream().await;
    let (_tx, rx) = watch::channel(shop());
    let dns = start(options(vec![upstream.addr], Duration::from_secs(2)), rx)
        .await
        .unwrap();

    let mut req = request("example.com.", RecordType::A);
    req.metadata.id = 0x0101;
    let resp = udp_query(dns.udp_addr(), &req).await;
    assert_eq!(resp.metadata.id, 0x0101);
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert_eq!(a_answers(&resp), vec![UPSTREAM_ANSWER]);
    assert_eq!(resp.queries, req.queries);
    assert_eq!(upstream.received(), 1);
    dns.shutdown().await;
}

#[tokio::test]
async fn forwarded_questions_keep_their_edns_record() {
    let upstream = udp_upstream().await;
    let (_tx, rx) = watch::channel(shop());
    let dns = start(options(vec![upstream.addr], Duration::from_secs(2)), rx)
        .await
        .unwrap();
    let mut req = request("example.org.", RecordType::AAAA);
    let mut edns = Edns::new();
    edns.set_max_payload(1400);
    req.edns = Some(edns);
    let resp = udp_query(dns.udp_addr(), &req).await;
    assert_eq!(resp.metadata.id, req.metadata.id);

    // The upstream got the client's packet unchanged but for the id.
    let sent = req.to_vec().unwrap();
    let packets = upstream.packets();
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0][2..], sent[2..]);
    let forwarded = Message::from_vec(&packets[0]).unwrap();
    assert_eq!(forwarded.edns.map(|e| e.max_payload()), Some(1400));
    dns.shutdown().await;
}

#[tokio::test]
async fn outside_names_get_servfail_when_the_upstream_does_not_answer() {
    let silent = silent_upstream().await;
    let (_tx, rx) = watch::channel(shop());
    let dns = start(
        options(
            vec![silent.local_addr().unwrap()],
            Duration::from_millis(200),
        ),
        rx,
    )
    .await
    .unwrap();

    let req = request("example.com.", RecordType::A);
    let resp = udp_query(dns.udp_addr(), &req).await;
    assert_eq!(resp.metadata.id, req.metadata.id);
    assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(resp.queries, req.queries);
    assert!(resp.answers.is_empty());
    dns.shutdown().await;
}

#[tokio::test]
async fn outside_names_get_servfail_when_there_is_no_upstream() {
    let (dns, _tx) = proxy(shop()).await;
    let resp = udp_query(dns.udp_addr(), &request("example.com.", RecordType::A)).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);
    dns.shutdown().await;
}

#[tokio::test]
async fn the_next_upstream_is_tried_when_the_first_times_out() {
    let silent = silent_upstream().await;
    let upstream = udp_upstream().await;
    let (_tx, rx) = watch::channel(shop());
    let dns = start(
        options(
            vec![silent.local_addr().unwrap(), upstream.addr],
            Duration::from_millis(200),
        ),
        rx,
    )
    .await
    .unwrap();

    let resp = udp_query(dns.udp_addr(), &request("example.com.", RecordType::A)).await;
    assert_eq!(a_answers(&resp), vec![UPSTREAM_ANSWER]);
    assert_eq!(upstream.received(), 1);
    dns.shutdown().await;
}

#[tokio::test]
async fn tcp_questions_for_outside_names_are_forwarded_over_tcp() {
    // Nothing listens for UDP on the TCP upstream's port: forwarding over UDP would fail.
    let tcp = tcp_upstream().await;
    let (_tx, rx) = watch::channel(shop());
    let dns = start(options(vec![tcp.addr], Duration::from_secs(2)), rx)
        .await
        .unwrap();

    let mut req = request("example.net.", RecordType::A);
    req.metadata.id = 0x0202;
    let resp = tcp_query(dns.tcp_addr(), &req).await;
    assert_eq!(resp.metadata.id, 0x0202);
    assert_eq!(a_answers(&resp), vec![UPSTREAM_ANSWER]);
    assert_eq!(tcp.received(), 1);
    dns.shutdown().await;
}

#[tokio::test]
async fn mesh_names_never_reach_the_upstream() {
    let upstream = udp_upstream().await;
    let (_tx, rx) = watch::channel(shop());
    let dns = start(options(vec![upstream.addr], Duration::from_secs(2)), rx)
        .await
        .unwrap();
    for name in [
        "web.shop.svc.clusterset.local.",
        "nope.shop.svc.clusterset.local.",
        "web.shop.svc.clusterset.local.cluster.local.",
    ] {
        udp_query(dns.udp_addr(), &request(name, RecordType::A)).await;
    }
    assert_eq!(upstream.received(), 0);
    dns.shutdown().await;
}
