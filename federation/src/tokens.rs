//! Join tokens: `<id>.<secret>.<digest>`: 8 and 16 random bytes in hex, then the SHA-256 of
//! the federation's bundle set when the token was minted (`isthmus_core::join`), with which
//! the joiner verifies the federation before it sends the token. Only the SHA-256 digest of
//! the secret is replicated, so reading the store does not reveal usable tokens.

use ring::digest::{digest as sha, SHA256};
use ring::rand::{SecureRandom, SystemRandom};

use crate::StoreError;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The digest of the federation's bundle set a token carries (`<id>.<secret>.<digest>`), if
/// it carries one.
pub fn federation_digest(token: &str) -> Option<&str> {
    split_digest(token).ok()?.1
}

/// `<id>.<secret>[.<digest>]` → (`<id>.<secret>`, the digest); a third part that is not a
/// digest is refused.
fn split_digest(token: &str) -> Result<(&str, Option<&str>), StoreError> {
    let token = token.trim();
    match token.rsplit_once('.') {
        Some((rest, digest)) if rest.contains('.') => {
            if !isthmus_core::join::is_digest(digest) {
                return Err(StoreError::Token(
                    "malformed: expected <id>.<secret>.<digest>, the digest 64 hex digits",
                ));
            }
            Ok((rest, Some(digest)))
        }
        _ => Ok((token, None)),
    }
}

/// A fresh token id and secret.
pub(crate) fn generate() -> Result<(String, String), StoreError> {
    let rng = SystemRandom::new();
    let mut id = [0u8; 8];
    let mut secret = [0u8; 16];
    rng.fill(&mut id)
        .and_then(|()| rng.fill(&mut secret))
        .map_err(|_| StoreError::Token("the system random generator failed"))?;
    Ok((hex(&id), hex(&secret)))
}

/// What the state machine stores and compares for a secret.
pub(crate) fn digest(secret: &str) -> Vec<u8> {
    sha(&SHA256, secret.as_bytes()).as_ref().to_vec()
}

/// Splits a token into its id and secret (a trailing `.<digest>` of the federation's bundle
/// set is the joiner's, not the store's).
pub(crate) fn parse(token: &str) -> Result<(String, &str), StoreError> {
    let (token, _) = split_digest(token)?;
    let (id, secret) = token
        .split_once('.')
        .ok_or(StoreError::Token("malformed: expected <id>.<secret>"))?;
    let is_hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_hex(id) || !is_hex(secret) {
        return Err(StoreError::Token(
            "malformed: expected <id>.<secret> in hex",
        ));
    }
    Ok((id.to_string(), secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_and_differ() {
        let (id, secret) = generate().expect("random");
        let token = format!("{id}.{secret}");
        let (parsed_id, parsed_secret) = parse(&token).expect("parses");
        assert_eq!(
            (parsed_id.as_str(), parsed_secret),
            (id.as_str(), secret.as_str())
        );
        assert_ne!(generate().expect("random"), (id, secret));
        assert_eq!(digest("abc").len(), 32);
    }

    #[test]
    fn a_token_may_carry_the_federations_digest() {
        let digest = "ab".repeat(32);
        let token = format!("0011.2233.{digest}");
        let (id, secret) = parse(&token).expect("parses");
        assert_eq!((id.as_str(), secret), ("0011", "2233"));
        assert_eq!(federation_digest(&token), Some(digest.as_str()));
        assert_eq!(federation_digest("0011.2233"), None);
        assert!(parse(&format!("0011.2233.{}", "ab".repeat(31))).is_err());
    }

    #[test]
    fn malformed_tokens_are_refused_without_panicking() {
        for bad in [
            "", "abc", ".", "a.", ".b", "zz.11", "11.zz", "\u{e9}.1", "a.b.c", "...",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
