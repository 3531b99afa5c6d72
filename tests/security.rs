//! Authorization with the caller's real identity across clusters, end users' tokens, and mutual
//! TLS modes, in the demo federation: ratings runs in central; callers in east and west reach
//! it through the gateways with their own SPIFFE IDs (and their users' JWTs), which central's
//! sidecar checks.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use isthmus_core::policy::parse_documents;
use isthmus_demo::probe::{call_sample, http_get};
use isthmus_demo::{vip_of, Demo, DemoCluster, DemoOptions, SAMPLE_PORT};

async fn apply(demo: &Demo, yaml: &str) {
    let policies = parse_documents("security.yaml", yaml).unwrap();
    let east = demo.cluster("east").unwrap();
    east.control.client().apply(&policies, false).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    // The policies must reach central's ratings sidecar, which reads the same config stream as
    // central's client sidecar.
    let central = demo.cluster("central").unwrap();
    while !policies
        .iter()
        .all(|p| central.config.borrow().policies.contains(p))
    {
        assert!(Instant::now() < deadline, "policies never reached central");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The workload sidecars follow their own streams: callers below poll with a deadline.
}

async fn status(c: &DemoCluster, service: &str) -> u16 {
    let vip = vip_of(&c.config.borrow(), service).unwrap();
    http_get(SocketAddr::new(vip, SAMPLE_PORT), "/")
        .await
        .map(|r| r.0)
        .unwrap_or(0)
}

const RATINGS_PERMISSIVE: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: ratings}\nspec:\n  selector: {matchLabels: {app: ratings}}\n  mtls: {mode: PERMISSIVE}\n";

const ONLY_EAST_SLEEP: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-from-east}
spec:
  selector: {matchLabels: {app: ratings}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["east.isthmus.local/ns/default/sa/sleep"]}
    to:
    - operation: {methods: [GET]}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_sees_the_real_caller_across_clusters() {
    let demo = Demo::start(DemoOptions::fast(170))
        .await
        .expect("the demo starts");
    let (east, west, central) = (
        demo.cluster("east").unwrap(),
        demo.cluster("west").unwrap(),
        demo.cluster("central").unwrap(),
    );
    for c in [east, west, central] {
        assert_eq!(status(c, "ratings").await, 200);
    }
    apply(&demo, ONLY_EAST_SLEEP).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while status(west, "ratings").await != 403 {
        assert!(Instant::now() < deadline, "west was never denied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status(east, "ratings").await,
        200,
        "east's sleep is allowed through two gateways"
    );
    assert_eq!(
        status(central, "ratings").await,
        403,
        "central's own sleep is not on the list"
    );
    // Other workloads are unaffected by a policy selecting ratings.
    assert_eq!(status(west, "details").await, 200);

    // The same policy as Istio users write it: `cluster.local` is the mesh's trust domain,
    // so it names default/sleep in every member cluster.
    apply(
        &demo,
        &ONLY_EAST_SLEEP.replace("east.isthmus.local/", "cluster.local/"),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while status(west, "ratings").await != 200 {
        assert!(
            Instant::now() < deadline,
            "cluster.local never admitted west's sleep"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for c in [east, central] {
        assert_eq!(status(c, "ratings").await, 200, "{}'s sleep", c.name);
    }

    apply(&demo, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-east}\nspec:\n  selector: {matchLabels: {app: ratings}}\n  action: DENY\n  rules:\n  - from:\n    - source: {principals: [\"east.isthmus.local/*\"]}\n").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while status(east, "ratings").await != 403 {
        assert!(Instant::now() < deadline, "DENY never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    demo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_refuses_plaintext_and_permissive_accepts_it_without_an_identity() {
    let demo = Demo::start(DemoOptions::fast(180))
        .await
        .expect("the demo starts");
    let central = demo.cluster("central").unwrap();
    let ratings = central
        .workloads
        .iter()
        .find(|w| w.service == "ratings")
        .unwrap();
    let inbound = ratings.sidecar.inbound_addrs()[0];
    // STRICT by default: a plaintext request gets no answer.
    assert!(
        http_get(inbound, "/").await.is_err(),
        "plaintext was served under STRICT"
    );
    apply(&demo, RATINGS_PERMISSIVE).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let reply = loop {
        if let Ok(r) = call_sample(inbound).await {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "PERMISSIVE never accepted plaintext"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(reply.caller, "", "a plaintext caller has no identity");
    // mTLS callers keep working and keep their identity.
    let east = demo.cluster("east").unwrap();
    let vip = vip_of(&east.config.borrow(), "ratings").unwrap();
    assert_eq!(
        call_sample(SocketAddr::new(vip, SAMPLE_PORT))
            .await
            .unwrap()
            .caller,
        east.client_identity().to_string()
    );
    demo.shutdown().await;
}

const DENY_ADMIN: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-no-admin}
spec:
  selector: {matchLabels: {app: ratings}}
  action: DENY
  rules:
  - to:
    - operation: {paths: ["/admin*"]}
"#;

/// `curl --path-as-is` (curl would otherwise clean the path itself): the status and body.
fn curl_as_is(url: &str) -> (u16, String) {
    let (status, _, body) = curl_with(url, &["--path-as-is"]);
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_do_not_get_past_a_deny_rule_and_the_app_sees_the_normalized_path() {
    let demo = Demo::start(DemoOptions::fast(210))
        .await
        .expect("the demo starts");
    let (east, central) = (
        demo.cluster("east").unwrap(),
        demo.cluster("central").unwrap(),
    );
    apply(&demo, DENY_ADMIN).await;
    // Through the mesh (east's sleep → ratings in central, over the gateways), and straight
    // to ratings' inbound port in PERMISSIVE mode, so the destination sidecar alone decides.
    apply(&demo, RATINGS_PERMISSIVE).await;
    let vip = vip_of(&east.config.borrow(), "ratings").unwrap();
    let through_mesh = format!("http://{vip}:{SAMPLE_PORT}");
    let inbound = central
        .workloads
        .iter()
        .find(|w| w.service == "ratings")
        .unwrap()
        .sidecar
        .inbound_addrs()[0];
    let direct = format!("http://{inbound}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while curl_as_is(&format!("{through_mesh}/admin")).0 != 403
        || curl_as_is(&format!("{direct}/admin")).0 != 403
    {
        assert!(Instant::now() < deadline, "the DENY rule never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for base in [&through_mesh, &direct] {
        for trick in [
            "//admin",
            "/./admin",
            "/x/../admin",
            "/%61dmin",
            "/%2e/admin",
            "/x/..%2f../admin",
        ] {
            let (code, body) = curl_as_is(&format!("{base}{trick}"));
            // `%2f` stays escaped (MERGE_SLASHES), so `..%2F..` is one ordinary segment: a
            // path other than /admin, allowed, and the app is sent exactly what the rule saw
            // (it cannot read it as /admin). Every other form is /admin and denied.
            if trick.contains("%2f") {
                let reply: isthmus_demo::sample::SampleReply = serde_json::from_str(&body)
                    .unwrap_or_else(|e| panic!("{base}{trick}: {e}: {body}"));
                assert_eq!(
                    (code, reply.path.as_str()),
                    (200, "/x/..%2F../admin"),
                    "{base}{trick}"
                );
                continue;
            }
            assert_eq!(code, 403, "{base}{trick} got past the DENY rule: {body}");
        }
        // Allowed paths reach the app, normalized.
        let (code, body) = curl_as_is(&format!("{base}/x/./y/../reviews//1"));
        let reply: isthmus_demo::sample::SampleReply =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{base}: {e}: {body}"));
        assert_eq!((code, reply.path.as_str()), (200, "/x/reviews/1"), "{base}");
        // A broken escape is refused with a reason.
        let (code, body) = curl_as_is(&format!("{base}/a%zz"));
        assert_eq!(code, 400, "{base}: {body}");
        assert!(body.contains("percent-encoding"), "{body}");
    }
    demo.shutdown().await;
}

/// `curl` with extra arguments: the status, the `www-authenticate` header and the body.
fn curl_with(url: &str, args: &[&str]) -> (u16, String, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "5", "-D", "-", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (rest, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let challenge = rest
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("www-authenticate")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let body = rest
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_string();
    (code.trim().parse().unwrap_or(0), challenge, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_user_tokens_are_checked_and_their_claims_authorized_in_another_cluster() {
    use isthmus_core::jwt::testing::{jwks, signer, Algorithm};
    let demo = Demo::start(DemoOptions::fast(240))
        .await
        .expect("the demo starts");
    let west = demo.cluster("west").unwrap();
    let idp = signer(Algorithm::ES256, "2026-12");
    let stranger = signer(Algorithm::ES256, "2026-12");
    let iss = "https://idp.example.com";
    // As Istio's JWT task writes it: ratings (in central) accepts the issuer's tokens and
    // admits only end users in group1.
    let policies = format!(
        r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: ratings-jwt}}
spec:
  selector: {{matchLabels: {{app: ratings}}}}
  jwtRules:
  - issuer: {iss}
    jwks: '{}'
    outputClaimToHeaders: [{{header: x-user-group, claim: group}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ratings-users}}
spec:
  selector: {{matchLabels: {{app: ratings}}}}
  action: ALLOW
  rules:
  - from:
    - source: {{requestPrincipals: ["{iss}/*"]}}
    when:
    - key: request.auth.claims[groups]
      values: [group1]
"#,
        jwks(&[&idp])
    );
    apply(&demo, &policies).await;
    let vip = vip_of(&west.config.borrow(), "ratings").unwrap();
    let url = format!("http://{vip}:{SAMPLE_PORT}/ratings/1");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = |signer: &isthmus_core::jwt::testing::Signer, groups: &[&str], exp: u64| {
        signer.token(&serde_json::json!({"iss": iss, "sub": "alice", "exp": exp, "groups": groups}))
    };
    let bearer = |t: &str| format!("Authorization: Bearer {t}");
    let good = token(&idp, &["group1"], now + 600);

    // West's sleep, through both gateways; central's ratings sidecar decides.
    let deadline = Instant::now() + Duration::from_secs(10);
    while curl_with(&url, &[]).0 != 403 {
        assert!(Instant::now() < deadline, "no token was never refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, challenge, body) = curl_with(&url, &["-H", &bearer(&good)]);
    assert_eq!(status, 200, "a group1 token: {body}");
    let (status, _, body) = curl_with(&url, &["-H", &bearer(&token(&idp, &["group2"], now + 600))]);
    assert_eq!(status, 403, "a token without group1: {body}");
    assert!(challenge.is_empty());

    for (what, bad, reason) in [
        (
            "expired",
            token(&idp, &["group1"], now - 600),
            "Jwt is expired",
        ),
        (
            "another key",
            token(&stranger, &["group1"], now + 600),
            "Jwt verification fails",
        ),
        (
            "truncated",
            good[..good.rfind('.').unwrap()].to_string(),
            "Header.Payload.Signature",
        ),
        ("oversized", "a".repeat(20_000), "more than"),
    ] {
        let (status, challenge, body) = curl_with(&url, &["-H", &bearer(&bad)]);
        assert_eq!(status, 401, "{what}: {body}");
        assert!(body.contains(reason), "{what}: {body}");
        assert!(
            challenge.starts_with("Bearer realm=\"http://")
                && challenge.ends_with("error=\"invalid_token\""),
            "{what}: {challenge}"
        );
    }
    // The same token in the access_token parameter works too.
    let (status, _, _) = curl_with(&format!("{url}?access_token={good}"), &[]);
    assert_eq!(status, 200);
    demo.shutdown().await;
}
