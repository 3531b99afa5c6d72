//! Fuzzes the request path of the DNS proxy with arbitrary bytes as a received packet:
//! the full decoder's path (`handle_packet`), the fast parser (`QueryView`) and the memoised
//! answer it replays (`Template`), and the template reader on arbitrary bytes as an upstream
//! reply. Nothing may panic; when both parsers read a packet they must agree on its question.

#![no_main]

use std::sync::LazyLock;

use hickory_proto::op::Message;
use isthmus_core::mesh::{
    Headless, HeadlessEndpoint, MeshConfig, MeshService, Protocol, ServicePort,
};
use isthmus_dns::answer::{answer, encode_limited, handle_packet, Outcome, Transport};
use isthmus_dns::records::{lower_labels, MeshTable};
use isthmus_dns::wire::{QueryView, Template};
use libfuzzer_sys::fuzz_target;

fn service(name: &str, vip: &str, ports: &[(&str, u16, Protocol)]) -> MeshService {
    MeshService {
        name: name.into(),
        namespace: "shop".into(),
        vip: vip.parse().expect("fixed VIPs parse"),
        ports: ports
            .iter()
            .map(|(name, port, protocol)| ServicePort {
                name: (*name).into(),
                port: *port,
                protocol: *protocol,
            })
            .collect(),
        identities: Vec::new(),
        local_endpoints: Vec::new(),
        remote: Vec::new(),
        exported: true,
        headless: None,
    }
}

/// A headless service: per-endpoint names in two clusters, one endpoint without a hostname
/// and one not ready.
fn peers() -> MeshService {
    let mut peers = service("peers", "240.240.0.20", &[("http", 80, Protocol::Http)]);
    let endpoint = |cluster: &str, hostname: Option<&str>, last: u8, ready| HeadlessEndpoint {
        cluster: cluster.into(),
        id: hostname.unwrap_or("ep.00000000000000aa").into(),
        hostname: hostname.map(Into::into),
        vip: std::net::Ipv4Addr::new(240, 240, 0, last).into(),
        ready,
    };
    peers.headless = Some(Headless {
        endpoints: vec![
            endpoint("east", Some("p-0"), 21, true),
            endpoint("east", None, 22, true),
            endpoint("west", Some("p-0"), 23, true),
            endpoint("west", Some("p-1"), 24, false),
        ],
    });
    peers
}

static TABLE: LazyLock<MeshTable> = LazyLock::new(|| {
    let many: Vec<(&str, u16, Protocol)> =
        (0..40).map(|p| ("big", 9000 + p, Protocol::Tcp)).collect();
    MeshTable::build(&MeshConfig {
        version: 3,
        cluster: "east".into(),
        services: vec![
            service(
                "web",
                "240.240.0.1",
                &[("http", 80, Protocol::Http), ("dns", 53, Protocol::Udp)],
            ),
            service("db", "fd00::5", &[("pg", 5432, Protocol::Tcp)]),
            service("wide", "240.240.0.9", &many),
            peers(),
        ],
        ..MeshConfig::default()
    })
});

/// A plain query for `web.shop.svc.clusterset.local. A`, to replay fuzzed replies against.
const PLAIN_QUERY: [u8; 47] = [
    0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'w', b'e', b'b', 4, b's', b'h', b'o', b'p',
    3, b's', b'v', b'c', 10, b'c', b'l', b'u', b's', b't', b'e', b'r', b's', b'e', b't', 5, b'l',
    b'o', b'c', b'a', b'l', 0, 0, 1, 0, 1,
];

/// Whether every label of an uncompressed wire-format name (as the fast parser accepted it)
/// holds only letters, digits, '-' and '_'.
fn plain_labels(name: &[u8]) -> bool {
    let mut pos = 0;
    while let Some(&len) = name.get(pos) {
        let len = usize::from(len);
        if len == 0 {
            return true;
        }
        let Some(label) = name.get(pos + 1..pos + 1 + len) else {
            return false;
        };
        if !label
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return false;
        }
        pos += 1 + len;
    }
    false
}

fuzz_target!(|data: &[u8]| {
    let table = &*TABLE;
    for transport in [Transport::Udp, Transport::Tcp] {
        let _ = handle_packet(table, data, transport, 5);
    }

    if let Some(view) = QueryView::parse(data) {
        let mut key = Vec::new();
        view.key_into(&mut key);
        let _ = view.reply_limit(Transport::Udp);
        let mut out = Vec::new();
        view.error_reply(2, &mut out);
        assert!(
            Message::from_vec(&out).is_ok(),
            "an error reply must decode"
        );

        if let Ok(request) = Message::from_vec(data) {
            let [query] = request.queries.as_slice() else {
                panic!(
                    "the fast parser read one question, the full decoder {}",
                    request.queries.len()
                );
            };
            assert_eq!(u16::from(query.query_type), view.qtype);
            assert_eq!(u16::from(query.query_class), view.qclass);
            let wire_name: Vec<u8> = view.qname().to_ascii_lowercase();
            let mut decoded = Vec::new();
            for label in lower_labels(&query.name) {
                decoded.push(label.len() as u8);
                decoded.extend_from_slice(label.as_bytes());
            }
            decoded.push(0);
            // lower_labels escapes unusual bytes, so compare only names whose labels hold
            // nothing but letters, digits, '-' and '_' (the length bytes are not checked).
            if plain_labels(&wire_name) {
                assert_eq!(wire_name, decoded, "the parsers disagree on the name");
            }

            // The memoised path: answer, store as a template, replay.
            if let Outcome::Respond(msg) = answer(table, &request, 5) {
                if let Some(bytes) = encode_limited(&msg, usize::MAX) {
                    let (template, _) =
                        Template::from_reply(&bytes).expect("our own answers are templates");
                    for limit in [512, 1232, 65535] {
                        template.write_reply(&view, 1, limit, &mut out);
                        assert!(
                            Message::from_vec(&out).is_ok(),
                            "a replayed answer must decode"
                        );
                    }
                }
            }
        }
    }

    // Upstream replies are untrusted input too.
    if let Ok((mut template, _)) = Template::from_reply(data) {
        template.clamp_ttls(30);
        if let Some(view) = QueryView::parse(&PLAIN_QUERY) {
            let mut out = Vec::new();
            for limit in [512, 65535] {
                template.write_reply(&view, 7, limit, &mut out);
            }
        }
    }
});
