//! TLS on the control plane's gRPC API (docs/control-api.md).
//!
//! The API is served over TLS 1.3 with ALPN `h2`, presenting a certificate the cluster CA
//! issues to the control plane's own identity, `spiffe://<td>/ns/isthmus-system/sa/control`.
//! Clients (the data-plane daemons, the CLI, the Terraform provider, other control planes) are
//! given the cluster CA and accept a server whose chain verifies against it and whose SPIFFE
//! ID is a control plane's: the name dialled does not matter, so a pod IP, a Service name or a
//! port-forward all verify the same way.
//!
//! The server asks every client for a certificate but does not require one: `Sign` is
//! reached with a token alone. A certificate that is presented must chain to the bundle of
//! the trust domain it names (the member bundles the control plane follows), else the
//! handshake fails; the verified [`Principal`] travels with every request of the connection
//! ([`ApiConnInfo`]) and the control plane decides per method what it may do
//! (docs/security.md §6). Data-plane daemons present their own certificate, operators their
//! credential ([`client_config_as`]).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::ResolvesClientCert;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::identity::Principal;
use crate::revocation::{ConnectionRegistry, Registration};
use crate::tls::{self, Identity, TlsError, TrustBundles};

/// How long a client has to finish its TLS handshake before the server drops it.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections one control-plane API port holds at once (handshaking or established): a
/// cluster's daemons need a few each; more are closed as they are accepted.
pub const MAX_CONNECTIONS: usize = 4096;
/// HTTP/2 streams one connection may have open at once (each daemon holds one config stream
/// and a few unary calls).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;
/// HTTP/2 pings that find a dead peer (both ways): every 20 s, answered within 10 s.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client waits for the answer to one call (for streams: for their headers).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest message a client decodes: a whole cluster's configuration snapshot, which in
/// a big mesh is well over gRPC's default 4 MiB.
pub const MAX_CLIENT_DECODE_BYTES: usize = 64 * 1024 * 1024;

/// The ALPN protocol the API speaks (gRPC is HTTP/2).
const ALPN_H2: &[u8] = b"h2";

/// The server side: presents `identity` (rotatable); asks for a client certificate, which
/// must verify against `clients` (the member bundles, per trust domain) when presented.
pub fn server_config(
    identity: Arc<Identity>,
    clients: Arc<TrustBundles>,
) -> Result<rustls::ServerConfig, TlsError> {
    server_config_accepting(identity, clients, None)
}

/// Like [`server_config`], and a presented client certificate's principal must also pass
/// `accept` at the handshake (the federation peer port: member control planes only).
pub fn server_config_accepting(
    identity: Arc<Identity>,
    clients: Arc<TrustBundles>,
    accept: Option<tls::AcceptPrincipal>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(TlsError::Config)?
    .with_client_cert_verifier(tls::OptionalClientVerifier::accepting(clients, accept))
    .with_cert_resolver(tls::identity_resolver(identity));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The client side, anonymous: trusts a control plane whose chain verifies against `ca_pem`
/// (one or more CA certificates) and whose SPIFFE ID is a control plane's. Enough for
/// `Sign`; every other method needs [`client_config_as`].
pub fn client_config(ca_pem: &str) -> Result<rustls::ClientConfig, TlsError> {
    client_config_with(ca_pem, None)
}

/// Like [`client_config`], presenting the certificate `credential` resolves to (a daemon's
/// rotating [`Identity`] through [`tls::identity_resolver`], an operator's
/// [`tls::StaticClientCert`]).
pub fn client_config_as(
    ca_pem: &str,
    credential: Arc<dyn ResolvesClientCert>,
) -> Result<rustls::ClientConfig, TlsError> {
    client_config_with(ca_pem, Some(credential))
}

fn client_config_with(
    ca_pem: &str,
    credential: Option<Arc<dyn ResolvesClientCert>>,
) -> Result<rustls::ClientConfig, TlsError> {
    let trust = TrustBundles::any_domain(ca_pem)?;
    api_client_config(control_plane_verifier(trust), credential)
}

/// Like [`client_config_as`] (or anonymous, without `credential`), trusting `trust` as it
/// changes: a data-plane daemon's client, whose pinned CA is `trust`'s
/// [`TrustBundles::any_domain`] anchors and whose own cluster's bundle, as its config stream
/// carries it, is added beside them, so a rotated cluster CA keeps it connected.
pub fn client_config_trusting(
    trust: Arc<TrustBundles>,
    credential: Option<Arc<dyn ResolvesClientCert>>,
) -> Result<rustls::ClientConfig, TlsError> {
    api_client_config(control_plane_verifier(trust), credential)
}

/// A client configuration of the API's kind (TLS 1.3, ALPN `h2`) verifying the server with
/// `verifier` and presenting `credential`, if any.
fn api_client_config(
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    credential: Option<Arc<dyn ResolvesClientCert>>,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(TlsError::Config)?
    .dangerous()
    .with_custom_certificate_verifier(verifier);
    let mut config = match credential {
        Some(credential) => builder.with_client_cert_resolver(credential),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// Accepts a server whose chain verifies against the bundle of the trust domain it names,
/// among `trust`, and whose SPIFFE ID is a control plane's.
fn control_plane_verifier(
    trust: Arc<TrustBundles>,
) -> Arc<dyn rustls::client::danger::ServerCertVerifier> {
    tls::spiffe_verifier(trust, Arc::new(|id| id.is_control()))
}

/// A joiner's first connection (docs/security.md §5): anonymous, and trusting no chain (see
/// [`tls::UnverifiedServer`]); only for `Kv.JoinInfo`, whose answer the joiner checks against
/// its token's digest.
pub fn discovery_client_config() -> Result<rustls::ClientConfig, TlsError> {
    api_client_config(tls::UnverifiedServer::new(), None)
}

/// Anonymous, trusting a control plane (API or peer port) whose chain verifies against the
/// bundle of the trust domain it names, among `bundles`: a joiner's connection once it has
/// verified the federation's bundle set.
pub fn client_config_for_bundles(
    bundles: Arc<TrustBundles>,
) -> Result<rustls::ClientConfig, TlsError> {
    api_client_config(control_plane_verifier(bundles), None)
}

/// A federation member's client side on the peer port (docs/security.md §4): presents
/// `identity` (its control plane's certificate) and accepts a server whose chain verifies
/// against the bundle of the trust domain it names, among `members`, and whose SPIFFE ID is a
/// control plane's. Which member that trust domain belongs to is the caller's check.
pub fn member_client_config(
    identity: Arc<Identity>,
    members: Arc<TrustBundles>,
) -> Result<rustls::ClientConfig, TlsError> {
    api_client_config(
        control_plane_verifier(members),
        Some(tls::identity_resolver(identity)),
    )
}

/// A lazily connecting gRPC channel to the control plane at `addr` (`host:port`) over TLS.
pub fn channel(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<Channel, String> {
    let uri: Uri = format!("https://{addr}")
        .parse()
        .map_err(|e| format!("{addr:?} is not host:port: {e}"))?;
    if uri.port_u16().is_none() {
        return Err(format!("{addr:?} has no port"));
    }
    let endpoint = Endpoint::from(uri)
        .connect_timeout(Duration::from_secs(2))
        .timeout(RPC_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(config);
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |uri: Uri| {
            let connector = connector.clone();
            async move {
                let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
                let port = uri.port_u16().unwrap_or(443);
                let tcp = TcpStream::connect((host, port)).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(tls::mesh_server_name(), tcp).await?;
                Ok::<_, io::Error>(TokioIo::new(tls))
            }
        })),
    )
}

/// Who is at the other end of an API connection, attached to each of its requests (tonic puts
/// it in the request's extensions).
#[derive(Debug, Clone)]
pub struct ApiConnInfo {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    /// The verified client certificate's identity; `None` when the client presented none.
    pub caller: Option<Principal>,
}

/// One accepted, handshaken API connection.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: ApiConnInfo,
    /// One of the port's [`MAX_CONNECTIONS`], given back when the connection closes.
    _slot: OwnedSemaphorePermit,
    /// One of the port's certificate-less connections, where it limits them.
    _anonymous: Option<OwnedSemaphorePermit>,
    /// Where the port can cut off its caller's trust domain ([`PortGuards::registry`]).
    registration: Option<Registration>,
}

impl TlsConn {
    /// An error once the caller's trust domain has been closed: the server then drops the
    /// connection, whatever it was doing. Checked on reads only: the server always has a read
    /// pending, so its waker is registered and a closed domain wakes it at once.
    fn check_open(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let closed = self
            .registration
            .as_mut()
            .is_some_and(|registration| registration.poll_closed(cx).is_ready());
        if closed {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the caller's trust domain lost its rights on this port",
            ));
        }
        Ok(())
    }
}

impl Connected for TlsConn {
    type ConnectInfo = ApiConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_open(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections on `listener` and hands out those that complete a TLS handshake
/// (each handshake runs on its own task, so a slow or silent client holds up no one).
/// Ends when `stop` turns true; the returned task owns the listener, so the port is closed
/// once it has finished (await it before saying the server is down).
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    stop: watch::Receiver<bool>,
) -> (
    tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn>>,
    tokio::task::JoinHandle<()>,
) {
    incoming_observed(listener, config, stop, PortGuards::default())
}

/// Why a TLS handshake on a server port failed, as far as the server can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The first bytes were not a TLS record (plaintext HTTP/2, say).
    NotTls,
    /// The client's certificate did not verify (an unknown CA, a bad signature, expired).
    BadCertificate,
    /// A verified certificate that the server's own check refused (not a member, say).
    Refused,
    /// No handshake within the port's time limit.
    Timeout,
    /// A client without a certificate while the port already holds as many such
    /// connections as it takes ([`PortGuards::anonymous_limit`]): closed after the handshake.
    AnonymousLimit,
    /// Anything else (a reset connection, a protocol error).
    Other,
}

impl HandshakeFailure {
    /// Classifies a failed `accept`.
    pub fn of(error: &io::Error) -> HandshakeFailure {
        let Some(tls) = error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        else {
            return HandshakeFailure::Other;
        };
        match tls {
            rustls::Error::InvalidMessage(_) => HandshakeFailure::NotTls,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ) => HandshakeFailure::Refused,
            rustls::Error::InvalidCertificate(_) => HandshakeFailure::BadCertificate,
            _ => HandshakeFailure::Other,
        }
    }
}

/// Observes each failed handshake on a port.
pub type HandshakeObserver = Arc<dyn Fn(HandshakeFailure) + Send + Sync>;

/// What a port does beyond [`incoming`]'s defaults.
#[derive(Default, Clone)]
pub struct PortGuards {
    /// Told why each failed handshake failed.
    pub observer: Option<HandshakeObserver>,
    /// At most this many established connections without a client certificate at once;
    /// more are closed once their handshake shows no certificate.
    pub anonymous_limit: Option<usize>,
    /// Every connection with a client certificate is registered here under its trust
    /// domain, and dropped when [`ConnectionRegistry::close_domain`] closes that domain.
    pub registry: Option<Arc<ConnectionRegistry>>,
}

/// Like [`incoming`], with `guards`.
pub fn incoming_observed(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    mut stop: watch::Receiver<bool>,
    guards: PortGuards,
) -> (
    tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let anonymous_slots = guards.anonymous_limit.map(|n| Arc::new(Semaphore::new(n)));
    let observer = guards.observer;
    let registry = guards.registry;
    let accepting = tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS port: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = until_stopped(&mut stop) => return,
            };
            let Ok(local) = tcp.local_addr() else {
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%remote, "TLS port at its connection limit; closing");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let observer = observer.clone();
            let anonymous_slots = anonymous_slots.clone();
            let registry = registry.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(inner)) => {
                        // The verifier accepted the chain; the leaf names the principal.
                        let caller = inner
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|certs| certs.first())
                            .and_then(|leaf| tls::principal_in_der(leaf).ok());
                        let anonymous = match (&caller, anonymous_slots) {
                            (None, Some(slots)) => match slots.try_acquire_owned() {
                                Ok(permit) => Some(permit),
                                Err(_) => {
                                    tracing::debug!(
                                        %remote,
                                        "TLS port at its limit of connections without a \
                                         certificate; closing"
                                    );
                                    if let Some(observe) = &observer {
                                        observe(HandshakeFailure::AnonymousLimit);
                                    }
                                    return;
                                }
                            },
                            _ => None,
                        };
                        let registration = match (&registry, &caller) {
                            (Some(registry), Some(caller)) => {
                                Some(registry.register(caller.trust_domain()))
                            }
                            _ => None,
                        };
                        let info = ApiConnInfo {
                            remote,
                            local,
                            caller,
                        };
                        let _ = tx
                            .send(Ok(TlsConn {
                                inner,
                                info,
                                _slot: slot,
                                _anonymous: anonymous,
                                registration,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "TLS handshake failed");
                        if let Some(observe) = &observer {
                            observe(HandshakeFailure::of(&e));
                        }
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "TLS handshake timed out");
                        if let Some(observe) = &observer {
                            observe(HandshakeFailure::Timeout);
                        }
                    }
                }
            });
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), accepting)
}

async fn until_stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_handshakes_are_classified_by_their_rustls_error() {
        let wrap = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        assert_eq!(
            HandshakeFailure::of(&wrap(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
            ))),
            HandshakeFailure::NotTls
        );
        assert_eq!(
            HandshakeFailure::of(&wrap(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            ))),
            HandshakeFailure::BadCertificate
        );
        assert_eq!(
            HandshakeFailure::of(&wrap(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure
            ))),
            HandshakeFailure::Refused
        );
        assert_eq!(
            HandshakeFailure::of(&io::Error::from(io::ErrorKind::ConnectionReset)),
            HandshakeFailure::Other
        );
    }
    use crate::ca::CertificateAuthority;
    use crate::identity::SpiffeId;

    /// Runs one handshake: a server presenting `server_id` (issued by `ca`), a client
    /// trusting `trusted_pem`.
    async fn handshake(
        ca: &CertificateAuthority,
        server_id: SpiffeId,
        trusted_pem: &str,
    ) -> Result<Option<Vec<u8>>, String> {
        let issued = ca.issue(&server_id, Duration::from_secs(60)).unwrap();
        let identity =
            Identity::from_pem(server_id, &issued.cert_chain_pem, &issued.key_pem).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
            server_config(identity, TrustBundles::new()).unwrap(),
        ));
        let connector =
            tokio_rustls::TlsConnector::from(Arc::new(client_config(trusted_pem).unwrap()));
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move { acceptor.accept(a).await.map(|_| ()) });
        let client = connector.connect(tls::mesh_server_name(), b).await;
        let _ = server.await;
        client
            .map(|c| c.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn clients_accept_only_a_control_plane_identity_under_the_given_ca() {
        crate::install_crypto_provider();
        let ca = CertificateAuthority::generate("east.isthmus.local").unwrap();
        let control = SpiffeId::control("east.isthmus.local");
        let alpn = handshake(&ca, control.clone(), ca.cert_pem()).await;
        assert_eq!(alpn, Ok(Some(b"h2".to_vec())));

        // A workload of the same CA is not a control plane.
        let workload = SpiffeId::new("east.isthmus.local", "default", "ratings");
        let err = handshake(&ca, workload, ca.cert_pem()).await.unwrap_err();
        assert!(err.contains("certificate"), "{err}");

        // A control plane under a CA the client was not given.
        let other = CertificateAuthority::generate("east.isthmus.local").unwrap();
        let err = handshake(&ca, control, other.cert_pem()).await.unwrap_err();
        assert!(err.contains("certificate"), "{err}");
    }

    #[test]
    fn a_ca_that_is_not_pem_is_refused() {
        assert!(client_config("not a certificate").is_err());
        assert!(client_config("").is_err());
    }
}
