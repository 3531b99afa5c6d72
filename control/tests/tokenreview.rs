//! Workload certificates requested with a service-account token: the control plane's
//! CertificateService asks the API server's TokenReview (here a stand-in that serves only
//! `POST /apis/authentication.k8s.io/v1/tokenreviews`, answering as a real API server does)
//! and signs only the token's own service-account identity.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use isthmus_control::api::CertificateApi;
use isthmus_control::kubernetes::tokenreview::TokenReviewer;
use isthmus_control::tokens::TokenPolicy;
use isthmus_core::ca::{generate_csr, CertificateAuthority};
use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::MeshConfig;
use isthmus_core::proto::mesh::certificate_service_server::CertificateService;
use isthmus_core::proto::mesh::SignRequest;
use serde_json::{json, Value};

const BOOTSTRAP: &str = "bootstrap-token-for-the-gateway-0123";

/// Valid tokens (by value) and whom they belong to; every review request seen.
#[derive(Default)]
struct Authority {
    tokens: BTreeMap<String, String>,
    seen: Vec<Value>,
}

async fn api_server(authority: Arc<Mutex<Authority>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let authority = authority.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let authority = authority.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let method = req.method().clone();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let (code, answer) = if method == hyper::Method::POST
                            && path == "/apis/authentication.k8s.io/v1/tokenreviews"
                        {
                            let review: Value = serde_json::from_slice(&body).unwrap();
                            let mut a = authority.lock().unwrap();
                            a.seen.push(review.clone());
                            let token = review["spec"]["token"].as_str().unwrap_or_default();
                            let audiences = review["spec"]["audiences"].clone();
                            let status = match a.tokens.get(token) {
                                Some(user) => {
                                    json!({"authenticated": true, "user": {"username": user, "groups": ["system:serviceaccounts"]}, "audiences": audiences})
                                }
                                None => {
                                    json!({"authenticated": false, "error": "invalid bearer token"})
                                }
                            };
                            (
                                201,
                                json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {"creationTimestamp": null}, "spec": review["spec"], "status": status}),
                            )
                        } else {
                            (
                                404,
                                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
                            )
                        };
                        Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .status(code)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(answer.to_string())))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

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
    let authority = Arc::new(Mutex::new(Authority::default()));
    // Projected tokens are JWTs; these stand in with the same shape.
    let ratings = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJyYXRpbmdzIn0.c2lnbmF0dXJl";
    authority.lock().unwrap().tokens.insert(
        ratings.to_string(),
        "system:serviceaccount:bookinfo:ratings".to_string(),
    );
    let url = api_server(authority.clone()).await;
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let (_tx, config) = tokio::sync::watch::channel(Arc::new(MeshConfig::default()));
    let api = CertificateApi {
        ca: Arc::new(CertificateAuthority::generate("east.isthmus.local").unwrap()),
        tokens: TokenPolicy::single(BOOTSTRAP, &["isthmus-system"]),
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
    {
        let a = authority.lock().unwrap();
        assert_eq!(a.seen.len(), 1);
        assert_eq!(a.seen[0]["spec"]["token"], ratings);
        assert_eq!(a.seen[0]["spec"]["audiences"], json!(["isthmus"]));
    }

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
    let asked = authority.lock().unwrap().seen.len();
    let err = sign(&api, &own, "guess").await.unwrap_err();
    assert!(err.contains("neither a bootstrap token"), "{err}");
    assert_eq!(authority.lock().unwrap().seen.len(), asked);

    // Bootstrap tokens keep working, without a TokenReview.
    let gateway = SpiffeId::gateway("east.isthmus.local");
    sign(&api, &gateway, BOOTSTRAP)
        .await
        .expect("the bootstrap token still works");
    assert_eq!(authority.lock().unwrap().seen.len(), asked);
}
