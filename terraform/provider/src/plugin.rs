//! The go-plugin side of being a Terraform provider: the launch handshake, AutoMTLS, and the
//! services every go-plugin server runs beside the provider (health, controller).
//!
//! Terraform starts the binary with `TF_PLUGIN_MAGIC_COOKIE` set and, for AutoMTLS, its own
//! client certificate in `PLUGIN_CLIENT_CERT`. We listen on loopback, print one line on stdout
//!
//! ```text
//! 1|6|tcp|127.0.0.1:PORT|grpc|<base64 DER of our server certificate, no padding>
//! ```
//!
//! and serve gRPC over TLS with a fresh self-signed certificate (valid for `localhost`, which
//! is the name Terraform checks), accepting only a client that presents exactly Terraform's
//! certificate and proves it holds its key. Terraform's key is ECDSA P-521, which the
//! workspace's rustls provider (ring) cannot verify, so that one signature scheme is checked
//! with the pure-Rust `p521` crate. `GRPCController.Shutdown` ends the process.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::proto::plugin::grpc_controller_server::{GrpcController, GrpcControllerServer};
use crate::proto::plugin::Empty;
use crate::proto::tfplugin6::provider_server::{Provider, ProviderServer};

/// The environment variable Terraform sets so a provider knows it was launched as a plugin.
pub const MAGIC_COOKIE_KEY: &str = "TF_PLUGIN_MAGIC_COOKIE";
/// Its value for Terraform providers.
pub const MAGIC_COOKIE_VALUE: &str =
    "d602bf8f470bc67ca7faa0386276bbdd4330efaf76d1a219cb4d6991ca9872b2";
/// go-plugin's own protocol version (the first field of the handshake line).
const CORE_PROTOCOL_VERSION: u32 = 1;
/// The plugin protocol version we speak.
pub const PROTOCOL_VERSION: u32 = 6;

/// Why the plugin could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(
        "this is a Terraform provider plugin: Terraform runs it, people do not \
         (see docs/terraform.md to install it with dev_overrides)"
    )]
    NotLaunchedByTerraform,
    #[error("Terraform offers plugin protocol versions {offered:?}; this provider speaks only {PROTOCOL_VERSION} (Terraform 1.0 or later)")]
    Protocol { offered: String },
    #[error("PLUGIN_CLIENT_CERT is not a PEM certificate: {0}")]
    ClientCert(String),
    #[error("creating the plugin's TLS certificate failed: {0}")]
    Certificate(String),
    #[error("listening on loopback failed: {0}")]
    Listen(#[source] io::Error),
    #[error("serving gRPC failed: {0}")]
    Serve(#[source] tonic::transport::Error),
}

/// What the plugin reads from its environment (a struct, so tests need not set variables).
#[derive(Debug, Clone, Default)]
pub struct LaunchEnv {
    pub magic_cookie: Option<String>,
    pub protocol_versions: Option<String>,
    pub client_cert_pem: Option<String>,
}

impl LaunchEnv {
    pub fn from_process() -> LaunchEnv {
        LaunchEnv {
            magic_cookie: std::env::var(MAGIC_COOKIE_KEY).ok(),
            protocol_versions: std::env::var("PLUGIN_PROTOCOL_VERSIONS").ok(),
            client_cert_pem: std::env::var("PLUGIN_CLIENT_CERT")
                .ok()
                .filter(|c| !c.is_empty()),
        }
    }

    /// Checks that Terraform launched us and offers protocol 6.
    pub fn check(&self) -> Result<(), PluginError> {
        if self.magic_cookie.as_deref() != Some(MAGIC_COOKIE_VALUE) {
            return Err(PluginError::NotLaunchedByTerraform);
        }
        if let Some(offered) = &self.protocol_versions {
            let six = PROTOCOL_VERSION.to_string();
            if !offered.split(',').any(|v| v.trim() == six) {
                return Err(PluginError::Protocol {
                    offered: offered.clone(),
                });
            }
        }
        Ok(())
    }

    /// Terraform's client certificate (DER), when it asked for AutoMTLS.
    pub fn client_cert(&self) -> Result<Option<CertificateDer<'static>>, PluginError> {
        let Some(pem) = &self.client_cert_pem else {
            return Ok(None);
        };
        let mut reader = pem.as_bytes();
        let first = rustls_pemfile::certs(&mut reader).next();
        match first {
            Some(Ok(der)) => Ok(Some(der)),
            Some(Err(e)) => Err(PluginError::ClientCert(e.to_string())),
            None => Err(PluginError::ClientCert("no CERTIFICATE block".into())),
        }
    }
}

/// Our server certificate: self-signed, for `localhost` and 127.0.0.1.
pub struct ServerCert {
    pub der: CertificateDer<'static>,
    key_pkcs8: Vec<u8>,
}

impl ServerCert {
    pub fn generate() -> Result<ServerCert, PluginError> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose, SanType,
        };
        let fail = |e: rcgen::Error| PluginError::Certificate(e.to_string());
        let key = KeyPair::generate().map_err(fail)?;
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).map_err(fail)?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "terraform-provider-isthmus");
        // Terraform puts this certificate in its root pool and verifies the connection's
        // certificate against it, as go-plugin's own generated certificates are shaped.
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.self_signed(&key).map_err(fail)?;
        Ok(ServerCert {
            der: cert.der().clone(),
            key_pkcs8: key.serialize_der(),
        })
    }
}

/// The line Terraform reads from our stdout to find us.
pub fn handshake_line(addr: SocketAddr, server_cert: Option<&[u8]>) -> String {
    let mut line = format!("{CORE_PROTOCOL_VERSION}|{PROTOCOL_VERSION}|tcp|{addr}|grpc");
    if let Some(der) = server_cert {
        line.push('|');
        line.push_str(&base64::engine::general_purpose::STANDARD_NO_PAD.encode(der));
    }
    line
}

/// Accepts exactly one client certificate (Terraform's), checking the handshake signature.
#[derive(Debug)]
struct ExactClientCert {
    expected: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for ExactClientCert {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.expected.as_ref() {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme == SignatureScheme::ECDSA_NISTP521_SHA512 {
            return verify_p521(message, cert, dss.signature());
        }
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme == SignatureScheme::ECDSA_NISTP521_SHA512 {
            return verify_p521(message, cert, dss.signature());
        }
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        let mut schemes = self
            .provider
            .signature_verification_algorithms
            .supported_schemes();
        schemes.insert(0, SignatureScheme::ECDSA_NISTP521_SHA512);
        schemes
    }
}

/// Verifies an ECDSA P-521 / SHA-512 signature (DER) by the key of `cert` over `message`.
fn verify_p521(
    message: &[u8],
    cert: &CertificateDer<'_>,
    signature: &[u8],
) -> Result<HandshakeSignatureValid, rustls::Error> {
    use p521::ecdsa::signature::Verifier;
    let bad = || rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature);
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|_| bad())?;
    let point = &parsed.tbs_certificate.subject_pki.subject_public_key.data;
    let key = p521::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(|_| bad())?;
    let signature = p521::ecdsa::Signature::from_der(signature).map_err(|_| bad())?;
    key.verify(message, &signature).map_err(|_| bad())?;
    Ok(HandshakeSignatureValid::assertion())
}

fn tls_config(
    cert: &ServerCert,
    client: CertificateDer<'static>,
) -> Result<rustls::ServerConfig, PluginError> {
    isthmus_core::install_crypto_provider();
    let provider = CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let verifier = Arc::new(ExactClientCert {
        expected: client,
        provider: provider.clone(),
    });
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pkcs8.clone()));
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PluginError::Certificate(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert.der.clone()], key)
        .map_err(|e| PluginError::Certificate(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A connection from Terraform: TLS (AutoMTLS) or, when Terraform did not ask for it, plain.
pub enum PluginStream {
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Plain(TcpStream),
}

impl tonic::transport::server::Connected for PluginStream {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for PluginStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PluginStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            PluginStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PluginStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PluginStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            PluginStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PluginStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            PluginStream::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PluginStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            PluginStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// go-plugin's controller: `Shutdown` stops the server (and so the process).
struct Controller {
    stop: watch::Sender<bool>,
}

#[tonic::async_trait]
impl GrpcController for Controller {
    async fn shutdown(
        &self,
        _request: tonic::Request<Empty>,
    ) -> Result<tonic::Response<Empty>, tonic::Status> {
        self.stop.send_replace(true);
        Ok(tonic::Response::new(Empty {}))
    }
}

/// Serves `provider` as a plugin until Terraform shuts it down. Prints the handshake line.
pub async fn serve<P: Provider>(env: &LaunchEnv, provider: P) -> Result<(), PluginError> {
    env.check()?;
    let client = env.client_cert()?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(PluginError::Listen)?;
    let addr = listener.local_addr().map_err(PluginError::Listen)?;
    let (acceptor, server_der) = match client {
        Some(client) => {
            let cert = ServerCert::generate()?;
            let config = tls_config(&cert, client)?;
            (
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
                Some(cert.der.to_vec()),
            )
        }
        None => (None, None),
    };
    let (conns_tx, conns_rx) = mpsc::channel::<io::Result<PluginStream>>(16);
    tokio::spawn(accept_loop(listener, acceptor, conns_tx));

    let (stop_tx, mut stop_rx) = watch::channel(false);
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("plugin", tonic_health::ServingStatus::Serving)
        .await;

    {
        use std::io::Write;
        let mut out = io::stdout().lock();
        // Terraform waits for this line; nothing else may ever be written to stdout.
        let _ = writeln!(out, "{}", handshake_line(addr, server_der.as_deref()));
        let _ = out.flush();
    }
    tracing::debug!(%addr, "serving the plugin protocol");

    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(GrpcControllerServer::new(Controller { stop: stop_tx }))
        .add_service(ProviderServer::new(provider))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::ReceiverStream::new(conns_rx),
            async move {
                let _ = stop_rx.wait_for(|stop| *stop).await;
            },
        )
        .await
        .map_err(PluginError::Serve)
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    conns: mpsc::Sender<io::Result<PluginStream>>,
) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let sender = conns.clone();
        let acceptor = acceptor.clone();
        // Handshakes run on their own so one slow client cannot stall the others.
        tokio::spawn(async move {
            let stream = match acceptor {
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(tls) => PluginStream::Tls(Box::new(tls)),
                    Err(e) => {
                        tracing::warn!(error = %e, "a TLS handshake with Terraform failed");
                        return;
                    }
                },
                None => PluginStream::Plain(tcp),
            };
            let _ = sender.send(Ok(stream)).await;
        });
        if conns.is_closed() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handshake_line_carries_our_certificate_unpadded() {
        let addr: SocketAddr = "127.0.0.1:4242".parse().unwrap();
        assert_eq!(handshake_line(addr, None), "1|6|tcp|127.0.0.1:4242|grpc");
        let line = handshake_line(addr, Some(&[1, 2, 3, 4]));
        assert_eq!(line, "1|6|tcp|127.0.0.1:4242|grpc|AQIDBA");
    }

    #[test]
    fn only_terraform_may_launch_the_plugin_and_it_must_offer_protocol_six() {
        let mut env = LaunchEnv::default();
        assert!(matches!(
            env.check(),
            Err(PluginError::NotLaunchedByTerraform)
        ));
        env.magic_cookie = Some(MAGIC_COOKIE_VALUE.into());
        assert!(env.check().is_ok());
        env.protocol_versions = Some("5".into());
        assert!(matches!(env.check(), Err(PluginError::Protocol { .. })));
        env.protocol_versions = Some("5,6".into());
        assert!(env.check().is_ok());
    }
}
