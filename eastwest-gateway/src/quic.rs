//! The gateway's QUIC endpoint: one UDP socket that both accepts connections from other
//! clusters' gateways and opens connections to them, with mutual TLS 1.3 between gateway
//! identities and keep-alives tight enough to notice a dead peer within about a second.

use std::sync::Arc;

use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::MeshConfig;
use isthmus_core::tls;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, IdleTimeout, TransportConfig, VarInt};
use rustls::pki_types::CertificateDer;

use crate::{GatewayError, GatewayOptions};

/// The ALPN protocol gateways speak to each other.
pub const ALPN: &[u8] = b"isthmus-gw/1";

/// How many tunnelled streams a peer gateway may have open towards us at once.
const MAX_STREAMS_PER_PEER: u32 = 4096;

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
}

/// Builds the endpoint bound on `opts.quic_listen`, serving and connecting with the same TLS
/// identity and transport settings.
pub(crate) fn endpoint(opts: &GatewayOptions) -> Result<Endpoint, GatewayError> {
    let transport = Arc::new(transport_config(opts)?);

    let server_tls = tls::server_config(
        opts.identity.clone(),
        opts.trust.clone(),
        tls::accept_gateways(),
        &[ALPN],
    )
    .map_err(GatewayError::Tls)?;
    let server_crypto = QuicServerConfig::try_from(server_tls).map_err(GatewayError::QuicCrypto)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(transport.clone());

    let client_tls = tls::client_config(
        opts.identity.clone(),
        opts.trust.clone(),
        tls::accept_gateways(),
        &[ALPN],
    )
    .map_err(GatewayError::Tls)?;
    let client_crypto = QuicClientConfig::try_from(client_tls).map_err(GatewayError::QuicCrypto)?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(transport);

    let mut endpoint =
        Endpoint::server(server, opts.quic_listen).map_err(|source| GatewayError::BindQuic {
            addr: opts.quic_listen,
            source,
        })?;
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
        .max_concurrent_uni_streams(VarInt::from_u32(0));
    Ok(transport)
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

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_core::mesh::ClusterInfo;

    #[test]
    fn peer_cluster_is_found_by_trust_domain() {
        let config = MeshConfig {
            clusters: vec![
                ClusterInfo {
                    name: "east".into(),
                    trust_domain: "east.isthmus.local".into(),
                    gateway: None,
                    ca_bundle_pem: String::new(),
                },
                ClusterInfo {
                    name: "west".into(),
                    trust_domain: "West.Example".into(),
                    gateway: None,
                    ca_bundle_pem: String::new(),
                },
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
}
