//! The gateway's TLS and QUIC set-up: one UDP socket that both accepts connections from other
//! clusters' gateways and opens connections to them, mutual TLS 1.3 between gateway
//! identities, session resumption, keep-alives tight enough to notice a dead peer within about
//! a second, and flow-control windows that bound memory per peer.
//!
//! Session resumption: every peer cluster is dialled under its own TLS server name
//! ([`server_name`]), so rustls's client session cache keeps tickets per peer, and the server
//! side keeps its sessions in rustls's in-memory cache. A reconnect to a peer seen before
//! resumes (no certificate exchange or signature checks). 0-RTT is not used: a replayed open
//! request would open a second tunnel.

use std::fmt;
use std::sync::Arc;

use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::MeshConfig;
use isthmus_core::tls;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    Connection, Endpoint, EndpointConfig, IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt,
};
use rustls::client::{
    ClientSessionStore, Resumption, Tls12ClientSessionValue, Tls13ClientSessionValue,
};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::StoresServerSessions;
use rustls::NamedGroup;

use crate::log_limit::LogLimiter;
use crate::metrics::{Metrics, Role, RoleLabels};
use crate::replica::ReplicaSet;
use crate::udp_screen::{Screen, ScreenedSocket, SignedCidGenerator};
use crate::{GatewayError, GatewayOptions};
use prometheus_client::metrics::counter::Counter;

/// The ALPN protocol gateways speak to each other over QUIC.
pub const ALPN: &[u8] = b"isthmus-gw/1";
/// The ALPN protocol of the TLS-over-TCP transport.
pub const ALPN_TCP: &[u8] = b"isthmus-gw-tcp/1";

/// How many tunnelled streams a peer gateway may have open towards us at once.
pub(crate) const MAX_STREAMS_PER_PEER: u32 = 4096;
/// Unread bytes one stream may have in flight towards us: what a stalled receiver costs.
pub(crate) const STREAM_RECEIVE_WINDOW: u32 = 4 << 20;
/// Unread bytes all streams of one connection together may have in flight towards us.
pub(crate) const RECEIVE_WINDOW: u32 = 32 << 20;
/// Bytes we buffer for a peer before its acknowledgements: what a slow peer costs us.
pub(crate) const SEND_WINDOW: u64 = 32 << 20;
/// The largest UDP payload path MTU discovery tries (and that we accept). Paths with a
/// 1500-byte MTU settle at 1452 as usual; jumbo-frame networks (and loopback) get packets up
/// to this size, which cuts the per-packet cost of QUIC several times over.
pub(crate) const MAX_UDP_PAYLOAD: u16 = 8952;

/// Application error codes on QUIC connections and streams.
pub(crate) mod codes {
    use quinn::VarInt;
    /// The gateway is shutting down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(0);
    /// The peer's identity is not what this connection needs.
    pub const WRONG_PEER: VarInt = VarInt::from_u32(1);
    /// The cluster was removed from the mesh or its gateway moved.
    pub const STALE: VarInt = VarInt::from_u32(2);
    /// A stream was abandoned because its other side failed.
    pub const STREAM_ABORTED: VarInt = VarInt::from_u32(3);
    /// The caller's first bytes were not a TLS ClientHello: its own gateway refused the
    /// tunnel after the remote's `Ok` (docs/security.md §9), so the remote counts it too.
    pub const NOT_TLS: VarInt = VarInt::from_u32(4);
}

/// The TLS configurations of one gateway, shared by both transports.
#[derive(Clone)]
pub(crate) struct TlsConfigs {
    pub tcp_client: Arc<rustls::ClientConfig>,
    pub tcp_server: Arc<rustls::ServerConfig>,
    quic_client: Arc<rustls::ClientConfig>,
    quic_server: Arc<rustls::ServerConfig>,
}

impl fmt::Debug for TlsConfigs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfigs").finish_non_exhaustive()
    }
}

impl TlsConfigs {
    pub(crate) fn new(opts: &GatewayOptions, metrics: &Metrics) -> Result<Self, GatewayError> {
        let offered = metrics
            .resumptions
            .get_or_create_owned(&RoleLabels { role: Role::Client });
        let accepted = metrics
            .resumptions
            .get_or_create_owned(&RoleLabels { role: Role::Server });
        let client = |alpn: &[u8]| -> Result<Arc<rustls::ClientConfig>, GatewayError> {
            let mut config = tls::client_config(
                opts.identity.clone(),
                opts.trust.clone(),
                tls::accept_gateways(),
                &[alpn],
            )
            .map_err(GatewayError::Tls)?;
            config.resumption = Resumption::store(Arc::new(CountingClientStore {
                inner: Arc::new(rustls::client::ClientSessionMemoryCache::new(256)),
                offered: offered.clone(),
            }));
            Ok(Arc::new(config))
        };
        let server = |alpn: &[u8]| -> Result<Arc<rustls::ServerConfig>, GatewayError> {
            let mut config = tls::server_config(
                opts.identity.clone(),
                opts.trust.clone(),
                tls::accept_gateways(),
                &[alpn],
            )
            .map_err(GatewayError::Tls)?;
            config.session_storage = Arc::new(CountingServerStore {
                inner: rustls::server::ServerSessionMemoryCache::new(1024),
                accepted: accepted.clone(),
            });
            Ok(Arc::new(config))
        };
        Ok(TlsConfigs {
            tcp_client: client(ALPN_TCP)?,
            tcp_server: server(ALPN_TCP)?,
            quic_client: client(ALPN)?,
            quic_server: server(ALPN)?,
        })
    }
}

/// The TLS server name a peer cluster's gateway is dialled with. The SPIFFE verifier ignores
/// it; it only keys the client session cache, so each peer gets its own tickets.
pub(crate) fn server_name(cluster: &str) -> String {
    let name = format!("{}.gateway.isthmus", cluster.to_ascii_lowercase());
    match ServerName::try_from(name.as_str()) {
        Ok(_) => name,
        Err(_) => tls::MESH_SERVER_NAME.to_string(),
    }
}

/// Builds an endpoint on `socket` behind the datagram screen, with the transport settings and
/// the keys of `replicas` (stateless resets, connection ID signatures). With `serve` it accepts
/// peer gateways' connections (the published address); it always can dial them.
pub(crate) fn endpoint(
    opts: &GatewayOptions,
    socket: std::net::UdpSocket,
    configs: &TlsConfigs,
    replicas: &ReplicaSet,
    serve: bool,
    metrics: Arc<Metrics>,
    log: Arc<LogLimiter>,
) -> Result<Endpoint, GatewayError> {
    let transport = Arc::new(transport_config(opts)?);

    let server = if serve {
        let server_crypto = QuicServerConfig::try_from(configs.quic_server.clone())
            .map_err(GatewayError::QuicCrypto)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport.clone());
        Some(server)
    } else {
        None
    };

    let client_crypto = QuicClientConfig::try_from(configs.quic_client.clone())
        .map_err(GatewayError::QuicCrypto)?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(transport);

    let cids = SignedCidGenerator::new(replicas.key("cid"));
    // Replicas derive the same reset key, so a sibling can reset a dead replica's connections.
    let mut endpoint_config = EndpointConfig::new(Arc::new(replicas.key("reset")));
    let generator = cids.clone();
    endpoint_config
        .cid_generator(move || Box::new(generator.clone()))
        // Peers never clear the fixed bit towards us, so the screen can call such packets
        // garbage.
        .grease_quic_bit(false)
        .supported_versions(vec![1])
        .max_udp_payload_size(max_udp_payload())
        .map_err(|e| GatewayError::InvalidOptions {
            field: "quic_listen",
            reason: format!("bad QUIC payload size: {e}"),
        })?;

    let bind_error = |source| GatewayError::BindQuic {
        addr: opts.quic_listen,
        source,
    };
    let runtime = Arc::new(quinn::TokioRuntime);
    let inner = quinn::Runtime::wrap_udp_socket(runtime.as_ref(), socket).map_err(bind_error)?;
    let screened = Arc::new(ScreenedSocket {
        inner,
        screen: Screen { cids, metrics, log },
    });
    let mut endpoint =
        Endpoint::new_with_abstract_socket(endpoint_config, server, screened, runtime)
            .map_err(bind_error)?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

fn transport_config(opts: &GatewayOptions) -> Result<TransportConfig, GatewayError> {
    let idle =
        IdleTimeout::try_from(opts.idle_timeout).map_err(|_| GatewayError::InvalidOptions {
            field: "idle_timeout",
            reason: format!("{:?} is too large for QUIC", opts.idle_timeout),
        })?;
    let mut transport = TransportConfig::default();
    transport
        .keep_alive_interval(Some(opts.keep_alive))
        .max_idle_timeout(Some(idle))
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS_PER_PEER))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .mtu_discovery_config(Some(mtu_discovery()));
    Ok(transport)
}

fn mtu_discovery() -> MtuDiscoveryConfig {
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(max_udp_payload());
    mtu
}

fn max_udp_payload() -> u16 {
    std::env::var("ISTHMUS_GW_MTU")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MAX_UDP_PAYLOAD)
}

/// The verified SPIFFE ID of the gateway at the other end of `conn`.
pub(crate) fn peer_id(conn: &Connection) -> Option<SpiffeId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    tls::peer_identity(Some(&certs))
}

/// The member cluster whose trust domain `peer` belongs to, in `config`.
pub(crate) fn peer_cluster<'a>(config: &'a MeshConfig, peer: &SpiffeId) -> Option<&'a str> {
    config
        .clusters
        .iter()
        .find(|c| c.trust_domain.eq_ignore_ascii_case(peer.trust_domain()))
        .map(|c| c.name.as_str())
}

/// rustls's client session cache, counting the tickets it hands out for resumption.
#[derive(Debug)]
struct CountingClientStore {
    inner: Arc<dyn ClientSessionStore>,
    offered: Counter,
}

impl ClientSessionStore for CountingClientStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.inner.set_kx_hint(server_name, group)
    }
    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.inner.kx_hint(server_name)
    }
    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.inner.set_tls12_session(server_name, value)
    }
    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.inner.tls12_session(server_name)
    }
    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.inner.remove_tls12_session(server_name)
    }
    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.inner.insert_tls13_ticket(server_name, value)
    }
    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        let ticket = self.inner.take_tls13_ticket(server_name);
        if ticket.is_some() {
            self.offered.inc();
        }
        ticket
    }
}

/// rustls's server session cache, counting the sessions it resumes.
#[derive(Debug)]
struct CountingServerStore {
    inner: Arc<rustls::server::ServerSessionMemoryCache>,
    accepted: Counter,
}

impl StoresServerSessions for CountingServerStore {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.inner.put(key, value)
    }
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.get(key)
    }
    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let session = self.inner.take(key);
        if session.is_some() {
            self.accepted.inc();
        }
        session
    }
    fn can_cache(&self) -> bool {
        self.inner.can_cache()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_core::mesh::ClusterInfo;

    #[test]
    fn peer_cluster_is_found_by_trust_domain() {
        let cluster = |name: &str, td: &str| ClusterInfo {
            name: name.into(),
            trust_domain: td.into(),
            gateway: None,
            ca_bundle_pem: String::new(),
            locality: None,
        };
        let config = MeshConfig {
            clusters: vec![
                cluster("east", "east.isthmus.local"),
                cluster("west", "West.Example"),
            ],
            ..MeshConfig::default()
        };
        assert_eq!(
            peer_cluster(&config, &SpiffeId::gateway("west.example")),
            Some("west")
        );
        assert_eq!(
            peer_cluster(&config, &SpiffeId::gateway("east.isthmus.local")),
            Some("east")
        );
        assert_eq!(
            peer_cluster(&config, &SpiffeId::gateway("north.isthmus.local")),
            None
        );
    }

    #[test]
    fn each_peer_is_dialled_under_its_own_server_name() {
        assert_eq!(server_name("East"), "east.gateway.isthmus");
        assert_ne!(server_name("east"), server_name("west"));
        assert_eq!(server_name("-bad-"), tls::MESH_SERVER_NAME);
    }
}
