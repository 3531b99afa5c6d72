//! The reply cache, negative caching, in-flight deduplication and metrics, through a running
//! proxy and fake upstreams on 127.0.0.1.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::SOA;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use isthmus_dns::{start, DnsHandle};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

async fn proxy_with(upstream: &FakeUpstream, cache_entries: usize) -> DnsHandle {
    // The sender goes away at once: the proxy keeps the table it was given.
    let (_, rx) = watch::channel(shop());
    let mut opts = options(vec![upstream.addr], Duration::from_secs(2));
    opts.cache_entries = cache_entries;
    start(opts, rx).await.unwrap()
}

fn soa_record() -> Record {
    Record::from_rdata(
        Name::from_ascii("example.com.").unwrap(),
        3600,
        RData::SOA(SOA::new(
            Name::from_ascii("ns.example.com.").unwrap(),
            Name::from_ascii("admin.example.com.").unwrap(),
            1,
            3600,
            600,
            86400,
            30,
        )),
    )
}

fn nxdomain_with_soa(request: &Message) -> Message {
    let mut reply = reply_header(request);
    reply.metadata.response_code = ResponseCode::NXDomain;
    reply.add_authority(soa_record());
    reply
}

fn nxdomain_without_soa(request: &Message) -> Message {
    let mut reply = reply_header(request);
    reply.metadata.response_code = ResponseCode::NXDomain;
    reply
}

#[tokio::test]
async fn a_repeated_question_is_answered_from_the_cache_with_its_own_id_and_case() {
    let upstream = udp_upstream().await;
    let dns = proxy_with(&upstream, 100).await;

    let first = udp_query(dns.udp_addr(), &request("example.com.", RecordType::A)).await;
    assert_eq!(a_answers(&first), vec![UPSTREAM_ANSWER]);

    let mut again = request("EXAMPLE.com.", RecordType::A);
    again.metadata.id = 0x7171;
    let second = udp_query(dns.udp_addr(), &again).await;
    assert_eq!(second.metadata.id, 0x7171);
    assert!(second.queries[0].name.eq_case(&again.queries[0].name));
    assert_eq!(a_answers(&second), vec![UPSTREAM_ANSWER]);
    assert!(second.answers[0].ttl <= 60);
    // Over TCP too: the cache is shared by both transports.
    let third = tcp_query(dns.tcp_addr(), &request("example.com.", RecordType::A)).await;
    assert_eq!(a_answers(&third), vec![UPSTREAM_ANSWER]);

    assert_eq!(
        upstream.received(),
        1,
        "the repeats must not reach the upstream"
    );
    assert_eq!(metric(&dns, "isthmus_dns_cache_hits_total"), Some(2.0));
    assert_eq!(metric(&dns, "isthmus_dns_cache_misses_total"), Some(1.0));
    // Another type is another question.
    udp_query(dns.udp_addr(), &request("example.com.", RecordType::AAAA)).await;
    assert_eq!(upstream.received(), 2);
    dns.shutdown().await;
}

#[tokio::test]
async fn nxdomain_with_an_soa_is_cached() {
    let upstream = udp_upstream_with(nxdomain_with_soa, None).await;
    let dns = proxy_with(&upstream, 100).await;
    for i in 0..3 {
        let resp = udp_query(dns.udp_addr(), &request("nope.example.com.", RecordType::A)).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::NXDomain);
        // The first client gets the upstream's reply as it is; from the cache, the SOA is
        // served with at most its negative TTL (MINIMUM 30), not its own 3600.
        if i > 0 {
            assert!(resp.authorities[0].ttl <= 30, "{resp}");
        }
    }
    assert_eq!(upstream.received(), 1);
    dns.shutdown().await;
}

#[tokio::test]
async fn an_entry_is_asked_upstream_again_once_its_ttl_has_run_out() {
    // A one-second TTL: served from the cache, then gone.
    let upstream = udp_upstream_with(|request| answer_with_a(request, 1), None).await;
    let dns = proxy_with(&upstream, 100).await;
    let asked = Instant::now();
    udp_query(
        dns.udp_addr(),
        &request("short.example.com.", RecordType::A),
    )
    .await;
    let cached = udp_query(
        dns.udp_addr(),
        &request("short.example.com.", RecordType::A),
    )
    .await;
    assert!(cached.answers[0].ttl <= 1, "{cached}");
    if asked.elapsed() < Duration::from_millis(900) {
        assert_eq!(upstream.received(), 1, "a fresh entry went upstream");
    }
    // Ask until the entry expires and the question reaches the upstream again (bounded).
    let deadline = Instant::now() + ANSWER_WAIT;
    while upstream.received() < 2 {
        assert!(Instant::now() < deadline, "the entry never expired");
        let resp = udp_query(
            dns.udp_addr(),
            &request("short.example.com.", RecordType::A),
        )
        .await;
        assert_eq!(a_answers(&resp), vec![UPSTREAM_ANSWER]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        asked.elapsed() >= Duration::from_secs(1),
        "expired after {:?}, before its TTL",
        asked.elapsed()
    );
    dns.shutdown().await;
}

#[tokio::test]
async fn nxdomain_without_an_soa_is_not_cached() {
    let upstream = udp_upstream_with(nxdomain_without_soa, None).await;
    let dns = proxy_with(&upstream, 100).await;
    for _ in 0..3 {
        let resp = udp_query(dns.udp_addr(), &request("nope.example.com.", RecordType::A)).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::NXDomain);
    }
    assert_eq!(upstream.received(), 3);
    dns.shutdown().await;
}

#[tokio::test]
async fn a_zero_ttl_answer_is_not_cached() {
    let upstream = udp_upstream_with(|request| answer_with_a(request, 0), None).await;
    let dns = proxy_with(&upstream, 100).await;
    for _ in 0..2 {
        udp_query(dns.udp_addr(), &request("example.com.", RecordType::A)).await;
    }
    assert_eq!(upstream.received(), 2);
    dns.shutdown().await;
}

#[tokio::test]
async fn with_the_cache_off_every_question_goes_upstream() {
    let upstream = udp_upstream().await;
    let dns = proxy_with(&upstream, 0).await;
    for _ in 0..3 {
        let resp = udp_query(dns.udp_addr(), &request("example.com.", RecordType::A)).await;
        assert_eq!(a_answers(&resp), vec![UPSTREAM_ANSWER]);
    }
    assert_eq!(upstream.received(), 3);
    dns.shutdown().await;
}

#[tokio::test]
async fn simultaneous_identical_questions_cost_one_upstream_query() {
    const CLIENTS: usize = 20;
    let gate = Arc::new(Semaphore::new(0));
    let upstream =
        udp_upstream_with(|request| answer_with_a(request, 60), Some(gate.clone())).await;
    let dns = proxy_with(&upstream, 100).await;

    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let server = dns.udp_addr();
        clients.push(tokio::spawn(async move {
            let mut req = request("slow.example.com.", RecordType::A);
            req.metadata.id = i as u16;
            let resp = udp_query(server, &req).await;
            (i, resp)
        }));
    }
    // Hold the upstream's answer until every client's question is waiting for the first.
    let deadline = Instant::now() + ANSWER_WAIT;
    while metric(&dns, "isthmus_dns_cache_deduplicated_total") != Some((CLIENTS - 1) as f64) {
        assert!(
            Instant::now() < deadline,
            "the questions were not deduplicated"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gate.add_permits(CLIENTS);
    for client in clients {
        let (i, resp) = client.await.unwrap();
        assert_eq!(resp.metadata.id, i as u16);
        assert_eq!(a_answers(&resp), vec![UPSTREAM_ANSWER]);
    }
    assert_eq!(upstream.received(), 1);
    dns.shutdown().await;
}

#[tokio::test]
async fn waiting_questions_get_servfail_when_the_upstream_fails() {
    let silent = silent_upstream().await;
    let (tx, rx) = watch::channel(shop());
    let dns = start(
        options(
            vec![silent.local_addr().unwrap()],
            Duration::from_millis(300),
        ),
        rx,
    )
    .await
    .unwrap();
    let server = dns.udp_addr();
    let a =
        tokio::spawn(async move { udp_query(server, &request("x.example.", RecordType::A)).await });
    let b =
        tokio::spawn(async move { udp_query(server, &request("x.example.", RecordType::A)).await });
    for resp in [a.await.unwrap(), b.await.unwrap()] {
        assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);
    }
    drop(tx);
    dns.shutdown().await;
}

#[tokio::test]
async fn queries_are_counted_by_type_result_and_source() {
    let upstream = udp_upstream().await;
    let dns = proxy_with(&upstream, 100).await;
    let server = dns.udp_addr();
    udp_query(
        server,
        &request("web.shop.svc.clusterset.local.", RecordType::A),
    )
    .await;
    udp_query(
        server,
        &request("web.shop.svc.clusterset.local.", RecordType::A),
    )
    .await;
    udp_query(
        server,
        &request("nope.shop.svc.clusterset.local.", RecordType::A),
    )
    .await;
    udp_query(server, &request("example.com.", RecordType::A)).await;
    udp_query(server, &request("example.com.", RecordType::A)).await;
    for (series, value) in [
        (
            r#"isthmus_dns_queries_total{qtype="A",rcode="NOERROR",source="mesh"}"#,
            2.0,
        ),
        (
            r#"isthmus_dns_queries_total{qtype="A",rcode="NXDOMAIN",source="mesh"}"#,
            1.0,
        ),
        (
            r#"isthmus_dns_queries_total{qtype="A",rcode="NOERROR",source="upstream"}"#,
            1.0,
        ),
        (
            r#"isthmus_dns_queries_total{qtype="A",rcode="NOERROR",source="cache"}"#,
            1.0,
        ),
        (
            r#"isthmus_dns_upstream_duration_seconds_count{result="ok"}"#,
            1.0,
        ),
    ] {
        // The upstream's task may still be counting when the client has its answer.
        let deadline = Instant::now() + ANSWER_WAIT;
        while metric(&dns, series) != Some(value) {
            assert!(
                Instant::now() < deadline,
                "{series} = {:?}",
                metric(&dns, series)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    dns.shutdown().await;
}
