//! Mesh answers from a running proxy, over real UDP and TCP sockets on 127.0.0.1.

mod common;

use std::net::Ipv4Addr;

use common::*;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{AAAA, PTR, SRV};
use hickory_proto::rr::{Name, RData, RecordType};
use isthmus_core::mesh::Protocol;
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;

#[tokio::test]
async fn udp_a_question_for_a_mesh_service_returns_its_vip() {
    let (dns, _tx) = proxy(shop()).await;
    let resp = udp_query(
        dns.udp_addr(),
        &request("web.shop.svc.clusterset.local.", RecordType::A),
    )
    .await;
    assert_eq!(resp.metadata.id, 0x4242);
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert!(resp.metadata.authoritative);
    assert!(resp.metadata.recursion_available);
    assert_eq!(a_answers(&resp), vec![Ipv4Addr::new(240, 240, 0, 1)]);
    assert_eq!(resp.answers[0].ttl, 5);
    dns.shutdown().await;
}

#[tokio::test]
async fn udp_aaaa_for_an_ipv4_service_is_nodata() {
    let (dns, _tx) = proxy(shop()).await;
    let resp = udp_query(
        dns.udp_addr(),
        &request("web.shop.svc.clusterset.local.", RecordType::AAAA),
    )
    .await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert!(resp.metadata.authoritative);
    assert!(resp.answers.is_empty());
    dns.shutdown().await;
}

#[tokio::test]
async fn udp_aaaa_for_an_ipv6_service_returns_its_vip() {
    let (dns, _tx) = proxy(shop()).await;
    let resp = udp_query(
        dns.udp_addr(),
        &request("db.shop.svc.clusterset.local.", RecordType::AAAA),
    )
    .await;
    assert_eq!(
        resp.answers[0].data,
        RData::AAAA(AAAA("fd00::5".parse().unwrap()))
    );
    dns.shutdown().await;
}

#[tokio::test]
async fn udp_srv_returns_the_port_and_the_address_in_additional() {
    let (dns, _tx) = proxy(shop()).await;
    let resp = udp_query(
        dns.udp_addr(),
        &request("_http._tcp.web.shop.svc.clusterset.local.", RecordType::SRV),
    )
    .await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    let target = Name::from_ascii("web.shop.svc.clusterset.local.").unwrap();
    let RData::SRV(srv) = &resp.answers[0].data else {
        panic!("not an SRV answer: {resp}");
    };
    assert_eq!(srv, &SRV::new(0, 100, 80, target.clone()));
    assert_eq!(resp.additionals.len(), 1);
    assert_eq!(resp.additionals[0].name, target);
    assert_eq!(
        resp.additionals[0].data,
        RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::new(240, 240, 0, 1)))
    );
    dns.shutdown().await;
}

#[tokio::test]
async fn udp_ptr_for_a_vip_returns_the_service_name() {
    let (dns, _tx) = proxy(shop()).await;
    let resp = udp_query(
        dns.udp_addr(),
        &request("1.0.240.240.in-addr.arpa.", RecordType::PTR),
    )
    .await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        resp.answers[0].data,
        RData::PTR(PTR(
            Name::from_ascii("web.shop.svc.clusterset.local.").unwrap()
        ))
    );
    dns.shutdown().await;
}

#[tokio::test]
async fn udp_unknown_mesh_name_is_authoritative_nxdomain() {
    let (dns, _tx) = proxy(shop()).await;
    let resp = udp_query(
        dns.udp_addr(),
        &request("nope.shop.svc.clusterset.local.", RecordType::A),
    )
    .await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NXDomain);
    assert!(resp.metadata.authoritative);
    assert!(resp.answers.is_empty());
    dns.shutdown().await;
}

#[tokio::test]
async fn udp_mesh_names_match_any_case_and_keep_the_question_case() {
    let (dns, _tx) = proxy(shop()).await;
    let req = request("WEB.Shop.SVC.clusterSET.local.", RecordType::A);
    let resp = udp_query(dns.udp_addr(), &req).await;
    assert_eq!(a_answers(&resp), vec![Ipv4Addr::new(240, 240, 0, 1)]);
    assert!(resp.queries[0].name.eq_case(&req.queries[0].name));
    dns.shutdown().await;
}

#[tokio::test]
async fn the_first_search_path_expansion_is_answered_with_the_mesh_name_without_upstream() {
    let upstream = udp_upstream().await;
    let (_tx, rx) = tokio::sync::watch::channel(shop());
    let dns = isthmus_dns::start(
        options(vec![upstream.addr], std::time::Duration::from_secs(2)),
        rx,
    )
    .await
    .unwrap();
    // What a pod in namespace `shop` with ndots:5 asks first for the mesh name, then what it
    // would ask next if the first had failed.
    for expansion in [
        "web.shop.svc.clusterset.local.shop.svc.cluster.local.",
        "web.shop.svc.clusterset.local.svc.cluster.local.",
        "web.shop.svc.clusterset.local.cluster.local.",
    ] {
        let resp = udp_query(dns.udp_addr(), &request(expansion, RecordType::A)).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
        let RData::CNAME(cname) = &resp.answers[0].data else {
            panic!("no CNAME first: {resp}");
        };
        assert_eq!(
            cname.0,
            Name::from_ascii("web.shop.svc.clusterset.local.").unwrap()
        );
        assert_eq!(a_answers(&resp), vec![Ipv4Addr::new(240, 240, 0, 1)]);
        assert_eq!(resp.answers[1].name, cname.0);
    }
    // The same over TCP, and for an SRV name.
    let resp = tcp_query(
        dns.tcp_addr(),
        &request(
            "_pg._tcp.db.shop.svc.clusterset.local.shop.svc.cluster.local.",
            RecordType::SRV,
        ),
    )
    .await;
    assert!(
        matches!(&resp.answers[..], [_, srv] if matches!(&srv.data, RData::SRV(s) if s.port == 5432)),
        "{resp}"
    );
    assert_eq!(upstream.received(), 0, "a mesh name went upstream");

    // The expansion of a name that is not in the mesh is the cluster resolver's business.
    udp_query(
        dns.udp_addr(),
        &request(
            "nope.shop.svc.clusterset.local.shop.svc.cluster.local.",
            RecordType::A,
        ),
    )
    .await;
    assert_eq!(upstream.received(), 1);
    dns.shutdown().await;
}

#[tokio::test]
async fn a_burst_of_queued_udp_questions_is_answered_in_full() {
    // The test runs on a single-threaded runtime: while it sends with a blocking socket the
    // proxy cannot read, so every question is queued on the proxy's socket before the first
    // is read, and the proxy reads them in batches.
    const QUESTIONS: u16 = 100;
    let (dns, _tx) = proxy(shop()).await;
    let client = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    client.connect(dns.udp_addr()).unwrap();
    let mut req = request("web.shop.svc.clusterset.local.", RecordType::A);
    for id in 0..QUESTIONS {
        req.metadata.id = id;
        client.send(&req.to_vec().unwrap()).unwrap();
    }
    client.set_nonblocking(true).unwrap();
    let client = UdpSocket::from_std(client).unwrap();
    let mut answered = vec![false; usize::from(QUESTIONS)];
    let mut buf = vec![0u8; 4096];
    for _ in 0..QUESTIONS {
        let len = timeout(ANSWER_WAIT, client.recv(&mut buf))
            .await
            .unwrap_or_else(|_| {
                let missing: Vec<_> = (0..QUESTIONS)
                    .filter(|id| !answered[usize::from(*id)])
                    .collect();
                panic!("questions {missing:?} were never answered")
            })
            .unwrap();
        let reply = Message::from_vec(&buf[..len]).unwrap();
        assert_eq!(a_answers(&reply), vec![Ipv4Addr::new(240, 240, 0, 1)]);
        answered[usize::from(reply.metadata.id)] = true;
    }
    assert!(answered.iter().all(|a| *a));
    dns.shutdown().await;
}

#[tokio::test]
async fn garbage_bytes_get_formerr_and_the_proxy_keeps_serving() {
    let (dns, _tx) = proxy(shop()).await;
    let garbage = [
        0xbe, 0xef, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0x17, 0x00,
    ];
    let reply = Message::from_vec(&udp_exchange(dns.udp_addr(), &garbage).await).unwrap();
    assert_eq!(reply.metadata.id, 0xbeef);
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);

    let resp = udp_query(
        dns.udp_addr(),
        &request("web.shop.svc.clusterset.local.", RecordType::A),
    )
    .await;
    assert_eq!(a_answers(&resp), vec![Ipv4Addr::new(240, 240, 0, 1)]);
    dns.shutdown().await;
}

#[tokio::test]
async fn tcp_questions_are_answered_on_one_connection_in_order() {
    let (dns, _tx) = proxy(shop()).await;
    assert_eq!(dns.tcp_addr(), dns.udp_addr());
    let mut stream = TcpStream::connect(dns.tcp_addr()).await.unwrap();
    let resp = tcp_exchange(
        &mut stream,
        &request("web.shop.svc.clusterset.local.", RecordType::A),
    )
    .await;
    assert_eq!(a_answers(&resp), vec![Ipv4Addr::new(240, 240, 0, 1)]);
    assert!(resp.metadata.authoritative);

    let resp = tcp_exchange(
        &mut stream,
        &request("_pg._tcp.db.shop.svc.clusterset.local.", RecordType::SRV),
    )
    .await;
    let RData::SRV(srv) = &resp.answers[0].data else {
        panic!("not an SRV answer: {resp}");
    };
    assert_eq!(srv.port, 5432);
    dns.shutdown().await;
}

#[tokio::test]
async fn udp_dns_version_is_the_schema_version() {
    let (dns, _tx) = proxy(shop()).await;
    let resp = udp_query(
        dns.udp_addr(),
        &request("dns-version.clusterset.local.", RecordType::TXT),
    )
    .await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert!(resp.metadata.authoritative);
    let RData::TXT(txt) = &resp.answers[0].data else {
        panic!("not a TXT answer: {resp}");
    };
    assert_eq!(txt.to_string(), "1.0.0");
    dns.shutdown().await;
}

#[tokio::test]
async fn udp_nxdomain_and_nodata_carry_the_zone_soa() {
    let (dns, _tx) = proxy(shop()).await;
    for (name, qtype, code) in [
        (
            "nope.shop.svc.clusterset.local.",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
        (
            "web.shop.svc.clusterset.local.",
            RecordType::AAAA,
            ResponseCode::NoError,
        ),
    ] {
        let resp = udp_query(dns.udp_addr(), &request(name, qtype)).await;
        assert_eq!(resp.metadata.response_code, code, "{name}");
        assert!(resp.answers.is_empty());
        assert!(
            matches!(resp.authorities.first().map(|r| &r.data), Some(RData::SOA(soa)) if soa.minimum == 5),
            "{resp}"
        );
    }
    dns.shutdown().await;
}

#[tokio::test]
async fn a_large_answer_is_truncated_over_udp_and_complete_over_tcp() {
    // Forty ports with the same name (an invalid service, but the only way to get a mesh
    // answer bigger than 512 bytes): one SRV name with forty records.
    let ports: Vec<(&str, u16, Protocol)> =
        (0..40).map(|p| ("big", 9000 + p, Protocol::Tcp)).collect();
    let (dns, _tx) = proxy(config(1, vec![service("wide", "240.240.0.40", &ports)])).await;
    let req = request("_big._tcp.wide.shop.svc.clusterset.local.", RecordType::SRV);

    let udp = udp_exchange(dns.udp_addr(), &req.to_vec().unwrap()).await;
    assert!(udp.len() <= 512, "{} bytes over UDP", udp.len());
    let udp = Message::from_vec(&udp).unwrap();
    assert!(udp.metadata.truncation);
    assert!(udp.answers.is_empty());
    assert_eq!(udp.queries, req.queries);

    // The client retries over TCP, as a stub resolver does on TC, and gets everything.
    let tcp = tcp_query(dns.tcp_addr(), &req).await;
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 40);

    // With a big enough EDNS payload, UDP carries it all too.
    let mut edns_req = req.clone();
    let mut edns = hickory_proto::op::Edns::new();
    edns.set_max_payload(4096);
    edns_req.edns = Some(edns);
    let udp = udp_query(dns.udp_addr(), &edns_req).await;
    assert!(!udp.metadata.truncation);
    assert_eq!(udp.answers.len(), 40);
    assert_eq!(udp.edns.map(|e| e.max_payload()), Some(1232));
    dns.shutdown().await;
}
