use super::testing::{b64, signer, Signer};
use super::*;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;

const NOW: u64 = 1_800_000_000;
const ISS: &str = "https://idp.example.com";

fn issuer(signers: &[&Signer], audiences: &[&str]) -> Issuer {
    Issuer {
        issuer: ISS.into(),
        audiences: audiences.iter().map(|a| a.to_string()).collect(),
        keys: KeySet::parse(&super::testing::jwks(signers)).unwrap(),
    }
}

fn claims() -> Value {
    json!({"iss": ISS, "sub": "alice", "aud": "bookinfo", "exp": NOW + 300, "azp": "web",
           "groups": ["readers", "dev"], "org": {"team": "ratings"}})
}

#[test]
fn tokens_signed_with_each_public_key_algorithm_pass_and_say_who_they_speak_for() {
    for alg in [Algorithm::ES256, Algorithm::ES384, Algorithm::EdDSA] {
        let s = signer(alg, "k1");
        let v = verify(&s.token(&claims()), &[issuer(&[&s], &["bookinfo"])], NOW)
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(v.principal(), "https://idp.example.com/alice");
        assert_eq!(v.audiences, vec!["bookinfo".to_string()]);
        assert_eq!(v.presenter.as_deref(), Some("web"));
        assert_eq!(v.claim(&["org", "team"]), Some(&json!("ratings")));
        assert_eq!(v.claim(&["groups"]).unwrap()[1], "dev");
    }
}

#[test]
fn time_claims_are_checked_with_a_minute_of_slack() {
    let s = signer(Algorithm::ES256, "k1");
    let iss = [issuer(&[&s], &[])];
    let with = |k: &str, v: u64| {
        let mut c = claims();
        c[k] = json!(v);
        verify(&s.token(&c), &iss, NOW)
    };
    assert_eq!(with("exp", NOW - 61), Err(Refusal::Expired));
    assert!(with("exp", NOW - 30).is_ok());
    assert_eq!(with("nbf", NOW + 61), Err(Refusal::NotYetValid));
    assert!(with("nbf", NOW + 30).is_ok());
    let mut c = claims();
    c["exp"] = json!("tomorrow");
    assert!(
        matches!(verify(&s.token(&c), &iss, NOW), Err(Refusal::Malformed(m)) if m.contains("\"exp\""))
    );
    // No exp at all: Envoy accepts it, and so does Isthmus.
    c.as_object_mut().unwrap().remove("exp");
    assert!(verify(&s.token(&c), &iss, NOW).is_ok());
}

#[test]
fn issuer_audience_and_key_must_all_fit() {
    let s = signer(Algorithm::ES256, "k1");
    let token = s.token(&claims());
    assert_eq!(
        verify(&token, &[issuer(&[&s], &["other-api"])], NOW),
        Err(Refusal::Audience)
    );
    let mut c = claims();
    c["aud"] = json!(["x", "bookinfo"]);
    assert!(verify(&s.token(&c), &[issuer(&[&s], &["bookinfo"])], NOW).is_ok());
    let mut elsewhere = issuer(&[&s], &[]);
    elsewhere.issuer = "https://other.example.com".into();
    assert_eq!(
        verify(&token, &[elsewhere], NOW),
        Err(Refusal::UnknownIssuer(ISS.into()))
    );
    // The issuer's set has a key under another kid only.
    let other = signer(Algorithm::ES256, "k2");
    assert_eq!(
        verify(&token, &[issuer(&[&other], &[])], NOW),
        Err(Refusal::NoKey)
    );
    // Same kid, another key: the signature does not verify.
    let impostor = signer(Algorithm::ES256, "k1");
    assert_eq!(
        verify(&token, &[issuer(&[&impostor], &[])], NOW),
        Err(Refusal::BadSignature)
    );
    // A key whose alg says ES384 is not used for ES256.
    let mut pinned = s.jwk.clone();
    pinned["alg"] = json!("ES384");
    let keys = KeySet::parse(&json!({"keys": [pinned]}).to_string()).unwrap();
    let iss = Issuer {
        issuer: ISS.into(),
        audiences: vec![],
        keys,
    };
    assert_eq!(verify(&token, &[iss], NOW), Err(Refusal::NoKey));
}

#[test]
fn none_hmac_and_tampered_tokens_are_refused() {
    let s = signer(Algorithm::ES256, "k1");
    let iss = [issuer(&[&s], &[])];
    let payload = b64(claims().to_string().as_bytes());
    let none = format!("{}.{payload}.", b64(br#"{"alg":"none","typ":"JWT"}"#));
    assert!(matches!(
        verify(&none, &iss, NOW),
        Err(Refusal::Algorithm(_))
    ));
    // HMAC keyed with the issuer's public key (the classic confusion attack).
    let public = serde_json::to_vec(&s.jwk).unwrap();
    let hs = encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(&public),
    )
    .unwrap();
    assert!(matches!(verify(&hs, &iss, NOW), Err(Refusal::Algorithm(m)) if m.contains("HMAC")));
    // The payload changed after signing.
    let token = s.token(&claims());
    let mut parts: Vec<&str> = token.split('.').collect();
    let mut forged = claims();
    forged["sub"] = json!("admin");
    let forged = b64(forged.to_string().as_bytes());
    parts[1] = &forged;
    assert_eq!(
        verify(&parts.join("."), &iss, NOW),
        Err(Refusal::BadSignature)
    );
}

#[test]
fn malformed_truncated_and_oversized_tokens_get_a_reason() {
    let s = signer(Algorithm::ES256, "k1");
    let iss = [issuer(&[&s], &[])];
    let token = s.token(&claims());
    let cut = &token[..token.rfind('.').unwrap()];
    assert!(matches!(verify(cut, &iss, NOW), Err(Refusal::Malformed(m)) if m.contains("2 parts")));
    assert!(matches!(
        verify("a.b.c", &iss, NOW),
        Err(Refusal::Malformed(_))
    ));
    assert!(matches!(verify("", &iss, NOW), Err(Refusal::Malformed(_))));
    let big = "a".repeat(MAX_TOKEN_BYTES + 1);
    assert_eq!(
        verify(&big, &iss, NOW),
        Err(Refusal::TooLarge(MAX_TOKEN_BYTES + 1))
    );
    let no_iss = s.token(&json!({"sub": "alice"}));
    assert!(matches!(verify(&no_iss, &iss, NOW), Err(Refusal::Malformed(m)) if m.contains("iss")));
    for r in [Refusal::Expired, Refusal::NoKey, Refusal::Audience] {
        assert!(!r.to_string().is_empty() && !r.reason().is_empty());
    }
}

#[test]
fn key_sets_are_refused_naming_the_key_and_the_fault() {
    let e = |jwks: &str| KeySet::parse(jwks).unwrap_err();
    assert!(e("{").contains("not a JSON document"));
    assert!(e(r#"{"keys": []}"#).contains("no keys"));
    assert!(e(r#"{"kty": "EC"}"#).contains("\"keys\" array"));
    assert!(e(r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).starts_with("keys[0]: a symmetric"));
    let s = signer(Algorithm::EdDSA, "k1");
    let mut wrong = s.jwk.clone();
    wrong["alg"] = json!("RS256");
    let jwks = json!({"keys": [s.jwk.clone(), wrong]}).to_string();
    assert!(
        e(&jwks).starts_with("keys[1]: algorithm RS256 does not fit"),
        "{}",
        e(&jwks)
    );
    assert!(e(r#"{"keys": [{"kty": "XYZ"}]}"#).starts_with("keys[0]: not a usable key"));
    let many = json!({"keys": vec![s.jwk.clone(); MAX_JWKS_KEYS + 1]}).to_string();
    assert!(e(&many).contains("more than"));
}
