//! isthmus-dns: the DNS proxy that lets applications call mesh services by name.
//!
//! It answers the global names of the Kubernetes Multi-Cluster Services DNS specification
//! from the cluster's mesh configuration and forwards every other question upstream:
//!
//! - `<svc>.<ns>.svc.clusterset.local` A / AAAA → the service's virtual IP (the other address
//!   family gets NODATA);
//! - `_<port>._<tcp|udp>.<svc>.<ns>.svc.clusterset.local` SRV → the named port, with the
//!   service's address in the additional section;
//! - headless services: `<svc>.<ns>.svc.clusterset.local` A → one address per ready endpoint
//!   in every cluster, `<hostname>.<cluster>.<svc>.<ns>.svc.clusterset.local` A → that
//!   endpoint's, SRV → one record per ready endpoint with a hostname (each address being the
//!   endpoint's own VIP, allocated by the control plane);
//! - `<reversed VIP>.in-addr.arpa` / `.ip6.arpa` PTR → the service's name (or a named
//!   headless endpoint's);
//! - unknown names under `svc.clusterset.local` → authoritative NXDOMAIN, known names with
//!   other types → NODATA;
//! - Kubernetes search-path expansions of a mesh name (`<mesh name>.<anything>.cluster.local`)
//!   → a CNAME to the mesh name and its records, at once, so the application's first question
//!   is answered without a round trip upstream (as Istio's DNS proxy does);
//! - questions in classes other than IN → REFUSED; opcodes other than QUERY → NOTIMP;
//!   unreadable questions → FORMERR;
//! - `dns-version.clusterset.local` TXT → the schema version (`1.0.0`); the apex
//!   `clusterset.local` holds the SOA, which every negative answer carries;
//! - everything else → the upstream resolvers in order (UDP questions over UDP, TCP questions
//!   over TCP), SERVFAIL when none answers in time, through a reply cache that respects TTLs,
//!   caches negative answers (RFC 2308) and sends one upstream query for many identical
//!   questions in flight.
//!
//! `docs/dns.md` describes the behaviour in full. The answering logic ([`records`] builds the
//! table, [`answer`] turns a request into a response or a decision to forward, [`wire`]
//! reads plain queries and replays stored replies, [`cache`] decides what is kept and for how
//! long) does no I/O and reads no clock. The async layer ([`start`]) runs these tasks, all
//! stopped by [`DnsHandle::shutdown`]:
//!
//! - the UDP workers (one per CPU by default, sharing the socket), which answer mesh and
//!   cached questions inline and spawn one task per forwarded question;
//! - the TCP accept loop, with one task per client connection (2-byte length framing);
//! - the config follower, which rebuilds the table whenever the control plane publishes a new
//!   snapshot. Queries also check for a newer snapshot themselves, so an answer never uses a
//!   stale table. When the control plane goes away the proxy keeps answering from the last
//!   table it had (static stability).
//!
//! [`daemon::Daemon`] is the `isthmus dns` daemon: [`config`] read from its file, attached to
//! its control plane for the config stream, plus its admin server.

// Code that ships: no unwrap on what input or the network can make fail, no silent lossy
// casts (see [workspace.lints] in the root Cargo.toml).
#![warn(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

pub mod answer;
pub mod cache;
pub mod config;
pub mod daemon;
mod forward;
mod handler;
mod inflight;
mod live_table;
pub mod metrics;
pub mod records;
mod resolv_conf;
mod server;
pub mod wire;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

pub use metrics::Metrics;
pub use resolv_conf::upstreams_from_resolv_conf;
pub use server::{start, DnsHandle};

/// The default DNS proxy port (UDP and TCP).
pub const DEFAULT_PORT: u16 = 15053;

/// The default TTL of mesh answers, in seconds. Short, because VIPs can be withdrawn.
pub const DEFAULT_TTL: u32 = 5;

/// How the DNS proxy listens and where it forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsOptions {
    /// Where to listen, for both UDP and TCP (the same port). Port 0 picks a free port that is
    /// free for both.
    pub listen: SocketAddr,
    /// Resolvers for every name outside the mesh, tried in order. Empty means such questions
    /// get SERVFAIL.
    pub upstreams: Vec<SocketAddr>,
    /// How long to wait for one upstream before trying the next.
    pub upstream_timeout: Duration,
    /// TTL of mesh answers, in seconds (also the negative-caching TTL of the zone's SOA).
    pub ttl: u32,
    /// How many forwarded replies the cache holds; 0 turns the cache off (identical questions
    /// in flight are still asked upstream once).
    pub cache_entries: usize,
    /// The longest a positive forwarded reply is cached, in seconds, whatever its TTLs say.
    pub max_cache_ttl: u32,
    /// The longest a negative forwarded reply (NXDOMAIN, NODATA) is cached, in seconds.
    pub max_negative_ttl: u32,
    /// UDP worker tasks sharing the socket; 0 means one per CPU.
    pub udp_workers: usize,
}

/// The default number of cached forwarded replies.
pub const DEFAULT_CACHE_ENTRIES: usize = 10_000;

impl Default for DnsOptions {
    fn default() -> Self {
        let policy = cache::CachePolicy::default();
        DnsOptions {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_PORT)),
            upstreams: Vec::new(),
            upstream_timeout: Duration::from_secs(2),
            ttl: DEFAULT_TTL,
            cache_entries: DEFAULT_CACHE_ENTRIES,
            max_cache_ttl: policy.max_ttl,
            max_negative_ttl: policy.max_negative_ttl,
            udp_workers: 0,
        }
    }
}

/// What can go wrong when starting the DNS proxy. Once started it does not fail: bad packets,
/// unreachable upstreams and a vanished control plane are answered or logged, not returned.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// An option has a value the proxy cannot work with.
    #[error("invalid DNS option {field}: {value}")]
    InvalidOption {
        /// The option's name, as in [`DnsOptions`].
        field: &'static str,
        /// The rejected value and why.
        value: String,
    },
    /// Binding the UDP socket failed.
    #[error("binding the DNS UDP socket on {addr}")]
    BindUdp {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Binding the TCP listener failed.
    #[error("binding the DNS TCP listener on {addr}")]
    BindTcp {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Reading back the address a socket was bound to failed.
    #[error("reading the bound address of the DNS {transport} socket")]
    LocalAddr {
        transport: &'static str,
        #[source]
        source: std::io::Error,
    },
}
