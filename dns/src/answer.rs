//! Answering: turns a request into a complete response, or into the decision to forward it.
//!
//! Two entry points, both pure (no I/O, no clock):
//!
//! - [`answer`] takes a parsed request and the current [`MeshTable`] and returns
//!   [`Outcome::Respond`] with the response message, or [`Outcome::Forward`].
//! - [`handle_packet`] wraps it for raw bytes off the wire: it drops what is not a query,
//!   answers FORMERR when only the header could be read, NOTIMP for opcodes other than QUERY,
//!   REFUSED for classes other than IN, encodes the response and sets TC when it does not fit
//!   the client's size limit.
//!
//! The server calls [`handle_packet`] once per received message, sends [`Action::Reply`] as
//! is, and for [`Action::Forward`] relays the original packet upstream (building SERVFAIL with
//! [`servfail`] when no upstream answers).

use hickory_proto::op::{Edns, Header, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinDecodable;
use tracing::debug;

use crate::records::{Lookup, MeshTable, Node, VERSION_TTL, ZONE};

/// The UDP payload size the proxy advertises in its EDNS answers (the DNS flag day 2020 value).
pub const EDNS_PAYLOAD: u16 = 1232;

/// The largest DNS message a client accepts over plain UDP without EDNS.
pub const UDP_DEFAULT_LIMIT: usize = 512;

/// SRV priority of every mesh answer (one target per name, so the value does not matter).
pub const SRV_PRIORITY: u16 = 0;
/// SRV weight of every mesh answer.
pub const SRV_WEIGHT: u16 = 100;

/// What to do with a parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Send this response.
    Respond(Message),
    /// The name is not the mesh's: relay the request upstream.
    Forward,
}

/// The transport a message came in on; it decides the response size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What to do with a received packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send these bytes back to the client.
    Reply(Vec<u8>),
    /// Relay the original packet upstream; `request` is its parsed form, for building SERVFAIL.
    Forward { request: Box<Message> },
    /// Say nothing (not a DNS query, or not even a header).
    Drop,
}

/// Answers one parsed request from the table, or decides it must be forwarded.
///
/// `ttl` is the TTL of every mesh record.
pub fn answer(table: &MeshTable, request: &Message, ttl: u32) -> Outcome {
    if request.metadata.op_code != OpCode::Query {
        return Outcome::Respond(response(request, ResponseCode::NotImp, false));
    }
    let [query] = request.queries.as_slice() else {
        return Outcome::Respond(response(request, ResponseCode::FormErr, false));
    };
    // Only the Internet class exists in a cluster: CH, HS, NONE, ANY and unassigned classes
    // are refused rather than relayed to resolvers that have no more use for them than we do.
    if query.query_class != DNSClass::IN {
        return Outcome::Respond(response(request, ResponseCode::Refused, false));
    }
    let qname = &query.name;
    let qtype = query.query_type;

    match table.lookup(qname) {
        Lookup::Found(node) => {
            let mut msg = response(request, ResponseCode::NoError, true);
            add_node_records(&mut msg, table, qname, qtype, node, ttl);
            if msg.answers.is_empty() {
                // NODATA: the SOA lets caches in front of us keep the answer (RFC 2308).
                add_soa(&mut msg.authorities, table, ttl);
            }
            Outcome::Respond(msg)
        }
        Lookup::NxDomain => {
            let mut msg = response(request, ResponseCode::NXDomain, true);
            add_soa(&mut msg.authorities, table, ttl);
            Outcome::Respond(msg)
        }
        // A resolver walking its search list: answer the mesh name at once, as a CNAME to it
        // followed by its records, so the application needs no further question. Not
        // authoritative: cluster.local is not our zone.
        Lookup::SearchExpansion { labels, node } => {
            let mut msg = response(request, ResponseCode::NoError, false);
            let Ok(target) = Name::from_labels(qname.iter().take(labels)) else {
                return Outcome::Respond(response(request, ResponseCode::ServFail, false));
            };
            msg.add_answer(Record::from_rdata(
                qname.clone(),
                ttl,
                RData::CNAME(CNAME(target.clone())),
            ));
            if qtype != RecordType::CNAME {
                add_node_records(&mut msg, table, &target, qtype, node, ttl);
            }
            if msg.answers.len() == 1 && qtype != RecordType::CNAME {
                // The mesh name has nothing of this type: the SOA lets the client cache that.
                add_soa(&mut msg.authorities, table, ttl);
            }
            Outcome::Respond(msg)
        }
        Lookup::Outside => match table.reverse(qname) {
            Some(service) if matches!(qtype, RecordType::PTR | RecordType::ANY) => {
                let mut msg = response(request, ResponseCode::NoError, true);
                msg.add_answer(Record::from_rdata(
                    qname.clone(),
                    ttl,
                    RData::PTR(PTR(service.clone())),
                ));
                Outcome::Respond(msg)
            }
            _ => Outcome::Forward,
        },
    }
}

/// Handles one raw message received on `transport`, answering from `table`.
///
/// A local answer larger than the client accepts on `transport` (see [`reply_limit`]) is
/// replaced by its truncated form: question only, TC set.
pub fn handle_packet(table: &MeshTable, packet: &[u8], transport: Transport, ttl: u32) -> Action {
    let header = match Header::from_bytes(packet) {
        Ok(header) => header,
        Err(error) => {
            debug!(%error, len = packet.len(), "dropping a packet without a DNS header");
            return Action::Drop;
        }
    };
    if header.metadata.message_type != MessageType::Query {
        // Answering responses invites reflection loops.
        debug!(
            id = header.metadata.id,
            "dropping a DNS response sent to the proxy"
        );
        return Action::Drop;
    }
    if header.metadata.op_code != OpCode::Query {
        return encode_or_drop(
            header_only_response(&header.metadata, ResponseCode::NotImp),
            usize::MAX,
        );
    }
    let request = match Message::from_vec(packet) {
        Ok(request) => request,
        Err(error) => {
            debug!(id = header.metadata.id, %error, "malformed DNS query");
            return encode_or_drop(
                header_only_response(&header.metadata, ResponseCode::FormErr),
                usize::MAX,
            );
        }
    };
    match answer(table, &request, ttl) {
        Outcome::Respond(msg) => encode_or_drop(msg, reply_limit(&request, transport)),
        Outcome::Forward => Action::Forward {
            request: Box::new(request),
        },
    }
}

/// The largest response `request`'s sender accepts on `transport`: 65535 on TCP; on UDP the
/// EDNS payload size it advertised, or 512 without EDNS.
pub fn reply_limit(request: &Message, transport: Transport) -> usize {
    match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => request.edns.as_ref().map_or(UDP_DEFAULT_LIMIT, |edns| {
            usize::from(edns.max_payload()).max(UDP_DEFAULT_LIMIT)
        }),
    }
}

/// SERVFAIL for `request`, encoded: what the client gets when no upstream answers.
pub fn servfail(request: &Message) -> Option<Vec<u8>> {
    encode(&response(request, ResponseCode::ServFail, false))
}

/// Encodes `msg`; when it is longer than `max_len`, encodes its truncated form instead.
pub fn encode_limited(msg: &Message, max_len: usize) -> Option<Vec<u8>> {
    let bytes = encode(msg)?;
    if bytes.len() <= max_len {
        return Some(bytes);
    }
    let mut truncated = msg.truncate();
    truncated.metadata.truncation = true;
    encode(&truncated)
}

fn encode_or_drop(msg: Message, max_len: usize) -> Action {
    match encode_limited(&msg, max_len) {
        Some(bytes) => Action::Reply(bytes),
        None => Action::Drop,
    }
}

fn encode(msg: &Message) -> Option<Vec<u8>> {
    match msg.to_vec() {
        Ok(bytes) => Some(bytes),
        Err(error) => {
            debug!(id = msg.metadata.id, %error, "cannot encode a DNS response");
            None
        }
    }
}

/// A response to `request` echoing its question, with RA set and an OPT record when the
/// request had one.
fn response(request: &Message, code: ResponseCode, authoritative: bool) -> Message {
    let mut msg = Message::response(request.metadata.id, request.metadata.op_code);
    msg.metadata = Metadata::response_from_request(&request.metadata);
    msg.metadata.response_code = code;
    msg.metadata.authoritative = authoritative;
    msg.metadata.recursion_available = true;
    msg.queries = request.queries.clone();
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        msg.edns = Some(edns);
    }
    msg
}

/// A response that can be built from the header alone, for requests whose body is unreadable
/// or whose opcode we do not implement.
fn header_only_response(request: &Metadata, code: ResponseCode) -> Message {
    let mut msg = Message::response(request.id, request.op_code);
    msg.metadata = Metadata::response_from_request(request);
    msg.metadata.response_code = code;
    msg.metadata.recursion_available = true;
    msg
}

/// The zone's SOA record: the serial is the configuration version (low 32 bits), and both the
/// record's TTL and its MINIMUM (the negative-caching TTL) are the mesh TTL.
pub fn soa_record(table: &MeshTable, ttl: u32) -> Option<Record> {
    let apex = Name::from_labels(ZONE).ok()?;
    let mname = Name::from_labels(["ns", "dns", ZONE[0], ZONE[1]]).ok()?;
    let rname = Name::from_labels(["hostmaster", ZONE[0], ZONE[1]]).ok()?;
    #[allow(
        clippy::cast_possible_truncation,
        reason = "the serial is the version modulo 2^32 (RFC 1982 serial arithmetic)"
    )]
    let serial = (table.version() & u64::from(u32::MAX)) as u32;
    Some(Record::from_rdata(
        apex,
        ttl,
        RData::SOA(SOA::new(mname, rname, serial, 28_800, 7_200, 604_800, ttl)),
    ))
}

fn add_soa(section: &mut Vec<Record>, table: &MeshTable, ttl: u32) {
    if let Some(soa) = soa_record(table, ttl) {
        section.push(soa);
    }
}

/// Adds the records of `node` matching `qtype`, owned by the question's name as written.
/// Nothing matching leaves the answer empty: NODATA.
fn add_node_records(
    msg: &mut Message,
    table: &MeshTable,
    qname: &Name,
    qtype: RecordType,
    node: &Node,
    ttl: u32,
) {
    let any = qtype == RecordType::ANY;
    if node.apex && (any || qtype == RecordType::SOA) {
        if let Some(mut soa) = soa_record(table, ttl) {
            soa.name = qname.clone();
            msg.add_answer(soa);
        }
    }
    if any || qtype == RecordType::TXT {
        if let Some(txt) = node.txt {
            msg.add_answer(Record::from_rdata(
                qname.clone(),
                VERSION_TTL,
                RData::TXT(TXT::new(vec![txt.to_string()])),
            ));
        }
    }
    if any || qtype == RecordType::A {
        for &ip in &node.a {
            msg.add_answer(Record::from_rdata(qname.clone(), ttl, RData::A(A(ip))));
        }
    }
    if any || qtype == RecordType::AAAA {
        for &ip in &node.aaaa {
            msg.add_answer(Record::from_rdata(
                qname.clone(),
                ttl,
                RData::AAAA(AAAA(ip)),
            ));
        }
    }
    if any || qtype == RecordType::SRV {
        for srv in &node.srv {
            msg.add_answer(Record::from_rdata(
                qname.clone(),
                ttl,
                RData::SRV(SRV::new(
                    SRV_PRIORITY,
                    SRV_WEIGHT,
                    srv.port,
                    srv.target.clone(),
                )),
            ));
            let glue = match srv.vip {
                std::net::IpAddr::V4(ip) => RData::A(A(ip)),
                std::net::IpAddr::V6(ip) => RData::AAAA(AAAA(ip)),
            };
            let glue = Record::from_rdata(srv.target.clone(), ttl, glue);
            if !msg.additionals.contains(&glue) {
                msg.add_additional(glue);
            }
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "the tests make noise and small numbers: truncating is the point"
)]
mod tests;
