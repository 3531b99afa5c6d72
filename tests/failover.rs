//! Global failover, whole federations in one process under load: local endpoints dying and
//! returning, a remote gateway dying, and a control plane cut off from the federation with
//! each `onPartition` mode. The demo's localities: east and central share a region, west is
//! far; reviews runs in all three.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use isthmus_core::policy::parse_documents;
use isthmus_demo::probe::http_get;
use isthmus_demo::sample::SampleReply;
use isthmus_demo::{vip_of, Demo, DemoCluster, DemoOptions, SAMPLE_PORT};
use tokio::sync::watch;

fn options(vip_octet: u8) -> DemoOptions {
    DemoOptions {
        export_lease: Duration::from_secs(1),
        ..DemoOptions::fast(vip_octet)
    }
}

/// Applies `yaml` through `via` and waits until every cluster's client has it.
async fn apply(demo: &Demo, via: &str, yaml: &str) {
    apply_to(demo, via, yaml, &["east", "west", "central"]).await
}

/// Applies `yaml` through `via` and waits until the clients of `clusters` have it.
async fn apply_to(demo: &Demo, via: &str, yaml: &str, clusters: &[&str]) {
    let policies = parse_documents("test.yaml", yaml).unwrap();
    let client = demo.cluster(via).unwrap().control.client();
    client.apply(&policies, false).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    for c in demo
        .clusters
        .iter()
        .filter(|c| clusters.contains(&c.name.as_str()))
    {
        while !policies
            .iter()
            .all(|p| c.config.borrow().policies.contains(p))
        {
            assert!(
                Instant::now() < deadline,
                "policies never reached {}",
                c.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn failover_policy(extra: &str) -> String {
    format!(
        "apiVersion: isthmus.io/v1alpha1\nkind: FailoverPolicy\nmetadata: {{name: reviews, namespace: default}}\n\
         spec:\n  service: reviews\n{extra}"
    )
}

fn retries(attempts: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: default}}\n\
         spec:\n  hosts: [reviews]\n  http:\n  - route: [{{destination: {{host: reviews}}}}]\n    retries: {{attempts: {attempts}, retryOn: \"connect-failure,reset,503\"}}\n"
    )
}

fn reviews(c: &DemoCluster) -> SocketAddr {
    SocketAddr::new(vip_of(&c.config.borrow(), "reviews").unwrap(), SAMPLE_PORT)
}

/// One call: the cluster that answered, or what went wrong.
async fn call(addr: SocketAddr) -> Result<String, String> {
    match http_get(addr, "/").await {
        Ok((200, body)) => serde_json::from_str::<SampleReply>(&body)
            .map(|r| r.cluster)
            .map_err(|e| format!("bad reply {body}: {e}")),
        Ok((status, body)) => Err(format!("HTTP {status}: {}", body.trim())),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// Waits until a call from `addr` is answered by `cluster`.
async fn until_served_by(addr: SocketAddr, cluster: &str, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        let got = call(addr).await;
        if got.as_deref() == Ok(cluster) {
            return Instant::now();
        }
        if Instant::now() >= deadline {
            panic!("never served by {cluster}; last: {got:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

type Log = Arc<Mutex<Vec<(Instant, Result<String, String>)>>>;

/// A steady stream of calls (one every 5 ms, bounded to 60 s), logged with their time.
struct Load {
    log: Log,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let log: Log = Arc::default();
        let (stop, mut stopped) = watch::channel(false);
        let l = log.clone();
        let task = tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(60);
            let mut every = tokio::time::interval(Duration::from_millis(5));
            while Instant::now() < end {
                tokio::select! {
                    _ = stopped.changed() => return,
                    _ = every.tick() => {}
                }
                let r = call(addr).await;
                l.lock().unwrap().push((Instant::now(), r));
            }
        });
        Load { log, stop, task }
    }

    fn since(&self, t: Instant) -> Vec<(Instant, Result<String, String>)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at >= t)
            .cloned()
            .collect()
    }

    /// Waits until `n` calls finished after `t`.
    async fn wait_calls(&self, t: Instant, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.since(t).len() < n {
            assert!(Instant::now() < deadline, "the load stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        self.task.await.unwrap();
    }
}

fn errors(calls: &[(Instant, Result<String, String>)]) -> Vec<(Instant, String)> {
    calls
        .iter()
        .filter_map(|(t, r)| r.as_ref().err().map(|e| (*t, e.clone())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_endpoints_die_traffic_fails_over_and_comes_home_after_the_hysteresis() {
    let mut demo = Demo::start(options(210)).await.expect("the demo starts");
    apply(
        &demo,
        "east",
        &format!(
            "{}---\n{}",
            failover_policy("  hysteresis: 2s\n"),
            retries(3)
        ),
    )
    .await;
    let addr = reviews(demo.cluster("east").unwrap());
    until_served_by(addr, "east", Duration::from_secs(10)).await;

    // With retries: every local reviews endpoint dies under load; nobody sees an error.
    let load = Load::start(addr);
    load.wait_calls(Instant::now(), 20).await;
    let east = demo.clusters.iter_mut().find(|c| c.name == "east").unwrap();
    let killed = Instant::now();
    let stopped = east.kill_workloads("reviews").await;
    load.wait_calls(killed + Duration::from_millis(600), 20)
        .await;
    let after = load.since(killed);
    assert!(
        errors(&after).is_empty(),
        "callers saw errors: {:?}",
        errors(&after)
    );
    let settled: Vec<&String> = after
        .iter()
        .filter(|(t, _)| *t > killed + Duration::from_millis(500))
        .map(|(_, r)| r.as_ref().unwrap())
        .collect();
    assert!(!settled.is_empty());
    assert!(
        settled.iter().all(|c| *c == "central"),
        "the nearest priority (central, same region) takes the traffic: {settled:?}"
    );

    // They come back: traffic returns only after the 2 s hysteresis.
    let east = demo.clusters.iter_mut().find(|c| c.name == "east").unwrap();
    let revived = Instant::now();
    east.revive_workloads(&stopped).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let home = loop {
        let first_home = load
            .since(revived)
            .into_iter()
            .find(|(_, r)| r.as_deref() == Ok("east"));
        if let Some((t, _)) = first_home {
            break t;
        }
        assert!(Instant::now() < deadline, "traffic never came home");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let waited = home - revived;
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(5),
        "came home {waited:?} after the endpoints returned (hysteresis 2s)"
    );
    let during = load.since(revived);
    assert!(errors(&during).is_empty(), "{:?}", errors(&during));
    load.wait_calls(home, 20).await;
    let after_home: Vec<_> = load.since(home + Duration::from_millis(200));
    assert!(after_home.iter().all(|(_, r)| r.as_deref() == Ok("east")));

    // Without retries the error window is what the caller sees; it stays under a second.
    apply(&demo, "east", &retries(0)).await;
    let east = demo.clusters.iter_mut().find(|c| c.name == "east").unwrap();
    let killed = Instant::now();
    east.kill_workloads("reviews").await;
    load.wait_calls(killed + Duration::from_millis(1200), 20)
        .await;
    let errs = errors(&load.since(killed));
    let window = errs.last().map(|(t, _)| *t - killed).unwrap_or_default();
    eprintln!(
        "without retries: {} failed requests, error window {window:?}",
        errs.len()
    );
    assert!(
        window < Duration::from_secs(1),
        "error window {window:?}: {errs:?}"
    );
    load.stop().await;

    // `isthmus explain` material: the client sidecar's table says why.
    let tables = demo.cluster("east").unwrap().client.failover_tables();
    let table = &tables["reviews.default"];
    let text = isthmus_core::failover::render(table, "east");
    assert!(text.contains("FailoverPolicy default/reviews"), "{text}");
    assert!(text.contains("* priority 1"), "{text}");
    assert!(text.contains("is down"), "{text}");

    // The same through the CLI, asked of central's control plane about east's sidecars (it
    // forwards to east's): as soon as the client sidecar has reported.
    let central = demo.cluster("central").unwrap();
    let central_control = central.control.grpc_addr().to_string();
    let central_ca = central.ca_file.display().to_string();
    // Central's operator admin reads; its control plane asks east's as itself.
    let (cert, key) = (
        central.admin_credential.0.display().to_string(),
        central.admin_credential.1.display().to_string(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let (control, ca) = (central_control.clone(), central_ca.clone());
        let (cert, key) = (cert.clone(), key.clone());
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_isthmus"))
                .args([
                    "explain",
                    "reviews",
                    "--from",
                    "east",
                    "--control",
                    &control,
                    "--ca-file",
                    &ca,
                    "--cert",
                    &cert,
                    "--key",
                    &key,
                ])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && text.contains("sidecar/sleep") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "explain never showed the client sidecar's table: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        out.contains("service reviews.default from cluster east"),
        "{out}"
    );
    assert!(out.contains("FailoverPolicy default/reviews"), "{out}");
    let unknown = std::process::Command::new(env!("CARGO_BIN_EXE_isthmus"))
        .args([
            "explain",
            "reviews",
            "--from",
            "nowhere",
            "--control",
            &central_control,
            "--ca-file",
            &central_ca,
            "--cert",
            &cert,
            "--key",
            &key,
        ])
        .output()
        .unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no cluster named \"nowhere\""));
    demo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_remote_gateway_drains_to_the_next_priority_within_a_second() {
    let mut demo = Demo::start(options(214)).await.expect("the demo starts");
    apply(&demo, "east", &failover_policy("  hysteresis: 1s\n")).await;
    let addr = reviews(demo.cluster("east").unwrap());
    let east = demo.clusters.iter_mut().find(|c| c.name == "east").unwrap();
    east.kill_workloads("reviews").await;
    until_served_by(addr, "central", Duration::from_secs(10)).await;

    let load = Load::start(addr);
    load.wait_calls(Instant::now(), 20).await;
    let central = demo
        .clusters
        .iter_mut()
        .find(|c| c.name == "central")
        .unwrap();
    let killed = Instant::now();
    central.kill_gateway().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let drained = loop {
        if let Some((t, _)) = load
            .since(killed)
            .into_iter()
            .find(|(_, r)| r.as_deref() == Ok("west"))
        {
            break t;
        }
        assert!(Instant::now() < deadline, "never drained to west");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    load.wait_calls(drained, 50).await;
    let errs = errors(&load.since(killed));
    eprintln!(
        "gateway death: drained after {:?}, {} failed requests",
        drained - killed,
        errs.len()
    );
    assert!(
        drained - killed < Duration::from_millis(1500),
        "drained after {:?}",
        drained - killed
    );
    let tail = load.since(drained + Duration::from_millis(100));
    assert!(
        tail.iter().all(|(_, r)| r.as_deref() == Ok("west")),
        "{tail:?}"
    );
    load.stop().await;
    demo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_cut_off_from_the_federation_is_handled_as_on_partition_says() {
    let mut demo = Demo::start(options(218)).await.expect("the demo starts");
    apply(
        &demo,
        "east",
        &failover_policy("  hysteresis: 500ms\n  onPartition: keepLastKnown\n"),
    )
    .await;
    let east_addr = reviews(demo.cluster("east").unwrap());
    let central_ratings = SocketAddr::new(
        vip_of(&demo.cluster("central").unwrap().config.borrow(), "ratings").unwrap(),
        SAMPLE_PORT,
    );
    let east = demo.clusters.iter_mut().find(|c| c.name == "east").unwrap();
    east.kill_workloads("reviews").await;
    until_served_by(east_addr, "central", Duration::from_secs(10)).await;

    // Central's control plane goes away (its federation member stays): its data plane keeps
    // serving from its last configuration for the rest of the test.
    let central_load = Load::start(central_ratings);
    let central = demo
        .clusters
        .iter_mut()
        .find(|c| c.name == "central")
        .unwrap();
    let stopped = Instant::now();
    central.stop_control().await;
    let east_config = demo.cluster("east").unwrap().config.clone();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let lapsed = east_config
            .borrow()
            .service("default", "reviews")
            .and_then(|s| s.remote.iter().find(|r| r.cluster == "central"))
            .is_some_and(|r| r.lease_expired_at_ms.is_some());
        if lapsed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "central's export lease never lapsed in east's view"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "central's lease lapsed in east's view {:?} after its control plane stopped",
        stopped.elapsed()
    );

    // keepLastKnown: east keeps using central.
    for _ in 0..10 {
        assert_eq!(call(east_addr).await.as_deref(), Ok("central"));
    }
    // withdrawAfter, not yet due: still central; due: west.
    apply_to(
        &demo,
        "east",
        &failover_policy("  hysteresis: 500ms\n  onPartition: {withdrawAfter: 60s}\n"),
        &["east", "west"],
    )
    .await;
    for _ in 0..10 {
        assert_eq!(call(east_addr).await.as_deref(), Ok("central"));
    }
    apply_to(
        &demo,
        "east",
        &failover_policy("  hysteresis: 500ms\n  onPartition: {withdrawAfter: 500ms}\n"),
        &["east", "west"],
    )
    .await;
    until_served_by(east_addr, "west", Duration::from_secs(5)).await;
    // drainToNext: behind every other priority, so west.
    apply_to(
        &demo,
        "east",
        &failover_policy("  hysteresis: 500ms\n  onPartition: drainToNext\n"),
        &["east", "west"],
    )
    .await;
    for _ in 0..10 {
        assert_eq!(call(east_addr).await.as_deref(), Ok("west"));
    }
    let tables = demo.cluster("east").unwrap().client.failover_tables();
    let text = isthmus_core::failover::render(&tables["reviews.default"], "east");
    assert!(text.contains("drainToNext"), "{text}");
    assert!(text.contains("lease lapsed"), "{text}");

    // Healing: central's control plane comes back, renews its leases, and east's traffic
    // returns to the nearer cluster on its own (after the hysteresis).
    let central = demo
        .clusters
        .iter_mut()
        .find(|c| c.name == "central")
        .unwrap();
    central.restart_control().await.unwrap();
    let healed = Instant::now();
    let back = until_served_by(east_addr, "central", Duration::from_secs(15)).await;
    eprintln!(
        "after healing, east's traffic returned to central in {:?}",
        back - healed
    );
    let live = east_config
        .borrow()
        .service("default", "reviews")
        .and_then(|s| s.remote.iter().find(|r| r.cluster == "central").cloned())
        .unwrap();
    assert_eq!(live.lease_expired_at_ms, None);

    // Central's own traffic never noticed.
    let served = central_load.since(stopped);
    assert!(served.len() > 50, "only {} calls in central", served.len());
    assert!(errors(&served).is_empty(), "{:?}", errors(&served));
    central_load.stop().await;
    demo.shutdown().await;
}

/// VirtualService `retries.retryRemoteLocalities`: east's reviews pods lose their app (their
/// sidecars stay, answering 502), so east stays the active priority. Retries stay in east and
/// the caller sees the 502; with `retryRemoteLocalities: true` the retry goes to the next
/// priority (central, same region) and the caller gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_go_to_other_localities_only_when_the_route_allows_it() {
    let mut demo = Demo::start(options(216)).await.expect("the demo starts");
    let route = |remote: bool| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: default}}\n\
             spec:\n  hosts: [reviews]\n  http:\n  - route: [{{destination: {{host: reviews}}}}]\n    \
             retries: {{attempts: 1, retryOn: \"5xx\", retryRemoteLocalities: {remote}}}\n"
        )
    };
    apply(&demo, "east", &route(false)).await;
    let addr = reviews(demo.cluster("east").unwrap());
    until_served_by(addr, "east", Duration::from_secs(10)).await;
    let east = demo.clusters.iter_mut().find(|c| c.name == "east").unwrap();
    assert!(east.stop_apps("reviews") > 0);

    for _ in 0..5 {
        let got = call(addr).await;
        assert!(
            got.as_ref().is_err_and(|e| e.starts_with("HTTP 502")),
            "retries stay in east's priority: {got:?}"
        );
    }
    apply(&demo, "east", &route(true)).await;
    for _ in 0..5 {
        assert_eq!(
            call(addr).await,
            Ok("central".to_string()),
            "the retry goes to the next priority"
        );
    }
    demo.shutdown().await;
}

/// `localityLbSetting.distribute`: east's callers send half their reviews traffic to their
/// own zone and half to west, none to central (same region, in no share), every cluster
/// healthy; a caller in central, which no rule names, keeps to its priorities (itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distribute_splits_traffic_across_localities_by_weight() {
    let demo = Demo::start(options(222)).await.expect("the demo starts");
    apply(
        &demo,
        "east",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: default}\n\
         spec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n\
         \x20       distribute: [{from: 'us-east-1/a/*', to: {'us-east-1/a/*': 50, 'us-west-2/*': 50}}]\n",
    )
    .await;
    let addr = reviews(demo.cluster("east").unwrap());
    until_served_by(addr, "west", Duration::from_secs(10)).await;
    let mut by_cluster = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..200 {
        let cluster = call(addr).await.expect("every call is answered");
        *by_cluster.entry(cluster).or_default() += 1;
    }
    let (east, west) = (by_cluster.get("east"), by_cluster.get("west"));
    assert!(
        !by_cluster.contains_key("central") && east > Some(&60) && west > Some(&60),
        "about 100 each from east and west, none from central: {by_cluster:?}"
    );
    let central = reviews(demo.cluster("central").unwrap());
    for _ in 0..20 {
        assert_eq!(call(central).await, Ok("central".to_string()));
    }
    demo.shutdown().await;
}
