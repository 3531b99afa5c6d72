use super::*;
use crate::discovery::{LocalEndpoint, LocalService};
use isthmus_core::mesh::Protocol;

fn http() -> Vec<ServicePort> {
    vec![ServicePort {
        name: "http".into(),
        port: 9080,
        protocol: Protocol::Http,
    }]
}

fn local(name: &str, export: bool, sa: &str) -> LocalService {
    LocalService {
        name: name.into(),
        namespace: "default".into(),
        export,
        ports: http(),
        endpoints: vec![LocalEndpoint {
            address: "127.1.0.1:15006".parse().unwrap(),
            service_account: sa.into(),
            labels: [("version".to_string(), "v1".to_string())].into(),
            healthy: true,
        }],
    }
}

fn cluster(name: &str, gateway: Option<&str>) -> ClusterRecord {
    ClusterRecord {
        name: name.into(),
        trust_domain: format!("{name}.isthmus.local"),
        gateway: gateway.map(|g| g.parse().unwrap()),
        ca_bundle_pem: format!("PEM-{name}"),
        locality: None,
        member_id: None,
        control: None,
    }
}

fn export(cluster: &str, name: &str) -> ExportRecord {
    ExportRecord {
        cluster: cluster.into(),
        namespace: "default".into(),
        name: name.into(),
        ports: http(),
        identities: vec![format!(
            "spiffe://{cluster}.isthmus.local/ns/default/sa/{name}"
        )],
        endpoints: 1,
        healthy_endpoints: 1,
        subsets: BTreeMap::new(),
        lease_expired_at_ms: None,
    }
}

fn catalog() -> Catalog {
    Catalog::new(
        "east",
        "east.isthmus.local",
        "127.10.0.0/16".parse().unwrap(),
    )
}

#[test]
fn local_services_get_vips_and_endpoint_identities() {
    let mut c = catalog();
    let d = Discovery {
        services: vec![
            local("details", true, "details"),
            local("productpage", false, "pp"),
        ],
    };
    let cfg = c.rebuild(&d, &[cluster("east", None)], &[], &[]).unwrap();
    let details = cfg.service("default", "details").unwrap();
    assert_eq!(details.vip.to_string(), "127.10.0.1");
    assert_eq!(
        details.local_endpoints[0].identity,
        "spiffe://east.isthmus.local/ns/default/sa/details"
    );
    assert!(details.exported);
    assert!(!cfg.service("default", "productpage").unwrap().exported);
    assert_eq!(cfg.version, 1);
}

#[test]
fn remote_exports_are_imported_through_their_gateways() {
    let mut c = catalog();
    let d = Discovery {
        services: vec![local("details", true, "details")],
    };
    let clusters = [
        cluster("east", None),
        cluster("west", Some("127.0.0.2:15443")),
        cluster("central", Some("127.0.0.3:15443")),
    ];
    let exports = [
        export("west", "details"),
        export("central", "ratings"),
        export("west", "ratings"),
        export("east", "details"),
    ];
    let cfg = c.rebuild(&d, &clusters, &exports, &[]).unwrap();
    let ratings = cfg.service("default", "ratings").unwrap();
    assert!(ratings.local_endpoints.is_empty());
    let remote: Vec<&str> = ratings.remote.iter().map(|r| r.cluster.as_str()).collect();
    assert_eq!(remote, ["central", "west"]);
    assert_eq!(ratings.ports, http());
    let details = cfg.service("default", "details").unwrap();
    // Our own export is not a remote; west's is.
    assert_eq!(details.remote.len(), 1);
    assert_eq!(details.remote[0].cluster, "west");
    assert_eq!(details.identities.len(), 2);
    assert_eq!(
        cfg.clusters
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["central", "east", "west"]
    );
}

#[test]
fn exports_from_clusters_without_a_gateway_are_not_routable() {
    let mut c = catalog();
    let cfg = c
        .rebuild(
            &Discovery::default(),
            &[cluster("east", None), cluster("west", None)],
            &[export("west", "ratings")],
            &[],
        )
        .unwrap();
    assert!(cfg.service("default", "ratings").is_none());
}

#[test]
fn vips_stay_stable_when_a_service_leaves_and_returns() {
    let mut c = catalog();
    let both = Discovery {
        services: vec![local("a", false, "a"), local("b", false, "b")],
    };
    let cfg = c.rebuild(&both, &[], &[], &[]).unwrap();
    let b_vip = cfg.service("default", "b").unwrap().vip;
    let only_b = Discovery {
        services: vec![local("b", false, "b")],
    };
    let cfg = c.rebuild(&only_b, &[], &[], &[]).unwrap();
    assert_eq!(cfg.service("default", "b").unwrap().vip, b_vip);
    let cfg = c.rebuild(&both, &[], &[], &[]).unwrap();
    assert_eq!(
        cfg.service("default", "a").unwrap().vip.to_string(),
        "127.10.0.1"
    );
}

#[test]
fn version_moves_only_when_content_changes() {
    let mut c = catalog();
    let d = Discovery {
        services: vec![local("a", false, "a")],
    };
    assert_eq!(c.rebuild(&d, &[], &[], &[]).unwrap().version, 1);
    assert!(c.rebuild(&d, &[], &[], &[]).is_none());
    let d2 = Discovery {
        services: vec![local("a", true, "a")],
    };
    assert_eq!(c.rebuild(&d2, &[], &[], &[]).unwrap().version, 2);
}

#[test]
fn exports_summarise_healthy_endpoints_and_subsets() {
    let c = catalog();
    let mut s = local("reviews", true, "reviews");
    let mut sick = s.endpoints[0].clone();
    sick.healthy = false;
    s.endpoints.push(sick);
    let d = Discovery {
        services: vec![s, local("internal", false, "x")],
    };
    let exports = c.exports(&d);
    assert_eq!(exports.len(), 1);
    assert_eq!(exports[0].endpoints, 2);
    assert_eq!(exports[0].healthy_endpoints, 1);
    assert_eq!(exports[0].subsets["version=v1"], 1);
}

#[test]
fn an_exhausted_vip_range_skips_services_instead_of_failing() {
    let mut c = Catalog::new(
        "east",
        "east.isthmus.local",
        "127.10.0.0/30".parse().unwrap(),
    );
    let d = Discovery {
        services: vec![
            local("a", false, "a"),
            local("b", false, "b"),
            local("c", false, "c"),
        ],
    };
    let cfg = c.rebuild(&d, &[], &[], &[]).unwrap();
    assert_eq!(cfg.services.len(), 2);
}
