//! The failover benchmark's driver (run by `bench/failover`): a demo federation on loopback,
//! a steady 500 requests/s from east's client sidecar, and, round after round, either every
//! local endpoint of the service killed (details: east → west) or the remote gateway in use
//! killed (reviews, east's own endpoints gone: east → central, whose gateway dies → west).
//! Each scenario runs with the mesh's default retries and with retries off. Per round: the
//! failed requests and the error window (kill → the last failed request's answer).
//!
//! Usage: failover_bench [ROUNDS]   (default 20)

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use isthmus_core::policy::parse_documents;
use isthmus_demo::probe::http_get;
use isthmus_demo::sample::SampleReply;
use isthmus_demo::{vip_of, Demo, DemoOptions, SAMPLE_PORT};

const RATE_PER_SECOND: u64 = 500;
/// Load runs this long after each kill.
const AFTER_KILL: Duration = Duration::from_millis(1500);
const BEFORE_KILL: Duration = Duration::from_millis(300);

fn policies(retries: bool) -> String {
    let mut docs = String::new();
    for svc in ["details", "reviews"] {
        docs.push_str(&format!(
            "apiVersion: isthmus.io/v1alpha1\nkind: FailoverPolicy\nmetadata: {{name: {svc}, namespace: default}}\n\
             spec:\n  service: {svc}\n  hysteresis: 300ms\n---\n"
        ));
        let attempts = if retries { 2 } else { 0 };
        docs.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {svc}, namespace: default}}\n\
             spec:\n  hosts: [{svc}]\n  http:\n  - route: [{{destination: {{host: {svc}}}}}]\n    retries: {{attempts: {attempts}, retryOn: \"connect-failure,refused-stream,reset,503\"}}\n---\n"
        ));
    }
    docs
}

async fn apply(demo: &Demo, yaml: &str) -> anyhow::Result<()> {
    let docs = parse_documents("bench.yaml", yaml)?;
    let east = demo.cluster("east")?;
    east.control.client().apply(&docs, false).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !docs
        .iter()
        .all(|p| east.config.borrow().policies.contains(p))
    {
        anyhow::ensure!(Instant::now() < deadline, "policies never reached east");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

async fn served_by(addr: SocketAddr) -> Option<String> {
    match http_get(addr, "/").await {
        Ok((200, body)) => serde_json::from_str::<SampleReply>(&body)
            .ok()
            .map(|r| r.cluster),
        _ => None,
    }
}

async fn until_served_by(addr: SocketAddr, cluster: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while served_by(addr).await.as_deref() != Some(cluster) {
        anyhow::ensure!(Instant::now() < deadline, "never served by {cluster}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Starts a steady `RATE_PER_SECOND` load on `addr` for `duration`; returns when each
/// request finished and whether it succeeded.
fn load(
    addr: SocketAddr,
    duration: Duration,
) -> tokio::task::JoinHandle<Vec<(Instant, Option<String>)>> {
    tokio::spawn(async move {
        let results = Arc::new(Mutex::new(Vec::new()));
        let mut every = tokio::time::interval(Duration::from_micros(1_000_000 / RATE_PER_SECOND));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let end = Instant::now() + duration;
        let mut tasks = tokio::task::JoinSet::new();
        while Instant::now() < end {
            every.tick().await;
            let results = results.clone();
            tasks.spawn(async move {
                let outcome =
                    match tokio::time::timeout(Duration::from_secs(3), http_get(addr, "/")).await {
                        Err(_) => Some("timeout".to_string()),
                        Ok(Err(e)) => Some(format!("{e:#}").chars().take(60).collect()),
                        Ok(Ok((200, _))) => None,
                        Ok(Ok((status, body))) => Some(format!(
                            "HTTP {status} {}",
                            body.chars().take(50).collect::<String>()
                        )),
                    };
                results.lock().unwrap().push((Instant::now(), outcome));
            });
        }
        while tasks.join_next().await.is_some() {}
        let out = results.lock().unwrap().clone();
        out
    })
}

#[derive(Default)]
struct Rounds {
    failed: Vec<u64>,
    window_ms: Vec<f64>,
    requests: u64,
    kinds: std::collections::BTreeMap<String, u64>,
}

impl Rounds {
    fn record(&mut self, killed: Instant, results: &[(Instant, Option<String>)]) {
        let failures: Vec<&Instant> = results
            .iter()
            .filter(|(_, e)| e.is_some())
            .map(|(t, _)| t)
            .collect();
        for (_, e) in results {
            if let Some(e) = e {
                *self.kinds.entry(e.clone()).or_insert(0) += 1;
            }
        }
        self.requests += results.len() as u64;
        self.failed.push(failures.len() as u64);
        let window = failures
            .iter()
            .map(|t| t.saturating_duration_since(killed))
            .max()
            .unwrap_or_default();
        self.window_ms.push(window.as_secs_f64() * 1000.0);
        if std::env::var("FAILOVER_BENCH_TRACE").is_ok() {
            let offsets: Vec<i64> = results
                .iter()
                .filter(|(_, e)| e.as_deref() == Some("timeout"))
                .map(|(t, _)| {
                    let started = *t - Duration::from_secs(3);
                    if started >= killed {
                        (started - killed).as_millis() as i64
                    } else {
                        -((killed - started).as_millis() as i64)
                    }
                })
                .collect();
            if !offsets.is_empty() {
                eprintln!(
                    "round: {} timeouts, started {}..{} ms after the kill",
                    offsets.len(),
                    offsets.iter().min().unwrap(),
                    offsets.iter().max().unwrap()
                );
            }
        }
    }
}

fn percentile<T: Copy + PartialOrd>(values: &[T], p: f64) -> T {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn report(name: &str, r: &Rounds) -> (f64, u64) {
    let w99 = percentile(&r.window_ms, 0.99);
    let f99 = percentile(&r.failed, 0.99);
    println!(
        "{name:<34} rounds {:>3}  requests {:>6}  failed p50 {:>4} p99 {:>4}  error window p50 {:>7.1} ms p99 {:>7.1} ms",
        r.failed.len(),
        r.requests,
        percentile(&r.failed, 0.5),
        f99,
        percentile(&r.window_ms, 0.5),
        w99,
    );
    let mut kinds: Vec<_> = r.kinds.iter().collect();
    kinds.sort_by(|a, b| b.1.cmp(a.1));
    for (k, n) in kinds.iter().take(3) {
        println!("    {n:>6} x {k}");
    }
    (w99, f99)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    isthmus_core::install_crypto_provider();
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20);
    let mut demo = Demo::start(DemoOptions {
        vip_octets: [231, 232, 233],
        ..DemoOptions::default()
    })
    .await?;
    let east = demo.cluster("east")?;
    let details = SocketAddr::new(
        vip_of(&east.config.borrow(), "details").unwrap(),
        SAMPLE_PORT,
    );
    let reviews = SocketAddr::new(
        vip_of(&east.config.borrow(), "reviews").unwrap(),
        SAMPLE_PORT,
    );
    // Warm up: connections, pools and caches, as a service that has been running.
    until_served_by(details, "east").await?;
    load(details, Duration::from_secs(1)).await?;
    load(reviews, Duration::from_secs(1)).await?;
    let mut results = Vec::new();
    let modes: Vec<bool> = match std::env::var("FAILOVER_BENCH_MODE").as_deref() {
        Ok("retries") => vec![true],
        Ok("no-retries") => vec![false],
        _ => vec![true, false],
    };
    for retries in modes {
        apply(&demo, &policies(retries)).await?;
        let mode = if retries { "retries on" } else { "retries off" };

        // All local endpoints die.
        let mut local = Rounds::default();
        for _ in 0..rounds {
            until_served_by(details, "east").await?;
            let running = load(details, BEFORE_KILL + AFTER_KILL);
            tokio::time::sleep(BEFORE_KILL).await;
            let east = demo.clusters.iter_mut().find(|c| c.name == "east").unwrap();
            let killed = Instant::now();
            let stopped = east.kill_workloads("details").await;
            local.record(killed, &running.await?);
            east.revive_workloads(&stopped).await?;
        }
        let name = format!("local endpoints killed, {mode}");
        results.push((name.clone(), report(&name, &local)));

        // The remote gateway in use dies.
        let east = demo.clusters.iter_mut().find(|c| c.name == "east").unwrap();
        let stopped = east.kill_workloads("reviews").await;
        let mut gateway = Rounds::default();
        for _ in 0..rounds {
            until_served_by(reviews, "central").await?;
            let running = load(reviews, BEFORE_KILL + AFTER_KILL);
            tokio::time::sleep(BEFORE_KILL).await;
            let central = demo
                .clusters
                .iter_mut()
                .find(|c| c.name == "central")
                .unwrap();
            let killed = Instant::now();
            central.kill_gateway().await;
            gateway.record(killed, &running.await?);
            central.revive_gateway().await?;
        }
        let east = demo.clusters.iter_mut().find(|c| c.name == "east").unwrap();
        east.revive_workloads(&stopped).await?;
        let name = format!("remote gateway killed, {mode}");
        results.push((name.clone(), report(&name, &gateway)));
    }
    demo.shutdown().await;
    if results.len() < 4 {
        return Ok(());
    }
    let get = |n: &str| results.iter().find(|(k, _)| k == n).unwrap().1;
    let (local_w, local_f_retry) = (
        get("local endpoints killed, retries off").0,
        get("local endpoints killed, retries on").1,
    );
    let (gw_w, gw_f_retry) = (
        get("remote gateway killed, retries off").0,
        get("remote gateway killed, retries on").1,
    );
    let worst = local_w.max(gw_w);
    println!(
        "RESULT failover local_window_p99_ms={local_w:.1} gateway_window_p99_ms={gw_w:.1} local_failed_p99_retries={local_f_retry} gateway_failed_p99_retries={gw_f_retry} ratio={:.3}",
        worst / 1000.0
    );
    Ok(())
}
