//! `isthmus demo`: start the federation, then show step by step what the mesh does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use isthmus_federation::Role;

use crate::probe::{call_sample, resolve_a};
use crate::{Demo, DemoOptions, SAMPLE_NAMESPACE, SAMPLE_PORT};

/// What `isthmus demo` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct DemoArgs {
    pub ports_file: Option<PathBuf>,
    pub exit_after: Option<Duration>,
}

/// Writes one context per demo cluster (`demo-<cluster>`: its control plane, its CA and its
/// operator `admin` credential) into the
/// operator's contexts file and makes `demo-east` current; other contexts are kept as they
/// are. Returns the file's path.
fn write_contexts(ports: &crate::PortsFile) -> anyhow::Result<PathBuf> {
    use isthmus_core::contexts::{config_path, Context, Contexts};
    let path = config_path(&|name| std::env::var(name).ok())?;
    let mut all = Contexts::load(&path)?;
    for c in &ports.clusters {
        all.contexts.insert(
            format!("demo-{}", c.name),
            Context {
                control: c.control.clone(),
                ca_file: PathBuf::from(&c.ca_file),
                cert_file: Some(PathBuf::from(&c.cert_file)),
                key_file: Some(PathBuf::from(&c.key_file)),
            },
        );
    }
    all.current_context = Some("demo-east".to_string());
    all.save(&path)?;
    Ok(path)
}

fn step(n: usize, text: &str) {
    println!("\n[{n}] {text}");
}

/// Runs the demo: start, narrate, keep running (or exit after the given time), stop cleanly.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    println!(
        "Isthmus demo: three clusters (east, west, central) federated on loopback, in one process."
    );
    step(1, "Starting each cluster's federation member, control plane, east-west gateway, DNS proxy and sidecars");
    let started = Instant::now();
    let mut demo = Demo::start(DemoOptions::default()).await?;
    println!(
        "    all three clusters up and converged in {:.2?}: every sample service routable \
         from every cluster, every pair of gateways connected over QUIC",
        started.elapsed()
    );

    step(2, "Federation store (Raft): one member per cluster");
    for (store, cluster) in demo.stores().iter().zip(&demo.clusters) {
        let s = store.status();
        let role = match s.role {
            Role::Leader => "leader",
            Role::Follower => "follower",
            _ => "candidate",
        };
        println!(
            "    {:<8} member {} at {}  {:<9} term {}  commit {}  applied {}",
            cluster.name, s.id, cluster.federation, role, s.term, s.commit_index, s.applied_index
        );
    }
    println!(
        "    members authenticate each other with mutual TLS on their federation ports: each\n    \
         presents its control plane's certificate (spiffe://<trust domain>/ns/isthmus-system/\n    \
         sa/control) from its own cluster CA, and each trust domain is bound to one member id"
    );

    step(
        3,
        "Discovery, export and import: what each cluster can reach",
    );
    for c in &demo.clusters {
        let config = c.config.borrow().clone();
        println!("    {} (config version {}):", c.name, config.version);
        for s in &config.services {
            let local = s.local_endpoints.len();
            let remote: Vec<&str> = s.remote.iter().map(|r| r.cluster.as_str()).collect();
            println!(
                "      {:<24} VIP {:<13} local endpoints {}  remote: {}",
                format!("{}.{}", s.name, s.namespace),
                s.vip,
                local,
                if remote.is_empty() {
                    "-".to_string()
                } else {
                    remote.join(", ")
                }
            );
        }
    }

    step(4, "DNS: ratings.default.svc.clusterset.local through each cluster's DNS proxy (ratings runs only in central)");
    let name = format!("ratings.{SAMPLE_NAMESPACE}.svc.clusterset.local");
    let mut vips = Vec::new();
    for c in &demo.clusters {
        let answers = resolve_a(c.dns.udp_addr(), &name)
            .await
            .with_context(|| format!("resolving through {}", c.name))?;
        let vip = *answers
            .first()
            .with_context(|| format!("{} answered no address for {name}", c.name))?;
        println!(
            "    {:<8} dig @{} -p {} {name}  ->  {vip}",
            c.name,
            c.dns.udp_addr().ip(),
            c.dns.udp_addr().port()
        );
        vips.push((c, vip));
    }

    step(
        5,
        "Cross-cluster calls: curl http://<vip>:9080/ from each cluster's client sidecar",
    );
    for (c, vip) in &vips {
        let t = Instant::now();
        let reply = call_sample(SocketAddr::new((*vip).into(), SAMPLE_PORT)).await?;
        let path = if reply.cluster == c.name {
            "direct mTLS to the local endpoint".to_string()
        } else {
            format!(
                "{} gateway -> QUIC -> {} gateway, mTLS end to end",
                c.name, reply.cluster
            )
        };
        println!(
            "    {:<8} -> ratings: served by {} ({}) in {:.1?}\n             caller seen by the server: {}\n             path: {path}",
            c.name, reply.cluster, reply.version, t.elapsed(), reply.caller
        );
    }

    if let Some((c, vip)) = vips.iter().find(|(c, _)| c.name == "east") {
        let addr = SocketAddr::new((*vip).into(), SAMPLE_PORT);
        let (status, body) = crate::probe::http2_get(addr, "/").await?;
        let reply: crate::sample::SampleReply = serde_json::from_str(&body)
            .with_context(|| format!("HTTP {status}, not a sample reply: {body}"))?;
        println!(
            "    {:<8} -> ratings over HTTP/2 (h2c from the app): HTTP {status}, served by {}\n             \
             hops: app -h2c-> sidecar -h2 in mTLS (ALPN h2), through both gateways-> ratings' sidecar -{}-> app\n             \
             (ratings' port is `http`: its sidecar speaks HTTP/1.1 to the app; `http2`/`grpc` ports get HTTP/2)",
            c.name, reply.cluster, reply.protocol
        );
    }

    step(
        6,
        "Local first: reviews runs in every cluster; each cluster's call stays home",
    );
    for c in &demo.clusters {
        let config = c.config.borrow().clone();
        let Some(vip) = crate::vip_of(&config, "reviews") else {
            continue;
        };
        let reply = call_sample(SocketAddr::new(vip, SAMPLE_PORT)).await?;
        println!(
            "    {:<8} -> reviews: served by {} ({})",
            c.name, reply.cluster, reply.version
        );
    }

    step(7, "Canary: Istio's reviews v2/v3 50/50 split, applied once through east's control plane (isthmus apply -f)");
    canary(&demo).await?;

    step(8, "Failover: every details endpoint in east dies under load; east's callers go to west, then come home");
    failover(&mut demo).await?;

    let ports = demo.ports();
    // The contexts first: whoever waits for the ports file may use them at once.
    let contexts = write_contexts(&ports)?;
    if let Some(path) = &args.ports_file {
        std::fs::write(path, serde_json::to_string_pretty(&ports)?)
            .with_context(|| format!("writing the ports file {}", path.display()))?;
        println!("\nAddresses written to {}", path.display());
    }
    println!(
        "Contexts {} written to {} (current: demo-east); `isthmus context use demo-west` switches",
        ports
            .clusters
            .iter()
            .map(|c| format!("demo-{}", c.name))
            .collect::<Vec<_>>()
            .join(", "),
        contexts.display()
    );
    println!(
        "    each presents its cluster's operator `admin` credential (the API refuses callers without one); \
         east's admin is the federation's first mesh admin, so `isthmus apply` works through demo-east"
    );
    if let Some(east) = ports.clusters.first() {
        if let (Some((dns_ip, dns_port)), Some(vip)) = (
            east.dns.rsplit_once(':'),
            east.vips.get(&format!("ratings.{SAMPLE_NAMESPACE}")),
        ) {
            println!(
                "Try it (east):\n    dig @{dns_ip} -p {dns_port} {name}\n    curl http://{vip}:{SAMPLE_PORT}/\n    \
                 isthmus get virtualservice -n {SAMPLE_NAMESPACE}\n    isthmus status\n    \
                 isthmus explain reviews --context demo-west"
            );
        }
    }

    match args.exit_after {
        Some(d) => {
            println!("\nRunning for {d:?}, then stopping.");
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        None => {
            println!("\nRunning until interrupted (Ctrl-C).");
            tokio::signal::ctrl_c()
                .await
                .context("waiting for Ctrl-C")?;
        }
    }
    demo.shutdown().await;
    println!("Stopped: every listener closed.");
    Ok(())
}

/// Bookinfo's subsets and the 50/50 reviews split, as `isthmus apply -f` would send them.
const BOOKINFO_SUBSETS: &str =
    include_str!("../../examples/bookinfo/destination-rule-all-mtls.yaml");
const REVIEWS_SPLIT: &str =
    include_str!("../../examples/bookinfo/virtual-service-reviews-v2-v3.yaml");

const DETAILS_FAILOVER: &str = "apiVersion: isthmus.io/v1alpha1\nkind: FailoverPolicy\nmetadata: {name: details, namespace: default}\nspec:\n  service: details\n  hysteresis: 2s\n";

/// Kills east's details workloads under a steady stream of calls, reports how long failing
/// over took and what the caller saw, shows the priority table, then brings them back.
async fn failover(demo: &mut Demo) -> anyhow::Result<()> {
    let policies = isthmus_core::policy::parse_documents("failover.yaml", DETAILS_FAILOVER)?;
    let east = demo.cluster("east")?;
    let client = east.control.client();
    client.apply(&policies, false).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !policies
        .iter()
        .all(|p| east.config.borrow().policies.contains(p))
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the FailoverPolicy never reached east"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("    FailoverPolicy default/details applied (hysteresis 2s; priorities by locality)");
    let addr = SocketAddr::new(
        crate::vip_of(&east.config.borrow(), "details").context("details has no VIP in east")?,
        SAMPLE_PORT,
    );
    let before = call_sample(addr).await?;
    println!("    east -> details: served by {}", before.cluster);

    let cluster = demo
        .clusters
        .iter_mut()
        .find(|c| c.name == "east")
        .context("no east cluster")?;
    let killed = Instant::now();
    let stopped = cluster.kill_workloads("details").await;
    let (mut failed, mut calls) = (0, 0);
    let failed_over = loop {
        anyhow::ensure!(
            killed.elapsed() < Duration::from_secs(10),
            "details never failed over"
        );
        calls += 1;
        match call_sample(addr).await {
            Ok(r) if r.cluster != "east" => break (killed.elapsed(), r.cluster),
            Ok(_) => {}
            Err(_) => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    println!(
        "    killed east's details: served by {} after {:.0?}; {failed} of {calls} calls failed meanwhile (the mesh's default retries cover connection failures)",
        failed_over.1, failed_over.0
    );
    if let Some(table) = demo
        .cluster("east")?
        .client
        .failover_tables()
        .get("details.default")
    {
        println!("    isthmus explain details --from east:");
        for line in isthmus_core::failover::render(table, "east").lines() {
            println!("      {line}");
        }
    }

    let cluster = demo
        .clusters
        .iter_mut()
        .find(|c| c.name == "east")
        .context("no east cluster")?;
    let revived = Instant::now();
    cluster.revive_workloads(&stopped).await?;
    let home = loop {
        anyhow::ensure!(
            revived.elapsed() < Duration::from_secs(15),
            "details never came home"
        );
        if call_sample(addr).await.is_ok_and(|r| r.cluster == "east") {
            break revived.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("    east's details back: traffic came home after {home:.1?} (not before the 2s hysteresis)");
    Ok(())
}

async fn canary(demo: &Demo) -> anyhow::Result<()> {
    let east = demo.cluster("east")?;
    let mut policies =
        isthmus_core::policy::parse_documents("destination-rule-all-mtls.yaml", BOOKINFO_SUBSETS)?;
    policies.extend(isthmus_core::policy::parse_documents(
        "virtual-service-reviews-v2-v3.yaml",
        REVIEWS_SPLIT,
    )?);
    let client = east.control.client();
    for (resource, action) in client.apply(&policies, false).await? {
        println!("    {resource} {action}");
    }
    let t = Instant::now();
    let deadline = t + Duration::from_secs(10);
    for c in &demo.clusters {
        while !policies
            .iter()
            .all(|p| c.config.borrow().policies.contains(p))
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the policies never reached {}",
                c.name
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    println!(
        "    replicated through the federation store to every cluster's sidecars in {:.1?}",
        t.elapsed()
    );
    let vip =
        crate::vip_of(&east.config.borrow(), "reviews").context("reviews has no VIP in east")?;
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let reply = call_sample(SocketAddr::new(vip, SAMPLE_PORT)).await?;
        *counts
            .entry(format!("{} in {}", reply.version, reply.cluster))
            .or_insert(0) += 1;
    }
    let summary: Vec<String> = counts.iter().map(|(k, n)| format!("{n} x {k}")).collect();
    println!(
        "    40 calls to reviews from east: {} (east's own v1 gets none now)",
        summary.join(", ")
    );
    Ok(())
}
