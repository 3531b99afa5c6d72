//! Istio's Bookinfo routing documents, applied once through one cluster's control plane, take
//! effect in every cluster of the demo federation. reviews v1 runs in east, v2 in west and v3
//! in central, so subset routing crosses clusters through the gateways.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use isthmus_core::policy::parse_documents;
use isthmus_demo::probe::{call_sample, http_get};
use isthmus_demo::sample::SampleReply;
use isthmus_demo::{vip_of, Demo, DemoCluster, DemoOptions, SAMPLE_PORT};

/// Applies a file from examples/bookinfo through `via`'s control plane and waits until every
/// cluster's client sidecar has the resulting policies.
async fn apply(demo: &Demo, via: &DemoCluster, file: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/bookinfo")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let policies = parse_documents(file, &text).unwrap();
    let client = via.control.client();
    client.apply(&policies, false).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    for c in &demo.clusters {
        loop {
            let have = c.config.borrow().policies.clone();
            if policies.iter().all(|p| have.contains(p)) {
                break;
            }
            assert!(Instant::now() < deadline, "{file} never reached {}", c.name);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn call(
    c: &DemoCluster,
    service: &str,
    headers: &[(&str, &str)],
) -> (u16, Option<SampleReply>) {
    let vip = vip_of(&c.config.borrow(), service).unwrap();
    let addr = SocketAddr::new(vip, SAMPLE_PORT);
    if headers.is_empty() {
        return match call_sample(addr).await {
            Ok(r) => (200, Some(r)),
            Err(_) => (http_get(addr, "/").await.map(|r| r.0).unwrap_or(0), None),
        };
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("GET / HTTP/1.1\r\nhost: {service}\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookinfo_routing_documents_take_effect_across_the_federation() {
    let demo = Demo::start(DemoOptions::fast(150))
        .await
        .expect("the demo starts");
    let east = demo.cluster("east").unwrap();
    let west = demo.cluster("west").unwrap();

    // All to v1: reviews v1 only runs in east, so west's callers cross to east.
    apply(&demo, east, "destination-rule-all-mtls.yaml").await;
    apply(&demo, east, "virtual-service-all-v1.yaml").await;
    for _ in 0..10 {
        let (status, reply) = call(west, "reviews", &[]).await;
        let reply = reply.unwrap_or_else(|| panic!("status {status}"));
        assert_eq!(
            (reply.version.as_str(), reply.cluster.as_str()),
            ("v1", "east")
        );
        assert_eq!(reply.caller, west.client_identity().to_string());
    }

    // 50/50 between v2 (west) and v3 (central), applied through west's control plane by
    // west's admin, once east's mesh admin has made it a mesh admin too.
    demo.grant_mesh_admin("west").await.unwrap();
    apply(&demo, west, "virtual-service-reviews-v2-v3.yaml").await;
    let (mut v2, mut v3) = (0, 0);
    for _ in 0..200 {
        let reply = call(east, "reviews", &[]).await.1.expect("a reply");
        match (reply.version.as_str(), reply.cluster.as_str()) {
            ("v2", "west") => v2 += 1,
            ("v3", "central") => v3 += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    // 100 expected each; binomial sd ≈ 7.1, so ±30 is over four standard deviations.
    assert!((70..=130).contains(&v2), "v2 {v2}, v3 {v3}");

    // jason sees v2, everyone else v1.
    apply(&demo, east, "virtual-service-reviews-test-v2.yaml").await;
    for _ in 0..5 {
        assert_eq!(
            call(east, "reviews", &[("end-user", "jason")])
                .await
                .1
                .unwrap()
                .version,
            "v2"
        );
        assert_eq!(
            call(east, "reviews", &[("end-user", "alice")])
                .await
                .1
                .unwrap()
                .version,
            "v1"
        );
    }

    // ratings aborts jason's calls with 500; others succeed.
    apply(&demo, east, "virtual-service-ratings-test-abort.yaml").await;
    assert_eq!(call(west, "ratings", &[("end-user", "jason")]).await.0, 500);
    assert_eq!(call(west, "ratings", &[("end-user", "alice")]).await.0, 200);

    // A 7 s delay for jason.
    apply(&demo, east, "virtual-service-ratings-test-delay.yaml").await;
    let t = Instant::now();
    let (status, _) = call(east, "ratings", &[("end-user", "jason")]).await;
    assert_eq!(status, 200);
    assert!(t.elapsed() >= Duration::from_secs(7), "{:?}", t.elapsed());
    let t = Instant::now();
    assert_eq!(call(east, "ratings", &[]).await.0, 200);
    assert!(t.elapsed() < Duration::from_secs(2));
    demo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_document_changes_nothing_already_stored() {
    let demo = Demo::start(DemoOptions::fast(160))
        .await
        .expect("the demo starts");
    let east = demo.cluster("east").unwrap();
    apply(&demo, east, "virtual-service-all-v1.yaml").await;
    let client = east.control.client();
    let before = client.get_policies(None, None, None).await.unwrap();
    // A valid document followed by an invalid one (bad weights): the valid one must not land
    // either. The server validates on its own, whatever the client did.
    let mut docs = parse_documents(
        "x.yaml",
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples/bookinfo/virtual-service-reviews-v2-v3.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut bad = docs[0].clone();
    bad.name = "broken".into();
    if let isthmus_core::policy::Spec::VirtualService(vs) = &mut bad.spec {
        vs.http[0].route[0].weight = Some(10);
    }
    docs.push(bad);
    let err = client.apply(&docs, false).await.unwrap_err().to_string();
    assert!(
        err.contains("document 2") && err.contains("add up to 60"),
        "{err}"
    );
    assert_eq!(client.get_policies(None, None, None).await.unwrap(), before);
    demo.shutdown().await;
}
