//! Kubernetes discovery through kube-rs against the test API server
//! (`support/kube_api.rs`): two clusters' control planes in one process over one federation
//! store, each watching its own fake API server exactly as it would a real one. Policies
//! as Kubernetes resources are in `kubernetes/policies.rs`.

#[path = "kubernetes/policies.rs"]
mod policies;
#[path = "kubernetes/publish.rs"]
mod publish;

use std::sync::Arc;
use std::time::Duration;

use isthmus_control::kubernetes::KubeSource;
use isthmus_control::tokens::TokenPolicy;
use isthmus_core::ca::CertificateAuthority;
use isthmus_core::mesh::MeshConfig;
use isthmus_testkit::kube_api::KubeApi;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

struct Cluster {
    api: KubeApi,
    control: isthmus_control::ControlHandle,
}

async fn cluster(name: &str, n: u8, store: &isthmus_federation::Store) -> Cluster {
    let api = KubeApi::start().await;
    api.put(namespace("default"));
    let control = control(name, n, store, &api).await;
    Cluster { api, control }
}

/// Cluster `name`'s control plane over `api` (a fresh one, or the same one again after a
/// restart).
async fn control(
    name: &str,
    n: u8,
    store: &isthmus_federation::Store,
    api: &KubeApi,
) -> isthmus_control::ControlHandle {
    let mut source = KubeSource::new(api.client());
    source.retry = Duration::from_millis(100);
    source.resync = Duration::from_secs(2);
    source.api_recheck = Duration::from_millis(200);
    let td = format!("{name}.isthmus.local");
    isthmus_control::start(
        isthmus_control::ControlOptions {
            cluster: name.into(),
            trust_domain: td.clone(),
            locality: None,
            grpc_listen: "127.0.0.1:0".parse().unwrap(),
            discovery: isthmus_control::DiscoverySource::Kubernetes(source),
            vip_range: format!("127.{}.0.0/16", 20 + n).parse().unwrap(),
            gateway_address: Some(format!("127.0.0.{n}:15443").parse().unwrap()),
            tokens: TokenPolicy::single("test-bootstrap-token-0123", &["default"]),
            cert_lifetime: Duration::from_secs(600),
            export_lease: Duration::from_secs(10),
            ca: Arc::new(CertificateAuthority::generate(&td).unwrap()),
            bootstrap_admin: Some(isthmus_control::BOOTSTRAP_ADMIN.to_string()),
            members: None,
        },
        store.clone(),
    )
    .await
    .unwrap()
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
           "status": {"phase": "Active"}})
}

fn service(name: &str, port: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}})
}

fn export(name: &str, created: &str) -> Value {
    json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
           "metadata": {"name": name, "namespace": "default", "creationTimestamp": created}})
}

fn pod(name: &str, sa: &str, version: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "default", "labels": {"app": "ratings", "version": version}},
           "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "ratings"}]}})
}

/// An EndpointSlice of `service` with one endpoint per (pod name, ip, ready).
fn slice(name: &str, service: &str, endpoints: &[(String, String, bool)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(pod, ip, ready)| {
            json!({"addresses": [ip], "conditions": {"ready": ready},
                   "targetRef": {"kind": "Pod", "name": pod, "namespace": "default"}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": "default",
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "endpoints": endpoints,
           "ports": [{"name": "http", "port": 9080, "protocol": "TCP"}]})
}

/// One exported `ratings` with one ready pod at 10.1.0.5.
fn ratings(api: &KubeApi, port: u16, created: &str) {
    api.put(service("ratings", port));
    api.put(pod("ratings-1", "ratings", "v1"));
    api.put(slice(
        "ratings-a",
        "ratings",
        &[("ratings-1".into(), "10.1.0.5".into(), true)],
    ));
    api.put(export("ratings", created));
}

async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(v) = check() {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn config(c: &Cluster) -> Arc<MeshConfig> {
    c.control.config().borrow().clone()
}

/// The condition `type_` of ServiceExport `name` in `api`: (status, reason, message).
fn condition(api: &KubeApi, name: &str, type_: &str) -> Option<(String, String, String)> {
    condition_of(api, "ServiceExport", name, type_)
}

/// The condition `type_` of the `kind` object `default/name` in `api`: (status, reason,
/// message).
fn condition_of(
    api: &KubeApi,
    kind: &str,
    name: &str,
    type_: &str,
) -> Option<(String, String, String)> {
    let x = api.get(kind, "default", name)?;
    let c = x["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)?
        .clone();
    Some((
        c["status"].as_str()?.into(),
        c["reason"].as_str()?.into(),
        c["message"].as_str()?.into(),
    ))
}

#[tokio::test]
async fn a_service_export_reaches_the_other_clusters_service_import_and_leaves_with_it() {
    let store = isthmus_testkit::store::one_member_store().await;
    let east = cluster("east", 1, &store).await;
    let west = cluster("west", 2, &store).await;
    ratings(&east.api, 9080, "2025-01-01T00:00:00Z");
    // A Service without a ServiceExport stays in its cluster.
    east.api.put(service("internal", 8080));

    // East sees its endpoint at the pod IP and the sidecar's inbound port, with the pod's
    // identity and labels.
    let c = eventually("east's ratings endpoint", || {
        let c = config(&east);
        c.service("default", "ratings")
            .is_some_and(|s| !s.local_endpoints.is_empty())
            .then_some(c)
    })
    .await;
    let local = &c.service("default", "ratings").unwrap().local_endpoints[0];
    assert_eq!(local.address.to_string(), "10.1.0.5:9080");
    assert_eq!(
        local.identity,
        "spiffe://east.isthmus.local/ns/default/sa/ratings"
    );
    assert_eq!(local.labels["version"], "v1");
    assert!(c.service("default", "internal").is_some());

    // West imports it, and gets a ServiceImport with its own VIP for it.
    let vip = eventually("west's import of ratings", || {
        let c = config(&west);
        let s = c.service("default", "ratings")?;
        (s.remote.iter().any(|r| r.cluster == "east")).then(|| s.vip.to_string())
    })
    .await;
    let import = eventually("west's ServiceImport", || {
        west.api.get("ServiceImport", "default", "ratings")
    })
    .await;
    assert_eq!(import["spec"]["type"], "ClusterSetIP");
    assert_eq!(import["spec"]["ips"], json!([vip]));
    assert_eq!(
        import["spec"]["ports"],
        json!([{"name": "http", "port": 9080, "protocol": "TCP", "appProtocol": "http"}])
    );
    assert_eq!(
        import["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "isthmus"
    );
    assert!(config(&west).service("default", "internal").is_none());
    assert!(store.get("exports/default/internal/east").is_none());
    // East's export is Valid and without conflict; east itself imports nothing.
    eventually("Valid=True", || {
        (condition(&east.api, "ratings", "Valid")?.0 == "True").then_some(())
    })
    .await;
    let conflict = eventually("Conflict", || condition(&east.api, "ratings", "Conflict")).await;
    assert_eq!(
        (conflict.0.as_str(), conflict.1.as_str()),
        ("False", "NoConflicts")
    );
    assert!(east
        .api
        .get("ServiceImport", "default", "ratings")
        .is_none());

    // Deleting the ServiceExport withdraws the export, the import and the ServiceImport.
    assert!(east.api.remove("ServiceExport", "default", "ratings"));
    eventually("the export withdrawn", || {
        store
            .get("exports/default/ratings/east")
            .is_none()
            .then_some(())
    })
    .await;
    eventually("west's import gone", || {
        config(&west)
            .service("default", "ratings")
            .is_none()
            .then_some(())
    })
    .await;
    eventually("west's ServiceImport deleted", || {
        west.api
            .get("ServiceImport", "default", "ratings")
            .is_none()
            .then_some(())
    })
    .await;
    // East keeps serving its own service locally.
    assert!(config(&east).service("default", "ratings").is_some());
    east.control.shutdown().await;
    west.control.shutdown().await;
    store.shutdown().await;
}

#[tokio::test]
async fn endpoint_churn_converges_on_the_last_state() {
    let store = isthmus_testkit::store::one_member_store().await;
    let east = cluster("east", 1, &store).await;
    ratings(&east.api, 9080, "2025-01-01T00:00:00Z");
    // Pods come and go faster than anything settles: each round adds two pods to the
    // slices and removes the oldest, some of them not ready yet.
    let mut live: Vec<(String, String, bool)> = Vec::new();
    for i in 0..40u32 {
        let name = format!("ratings-c{i}");
        east.api
            .put(pod(&name, "ratings", if i % 2 == 0 { "v1" } else { "v2" }));
        live.push((
            name,
            format!("10.2.{}.{}", i / 200, i % 200 + 1),
            i % 3 != 0,
        ));
        if live.len() > 6 {
            let (gone, _, _) = live.remove(0);
            east.api.remove("Pod", "default", &gone);
        }
        // Two slices, as the EndpointSlice controller splits endpoints.
        let (a, b) = live.split_at(live.len() / 2);
        east.api.put(slice("ratings-a", "ratings", a));
        east.api.put(slice("ratings-b", "ratings", b));
        if i % 5 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let want: Vec<String> = {
        let mut v: Vec<String> = live.iter().map(|(_, ip, _)| format!("{ip}:9080")).collect();
        v.sort();
        v
    };
    let healthy = live.iter().filter(|(_, _, ready)| *ready).count() as u64;
    eventually("east's endpoints to match the last slices", || {
        let c = config(&east);
        let mut got: Vec<String> = c
            .service("default", "ratings")?
            .local_endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        got.sort();
        (got == want).then_some(())
    })
    .await;
    let record: Value = eventually("the export's counts", || {
        let r: Value =
            serde_json::from_slice(&store.get("exports/default/ratings/east")?.value).ok()?;
        (r["endpoints"] == want.len() as u64 && r["healthyEndpoints"] == healthy).then_some(r)
    })
    .await;
    assert_eq!(
        record["identities"],
        json!(["spiffe://east.isthmus.local/ns/default/sa/ratings"])
    );
    east.control.shutdown().await;
    store.shutdown().await;
}

#[tokio::test]
async fn a_port_conflict_sets_conflict_and_the_oldest_export_wins() {
    let store = isthmus_testkit::store::one_member_store().await;
    let east = cluster("east", 1, &store).await;
    let west = cluster("west", 2, &store).await;
    // East exported first, on 9080; west later, on 9090.
    ratings(&east.api, 9080, "2024-01-01T00:00:00Z");
    ratings(&west.api, 9090, "2024-06-01T00:00:00Z");
    let newer = eventually("Conflict=True on west's (newer) export", || {
        condition(&west.api, "ratings", "Conflict").filter(|c| c.0 == "True")
    })
    .await;
    assert_eq!(newer.1, "PortConflict");
    assert!(
        newer.2.contains("west") && newer.2.contains("cluster east"),
        "{}",
        newer.2
    );
    // The KEP puts the condition on every export of the conflicted service.
    let older = eventually("Conflict=True on east's export", || {
        condition(&east.api, "ratings", "Conflict").filter(|c| c.0 == "True")
    })
    .await;
    assert!(older.2.contains("cluster east"), "{}", older.2);
    assert_eq!(condition(&west.api, "ratings", "Valid").unwrap().0, "True");
    // The export records carry when each cluster exported.
    let record: Value =
        serde_json::from_slice(&store.get("exports/default/ratings/east").unwrap().value).unwrap();
    assert_eq!(record["exportedAtMs"], 1_704_067_200_000u64);

    // West aligns its ports: the conflict clears on both sides.
    west.api.put(service("ratings", 9080));
    for api in [&west.api, &east.api] {
        eventually("Conflict=False", || {
            condition(api, "ratings", "Conflict").filter(|c| c.0 == "False")
        })
        .await;
    }
    east.control.shutdown().await;
    west.control.shutdown().await;
    store.shutdown().await;
}

#[tokio::test]
async fn watches_survive_api_server_restarts_410_gone_and_bookmarks() {
    let store = isthmus_testkit::store::one_member_store().await;
    let mut east = cluster("east", 1, &store).await;
    ratings(&east.api, 9080, "2025-01-01T00:00:00Z");
    let exported = |name: &str| store.get(&format!("exports/default/{name}/east")).is_some();
    eventually("ratings exported", || exported("ratings").then_some(())).await;

    // Bookmarks move the watches' resource versions along and change nothing.
    let version = config(&east).version;
    east.api.bookmark();
    eventually("bookmarks delivered", || {
        (east.api.bookmarks_sent() >= 5).then_some(())
    })
    .await;
    east.api.put(service("details", 9080));
    east.api.put(export("details", "2025-01-02T00:00:00Z"));
    eventually("details exported", || exported("details").then_some(())).await;
    assert!(config(&east).version > version);

    // The API server restarts; what changed while it was down arrives when it is back,
    // by resuming the watches from their resource versions (no relist), and nothing
    // exported is withdrawn meanwhile.
    let (lists, watches) = (east.api.lists("services"), east.api.watches("services"));
    east.api.stop().await;
    east.api.put(service("reviews", 9080));
    east.api.put(export("reviews", "2025-01-03T00:00:00Z"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(exported("ratings") && exported("details"));
    east.api.restart().await;
    eventually("reviews exported after the restart", || {
        exported("reviews").then_some(())
    })
    .await;
    assert_eq!(east.api.lists("services"), lists, "resumed, not relisted");
    assert!(east.api.watches("services") > watches, "watched again");

    // History compacted: every watch's next resource version is too old, the server
    // answers 410 Gone, and the watchers relist and carry on.
    east.api.compact();
    east.api.put(service("productpage", 9080));
    east.api.put(export("productpage", "2025-01-04T00:00:00Z"));
    east.api.remove("ServiceExport", "default", "details");
    eventually(
        "productpage exported and details withdrawn after 410",
        || (exported("productpage") && !exported("details")).then_some(()),
    )
    .await;
    assert!(east.api.gone_sent() >= 5, "every watch got 410");
    assert!(east.api.lists("services") > lists, "relisted after 410");
    assert!(exported("ratings") && exported("reviews"));
    east.control.shutdown().await;
    store.shutdown().await;
}
