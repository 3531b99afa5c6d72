//! Signing keys for tests: a fresh key pair per call, its public JWK, and tokens signed with
//! it (ES256, ES384, EdDSA: the algorithms `ring` can generate keys for).
// Test helpers: a key that cannot be generated or a claim set that cannot be signed is a broken
// test machine, and the test should stop there.
#![allow(clippy::unwrap_used)]

use base64::Engine;
pub use jsonwebtoken::Algorithm;
use jsonwebtoken::{encode, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use serde_json::{json, Value};

/// base64url without padding, as JOSE writes it.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A freshly generated signing key and its public JWK.
pub struct Signer {
    pub alg: Algorithm,
    key: EncodingKey,
    /// The public key, as a JWKS lists it.
    pub jwk: Value,
}

/// A fresh key pair for `alg` (ES256, ES384 or EdDSA) under key id `kid`.
pub fn signer(alg: Algorithm, kid: &str) -> Signer {
    let rng = SystemRandom::new();
    let (key, jwk) = match alg {
        Algorithm::ES256 | Algorithm::ES384 => {
            let (ring_alg, crv) = if alg == Algorithm::ES256 {
                (&signature::ECDSA_P256_SHA256_FIXED_SIGNING, "P-256")
            } else {
                (&signature::ECDSA_P384_SHA384_FIXED_SIGNING, "P-384")
            };
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(ring_alg, &rng).unwrap();
            let pair = EcdsaKeyPair::from_pkcs8(ring_alg, pkcs8.as_ref(), &rng).unwrap();
            let point = pair.public_key().as_ref();
            let n = (point.len() - 1) / 2;
            (
                EncodingKey::from_ec_der(pkcs8.as_ref()),
                json!({"kty": "EC", "crv": crv, "kid": kid, "x": b64(&point[1..=n]), "y": b64(&point[n + 1..])}),
            )
        }
        Algorithm::EdDSA => {
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
            let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
            (
                EncodingKey::from_ed_der(pkcs8.as_ref()),
                json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(pair.public_key().as_ref())}),
            )
        }
        other => panic!("no test signer for {other:?}"),
    };
    Signer { alg, key, jwk }
}

impl Signer {
    /// A token carrying `claims`, signed, with the key's `kid` in its header.
    pub fn token(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = self.jwk["kid"].as_str().map(String::from);
        encode(&header, claims, &self.key).unwrap()
    }
}

/// A JWKS document of `signers`' public keys.
pub fn jwks(signers: &[&Signer]) -> String {
    json!({"keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>()}).to_string()
}
