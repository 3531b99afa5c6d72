use std::net::Ipv4Addr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
use hickory_proto::rr::rdata::{A, CNAME, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use super::*;

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn query(qname: &str, qtype: RecordType) -> Message {
    let mut msg = Message::new(0x1234, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name(qname), qtype));
    msg
}

fn with_edns(mut msg: Message, payload: u16, dnssec_ok: bool) -> Message {
    let mut edns = Edns::new();
    edns.set_max_payload(payload);
    edns.set_dnssec_ok(dnssec_ok);
    msg.edns = Some(edns);
    msg
}

fn key(packet: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    QueryView::parse(packet)
        .expect("plain query")
        .key_into(&mut out);
    out
}

fn reply_to(req: &Message, ttl: u32, answers: usize) -> Message {
    let mut msg = Message::response(req.metadata.id, OpCode::Query);
    msg.metadata.recursion_desired = req.metadata.recursion_desired;
    msg.metadata.recursion_available = true;
    msg.queries = req.queries.clone();
    for i in 0..answers {
        msg.add_answer(Record::from_rdata(
            req.queries[0].name.clone(),
            ttl + i as u32,
            RData::A(A(Ipv4Addr::new(192, 0, 2, i as u8))),
        ));
    }
    msg
}

fn soa(ttl: u32, minimum: u32) -> Record {
    Record::from_rdata(
        name("example.com."),
        ttl,
        RData::SOA(SOA::new(
            name("ns.example.com."),
            name("hostmaster.example.com."),
            1,
            7200,
            900,
            86400,
            minimum,
        )),
    )
}

#[test]
fn a_plain_query_is_read_in_place() {
    let bytes = query("Example.COM.", RecordType::AAAA).to_vec().unwrap();
    let view = QueryView::parse(&bytes).unwrap();
    assert_eq!(view.id(), 0x1234);
    assert_eq!(view.qtype, u16::from(RecordType::AAAA));
    assert_eq!(view.qclass, 1);
    assert_eq!(view.edns, None);
    assert_eq!(view.qname(), b"\x07Example\x03COM\x00");
    assert_eq!(view.reply_limit(Transport::Udp), 512);
    assert_eq!(view.reply_limit(Transport::Tcp), 65535);
}

#[test]
fn edns_payload_and_do_bit_are_read() {
    let bytes = with_edns(query("example.com.", RecordType::A), 4096, true)
        .to_vec()
        .unwrap();
    let view = QueryView::parse(&bytes).unwrap();
    assert_eq!(
        view.edns,
        Some(EdnsInfo {
            payload: 4096,
            dnssec_ok: true
        })
    );
    assert_eq!(view.reply_limit(Transport::Udp), 4096);
}

#[test]
fn a_cookie_option_is_accepted_but_client_subnet_is_not() {
    let mut msg = with_edns(query("example.com.", RecordType::A), 1232, false);
    if let Some(edns) = msg.edns.as_mut() {
        edns.options_mut()
            .insert(EdnsOption::Unknown(u16::from(EdnsCode::Cookie), vec![1; 8]));
    }
    assert!(QueryView::parse(&msg.to_vec().unwrap()).is_some());
    if let Some(edns) = msg.edns.as_mut() {
        edns.options_mut().insert(EdnsOption::Unknown(
            u16::from(EdnsCode::Subnet),
            vec![0, 1, 0, 0],
        ));
    }
    assert!(QueryView::parse(&msg.to_vec().unwrap()).is_none());
}

#[test]
fn unusual_queries_are_left_to_the_full_decoder() {
    let plain = query("example.com.", RecordType::A).to_vec().unwrap();
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut response = plain.clone();
    response[2] |= 0x80;
    cases.push(("a response", response));
    let mut notify = plain.clone();
    notify[2] |= 4 << 3;
    cases.push(("opcode NOTIFY", notify));
    let mut trailing = plain.clone();
    trailing.push(0);
    cases.push(("trailing bytes", trailing));
    let mut two = query("example.com.", RecordType::A);
    two.add_query(Query::query(name("example.org."), RecordType::A));
    cases.push(("two questions", two.to_vec().unwrap()));
    let mut answered = query("example.com.", RecordType::A);
    answered.add_answer(Record::from_rdata(
        name("example.com."),
        1,
        RData::A(A(Ipv4Addr::LOCALHOST)),
    ));
    cases.push(("an answer record", answered.to_vec().unwrap()));
    // A compression pointer as the question name.
    let mut compressed = plain[..12].to_vec();
    compressed.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    cases.push(("a compressed name", compressed));
    let mut long_label = plain[..12].to_vec();
    long_label.push(64);
    long_label.extend_from_slice(&[b'a'; 64]);
    long_label.extend_from_slice(&[0, 0, 1, 0, 1]);
    cases.push(("a 64-byte label", long_label));
    let mut long_name = plain[..12].to_vec();
    for _ in 0..5 {
        long_name.push(63);
        long_name.extend_from_slice(&[b'a'; 63]);
    }
    long_name.extend_from_slice(&[0, 0, 1, 0, 1]);
    cases.push(("a name over 255 bytes", long_name));
    for (what, packet) in cases {
        assert!(QueryView::parse(&packet).is_none(), "{what} was accepted");
    }
    for len in 0..plain.len() {
        assert!(QueryView::parse(&plain[..len]).is_none(), "{len} bytes");
    }
}

#[test]
fn the_cache_key_ignores_case_and_id_but_not_type_flags_or_edns() {
    let base = key(&query("example.com.", RecordType::A).to_vec().unwrap());
    let mut other_id = query("EXAMPLE.com.", RecordType::A);
    other_id.metadata.id = 9;
    assert_eq!(key(&other_id.to_vec().unwrap()), base);

    let aaaa = key(&query("example.com.", RecordType::AAAA).to_vec().unwrap());
    let mut no_rd = query("example.com.", RecordType::A);
    no_rd.metadata.recursion_desired = false;
    let mut cd = query("example.com.", RecordType::A);
    cd.metadata.checking_disabled = true;
    let edns = key(
        &with_edns(query("example.com.", RecordType::A), 1232, false)
            .to_vec()
            .unwrap(),
    );
    let dnssec = key(&with_edns(query("example.com.", RecordType::A), 1232, true)
        .to_vec()
        .unwrap());
    let others = [
        aaaa,
        key(&no_rd.to_vec().unwrap()),
        key(&cd.to_vec().unwrap()),
        edns.clone(),
        dnssec,
    ];
    for (i, k) in others.iter().enumerate() {
        assert_ne!(k, &base, "variant {i}");
    }
    // The payload size is not part of the key: it only decides truncation.
    let bigger = key(
        &with_edns(query("example.com.", RecordType::A), 4096, false)
            .to_vec()
            .unwrap(),
    );
    assert_eq!(bigger, edns);
}

#[test]
fn a_template_replays_with_the_id_case_and_aged_ttls_of_each_query() {
    let req = query("example.com.", RecordType::A);
    let reply = reply_to(&req, 300, 2).to_vec().unwrap();
    let (template, facts) = Template::from_reply(&reply).unwrap();
    assert_eq!(facts.rcode, 0);
    assert_eq!(facts.answers, 2);
    assert_eq!(facts.min_ttl, Some(300));
    assert_eq!(facts.negative_ttl, None);

    let mut later = query("eXaMpLe.CoM.", RecordType::A);
    later.metadata.id = 0x7777;
    let later_bytes = later.to_vec().unwrap();
    let view = QueryView::parse(&later_bytes).unwrap();
    let mut out = Vec::new();
    assert!(!template.write_reply(&view, 100, 512, &mut out));
    let msg = Message::from_vec(&out).unwrap();
    assert_eq!(msg.metadata.id, 0x7777);
    assert!(msg.queries[0].name.eq_case(&name("eXaMpLe.CoM.")));
    let ttls: Vec<u32> = msg.answers.iter().map(|r| r.ttl).collect();
    assert_eq!(ttls, vec![200, 201]);
    // Past the TTL, zero (the cache drops the entry before that happens).
    template.write_reply(&view, 1_000, 512, &mut out);
    let msg = Message::from_vec(&out).unwrap();
    assert!(msg.answers.iter().all(|r| r.ttl == 0));
}

#[test]
fn a_reply_over_the_limit_is_replayed_truncated_with_its_opt_record() {
    let req = with_edns(query("example.com.", RecordType::A), 512, false);
    let mut reply = reply_to(&req, 60, 40);
    reply.edns = req.edns.clone();
    let bytes = reply.to_vec().unwrap();
    assert!(bytes.len() > 512);
    let (template, _) = Template::from_reply(&bytes).unwrap();
    let req_bytes = req.to_vec().unwrap();
    let view = QueryView::parse(&req_bytes).unwrap();
    let mut out = Vec::new();
    assert!(template.write_reply(&view, 0, 512, &mut out));
    let msg = Message::from_vec(&out).unwrap();
    assert!(msg.metadata.truncation);
    assert!(msg.answers.is_empty());
    assert_eq!(msg.queries, req.queries);
    assert!(msg.edns.is_some());
    assert!(!template.write_reply(&view, 0, 65535, &mut out));
    assert_eq!(Message::from_vec(&out).unwrap().answers.len(), 40);
}

#[test]
fn negative_ttl_is_the_smaller_of_the_soa_ttl_and_minimum() {
    let req = query("nope.example.com.", RecordType::A);
    let mut reply = reply_to(&req, 0, 0);
    reply.metadata.response_code = ResponseCode::NXDomain;
    reply.add_authority(soa(3600, 60));
    let (_, facts) = Template::from_reply(&reply.to_vec().unwrap()).unwrap();
    assert_eq!(facts.rcode, 3);
    assert_eq!(facts.negative_ttl, Some(60));
    assert_eq!(facts.min_ttl, Some(3600));

    let mut reply = reply_to(&req, 0, 0);
    reply.add_authority(soa(30, 600));
    let (_, facts) = Template::from_reply(&reply.to_vec().unwrap()).unwrap();
    assert_eq!(facts.negative_ttl, Some(30));
}

#[test]
fn clamped_ttls_are_written_into_the_reply() {
    let req = query("nope.example.com.", RecordType::A);
    let mut reply = reply_to(&req, 0, 0);
    reply.add_authority(soa(3600, 60));
    let (mut template, _) = Template::from_reply(&reply.to_vec().unwrap()).unwrap();
    template.clamp_ttls(60);
    let bytes = req.to_vec().unwrap();
    let view = QueryView::parse(&bytes).unwrap();
    let mut out = Vec::new();
    template.write_reply(&view, 0, 512, &mut out);
    assert_eq!(Message::from_vec(&out).unwrap().authorities[0].ttl, 60);
    template.write_reply(&view, 15, 512, &mut out);
    assert_eq!(Message::from_vec(&out).unwrap().authorities[0].ttl, 45);
}

#[test]
fn a_ttl_with_the_top_bit_set_counts_as_zero() {
    let req = query("example.com.", RecordType::A);
    let reply = reply_to(&req, 0x8000_0001, 1);
    let (_, facts) = Template::from_reply(&reply.to_vec().unwrap()).unwrap();
    assert_eq!(facts.min_ttl, Some(0));
}

#[test]
fn upstream_edns_options_are_removed_when_opt_is_last() {
    let req = query("example.com.", RecordType::A);
    let mut reply = reply_to(&req, 60, 1);
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    edns.options_mut().insert(EdnsOption::Unknown(
        u16::from(EdnsCode::Cookie),
        vec![7; 24],
    ));
    reply.edns = Some(edns);
    let bytes = reply.to_vec().unwrap();
    let (template, _) = Template::from_reply(&bytes).unwrap();
    assert!(template.len() < bytes.len());
    let req_bytes = with_edns(req, 1232, false).to_vec().unwrap();
    let view = QueryView::parse(&req_bytes).unwrap();
    let mut out = Vec::new();
    template.write_reply(&view, 0, 1232, &mut out);
    let msg = Message::from_vec(&out).unwrap();
    let edns = msg.edns.expect("OPT kept");
    assert_eq!(edns.max_payload(), 1232);
    assert!(edns.options().options.is_empty());
    assert_eq!(msg.answers.len(), 1);
}

#[test]
fn cname_chains_keep_their_smallest_ttl() {
    let req = query("www.example.com.", RecordType::A);
    let mut reply = reply_to(&req, 0, 0);
    reply.add_answer(Record::from_rdata(
        name("www.example.com."),
        30,
        RData::CNAME(CNAME(name("example.com."))),
    ));
    reply.add_answer(Record::from_rdata(
        name("example.com."),
        300,
        RData::A(A(Ipv4Addr::LOCALHOST)),
    ));
    let (_, facts) = Template::from_reply(&reply.to_vec().unwrap()).unwrap();
    assert_eq!(facts.min_ttl, Some(30));
    assert_eq!(facts.answers, 2);
}

#[test]
fn malformed_replies_are_refused_never_panicking() {
    let req = query("example.com.", RecordType::A);
    let mut reply = reply_to(&req, 60, 3);
    reply.add_authority(soa(60, 60));
    let bytes = reply.to_vec().unwrap();
    for len in 0..bytes.len() {
        assert!(Template::from_reply(&bytes[..len]).is_err(), "{len} bytes");
    }
    let mut trailing = bytes.clone();
    trailing.push(1);
    assert_eq!(
        Template::from_reply(&trailing).unwrap_err(),
        TemplateError::Malformed
    );
    let mut no_question = bytes.clone();
    no_question[5] = 0;
    assert_eq!(
        Template::from_reply(&no_question).unwrap_err(),
        TemplateError::Question
    );
    // Every single-byte corruption is either accepted or refused, without a panic.
    for at in 0..bytes.len() {
        for value in [0u8, 0x3f, 0x40, 0xc0, 0xff] {
            let mut corrupt = bytes.clone();
            corrupt[at] = value;
            let _ = Template::from_reply(&corrupt);
        }
    }
}

#[test]
fn error_replies_echo_the_question_and_edns() {
    let req = with_edns(query("Example.com.", RecordType::MX), 1232, true);
    let bytes = req.to_vec().unwrap();
    let view = QueryView::parse(&bytes).unwrap();
    let mut out = Vec::new();
    view.error_reply(2, &mut out);
    let msg = Message::from_vec(&out).unwrap();
    assert_eq!(msg.metadata.id, 0x1234);
    assert_eq!(msg.metadata.message_type, MessageType::Response);
    assert_eq!(msg.metadata.response_code, ResponseCode::ServFail);
    assert!(msg.metadata.recursion_desired);
    assert!(msg.metadata.recursion_available);
    assert!(msg.queries[0].name.eq_case(&name("Example.com.")));
    assert!(msg.edns.is_some());
}

#[test]
fn peek_qtype_reads_the_question_type_of_odd_packets() {
    let mut two = query("example.com.", RecordType::SRV);
    two.add_query(Query::query(name("example.org."), RecordType::A));
    assert_eq!(
        peek_qtype(&two.to_vec().unwrap()),
        Some(u16::from(RecordType::SRV))
    );
    assert_eq!(peek_qtype(&[0; 12]), None);
    assert_eq!(peek_qtype(&[0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3]), None);
}
