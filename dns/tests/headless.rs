//! Headless services (Multi-Cluster Services DNS specification, §2.4.2) from a running proxy,
//! over real UDP and TCP sockets on 127.0.0.1.

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME, PTR, SRV};
use hickory_proto::rr::{Name, RData, RecordType};
use isthmus_core::mesh::{Headless, HeadlessEndpoint, MeshConfig, Protocol};
use tokio::sync::watch;

const SERVICE: &str = "web.shop.svc.clusterset.local.";

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(240, 240, 0, last)
}

fn endpoint(cluster: &str, id: &str, hostname: bool, last: u8, ready: bool) -> HeadlessEndpoint {
    HeadlessEndpoint {
        cluster: cluster.into(),
        id: id.into(),
        hostname: hostname.then(|| id.to_string()),
        vip: ip(last).into(),
        ready,
    }
}

/// `web.shop` headless (its own VIP .1 internal): `web-0` in east (.2), an endpoint without
/// a hostname in east (.3), `web-0` in west (.4), and `web-1` in west, not ready (.5).
fn headless(endpoints: Vec<HeadlessEndpoint>) -> Arc<MeshConfig> {
    let mut web = service(
        "web",
        "240.240.0.1",
        &[
            ("http", 8080, Protocol::Http),
            ("peer", 7000, Protocol::Tcp),
        ],
    );
    web.headless = Some(Headless { endpoints });
    config(1, vec![web])
}

fn mesh() -> Arc<MeshConfig> {
    headless(vec![
        endpoint("east", "ep.00000000000000aa", false, 3, true),
        endpoint("east", "web-0", true, 2, true),
        endpoint("west", "web-0", true, 4, true),
        endpoint("west", "web-1", true, 5, false),
    ])
}

async fn ask(dns: &isthmus_dns::DnsHandle, name: &str, qtype: RecordType) -> Message {
    udp_query(dns.udp_addr(), &request(name, qtype)).await
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn has_soa(msg: &Message) -> bool {
    msg.authorities
        .iter()
        .any(|r| r.record_type() == RecordType::SOA)
}

#[tokio::test]
async fn the_service_name_answers_every_ready_endpoint_across_clusters_and_not_its_vip() {
    let (dns, _tx) = proxy(mesh()).await;
    let resp = ask(&dns, SERVICE, RecordType::A).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert!(resp.metadata.authoritative);
    // Sorted by (cluster, id); west's web-1 is not ready; the service's .1 is never shown.
    assert_eq!(a_answers(&resp), [ip(3), ip(2), ip(4)]);
    assert!(resp.answers.iter().all(|r| r.ttl == 5));
    dns.shutdown().await;
}

#[tokio::test]
async fn a_per_endpoint_name_answers_that_endpoints_address_only() {
    let (dns, _tx) = proxy(mesh()).await;
    for (question, want) in [
        ("web-0.east.web.shop.svc.clusterset.local.", ip(2)),
        ("web-0.west.web.shop.svc.clusterset.local.", ip(4)),
        ("WEB-0.West.web.shop.svc.clusterset.local.", ip(4)),
    ] {
        let resp = ask(&dns, question, RecordType::A).await;
        assert_eq!(
            resp.metadata.response_code,
            ResponseCode::NoError,
            "{question}"
        );
        assert!(resp.metadata.authoritative);
        assert_eq!(a_answers(&resp), [want], "{question}");
        assert_eq!(resp.answers[0].name.to_string(), question, "case kept");
    }
    dns.shutdown().await;
}

#[tokio::test]
async fn srv_has_one_record_per_named_ready_endpoint_with_its_address_in_additional() {
    let (dns, _tx) = proxy(mesh()).await;
    let resp = ask(
        &dns,
        "_http._tcp.web.shop.svc.clusterset.local.",
        RecordType::SRV,
    )
    .await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    let east = name("web-0.east.web.shop.svc.clusterset.local.");
    let west = name("web-0.west.web.shop.svc.clusterset.local.");
    let srv: Vec<&SRV> = resp
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(
        srv,
        [
            &SRV::new(0, 100, 8080, east.clone()),
            &SRV::new(0, 100, 8080, west.clone())
        ]
    );
    let glue: Vec<(Name, RData)> = resp
        .additionals
        .iter()
        .map(|r| (r.name.clone(), r.data.clone()))
        .collect();
    assert_eq!(
        glue,
        [(east, RData::A(A(ip(2)))), (west, RData::A(A(ip(4))))]
    );
    // Another named port, another transport label: the same endpoints.
    let peer = ask(
        &dns,
        "_peer._tcp.web.shop.svc.clusterset.local.",
        RecordType::SRV,
    )
    .await;
    assert_eq!(peer.answers.len(), 2);
    dns.shutdown().await;
}

#[tokio::test]
async fn ptr_names_an_endpoint_with_a_hostname_and_forwards_one_without() {
    let upstream = udp_upstream().await;
    let (tx, rx) = watch::channel(mesh());
    let dns = isthmus_dns::start(options(vec![upstream.addr], Duration::from_secs(2)), rx)
        .await
        .unwrap();
    let resp = ask(&dns, "4.0.240.240.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert!(resp.metadata.authoritative);
    assert_eq!(
        resp.answers[0].data,
        RData::PTR(PTR(name("web-0.west.web.shop.svc.clusterset.local.")))
    );
    assert_eq!(upstream.received(), 0);
    // The endpoint without a hostname, the one not ready and the service's own VIP have no
    // PTR of ours: those reverse names are not the mesh's, so they go upstream.
    for reverse in [
        "3.0.240.240.in-addr.arpa.",
        "5.0.240.240.in-addr.arpa.",
        "1.0.240.240.in-addr.arpa.",
    ] {
        let resp = ask(&dns, reverse, RecordType::PTR).await;
        assert_eq!(a_answers(&resp), [UPSTREAM_ANSWER], "{reverse}");
    }
    assert_eq!(upstream.received(), 3);
    drop(tx);
    dns.shutdown().await;
}

#[tokio::test]
async fn unknown_hostnames_clusters_and_unready_endpoints_are_nxdomain_with_the_soa() {
    let (dns, _tx) = proxy(mesh()).await;
    for question in [
        "web-9.east.web.shop.svc.clusterset.local.",
        "web-0.central.web.shop.svc.clusterset.local.",
        "central.web.shop.svc.clusterset.local.",
        "web-1.west.web.shop.svc.clusterset.local.",
        "x.web-0.east.web.shop.svc.clusterset.local.",
    ] {
        let resp = ask(&dns, question, RecordType::A).await;
        assert_eq!(
            resp.metadata.response_code,
            ResponseCode::NXDomain,
            "{question}"
        );
        assert!(resp.metadata.authoritative, "{question}");
        assert!(has_soa(&resp), "{question}");
    }
    dns.shutdown().await;
}

#[tokio::test]
async fn other_types_and_the_cluster_level_name_are_nodata_with_the_soa() {
    let (dns, _tx) = proxy(mesh()).await;
    for (question, qtype) in [
        (
            "web-0.east.web.shop.svc.clusterset.local.",
            RecordType::AAAA,
        ),
        ("web-0.east.web.shop.svc.clusterset.local.", RecordType::SRV),
        (SERVICE, RecordType::AAAA),
        (SERVICE, RecordType::TXT),
        ("east.web.shop.svc.clusterset.local.", RecordType::A),
        ("west.web.shop.svc.clusterset.local.", RecordType::ANY),
    ] {
        let resp = ask(&dns, question, qtype).await;
        assert_eq!(
            resp.metadata.response_code,
            ResponseCode::NoError,
            "{question} {qtype}"
        );
        assert!(resp.answers.is_empty(), "{question} {qtype}: {resp}");
        assert!(has_soa(&resp), "{question} {qtype}");
    }
    dns.shutdown().await;
}

#[tokio::test]
async fn without_ready_endpoints_the_service_is_nodata_and_becomes_answered_when_one_is_ready() {
    let (dns, tx) = proxy(headless(vec![endpoint("east", "web-0", true, 2, false)])).await;
    let resp = ask(&dns, SERVICE, RecordType::A).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert!(resp.answers.is_empty() && has_soa(&resp));
    let srv = ask(
        &dns,
        "_http._tcp.web.shop.svc.clusterset.local.",
        RecordType::SRV,
    )
    .await;
    assert_eq!(srv.metadata.response_code, ResponseCode::NoError);
    assert!(srv.answers.is_empty());

    tx.send_replace(headless(vec![endpoint("east", "web-0", true, 2, true)]));
    // The next question already sees the new snapshot (see docs/dns.md).
    assert_eq!(a_answers(&ask(&dns, SERVICE, RecordType::A).await), [ip(2)]);
    assert_eq!(
        a_answers(
            &ask(
                &dns,
                "web-0.east.web.shop.svc.clusterset.local.",
                RecordType::A
            )
            .await
        ),
        [ip(2)]
    );
    dns.shutdown().await;
}

#[tokio::test]
async fn a_search_path_expansion_of_an_endpoint_name_gets_a_cname_and_its_address() {
    let (dns, _tx) = proxy(mesh()).await;
    let question = "web-0.west.web.shop.svc.clusterset.local.shop.svc.cluster.local.";
    let resp = ask(&dns, question, RecordType::A).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        resp.answers[0].data,
        RData::CNAME(CNAME(name("web-0.west.web.shop.svc.clusterset.local.")))
    );
    assert_eq!(a_answers(&resp), [ip(4)]);
    dns.shutdown().await;
}

#[tokio::test]
async fn many_endpoints_are_truncated_over_udp_and_complete_over_tcp() {
    let endpoints = (0..60u8)
        .map(|i| endpoint("east", &format!("web-{i}"), true, 10 + i, true))
        .collect();
    let (dns, _tx) = proxy(headless(endpoints)).await;
    let udp = ask(&dns, SERVICE, RecordType::A).await;
    assert!(udp.metadata.truncation);
    assert!(udp.answers.is_empty());
    let tcp = tcp_query(dns.tcp_addr(), &request(SERVICE, RecordType::A)).await;
    assert!(!tcp.metadata.truncation);
    assert_eq!(a_answers(&tcp).len(), 60);
    let srv = tcp_query(
        dns.tcp_addr(),
        &request("_http._tcp.web.shop.svc.clusterset.local.", RecordType::SRV),
    )
    .await;
    assert_eq!(srv.answers.len(), 60);
    assert_eq!(srv.additionals.len(), 60);
    dns.shutdown().await;
}
