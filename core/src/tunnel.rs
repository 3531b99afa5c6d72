//! The stream header spoken on tunnelled connections.
//!
//! A sidecar connecting to its cluster's east-west gateway over TCP, and a gateway opening a
//! QUIC stream to another cluster's gateway, both begin with an [`OpenRequest`]; the receiver
//! answers with an [`OpenResponse`] before any payload flows. After a response with
//! [`ReasonCode::Ok`] the stream is raw bytes both ways: the workloads' own mTLS, which no
//! gateway ever decrypts. Any other code ends the stream.
//!
//! The byte layout is documented in `docs/tunnel-protocol.md`. In short: a 4-byte magic
//! (`ISTH`), a version byte, a kind byte, a big-endian `u16` body length, then the body made of
//! fixed-width integers and `u16`-length-prefixed UTF-8 strings (optional strings carry a
//! presence byte first). Every size is bounded, every field is validated, and decoding never
//! panics: bad input yields a [`TunnelError`] that names what was wrong.
//!
//! The codec ([`decode`], [`Header::encode`] and the per-type wrappers) does no I/O. It is
//! incremental: [`decode`] returns `Ok(None)` until the buffer holds a whole header, and
//! rejects a bad magic, version, kind or length as soon as those bytes arrive. The async
//! helpers ([`read_request`], [`write_request`], [`read_response`], [`write_response`]) are a
//! thin layer over any tokio `AsyncRead`/`AsyncWrite`; the readers consume exactly the
//! header's bytes, so payload bytes that follow stay in the stream for the caller.

use std::fmt;
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The first four bytes of every header.
pub const MAGIC: [u8; 4] = *b"ISTH";
/// The header version this code speaks.
pub const VERSION: u8 = 1;
/// Bytes before the body: magic, version, kind and the body length.
pub const PREFIX_LEN: usize = 8;
/// The largest body accepted (and produced).
pub const MAX_BODY_LEN: usize = 2048;
/// The largest whole header: prefix plus the largest body.
pub const MAX_HEADER_LEN: usize = PREFIX_LEN + MAX_BODY_LEN;

/// Limit on [`OpenRequest::service`], in bytes.
pub const MAX_SERVICE_LEN: usize = 253;
/// Limit on [`OpenRequest::subset`], in bytes.
pub const MAX_SUBSET_LEN: usize = 253;
/// Limit on [`OpenRequest::target_cluster`] and [`OpenRequest::source_cluster`], in bytes.
pub const MAX_CLUSTER_LEN: usize = 63;
/// Limit on [`OpenRequest::trace_context`], in bytes.
pub const MAX_TRACE_CONTEXT_LEN: usize = 512;
/// Limit on [`OpenResponse::message`], in bytes.
pub const MAX_MESSAGE_LEN: usize = 1024;

/// What went wrong with a tunnel header, or with reading or writing one.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("not a tunnel header: it starts with {found:02x?}, not the magic {MAGIC:02x?}")]
    BadMagic { found: Vec<u8> },
    #[error("unsupported tunnel header version {found} (this side speaks version {VERSION})")]
    UnsupportedVersion { found: u8 },
    #[error("unknown tunnel header kind {found} (expected 1 = open request or 2 = open response)")]
    UnknownKind { found: u8 },
    #[error("expected an {expected} header, got an {found} header")]
    UnexpectedKind {
        expected: HeaderKind,
        found: HeaderKind,
    },
    #[error("the header body is {length} bytes, more than the limit of {MAX_BODY_LEN}")]
    TooLarge { length: usize },
    #[error("field {field} runs past the end of the header body")]
    Truncated { field: &'static str },
    #[error("{extra} unexpected byte(s) after the last field of the header body")]
    TrailingBytes { extra: usize },
    #[error("field {field} is {length} bytes, more than the limit of {max}")]
    FieldTooLong {
        field: &'static str,
        length: usize,
        max: usize,
    },
    #[error("field {field} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    #[error("field {field} has presence flag {found} (expected 0 or 1)")]
    BadPresenceFlag { field: &'static str, found: u8 },
    #[error("field {field} is invalid: {reason}")]
    InvalidField {
        field: &'static str,
        reason: &'static str,
    },
    #[error("unknown reason code {code}")]
    UnknownReasonCode { code: u8 },
    #[error("the stream ended after {received} byte(s), before the tunnel header was complete")]
    UnexpectedEof { received: usize },
    #[error("reading the tunnel header failed")]
    Read(#[source] io::Error),
    #[error("writing the tunnel header failed")]
    Write(#[source] io::Error),
}

/// The two kinds of header, numbered as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum HeaderKind {
    OpenRequest = 1,
    OpenResponse = 2,
}

impl HeaderKind {
    fn from_u8(found: u8) -> Result<Self, TunnelError> {
        match found {
            1 => Ok(HeaderKind::OpenRequest),
            2 => Ok(HeaderKind::OpenResponse),
            found => Err(TunnelError::UnknownKind { found }),
        }
    }
}

impl fmt::Display for HeaderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HeaderKind::OpenRequest => "open request",
            HeaderKind::OpenResponse => "open response",
        })
    }
}

/// Why a receiver did or did not open a tunnel, numbered as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReasonCode {
    /// The tunnel is open; raw payload follows in both directions.
    Ok = 0,
    /// The service does not exist in the target cluster, or it is not exported.
    UnknownService = 1,
    /// The service exists but has no healthy endpoint (in the requested subset) to take it.
    NoHealthyEndpoint = 2,
    /// The caller is not allowed to open this tunnel.
    Forbidden = 3,
    /// The receiver is at capacity; try elsewhere.
    Overloaded = 4,
    /// There is no connection to the target cluster's gateway.
    Unreachable = 5,
    /// The request was malformed or made no sense to the receiver.
    BadRequest = 6,
}

impl ReasonCode {
    /// Every code, in wire order.
    pub const ALL: [ReasonCode; 7] = [
        ReasonCode::Ok,
        ReasonCode::UnknownService,
        ReasonCode::NoHealthyEndpoint,
        ReasonCode::Forbidden,
        ReasonCode::Overloaded,
        ReasonCode::Unreachable,
        ReasonCode::BadRequest,
    ];

    /// The number on the wire.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// A short lowercase name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::Ok => "ok",
            ReasonCode::UnknownService => "unknown_service",
            ReasonCode::NoHealthyEndpoint => "no_healthy_endpoint",
            ReasonCode::Forbidden => "forbidden",
            ReasonCode::Overloaded => "overloaded",
            ReasonCode::Unreachable => "unreachable",
            ReasonCode::BadRequest => "bad_request",
        }
    }
}

impl TryFrom<u8> for ReasonCode {
    type Error = TunnelError;
    fn try_from(code: u8) -> Result<Self, TunnelError> {
        ReasonCode::ALL
            .into_iter()
            .find(|c| c.as_u8() == code)
            .ok_or(TunnelError::UnknownReasonCode { code })
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The first thing on a tunnelled stream: which service to reach, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRequest {
    /// `<name>.<namespace>`: two non-empty labels of ASCII letters, digits and `-`.
    pub service: String,
    /// The service port (not 0).
    pub port: u16,
    /// A label selector restricting the endpoints: `key=value` pairs separated by `,`, or a
    /// bare value meaning `version=<value>`. Printable ASCII, not empty when present.
    pub subset: Option<String>,
    /// The cluster whose endpoints should serve the stream (not empty).
    pub target_cluster: String,
    /// The cluster the stream comes from. A sidecar may leave it empty; a gateway always sets
    /// it to its own cluster before forwarding.
    pub source_cluster: String,
    /// The caller's W3C `traceparent`, if any. Printable ASCII, not empty when present.
    pub trace_context: Option<String>,
}

/// The selector [`OpenRequest::subset`] carries for a subset's labels: `k=v[,k=v]`.
pub fn subset_selector(labels: &std::collections::BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

impl OpenRequest {
    /// A request for `service` (`<name>.<namespace>`) port `port` in `target_cluster`, with
    /// no subset, no source cluster and no trace context.
    pub fn new(service: impl Into<String>, port: u16, target_cluster: impl Into<String>) -> Self {
        OpenRequest {
            service: service.into(),
            port,
            subset: None,
            target_cluster: target_cluster.into(),
            source_cluster: String::new(),
            trace_context: None,
        }
    }

    /// The service's (name, namespace), when [`OpenRequest::service`] has the right shape.
    pub fn service_parts(&self) -> Option<(&str, &str)> {
        let (name, namespace) = self.service.split_once('.')?;
        (is_label(name) && is_label(namespace)).then_some((name, namespace))
    }

    /// Checks every field against the rules and limits of the wire format.
    pub fn validate(&self) -> Result<(), TunnelError> {
        check_len("service", &self.service, MAX_SERVICE_LEN)?;
        if self.service_parts().is_none() {
            return Err(TunnelError::InvalidField {
                field: "service",
                reason: "must be <name>.<namespace>, two non-empty labels of ASCII letters, digits and '-'",
            });
        }
        if self.port == 0 {
            return Err(TunnelError::InvalidField {
                field: "port",
                reason: "must not be 0",
            });
        }
        if let Some(subset) = &self.subset {
            check_len("subset", subset, MAX_SUBSET_LEN)?;
            check_printable("subset", subset)?;
        }
        check_len("target_cluster", &self.target_cluster, MAX_CLUSTER_LEN)?;
        if self.target_cluster.is_empty() {
            return Err(TunnelError::InvalidField {
                field: "target_cluster",
                reason: "must not be empty",
            });
        }
        check_cluster("target_cluster", &self.target_cluster)?;
        check_len("source_cluster", &self.source_cluster, MAX_CLUSTER_LEN)?;
        check_cluster("source_cluster", &self.source_cluster)?;
        if let Some(trace) = &self.trace_context {
            check_len("trace_context", trace, MAX_TRACE_CONTEXT_LEN)?;
            check_printable("trace_context", trace)?;
        }
        Ok(())
    }

    /// The request's bytes on the wire. Fails when a field breaks a rule or a limit.
    pub fn encode(&self) -> Result<Vec<u8>, TunnelError> {
        self.validate()?;
        let mut body = Vec::with_capacity(64);
        body.extend_from_slice(&self.port.to_be_bytes());
        put_str(&mut body, &self.service);
        put_opt_str(&mut body, self.subset.as_deref());
        put_str(&mut body, &self.target_cluster);
        put_str(&mut body, &self.source_cluster);
        put_opt_str(&mut body, self.trace_context.as_deref());
        frame(HeaderKind::OpenRequest, &body)
    }

    /// Decodes a request from the start of `buf`: `Ok(None)` when more bytes are needed,
    /// otherwise the request and the number of bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(OpenRequest, usize)>, TunnelError> {
        match decode(buf)? {
            None => Ok(None),
            Some((Header::Request(req), used)) => Ok(Some((req, used))),
            Some((Header::Response(_), _)) => Err(TunnelError::UnexpectedKind {
                expected: HeaderKind::OpenRequest,
                found: HeaderKind::OpenResponse,
            }),
        }
    }

    fn decode_body(body: &[u8]) -> Result<OpenRequest, TunnelError> {
        let mut r = BodyReader { body, pos: 0 };
        let port = r.u16("port")?;
        let service = r.string("service", MAX_SERVICE_LEN)?;
        let subset = r.opt_string("subset", MAX_SUBSET_LEN)?;
        let target_cluster = r.string("target_cluster", MAX_CLUSTER_LEN)?;
        let source_cluster = r.string("source_cluster", MAX_CLUSTER_LEN)?;
        let trace_context = r.opt_string("trace_context", MAX_TRACE_CONTEXT_LEN)?;
        r.finish()?;
        let req = OpenRequest {
            service,
            port,
            subset,
            target_cluster,
            source_cluster,
            trace_context,
        };
        req.validate()?;
        Ok(req)
    }
}

/// The receiver's answer to an [`OpenRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenResponse {
    /// Whether the tunnel is open, and if not, why.
    pub code: ReasonCode,
    /// Human-readable detail (empty for Ok), at most [`MAX_MESSAGE_LEN`] bytes of UTF-8.
    pub message: String,
}

impl OpenResponse {
    /// A response with `code` and `message`; a message longer than [`MAX_MESSAGE_LEN`] is cut
    /// at a character boundary so the response always encodes.
    pub fn new(code: ReasonCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE_LEN {
            let mut cut = MAX_MESSAGE_LEN;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        OpenResponse { code, message }
    }

    /// The tunnel is open.
    pub fn ok() -> Self {
        OpenResponse {
            code: ReasonCode::Ok,
            message: String::new(),
        }
    }

    /// Whether the tunnel is open.
    pub fn is_ok(&self) -> bool {
        self.code == ReasonCode::Ok
    }

    /// The response's bytes on the wire. Fails when the message is too long.
    pub fn encode(&self) -> Result<Vec<u8>, TunnelError> {
        check_len("message", &self.message, MAX_MESSAGE_LEN)?;
        let mut body = Vec::with_capacity(3 + self.message.len());
        body.push(self.code.as_u8());
        put_str(&mut body, &self.message);
        frame(HeaderKind::OpenResponse, &body)
    }

    /// Decodes a response from the start of `buf`: `Ok(None)` when more bytes are needed,
    /// otherwise the response and the number of bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(OpenResponse, usize)>, TunnelError> {
        match decode(buf)? {
            None => Ok(None),
            Some((Header::Response(resp), used)) => Ok(Some((resp, used))),
            Some((Header::Request(_), _)) => Err(TunnelError::UnexpectedKind {
                expected: HeaderKind::OpenResponse,
                found: HeaderKind::OpenRequest,
            }),
        }
    }

    fn decode_body(body: &[u8]) -> Result<OpenResponse, TunnelError> {
        let mut r = BodyReader { body, pos: 0 };
        let code = ReasonCode::try_from(r.u8("code")?)?;
        let message = r.string("message", MAX_MESSAGE_LEN)?;
        r.finish()?;
        Ok(OpenResponse { code, message })
    }
}

/// Either header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// Sent by the opener.
    Request(OpenRequest),
    /// Sent by the receiver.
    Response(OpenResponse),
}

impl Header {
    /// Which kind of header this is.
    pub fn kind(&self) -> HeaderKind {
        match self {
            Header::Request(_) => HeaderKind::OpenRequest,
            Header::Response(_) => HeaderKind::OpenResponse,
        }
    }

    /// The header's bytes on the wire.
    pub fn encode(&self) -> Result<Vec<u8>, TunnelError> {
        match self {
            Header::Request(req) => req.encode(),
            Header::Response(resp) => resp.encode(),
        }
    }
}

/// Decodes one header from the start of `buf`.
///
/// Returns `Ok(None)` while `buf` holds a valid but incomplete header, and
/// `Ok(Some((header, consumed)))` once it is complete; bytes after `consumed` are payload and
/// are not looked at. The magic, version, kind and body length are checked as soon as their
/// bytes are present, so garbage is rejected without waiting for more input.
pub fn decode(buf: &[u8]) -> Result<Option<(Header, usize)>, TunnelError> {
    let Some(kind_and_len) = check_prefix(buf)? else {
        return Ok(None);
    };
    let (kind, body_len) = kind_and_len;
    let total = PREFIX_LEN + body_len;
    let Some(body) = buf.get(PREFIX_LEN..total) else {
        return Ok(None);
    };
    let header = match kind {
        HeaderKind::OpenRequest => Header::Request(OpenRequest::decode_body(body)?),
        HeaderKind::OpenResponse => Header::Response(OpenResponse::decode_body(body)?),
    };
    Ok(Some((header, total)))
}

/// Validates as much of the fixed prefix as `buf` holds; once all of it is there, returns the
/// kind and the body length.
fn check_prefix(buf: &[u8]) -> Result<Option<(HeaderKind, usize)>, TunnelError> {
    let magic_seen = buf.len().min(MAGIC.len());
    if buf[..magic_seen] != MAGIC[..magic_seen] {
        return Err(TunnelError::BadMagic {
            found: buf[..magic_seen].to_vec(),
        });
    }
    let Some(&version) = buf.get(4) else {
        return Ok(None);
    };
    if version != VERSION {
        return Err(TunnelError::UnsupportedVersion { found: version });
    }
    let Some(&kind) = buf.get(5) else {
        return Ok(None);
    };
    let kind = HeaderKind::from_u8(kind)?;
    let Some(len) = buf.get(6..8) else {
        return Ok(None);
    };
    let body_len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    if body_len > MAX_BODY_LEN {
        return Err(TunnelError::TooLarge { length: body_len });
    }
    Ok(Some((kind, body_len)))
}

fn frame(kind: HeaderKind, body: &[u8]) -> Result<Vec<u8>, TunnelError> {
    // Field limits keep every body far below the limit; this guards future fields.
    let len = u16::try_from(body.len())
        .ok()
        .filter(|&l| usize::from(l) <= MAX_BODY_LEN)
        .ok_or(TunnelError::TooLarge { length: body.len() })?;
    let mut out = Vec::with_capacity(PREFIX_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Callers check lengths first, so every string fits a `u16`.
fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
}

fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
    }
}

fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), TunnelError> {
    if value.len() > max {
        return Err(TunnelError::FieldTooLong {
            field,
            length: value.len(),
            max,
        });
    }
    Ok(())
}

fn check_printable(field: &'static str, value: &str) -> Result<(), TunnelError> {
    if value.is_empty() {
        return Err(TunnelError::InvalidField {
            field,
            reason: "must not be empty when present",
        });
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TunnelError::InvalidField {
            field,
            reason: "must be printable ASCII without spaces",
        });
    }
    Ok(())
}

fn check_cluster(field: &'static str, value: &str) -> Result<(), TunnelError> {
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(TunnelError::InvalidField {
            field,
            reason: "must be ASCII letters, digits and '-'",
        });
    }
    Ok(())
}

fn is_label(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Reads fields from a complete body; running off its end is [`TunnelError::Truncated`].
struct BodyReader<'a> {
    body: &'a [u8],
    pos: usize,
}

impl<'a> BodyReader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], TunnelError> {
        let bytes = self
            .body
            .get(self.pos..self.pos + n)
            .ok_or(TunnelError::Truncated { field })?;
        self.pos += n;
        Ok(bytes)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, TunnelError> {
        Ok(self.take(field, 1)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, TunnelError> {
        let b = self.take(field, 2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn string(&mut self, field: &'static str, max: usize) -> Result<String, TunnelError> {
        let len = usize::from(self.u16(field)?);
        if len > max {
            return Err(TunnelError::FieldTooLong {
                field,
                length: len,
                max,
            });
        }
        let bytes = self.take(field, len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| TunnelError::InvalidUtf8 { field })
    }

    fn opt_string(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<Option<String>, TunnelError> {
        match self.u8(field)? {
            0 => Ok(None),
            1 => self.string(field, max).map(Some),
            found => Err(TunnelError::BadPresenceFlag { field, found }),
        }
    }

    fn finish(self) -> Result<(), TunnelError> {
        match self.body.len() - self.pos {
            0 => Ok(()),
            extra => Err(TunnelError::TrailingBytes { extra }),
        }
    }
}

/// Reads one header, consuming exactly its bytes: the fixed prefix is read with requests no
/// larger than what is still missing of it (and checked as it arrives), then exactly the body.
async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<Header, TunnelError> {
    let mut buf = [0u8; MAX_HEADER_LEN];
    let mut filled = 0;
    let body_len = loop {
        if let Some((_, body_len)) = check_prefix(&buf[..filled])? {
            break body_len;
        }
        let n = r
            .read(&mut buf[filled..PREFIX_LEN])
            .await
            .map_err(TunnelError::Read)?;
        if n == 0 {
            return Err(TunnelError::UnexpectedEof { received: filled });
        }
        filled += n;
    };
    let total = PREFIX_LEN + body_len;
    r.read_exact(&mut buf[PREFIX_LEN..total])
        .await
        .map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                // read_exact does not say how much it got; the prefix at least arrived.
                TunnelError::UnexpectedEof {
                    received: PREFIX_LEN,
                }
            } else {
                TunnelError::Read(e)
            }
        })?;
    match decode(&buf[..total])? {
        Some((header, _)) => Ok(header),
        // Unreachable by construction (the whole header is in `buf`), but input-driven code
        // does not get to panic.
        None => Err(TunnelError::UnexpectedEof { received: total }),
    }
}

async fn write_bytes<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<(), TunnelError> {
    w.write_all(bytes).await.map_err(TunnelError::Write)?;
    w.flush().await.map_err(TunnelError::Write)
}

/// Writes `req` and flushes.
pub async fn write_request<W: AsyncWrite + Unpin>(
    w: &mut W,
    req: &OpenRequest,
) -> Result<(), TunnelError> {
    write_bytes(w, &req.encode()?).await
}

/// Reads one [`OpenRequest`], consuming exactly its bytes.
pub async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> Result<OpenRequest, TunnelError> {
    match read_header(r).await? {
        Header::Request(req) => Ok(req),
        Header::Response(_) => Err(TunnelError::UnexpectedKind {
            expected: HeaderKind::OpenRequest,
            found: HeaderKind::OpenResponse,
        }),
    }
}

/// Writes `resp` and flushes.
pub async fn write_response<W: AsyncWrite + Unpin>(
    w: &mut W,
    resp: &OpenResponse,
) -> Result<(), TunnelError> {
    write_bytes(w, &resp.encode()?).await
}

/// Reads one [`OpenResponse`], consuming exactly its bytes.
pub async fn read_response<R: AsyncRead + Unpin>(r: &mut R) -> Result<OpenResponse, TunnelError> {
    match read_header(r).await? {
        Header::Response(resp) => Ok(resp),
        Header::Request(_) => Err(TunnelError::UnexpectedKind {
            expected: HeaderKind::OpenResponse,
            found: HeaderKind::OpenRequest,
        }),
    }
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "the tests build headers and noise byte by byte: truncating is the point"
)]
mod tests;
