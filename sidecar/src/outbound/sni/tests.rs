use std::sync::Arc;

use super::*;

/// The first bytes a real TLS client (rustls) sends to `name`.
fn hello_to(name: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

#[test]
fn a_real_client_hello_names_its_server_and_every_prefix_needs_more() {
    let hello = hello_to("DB.Payments.example.com");
    assert_eq!(
        server_name(&hello),
        Hello::ClientHello {
            server_name: Some("db.payments.example.com".into())
        }
    );
    for cut in 0..hello.len() {
        assert_eq!(server_name(&hello[..cut]), Hello::NeedMore, "{cut} bytes");
    }
    // What follows the ClientHello (the client's next bytes) changes nothing.
    let mut more = hello.clone();
    more.extend_from_slice(b"\x17\x03\x03\x00\x05hello");
    assert_eq!(server_name(&more), server_name(&hello));
}

#[test]
fn a_client_hello_to_an_address_has_no_server_name() {
    // Clients send no SNI for IP addresses.
    assert_eq!(
        server_name(&hello_to("10.0.0.7")),
        Hello::ClientHello { server_name: None }
    );
}

#[test]
fn anything_else_is_named_as_not_tls() {
    for (bytes, reason) in [
        (&b"GET / HTTP/1.1\r\n"[..], "not a TLS handshake record"),
        (&b"\x16\x01"[..], "not a TLS record version"),
        (
            &b"\x16\x03\x01\x00\x00"[..],
            "the record length is out of range",
        ),
        (
            &b"\x16\x03\x01\x50\x00"[..],
            "the record length is out of range",
        ),
        (
            &b"\x16\x03\x01\x00\x10\x02"[..],
            "the first handshake message is not a ClientHello",
        ),
    ] {
        assert_eq!(server_name(bytes), Hello::NotTls(reason), "{bytes:?}");
    }
}

#[test]
fn lengths_that_do_not_add_up_are_refused_without_reading_past_them() {
    let hello = hello_to("db.example.com");
    // Every single byte changed, one at a time, to each of a few values: never a panic, and a
    // server name only ever from a ClientHello that still parses.
    for at in 5..hello.len() {
        for value in [0u8, 1, 0x7f, 0xff] {
            let mut bent = hello.clone();
            bent[at] = value;
            let _ = server_name(&bent);
        }
    }
    // The server name list claiming more than its extension holds.
    let name_at = hello
        .windows(14)
        .position(|w| w == b"db.example.com")
        .unwrap();
    let mut bent = hello.clone();
    // The name's own 2-byte length sits just before it.
    bent[name_at - 2] = 0xff;
    assert_eq!(
        server_name(&bent),
        Hello::NotTls("a server name is cut short")
    );
    // A name that is not a DNS name.
    let mut bent = hello.clone();
    bent[name_at] = b'/';
    assert_eq!(
        server_name(&bent),
        Hello::NotTls("the server name is not a DNS name")
    );
}

#[test]
fn sni_patterns_match_exactly_by_suffix_or_all() {
    for (pattern, name, want) in [
        ("db.example.com", "db.example.com", true),
        ("DB.example.com", "db.example.com", true),
        ("db.example.com", "db.example.co", false),
        ("*.example.com", "db.example.com", true),
        ("*.example.com", "a.b.example.com", true),
        ("*.example.com", "example.com", false),
        ("*.example.com", "badexample.com", false),
        ("*", "anything.at.all", true),
    ] {
        assert_eq!(matches(pattern, name), want, "{pattern} ~ {name}");
    }
}
