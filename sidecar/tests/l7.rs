//! The outbound L7 proxy through real sockets: a client sidecar with VIP listeners, server
//! sidecars (mTLS inbound) in front of small test applications, and policies as they arrive
//! on the config stream.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use isthmus_core::ca::CertificateAuthority;
use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::{Endpoint, MeshConfig, MeshService, Protocol};
use isthmus_core::tls::{Identity, TrustBundles};
use isthmus_testkit::mesh;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

const TD: &str = "test.isthmus.local";

/// How a test application behaves.
#[derive(Clone, Default)]
struct Behaviour {
    /// Answer 503 to this many requests first.
    fail_first: u32,
    /// Answer 503 to every request.
    always_fail: bool,
    /// Wait this long before answering the first request only / every request.
    delay_first: Option<Duration>,
    delay_all: Option<Duration>,
}

/// Starts an app answering its `version`, behaving as told; returns its address and hit count.
async fn app(version: &'static str, b: Behaviour) -> (SocketAddr, Arc<AtomicU32>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU32::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (b, counter) = (b.clone(), counter.clone());
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (b, counter) = (b.clone(), counter.clone());
                        async move {
                            let n = counter.fetch_add(1, Ordering::SeqCst);
                            if let Some(d) =
                                b.delay_all.or(if n == 0 { b.delay_first } else { None })
                            {
                                tokio::time::sleep(d).await;
                            }
                            let status = if b.always_fail || n < b.fail_first {
                                503
                            } else {
                                200
                            };
                            let header = |name: &str| {
                                req.headers()
                                    .get(name)
                                    .and_then(|h| h.to_str().ok())
                                    .unwrap_or("")
                                    .to_string()
                            };
                            let body = if req.uri().path() == "/trace" {
                                // What the app sees of the trace context.
                                format!(
                                    "{} {} {} {}",
                                    header("traceparent"),
                                    header("x-b3-traceid"),
                                    header("x-b3-parentspanid"),
                                    header("x-request-id")
                                )
                            } else {
                                format!("{version} {} {}", req.uri().path(), header("host"))
                            };
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

struct Mesh {
    ca: CertificateAuthority,
    trust: Arc<TrustBundles>,
    config: watch::Sender<Arc<MeshConfig>>,
    vip: std::net::IpAddr,
    _sidecars: Vec<isthmus_sidecar::SidecarHandle>,
    pub hits: HashMap<String, Arc<AtomicU32>>,
}

fn identity(ca: &CertificateAuthority, sa: &str) -> Arc<Identity> {
    let id = SpiffeId::new(TD, "default", sa);
    let issued = ca.issue(&id, Duration::from_secs(600)).unwrap();
    Identity::from_pem(id, &issued.cert_chain_pem, &issued.key_pem).unwrap()
}

/// A service `reviews` with one endpoint per (name, version, behaviour), reachable at a VIP
/// `127.<octet>.0.1:9080` through a client sidecar, with `policies` applied.
async fn mesh(
    octet: u8,
    endpoints: Vec<(&'static str, &'static str, Behaviour)>,
    policies: &str,
) -> Mesh {
    mesh_with_log(octet, endpoints, policies, Default::default()).await
}

/// Like [`mesh`], the client sidecar writing access logs to `access_log`.
async fn mesh_with_log(
    octet: u8,
    endpoints: Vec<(&'static str, &'static str, Behaviour)>,
    policies: &str,
    access_log: isthmus_sidecar::observe::AccessLogTarget,
) -> Mesh {
    isthmus_core::install_crypto_provider();
    let ca = CertificateAuthority::generate(TD).unwrap();
    let trust = TrustBundles::new();
    trust.replace([(TD, ca.cert_pem())]).unwrap();
    let vip: std::net::IpAddr = format!("127.{octet}.0.1").parse().unwrap();
    let (tx, rx) = watch::channel(Arc::new(MeshConfig::default()));
    let mut sidecars = Vec::new();
    let mut eps = Vec::new();
    let mut hits = HashMap::new();
    for (name, version, b) in endpoints {
        let (addr, counter) = app(version, b).await;
        hits.insert(name.to_string(), counter);
        let sc = isthmus_sidecar::start(
            isthmus_sidecar::SidecarOptions {
                cluster: "test".into(),
                identity: identity(&ca, "reviews"),
                trust: trust.clone(),
                labels: BTreeMap::from([("app".to_string(), "reviews".to_string())]),
                outbound: false,
                inbound: vec![isthmus_sidecar::InboundPort {
                    listen: "127.0.0.1:0".parse().unwrap(),
                    forward_to: addr,
                    protocol: Protocol::Http,
                }],
                gateway: None,
                connect_timeout: Duration::from_secs(2),
                metrics: Default::default(),
                access_log: Default::default(),
                path_normalization: Default::default(),
                limits: Default::default(),
            },
            rx.clone(),
        )
        .await
        .unwrap();
        eps.push(Endpoint {
            address: sc.inbound_addrs()[0],
            labels: BTreeMap::from([("version".to_string(), version.to_string())]),
            identity: SpiffeId::new(TD, "default", "reviews").to_string(),
            healthy: true,
            ports: Default::default(),
        });
        sidecars.push(sc);
    }
    let client = isthmus_sidecar::start(
        isthmus_sidecar::SidecarOptions {
            cluster: "test".into(),
            identity: identity(&ca, "sleep"),
            trust: trust.clone(),
            labels: BTreeMap::new(),
            outbound: true,
            inbound: vec![],
            gateway: None,
            connect_timeout: Duration::from_secs(2),
            metrics: Default::default(),
            access_log,
            path_normalization: Default::default(),
            limits: Default::default(),
        },
        rx.clone(),
    )
    .await
    .unwrap();
    sidecars.push(client);
    let config = MeshConfig {
        version: 1,
        cluster: "test".into(),
        services: vec![MeshService {
            local_endpoints: eps,
            ..mesh::served(TD, "reviews", vip, &[("http", 9080, Protocol::Http)], &[])
        }],
        clusters: vec![mesh::member("test", TD, ca.cert_pem())],
        policies: isthmus_core::policy::parse_documents("test.yaml", policies).unwrap(),
    };
    tx.send_replace(Arc::new(config));
    let m = Mesh {
        ca,
        trust,
        config: tx,
        vip,
        _sidecars: sidecars,
        hits,
    };
    // Wait for the VIP listener.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect((m.vip, 9080)).await.is_err() {
        assert!(Instant::now() < deadline, "the VIP listener never came up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    m
}

/// One GET through the VIP: (status, body, headers as text).
async fn get(m: &Mesh, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut tcp = tokio::net::TcpStream::connect((m.vip, 9080)).await.unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(20), tcp.read_to_string(&mut raw))
        .await
        .expect("an answer")
        .unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string(), head.to_ascii_lowercase())
}

const DR: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec:\n  host: reviews\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n";

fn vs(http: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews}}\nspec:\n  hosts: [reviews]\n  http:\n{http}---\n{DR}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_weights_split_requests_within_tolerance() {
    let m = mesh(
        71,
        vec![("a", "v1", Behaviour::default()), ("b", "v2", Behaviour::default())],
        &vs("  - route:\n    - {destination: {host: reviews, subset: v1}, weight: 75}\n    - {destination: {host: reviews, subset: v2}, weight: 25}\n"),
    )
    .await;
    let n = 400;
    let mut v2 = 0;
    for _ in 0..n {
        let (status, body, _) = get(&m, "/", &[]).await;
        assert_eq!(status, 200, "{body}");
        if body.starts_with("v2") {
            v2 += 1;
        }
    }
    // 25% of 400 = 100; binomial sd ≈ 8.7, so ±35 is four standard deviations.
    assert!((65..=135).contains(&v2), "v2 got {v2} of {n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_matched_routing_sends_the_user_to_its_subset() {
    let m = mesh(
        72,
        vec![("a", "v1", Behaviour::default()), ("b", "v2", Behaviour::default())],
        &vs("  - match: [{headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: reviews, subset: v2}}]\n  - route: [{destination: {host: reviews, subset: v1}}]\n"),
    )
    .await;
    for _ in 0..10 {
        assert!(get(&m, "/", &[("end-user", "jason")])
            .await
            .1
            .starts_with("v2"));
        assert!(get(&m, "/", &[("end-user", "alice")])
            .await
            .1
            .starts_with("v1"));
        assert!(get(&m, "/", &[]).await.1.starts_with("v1"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_turn_injected_503s_into_successes() {
    let m = mesh(
        73,
        vec![("flaky", "v1", Behaviour { fail_first: 2, ..Default::default() })],
        &vs("  - route: [{destination: {host: reviews}}]\n    retries: {attempts: 3, retryOn: 5xx}\n"),
    )
    .await;
    let (status, body, _) = get(&m, "/", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        m.hits["flaky"].load(Ordering::SeqCst),
        3,
        "two failures then a success"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_retries_on_5xx_the_caller_sees_the_503() {
    let m = mesh(
        74,
        vec![(
            "flaky",
            "v1",
            Behaviour {
                fail_first: 1,
                ..Default::default()
            },
        )],
        &vs("  - route: [{destination: {host: reviews}}]\n"),
    )
    .await;
    assert_eq!(get(&m, "/", &[]).await.0, 503);
    assert_eq!(get(&m, "/", &[]).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_try_timeout_moves_on_to_the_next_attempt() {
    let m = mesh(
        75,
        vec![("slow-once", "v1", Behaviour { delay_first: Some(Duration::from_secs(3)), ..Default::default() })],
        &vs("  - route: [{destination: {host: reviews}}]\n    retries: {attempts: 2, perTryTimeout: 200ms, retryOn: 5xx}\n"),
    )
    .await;
    let t = Instant::now();
    let (status, body, _) = get(&m, "/", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_answers_504() {
    let m = mesh(
        76,
        vec![(
            "slow",
            "v1",
            Behaviour {
                delay_all: Some(Duration::from_secs(2)),
                ..Default::default()
            },
        )],
        &vs("  - route: [{destination: {host: reviews}}]\n    timeout: 300ms\n"),
    )
    .await;
    let t = Instant::now();
    assert_eq!(get(&m, "/", &[]).await.0, 504);
    assert!(t.elapsed() < Duration::from_millis(1500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_delay_and_abort_apply_by_route() {
    let m = mesh(
        77,
        vec![("a", "v1", Behaviour::default())],
        &vs("  - match: [{headers: {end-user: {exact: jason}}}]\n    fault: {delay: {percentage: {value: 100}, fixedDelay: 400ms}}\n    route: [{destination: {host: reviews}}]\n  - fault: {abort: {percentage: {value: 100.0}, httpStatus: 500}}\n    route: [{destination: {host: reviews}}]\n"),
    )
    .await;
    let t = Instant::now();
    let (status, _, _) = get(&m, "/", &[("end-user", "jason")]).await;
    assert_eq!(status, 200);
    assert!(t.elapsed() >= Duration::from_millis(400));
    let (status, body, _) = get(&m, "/", &[]).await;
    assert_eq!((status, body.trim()), (500, "fault filter abort"));
    assert_eq!(
        m.hits["a"].load(Ordering::SeqCst),
        1,
        "the aborted request never reached the app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_a_failing_endpoint_and_lets_it_return() {
    let policies = format!(
        "{DR}  trafficPolicy:\n    outlierDetection: {{consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 1s, maxEjectionPercent: 100}}\n"
    );
    let m = mesh(
        78,
        vec![
            ("good", "v1", Behaviour::default()),
            (
                "bad",
                "v1",
                Behaviour {
                    always_fail: true,
                    ..Default::default()
                },
            ),
        ],
        &policies,
    )
    .await;
    for _ in 0..10 {
        get(&m, "/", &[]).await;
    }
    let bad_before = m.hits["bad"].load(Ordering::SeqCst);
    assert!(
        bad_before <= 3,
        "the failing endpoint got {bad_before} of 10 before ejection"
    );
    for _ in 0..20 {
        assert_eq!(
            get(&m, "/", &[]).await.0,
            200,
            "ejected endpoint still receiving traffic"
        );
    }
    assert_eq!(m.hits["bad"].load(Ordering::SeqCst), bad_before);
    // After the ejection time it gets traffic again (and is ejected again, for longer).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..6 {
        get(&m, "/", &[]).await;
    }
    assert!(
        m.hits["bad"].load(Ordering::SeqCst) > bad_before,
        "the endpoint never returned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_overflow_is_answered_503_at_once() {
    let policies = format!(
        "{DR}  trafficPolicy:\n    connectionPool: {{tcp: {{maxConnections: 1}}, http: {{http1MaxPendingRequests: 1}}}}\n"
    );
    let m = Arc::new(
        mesh(
            79,
            vec![(
                "slow",
                "v1",
                Behaviour {
                    delay_all: Some(Duration::from_millis(600)),
                    ..Default::default()
                },
            )],
            &policies,
        )
        .await,
    );
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let m = m.clone();
        tasks.push(tokio::spawn(async move { get(&m, "/", &[]).await }));
    }
    let mut ok = 0;
    let mut overflow = 0;
    for t in tasks {
        let (status, _, head) = t.await.unwrap();
        match status {
            200 => ok += 1,
            503 => {
                assert!(head.contains("x-envoy-overloaded: true"), "{head}");
                overflow += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    // One in flight plus one pending succeed; the rest overflow.
    assert_eq!((ok, overflow), (2, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_and_rewrites_change_what_the_app_sees() {
    let m = mesh(
        80,
        vec![("a", "v1", Behaviour::default())],
        &vs("  - match: [{uri: {prefix: /old}}]\n    redirect: {uri: /new}\n  - match: [{uri: {prefix: /v1/}}]\n    rewrite: {uri: /, authority: reviews-internal}\n    route: [{destination: {host: reviews}}]\n  - route: [{destination: {host: reviews}}]\n"),
    )
    .await;
    let (status, _, head) = get(&m, "/old/page", &[]).await;
    assert_eq!(status, 301);
    assert!(head.contains("location: http://reviews/new"), "{head}");
    let (_, body, _) = get(&m, "/v1/ratings", &[]).await;
    assert_eq!(body, "v1 /ratings reviews-internal");
    let _ = (&m.ca, &m.trust, &m.config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_rate_limiting_answers_429_once_the_bucket_is_empty() {
    let policies = format!(
        "{DR}---\napiVersion: isthmus.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: reviews}}\nspec:\n  host: reviews\n  tokenBucket: {{maxTokens: 3, tokensPerFill: 3, fillInterval: 60s}}\n"
    );
    let m = mesh(81, vec![("a", "v1", Behaviour::default())], &policies).await;
    for _ in 0..3 {
        assert_eq!(get(&m, "/", &[]).await.0, 200);
    }
    let (status, body, head) = get(&m, "/", &[]).await;
    assert_eq!((status, body.trim()), (429, "local_rate_limited"));
    assert!(head.contains("x-envoy-ratelimited: true"), "{head}");
    assert_eq!(
        m.hits["a"].load(Ordering::SeqCst),
        3,
        "limited requests never reach the app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_is_propagated_and_every_request_is_access_logged_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let m = mesh_with_log(
        82,
        vec![("a", "v1", Behaviour::default())],
        "",
        isthmus_sidecar::observe::AccessLogTarget::File(log.clone()),
    )
    .await;
    // No context: the sidecar starts a trace, in both formats, with a request id.
    let (status, body, _) = get(&m, "/trace", &[]).await;
    assert_eq!(status, 200, "{body}");
    let seen: Vec<&str> = body.split(' ').collect();
    let tp: Vec<&str> = seen[0].split('-').collect();
    assert_eq!(tp.len(), 4, "{body}");
    assert_eq!(
        tp[1], seen[1],
        "traceparent and B3 carry one trace id: {body}"
    );
    assert_eq!(seen[2], "", "a new trace has no parent span: {body}");
    assert_eq!(seen[3].len(), 32, "{body}");
    // The caller's context: same trace, the caller's span as parent, its request id kept.
    let (_, body, _) = get(
        &m,
        "/trace",
        &[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("x-request-id", "req-42"),
        ],
    )
    .await;
    let seen: Vec<&str> = body.split(' ').collect();
    assert!(
        seen[0].starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{body}"
    );
    assert!(
        !seen[0].contains("00f067aa0ba902b7"),
        "the sidecar's own span: {body}"
    );
    assert_eq!(seen[1], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(seen[2], "00f067aa0ba902b7");
    assert_eq!(seen[3], "req-42");

    // One JSON line per request, with Envoy's field names.
    let deadline = Instant::now() + Duration::from_secs(5);
    let lines = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        if lines.len() >= 2 {
            break lines;
        }
        assert!(Instant::now() < deadline, "access log: {text:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let second = &lines[1];
    assert_eq!(second["method"], "GET");
    assert_eq!(second["path"], "/trace");
    assert_eq!(second["response_code"], 200);
    assert_eq!(second["response_flags"], "-");
    assert_eq!(second["x_request_id"], "req-42");
    assert_eq!(second["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(
        second["upstream_service"],
        "reviews.default.svc.cluster.local"
    );
    assert_eq!(second["upstream_cluster"], "test");
    assert!(second["start_time"].as_str().unwrap().ends_with('Z'));
    assert!(second["source_principal"]
        .as_str()
        .unwrap()
        .ends_with("/ns/default/sa/sleep"));
}

/// Writes `head` to the VIP and reads until the sidecar answers or closes: (status line, or
/// "" when it closed without answering; how long it took).
async fn send_head(m: &Mesh, head: &[u8]) -> (String, Duration) {
    let mut tcp = tokio::net::TcpStream::connect((m.vip, 9080)).await.unwrap();
    let started = Instant::now();
    // The sidecar may answer and close before the whole head is written.
    let _ = tcp.write_all(head).await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut raw))
        .await
        .expect("the sidecar answers or closes");
    let text = String::from_utf8_lossy(&raw);
    (
        text.lines().next().unwrap_or("").to_string(),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_request_heads_are_cut_off_without_affecting_other_clients() {
    let m = mesh(83, vec![("a", "v1", Behaviour::default())], "").await;

    // Too many header fields, one huge header, a huge request line: 431, at once.
    let mut many = String::from("GET / HTTP/1.1\r\nhost: reviews\r\n");
    for i in 0..150 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let huge_header = format!(
        "GET / HTTP/1.1\r\nhost: reviews\r\nx-big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let huge_line = format!(
        "GET /{} HTTP/1.1\r\nhost: reviews\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    for (what, head) in [
        ("150 header fields", many),
        ("a 70 KiB header", huge_header),
        ("a 70 KiB request line", huge_line),
    ] {
        let (status, took) = send_head(&m, head.as_bytes()).await;
        assert!(status.contains(" 431 "), "{what}: {status:?}");
        assert!(took < Duration::from_secs(2), "{what}: {took:?}");
    }

    // Slowloris: a head that never ends, one header every 500 ms. The sidecar closes the
    // connection once the head has taken 10 s; meanwhile other clients are served at once.
    let slow = tokio::spawn({
        let vip = m.vip;
        async move {
            let mut tcp = tokio::net::TcpStream::connect((vip, 9080)).await.unwrap();
            let started = Instant::now();
            tcp.write_all(b"GET / HTTP/1.1\r\nhost: reviews\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 1024];
            for i in 0..60 {
                tokio::select! {
                    read = tcp.read(&mut buf) => {
                        let answered = matches!(read, Ok(n) if n > 0)
                            .then(|| String::from_utf8_lossy(&buf[..read.unwrap_or(0)]).to_string());
                        return (started.elapsed(), answered);
                    }
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {
                        if tcp.write_all(format!("x-slow{i}: v\r\n").as_bytes()).await.is_err() {
                            return (started.elapsed(), None);
                        }
                    }
                }
            }
            panic!("the slow client was never cut off");
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..5 {
        let started = Instant::now();
        let (status, _, _) = get(&m, "/", &[]).await;
        assert_eq!(status, 200);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    let (cut_after, answered) = slow.await.unwrap();
    assert!(
        cut_after >= Duration::from_secs(9) && cut_after < Duration::from_secs(15),
        "the slow head was cut off after {cut_after:?} ({answered:?})"
    );
    // Nothing slow reached the application.
    assert_eq!(m.hits["a"].load(Ordering::SeqCst), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflights_are_answered_by_the_sidecar_and_allowed_responses_decorated() {
    let policies = vs("  - corsPolicy:\n      allowOrigins: [{exact: \"https://shop.example\"}]\n      allowMethods: [GET, POST]\n      allowHeaders: [x-token]\n      exposeHeaders: [x-version]\n      maxAge: 1h\n      allowCredentials: true\n    route:\n    - destination: {host: reviews, subset: v1}\n");
    let m = mesh(84, vec![("a", "v1", Behaviour::default())], &policies).await;

    // The browser's preflight: answered at once, the application never sees it.
    let mut tcp = tokio::net::TcpStream::connect((m.vip, 9080)).await.unwrap();
    tcp.write_all(b"OPTIONS /reviews HTTP/1.1\r\nhost: reviews\r\norigin: https://shop.example\r\naccess-control-request-method: POST\r\naccess-control-request-headers: x-token\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    let head = raw.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{raw}");
    for line in [
        "access-control-allow-origin: https://shop.example",
        "access-control-allow-methods: get,post",
        "access-control-allow-headers: x-token",
        "access-control-max-age: 3600",
        "access-control-allow-credentials: true",
    ] {
        assert!(head.contains(line), "{line} missing: {raw}");
    }
    assert_eq!(m.hits["a"].load(Ordering::SeqCst), 0);

    // The actual request from that origin reaches the app; its response carries the headers.
    let (status, _, head) = get(&m, "/reviews", &[("origin", "https://shop.example")]).await;
    assert_eq!(status, 200);
    assert!(
        head.contains("access-control-allow-origin: https://shop.example"),
        "{head}"
    );
    assert!(
        head.contains("access-control-expose-headers: x-version"),
        "{head}"
    );
    // Another origin gets the response without them (the browser then withholds it).
    let (status, _, head) = get(&m, "/reviews", &[("origin", "https://evil.example")]).await;
    assert_eq!(status, 200);
    assert!(!head.contains("access-control-allow-origin"), "{head}");
    assert_eq!(m.hits["a"].load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_response_is_answered_by_the_sidecar() {
    let policies = vs("  - match:\n    - uri: {prefix: /maintenance}\n    directResponse:\n      status: 503\n      body: {string: \"back soon\"}\n  - route:\n    - destination: {host: reviews, subset: v1}\n");
    let m = mesh(85, vec![("a", "v1", Behaviour::default())], &policies).await;
    let (status, body, _) = get(&m, "/maintenance/now", &[]).await;
    assert_eq!((status, body.as_str()), (503, "back soon"));
    assert_eq!(m.hits["a"].load(Ordering::SeqCst), 0);
    let (status, _, _) = get(&m, "/reviews", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(m.hits["a"].load(Ordering::SeqCst), 1);
}
