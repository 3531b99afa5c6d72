//! A cluster's certificate authority, and workload certificate signing requests.
//!
//! Each cluster has its own CA (a self-signed P-256 root created on first start, or one the
//! operator supplies). It signs short-lived workload certificates whose only subject
//! alternative name is the workload's SPIFFE ID, usable for both TLS client and server auth.
//! The identity in a signed certificate is always the one the CA was asked to certify after
//! authorisation, never the one the CSR claims.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use crate::identity::SpiffeId;

/// How far back a certificate's validity starts, to tolerate clock skew between machines.
const BACKDATE: Duration = Duration::from_secs(60);
/// Lifetime of a generated CA root.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Errors from the certificate authority.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("generating a key pair failed")]
    GenerateKey(#[source] rcgen::Error),
    #[error("building the certificate for {subject} failed")]
    Build {
        subject: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("the certificate signing request is not valid")]
    InvalidCsr(#[source] rcgen::Error),
    #[error("loading the CA {what} failed")]
    Load {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("the SPIFFE ID {0} cannot be put in a certificate")]
    BadIdentity(String),
    #[error("the CA key does not belong to the CA certificate (their public keys differ)")]
    KeyMismatch,
    #[error("the CA certificate cannot be read: {0}")]
    BadCertificate(String),
}

/// A key and the certificate chain that certifies it, both PEM.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// Leaf first, then the issuing CA.
    pub cert_chain_pem: String,
    pub key_pem: String,
    /// Seconds since the Unix epoch after which the certificate is no longer valid.
    pub not_after_unix: i64,
}

/// A cluster's certificate authority: the CA that signs, and the CAs its trust domain's
/// bundle also holds while a rotation overlaps them (docs/security.md §5).
pub struct CertificateAuthority {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
    /// CA certificates trusted beside the signing one (PEM each): the next CA before it
    /// signs, or the previous one until what it signed has expired.
    also_trusted: Vec<String>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Creates a new self-signed root for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate().map_err(CaError::GenerateKey)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "isthmus");
        dn.push(DnType::CommonName, format!("Isthmus CA {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_LIFETIME;
        let cert = params.self_signed(&key).map_err(|source| CaError::Build {
            subject: format!("CA {trust_domain}"),
            source,
        })?;
        let key_pem = key.serialize_pem();
        Ok(CertificateAuthority {
            trust_domain: trust_domain.to_string(),
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
            key_pem,
            also_trusted: Vec::new(),
        })
    }

    /// Loads an existing CA (root or operator-supplied intermediate) from PEM. The key must
    /// be the certificate's: a pair torn apart (an interrupted rotation) is refused.
    pub fn from_pem(trust_domain: &str, cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|source| CaError::Load {
            what: "key",
            source,
        })?;
        if public_key_of(cert_pem)? != rcgen::PublicKeyData::subject_public_key_info(&key) {
            return Err(CaError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|source| CaError::Load {
            what: "certificate",
            source,
        })?;
        Ok(CertificateAuthority {
            trust_domain: trust_domain.to_string(),
            issuer,
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            also_trusted: Vec::new(),
        })
    }

    /// Also trusts the CA certificates in `pem` (a rotation's other CA): they join
    /// [`CertificateAuthority::bundle_pem`], and never sign.
    pub fn also_trusting(mut self, pem: &str) -> Result<Self, CaError> {
        let certs = |pem: &str| {
            crate::tls::certs_from_pem("CA bundle", pem)
                .map_err(|e| CaError::BadCertificate(e.to_string()))
        };
        let mut known = certs(&self.cert_pem)?;
        for other in &self.also_trusted {
            known.extend(certs(other)?);
        }
        for der in certs(pem)? {
            if !known.contains(&der) {
                self.also_trusted.push(pem_of(&der));
                known.push(der);
            }
        }
        Ok(self)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The signing CA's certificate, PEM: what an operator's client trusts for this cluster's
    /// API, whose certificate it signs.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The trust domain's bundle, PEM: the signing CA first, then any CA a rotation overlaps
    /// with it. What the cluster record publishes and every verifier of this domain trusts.
    pub fn bundle_pem(&self) -> String {
        let mut bundle = self.cert_pem.trim_end().to_string();
        bundle.push('\n');
        for other in &self.also_trusted {
            bundle.push_str(other.trim_end());
            bundle.push('\n');
        }
        bundle
    }

    /// The CA key, PEM (written to the control plane's data directory).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a certificate and a fresh key for `id` (used for the control plane's and the
    /// gateway's own identities, which are minted where the CA lives).
    pub fn issue(&self, id: &SpiffeId, lifetime: Duration) -> Result<IssuedCert, CaError> {
        let key = KeyPair::generate().map_err(CaError::GenerateKey)?;
        let (cert_pem, not_after_unix) = self.sign_key(&key, id, lifetime)?;
        Ok(IssuedCert {
            cert_chain_pem: format!("{cert_pem}{}", self.cert_pem),
            key_pem: key.serialize_pem(),
            not_after_unix,
        })
    }

    /// Issues an operator credential (client authentication only) with a fresh key: what
    /// `isthmus credentials issue` writes for a person or a tool.
    pub fn issue_operator(
        &self,
        id: &crate::identity::OperatorId,
        lifetime: Duration,
    ) -> Result<IssuedCert, CaError> {
        let mut params = uri_params(&id.to_string())?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue_with_fresh_key(params, &id.to_string(), lifetime)
    }

    /// Issues a server certificate for DNS names (the admission webhook's Service name, which
    /// the Kubernetes API server checks), with a fresh key.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        lifetime: Duration,
    ) -> Result<IssuedCert, CaError> {
        let mut params = CertificateParams::new(dns_names.to_vec())
            .map_err(|_| CaError::BadIdentity(dns_names.join(",")))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "isthmus");
        if let Some(first) = dns_names.first() {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        self.issue_with_fresh_key(params, &dns_names.join(","), lifetime)
    }

    /// Signs `params` (valid from now, backdated, for `lifetime`) over a fresh key; the chain
    /// is the leaf then this CA.
    fn issue_with_fresh_key(
        &self,
        mut params: CertificateParams,
        subject: &str,
        lifetime: Duration,
    ) -> Result<IssuedCert, CaError> {
        let key = KeyPair::generate().map_err(CaError::GenerateKey)?;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + lifetime;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| CaError::Build {
                subject: subject.to_string(),
                source,
            })?;
        Ok(IssuedCert {
            cert_chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
            not_after_unix: params.not_after.unix_timestamp(),
        })
    }

    /// Signs a CSR for `id`, the identity the caller was authorised for. Whatever names the
    /// CSR asks for are ignored; only its public key is used. Returns the chain, leaf first.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        lifetime: Duration,
    ) -> Result<IssuedCert, CaError> {
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::InvalidCsr)?;
        let (cert_pem, not_after_unix) = self.sign_key(&csr.public_key, id, lifetime)?;
        Ok(IssuedCert {
            cert_chain_pem: format!("{cert_pem}{}", self.cert_pem),
            key_pem: String::new(),
            not_after_unix,
        })
    }

    /// Signs a CSR's key as the operator `id` (client authentication only), for
    /// `CredentialService.Issue`: whatever the CSR names is ignored.
    pub fn sign_operator_csr(
        &self,
        csr_pem: &str,
        id: &crate::identity::OperatorId,
        lifetime: Duration,
    ) -> Result<IssuedCert, CaError> {
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::InvalidCsr)?;
        let mut params = uri_params(&id.to_string())?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (cert_pem, not_after_unix) =
            self.sign_params(params, &csr.public_key, &id.to_string(), lifetime)?;
        Ok(IssuedCert {
            cert_chain_pem: format!("{cert_pem}{}", self.cert_pem),
            key_pem: String::new(),
            not_after_unix,
        })
    }

    fn sign_key(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        id: &SpiffeId,
        lifetime: Duration,
    ) -> Result<(String, i64), CaError> {
        self.sign_params(workload_params(id)?, public_key, &id.to_string(), lifetime)
    }

    fn sign_params(
        &self,
        mut params: CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
        subject: &str,
        lifetime: Duration,
    ) -> Result<(String, i64), CaError> {
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + lifetime;
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(|source| CaError::Build {
                subject: subject.to_string(),
                source,
            })?;
        Ok((cert.pem(), params.not_after.unix_timestamp()))
    }
}

fn workload_params(id: &SpiffeId) -> Result<CertificateParams, CaError> {
    uri_params(&id.to_string())
}

/// A leaf whose only name is the URI SAN `uri`, for server and client authentication.
fn uri_params(uri: &str) -> Result<CertificateParams, CaError> {
    let uri = uri
        .to_string()
        .try_into()
        .map_err(|_| CaError::BadIdentity(uri.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "isthmus");
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// The SubjectPublicKeyInfo (DER) of the first certificate in `cert_pem`.
fn public_key_of(cert_pem: &str) -> Result<Vec<u8>, CaError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let der = crate::tls::certs_from_pem("CA", cert_pem)
        .map_err(|e| CaError::BadCertificate(e.to_string()))?;
    let first = der
        .first()
        .ok_or_else(|| CaError::BadCertificate("no certificate in the PEM".into()))?;
    let (_, cert) = X509Certificate::from_der(first)
        .map_err(|e| CaError::BadCertificate(format!("not X.509: {e}")))?;
    Ok(cert.tbs_certificate.subject_pki.raw.to_vec())
}

/// One certificate as PEM.
fn pem_of(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// The trust domain a CA that Isthmus generated names in its common name
/// (`Isthmus CA <trust-domain>`); `None` for any other certificate.
pub fn trust_domain_named_by(ca_pem: &str) -> Option<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let der = crate::tls::certs_from_pem("CA", ca_pem).ok()?;
    let (_, cert) = X509Certificate::from_der(der.first()?).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    cn.strip_prefix("Isthmus CA ").map(str::to_string)
}

/// A fresh key and a CSR for it, both PEM, as a workload asks for its certificate.
pub fn generate_csr(id: &SpiffeId) -> Result<(String, String), CaError> {
    csr_for(&id.to_string())
}

/// A fresh key and a CSR proposing the SPIFFE ID `uri` (an operator's, for
/// `CredentialService.Issue`).
pub fn csr_for(uri: &str) -> Result<(String, String), CaError> {
    let key = KeyPair::generate().map_err(CaError::GenerateKey)?;
    // A CSR only proposes the name; usages, lifetime and CA flags are the CA's to set.
    let mut params = CertificateParams::default();
    params.subject_alt_names = uri_params(uri)?.subject_alt_names;
    let csr = params
        .serialize_request(&key)
        .map_err(|source| CaError::Build {
            subject: uri.to_string(),
            source,
        })?;
    let csr_pem = csr.pem().map_err(|source| CaError::Build {
        subject: uri.to_string(),
        source,
    })?;
    Ok((csr_pem, key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificate_carries_the_requested_identity_and_lifetime() {
        let ca = CertificateAuthority::generate("east.isthmus.local").unwrap();
        let id = SpiffeId::new("east.isthmus.local", "default", "ratings");
        let issued = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        let ids = crate::tls::spiffe_ids_in_pem(&issued.cert_chain_pem).unwrap();
        assert_eq!(ids, vec![id]);
        let now = OffsetDateTime::now_utc().unix_timestamp();
        assert!((issued.not_after_unix - now - 3600).abs() < 5);
    }

    #[test]
    fn csr_signing_uses_the_authorised_identity_not_the_claimed_one() {
        let ca = CertificateAuthority::generate("east.isthmus.local").unwrap();
        let claimed = SpiffeId::new("east.isthmus.local", "kube-system", "admin");
        let (csr, _key) = generate_csr(&claimed).unwrap();
        let authorised = SpiffeId::new("east.isthmus.local", "default", "sleep");
        let issued = ca
            .sign_csr(&csr, &authorised, Duration::from_secs(60))
            .unwrap();
        let ids = crate::tls::spiffe_ids_in_pem(&issued.cert_chain_pem).unwrap();
        assert_eq!(ids, vec![authorised]);
    }

    #[test]
    fn garbage_csr_is_rejected() {
        let ca = CertificateAuthority::generate("east.isthmus.local").unwrap();
        let id = SpiffeId::new("east.isthmus.local", "default", "x");
        assert!(matches!(
            ca.sign_csr("not a csr", &id, Duration::from_secs(60)),
            Err(CaError::InvalidCsr(_))
        ));
    }

    #[test]
    fn ca_reloads_from_its_pem_and_keeps_signing() {
        let ca = CertificateAuthority::generate("west.isthmus.local").unwrap();
        let again =
            CertificateAuthority::from_pem("west.isthmus.local", ca.cert_pem(), ca.key_pem())
                .unwrap();
        let id = SpiffeId::new("west.isthmus.local", "default", "x");
        assert!(again.issue(&id, Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn an_operator_credential_names_the_operator_whatever_the_csr_asks() {
        let ca = CertificateAuthority::generate("east.isthmus.local").unwrap();
        let id = crate::identity::OperatorId::new(
            "east.isthmus.local",
            crate::identity::Role::Viewer,
            "ann",
        )
        .unwrap();
        let (csr, _key) = csr_for("spiffe://east.isthmus.local/operator/admin/root").unwrap();
        let issued = ca
            .sign_operator_csr(&csr, &id, Duration::from_secs(60))
            .unwrap();
        let leaf = crate::tls::certs_from_pem("issued", &issued.cert_chain_pem).unwrap();
        assert_eq!(
            crate::tls::principal_in_der(&leaf[0]).unwrap().to_string(),
            "spiffe://east.isthmus.local/operator/viewer/ann"
        );
        assert!(ca
            .sign_operator_csr("not a csr", &id, Duration::from_secs(60))
            .is_err());
    }

    #[test]
    fn a_rotation_bundle_holds_both_cas_once_and_the_signing_one_first() {
        let old = CertificateAuthority::generate("east.isthmus.local").unwrap();
        let next = CertificateAuthority::generate("east.isthmus.local").unwrap();
        let ca =
            CertificateAuthority::from_pem("east.isthmus.local", old.cert_pem(), old.key_pem())
                .unwrap()
                .also_trusting(next.cert_pem())
                .unwrap()
                // Its own certificate and a repeat add nothing.
                .also_trusting(&format!("{}{}", old.cert_pem(), next.cert_pem()))
                .unwrap();
        let bundle = crate::tls::certs_from_pem("b", &ca.bundle_pem()).unwrap();
        let expect = |pem: &str| crate::tls::certs_from_pem("c", pem).unwrap()[0].clone();
        assert_eq!(
            bundle,
            vec![expect(old.cert_pem()), expect(next.cert_pem())]
        );
        // Only the signing CA signs.
        let id = SpiffeId::new("east.isthmus.local", "default", "x");
        let issued = ca.issue(&id, Duration::from_secs(60)).unwrap();
        let trust = crate::tls::TrustBundles::new();
        trust
            .replace([("east.isthmus.local", next.cert_pem())])
            .unwrap();
        let leaf = crate::tls::certs_from_pem("leaf", &issued.cert_chain_pem).unwrap();
        let now = rustls::pki_types::UnixTime::now();
        assert!(trust.verify_principal(&leaf[0], &[], now).is_err());
        trust
            .replace([("east.isthmus.local", ca.bundle_pem().as_str())])
            .unwrap();
        assert!(trust.verify_principal(&leaf[0], &[], now).is_ok());
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let a = CertificateAuthority::generate("east.isthmus.local").unwrap();
        let b = CertificateAuthority::generate("east.isthmus.local").unwrap();
        let err = CertificateAuthority::from_pem("east.isthmus.local", a.cert_pem(), b.key_pem())
            .unwrap_err();
        assert!(matches!(err, CaError::KeyMismatch), "{err}");
    }
}
