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
        headless: false,
        ports: http(),
        endpoints: vec![LocalEndpoint {
            address: "127.1.0.1:15006".parse().unwrap(),
            service_account: sa.into(),
            labels: [("version".to_string(), "v1".to_string())].into(),
            healthy: true,
            hostname: None,
            ports: Default::default(),
        }],
        exported_at_ms: None,
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
        headless: None,
        exported_at_ms: None,
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

/// A headless `web` with two endpoints here: `web-0` (ready) and one without a hostname.
fn headless_web(export: bool) -> LocalService {
    let mut s = local("web", export, "web");
    s.headless = true;
    s.endpoints[0].hostname = Some("web-0".into());
    let mut other = s.endpoints[0].clone();
    other.address = "127.1.0.2:15006".parse().unwrap();
    other.hostname = None;
    other.healthy = false;
    s.endpoints.push(other);
    s
}

fn headless_export(cluster: &str, endpoints: &[(&str, Option<&str>, bool)]) -> ExportRecord {
    let mut x = export(cluster, "web");
    x.headless = Some(HeadlessExport {
        endpoints: endpoints
            .iter()
            .map(|(id, hostname, ready)| ExportedEndpoint {
                id: (*id).into(),
                hostname: hostname.map(Into::into),
                ready: *ready,
            })
            .collect(),
    });
    x
}

#[test]
fn headless_endpoints_get_vips_of_their_own_here_and_from_other_clusters() {
    let mut c = catalog();
    let d = Discovery {
        services: vec![headless_web(true)],
    };
    let clusters = [
        cluster("east", None),
        cluster("west", Some("127.0.0.2:15443")),
    ];
    let exports = [headless_export("west", &[("web-0", Some("web-0"), true)])];
    let cfg = c.rebuild(&d, &clusters, &exports, &[]).unwrap();
    let web = cfg.service("default", "web").unwrap();
    let headless = web.headless.as_ref().expect("web is headless");
    let got: Vec<(&str, &str, Option<&str>, bool)> = headless
        .endpoints
        .iter()
        .map(|e| {
            (
                e.cluster.as_str(),
                e.id.as_str(),
                e.hostname.as_deref(),
                e.ready,
            )
        })
        .collect();
    let generated = d.services[0].endpoints[1].headless_id();
    assert_eq!(
        got,
        [
            ("east", generated.as_str(), None, false),
            ("east", "web-0", Some("web-0"), true),
            ("west", "web-0", Some("web-0"), true),
        ]
    );
    // Every endpoint its own VIP, none the service's.
    let mut vips: Vec<IpAddr> = headless.endpoints.iter().map(|e| e.vip).collect();
    vips.push(web.vip);
    vips.sort();
    vips.dedup();
    assert_eq!(vips.len(), 4);
    // The local endpoints carry the label that selects them at the gateway.
    for e in headless.endpoints.iter().filter(|e| e.cluster == "east") {
        let local = web.local_endpoint(e).expect("labelled");
        assert_eq!(local.labels["version"], "v1");
    }
    assert_eq!(
        cfg.endpoint_by_vip(headless.endpoints[2].vip)
            .unwrap()
            .1
            .cluster,
        "west"
    );
}

#[test]
fn headless_endpoint_vips_stay_stable_while_endpoints_come_and_go() {
    let mut c = catalog();
    let d = Discovery {
        services: vec![headless_web(false)],
    };
    let clusters = [
        cluster("east", None),
        cluster("west", Some("127.0.0.2:15443")),
    ];
    let two = [headless_export(
        "west",
        &[
            ("web-0", Some("web-0"), true),
            ("web-1", Some("web-1"), true),
        ],
    )];
    let vip_of = |cfg: &MeshConfig, cluster: &str, id: &str| {
        let web = cfg.service("default", "web").unwrap();
        web.headless
            .as_ref()
            .unwrap()
            .endpoints
            .iter()
            .find(|e| e.cluster == cluster && e.id == id)
            .map(|e| e.vip)
    };
    let cfg = c.rebuild(&d, &clusters, &two, &[]).unwrap();
    let web1 = vip_of(&cfg, "west", "web-1").unwrap();
    let local0 = vip_of(&cfg, "east", "web-0").unwrap();
    let one = [headless_export("west", &[("web-1", Some("web-1"), false)])];
    let cfg = c.rebuild(&d, &clusters, &one, &[]).unwrap();
    assert_eq!(vip_of(&cfg, "west", "web-0"), None);
    assert_eq!(vip_of(&cfg, "west", "web-1"), Some(web1));
    let cfg = c.rebuild(&d, &clusters, &two, &[]).unwrap();
    assert_eq!(vip_of(&cfg, "west", "web-1"), Some(web1));
    assert_eq!(vip_of(&cfg, "east", "web-0"), Some(local0));
}

#[test]
fn headless_exports_list_endpoints_by_id_without_addresses() {
    let c = catalog();
    let d = Discovery {
        services: vec![headless_web(true), local("plain", true, "plain")],
    };
    let exports = c.exports(&d);
    let web = exports.iter().find(|x| x.name == "web").unwrap();
    let endpoints = &web.headless.as_ref().unwrap().endpoints;
    assert_eq!(endpoints[0].id, "web-0");
    assert_eq!(endpoints[0].hostname.as_deref(), Some("web-0"));
    assert!(endpoints[0].ready);
    assert!(endpoints[1].id.starts_with("ep.") && !endpoints[1].ready);
    let json = serde_json::to_string(web).unwrap();
    assert!(!json.contains("127.1.0"), "{json}");
    // A ClusterSetIP service's record has no headless field at all.
    let plain = exports.iter().find(|x| x.name == "plain").unwrap();
    assert!(!serde_json::to_string(plain).unwrap().contains("headless"));
}

#[test]
fn a_service_headless_in_only_some_clusters_is_a_clusterset_ip_service() {
    let mut c = catalog();
    let clusters = [
        cluster("east", None),
        cluster("west", Some("127.0.0.2:15443")),
        cluster("central", Some("127.0.0.3:15443")),
    ];
    let exports = [
        headless_export("west", &[("web-0", Some("web-0"), true)]),
        export("central", "web"),
    ];
    let cfg = c
        .rebuild(&Discovery::default(), &clusters, &exports, &[])
        .unwrap();
    let web = cfg.service("default", "web").unwrap();
    assert_eq!(web.headless, None);
    assert_eq!(web.remote.len(), 2);
}

#[test]
fn imported_headless_endpoints_with_unusable_ids_are_skipped() {
    let mut c = catalog();
    let clusters = [
        cluster("east", None),
        cluster("west", Some("127.0.0.2:15443")),
    ];
    let exports = [headless_export(
        "west",
        &[
            ("web-0", Some("web-0"), true),
            ("a,b=c", None, true),
            ("Bad_Host", Some("Bad_Host"), true),
            ("other", Some("web-9"), true),
        ],
    )];
    let cfg = c
        .rebuild(&Discovery::default(), &clusters, &exports, &[])
        .unwrap();
    let web = cfg.service("default", "web").unwrap();
    let ids: Vec<&str> = web
        .headless
        .as_ref()
        .unwrap()
        .endpoints
        .iter()
        .map(|e| e.id.as_str())
        .collect();
    assert_eq!(ids, ["web-0"]);
}

#[test]
fn a_port_declared_differently_takes_the_oldest_exports_declaration() {
    let clusters = [
        cluster("east", None),
        cluster("west", Some("127.0.0.2:15443")),
        cluster("central", Some("127.0.0.3:15443")),
    ];
    let mut newer = export("central", "ratings");
    newer.exported_at_ms = Some(2_000);
    let mut older = export("west", "ratings");
    older.exported_at_ms = Some(1_000);
    older.ports = vec![ServicePort {
        name: "tcp-legacy".into(),
        port: 9080,
        protocol: Protocol::Tcp,
    }];
    // Whatever order the store lists them in.
    for exports in [
        [newer.clone(), older.clone()],
        [older.clone(), newer.clone()],
    ] {
        let cfg = catalog()
            .rebuild(&Discovery::default(), &clusters, &exports, &[])
            .unwrap();
        let ratings = cfg.service("default", "ratings").unwrap();
        assert_eq!(ratings.ports, older.ports, "west exported first");
    }
}
