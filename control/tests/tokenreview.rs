//! Workload certificates requested with a service-account token: the control plane's
//! CertificateService asks the API server's TokenReview (the Kubernetes-API-compatible test
//! server in support/, answering as a real API server does) and signs only the token's own
//! service-account identity.

#[allow(dead_code)]
use std::sync::Arc;
use std::time::Duration;

use isthmus_control::api::CertificateApi;
use isthmus_control::kubernetes::tokenreview::TokenReviewer;
use isthmus_control::tokens::TokenPolicy;
use isthmus_core::ca::{generate_csr, CertificateAuthority};
use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::MeshConfig;
use isthmus_core::proto::mesh::certificate_service_server::CertificateService;
use isthmus_core::proto::mesh::SignRequest;
use serde_json::json;

const BOOTSTRAP: &str = "bootstrap-token-for-the-gateway-0123";

async fn sign(api: &CertificateApi, id: &SpiffeId, token: &str) -> Result<String, String> {
    let (csr_pem, _key) = generate_csr(id).unwrap();
    api.sign(tonic::Request::new(SignRequest {
        csr_pem,
        identity: id.to_string(),
        token: token.to_string(),
    }))
    .await
    .map(|r| r.into_inner().cert_chain_pem)
    .map_err(|s| s.message().to_string())
}

#[tokio::test]
async fn a_service_account_token_gets_exactly_its_own_identity() {
    isthmus_core::install_crypto_provider();
    let kube_api = isthmus_testkit::kube_api::KubeApi::start().await;
    // Projected tokens are JWTs; these stand in with the same shape.
    let ratings = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJyYXRpbmdzIn0.c2lnbmF0dXJl";
    kube_api.allow_token(ratings, "system:serviceaccount:bookinfo:ratings");
    let client = kube_api.client();
    let (_tx, config) = tokio::sync::watch::channel(Arc::new(MeshConfig::default()));
    let api = CertificateApi {
        ca: Arc::new(CertificateAuthority::generate("east.isthmus.local").unwrap()),
        tokens: TokenPolicy::from_raw(
            "bootstrapTokens",
            vec![isthmus_control::tokens::RawToken {
                token: BOOTSTRAP.into(),
                allow: vec!["isthmus-system/eastwest-gateway".into()],
            }],
        )
        .unwrap(),
        reviewer: Some(TokenReviewer::new(client)),
        lifetime: Duration::from_secs(600),
        config,
    };

    let own = SpiffeId::new("east.isthmus.local", "bookinfo", "ratings");
    let chain = sign(&api, &own, ratings)
        .await
        .expect("its own identity is signed");
    assert_eq!(
        isthmus_core::tls::spiffe_ids_in_pem(&chain).unwrap()[0],
        own,
        "the certificate is for the token's service account"
    );
    let seen = kube_api.token_reviews();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["spec"]["token"], ratings);
    assert_eq!(seen[0]["spec"]["audiences"], json!(["isthmus"]));

    // Another service account's identity, with ratings' token: refused, naming both.
    let reviews = SpiffeId::new("east.isthmus.local", "bookinfo", "reviews");
    let err = sign(&api, &reviews, ratings).await.unwrap_err();
    assert!(
        err.contains("bookinfo:ratings") && err.contains("reviews"),
        "{err}"
    );

    // A token the API server does not authenticate.
    let forged = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJtYWxsb3J5In0.AAAA";
    let err = sign(&api, &own, forged).await.unwrap_err();
    assert!(
        err.contains("did not authenticate") && err.contains("invalid bearer token"),
        "{err}"
    );

    // Neither a bootstrap token nor a JWT: refused without asking the API server.
    let asked = kube_api.token_reviews().len();
    let err = sign(&api, &own, "guess").await.unwrap_err();
    assert!(err.contains("neither a bootstrap token"), "{err}");
    assert_eq!(kube_api.token_reviews().len(), asked);

    // Bootstrap tokens keep working, without a TokenReview.
    let gateway = SpiffeId::gateway("east.isthmus.local");
    sign(&api, &gateway, BOOTSTRAP)
        .await
        .expect("the bootstrap token still works");
    assert_eq!(kube_api.token_reviews().len(), asked);

    // A control plane's identity is never signed, whatever the token.
    let control = SpiffeId::control("east.isthmus.local");
    for token in [BOOTSTRAP, ratings] {
        let err = sign(&api, &control, token).await.unwrap_err();
        assert!(err.contains("control plane's identity"), "{err}");
    }
    // A service-account token never yields an isthmus-system identity (no TokenReview asked).
    let err = sign(&api, &gateway, ratings).await.unwrap_err();
    assert!(err.contains("isthmus-system identities"), "{err}");
    // Names that are not Kubernetes names are refused, naming the field.
    for bad in ["Bookinfo", "book_info"] {
        let id = SpiffeId::new("east.isthmus.local", bad, "ratings");
        let err = sign(&api, &id, ratings).await.unwrap_err();
        assert!(err.contains("field identity") && err.contains(bad), "{err}");
    }
    assert_eq!(kube_api.token_reviews().len(), asked);
}
