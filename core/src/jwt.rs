//! End-user tokens: a JSON Web Token (RFC 7519) checked as Istio's `RequestAuthentication`
//! checks it (Envoy's `jwt_authn` filter), against an issuer's JSON Web Key Set (RFC 7517).
//!
//! Pure: the clock is passed in. [`verify`] takes the token apart itself (so every refusal
//! names what was wrong), lets `jsonwebtoken` check the signature with the issuer's public
//! keys (RS256/384/512, PS256/384/512, ES256/384, EdDSA), then checks the claims: `exp` and
//! `nbf` with [`CLOCK_SKEW_SECS`] of slack, and `aud` against the rule's audiences. HMAC
//! (`HS*`) and `alg: none` are refused, and a key set with a symmetric (`oct`) key is refused
//! when the policy is applied: a key set an issuer publishes holds public keys only.

use std::fmt;

use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

/// The largest token accepted, in bytes (Envoy bounds the whole header block at 60 KiB; a
/// token is a few hundred bytes to a few KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The largest key set accepted, in bytes, and the most keys in it.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
pub const MAX_JWKS_KEYS: usize = 64;

/// How far `exp` and `nbf` may be off, as Envoy's `jwt_authn` allows by default.
pub const CLOCK_SKEW_SECS: u64 = 60;

/// One issuer's public keys, parsed once from its JWKS document.
#[derive(Clone)]
pub struct KeySet {
    keys: Vec<Key>,
}

#[derive(Clone)]
struct Key {
    kid: Option<String>,
    /// The key's own `alg`, when it names one: then only that algorithm may use it.
    alg: Option<Algorithm>,
    key: DecodingKey,
    family: Family,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    Ec,
    Ed,
}

fn family_of(alg: Algorithm) -> Option<Family> {
    use Algorithm::*;
    match alg {
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Some(Family::Rsa),
        ES256 | ES384 => Some(Family::Ec),
        EdDSA => Some(Family::Ed),
        HS256 | HS384 | HS512 => None,
    }
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| (&k.kid, k.family)))
            .finish()
    }
}

impl KeySet {
    /// Parses a JWKS document (`{"keys": [...]}`); the error names the key and what is wrong.
    pub fn parse(jwks: &str) -> Result<KeySet, String> {
        if jwks.len() > MAX_JWKS_BYTES {
            return Err(format!(
                "the key set is {} bytes, more than {MAX_JWKS_BYTES}",
                jwks.len()
            ));
        }
        let doc: Value =
            serde_json::from_str(jwks).map_err(|e| format!("not a JSON document: {e}"))?;
        let Some(keys) = doc.get("keys").and_then(Value::as_array) else {
            return Err("a key set is an object with a \"keys\" array".into());
        };
        if keys.is_empty() {
            return Err("the key set has no keys".into());
        }
        if keys.len() > MAX_JWKS_KEYS {
            return Err(format!(
                "the key set has {} keys, more than {MAX_JWKS_KEYS}",
                keys.len()
            ));
        }
        let mut out = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            let at = |m: String| format!("keys[{i}]: {m}");
            let kty = k.get("kty").and_then(Value::as_str).unwrap_or("");
            if kty == "oct" {
                return Err(at(
                    "a symmetric (oct) key is not accepted: an issuer's key set \
                     publishes public keys (RSA, EC or OKP)"
                        .into(),
                ));
            }
            let jwk: Jwk = serde_json::from_value(k.clone())
                .map_err(|e| at(format!("not a usable key (kty {kty:?}): {e}")))?;
            let family = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Family::Rsa,
                AlgorithmParameters::EllipticCurve(_) => Family::Ec,
                AlgorithmParameters::OctetKeyPair(_) => Family::Ed,
                AlgorithmParameters::OctetKey(_) => {
                    return Err(at("a symmetric (oct) key is not accepted".into()))
                }
            };
            let alg = match k.get("alg").and_then(Value::as_str) {
                None => None,
                Some(name) => {
                    let alg: Algorithm = name
                        .parse()
                        .map_err(|_| at(format!("unknown algorithm {name:?}")))?;
                    if family_of(alg) != Some(family) {
                        return Err(at(format!("algorithm {name} does not fit a {kty} key")));
                    }
                    Some(alg)
                }
            };
            let key = DecodingKey::from_jwk(&jwk).map_err(|e| at(format!("bad key: {e}")))?;
            out.push(Key {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
                family,
            });
        }
        Ok(KeySet { keys: out })
    }
}

/// What a `jwtRules` entry says about one issuer.
#[derive(Debug, Clone)]
pub struct Issuer {
    pub issuer: String,
    /// Accepted `aud` values; empty: any.
    pub audiences: Vec<String>,
    pub keys: KeySet,
}

/// A token that passed: who it speaks for and what it claims.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub issuer: String,
    /// `sub`, empty when the token has none.
    pub subject: String,
    pub audiences: Vec<String>,
    /// `azp`, the party the token was issued to.
    pub presenter: Option<String>,
    /// The whole payload.
    pub claims: Value,
    /// The payload as the token carried it (base64url), for `outputPayloadToHeader`.
    pub payload_b64: String,
    /// `exp` and `nbf`, seconds since the epoch, when the token has them.
    pub expires: Option<u64>,
    pub not_before: Option<u64>,
}

impl Verified {
    /// Istio's `request.auth.principal`: `<iss>/<sub>`.
    pub fn principal(&self) -> String {
        format!("{}/{}", self.issuer, self.subject)
    }

    /// Whether the token is within its lifetime at `now` (seconds since the epoch), with
    /// [`CLOCK_SKEW_SECS`] of slack: [`verify`] checks it, and a cache of verified tokens
    /// checks it again on every use.
    pub fn check_time(&self, now: u64) -> Result<(), Refusal> {
        if self
            .expires
            .is_some_and(|exp| now > exp.saturating_add(CLOCK_SKEW_SECS))
        {
            return Err(Refusal::Expired);
        }
        if self
            .not_before
            .is_some_and(|nbf| now.saturating_add(CLOCK_SKEW_SECS) < nbf)
        {
            return Err(Refusal::NotYetValid);
        }
        Ok(())
    }

    /// The claim at `path` (nested objects, `["groups"]` or `["a", "b"]`).
    pub fn claim(&self, path: &[&str]) -> Option<&Value> {
        path.iter().try_fold(&self.claims, |v, k| v.get(k))
    }
}

/// Why a token was refused. [`Refusal::reason`] is the metric label; `Display` the 401 body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    TooLarge(usize),
    Malformed(String),
    UnknownIssuer(String),
    Algorithm(String),
    NoKey,
    BadSignature,
    Expired,
    NotYetValid,
    Audience,
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::TooLarge(_) => "too_large",
            Refusal::Malformed(_) => "malformed",
            Refusal::UnknownIssuer(_) => "unknown_issuer",
            Refusal::Algorithm(_) => "algorithm",
            Refusal::NoKey => "unknown_key",
            Refusal::BadSignature => "bad_signature",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::Audience => "audience",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::TooLarge(n) => write!(f, "Jwt is {n} bytes, more than {MAX_TOKEN_BYTES}"),
            Refusal::Malformed(m) => {
                write!(f, "Jwt is not in the form of Header.Payload.Signature: {m}")
            }
            Refusal::UnknownIssuer(i) => write!(f, "Jwt issuer {i:?} is not configured"),
            Refusal::Algorithm(a) => write!(f, "Jwt algorithm {a} is not accepted"),
            Refusal::NoKey => f.write_str("Jwks doesn't have key to match kid or alg from Jwt"),
            Refusal::BadSignature => f.write_str("Jwt verification fails"),
            Refusal::Expired => f.write_str("Jwt is expired"),
            Refusal::NotYetValid => f.write_str("Jwt not yet valid"),
            Refusal::Audience => f.write_str("Audiences in Jwt are not allowed"),
        }
    }
}

fn b64_json(part: &str, what: &str) -> Result<Value, Refusal> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|e| Refusal::Malformed(format!("the {what} is not base64url: {e}")))?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| Refusal::Malformed(format!("the {what} is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(Refusal::Malformed(format!(
            "the {what} is not a JSON object"
        )));
    }
    Ok(v)
}

fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

/// Checks `token` against the issuers it may come from, at `now` (seconds since the epoch).
pub fn verify(token: &str, issuers: &[Issuer], now: u64) -> Result<Verified, Refusal> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Refusal::TooLarge(token.len()));
    }
    let parts: Vec<&str> = token.split('.').collect();
    let [header, payload, _signature] = parts.as_slice() else {
        return Err(Refusal::Malformed(format!(
            "{} parts separated by dots, not 3",
            parts.len()
        )));
    };
    let header = b64_json(header, "header")?;
    let alg_name = header.get("alg").and_then(Value::as_str).unwrap_or("");
    let alg: Algorithm = alg_name
        .parse()
        .map_err(|_| Refusal::Algorithm(format!("{alg_name:?}")))?;
    let Some(fam) = family_of(alg) else {
        return Err(Refusal::Algorithm(format!(
            "{alg_name} (HMAC: an issuer's keys are public keys)"
        )));
    };
    let claims = b64_json(payload, "payload")?;
    let Some(iss) = claims.get("iss").and_then(Value::as_str) else {
        return Err(Refusal::Malformed(
            "the payload has no \"iss\" claim".into(),
        ));
    };
    let Some(issuer) = issuers.iter().find(|i| i.issuer == iss) else {
        return Err(Refusal::UnknownIssuer(iss.to_string()));
    };
    let kid = header.get("kid").and_then(Value::as_str);
    let candidates: Vec<&Key> = issuer
        .keys
        .keys
        .iter()
        .filter(|k| k.family == fam && k.alg.is_none_or(|a| a == alg))
        .filter(|k| kid.is_none_or(|kid| k.kid.as_deref() == Some(kid)))
        .collect();
    if candidates.is_empty() {
        return Err(Refusal::NoKey);
    }
    let mut validation = Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    if !candidates
        .iter()
        .any(|k| jsonwebtoken::decode::<Value>(token, &k.key, &validation).is_ok())
    {
        return Err(Refusal::BadSignature);
    }
    let number = |name: &str| match claims.get(name) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            Refusal::Malformed(format!("\"{name}\" is not a whole number of seconds"))
        }),
    };
    let (expires, not_before) = (number("exp")?, number("nbf")?);
    let audiences = strings(claims.get("aud"));
    let verified = Verified {
        issuer: iss.to_string(),
        subject: claims
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        audiences,
        presenter: claims.get("azp").and_then(Value::as_str).map(String::from),
        payload_b64: payload.to_string(),
        claims,
        expires,
        not_before,
    };
    verified.check_time(now)?;
    if !issuer.audiences.is_empty()
        && !verified
            .audiences
            .iter()
            .any(|a| issuer.audiences.contains(a))
    {
        return Err(Refusal::Audience);
    }
    Ok(verified)
}

#[cfg(feature = "testing")]
pub mod testing;
#[cfg(test)]
mod tests;
