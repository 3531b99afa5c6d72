//! Authorization with the caller's real identity across clusters, and mutual TLS modes, in the
//! demo federation: ratings runs in central; callers in east and west reach it through the
//! gateways with their own SPIFFE IDs, which central's sidecar checks.

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
    apply(&demo, "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: ratings}\nspec:\n  selector: {matchLabels: {app: ratings}}\n  mtls: {mode: PERMISSIVE}\n").await;
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
