//! Mutual TLS between Isthmus peers, verified the SPIFFE way.
//!
//! Every member cluster has its own trust domain and CA. A peer certificate is accepted when
//! (1) it carries exactly one `spiffe://` URI SAN, (2) its chain verifies against the trust
//! bundle *of that trust domain* (so one cluster's CA can never vouch for another cluster's
//! identities), and (3) the caller-supplied acceptance rule admits the identity (for example
//! "gateways only"). Bundles and the local identity are swappable at run time: a cluster
//! joining, or a certificate rotating, takes effect on the next handshake without rebuilding
//! any configuration.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{Principal, SpiffeId};

/// The server name clients put in SNI. Peers are identified by SPIFFE ID, not by DNS name,
/// so the verifier ignores it.
pub const MESH_SERVER_NAME: &str = "mesh.isthmus";

/// The key of [`TrustBundles::any_domain`]'s anchors (no trust domain can be `*`).
const ANY_DOMAIN: &str = "*";

/// Errors from loading certificates, keys and bundles.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate found in the {what} PEM")]
    NoCertificate { what: &'static str },
    #[error("the {what} PEM could not be read")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the private key is not usable")]
    Key(#[source] rustls::Error),
    #[error("the CA certificate of trust domain {trust_domain} is not a usable trust anchor")]
    Anchor {
        trust_domain: String,
        #[source]
        source: webpki::Error,
    },
    #[error("building the TLS configuration failed")]
    Config(#[source] rustls::Error),
    #[error("the certificate is not valid X.509: {0}")]
    X509(String),
}

/// Parses every certificate in a PEM string.
pub fn certs_from_pem(
    what: &'static str,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(certs)
}

/// The SPIFFE IDs (URI SANs starting with `spiffe://`) in one DER certificate.
pub fn spiffe_ids_in_der(der: &[u8]) -> Result<Vec<SpiffeId>, TlsError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::X509(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::X509(e.to_string()))?;
    let mut ids = Vec::new();
    if let Some(san) = san {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if uri.starts_with("spiffe://") {
                    ids.push(uri.parse().map_err(|e: crate::identity::IdentityError| {
                        TlsError::X509(e.to_string())
                    })?);
                }
            }
        }
    }
    Ok(ids)
}

/// The one identity (workload-form or operator) a leaf certificate names: exactly one
/// `spiffe://` URI SAN, which must parse as a [`Principal`].
pub fn principal_in_der(der: &[u8]) -> Result<Principal, TlsError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::X509(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::X509(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => one
            .parse()
            .map_err(|e: crate::identity::IdentityError| TlsError::X509(e.to_string())),
        _ => Err(TlsError::X509(format!(
            "the certificate names {} SPIFFE IDs; exactly one is required",
            uris.len()
        ))),
    }
}

/// The SPIFFE IDs of the first (leaf) certificate in a PEM chain.
pub fn spiffe_ids_in_pem(pem: &str) -> Result<Vec<SpiffeId>, TlsError> {
    let certs = certs_from_pem("certificate", pem)?;
    spiffe_ids_in_der(&certs[0])
}

/// The single SPIFFE ID of a verified peer, from the certificates a TLS session presents.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = certs?.first()?;
    let mut ids = spiffe_ids_in_der(leaf).ok()?;
    if ids.len() == 1 {
        ids.pop()
    } else {
        None
    }
}

/// The trust bundles of every member cluster, keyed by trust domain.
#[derive(Default)]
pub struct TrustBundles {
    anchors: RwLock<Arc<HashMap<String, Vec<rustls::pki_types::TrustAnchor<'static>>>>>,
    /// Bumped by every [`TrustBundles::replace`], so dialers waiting for a peer's bundle can
    /// try again as soon as it arrives ([`TrustBundles::changes`]).
    generation: tokio::sync::watch::Sender<u64>,
    /// What [`TrustBundles::replace_each`] left out.
    excluded: std::sync::Mutex<Excluded>,
}

/// The trust domains [`TrustBundles::replace_each`] left out last time, and how many times
/// each has been left out (counted when it goes from installed to left out).
#[derive(Default)]
struct Excluded {
    now: std::collections::BTreeSet<String>,
    times: std::collections::BTreeMap<String, u64>,
}

impl fmt::Debug for TrustBundles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundles")
            .field("trust_domains", &self.trust_domains())
            .finish()
    }
}

impl TrustBundles {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Replaces every bundle with `bundles` (trust domain, CA certificates PEM). All are
    /// parsed before any is installed: a bad bundle changes nothing. The anchors of
    /// [`TrustBundles::any_domain`], if any, stay: a per-domain bundle is looked up first.
    pub fn replace<'a>(
        &self,
        bundles: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<(), TlsError> {
        let mut next = HashMap::new();
        for (trust_domain, pem) in bundles {
            if trust_domain == ANY_DOMAIN {
                // Only [`TrustBundles::any_domain`] may install anchors for every domain; a
                // record claiming "*" vouches for nothing.
                return Err(TlsError::X509(format!(
                    "{ANY_DOMAIN:?} is not a trust domain"
                )));
            }
            let mut anchors = Vec::new();
            for der in certs_from_pem("trust bundle", pem)? {
                let anchor = webpki::anchor_from_trusted_cert(&der)
                    .map_err(|source| TlsError::Anchor {
                        trust_domain: trust_domain.to_string(),
                        source,
                    })?
                    .to_owned();
                anchors.push(anchor);
            }
            next.insert(trust_domain.to_ascii_lowercase(), anchors);
        }
        let mut current = self.anchors.write().unwrap_or_else(|e| e.into_inner());
        if let Some(any) = current.get(ANY_DOMAIN) {
            next.insert(ANY_DOMAIN.to_string(), any.clone());
        }
        *current = Arc::new(next);
        drop(current);
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
        Ok(())
    }

    /// Like [`TrustBundles::replace`], but a bundle that does not parse (or claims `*`)
    /// leaves out only its own trust domain: every other one is installed. Returns the ones
    /// newly left out (installed, or not named, by the previous call), with the reason, for
    /// the caller to log once; [`TrustBundles::excluded_counts`] counts them.
    pub fn replace_each<'a>(
        &self,
        bundles: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Vec<(String, TlsError)> {
        let mut good = Vec::new();
        let mut excluded = Vec::new();
        for (trust_domain, pem) in bundles {
            match Self::new().replace([(trust_domain, pem)]) {
                Ok(()) => good.push((trust_domain, pem)),
                Err(e) => excluded.push((trust_domain.to_string(), e)),
            }
        }
        if let Err(e) = self.replace(good) {
            // Each one parsed alone, so together they do too.
            tracing::error!(error = %e, "installing checked trust bundles failed");
        }
        let mut state = self.excluded.lock().unwrap_or_else(|e| e.into_inner());
        let now: std::collections::BTreeSet<String> =
            excluded.iter().map(|(td, _)| td.clone()).collect();
        let fresh: Vec<_> = excluded
            .into_iter()
            .filter(|(td, _)| !state.now.contains(td))
            .collect();
        for (td, _) in &fresh {
            *state.times.entry(td.clone()).or_default() += 1;
        }
        state.now = now;
        fresh
    }

    /// How many times each trust domain's bundle has been left out by
    /// [`TrustBundles::replace_each`] (once per stretch of being left out), by trust domain.
    pub fn excluded_counts(&self) -> Vec<(String, u64)> {
        let state = self.excluded.lock().unwrap_or_else(|e| e.into_inner());
        state.times.iter().map(|(td, n)| (td.clone(), *n)).collect()
    }

    /// Resolves on each later [`TrustBundles::replace`]: wait on `changed()`.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Bundles that vouch for identities of *any* trust domain: for a client that was handed
    /// one cluster's CA (the control-plane API's clients), where the CA itself is the trust
    /// decision. Never used for workload mTLS, where each domain has its own bundle.
    pub fn any_domain(pem: &str) -> Result<Arc<Self>, TlsError> {
        let mut anchors = Vec::new();
        for der in certs_from_pem("trust bundle", pem)? {
            let anchor = webpki::anchor_from_trusted_cert(&der)
                .map_err(|source| TlsError::Anchor {
                    trust_domain: ANY_DOMAIN.to_string(),
                    source,
                })?
                .to_owned();
            anchors.push(anchor);
        }
        let bundles = Self::new();
        *bundles.anchors.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(HashMap::from([(ANY_DOMAIN.to_string(), anchors)]));
        Ok(bundles)
    }

    /// The trust domains currently trusted, sorted.
    pub fn trust_domains(&self) -> Vec<String> {
        let map = self.snapshot();
        let mut tds: Vec<String> = map.keys().cloned().collect();
        tds.sort();
        tds
    }

    fn snapshot(&self) -> Arc<HashMap<String, Vec<rustls::pki_types::TrustAnchor<'static>>>> {
        self.anchors
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Verifies a peer chain for `usage` and returns the peer's SPIFFE ID.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        let mut ids = spiffe_ids_in_der(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        if ids.len() != 1 {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ));
        }
        let id = ids.remove(0);
        self.verify_chain(
            id.trust_domain(),
            true,
            end_entity,
            intermediates,
            now,
            usage,
        )?;
        Ok(id)
    }

    /// Verifies a client chain whose leaf names a [`Principal`] (a workload-form or an
    /// operator identity) against the bundle of exactly that principal's trust domain (never
    /// [`TrustBundles::any_domain`]'s anchors): the control-plane API's client check.
    pub fn verify_principal(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<Principal, rustls::Error> {
        let principal = principal_in_der(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        self.verify_chain(
            principal.trust_domain(),
            false,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(principal)
    }

    fn verify_chain(
        &self,
        trust_domain: &str,
        any_domain: bool,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), rustls::Error> {
        let bundles = self.snapshot();
        let anchors = bundles
            .get(trust_domain)
            .or_else(|| any_domain.then(|| bundles.get(ANY_DOMAIN)).flatten())
            .ok_or(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))?;
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map(|_| ())
        .map_err(webpki_error)
    }
}

fn webpki_error(e: webpki::Error) -> rustls::Error {
    use rustls::CertificateError as C;
    rustls::Error::InvalidCertificate(match e {
        webpki::Error::CertExpired { .. } => C::Expired,
        webpki::Error::CertNotValidYet { .. } => C::NotValidYet,
        webpki::Error::UnknownIssuer => C::UnknownIssuer,
        webpki::Error::InvalidSignatureForPublicKey => C::BadSignature,
        other => C::Other(rustls::OtherError(Arc::new(other))),
    })
}

/// This workload's current certificate and key, swappable for rotation.
pub struct Identity {
    id: SpiffeId,
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("id", &self.id).finish()
    }
}

impl Identity {
    /// Builds an identity from a PEM chain (leaf first) and PEM key.
    pub fn from_pem(id: SpiffeId, chain_pem: &str, key_pem: &str) -> Result<Arc<Self>, TlsError> {
        let key = certified_key(chain_pem, key_pem)?;
        Ok(Arc::new(Identity {
            id,
            current: RwLock::new(Arc::new(key)),
        }))
    }

    /// The SPIFFE ID this identity presents.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The DER of the leaf certificate presented now (it changes with every rotation).
    pub fn leaf_der(&self) -> Vec<u8> {
        self.current()
            .cert
            .first()
            .map(|c| c.as_ref().to_vec())
            .unwrap_or_default()
    }

    /// Installs a rotated certificate; handshakes from now on present it, established
    /// connections are unaffected.
    pub fn rotate(&self, chain_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let key = certified_key(chain_pem, key_pem)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        Ok(())
    }

    /// The certificate chain and key presented now (to sign with, e.g. federation entries).
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.current()
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn certified_key(chain_pem: &str, key_pem: &str) -> Result<CertifiedKey, TlsError> {
    let chain = certs_from_pem("certificate chain", chain_pem)?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|source| TlsError::Pem {
            what: "private key",
            source,
        })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(TlsError::Key)?;
    Ok(CertifiedKey::new(chain, signing))
}

#[derive(Debug)]
pub struct IdentityResolver(Arc<Identity>);

impl rustls::server::ResolvesServerCert for IdentityResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }
}

impl rustls::client::ResolvesClientCert for IdentityResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Which verified peer identities a configuration accepts.
pub type AcceptPeer = Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>;

/// Accepts any identity whose chain verifies against a member's bundle.
pub fn accept_any_member() -> AcceptPeer {
    Arc::new(|_| true)
}

/// Accepts only east-west gateway identities.
pub fn accept_gateways() -> AcceptPeer {
    Arc::new(|id| id.is_gateway())
}

/// The handshake-signature methods every verifier here shares: checked with the `ring`
/// provider's algorithms in `self.algorithms`.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(message, cert, dss, &self.algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(message, cert, dss, &self.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algorithms.supported_schemes()
        }
    };
}

/// A server verifier that trusts no chain and accepts every one, checking only that the
/// server holds the key of the certificate it presents (the handshake signature). For a
/// joiner's first call alone (`Kv.JoinInfo`, docs/security.md §5): what comes back over it is
/// public and is trusted only once it hashes to the join token's digest; the token itself is
/// sent only over a connection verified against that set.
#[derive(Debug)]
pub struct UnverifiedServer {
    algorithms: WebPkiSupportedAlgorithms,
}

impl UnverifiedServer {
    pub fn new() -> Arc<Self> {
        Arc::new(UnverifiedServer {
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        })
    }
}

impl ServerCertVerifier for UnverifiedServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

pub struct SpiffeVerifier {
    trust: Arc<TrustBundles>,
    accept: AcceptPeer,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for SpiffeVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeVerifier")
            .field("trust", &self.trust)
            .finish()
    }
}

impl SpiffeVerifier {
    fn new(trust: Arc<TrustBundles>, accept: AcceptPeer) -> Arc<Self> {
        let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        Arc::new(SpiffeVerifier {
            trust,
            accept,
            algorithms,
        })
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), rustls::Error> {
        let id = self.trust.verify(end_entity, intermediates, now, usage)?;
        if (self.accept)(&id) {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

/// The control-plane API's client check: a client certificate is asked for but not required
/// (`Sign` is reached with a token alone); one that is presented must verify as a
/// [`Principal`] of a member trust domain ([`TrustBundles::verify_principal`]), else the
/// handshake fails. What each principal may call is decided per request.
pub struct OptionalClientVerifier {
    trust: Arc<TrustBundles>,
    accept: Option<AcceptPrincipal>,
    algorithms: WebPkiSupportedAlgorithms,
}

/// Which verified client principals a server accepts at the handshake.
pub type AcceptPrincipal = Arc<dyn Fn(&Principal) -> bool + Send + Sync>;

impl fmt::Debug for OptionalClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OptionalClientVerifier")
            .field("trust", &self.trust)
            .finish()
    }
}

impl OptionalClientVerifier {
    pub fn new(trust: Arc<TrustBundles>) -> Arc<Self> {
        Self::accepting(trust, None)
    }

    /// Like [`OptionalClientVerifier::new`], and a verified certificate's principal must
    /// also pass `accept`, else the handshake fails (the federation peer port: only member
    /// control planes).
    pub fn accepting(trust: Arc<TrustBundles>, accept: Option<AcceptPrincipal>) -> Arc<Self> {
        Arc::new(OptionalClientVerifier {
            trust,
            accept,
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        })
    }
}

impl ClientCertVerifier for OptionalClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let principal = self
            .trust
            .verify_principal(end_entity, intermediates, now)?;
        match &self.accept {
            Some(accept) if !accept(&principal) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ClientCertVerified::assertion()),
        }
    }

    handshake_signatures!();
}

/// A client-certificate resolver presenting a fixed chain and key (an operator credential
/// read from files).
#[derive(Debug)]
pub struct StaticClientCert(Arc<CertifiedKey>);

impl StaticClientCert {
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(StaticClientCert(Arc::new(certified_key(
            chain_pem, key_pem,
        )?))))
    }
}

impl rustls::client::ResolvesClientCert for StaticClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// A certificate resolver (server or client side) presenting `identity`'s current certificate.
pub fn identity_resolver(identity: Arc<Identity>) -> Arc<IdentityResolver> {
    Arc::new(IdentityResolver(identity))
}

/// A verifier (server or client side) of SPIFFE peers: chain against `trust`, identity
/// admitted by `accept`.
pub fn spiffe_verifier(trust: Arc<TrustBundles>, accept: AcceptPeer) -> Arc<SpiffeVerifier> {
    SpiffeVerifier::new(trust, accept)
}

/// A server configuration that presents `identity` and requires a client certificate
/// verified against `trust` and admitted by `accept`.
pub fn server_config(
    identity: Arc<Identity>,
    trust: Arc<TrustBundles>,
    accept: AcceptPeer,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(TlsError::Config)?
    .with_client_cert_verifier(SpiffeVerifier::new(trust, accept))
    .with_cert_resolver(Arc::new(IdentityResolver(identity)));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client configuration that presents `identity` and accepts servers verified against
/// `trust` and admitted by `accept`.
pub fn client_config(
    identity: Arc<Identity>,
    trust: Arc<TrustBundles>,
    accept: AcceptPeer,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(TlsError::Config)?
    .dangerous()
    .with_custom_certificate_verifier(SpiffeVerifier::new(trust, accept))
    .with_client_cert_resolver(Arc::new(IdentityResolver(identity)));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The server name to connect with (ignored by the SPIFFE verifier).
pub fn mesh_server_name() -> ServerName<'static> {
    ServerName::DnsName(
        rustls::pki_types::DnsName::try_from(MESH_SERVER_NAME)
            .expect("MESH_SERVER_NAME is a valid DNS name")
            .to_owned(),
    )
}

/// `isthmus_<component>_trust_bundle_excluded_total{trust_domain}` on a component's
/// `/metrics`: how many times a member's bundle was left out of `bundles` because it does not
/// parse (each time it goes from installed to left out; it is logged then too).
pub struct TrustBundleMetrics(Arc<TrustBundles>);

impl TrustBundleMetrics {
    pub fn register(
        bundles: Arc<TrustBundles>,
        registry: &mut prometheus_client::registry::Registry,
    ) {
        registry.register_collector(Box::new(TrustBundleMetrics(bundles)));
    }
}

impl fmt::Debug for TrustBundleMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TrustBundleMetrics")
    }
}

impl prometheus_client::collector::Collector for TrustBundleMetrics {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let mut family = encoder.encode_descriptor(
            "trust_bundle_excluded",
            "Times a member cluster's trust bundle was left out because it does not parse",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (trust_domain, n) in self.0.excluded_counts() {
            prometheus_client::metrics::counter::ConstCounter::new(n)
                .encode(family.encode_family(&[("trust_domain", trust_domain.as_str())])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
