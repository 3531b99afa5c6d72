//! Bad input over real sockets on 127.0.0.1: every malformed or unsupported request gets
//! FORMERR, NOTIMP or REFUSED with its own id, or is dropped, and the proxy keeps answering.

mod common;

use std::net::{Ipv4Addr, SocketAddr};

use common::*;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::RecordType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;

/// A header with `id`, RD set, and the given section counts.
fn header(id: u16, flags: u16, counts: [u16; 4]) -> Vec<u8> {
    let mut packet = id.to_be_bytes().to_vec();
    packet.extend_from_slice(&flags.to_be_bytes());
    for count in counts {
        packet.extend_from_slice(&count.to_be_bytes());
    }
    packet
}

/// `labels` labels of 63 `a`s, uncompressed, with the root label.
fn long_name(labels: usize) -> Vec<u8> {
    let mut name = Vec::new();
    for _ in 0..labels {
        name.push(63);
        name.extend_from_slice(&[b'a'; 63]);
    }
    name.push(0);
    name
}

/// A-record question type and IN class.
const A_IN: [u8; 4] = [0, 1, 0, 1];

/// The reply to `packet` over UDP, decoded; asserts it answers `id`.
async fn reply_to(server: SocketAddr, packet: &[u8], id: u16) -> Message {
    let reply = Message::from_vec(&udp_exchange(server, packet).await).unwrap();
    assert_eq!(reply.metadata.id, id);
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    reply
}

/// Asserts that the proxy still answers a plain question.
async fn still_serving(server: SocketAddr) {
    let resp = udp_query(
        server,
        &request("web.shop.svc.clusterset.local.", RecordType::A),
    )
    .await;
    assert_eq!(a_answers(&resp), vec![Ipv4Addr::new(240, 240, 0, 1)]);
}

#[tokio::test]
async fn a_compression_pointer_to_itself_is_formerr() {
    let (dns, _tx) = proxy(shop()).await;
    let mut packet = header(0x0101, 0x0100, [1, 0, 0, 0]);
    packet.extend_from_slice(&[0xc0, 12]);
    packet.extend_from_slice(&A_IN);
    let reply = reply_to(dns.udp_addr(), &packet, 0x0101).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    still_serving(dns.udp_addr()).await;
    dns.shutdown().await;
}

#[tokio::test]
async fn a_loop_of_labels_and_pointers_is_formerr() {
    let (dns, _tx) = proxy(shop()).await;
    // Question name at 12: label "a", then a pointer to 16; at 16: label "b", then a pointer
    // back to 12. Following it never reaches the root.
    let mut packet = header(0x0202, 0x0100, [1, 0, 0, 0]);
    packet.extend_from_slice(&[1, b'a', 0xc0, 16, 1, b'b', 0xc0, 12]);
    packet.extend_from_slice(&A_IN);
    let reply = reply_to(dns.udp_addr(), &packet, 0x0202).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    still_serving(dns.udp_addr()).await;
    dns.shutdown().await;
}

#[tokio::test]
async fn a_pointer_past_the_end_is_formerr() {
    let (dns, _tx) = proxy(shop()).await;
    let mut packet = header(0x0303, 0x0100, [1, 0, 0, 0]);
    packet.extend_from_slice(&[3, b'w', b'e', b'b', 0xc3, 0xff]);
    packet.extend_from_slice(&A_IN);
    let reply = reply_to(dns.udp_addr(), &packet, 0x0303).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    dns.shutdown().await;
}

#[tokio::test]
async fn a_name_longer_than_255_bytes_is_formerr() {
    let (dns, _tx) = proxy(shop()).await;
    // Five labels of 63 bytes: 321 bytes on the wire.
    let mut packet = header(0x0404, 0x0100, [1, 0, 0, 0]);
    packet.extend_from_slice(&long_name(5));
    packet.extend_from_slice(&A_IN);
    let reply = reply_to(dns.udp_addr(), &packet, 0x0404).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    still_serving(dns.udp_addr()).await;
    dns.shutdown().await;
}

#[tokio::test]
async fn a_name_made_longer_than_255_bytes_by_compression_is_formerr() {
    let (dns, _tx) = proxy(shop()).await;
    // The question's name is 254 bytes, legal. The record after it owns a 10-byte label
    // followed by a pointer to that name: 265 bytes once expanded.
    let mut packet = header(0x0505, 0x0100, [1, 0, 0, 1]);
    let mut name = Vec::new();
    for _ in 0..3 {
        name.push(63);
        name.extend_from_slice(&[b'a'; 63]);
    }
    name.push(60);
    name.extend_from_slice(&[b'b'; 60]);
    name.push(0);
    assert_eq!(name.len(), 254);
    packet.extend_from_slice(&name);
    packet.extend_from_slice(&A_IN);
    packet.push(10);
    packet.extend_from_slice(b"cccccccccc");
    packet.extend_from_slice(&[0xc0, 12]);
    packet.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1]);
    let reply = reply_to(dns.udp_addr(), &packet, 0x0505).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    still_serving(dns.udp_addr()).await;
    dns.shutdown().await;
}

#[tokio::test]
async fn a_question_cut_short_is_formerr() {
    let (dns, _tx) = proxy(shop()).await;
    let mut packet = header(0x0606, 0x0100, [1, 0, 0, 0]);
    packet.extend_from_slice(&[3, b'w', b'e', b'b', 4, b's', b'h']);
    let reply = reply_to(dns.udp_addr(), &packet, 0x0606).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    dns.shutdown().await;
}

#[tokio::test]
async fn zero_or_two_questions_are_formerr() {
    let (dns, _tx) = proxy(shop()).await;
    let none = header(0x0707, 0x0100, [0, 0, 0, 0]);
    let reply = reply_to(dns.udp_addr(), &none, 0x0707).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);

    let mut two = request("web.shop.svc.clusterset.local.", RecordType::A);
    two.add_query(two.queries[0].clone());
    two.metadata.id = 0x0708;
    let reply = reply_to(dns.udp_addr(), &two.to_vec().unwrap(), 0x0708).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    dns.shutdown().await;
}

#[tokio::test]
async fn unknown_opcodes_are_notimp() {
    let (dns, _tx) = proxy(shop()).await;
    // Opcodes 1 (IQUERY, obsolete), 2 (STATUS), 3 (unassigned), 4 (NOTIFY), 5 (UPDATE) and 15.
    for (index, opcode) in [1u16, 2, 3, 4, 5, 15].into_iter().enumerate() {
        let id = 0x0800 + index as u16;
        let mut packet = header(id, (opcode << 11) | 0x0100, [1, 0, 0, 0]);
        packet.extend_from_slice(&[3, b'w', b'e', b'b', 0]);
        packet.extend_from_slice(&A_IN);
        let reply = reply_to(dns.udp_addr(), &packet, id).await;
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::NotImp,
            "opcode {opcode}"
        );
        assert!(reply.answers.is_empty());
    }
    still_serving(dns.udp_addr()).await;
    dns.shutdown().await;
}

#[tokio::test]
async fn questions_in_classes_other_than_in_are_refused_without_upstream() {
    let upstream = udp_upstream().await;
    let (_tx, rx) = tokio::sync::watch::channel(shop());
    let dns = isthmus_dns::start(
        options(vec![upstream.addr], std::time::Duration::from_secs(2)),
        rx,
    )
    .await
    .unwrap();
    // CH (3), HS (4), NONE (254), ANY (255) and an unassigned class, for a mesh name and
    // for an outside one.
    for class in [3u16, 4, 254, 255, 77] {
        for (name, id) in [
            (&b"\x03web\x04shop\x03svc\x0aclusterset\x05local\x00"[..], 1),
            (&b"\x07version\x04bind\x00"[..], 2),
        ] {
            let id = class << 2 | id;
            let mut packet = header(id, 0x0100, [1, 0, 0, 0]);
            packet.extend_from_slice(name);
            packet.extend_from_slice(&16u16.to_be_bytes());
            packet.extend_from_slice(&class.to_be_bytes());
            let reply = reply_to(dns.udp_addr(), &packet, id).await;
            assert_eq!(
                reply.metadata.response_code,
                ResponseCode::Refused,
                "class {class}"
            );
            assert!(reply.answers.is_empty());
        }
    }
    assert_eq!(upstream.received(), 0);
    dns.shutdown().await;
}

#[tokio::test]
async fn responses_and_short_packets_get_no_reply() {
    let (dns, _tx) = proxy(shop()).await;
    let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    // A response (QR set) to the proxy: answering it would invite reflection loops.
    let mut response = request("web.shop.svc.clusterset.local.", RecordType::A);
    response.metadata.id = 0x0901;
    response.metadata.message_type = MessageType::Response;
    client
        .send_to(&response.to_vec().unwrap(), dns.udp_addr())
        .await
        .unwrap();
    // Fewer bytes than a header, and nothing at all.
    client
        .send_to(&[0x09, 0x02, 0x01], dns.udp_addr())
        .await
        .unwrap();
    client.send_to(&[], dns.udp_addr()).await.unwrap();
    // Then a real question: the first datagram back must be its answer.
    let mut question = request("web.shop.svc.clusterset.local.", RecordType::A);
    question.metadata.id = 0x0903;
    client
        .send_to(&question.to_vec().unwrap(), dns.udp_addr())
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let len = timeout(ANSWER_WAIT, client.recv(&mut buf))
        .await
        .expect("no answer in time")
        .unwrap();
    let reply = Message::from_vec(&buf[..len]).unwrap();
    assert_eq!(reply.metadata.id, 0x0903);
    assert_eq!(a_answers(&reply), vec![Ipv4Addr::new(240, 240, 0, 1)]);
    dns.shutdown().await;
}

#[tokio::test]
async fn a_pointer_loop_over_tcp_is_formerr_and_the_connection_keeps_serving() {
    let (dns, _tx) = proxy(shop()).await;
    let mut stream = TcpStream::connect(dns.tcp_addr()).await.unwrap();
    let mut packet = header(0x0a01, 0x0100, [1, 0, 0, 0]);
    packet.extend_from_slice(&[0xc0, 12]);
    packet.extend_from_slice(&A_IN);
    let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&packet);
    stream.write_all(&framed).await.unwrap();
    let reply = timeout(ANSWER_WAIT, async {
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.unwrap();
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply).await.unwrap();
        Message::from_vec(&reply).unwrap()
    })
    .await
    .expect("no TCP answer in time");
    assert_eq!(reply.metadata.id, 0x0a01);
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);

    let resp = tcp_exchange(
        &mut stream,
        &request("web.shop.svc.clusterset.local.", RecordType::A),
    )
    .await;
    assert_eq!(a_answers(&resp), vec![Ipv4Addr::new(240, 240, 0, 1)]);
    assert_eq!(resp.metadata.op_code, OpCode::Query);
    dns.shutdown().await;
}

#[tokio::test]
async fn a_tcp_client_sending_a_non_query_is_hung_up_on() {
    let (dns, _tx) = proxy(shop()).await;
    let mut stream = TcpStream::connect(dns.tcp_addr()).await.unwrap();
    // Three bytes framed as a message: not even a header, so the framing is not trusted.
    stream.write_all(&[0, 3, 1, 2, 3]).await.unwrap();
    let mut rest = Vec::new();
    let read = timeout(ANSWER_WAIT, stream.read_to_end(&mut rest))
        .await
        .expect("the proxy kept the connection open");
    assert!(read.is_ok_and(|n| n == 0), "unexpected bytes: {rest:?}");
    still_serving(dns.udp_addr()).await;
    dns.shutdown().await;
}
