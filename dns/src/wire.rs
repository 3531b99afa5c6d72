//! The wire-level fast path: reading plain queries and replaying stored replies, without
//! allocating and without a full DNS decoder.
//!
//! - [`QueryView::parse`] accepts only the common shape of a query — opcode QUERY, one
//!   uncompressed question, no answer or authority records, at most an OPT record whose only
//!   options are COOKIE or PADDING, nothing after it — and returns `None` for everything else,
//!   which then goes through the full hickory-proto decoder. It never guesses.
//! - [`Template`] is a complete encoded reply, checked once when it is stored, with the
//!   offsets of every TTL and a pre-built truncated form. [`Template::write_reply`] turns it
//!   into the reply to one query: the query's id and question case, TTLs aged, and the
//!   truncated form when the full one is over the client's limit.
//!
//! Nothing here does I/O or reads a clock: ages are passed in.

use crate::answer::{Transport, UDP_DEFAULT_LIMIT};

/// Length of the DNS header.
pub const HEADER_LEN: usize = 12;
/// Longest domain name on the wire (RFC 1035 §2.3.4).
pub const MAX_NAME_LEN: usize = 255;
/// Record type OPT (EDNS, RFC 6891).
pub const TYPE_OPT: u16 = 41;
/// Record type SOA.
pub const TYPE_SOA: u16 = 6;

const FLAG_QR: u16 = 0x8000;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_AD: u16 = 0x0020;
const FLAG_CD: u16 = 0x0010;
const OPCODE_MASK: u16 = 0x7800;
const RCODE_MASK: u16 = 0x000f;
/// EDNS options a cached reply does not depend on.
const OPTION_COOKIE: u16 = 10;
const OPTION_PADDING: u16 = 12;
/// The DO bit in the OPT record's TTL field (the low 16 bits are the EDNS flags).
const EDNS_DO: u32 = 0x8000;

// Cache-key flag bits: everything about a query, besides its question, that a reply depends on.
const KEY_RD: u8 = 1;
const KEY_CD: u8 = 2;
const KEY_AD: u8 = 4;
const KEY_EDNS: u8 = 8;
const KEY_DO: u8 = 16;

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The end of an uncompressed name starting at `at` (just past its root label), or `None`
/// when the name is compressed, malformed, runs off the end or is longer than 255 bytes.
fn uncompressed_name_end(bytes: &[u8], at: usize) -> Option<usize> {
    let mut pos = at;
    loop {
        let len = usize::from(*bytes.get(pos)?);
        if len == 0 {
            pos += 1;
            return (pos - at <= MAX_NAME_LEN).then_some(pos);
        }
        if len > 63 {
            return None;
        }
        pos += 1 + len;
        if pos - at > MAX_NAME_LEN {
            return None;
        }
    }
}

/// The end of a possibly compressed name starting at `at`, without following pointers (a
/// pointer ends the name in place, so loops cannot happen).
fn skip_name(bytes: &[u8], at: usize) -> Option<usize> {
    let mut pos = at;
    loop {
        let len = *bytes.get(pos)?;
        match len & 0xc0 {
            0x00 if len == 0 => return Some(pos + 1),
            0x00 => {
                pos += 1 + usize::from(len);
                if pos - at > MAX_NAME_LEN {
                    return None;
                }
            }
            0xc0 => {
                bytes.get(pos + 1)?;
                return Some(pos + 2);
            }
            _ => return None,
        }
    }
}

/// The question type of a packet whose header and question name are readable, whatever else
/// is wrong with it. For metrics only.
pub fn peek_qtype(packet: &[u8]) -> Option<u16> {
    if u16_at(packet, 4)? == 0 {
        return None;
    }
    let end = skip_name(packet, HEADER_LEN)?;
    u16_at(packet, end)
}

/// The EDNS part of a query the fast path accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdnsInfo {
    /// The UDP payload size the client accepts.
    pub payload: u16,
    /// The DNSSEC OK bit.
    pub dnssec_ok: bool,
}

/// A plain query, read in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryView<'a> {
    packet: &'a [u8],
    qname_end: usize,
    /// The question's type.
    pub qtype: u16,
    /// The question's class.
    pub qclass: u16,
    /// The query's OPT record, if any.
    pub edns: Option<EdnsInfo>,
}

impl<'a> QueryView<'a> {
    /// Reads `packet` if it is a plain query (see the module docs); `None` means "use the full
    /// decoder", not "invalid".
    pub fn parse(packet: &'a [u8]) -> Option<QueryView<'a>> {
        let flags = u16_at(packet, 2)?;
        if flags & (FLAG_QR | OPCODE_MASK | FLAG_TC | RCODE_MASK) != 0 {
            return None;
        }
        let counts = (
            u16_at(packet, 4)?,
            u16_at(packet, 6)?,
            u16_at(packet, 8)?,
            u16_at(packet, 10)?,
        );
        let additional = match counts {
            (1, 0, 0, additional @ (0 | 1)) => additional,
            _ => return None,
        };
        let qname_end = uncompressed_name_end(packet, HEADER_LEN)?;
        let qtype = u16_at(packet, qname_end)?;
        let qclass = u16_at(packet, qname_end + 2)?;
        let question_end = qname_end + 4;
        let edns = if additional == 1 {
            Some(parse_opt(packet, question_end)?)
        } else if packet.len() == question_end {
            None
        } else {
            return None;
        };
        Some(QueryView {
            packet,
            qname_end,
            qtype,
            qclass,
            edns,
        })
    }

    /// The query's message id.
    pub fn id(&self) -> u16 {
        u16::from_be_bytes([self.packet[0], self.packet[1]])
    }

    /// The question name as sent (wire format, uncompressed, original case).
    pub fn qname(&self) -> &'a [u8] {
        &self.packet[HEADER_LEN..self.qname_end]
    }

    /// The whole question section (name, type, class).
    pub fn question(&self) -> &'a [u8] {
        &self.packet[HEADER_LEN..self.qname_end + 4]
    }

    fn flags(&self) -> u16 {
        u16::from_be_bytes([self.packet[2], self.packet[3]])
    }

    /// Writes the cache key of this query into `out` (replacing its contents): the reply
    /// depends on nothing else but the id, the question's case and the size limit.
    pub fn key_into(&self, out: &mut Vec<u8>) {
        let flags = self.flags();
        let mut bits = 0;
        for (flag, bit) in [(FLAG_RD, KEY_RD), (FLAG_CD, KEY_CD), (FLAG_AD, KEY_AD)] {
            if flags & flag != 0 {
                bits |= bit;
            }
        }
        if let Some(edns) = self.edns {
            bits |= KEY_EDNS;
            if edns.dnssec_ok {
                bits |= KEY_DO;
            }
        }
        out.clear();
        out.push(bits);
        out.extend_from_slice(&self.qtype.to_be_bytes());
        out.extend_from_slice(&self.qclass.to_be_bytes());
        out.extend(self.qname().iter().map(u8::to_ascii_lowercase));
    }

    /// The largest reply this query's sender accepts on `transport`.
    pub fn reply_limit(&self, transport: Transport) -> usize {
        match transport {
            Transport::Tcp => usize::from(u16::MAX),
            Transport::Udp => self.edns.map_or(UDP_DEFAULT_LIMIT, |edns| {
                usize::from(edns.payload).max(UDP_DEFAULT_LIMIT)
            }),
        }
    }

    /// An error reply (SERVFAIL, REFUSED, ...) to this query: its id, RD and CD, RA set, the
    /// question, and an OPT record when the query had one.
    pub fn error_reply(&self, rcode: u8, out: &mut Vec<u8>) {
        let flags =
            FLAG_QR | 0x0080 | (self.flags() & (FLAG_RD | FLAG_CD)) | u16::from(rcode & 0xf);
        out.clear();
        out.extend_from_slice(&self.packet[..2]);
        out.extend_from_slice(&flags.to_be_bytes());
        let additional: u16 = if self.edns.is_some() { 1 } else { 0 };
        for count in [1, 0, 0, additional] {
            out.extend_from_slice(&u16::to_be_bytes(count));
        }
        out.extend_from_slice(self.question());
        if self.edns.is_some() {
            push_empty_opt(out, crate::answer::EDNS_PAYLOAD, 0);
        }
    }
}

/// Reads the OPT record at `at`, which must be the last thing in the packet.
fn parse_opt(packet: &[u8], at: usize) -> Option<EdnsInfo> {
    // Owner: the root name.
    if *packet.get(at)? != 0 || u16_at(packet, at + 1)? != TYPE_OPT {
        return None;
    }
    let payload = u16_at(packet, at + 3)?;
    let ttl = u32_at(packet, at + 5)?;
    // Extended rcode and version must be 0: anything else is for the full decoder.
    if ttl >> 16 != 0 {
        return None;
    }
    let rdlen = usize::from(u16_at(packet, at + 9)?);
    let rdata_start = at + 11;
    let rdata_end = rdata_start + rdlen;
    if packet.len() != rdata_end {
        return None;
    }
    let mut pos = rdata_start;
    while pos < rdata_end {
        let code = u16_at(packet, pos)?;
        let len = usize::from(u16_at(packet, pos + 2)?);
        if code != OPTION_COOKIE && code != OPTION_PADDING {
            return None;
        }
        pos += 4 + len;
    }
    (pos == rdata_end).then_some(EdnsInfo {
        payload,
        dnssec_ok: ttl & EDNS_DO != 0,
    })
}

/// Appends an OPT record without options.
fn push_empty_opt(out: &mut Vec<u8>, payload: u16, ttl: u32) {
    out.push(0);
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&payload.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
}

/// Why a reply cannot be stored as a [`Template`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The reply is cut short, a name is malformed, or there are bytes after the last record.
    #[error("the reply is malformed")]
    Malformed,
    /// The reply does not have exactly one uncompressed question.
    #[error("the reply does not carry exactly one plain question")]
    Question,
    /// The reply has EDNS options but its OPT record is not last, so they cannot be removed.
    #[error("the reply's OPT record with options is not its last record")]
    OptNotLast,
}

/// What a reply says, as far as caching it is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplyFacts {
    /// The response code, extended bits from OPT included.
    pub rcode: u16,
    /// TC was set.
    pub truncated: bool,
    /// Records in the answer section.
    pub answers: u16,
    /// The smallest TTL of any record but OPT, if there is one.
    pub min_ttl: Option<u32>,
    /// min(TTL, MINIMUM) of the first SOA in the authority section (RFC 2308 §5).
    pub negative_ttl: Option<u32>,
}

/// Where one TTL sits in a [`Template`], and its stored value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TtlSlot {
    offset: usize,
    ttl: u32,
}

/// A complete reply, ready to be replayed to any query with the same cache key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    full: Box<[u8]>,
    truncated: Box<[u8]>,
    qname_len: usize,
    ttls: Box<[TtlSlot]>,
    rcode: u16,
}

impl Template {
    /// Checks and stores an encoded reply. EDNS options in its OPT record (an upstream's
    /// cookie, say) are removed: they were meant for another client.
    pub fn from_reply(reply: &[u8]) -> Result<(Template, ReplyFacts), TemplateError> {
        use TemplateError::Malformed;
        let flags = u16_at(reply, 2).ok_or(Malformed)?;
        let count = |at| u16_at(reply, at).ok_or(Malformed);
        let (questions, answers, authority, additional) =
            (count(4)?, count(6)?, count(8)?, count(10)?);
        if questions != 1 {
            return Err(TemplateError::Question);
        }
        let qname_end = uncompressed_name_end(reply, HEADER_LEN).ok_or(TemplateError::Question)?;
        let question_end = qname_end + 4;
        if reply.len() < question_end {
            return Err(Malformed);
        }
        let mut facts = ReplyFacts {
            rcode: flags & RCODE_MASK,
            truncated: flags & FLAG_TC != 0,
            answers,
            ..ReplyFacts::default()
        };
        let mut ttls = Vec::new();
        // (start of the OPT record, start of its RDATA length, whether it is the last record)
        let mut opt: Option<(usize, usize, bool)> = None;
        let total = usize::from(answers) + usize::from(authority) + usize::from(additional);
        let mut pos = question_end;
        for index in 0..total {
            let start = pos;
            pos = skip_name(reply, pos).ok_or(Malformed)?;
            let rtype = u16_at(reply, pos).ok_or(Malformed)?;
            let ttl_at = pos + 4;
            let raw_ttl = u32_at(reply, ttl_at).ok_or(Malformed)?;
            let rdlen_at = pos + 8;
            let rdlen = usize::from(u16_at(reply, rdlen_at).ok_or(Malformed)?);
            let rdata_end = rdlen_at + 2 + rdlen;
            if rdata_end > reply.len() {
                return Err(Malformed);
            }
            if rtype == TYPE_OPT {
                facts.rcode |= u16::from(reply[ttl_at]) << 4;
                opt = Some((start, rdlen_at, index + 1 == total));
            } else {
                // RFC 2181 §8: a TTL with the top bit set means zero.
                let ttl = if raw_ttl & 0x8000_0000 != 0 {
                    0
                } else {
                    raw_ttl
                };
                ttls.push(TtlSlot {
                    offset: ttl_at,
                    ttl,
                });
                facts.min_ttl = Some(facts.min_ttl.map_or(ttl, |min| min.min(ttl)));
                let in_authority = (usize::from(answers)
                    ..usize::from(answers) + usize::from(authority))
                    .contains(&index);
                if rtype == TYPE_SOA && in_authority && facts.negative_ttl.is_none() && rdlen >= 22
                {
                    let minimum = u32_at(reply, rdata_end - 4).ok_or(Malformed)?;
                    facts.negative_ttl = Some(ttl.min(minimum));
                }
            }
            pos = rdata_end;
        }
        if pos != reply.len() {
            return Err(Malformed);
        }

        let mut full = reply.to_vec();
        let mut opt_record = None;
        if let Some((start, rdlen_at, last)) = opt {
            let has_options = reply[rdlen_at] != 0 || reply[rdlen_at + 1] != 0;
            if has_options {
                if !last {
                    return Err(TemplateError::OptNotLast);
                }
                full.truncate(rdlen_at + 2);
                full[rdlen_at] = 0;
                full[rdlen_at + 1] = 0;
            }
            // payload and TTL field (extended rcode, version, flags) of the OPT record
            let payload = u16_at(reply, start + 3).ok_or(Malformed)?;
            let ttl = u32_at(reply, start + 5).ok_or(Malformed)?;
            opt_record = Some((payload, ttl));
        }

        let mut truncated = Vec::with_capacity(question_end + 11);
        truncated.extend_from_slice(&reply[..2]);
        truncated.extend_from_slice(&(flags | FLAG_TC).to_be_bytes());
        let opt_count: u16 = if opt_record.is_some() { 1 } else { 0 };
        for count in [1, 0, 0, opt_count] {
            truncated.extend_from_slice(&u16::to_be_bytes(count));
        }
        truncated.extend_from_slice(&reply[HEADER_LEN..question_end]);
        if let Some((payload, ttl)) = opt_record {
            push_empty_opt(&mut truncated, payload, ttl);
        }

        Ok((
            Template {
                full: full.into(),
                truncated: truncated.into(),
                qname_len: qname_end - HEADER_LEN,
                ttls: ttls.into(),
                rcode: facts.rcode,
            },
            facts,
        ))
    }

    /// Lowers every TTL above `max` to `max`, so that a served TTL never outlives the entry.
    pub fn clamp_ttls(&mut self, max: u32) {
        for slot in self.ttls.iter_mut() {
            if slot.ttl > max {
                slot.ttl = max;
                self.full[slot.offset..slot.offset + 4].copy_from_slice(&max.to_be_bytes());
            }
        }
    }

    /// The reply's response code (extended bits included).
    pub fn rcode(&self) -> u16 {
        self.rcode
    }

    /// The length of the full reply.
    pub fn len(&self) -> usize {
        self.full.len()
    }

    /// Whether the full reply is empty (never, for a template that was built).
    pub fn is_empty(&self) -> bool {
        self.full.is_empty()
    }

    /// Writes the reply to `query` into `out` (replacing its contents): the query's id and
    /// question case, every TTL lowered by `age` seconds, and the truncated form (TC set) when
    /// the full reply is longer than `limit`. Returns whether the reply was truncated.
    pub fn write_reply(
        &self,
        query: &QueryView<'_>,
        age: u32,
        limit: usize,
        out: &mut Vec<u8>,
    ) -> bool {
        let truncated = self.full.len() > limit;
        out.clear();
        out.extend_from_slice(if truncated {
            &self.truncated
        } else {
            &self.full
        });
        out[..2].copy_from_slice(&query.id().to_be_bytes());
        let qname = query.qname();
        if qname.len() == self.qname_len {
            out[HEADER_LEN..HEADER_LEN + qname.len()].copy_from_slice(qname);
        }
        if !truncated && age > 0 {
            for slot in self.ttls.iter() {
                let ttl = slot.ttl.saturating_sub(age);
                out[slot.offset..slot.offset + 4].copy_from_slice(&ttl.to_be_bytes());
            }
        }
        truncated
    }

    /// Writes the full reply with only the id replaced, for a client whose query the fast path
    /// could not read.
    pub fn write_with_id(&self, id: [u8; 2], out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.full);
        out[..2].copy_from_slice(&id);
    }
}

#[cfg(test)]
#[path = "wire/tests.rs"]
#[allow(
    clippy::cast_possible_truncation,
    reason = "the tests make small numbers from loop counters: truncating is the point"
)]
mod tests;
