//! Signatures over federation store entries (docs/security.md §7, "Signed entries").
//!
//! A member signs each entry that needs an owner (a write of a governed key, or any write
//! for an operator) with its control plane's key; the entry carries the leaf certificate,
//! the scheme, the signature and the time it was signed. Every replica verifies, when it
//! applies the entry, that the certificate chains to the CA bundle of the cluster bound to
//! the proposing member (at the signed time), names that cluster's control-plane identity,
//! and signed these bytes. So a raft leader cannot pass an entry of its own off as another
//! member's. Pure: the bundle comes from the replica's state, the time from the entry.

use std::time::Duration;

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::SignatureScheme;

use crate::identity::SpiffeId;
use crate::tls::{self, Identity};

/// The schemes a member signs with, in order of preference (the key decides which applies).
const SCHEMES: [SignatureScheme; 3] = [
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
];

/// One entry's signature, as the entry carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntrySignature {
    /// The signer's leaf certificate, DER.
    pub cert_der: Vec<u8>,
    /// The TLS signature scheme code (`SignatureScheme` as u16).
    pub scheme: u16,
    pub signature: Vec<u8>,
    /// When it was signed, by the signer's clock: the certificate must be valid then.
    pub signed_at_ms: u64,
}

/// Signs `message` with `identity`'s current key at `now_ms`.
pub fn sign(identity: &Identity, message: &[u8], now_ms: u64) -> Result<EntrySignature, String> {
    let key = identity.certified_key();
    let signer = key
        .key
        .choose_scheme(&SCHEMES)
        .ok_or_else(|| format!("{}: the key signs none of {SCHEMES:?}", identity.id()))?;
    let scheme = signer.scheme();
    let signature = signer
        .sign(message)
        .map_err(|e| format!("{}: signing failed: {e}", identity.id()))?;
    Ok(EntrySignature {
        cert_der: identity.leaf_der(),
        scheme: u16::from(scheme),
        signature,
        signed_at_ms: now_ms,
    })
}

/// Verifies that `signature` is `expected`'s over `message`, its certificate chaining to a
/// CA of `bundle_pem` at the signed time. `Err` says what failed.
pub fn verify(
    signature: &EntrySignature,
    message: &[u8],
    bundle_pem: &str,
    expected: &SpiffeId,
) -> Result<(), String> {
    let cas = tls::certs_from_pem("caBundlePem", bundle_pem).map_err(|e| e.to_string())?;
    let anchors = cas
        .iter()
        .map(|der| webpki::anchor_from_trusted_cert(der).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the bundle of {}: {e}", expected.trust_domain()))?;
    let der = CertificateDer::from(signature.cert_der.as_slice());
    let cert = webpki::EndEntityCert::try_from(&der)
        .map_err(|e| format!("the signer's certificate does not parse: {e}"))?;
    let at = UnixTime::since_unix_epoch(Duration::from_millis(signature.signed_at_ms));
    cert.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &[],
        at,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| {
        format!(
            "the signer's certificate does not verify against {}'s CA bundle at the signed \
             time: {e}",
            expected.trust_domain()
        )
    })?;
    let ids = tls::spiffe_ids_in_der(&signature.cert_der).map_err(|e| e.to_string())?;
    if ids.as_slice() != std::slice::from_ref(expected) {
        return Err(format!(
            "the entry is signed by {ids:?}, not by {expected}, the proposing member's control plane"
        ));
    }
    let algorithm: &dyn rustls::pki_types::SignatureVerificationAlgorithm =
        match SignatureScheme::from(signature.scheme) {
            SignatureScheme::ECDSA_NISTP256_SHA256 => webpki::ring::ECDSA_P256_SHA256,
            SignatureScheme::ECDSA_NISTP384_SHA384 => webpki::ring::ECDSA_P384_SHA384,
            SignatureScheme::ED25519 => webpki::ring::ED25519,
            other => return Err(format!("signature scheme {other:?} is not accepted")),
        };
    cert.verify_signature(algorithm, message, &signature.signature)
        .map_err(|e| format!("the signature does not verify: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CertificateAuthority;

    fn control(ca: &CertificateAuthority) -> std::sync::Arc<Identity> {
        let id = SpiffeId::control(ca.trust_domain());
        let cert = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        Identity::from_pem(id, &cert.cert_chain_pem, &cert.key_pem).unwrap()
    }

    #[test]
    fn a_signature_verifies_only_for_its_bytes_signer_bundle_and_time() {
        crate::install_crypto_provider();
        let east = CertificateAuthority::generate("east.local").unwrap();
        let impostor = CertificateAuthority::generate("east.local").unwrap();
        let west = CertificateAuthority::generate("west.local").unwrap();
        let now = crate::clock::unix_ms();
        let me = SpiffeId::control("east.local");
        let signed = sign(&control(&east), b"entry", now).unwrap();
        assert!(verify(&signed, b"entry", east.cert_pem(), &me).is_ok());

        let other_bytes = verify(&signed, b"entry2", east.cert_pem(), &me).unwrap_err();
        assert!(other_bytes.contains("does not verify"), "{other_bytes}");
        let other_bundle = verify(&signed, b"entry", impostor.cert_pem(), &me).unwrap_err();
        assert!(other_bundle.contains("CA bundle"), "{other_bundle}");
        let other_signer = verify(
            &sign(&control(&west), b"entry", now).unwrap(),
            b"entry",
            west.cert_pem(),
            &me,
        )
        .unwrap_err();
        assert!(other_signer.contains("not by"), "{other_signer}");
        let mut late = signed.clone();
        late.signed_at_ms = now + 2 * 3600 * 1000;
        assert!(verify(&late, b"entry", east.cert_pem(), &me).is_err());
        let mut forged = signed;
        forged.signature[8] ^= 1;
        assert!(verify(&forged, b"entry", east.cert_pem(), &me).is_err());
    }
}
