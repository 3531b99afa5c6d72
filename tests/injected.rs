//! An injected pod's sidecar, as the webhook sets it up: `isthmus sidecar --kubernetes`
//! configured only by its environment, its projected service-account token and its labels
//! file, against a control plane whose Kubernetes discovery (and TokenReview) talk to the
//! Kubernetes-API-compatible test server. It reaches the control plane's TLS API with the CA
//! from `ISTHMUS_CONTROL_CA` and gets its certificate for its token's service account only.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use isthmus_control::kubernetes::KubeSource;
use isthmus_control::tokens::TokenPolicy;
use isthmus_core::ca::CertificateAuthority;
use isthmus_testkit::kube_api::KubeApi;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

const TD: &str = "east.isthmus.local";
/// A projected token is a JWT; this stands in with the same shape.
const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJyYXRpbmdzIn0.c2lnbmF0dXJl";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_sidecar_starts_from_its_pod_and_gets_its_certificate_by_token_review() {
    isthmus_core::install_crypto_provider();
    let api = KubeApi::start().await;
    api.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bookinfo"}}));
    api.allow_token(TOKEN, "system:serviceaccount:bookinfo:ratings");

    let store = isthmus_testkit::store::one_member_store().await;
    let ca = Arc::new(CertificateAuthority::generate(TD).unwrap());
    let control = isthmus_control::start(
        isthmus_control::ControlOptions {
            cluster: "east".into(),
            trust_domain: TD.into(),
            locality: None,
            grpc_listen: "127.0.0.1:0".parse().unwrap(),
            discovery: isthmus_control::DiscoverySource::Kubernetes(KubeSource::new(api.client())),
            vip_range: "127.62.0.0/16".parse().unwrap(),
            gateway_address: None,
            // No bootstrap token allows bookinfo: only the service-account token can.
            tokens: TokenPolicy::single(
                "bootstrap-token-for-the-gateway-0123",
                &["isthmus-system"],
            ),
            cert_lifetime: Duration::from_secs(600),
            export_lease: Duration::from_secs(10),
            ca: ca.clone(),
            bootstrap_admin: Some(isthmus_control::BOOTSTRAP_ADMIN.to_string()),
            members: None,
        },
        store.clone(),
    )
    .await
    .unwrap();

    // The pod's projected volumes, where the webhook mounts them (moved by environment).
    let pod = tempfile::tempdir().unwrap();
    std::fs::write(pod.path().join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(
        pod.path().join("labels"),
        "app=\"ratings\"\nversion=\"v1\"\n",
    )
    .unwrap();
    let sidecar = |service_account: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_isthmus"));
        cmd.args(["sidecar", "--kubernetes"])
            .env("ISTHMUS_CLUSTER", "east")
            .env("ISTHMUS_TRUST_DOMAIN", TD)
            .env("ISTHMUS_CONTROL", control.grpc_addr().to_string())
            .env("ISTHMUS_CONTROL_CA", ca.cert_pem())
            .env("POD_NAMESPACE", "bookinfo")
            .env("SERVICE_ACCOUNT", service_account)
            .env("ISTHMUS_TOKEN_FILE", pod.path().join("token"))
            .env("ISTHMUS_PODINFO_DIR", pod.path())
            .env_remove("ISTHMUS_GATEWAY")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd.spawn().unwrap()
    };

    // Its own service account: it starts, with the identity of its token's account.
    let mut ratings = sidecar("ratings");
    let mut lines = BufReader::new(ratings.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(json) = line.strip_prefix("isthmus sidecar ready ") {
                return serde_json::from_str::<serde_json::Value>(json).unwrap();
            }
        }
        let mut err = String::new();
        let _ = ratings
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .await;
        panic!("the sidecar exited before it was ready: {err}");
    })
    .await
    .expect("the sidecar is ready in time");
    assert_eq!(
        ready["identity"],
        format!("spiffe://{TD}/ns/bookinfo/sa/ratings")
    );
    let reviews = api.token_reviews();
    assert_eq!(
        reviews.len(),
        1,
        "one TokenReview for the first certificate"
    );
    assert_eq!(reviews[0]["spec"]["token"], TOKEN);
    assert_eq!(reviews[0]["spec"]["audiences"], json!(["isthmus"]));
    ratings.kill().await.unwrap();

    // The same token claiming another service account: refused, and the sidecar says why.
    let reviews_sa = sidecar("reviews");
    let out = tokio::time::timeout(Duration::from_secs(30), reviews_sa.wait_with_output())
        .await
        .expect("exits")
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bookinfo:ratings") && err.contains("reviews"),
        "the refusal names the token's account and the identity asked for: {err}"
    );
    control.shutdown().await;
    store.shutdown().await;
}
