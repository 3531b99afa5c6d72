//! The gateway's one error type.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use isthmus_core::tunnel::TunnelError;

/// Everything that can go wrong in the gateway. Variants name the operation that failed.
///
/// Only [`GatewayError::InvalidOptions`], [`GatewayError::Tls`], [`GatewayError::QuicCrypto`],
/// [`GatewayError::BindQuic`], [`GatewayError::BindLocal`] and [`GatewayError::BindTlsTcp`]
/// are returned by
/// [`crate::start`]; the rest describe why one tunnelled connection failed and end up in logs
/// and in the reason message sent back to the caller.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("invalid gateway option {field}: {reason}")]
    InvalidOptions { field: &'static str, reason: String },
    #[error("building the gateway TLS configuration failed")]
    Tls(#[source] isthmus_core::tls::TlsError),
    #[error("the gateway TLS configuration cannot be used for QUIC")]
    QuicCrypto(#[source] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("binding the QUIC endpoint on udp {addr} failed")]
    BindQuic {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("binding the local listener on tcp {addr} failed")]
    BindLocal {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error("binding the TLS-over-TCP listener on tcp {addr} failed")]
    BindTlsTcp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error("connecting to the gateway of cluster {cluster} at {addr} failed")]
    Connect {
        cluster: String,
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("the QUIC handshake with the gateway of cluster {cluster} at {addr} failed")]
    Handshake {
        cluster: String,
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("the QUIC handshake with the gateway of cluster {cluster} at {addr} did not finish within {after:?}")]
    HandshakeTimeout {
        cluster: String,
        addr: SocketAddr,
        after: Duration,
    },
    #[error("the peer at {addr} presented {found}, not the gateway identity of cluster {cluster} (trust domain {trust_domain})")]
    WrongPeer {
        cluster: String,
        addr: SocketAddr,
        trust_domain: String,
        found: String,
    },
    #[error("the gateway of cluster {cluster} is unavailable (the last connection attempt failed: {reason})")]
    PeerUnavailable { cluster: String, reason: String },
    #[error("opening a stream to cluster {cluster} failed")]
    OpenStream {
        cluster: String,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("opening a stream to cluster {cluster} did not finish within {after:?} (stream limit reached)")]
    OpenStreamTimeout { cluster: String, after: Duration },

    #[error("the TLS-over-TCP connection to the gateway of cluster {cluster} at {addr} failed")]
    TlsConnect {
        cluster: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("the TLS handshake with {addr} failed")]
    TlsAccept {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error("accepting a QUIC connection from {addr} failed")]
    Accept {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("the QUIC handshake with {addr} did not finish within {after:?}")]
    AcceptTimeout { addr: SocketAddr, after: Duration },

    #[error("reading the open request failed")]
    ReadRequest(#[source] TunnelError),
    #[error("no open request arrived within {after:?}")]
    ReadRequestTimeout { after: Duration },
    #[error("writing the open request failed")]
    WriteRequest(#[source] TunnelError),
    #[error("reading the open response failed")]
    ReadResponse(#[source] TunnelError),
    #[error("no open response arrived within {after:?}")]
    ReadResponseTimeout { after: Duration },
    #[error("writing the open response failed")]
    WriteResponse(#[source] TunnelError),

    #[error("connecting to endpoint {addr} failed")]
    DialEndpoint {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to endpoint {addr} did not finish within {after:?}")]
    DialEndpointTimeout { addr: SocketAddr, after: Duration },
    #[error("relaying the tunnelled bytes failed")]
    Relay(#[source] io::Error),
}

impl GatewayError {
    /// This error and its causes on one line, for logs and reason messages.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}
