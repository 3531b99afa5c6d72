//! Headless services end to end, in the demo federation: a service `peers` declared headless
//! in every cluster's discovery file, served by the sample `reviews` workloads (v1 in east
//! with hostname `r1`, v2 in west with hostname `r2`, v3 in central without one). Each
//! cluster's DNS proxy names every endpoint, and the address it gives for one endpoint
//! reaches exactly that endpoint through the mesh: dialled directly when it is local,
//! through the gateways when it is not.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use isthmus_core::mesh::HeadlessEndpoint;
use isthmus_demo::probe::{call_sample, query_a, resolve_a};
use isthmus_demo::{Demo, DemoCluster, DemoOptions, SAMPLE_NAMESPACE, SAMPLE_PORT};

const SERVICE: &str = "peers.default.svc.clusterset.local";

fn options(vip_octet: u8, work_dir: &Path) -> DemoOptions {
    DemoOptions {
        work_dir: Some(work_dir.to_path_buf()),
        ..DemoOptions::fast(vip_octet)
    }
}

/// Adds the headless `peers` service to `cluster`'s discovery file: its `reviews` workload,
/// with `hostname` when given.
fn declare_peers(work_dir: &Path, cluster: &DemoCluster, hostname: Option<&str>) {
    let path = work_dir.join(&cluster.name).join("services.yaml");
    let mut yaml = std::fs::read_to_string(&path).expect("the demo wrote a discovery file");
    let reviews = cluster
        .workloads
        .iter()
        .find(|w| w.service == "reviews")
        .expect("every demo cluster runs reviews");
    let address = reviews.sidecar.inbound_addrs()[0];
    let hostname = hostname.map_or(String::new(), |h| format!(", hostname: {h}"));
    yaml.push_str(&format!(
        "  - name: peers\n    namespace: {SAMPLE_NAMESPACE}\n    headless: true\n    export: true\n    \
         ports:\n      - {{name: http, port: {SAMPLE_PORT}, protocol: http}}\n    endpoints:\n      \
         - {{address: \"{address}\", serviceAccount: reviews{hostname}}}\n"
    ));
    std::fs::write(&path, yaml).expect("rewriting the discovery file");
}

/// Waits until `cluster` knows all three `peers` endpoints and its client sidecar listens on
/// each one's VIP; returns them.
async fn wait_for_peers(cluster: &DemoCluster) -> Vec<HeadlessEndpoint> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let config = cluster.config.borrow().clone();
        let endpoints = config
            .service(SAMPLE_NAMESPACE, "peers")
            .and_then(|s| s.headless.clone())
            .map(|h| h.endpoints)
            .unwrap_or_default();
        let bound = cluster.client.outbound_addrs();
        if endpoints.len() == 3
            && endpoints.iter().all(|e| e.ready)
            && endpoints
                .iter()
                .all(|e| bound.contains(&SocketAddr::new(e.vip, SAMPLE_PORT)))
        {
            return endpoints;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never got the three peers endpoints: {endpoints:?}",
            cluster.name
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn resolve_one(cluster: &DemoCluster, name: &str) -> IpAddr {
    let ips = resolve_a(cluster.dns.udp_addr(), name)
        .await
        .unwrap_or_else(|e| panic!("{name} from {}: {e}", cluster.name));
    assert_eq!(ips.len(), 1, "{name} from {}: {ips:?}", cluster.name);
    IpAddr::V4(ips[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_headless_endpoint_address_reaches_exactly_that_endpoint_from_every_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let demo = Demo::start(options(230, dir.path()))
        .await
        .expect("the demo federation starts");
    for (cluster, hostname) in [
        ("east", Some("r1")),
        ("west", Some("r2")),
        ("central", None),
    ] {
        declare_peers(dir.path(), demo.cluster(cluster).unwrap(), hostname);
    }
    // Where each endpoint runs: (cluster, version of the reviews workload behind it).
    let expect = |cluster: &str| match cluster {
        "east" => "v1",
        "west" => "v2",
        _ => "v3",
    };
    for c in &demo.clusters {
        let endpoints = wait_for_peers(c).await;
        // The service name: one address per endpoint, each the endpoint's own VIP.
        let answered: BTreeSet<IpAddr> = resolve_a(c.dns.udp_addr(), SERVICE)
            .await
            .expect("the DNS proxy answers")
            .into_iter()
            .map(IpAddr::V4)
            .collect();
        let vips: BTreeSet<IpAddr> = endpoints.iter().map(|e| e.vip).collect();
        assert_eq!(answered, vips, "{}", c.name);
        for e in &endpoints {
            // Named endpoints resolve by name to the same address.
            if let Some(hostname) = &e.hostname {
                let name = format!("{hostname}.{}.{SERVICE}", e.cluster);
                assert_eq!(resolve_one(c, &name).await, e.vip, "{name} from {}", c.name);
            }
            // Every call on the endpoint's address lands on that endpoint, never another.
            for _ in 0..4 {
                let reply = call_sample(SocketAddr::new(e.vip, SAMPLE_PORT))
                    .await
                    .unwrap_or_else(|err| {
                        panic!("calling {}/{} from {}: {err}", e.cluster, e.id, c.name)
                    });
                assert_eq!(
                    (reply.cluster.as_str(), reply.version.as_str()),
                    (e.cluster.as_str(), expect(&e.cluster)),
                    "endpoint {}/{} called from {}",
                    e.cluster,
                    e.id,
                    c.name
                );
                // The caller's own identity reached the endpoint (mTLS end to end).
                assert_eq!(reply.caller, c.client_identity().to_string());
            }
        }
    }
    // Names that do not exist: an unknown hostname, an unknown cluster, and the cluster whose
    // endpoint has no hostname.
    let east = demo.cluster("east").unwrap();
    for name in [
        format!("r9.west.{SERVICE}"),
        format!("r1.nowhere.{SERVICE}"),
        format!("central.{SERVICE}"),
    ] {
        let (code, ips) = query_a(east.dns.udp_addr(), &name).await.unwrap();
        assert_eq!(code, ResponseCode::NXDomain, "{name}: {ips:?}");
    }
    demo.shutdown().await;
}
