//! Which HTTP version each hop speaks, and telling HTTP from opaque bytes (pure, no I/O).
//!
//! A connection's protocol comes from its port's declaration (`http`, `http2`, `grpc`, `tcp`,
//! or Istio's port-name prefixes); a port declaring none is sniffed:
//! - outbound, from the application's first bytes ([`sniff`]): an HTTP/1 request line or the
//!   HTTP/2 connection preface is served at L7, anything else (or nothing within the detection
//!   timeout, as server-first protocols do) is relayed as opaque TCP;
//! - inbound, from the ALPN the calling sidecar negotiated on the mTLS session: `h2` or
//!   `http/1.1` for L7, none for opaque TCP. The caller's sidecar offers ALPN only when it
//!   proxies HTTP, so the decision made once at the caller holds end to end.
//!
//! Between sidecars, HTTP/2 and gRPC travel as HTTP/2 inside the mTLS session (ALPN `h2`);
//! HTTP/1.1 stays HTTP/1.1. Requests are normalised for the version of the hop they go out on
//! ([`for_version`]): HTTP/2 needs an absolute URI (`:scheme`, `:authority`), HTTP/1.1 a
//! `Host` header and an origin-form path.

use http::{HeaderValue, Uri, Version};
use isthmus_core::mesh::Protocol;

/// ALPN identifiers offered on the sidecar-to-sidecar mTLS session.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// What the first bytes of a connection say about its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 connection preface (h2c with prior knowledge).
    Http2,
    /// Not HTTP: relay as opaque bytes.
    Opaque,
    /// Too few bytes to tell yet.
    NeedMore,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Request methods recognised in a request line (RFC 9110 and WebDAV's common ones).
const METHODS: &[&[u8]] = &[
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"PROPFIND",
    b"PROPPATCH",
    b"MKCOL",
    b"COPY",
    b"MOVE",
    b"LOCK",
    b"UNLOCK",
];

/// Classifies the first bytes an application sent. Call again with more bytes while it says
/// [`Sniffed::NeedMore`]; give up (opaque) when no more arrive in time.
pub fn sniff(first: &[u8]) -> Sniffed {
    if first.is_empty() {
        return Sniffed::NeedMore;
    }
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Sniffed::Http2
        } else {
            Sniffed::NeedMore
        };
    }
    let mut undecided = false;
    for method in METHODS {
        let n = first.len().min(method.len() + 1);
        let (have, want) = (&first[..n], method);
        if n <= want.len() {
            if have == &want[..n] {
                undecided = true;
            }
        } else if &have[..want.len()] == *want && have[want.len()] == b' ' {
            return Sniffed::Http1;
        }
    }
    if undecided {
        Sniffed::NeedMore
    } else {
        Sniffed::Opaque
    }
}

/// How one inbound connection is served, from the port's declaration and the ALPN the caller
/// negotiated (`None` for plaintext or no ALPN).
pub fn inbound_is_http(declared: Protocol, alpn: Option<&[u8]>) -> bool {
    match declared {
        Protocol::Http | Protocol::Http2 | Protocol::Grpc => true,
        Protocol::Auto => matches!(alpn, Some(ALPN_H2) | Some(ALPN_HTTP11)),
        Protocol::Tcp | Protocol::Udp => false,
    }
}

/// Whether the hop to the next sidecar speaks HTTP/2: always for ports declared `http2` or
/// `grpc`, otherwise when the application itself spoke HTTP/2.
pub fn mesh_hop_is_h2(declared: Protocol, downstream: Version) -> bool {
    matches!(declared, Protocol::Http2 | Protocol::Grpc) || downstream == Version::HTTP_2
}

/// Whether the hop from the inbound sidecar to its application speaks HTTP/2 (cleartext,
/// prior knowledge): for ports declared `http2` or `grpc`, for gRPC requests (which cannot
/// be carried by HTTP/1.1), and for sniffed ports whose caller spoke HTTP/2.
pub fn app_hop_is_h2(declared: Protocol, request: Version, headers: &http::HeaderMap) -> bool {
    match declared {
        Protocol::Http2 | Protocol::Grpc => true,
        Protocol::Auto => request == Version::HTTP_2,
        _ => request == Version::HTTP_2 && is_grpc(headers),
    }
}

/// Whether a request or response carries gRPC (`content-type: application/grpc[+proto...]`).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Whether an HTTP/1.1 request asks to switch protocols (WebSocket and other upgrades).
pub fn is_upgrade(version: Version, headers: &http::HeaderMap) -> bool {
    version == Version::HTTP_11
        && headers.contains_key(http::header::UPGRADE)
        && headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Rewrites `parts` for a hop speaking `version`: HTTP/2 gets an absolute URI built from the
/// request's authority (`Host`, else the URI's, else `default_authority`); HTTP/1.1 gets an
/// origin-form URI and a `Host` header carrying the authority. Headers specific to one
/// HTTP/1.1 connection are dropped for HTTP/2.
pub fn for_version(parts: &mut http::request::Parts, version: Version, default_authority: &str) {
    // `Host` first: a route's authority rewrite sets it, whatever the URI says.
    let authority = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.as_str().to_string()))
        .unwrap_or_else(|| default_authority.to_string());
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    if version == Version::HTTP_2 {
        let scheme = parts.uri.scheme_str().unwrap_or("http").to_string();
        if let Ok(uri) = Uri::builder()
            .scheme(scheme.as_str())
            .authority(authority.as_str())
            .path_and_query(path.as_str())
            .build()
        {
            parts.uri = uri;
        }
        parts.headers.remove(http::header::HOST);
        for h in ["connection", "keep-alive", "proxy-connection", "upgrade"] {
            parts.headers.remove(h);
        }
        parts.headers.remove(http::header::TRANSFER_ENCODING);
        // `te` may only say `trailers` over HTTP/2 (gRPC sends exactly that).
        if parts
            .headers
            .get(http::header::TE)
            .is_some_and(|v| v.as_bytes() != b"trailers")
        {
            parts.headers.remove(http::header::TE);
        }
    } else {
        if let Ok(uri) = path.parse::<Uri>() {
            parts.uri = uri;
        }
        if !parts.headers.contains_key(http::header::HOST) {
            if let Ok(v) = HeaderValue::from_str(&authority) {
                parts.headers.insert(http::header::HOST, v);
            }
        }
    }
    parts.version = version;
}

/// The message's declared body size (its `content-length`), as the request metrics count it;
/// 0 when absent or unreadable (chunked bodies are not counted).
/// How long a client has to send a request's head (request line and headers), from the
/// connection's first byte or the previous response: a slow client (slowloris) is cut off.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Most header fields in one HTTP/1.1 request (more: 431).
pub const MAX_HEADERS: usize = 100;
/// Largest HTTP/1.1 request head (request line and headers) and HTTP/2 header list: 64 KiB
/// (more: 431 for HTTP/1.1; the stream is refused for HTTP/2).
pub const MAX_HEADER_BYTES: u32 = 64 * 1024;

/// The server both sidecar sides speak to their clients with (HTTP/1.1 or HTTP/2 by the
/// client's first bytes), bounded against hostile clients: the request head's size, field
/// count and time to arrive.
pub(crate) fn server_builder(
) -> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_HEADER_BYTES as usize);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES);
    builder
}

pub(crate) fn content_length(headers: &http::HeaderMap) -> u64 {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing_tells_http1_http2_and_opaque_bytes_apart() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniffed::Http1);
        assert_eq!(sniff(b"POST /x HTTP/1.1"), Sniffed::Http1);
        assert_eq!(sniff(b"OPTIONS * HTTP/1.1"), Sniffed::Http1);
        assert_eq!(sniff(H2_PREFACE), Sniffed::Http2);
        assert_eq!(
            sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"),
            Sniffed::Http2
        );
        // Partial input waits for more instead of guessing.
        assert_eq!(sniff(b""), Sniffed::NeedMore);
        assert_eq!(sniff(b"G"), Sniffed::NeedMore);
        assert_eq!(sniff(b"GET"), Sniffed::NeedMore);
        assert_eq!(sniff(b"PRI * HT"), Sniffed::NeedMore);
        assert_eq!(sniff(b"P"), Sniffed::NeedMore);
        // Not HTTP: TLS, a Redis command, binary, a method without its space.
        assert_eq!(sniff(&[0x16, 0x03, 0x01]), Sniffed::Opaque);
        assert_eq!(sniff(b"*1\r\n$4\r\nPING\r\n"), Sniffed::Opaque);
        assert_eq!(sniff(b"GETX / HTTP/1.1"), Sniffed::Opaque);
        assert_eq!(sniff(b"get / HTTP/1.1"), Sniffed::Opaque);
        assert_eq!(sniff(b"PRI * HTTP/1.1"), Sniffed::Opaque);
    }

    #[test]
    fn inbound_protocol_follows_declaration_then_alpn() {
        assert!(inbound_is_http(Protocol::Http, None));
        assert!(inbound_is_http(Protocol::Grpc, Some(ALPN_H2)));
        assert!(!inbound_is_http(Protocol::Tcp, Some(ALPN_H2)));
        assert!(inbound_is_http(Protocol::Auto, Some(ALPN_H2)));
        assert!(inbound_is_http(Protocol::Auto, Some(ALPN_HTTP11)));
        assert!(!inbound_is_http(Protocol::Auto, None));
        assert!(!inbound_is_http(Protocol::Auto, Some(b"mqtt")));
    }

    #[test]
    fn hop_versions_follow_declaration_and_the_applications_version() {
        assert!(mesh_hop_is_h2(Protocol::Grpc, Version::HTTP_11));
        assert!(mesh_hop_is_h2(Protocol::Http, Version::HTTP_2));
        assert!(!mesh_hop_is_h2(Protocol::Http, Version::HTTP_11));
        let mut grpc = http::HeaderMap::new();
        grpc.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        let plain = http::HeaderMap::new();
        assert!(app_hop_is_h2(Protocol::Http2, Version::HTTP_11, &plain));
        assert!(app_hop_is_h2(Protocol::Http, Version::HTTP_2, &grpc));
        assert!(!app_hop_is_h2(Protocol::Http, Version::HTTP_2, &plain));
        assert!(app_hop_is_h2(Protocol::Auto, Version::HTTP_2, &plain));
        assert!(!app_hop_is_h2(Protocol::Auto, Version::HTTP_11, &grpc));
    }

    fn parts(req: http::Request<()>) -> http::request::Parts {
        req.into_parts().0
    }

    #[test]
    fn requests_are_normalised_for_each_version() {
        let mut p = parts(
            http::Request::get("/a?b=1")
                .header("host", "reviews:9080")
                .header("connection", "keep-alive")
                .header("te", "gzip")
                .body(())
                .unwrap(),
        );
        for_version(&mut p, Version::HTTP_2, "fallback");
        assert_eq!(p.uri.to_string(), "http://reviews:9080/a?b=1");
        assert!(p.headers.get("host").is_none());
        assert!(p.headers.get("connection").is_none());
        assert!(p.headers.get("te").is_none());
        assert_eq!(p.version, Version::HTTP_2);

        let mut p = parts(
            http::Request::post("http://grpc.default:50051/echo.Echo/Chat")
                .version(Version::HTTP_2)
                .header("te", "trailers")
                .body(())
                .unwrap(),
        );
        for_version(&mut p, Version::HTTP_11, "fallback");
        assert_eq!(p.uri.to_string(), "/echo.Echo/Chat");
        assert_eq!(p.headers["host"], "grpc.default:50051");
        let mut back = p.clone();
        for_version(&mut back, Version::HTTP_2, "fallback");
        assert_eq!(back.headers["te"], "trailers");

        // No authority anywhere: the service's name stands in.
        let mut p = parts(http::Request::get("/").body(()).unwrap());
        p.headers.clear();
        for_version(&mut p, Version::HTTP_2, "reviews.default:9080");
        assert_eq!(p.uri.to_string(), "http://reviews.default:9080/");
    }

    #[test]
    fn upgrades_need_both_headers_on_http11() {
        let up = parts(
            http::Request::get("/ws")
                .header("connection", "keep-alive, Upgrade")
                .header("upgrade", "websocket")
                .body(())
                .unwrap(),
        );
        assert!(is_upgrade(up.version, &up.headers));
        let no_conn = parts(
            http::Request::get("/ws")
                .header("upgrade", "websocket")
                .body(())
                .unwrap(),
        );
        assert!(!is_upgrade(no_conn.version, &no_conn.headers));
    }
}
