//! Fuzzes what a sidecar reads of an end user's token before anything else decides on it.
//!
//! - A key set document never panics the parser (`KeySet::parse`).
//! - A token never panics the checker (`jwt::verify`), and no token the fuzzer makes ever
//!   verifies: only the issuer's private key (generated here, never seen by the fuzzer) can
//!   sign one. That holds for the raw bytes as a token, and for the bytes as the payload of
//!   a token whose header names the issuer's key and algorithm.
//! - The sidecar's token finder and checker (`authn::Rules::authenticate`) never panics on
//!   the bytes as an `Authorization` header or a query string, and never lets one through.

#![no_main]

use std::sync::OnceLock;

use http::{HeaderMap, HeaderValue, Uri};
use isthmus_core::jwt::testing::{b64, jwks, signer, Algorithm};
use isthmus_core::jwt::{verify, Issuer, KeySet};
use isthmus_core::mesh::MeshConfig;
use isthmus_sidecar::authn::{Outcome, Rules};
use isthmus_sidecar::authz::Workload;
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_800_000_000;
const ISS: &str = "https://idp.example.com";

struct Setup {
    issuers: Vec<Issuer>,
    rules: Rules,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let key = signer(Algorithm::ES256, "k1");
        let set = jwks(&[&key]);
        let yaml = format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt}}\nspec:\n  jwtRules:\n  - issuer: {ISS}\n    jwks: '{set}'\n    outputClaimToHeaders: [{{header: x-user, claim: sub}}]\n"
        );
        let config = MeshConfig {
            policies: isthmus_core::policy::parse_documents("fuzz.yaml", &yaml).unwrap(),
            ..MeshConfig::default()
        };
        let workload = Workload {
            namespace: "default".into(),
            labels: Default::default(),
        };
        Setup {
            issuers: vec![Issuer {
                issuer: ISS.into(),
                audiences: vec![],
                keys: KeySet::parse(&set).unwrap(),
            }],
            rules: Rules::for_workload(&config, &workload),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let s = setup();
    let text = String::from_utf8_lossy(data);
    let _ = KeySet::parse(&text);
    assert!(verify(&text, &s.issuers, NOW).is_err(), "an unsigned token verified");

    let header = b64(br#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#);
    let forged = format!("{header}.{}.{}", b64(data), b64(&data[..data.len().min(64)]));
    assert!(verify(&forged, &s.issuers, NOW).is_err(), "a forged token verified");

    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(&[b"Bearer ".as_slice(), data].concat()) {
        headers.insert("authorization", v);
    }
    let uri = Uri::try_from(format!("/p?access_token={}", text.replace(['#', ' '], "")))
        .unwrap_or_else(|_| Uri::from_static("/"));
    let outcome = s.rules.authenticate(&uri, &mut headers, NOW);
    assert!(!matches!(outcome, Outcome::Verified(_)), "a fuzzed token got through");
    assert!(headers.get("x-user").is_none(), "a claim header without a token");
});
