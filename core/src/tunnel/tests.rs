use super::*;

fn full_request() -> OpenRequest {
    OpenRequest {
        service: "ratings.bookinfo".into(),
        port: 9080,
        subset: Some("version=v2".into()),
        target_cluster: "west".into(),
        source_cluster: "east".into(),
        trace_context: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
    }
}

fn minimal_request() -> OpenRequest {
    OpenRequest::new("a.b", 1, "w")
}

/// Builds a request header around a hand-written body, so bad bodies can be tested.
fn framed(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn s(out: &mut Vec<u8>, v: &[u8]) {
    out.extend_from_slice(&(v.len() as u16).to_be_bytes());
    out.extend_from_slice(v);
}

/// A request body with raw field values (the optional fields absent).
fn request_body(port: u16, service: &[u8], target: &[u8], source: &[u8]) -> Vec<u8> {
    let mut b = port.to_be_bytes().to_vec();
    s(&mut b, service);
    b.push(0);
    s(&mut b, target);
    s(&mut b, source);
    b.push(0);
    b
}

#[test]
fn requests_round_trip_with_and_without_optional_fields() {
    for req in [full_request(), minimal_request()] {
        let bytes = req.encode().unwrap();
        let (back, used) = OpenRequest::decode(&bytes).unwrap().unwrap();
        assert_eq!(back, req);
        assert_eq!(used, bytes.len());
        assert_eq!(decode(&bytes).unwrap().unwrap().0, Header::Request(req));
    }
}

#[test]
fn responses_round_trip_for_every_reason_code() {
    for code in ReasonCode::ALL {
        let resp = OpenResponse::new(code, format!("detail for {code} ✓"));
        let bytes = resp.encode().unwrap();
        let (back, used) = OpenResponse::decode(&bytes).unwrap().unwrap();
        assert_eq!(back, resp);
        assert_eq!(used, bytes.len());
    }
    let ok = OpenResponse::ok();
    assert!(ok.is_ok());
    assert_eq!(
        OpenResponse::decode(&ok.encode().unwrap())
            .unwrap()
            .unwrap()
            .0,
        ok
    );
}

#[test]
fn reason_codes_have_fixed_wire_numbers() {
    let numbers: Vec<u8> = ReasonCode::ALL.iter().map(|c| c.as_u8()).collect();
    assert_eq!(numbers, vec![0, 1, 2, 3, 4, 5, 6]);
    for code in ReasonCode::ALL {
        assert_eq!(ReasonCode::try_from(code.as_u8()).unwrap(), code);
    }
}

#[test]
fn the_byte_layout_matches_the_protocol_document() {
    let req = OpenRequest {
        service: "a.b".into(),
        port: 0x1f90,
        subset: None,
        target_cluster: "w".into(),
        source_cluster: "e".into(),
        trace_context: Some("t".into()),
    };
    #[rustfmt::skip]
    let expected: Vec<u8> = vec![
        b'I', b'S', b'T', b'H', 1, 1, 0, 18,
        0x1f, 0x90,
        0, 3, b'a', b'.', b'b',
        0,
        0, 1, b'w',
        0, 1, b'e',
        1, 0, 1, b't',
    ];
    assert_eq!(req.encode().unwrap(), expected);
    let resp = OpenResponse::new(ReasonCode::Unreachable, "x");
    assert_eq!(
        resp.encode().unwrap(),
        vec![b'I', b'S', b'T', b'H', 1, 2, 0, 4, 5, 0, 1, b'x']
    );
}

#[test]
fn every_truncation_of_a_header_asks_for_more_bytes() {
    let headers = [
        full_request().encode().unwrap(),
        minimal_request().encode().unwrap(),
        OpenResponse::new(ReasonCode::Forbidden, "no")
            .encode()
            .unwrap(),
        OpenResponse::ok().encode().unwrap(),
    ];
    for bytes in headers {
        for cut in 0..bytes.len() {
            assert!(
                decode(&bytes[..cut]).unwrap().is_none(),
                "a {cut}-byte prefix of a {}-byte header must need more bytes",
                bytes.len()
            );
        }
        assert!(decode(&bytes).unwrap().is_some());
    }
}

#[test]
fn payload_after_the_header_is_not_consumed() {
    let mut bytes = full_request().encode().unwrap();
    let header_len = bytes.len();
    bytes.extend_from_slice(b"\x16\x03\x01 client hello ...");
    let (req, used) = OpenRequest::decode(&bytes).unwrap().unwrap();
    assert_eq!(req, full_request());
    assert_eq!(used, header_len);
}

#[test]
fn garbage_is_rejected_by_its_first_wrong_byte() {
    assert!(matches!(decode(b"G"), Err(TunnelError::BadMagic { found }) if found == b"G"));
    assert!(matches!(decode(b"ISX"), Err(TunnelError::BadMagic { .. })));
    assert!(matches!(
        decode(b"GET / HTTP/1.1\r\n"),
        Err(TunnelError::BadMagic { .. })
    ));
    assert!(matches!(
        decode(b"\x16\x03\x01\x02\x00"),
        Err(TunnelError::BadMagic { .. })
    ));
    let err = decode(b"ISTX").unwrap_err();
    assert!(err.to_string().contains("not a tunnel header"), "{err}");
}

#[test]
fn unknown_version_is_rejected_before_the_rest_arrives() {
    let err = decode(b"ISTH\x02").unwrap_err();
    assert!(matches!(err, TunnelError::UnsupportedVersion { found: 2 }));
    assert!(err.to_string().contains("version 2"), "{err}");
    assert!(matches!(
        decode(b"ISTH\x00"),
        Err(TunnelError::UnsupportedVersion { found: 0 })
    ));
}

#[test]
fn unknown_kind_is_rejected() {
    for kind in [0u8, 3, 0xff] {
        assert!(matches!(
            decode(&[b'I', b'S', b'T', b'H', 1, kind]),
            Err(TunnelError::UnknownKind { found }) if found == kind
        ));
    }
}

#[test]
fn oversized_body_is_rejected_from_its_length_alone() {
    let len = (MAX_BODY_LEN as u16 + 1).to_be_bytes();
    let prefix = [b'I', b'S', b'T', b'H', 1, 1, len[0], len[1]];
    assert!(matches!(
        decode(&prefix),
        Err(TunnelError::TooLarge { length }) if length == MAX_BODY_LEN + 1
    ));
    assert!(matches!(
        decode(b"ISTH\x01\x02\xff\xff"),
        Err(TunnelError::TooLarge { .. })
    ));
}

#[test]
fn a_request_where_a_response_is_expected_is_rejected_and_vice_versa() {
    let req = full_request().encode().unwrap();
    assert!(matches!(
        OpenResponse::decode(&req),
        Err(TunnelError::UnexpectedKind {
            expected: HeaderKind::OpenResponse,
            ..
        })
    ));
    let resp = OpenResponse::ok().encode().unwrap();
    assert!(matches!(
        OpenRequest::decode(&resp),
        Err(TunnelError::UnexpectedKind {
            expected: HeaderKind::OpenRequest,
            ..
        })
    ));
}

#[test]
fn every_cut_inside_a_declared_body_names_the_truncated_field() {
    // The body length claims fewer bytes than the fields need: each cut point must be reported
    // as the field it falls in, never a panic.
    let full = full_request().encode().unwrap();
    let body = &full[PREFIX_LEN..];
    for cut in 0..body.len() {
        let bytes = framed(1, &body[..cut]);
        match decode(&bytes) {
            Err(TunnelError::Truncated { field }) => assert!(
                [
                    "port",
                    "service",
                    "subset",
                    "target_cluster",
                    "source_cluster",
                    "trace_context"
                ]
                .contains(&field),
                "{field}"
            ),
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
    let resp = OpenResponse::new(ReasonCode::Overloaded, "busy")
        .encode()
        .unwrap();
    let body = &resp[PREFIX_LEN..];
    for cut in 0..body.len() {
        assert!(
            matches!(
                decode(&framed(2, &body[..cut])),
                Err(TunnelError::Truncated { .. })
            ),
            "cut at {cut}"
        );
    }
}

#[test]
fn trailing_bytes_inside_the_body_are_rejected() {
    let full = full_request().encode().unwrap();
    let mut body = full[PREFIX_LEN..].to_vec();
    body.push(0);
    assert!(matches!(
        decode(&framed(1, &body)),
        Err(TunnelError::TrailingBytes { extra: 1 })
    ));
    let mut body = OpenResponse::ok().encode().unwrap()[PREFIX_LEN..].to_vec();
    body.extend_from_slice(b"xyz");
    assert!(matches!(
        decode(&framed(2, &body)),
        Err(TunnelError::TrailingBytes { extra: 3 })
    ));
}

#[test]
fn unknown_reason_code_decodes_to_an_error() {
    for code in [7u8, 42, 255] {
        let mut body = vec![code];
        s(&mut body, b"");
        assert!(matches!(
            decode(&framed(2, &body)),
            Err(TunnelError::UnknownReasonCode { code: c }) if c == code
        ));
        assert!(ReasonCode::try_from(code).is_err());
    }
}

#[test]
fn bad_presence_flags_are_rejected() {
    // subset flag
    let mut b = 80u16.to_be_bytes().to_vec();
    s(&mut b, b"a.b");
    b.push(2);
    assert!(matches!(
        decode(&framed(1, &b)),
        Err(TunnelError::BadPresenceFlag {
            field: "subset",
            found: 2
        })
    ));
    // trace_context flag
    let mut b = request_body(80, b"a.b", b"w", b"e");
    *b.last_mut().unwrap() = 9;
    assert!(matches!(
        decode(&framed(1, &b)),
        Err(TunnelError::BadPresenceFlag {
            field: "trace_context",
            found: 9
        })
    ));
}

#[test]
fn invalid_utf8_is_rejected_with_the_field_name() {
    let b = request_body(80, b"a.\xff", b"w", b"e");
    assert!(matches!(
        decode(&framed(1, &b)),
        Err(TunnelError::InvalidUtf8 { field: "service" })
    ));
    let b = request_body(80, b"a.b", b"\xc3", b"e");
    assert!(matches!(
        decode(&framed(1, &b)),
        Err(TunnelError::InvalidUtf8 {
            field: "target_cluster"
        })
    ));
    let mut b = vec![0];
    s(&mut b, b"\xe2\x82");
    assert!(matches!(
        decode(&framed(2, &b)),
        Err(TunnelError::InvalidUtf8 { field: "message" })
    ));
}

#[test]
fn fields_over_their_limits_are_rejected_on_decode() {
    let long_cluster = vec![b'a'; MAX_CLUSTER_LEN + 1];
    let b = request_body(80, b"a.b", &long_cluster, b"e");
    assert!(matches!(
        decode(&framed(1, &b)),
        Err(TunnelError::FieldTooLong {
            field: "target_cluster",
            length: 64,
            max: 63
        })
    ));
    let long_service = vec![b'a'; MAX_SERVICE_LEN + 1];
    let b = request_body(80, &long_service, b"w", b"e");
    assert!(matches!(
        decode(&framed(1, &b)),
        Err(TunnelError::FieldTooLong {
            field: "service",
            ..
        })
    ));
    // A length prefix far beyond the body: the limit is reported, not a truncation.
    let mut b = 80u16.to_be_bytes().to_vec();
    b.extend_from_slice(&u16::MAX.to_be_bytes());
    assert!(matches!(
        decode(&framed(1, &b)),
        Err(TunnelError::FieldTooLong {
            field: "service",
            length: 65535,
            ..
        })
    ));
    let mut b = vec![0];
    s(&mut b, &vec![b'm'; MAX_MESSAGE_LEN + 1]);
    assert!(matches!(
        decode(&framed(2, &b)),
        Err(TunnelError::FieldTooLong {
            field: "message",
            ..
        })
    ));
}

#[test]
fn bad_field_values_are_rejected_on_decode_and_encode() {
    type Mutation = Box<dyn Fn(&mut OpenRequest)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("service", Box::new(|r| r.service = "ratings".into())),
        ("service", Box::new(|r| r.service = ".default".into())),
        ("service", Box::new(|r| r.service = "ratings.".into())),
        ("service", Box::new(|r| r.service = "a.b.c".into())),
        ("service", Box::new(|r| r.service = "a b.c".into())),
        ("service", Box::new(|r| r.service = String::new())),
        ("port", Box::new(|r| r.port = 0)),
        ("subset", Box::new(|r| r.subset = Some(String::new()))),
        (
            "subset",
            Box::new(|r| r.subset = Some("version = v1".into())),
        ),
        (
            "target_cluster",
            Box::new(|r| r.target_cluster = String::new()),
        ),
        (
            "target_cluster",
            Box::new(|r| r.target_cluster = "we/st".into()),
        ),
        (
            "source_cluster",
            Box::new(|r| r.source_cluster = "east\n".into()),
        ),
        (
            "trace_context",
            Box::new(|r| r.trace_context = Some(String::new())),
        ),
        (
            "trace_context",
            Box::new(|r| r.trace_context = Some("00-\u{7f}".into())),
        ),
        (
            "subset",
            Box::new(|r| r.subset = Some("x".repeat(MAX_SUBSET_LEN + 1))),
        ),
        (
            "trace_context",
            Box::new(|r| r.trace_context = Some("t".repeat(MAX_TRACE_CONTEXT_LEN + 1))),
        ),
        (
            "source_cluster",
            Box::new(|r| r.source_cluster = "e".repeat(MAX_CLUSTER_LEN + 1)),
        ),
    ];
    for (field, mutate) in cases {
        let mut req = full_request();
        mutate(&mut req);
        let named = |e: &TunnelError| match e {
            TunnelError::InvalidField { field: f, .. }
            | TunnelError::FieldTooLong { field: f, .. } => *f == field,
            _ => false,
        };
        let err = req.encode().unwrap_err();
        assert!(named(&err), "encoding {req:?}: {err:?}");
        assert!(err.to_string().contains(field), "{err}");

        // Write the same request by hand, bypassing encode's checks, and decode it.
        let mut body = req.port.to_be_bytes().to_vec();
        s(&mut body, req.service.as_bytes());
        put_opt_str(&mut body, req.subset.as_deref());
        s(&mut body, req.target_cluster.as_bytes());
        s(&mut body, req.source_cluster.as_bytes());
        put_opt_str(&mut body, req.trace_context.as_deref());
        let err = decode(&framed(1, &body)).unwrap_err();
        assert!(named(&err), "decoding {req:?}: {err:?}");
    }
}

#[test]
fn an_empty_source_cluster_is_allowed_for_sidecars() {
    let req = OpenRequest::new("ratings.default", 9080, "west");
    assert_eq!(req.source_cluster, "");
    let bytes = req.encode().unwrap();
    assert_eq!(OpenRequest::decode(&bytes).unwrap().unwrap().0, req);
}

#[test]
fn service_parts_split_name_and_namespace() {
    assert_eq!(
        full_request().service_parts(),
        Some(("ratings", "bookinfo"))
    );
    assert_eq!(OpenRequest::new("nodot", 1, "w").service_parts(), None);
}

#[test]
fn long_messages_are_cut_at_a_character_boundary() {
    let resp = OpenResponse::new(ReasonCode::BadRequest, "é".repeat(MAX_MESSAGE_LEN));
    assert!(resp.message.len() <= MAX_MESSAGE_LEN);
    assert!(resp.message.len() >= MAX_MESSAGE_LEN - 1);
    assert!(resp.encode().is_ok());
    let raw = OpenResponse {
        code: ReasonCode::Ok,
        message: "m".repeat(MAX_MESSAGE_LEN + 1),
    };
    assert!(matches!(
        raw.encode(),
        Err(TunnelError::FieldTooLong {
            field: "message",
            ..
        })
    ));
}

#[test]
fn the_largest_valid_request_fits_the_body_limit() {
    let req = OpenRequest {
        service: format!("{}.{}", "n".repeat(126), "s".repeat(126)),
        port: u16::MAX,
        subset: Some("x".repeat(MAX_SUBSET_LEN)),
        target_cluster: "t".repeat(MAX_CLUSTER_LEN),
        source_cluster: "s".repeat(MAX_CLUSTER_LEN),
        trace_context: Some("0".repeat(MAX_TRACE_CONTEXT_LEN)),
    };
    let bytes = req.encode().unwrap();
    assert!(bytes.len() <= MAX_HEADER_LEN);
    assert_eq!(OpenRequest::decode(&bytes).unwrap().unwrap().0, req);
}

#[test]
fn decoding_arbitrary_bytes_never_panics() {
    // A cheap deterministic fuzz: valid headers with one byte changed, and random noise after
    // a valid prefix. Any result is fine as long as it is not a panic.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let base = full_request().encode().unwrap();
    for _ in 0..20_000 {
        let mut bytes = base.clone();
        let i = (next() as usize) % bytes.len();
        bytes[i] = next() as u8;
        let cut = (next() as usize) % (bytes.len() + 1);
        let _ = decode(&bytes[..cut]);
        let _ = decode(&bytes);
    }
    for _ in 0..5_000 {
        let len = (next() as usize) % 64;
        let mut bytes = vec![b'I', b'S', b'T', b'H', 1, 1 + (next() as u8 & 1)];
        bytes.extend_from_slice(&(len as u16).to_be_bytes());
        bytes.extend((0..len).map(|_| next() as u8));
        let _ = decode(&bytes);
    }
}

// ---- async helpers ----

#[tokio::test]
async fn readers_leave_payload_bytes_in_the_stream() {
    let (mut a, mut b) = tokio::io::duplex(64 * 1024);
    write_request(&mut a, &full_request()).await.unwrap();
    a.write_all(b"payload-after-request").await.unwrap();
    write_response(&mut b, &OpenResponse::new(ReasonCode::Ok, ""))
        .await
        .unwrap();
    b.write_all(b"payload-after-response").await.unwrap();

    assert_eq!(read_request(&mut b).await.unwrap(), full_request());
    let mut rest = [0u8; 21];
    b.read_exact(&mut rest).await.unwrap();
    assert_eq!(&rest, b"payload-after-request");

    assert!(read_response(&mut a).await.unwrap().is_ok());
    let mut rest = [0u8; 22];
    a.read_exact(&mut rest).await.unwrap();
    assert_eq!(&rest, b"payload-after-response");
}

#[tokio::test]
async fn readers_handle_a_header_arriving_one_byte_at_a_time() {
    let bytes = full_request().encode().unwrap();
    let mut reader = one_byte_reader(&bytes);
    assert_eq!(read_request(&mut reader).await.unwrap(), full_request());
}

/// A reader that hands out one byte per read, then the payload marker.
fn one_byte_reader(bytes: &[u8]) -> impl AsyncRead + Unpin {
    struct OneByte(Vec<u8>, usize);
    impl AsyncRead for OneByte {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            if self.1 < self.0.len() && buf.remaining() > 0 {
                let b = self.0[self.1];
                buf.put_slice(&[b]);
                self.1 += 1;
            }
            std::task::Poll::Ready(Ok(()))
        }
    }
    OneByte(bytes.to_vec(), 0)
}

#[tokio::test]
async fn a_stream_that_ends_early_is_reported_with_how_much_arrived() {
    let bytes = full_request().encode().unwrap();
    for cut in [0usize, 3, 7, PREFIX_LEN + 1, bytes.len() - 1] {
        let mut r = &bytes[..cut];
        match read_request(&mut r).await {
            Err(TunnelError::UnexpectedEof { received }) => assert!(received <= cut, "{cut}"),
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn garbage_on_a_stream_is_rejected_without_reading_past_it() {
    let (mut a, mut b) = tokio::io::duplex(1024);
    // Only three bytes arrive and the writer stays open: the bad magic is caught at once.
    a.write_all(b"GET").await.unwrap();
    let err = read_request(&mut b).await.unwrap_err();
    assert!(matches!(err, TunnelError::BadMagic { .. }), "{err:?}");
}

#[tokio::test]
async fn the_wrong_header_kind_on_a_stream_is_rejected() {
    let bytes = OpenResponse::ok().encode().unwrap();
    let mut r = &bytes[..];
    assert!(matches!(
        read_request(&mut r).await,
        Err(TunnelError::UnexpectedKind { .. })
    ));
    let bytes = full_request().encode().unwrap();
    let mut r = &bytes[..];
    assert!(matches!(
        read_response(&mut r).await,
        Err(TunnelError::UnexpectedKind { .. })
    ));
}

#[tokio::test]
async fn writers_refuse_invalid_headers_without_writing() {
    let mut out = Vec::new();
    let mut bad = full_request();
    bad.port = 0;
    assert!(matches!(
        write_request(&mut out, &bad).await,
        Err(TunnelError::InvalidField { field: "port", .. })
    ));
    assert!(out.is_empty());
}
