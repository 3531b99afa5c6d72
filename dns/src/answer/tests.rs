use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, PTR, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use isthmus_core::mesh::{MeshConfig, MeshService, Protocol};

use super::*;

const TTL: u32 = 5;

fn service(name: &str, vip: &str, ports: &[(&str, u16, Protocol)]) -> MeshService {
    isthmus_testkit::mesh::service(name, "shop", vip, ports)
}

fn table() -> MeshTable {
    // Forty ports with the same name: an invalid service, but the only way to get a mesh
    // answer bigger than 512 bytes.
    let many: Vec<(&str, u16, Protocol)> =
        (0..40).map(|p| ("big", 9000 + p, Protocol::Tcp)).collect();
    MeshTable::build(&MeshConfig {
        version: 1,
        services: vec![
            service(
                "web",
                "240.240.0.1",
                &[("http", 80, Protocol::Http), ("dns", 53, Protocol::Udp)],
            ),
            service("db", "fd00::5", &[("pg", 5432, Protocol::Tcp)]),
            service("wide", "240.240.0.9", &many),
        ],
        ..Default::default()
    })
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn request(qname: &str, qtype: RecordType) -> Message {
    let mut msg = Message::new(0x1234, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name(qname), qtype));
    msg
}

fn respond(req: &Message) -> Message {
    match answer(&table(), req, TTL) {
        Outcome::Respond(msg) => msg,
        Outcome::Forward => panic!("{:?} was forwarded", req.queries),
    }
}

fn a(ip: [u8; 4]) -> RData {
    RData::A(A(Ipv4Addr::from(ip)))
}

/// Asserts the parts every local response shares: id, QR, opcode, RD copied, RA set, the
/// question echoed byte for byte.
fn assert_response_to(resp: &Message, req: &Message, code: ResponseCode, authoritative: bool) {
    assert_eq!(resp.metadata.id, req.metadata.id);
    assert_eq!(resp.metadata.message_type, MessageType::Response);
    assert_eq!(resp.metadata.op_code, OpCode::Query);
    assert_eq!(resp.metadata.response_code, code);
    assert_eq!(resp.metadata.authoritative, authoritative);
    assert!(resp.metadata.recursion_available);
    assert_eq!(
        resp.metadata.recursion_desired,
        req.metadata.recursion_desired
    );
    assert!(!resp.metadata.truncation);
    assert_eq!(resp.queries, req.queries);
    assert!(resp.queries[0].name.eq_case(&req.queries[0].name));
}

#[test]
fn a_question_for_a_service_gets_its_ipv4_vip() {
    let req = request("web.shop.svc.clusterset.local.", RecordType::A);
    let resp = respond(&req);
    assert_response_to(&resp, &req, ResponseCode::NoError, true);
    assert_eq!(
        resp.answers,
        vec![Record::from_rdata(
            name("web.shop.svc.clusterset.local."),
            TTL,
            a([240, 240, 0, 1])
        )]
    );
    assert!(resp.additionals.is_empty());
}

#[test]
fn aaaa_for_an_ipv4_service_is_nodata() {
    let req = request("web.shop.svc.clusterset.local.", RecordType::AAAA);
    let resp = respond(&req);
    assert_response_to(&resp, &req, ResponseCode::NoError, true);
    assert!(resp.answers.is_empty());
}

#[test]
fn an_ipv6_service_answers_aaaa_and_gives_nodata_for_a() {
    let req = request("db.shop.svc.clusterset.local.", RecordType::AAAA);
    let resp = respond(&req);
    assert_response_to(&resp, &req, ResponseCode::NoError, true);
    assert_eq!(
        resp.answers[0].data,
        RData::AAAA(AAAA("fd00::5".parse().unwrap()))
    );

    let req = request("db.shop.svc.clusterset.local.", RecordType::A);
    let resp = respond(&req);
    assert_response_to(&resp, &req, ResponseCode::NoError, true);
    assert!(resp.answers.is_empty());
}

#[test]
fn srv_answers_the_named_port_with_the_address_in_additional() {
    let req = request("_http._tcp.web.shop.svc.clusterset.local.", RecordType::SRV);
    let resp = respond(&req);
    assert_response_to(&resp, &req, ResponseCode::NoError, true);
    let target = name("web.shop.svc.clusterset.local.");
    assert_eq!(
        resp.answers,
        vec![Record::from_rdata(
            name("_http._tcp.web.shop.svc.clusterset.local."),
            TTL,
            RData::SRV(SRV::new(SRV_PRIORITY, SRV_WEIGHT, 80, target.clone()))
        )]
    );
    assert_eq!(
        resp.additionals,
        vec![Record::from_rdata(target, TTL, a([240, 240, 0, 1]))]
    );
}

#[test]
fn srv_for_a_udp_port_uses_the_udp_label() {
    let resp = respond(&request(
        "_dns._udp.web.shop.svc.clusterset.local.",
        RecordType::SRV,
    ));
    let RData::SRV(srv) = &resp.answers[0].data else {
        panic!("not an SRV answer: {:?}", resp.answers);
    };
    assert_eq!(srv.port, 53);

    let wrong = request("_dns._tcp.web.shop.svc.clusterset.local.", RecordType::SRV);
    assert_response_to(&respond(&wrong), &wrong, ResponseCode::NXDomain, true);
}

#[test]
fn srv_for_an_ipv6_service_puts_aaaa_in_additional() {
    let resp = respond(&request(
        "_pg._tcp.db.shop.svc.clusterset.local.",
        RecordType::SRV,
    ));
    assert_eq!(
        resp.additionals[0].data,
        RData::AAAA(AAAA("fd00::5".parse().unwrap()))
    );
}

#[test]
fn a_question_for_an_srv_name_is_nodata() {
    let req = request("_http._tcp.web.shop.svc.clusterset.local.", RecordType::A);
    let resp = respond(&req);
    assert_response_to(&resp, &req, ResponseCode::NoError, true);
    assert!(resp.answers.is_empty());
}

#[test]
fn ptr_for_a_vip_answers_the_service_name() {
    let req = request("1.0.240.240.in-addr.arpa.", RecordType::PTR);
    let resp = respond(&req);
    assert_response_to(&resp, &req, ResponseCode::NoError, true);
    assert_eq!(
        resp.answers,
        vec![Record::from_rdata(
            name("1.0.240.240.in-addr.arpa."),
            TTL,
            RData::PTR(PTR(name("web.shop.svc.clusterset.local.")))
        )]
    );
}

#[test]
fn ptr_for_an_ipv6_vip_answers_the_service_name() {
    let reverse = Name::from("fd00::5".parse::<IpAddr>().unwrap());
    let mut req = request("example.", RecordType::PTR);
    req.queries[0].name = reverse;
    let resp = respond(&req);
    assert_eq!(
        resp.answers[0].data,
        RData::PTR(PTR(name("db.shop.svc.clusterset.local.")))
    );
}

#[test]
fn reverse_names_that_are_not_vips_are_forwarded() {
    let req = request("1.1.168.192.in-addr.arpa.", RecordType::PTR);
    assert_eq!(answer(&table(), &req, TTL), Outcome::Forward);
    // Other types at a VIP's reverse name are not ours either.
    let req = request("1.0.240.240.in-addr.arpa.", RecordType::TXT);
    assert_eq!(answer(&table(), &req, TTL), Outcome::Forward);
}

#[test]
fn unknown_names_in_the_mesh_zone_are_authoritative_nxdomain() {
    for qname in [
        "nope.shop.svc.clusterset.local.",
        "web.other.svc.clusterset.local.",
        "_grpc._tcp.web.shop.svc.clusterset.local.",
        "deeper.web.shop.svc.clusterset.local.",
    ] {
        for qtype in [RecordType::A, RecordType::AAAA, RecordType::SRV] {
            let req = request(qname, qtype);
            let resp = respond(&req);
            assert_response_to(&resp, &req, ResponseCode::NXDomain, true);
            assert!(resp.answers.is_empty());
        }
    }
}

#[test]
fn known_names_with_other_types_are_nodata() {
    for qtype in [
        RecordType::TXT,
        RecordType::MX,
        RecordType::CNAME,
        RecordType::PTR,
        RecordType::SRV,
    ] {
        let req = request("web.shop.svc.clusterset.local.", qtype);
        let resp = respond(&req);
        assert_response_to(&resp, &req, ResponseCode::NoError, true);
        assert!(resp.answers.is_empty(), "{qtype:?}");
    }
}

#[test]
fn names_that_only_have_names_below_them_are_nodata() {
    for qname in [
        "svc.clusterset.local.",
        "shop.svc.clusterset.local.",
        "_tcp.web.shop.svc.clusterset.local.",
    ] {
        let req = request(qname, RecordType::A);
        let resp = respond(&req);
        assert_response_to(&resp, &req, ResponseCode::NoError, true);
        assert!(resp.answers.is_empty(), "{qname}");
    }
}

#[test]
fn dns_version_answers_the_schema_version() {
    let req = request("dns-version.clusterset.local.", RecordType::TXT);
    let resp = respond(&req);
    assert_response_to(&resp, &req, ResponseCode::NoError, true);
    assert_eq!(
        resp.answers,
        vec![Record::from_rdata(
            name("dns-version.clusterset.local."),
            28_800,
            RData::TXT(TXT::new(vec!["1.0.0".to_string()]))
        )]
    );
    // Other types there are NODATA.
    let req = request("dns-version.clusterset.local.", RecordType::A);
    let resp = respond(&req);
    assert_response_to(&resp, &req, ResponseCode::NoError, true);
    assert!(resp.answers.is_empty());
}

#[test]
fn the_apex_answers_its_soa_with_the_config_version_as_serial() {
    let req = request("clusterset.local.", RecordType::SOA);
    let resp = respond(&req);
    assert_response_to(&resp, &req, ResponseCode::NoError, true);
    let RData::SOA(soa) = &resp.answers[0].data else {
        panic!("not an SOA: {:?}", resp.answers);
    };
    assert_eq!(soa.serial, 1);
    assert_eq!(soa.minimum, TTL);
    assert_eq!(resp.answers[0].ttl, TTL);
    assert_eq!(soa.mname, name("ns.dns.clusterset.local."));
}

#[test]
fn negative_answers_carry_the_soa_in_authority() {
    for (qname, qtype, code) in [
        (
            "nope.shop.svc.clusterset.local.",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
        (
            "nope.clusterset.local.",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
        (
            "web.shop.svc.clusterset.local.",
            RecordType::MX,
            ResponseCode::NoError,
        ),
        (
            "shop.svc.clusterset.local.",
            RecordType::A,
            ResponseCode::NoError,
        ),
    ] {
        let req = request(qname, qtype);
        let resp = respond(&req);
        assert_response_to(&resp, &req, code, true);
        assert!(resp.answers.is_empty(), "{qname}");
        assert_eq!(resp.authorities.len(), 1, "{qname}");
        assert_eq!(resp.authorities[0].name, name("clusterset.local."));
        assert!(matches!(resp.authorities[0].data, RData::SOA(_)));
    }
    // Positive answers do not.
    let resp = respond(&request("web.shop.svc.clusterset.local.", RecordType::A));
    assert!(resp.authorities.is_empty());
}

#[test]
fn mesh_names_match_case_insensitively_and_keep_the_question_case() {
    let req = request("WeB.ShOp.SVC.ClusterSet.Local.", RecordType::A);
    let resp = respond(&req);
    assert_response_to(&resp, &req, ResponseCode::NoError, true);
    assert_eq!(resp.answers.len(), 1);
    assert_eq!(resp.answers[0].data, a([240, 240, 0, 1]));
    assert!(resp.answers[0]
        .name
        .eq_case(&name("WeB.ShOp.SVC.ClusterSet.Local.")));
    // And in the encoded bytes, not only in the parsed form.
    let Action::Reply(bytes) = handle_packet(&table(), &req.to_vec().unwrap(), Transport::Udp, TTL)
    else {
        panic!("no reply");
    };
    assert!(bytes.windows(3).any(|w| w == b"WeB"));
}

#[test]
fn the_ttl_comes_from_the_options() {
    let req = request("web.shop.svc.clusterset.local.", RecordType::A);
    let Outcome::Respond(resp) = answer(&table(), &req, 300) else {
        panic!("forwarded");
    };
    assert_eq!(resp.answers[0].ttl, 300);
}

#[test]
fn any_returns_every_record_at_the_name() {
    let resp = respond(&request("web.shop.svc.clusterset.local.", RecordType::ANY));
    assert_eq!(resp.answers.len(), 1);
    let resp = respond(&request(
        "_http._tcp.web.shop.svc.clusterset.local.",
        RecordType::ANY,
    ));
    assert!(matches!(resp.answers[0].data, RData::SRV(_)));
}

#[test]
fn names_outside_the_mesh_are_forwarded() {
    for qname in [
        "example.com.",
        "web.shop.svc.cluster.local.",
        "kubernetes.default.svc.cluster.local.",
        "local.",
    ] {
        for qtype in [RecordType::A, RecordType::AAAA, RecordType::SRV] {
            assert_eq!(
                answer(&table(), &request(qname, qtype), TTL),
                Outcome::Forward,
                "{qname} {qtype:?}"
            );
        }
    }
}

#[test]
fn search_path_expansions_of_mesh_names_answer_a_cname_and_the_records() {
    for qname in [
        "web.shop.svc.clusterset.local.shop.svc.cluster.local.",
        "web.shop.svc.clusterset.local.svc.cluster.local.",
        "Web.Shop.svc.clusterset.local.cluster.local.",
    ] {
        let req = request(qname, RecordType::A);
        let resp = respond(&req);
        // Not authoritative: cluster.local is not our zone.
        assert_response_to(&resp, &req, ResponseCode::NoError, false);
        let target = Name::from_labels(name(qname).iter().take(5)).unwrap();
        assert_eq!(target, name("web.shop.svc.clusterset.local."));
        assert_eq!(resp.answers.len(), 2, "{resp}");
        assert_eq!(resp.answers[0].name, name(qname));
        assert_eq!(resp.answers[0].ttl, TTL);
        assert_eq!(resp.answers[0].data, RData::CNAME(CNAME(target.clone())));
        assert_eq!(resp.answers[1].name, target);
        assert_eq!(resp.answers[1].data, a([240, 240, 0, 1]));
        assert!(resp.authorities.is_empty());
    }
    // SRV names expand too.
    let req = request(
        "_http._tcp.web.shop.svc.clusterset.local.shop.svc.cluster.local.",
        RecordType::SRV,
    );
    let resp = respond(&req);
    assert_eq!(resp.answers.len(), 2, "{resp}");
    assert!(matches!(&resp.answers[1].data, RData::SRV(srv) if srv.port == 80));
    assert_eq!(resp.additionals.len(), 1);
}

#[test]
fn a_search_path_expansion_without_records_of_the_type_is_a_cname_and_the_soa() {
    let req = request(
        "web.shop.svc.clusterset.local.shop.svc.cluster.local.",
        RecordType::AAAA,
    );
    let resp = respond(&req);
    assert_response_to(&resp, &req, ResponseCode::NoError, false);
    assert_eq!(resp.answers.len(), 1, "{resp}");
    assert!(matches!(resp.answers[0].data, RData::CNAME(_)));
    assert!(matches!(
        resp.authorities.first().map(|r| &r.data),
        Some(RData::SOA(_))
    ));
}

#[test]
fn search_path_expansions_of_other_names_are_forwarded() {
    // Expansions of names that are not mesh services still go to the cluster's resolver.
    for qname in [
        "nope.shop.svc.clusterset.local.shop.svc.cluster.local.",
        "shop.svc.clusterset.local.cluster.local.",
        "web.shop.svc.clusterset.local.example.com.",
    ] {
        let req = request(qname, RecordType::A);
        assert_eq!(answer(&table(), &req, TTL), Outcome::Forward, "{qname}");
    }
}

#[test]
fn questions_in_other_classes_are_refused() {
    for class in [
        DNSClass::CH,
        DNSClass::HS,
        DNSClass::NONE,
        DNSClass::ANY,
        DNSClass::Unknown(77),
    ] {
        for qname in ["web.shop.svc.clusterset.local.", "example.com."] {
            let mut req = request(qname, RecordType::TXT);
            req.queries[0].query_class = class;
            let resp = respond(&req);
            assert_response_to(&resp, &req, ResponseCode::Refused, false);
            assert!(resp.answers.is_empty());
        }
    }
}

#[test]
fn edns_requests_get_an_opt_record_back() {
    let mut req = request("web.shop.svc.clusterset.local.", RecordType::A);
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    req.edns = Some(edns);
    let resp = respond(&req);
    assert_eq!(
        resp.edns.as_ref().map(|e| e.max_payload()),
        Some(EDNS_PAYLOAD)
    );
    let plain = respond(&request("web.shop.svc.clusterset.local.", RecordType::A));
    assert!(plain.edns.is_none());
}

#[test]
fn zero_or_several_questions_are_formerr() {
    let mut none = request("web.shop.svc.clusterset.local.", RecordType::A);
    none.queries.clear();
    let resp = respond(&none);
    assert_eq!(resp.metadata.response_code, ResponseCode::FormErr);

    let mut two = request("web.shop.svc.clusterset.local.", RecordType::A);
    two.add_query(Query::query(name("example.com."), RecordType::A));
    let resp = respond(&two);
    assert_eq!(resp.metadata.response_code, ResponseCode::FormErr);
    assert!(resp.answers.is_empty());
}

#[test]
fn opcodes_other_than_query_are_notimp() {
    let mut req = request("web.shop.svc.clusterset.local.", RecordType::A);
    req.metadata.op_code = OpCode::Status;
    let resp = respond(&req);
    assert_eq!(resp.metadata.response_code, ResponseCode::NotImp);
    assert_eq!(resp.metadata.op_code, OpCode::Status);
}

fn reply_of(action: Action) -> Message {
    match action {
        Action::Reply(bytes) => Message::from_vec(&bytes).unwrap(),
        other => panic!("expected a reply, got {other:?}"),
    }
}

#[test]
fn packets_are_decoded_answered_and_encoded() {
    let req = request("web.shop.svc.clusterset.local.", RecordType::A);
    let resp = reply_of(handle_packet(
        &table(),
        &req.to_vec().unwrap(),
        Transport::Udp,
        TTL,
    ));
    assert_response_to(&resp, &req, ResponseCode::NoError, true);
    assert_eq!(resp.answers[0].data, a([240, 240, 0, 1]));
}

#[test]
fn packets_for_outside_names_become_forward_actions() {
    let req = request("example.com.", RecordType::A);
    match handle_packet(&table(), &req.to_vec().unwrap(), Transport::Udp, TTL) {
        Action::Forward { request } => assert_eq!(*request, req),
        other => panic!("expected forward, got {other:?}"),
    }
}

#[test]
fn garbage_after_a_readable_header_is_formerr_with_the_same_id() {
    // id 0xbeef, RD, one question, then bytes that are not a name.
    let packet = [
        0xbe, 0xef, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff,
    ];
    let resp = reply_of(handle_packet(&table(), &packet, Transport::Udp, TTL));
    assert_eq!(resp.metadata.id, 0xbeef);
    assert_eq!(resp.metadata.message_type, MessageType::Response);
    assert_eq!(resp.metadata.response_code, ResponseCode::FormErr);
    assert!(resp.queries.is_empty());
}

#[test]
fn packets_shorter_than_a_header_are_dropped() {
    for len in 0..12 {
        let packet = vec![0u8; len];
        assert_eq!(
            handle_packet(&table(), &packet, Transport::Udp, TTL),
            Action::Drop,
            "{len} bytes"
        );
    }
}

#[test]
fn responses_sent_to_the_proxy_are_dropped() {
    let mut msg = request("web.shop.svc.clusterset.local.", RecordType::A);
    msg.metadata.message_type = MessageType::Response;
    assert_eq!(
        handle_packet(&table(), &msg.to_vec().unwrap(), Transport::Udp, TTL),
        Action::Drop
    );
}

#[test]
fn packets_with_unknown_opcodes_are_notimp() {
    for opcode in [OpCode::Notify, OpCode::Update, OpCode::Unknown(9)] {
        let mut req = request("web.shop.svc.clusterset.local.", RecordType::A);
        req.metadata.op_code = opcode;
        let mut bytes = req.to_vec().unwrap();
        // Make the body unreadable too: NOTIMP must not depend on it.
        bytes.truncate(13);
        let resp = reply_of(handle_packet(&table(), &bytes, Transport::Udp, TTL));
        assert_eq!(
            resp.metadata.response_code,
            ResponseCode::NotImp,
            "{opcode:?}"
        );
        assert_eq!(resp.metadata.id, 0x1234);
    }
}

#[test]
fn oversized_udp_answers_are_truncated_with_tc() {
    let req = request("_big._tcp.wide.shop.svc.clusterset.local.", RecordType::SRV);
    let bytes = req.to_vec().unwrap();

    let udp = match handle_packet(&table(), &bytes, Transport::Udp, TTL) {
        Action::Reply(reply) => reply,
        other => panic!("expected a reply, got {other:?}"),
    };
    assert!(udp.len() <= UDP_DEFAULT_LIMIT, "{} bytes", udp.len());
    let udp = Message::from_vec(&udp).unwrap();
    assert!(udp.metadata.truncation);
    assert!(udp.answers.is_empty());
    assert_eq!(udp.queries, req.queries);
    assert_eq!(udp.metadata.id, req.metadata.id);

    // Over TCP the whole answer fits.
    let tcp = reply_of(handle_packet(&table(), &bytes, Transport::Tcp, TTL));
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 40);
}

#[test]
fn an_edns_payload_size_lets_bigger_udp_answers_through() {
    let mut req = request("_big._tcp.wide.shop.svc.clusterset.local.", RecordType::SRV);
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    req.edns = Some(edns);
    assert_eq!(reply_limit(&req, Transport::Udp), 4096);
    let resp = reply_of(handle_packet(
        &table(),
        &req.to_vec().unwrap(),
        Transport::Udp,
        TTL,
    ));
    assert!(!resp.metadata.truncation);
    assert_eq!(resp.answers.len(), 40);
}

#[test]
fn an_edns_payload_size_below_512_still_allows_512() {
    let mut req = request("example.com.", RecordType::A);
    let mut edns = Edns::new();
    edns.set_max_payload(100);
    req.edns = Some(edns);
    assert_eq!(reply_limit(&req, Transport::Udp), UDP_DEFAULT_LIMIT);
    assert_eq!(reply_limit(&req, Transport::Tcp), 65535);
}

#[test]
fn servfail_keeps_the_id_and_question() {
    let req = request("example.com.", RecordType::A);
    let resp = Message::from_vec(&servfail(&req).unwrap()).unwrap();
    assert_response_to(&resp, &req, ResponseCode::ServFail, false);
}

#[test]
fn every_ipv6_address_of_the_table_round_trips_through_ptr() {
    let ip: Ipv6Addr = "fd00::5".parse().unwrap();
    let req = Message::from_vec(
        &{
            let mut m = request("x.", RecordType::PTR);
            m.queries[0].name = Name::from(ip);
            m
        }
        .to_vec()
        .unwrap(),
    )
    .unwrap();
    assert!(matches!(answer(&table(), &req, TTL), Outcome::Respond(_)));
}

/// A small deterministic generator, so the test needs no extra crate and fails the same way
/// every run.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn mutated_and_random_packets_never_panic() {
    let table = table();
    let seeds = [
        request("web.shop.svc.clusterset.local.", RecordType::A),
        request("_http._tcp.web.shop.svc.clusterset.local.", RecordType::SRV),
        request("1.0.240.240.in-addr.arpa.", RecordType::PTR),
        request(
            "web.shop.svc.clusterset.local.cluster.local.",
            RecordType::A,
        ),
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15;
    for seed in &seeds {
        let base = seed.to_vec().unwrap();
        for _ in 0..5_000 {
            let mut packet = base.clone();
            let flips = 1 + (xorshift(&mut state) % 4) as usize;
            for _ in 0..flips {
                let at = (xorshift(&mut state) as usize) % packet.len();
                packet[at] = xorshift(&mut state) as u8;
            }
            if xorshift(&mut state) & 7 == 0 {
                let keep = (xorshift(&mut state) as usize) % (packet.len() + 1);
                packet.truncate(keep);
            }
            for transport in [Transport::Udp, Transport::Tcp] {
                let _ = handle_packet(&table, &packet, transport, TTL);
            }
        }
    }
    for _ in 0..5_000 {
        let len = (xorshift(&mut state) % 64) as usize;
        let packet: Vec<u8> = (0..len).map(|_| xorshift(&mut state) as u8).collect();
        let _ = handle_packet(&table, &packet, Transport::Udp, TTL);
    }
}

#[test]
fn the_fast_path_never_panics_and_replays_what_the_full_decoder_answers() {
    use crate::wire::{QueryView, Template};
    let table = table();
    let seeds = [
        request("web.shop.svc.clusterset.local.", RecordType::A),
        request("_big._tcp.wide.shop.svc.clusterset.local.", RecordType::SRV),
        request("dns-version.clusterset.local.", RecordType::TXT),
        request("nope.clusterset.local.", RecordType::A),
        {
            let mut req = request("web.shop.svc.clusterset.local.", RecordType::AAAA);
            let mut edns = Edns::new();
            edns.set_max_payload(1232);
            req.edns = Some(edns);
            req
        },
    ];
    let mut state = 0x2545_f491_4f6c_dd1d;
    let mut out = Vec::new();
    for seed in &seeds {
        let base = seed.to_vec().unwrap();
        for _ in 0..3_000 {
            let mut packet = base.clone();
            let flips = 1 + (xorshift(&mut state) % 3) as usize;
            for _ in 0..flips {
                let at = (xorshift(&mut state) as usize) % packet.len();
                packet[at] = xorshift(&mut state) as u8;
            }
            let Some(view) = QueryView::parse(&packet) else {
                continue;
            };
            let Ok(request) = Message::from_vec(&packet) else {
                continue;
            };
            assert_eq!(u16::from(request.queries[0].query_type), view.qtype);
            if let Outcome::Respond(msg) = answer(&table, &request, TTL) {
                let bytes = encode_limited(&msg, usize::MAX).unwrap();
                let (template, _) = Template::from_reply(&bytes).unwrap();
                for limit in [512, 65535] {
                    template.write_reply(&view, 0, limit, &mut out);
                    let replayed = Message::from_vec(&out).unwrap();
                    assert_eq!(replayed.metadata.id, request.metadata.id);
                    assert_eq!(replayed.queries, request.queries);
                }
            }
        }
    }
}
