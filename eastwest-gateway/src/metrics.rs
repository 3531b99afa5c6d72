//! The gateway's metrics, per peer cluster: open tunnels, bytes each way, round-trip time,
//! handshakes, tunnels by reason code, plus the bad input the gateway refused.
//!
//! One [`Metrics`] per gateway, created by [`crate::start`] and reachable through
//! [`crate::GatewayHandle::metrics`]. [`Metrics::register`] adds every family to a
//! prometheus-client registry (the admin server's `isthmus_gateway` registry), so the names
//! come out as `isthmus_gateway_<name>`. Updating a metric is a few atomic operations; the
//! round-trip time is sampled from the live connections once a second.

use std::sync::atomic::AtomicU64;

use isthmus_core::tunnel::ReasonCode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The peer label used when a peer's cluster is not (or no longer) a member.
pub(crate) const UNKNOWN_PEER: &str = "unknown";

/// Which gateway opened a tunnel: this one (for a local sidecar) or the peer.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Opened by this gateway towards the peer (a local sidecar's call).
    Outbound,
    /// Opened by the peer towards this gateway (a call into this cluster).
    Inbound,
}

/// Payload direction, seen from this gateway.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Flow {
    /// Bytes this gateway sent to the peer gateway.
    Sent,
    /// Bytes this gateway received from the peer gateway.
    Received,
}

/// Which side of a handshake this gateway was.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

/// A reason code as a label value.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Code {
    Ok,
    UnknownService,
    NoHealthyEndpoint,
    Forbidden,
    Overloaded,
    Unreachable,
    BadRequest,
}

impl From<ReasonCode> for Code {
    fn from(code: ReasonCode) -> Self {
        match code {
            ReasonCode::Ok => Code::Ok,
            ReasonCode::UnknownService => Code::UnknownService,
            ReasonCode::NoHealthyEndpoint => Code::NoHealthyEndpoint,
            ReasonCode::Forbidden => Code::Forbidden,
            ReasonCode::Overloaded => Code::Overloaded,
            ReasonCode::Unreachable => Code::Unreachable,
            ReasonCode::BadRequest => Code::BadRequest,
        }
    }
}

/// Kinds of bad input the gateway refuses.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Rejection {
    /// A UDP datagram on the QUIC port that is not QUIC at all.
    GarbageDatagram,
    /// A QUIC long-header packet of a version this gateway does not speak.
    UnknownQuicVersion,
    /// A short-header packet for a connection ID this gateway never issued.
    UnknownConnectionId,
    /// A QUIC or TLS handshake that failed (bad or unauthorized certificate, timeout, ...).
    HandshakeFailed,
    /// A verified peer that is not a member cluster's gateway.
    UnauthorizedPeer,
    /// A tunnel header that does not decode.
    MalformedHeader,
    /// A tunnel header of a version this gateway does not speak.
    UnsupportedHeaderVersion,
    /// A tunnel whose first bytes are not a TLS ClientHello: plaintext never leaves a cluster.
    NotTls,
}

impl Rejection {
    /// The label value, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::GarbageDatagram => "garbage_datagram",
            Rejection::UnknownQuicVersion => "unknown_quic_version",
            Rejection::UnknownConnectionId => "unknown_connection_id",
            Rejection::HandshakeFailed => "handshake_failed",
            Rejection::UnauthorizedPeer => "unauthorized_peer",
            Rejection::MalformedHeader => "malformed_header",
            Rejection::UnsupportedHeaderVersion => "unsupported_header_version",
            Rejection::NotTls => "not_tls",
        }
    }
}

/// Where bad input came from.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Source {
    /// The QUIC (or TLS-over-TCP) port other gateways use.
    Peer,
    /// The local port sidecars use.
    Local,
}

/// Label values are snake_case, as Prometheus convention has them.
macro_rules! snake_case_label {
    ($ty:ty { $($variant:ident => $text:literal),* $(,)? }) => {
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
                use std::fmt::Write;
                encoder.write_str(match self {
                    $(Self::$variant => $text,)*
                })
            }
        }
    };
}

snake_case_label!(Direction {
    Outbound => "outbound",
    Inbound => "inbound",
});
snake_case_label!(Flow {
    Sent => "sent",
    Received => "received",
});
snake_case_label!(Role {
    Client => "client",
    Server => "server",
});
snake_case_label!(Code {
    Ok => "ok",
    UnknownService => "unknown_service",
    NoHealthyEndpoint => "no_healthy_endpoint",
    Forbidden => "forbidden",
    Overloaded => "overloaded",
    Unreachable => "unreachable",
    BadRequest => "bad_request",
});
snake_case_label!(Rejection {
    GarbageDatagram => "garbage_datagram",
    UnknownQuicVersion => "unknown_quic_version",
    UnknownConnectionId => "unknown_connection_id",
    HandshakeFailed => "handshake_failed",
    UnauthorizedPeer => "unauthorized_peer",
    MalformedHeader => "malformed_header",
    UnsupportedHeaderVersion => "unsupported_header_version",
    NotTls => "not_tls",
});
snake_case_label!(Source {
    Peer => "peer",
    Local => "local",
});

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub peer: String,
    pub direction: Direction,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub peer: String,
    pub flow: Flow,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub peer: String,
    pub role: Role,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub role: Role,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub peer: String,
    pub direction: Direction,
    pub code: Code,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub source: Source,
    pub reason: Rejection,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn handshake_histogram() -> Histogram {
    // 0.25 ms .. ~4 s
    Histogram::new(exponential_buckets(0.00025, 2.0, 15))
}

/// Every metric the gateway keeps. Cheap to clone (the families are shared).
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Tunnels open right now, per peer and direction.
    pub open_streams: Family<StreamLabels, Gauge>,
    /// Tunnel payload bytes, per peer and direction of flow.
    pub bytes: Family<BytesLabels, Counter>,
    /// The smoothed round-trip time of the connection to each peer, in seconds.
    pub rtt_seconds: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    /// Live connections to each peer (normally 1).
    pub connections: Family<PeerLabels, Gauge>,
    /// Completed handshakes, per peer and role.
    pub handshakes: Family<HandshakeLabels, Counter>,
    /// TLS session resumptions: tickets offered (client) and accepted (server).
    pub resumptions: Family<RoleLabels, Counter>,
    /// How long handshakes this gateway started took, per peer.
    pub handshake_seconds: HistogramFamily<PeerLabels>,
    /// How long the most recent handshake this gateway started took, per peer.
    pub last_handshake_seconds: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    /// Failed connection attempts this gateway started, per peer.
    pub connect_failures: Family<PeerLabels, Counter>,
    /// Tunnels by the reason code they were answered with, per peer and direction.
    pub streams: Family<CodeLabels, Counter>,
    /// Bad input refused, by where it came from and what was wrong.
    pub rejected: Family<RejectLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            open_streams: Family::default(),
            bytes: Family::default(),
            rtt_seconds: Family::default(),
            connections: Family::default(),
            handshakes: Family::default(),
            resumptions: Family::default(),
            handshake_seconds: Family::new_with_constructor(handshake_histogram),
            last_handshake_seconds: Family::default(),
            connect_failures: Family::default(),
            streams: Family::default(),
            rejected: Family::default(),
        }
    }
}

impl Metrics {
    /// Registers every family in `registry` (names without a prefix; give the registry one,
    /// such as `isthmus_gateway`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "peer_open_streams",
            "Tunnels open right now, per peer cluster and direction",
            self.open_streams.clone(),
        );
        registry.register(
            "peer_bytes",
            "Tunnel payload bytes exchanged with each peer cluster's gateway",
            self.bytes.clone(),
        );
        registry.register(
            "peer_rtt_seconds",
            "Smoothed round-trip time of the QUIC connection to each peer cluster's gateway",
            self.rtt_seconds.clone(),
        );
        registry.register(
            "peer_connections",
            "Live connections to each peer cluster's gateway",
            self.connections.clone(),
        );
        registry.register(
            "peer_handshakes",
            "Completed handshakes with peer gateways",
            self.handshakes.clone(),
        );
        registry.register(
            "tls_resumptions",
            "TLS sessions resumed: tickets offered (client) and accepted (server)",
            self.resumptions.clone(),
        );
        registry.register(
            "peer_handshake_seconds",
            "Duration of handshakes this gateway started",
            self.handshake_seconds.clone(),
        );
        registry.register(
            "peer_last_handshake_seconds",
            "Duration of the most recent handshake this gateway started",
            self.last_handshake_seconds.clone(),
        );
        registry.register(
            "peer_connect_failures",
            "Failed connection attempts to peer gateways",
            self.connect_failures.clone(),
        );
        registry.register(
            "peer_streams",
            "Tunnels by the reason code they were answered with",
            self.streams.clone(),
        );
        registry.register(
            "rejected",
            "Bad input refused (garbage datagrams, bad certificates, malformed headers)",
            self.rejected.clone(),
        );
    }

    pub(crate) fn stream_answered(&self, peer: &str, direction: Direction, code: ReasonCode) {
        self.streams
            .get_or_create(&CodeLabels {
                peer: peer.to_string(),
                direction,
                code: code.into(),
            })
            .inc();
    }

    pub(crate) fn reject(&self, source: Source, reason: Rejection) {
        self.rejected
            .get_or_create(&RejectLabels { source, reason })
            .inc();
    }

    /// Counts one open tunnel until the returned guard is dropped.
    pub(crate) fn open_stream(&self, peer: &str, direction: Direction) -> OpenStream {
        let gauge = self.open_streams.get_or_create_owned(&StreamLabels {
            peer: peer.to_string(),
            direction,
        });
        gauge.inc();
        OpenStream(gauge)
    }

    /// The byte counters of one peer, to be bumped as payload flows.
    pub(crate) fn byte_counters(&self, peer: &str) -> ByteCounters {
        let get = |flow| {
            self.bytes.get_or_create_owned(&BytesLabels {
                peer: peer.to_string(),
                flow,
            })
        };
        ByteCounters {
            sent: get(Flow::Sent),
            received: get(Flow::Received),
        }
    }

    /// The value of a reject counter (for tests and the benchmark).
    pub fn rejected_count(&self, source: Source, reason: Rejection) -> u64 {
        self.rejected
            .get(&RejectLabels { source, reason })
            .map_or(0, |c| c.get())
    }

    /// Handshakes completed with `peer` (for tests and the benchmark).
    pub fn handshake_count(&self, peer: &str, role: Role) -> u64 {
        self.handshakes
            .get(&HandshakeLabels {
                peer: peer.to_string(),
                role,
            })
            .map_or(0, |c| c.get())
    }

    /// Failed attempts to connect to `peer` (for tests).
    pub fn connect_failure_count(&self, peer: &str) -> u64 {
        self.connect_failures
            .get(&PeerLabels {
                peer: peer.to_string(),
            })
            .map_or(0, |c| c.get())
    }

    /// TLS resumptions: offered as a client, or accepted as a server.
    pub fn resumption_count(&self, role: Role) -> u64 {
        self.resumptions
            .get(&RoleLabels { role })
            .map_or(0, |c| c.get())
    }

    pub(crate) fn handshake_done(&self, peer: &str, role: Role) {
        self.handshakes
            .get_or_create(&HandshakeLabels {
                peer: peer.to_string(),
                role,
            })
            .inc();
    }

    /// Tunnels answered with `code` (for tests).
    pub fn stream_count(&self, peer: &str, direction: Direction, code: ReasonCode) -> u64 {
        self.streams
            .get(&CodeLabels {
                peer: peer.to_string(),
                direction,
                code: code.into(),
            })
            .map_or(0, |c| c.get())
    }

    /// How long the most recent handshake this gateway started towards `peer` took.
    pub fn last_handshake_seconds(&self, peer: &str) -> Option<f64> {
        self.last_handshake_seconds
            .get(&PeerLabels {
                peer: peer.to_string(),
            })
            .map(|g| g.get())
    }

    pub(crate) fn handshake_took(&self, peer: &str, seconds: f64) {
        let labels = PeerLabels {
            peer: peer.to_string(),
        };
        self.handshake_seconds
            .get_or_create(&labels)
            .observe(seconds);
        self.last_handshake_seconds
            .get_or_create(&labels)
            .set(seconds);
        self.handshake_done(peer, Role::Client);
    }
}

/// Holds one open-tunnel count.
#[derive(Debug)]
pub(crate) struct OpenStream(Gauge);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The payload counters of one peer.
#[derive(Debug, Clone)]
pub(crate) struct ByteCounters {
    pub sent: Counter,
    pub received: Counter,
}
