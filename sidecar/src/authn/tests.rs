use super::*;
use crate::authz::{authorize, Inbound, Verdict};
use isthmus_core::jwt::testing::{jwks, signer, Algorithm, Signer};
use isthmus_core::policy::parse_documents;
use serde_json::json;

const NOW: u64 = 1_800_000_000;
const ISS: &str = "testing@secure.istio.io";

fn ratings() -> Workload {
    Workload {
        namespace: "default".into(),
        labels: [("app".to_string(), "ratings".to_string())].into(),
    }
}

fn config(yaml: &str) -> MeshConfig {
    MeshConfig {
        version: 1,
        policies: parse_documents("authn.yaml", yaml).unwrap(),
        ..MeshConfig::default()
    }
}

fn request_authentication(s: &Signer, extra: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt}}\nspec:\n  selector: {{matchLabels: {{app: ratings}}}}\n  jwtRules:\n  - issuer: {ISS}\n    jwks: '{}'\n{extra}",
        jwks(&[s])
    )
}

fn claims() -> serde_json::Value {
    json!({"iss": ISS, "sub": "alice", "exp": NOW + 60, "groups": ["group1", "group2"],
           "org": {"team": "ratings"}, "level": 3})
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("authorization", format!("Bearer {token}").parse().unwrap());
    h
}

fn uri(s: &str) -> Uri {
    s.parse().unwrap()
}

#[test]
fn no_token_passes_anonymous_a_bad_one_is_refused_and_a_good_one_names_the_user() {
    let s = signer(Algorithm::ES256, "k1");
    let rules = Rules::for_workload(&config(&request_authentication(&s, "")), &ratings());
    assert_eq!(
        rules.authenticate(&uri("/"), &mut HeaderMap::new(), NOW),
        Outcome::Anonymous
    );
    let mut h = bearer(&s.token(&claims()));
    let Outcome::Verified(v) = rules.authenticate(&uri("/"), &mut h, NOW) else {
        panic!()
    };
    assert_eq!(v.principal(), "testing@secure.istio.io/alice");
    assert!(
        h.get("authorization").is_none(),
        "the token is not forwarded by default"
    );
    let mut expired = claims();
    expired["exp"] = json!(NOW - 120);
    assert_eq!(
        rules.authenticate(&uri("/"), &mut bearer(&s.token(&expired)), NOW),
        Outcome::Refused(Refusal::Expired)
    );
    assert!(matches!(
        rules.authenticate(&uri("/"), &mut bearer("not.a.jwt"), NOW),
        Outcome::Refused(Refusal::Malformed(_))
    ));
    // The default places: Authorization: Bearer (any case), then ?access_token=.
    let token = s.token(&claims());
    let mut lower = HeaderMap::new();
    lower.insert("authorization", format!("bearer {token}").parse().unwrap());
    assert!(matches!(
        rules.authenticate(&uri("/"), &mut lower, NOW),
        Outcome::Verified(_)
    ));
    assert!(matches!(
        rules.authenticate(
            &uri(&format!("/x?a=1&access_token={token}")),
            &mut HeaderMap::new(),
            NOW
        ),
        Outcome::Verified(_)
    ));
    // Another workload is not selected.
    let other = Workload {
        namespace: "default".into(),
        labels: Default::default(),
    };
    assert!(Rules::for_workload(&config(&request_authentication(&s, "")), &other).is_empty());
}

#[test]
fn tokens_are_found_where_the_rule_says_and_outputs_replace_what_the_caller_sent() {
    let s = signer(Algorithm::EdDSA, "k1");
    let yaml = request_authentication(
        &s,
        "    fromHeaders: [{name: x-jwt-assertion, prefix: 'Token '}]\n    fromCookies: [session]\n    outputPayloadToHeader: x-jwt-payload\n    outputClaimToHeaders:\n    - {header: x-team, claim: org.team}\n    - {header: x-level, claim: level}\n    forwardOriginalToken: true\n",
    );
    let rules = Rules::for_workload(&config(&yaml), &ratings());
    let token = s.token(&claims());
    // Authorization is not a place this rule looks: anonymous.
    assert_eq!(
        rules.authenticate(&uri("/"), &mut bearer(&token), NOW),
        Outcome::Anonymous
    );
    let mut h = HeaderMap::new();
    h.insert("x-jwt-assertion", format!("Token {token}").parse().unwrap());
    h.insert("x-team", "forged".parse().unwrap());
    assert!(matches!(
        rules.authenticate(&uri("/"), &mut h, NOW),
        Outcome::Verified(_)
    ));
    assert_eq!(h["x-team"], "ratings");
    assert_eq!(h["x-level"], "3");
    assert_eq!(h["x-jwt-payload"], token.split('.').nth(1).unwrap());
    assert!(
        h.get("x-jwt-assertion").is_some(),
        "forwardOriginalToken keeps it"
    );
    let mut c = HeaderMap::new();
    c.insert("cookie", format!("a=b; session={token}").parse().unwrap());
    assert!(matches!(
        rules.authenticate(&uri("/"), &mut c, NOW),
        Outcome::Verified(_)
    ));
    // Without a token, a caller's own x-team never reaches the application.
    let mut forged = HeaderMap::new();
    forged.insert("x-team", "admins".parse().unwrap());
    assert_eq!(
        rules.authenticate(&uri("/"), &mut forged, NOW),
        Outcome::Anonymous
    );
    assert!(forged.get("x-team").is_none());
}

#[test]
fn authorization_reads_the_end_user_its_audiences_and_claims() {
    let s = signer(Algorithm::ES384, "k1");
    let yaml = format!(
        "{}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: users}}\nspec:\n  selector: {{matchLabels: {{app: ratings}}}}\n  rules:\n  - from:\n    - source: {{requestPrincipals: ['{ISS}/*'], notRequestPrincipals: ['*/mallory']}}\n    when:\n    - key: request.auth.claims[groups]\n      values: [group1]\n    - key: request.auth.claims[org][team]\n      values: [rat*]\n    - key: request.auth.audiences\n      notValues: [internal]\n",
        request_authentication(&s, "")
    );
    let c = config(&yaml);
    let rules = Rules::for_workload(&c, &ratings());
    let verdict = |claims: serde_json::Value| {
        let mut h = bearer(&s.token(&claims));
        let auth = match rules.authenticate(&uri("/"), &mut h, NOW) {
            Outcome::Verified(v) => Some(v),
            Outcome::Anonymous => None,
            Outcome::Refused(r) => panic!("{r}"),
        };
        authorize(
            &c,
            &ratings(),
            &Inbound {
                caller: None,
                port: 9080,
                method: Some("GET"),
                path: Some("/"),
                headers: Some(&h),
                auth: auth.as_deref(),
            },
        )
    };
    assert_eq!(verdict(claims()), Verdict::Allow);
    let with = |k: &str, v: serde_json::Value| {
        let mut c = claims();
        c[k] = v;
        c
    };
    assert!(matches!(
        verdict(with("sub", json!("mallory"))),
        Verdict::Deny(_)
    ));
    assert!(matches!(
        verdict(with("groups", json!(["group3"]))),
        Verdict::Deny(_)
    ));
    assert_eq!(verdict(with("groups", json!("group1"))), Verdict::Allow);
    assert!(matches!(
        verdict(with("org", json!({"team": "reviews"}))),
        Verdict::Deny(_)
    ));
    assert!(matches!(
        verdict(with("aud", json!(["web", "internal"]))),
        Verdict::Deny(_)
    ));
    assert_eq!(verdict(with("aud", json!("web"))), Verdict::Allow);
    // No token: no request principal, so the ALLOW rule does not match.
    let h = HeaderMap::new();
    let anonymous = Inbound {
        caller: None,
        port: 9080,
        method: Some("GET"),
        path: Some("/"),
        headers: Some(&h),
        auth: None,
    };
    assert!(matches!(
        authorize(&c, &ratings(), &anonymous),
        Verdict::Deny(_)
    ));
}

#[test]
fn the_challenge_names_the_request_as_envoy_does() {
    let mut h = HeaderMap::new();
    h.insert("host", "ratings:9080".parse().unwrap());
    assert_eq!(
        challenge(&uri("/ratings/1?x=1"), &h),
        "Bearer realm=\"http://ratings:9080/ratings/1\", error=\"invalid_token\""
    );
}

#[test]
fn verified_tokens_are_kept_but_their_lifetime_is_checked_on_every_use() {
    let s = signer(Algorithm::ES256, "k1");
    let rules = Rules::for_workload(&config(&request_authentication(&s, "")), &ratings());
    let token = s.token(&claims());
    assert!(matches!(
        rules.authenticate(&uri("/"), &mut bearer(&token), NOW),
        Outcome::Verified(_)
    ));
    assert_eq!(rules.cached(), 1);
    assert!(matches!(
        rules.authenticate(&uri("/"), &mut bearer(&token), NOW + 30),
        Outcome::Verified(_)
    ));
    assert_eq!(rules.cached(), 1, "the same token is one entry");
    // exp is NOW + 60: past the minute of slack, the kept token is refused.
    assert_eq!(
        rules.authenticate(&uri("/"), &mut bearer(&token), NOW + 121),
        Outcome::Refused(Refusal::Expired)
    );
    // Refused tokens are not kept; the cache is bounded.
    let _ = rules.authenticate(&uri("/"), &mut bearer("x.y.z"), NOW);
    assert_eq!(rules.cached(), 1);
    for i in 0..CACHE_ENTRIES + 10 {
        let mut c = claims();
        c["jti"] = json!(i);
        let _ = rules.authenticate(&uri("/"), &mut bearer(&s.token(&c)), NOW);
    }
    assert_eq!(rules.cached(), CACHE_ENTRIES);
}
