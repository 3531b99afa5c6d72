use super::*;
use isthmus_core::policy::parse_documents;

fn config(yaml: &str) -> MeshConfig {
    MeshConfig {
        policies: parse_documents("authz.yaml", yaml).unwrap(),
        ..MeshConfig::default()
    }
}

fn ratings() -> Workload {
    Workload {
        namespace: "default".into(),
        labels: [("app".to_string(), "ratings".to_string())].into(),
    }
}

fn id(td: &str, ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(td, ns, sa)
}

fn http<'a>(
    caller: Option<&'a SpiffeId>,
    method: &'a str,
    path: &'a str,
    headers: &'a HeaderMap,
) -> Inbound<'a> {
    Inbound {
        caller,
        port: 9080,
        method: Some(method),
        path: Some(path),
        headers: Some(headers),
        auth: None,
    }
}

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-readers}
spec:
  selector: {matchLabels: {app: ratings}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["east.isthmus.local/ns/default/sa/sleep", "*/ns/default/sa/productpage"]}
    to:
    - operation: {methods: [GET], paths: ["/ratings/*", "/health"], ports: ["9080"]}
  - from:
    - source: {namespaces: [ops]}
    when:
    - key: request.headers[x-ticket]
      values: ["OPS-*"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin}
spec:
  action: DENY
  rules:
  - to:
    - operation: {paths: ["/admin*"]}
"#;

#[test]
fn allow_rules_admit_only_matching_callers_and_operations() {
    let c = config(POLICIES);
    let h = HeaderMap::new();
    let sleep = id("east.isthmus.local", "default", "sleep");
    let pp = id("west.isthmus.local", "default", "productpage");
    let other = id("east.isthmus.local", "default", "reviews");
    assert_eq!(
        authorize(&c, &ratings(), &http(Some(&sleep), "GET", "/ratings/1", &h)),
        Verdict::Allow
    );
    assert_eq!(
        authorize(&c, &ratings(), &http(Some(&pp), "GET", "/health", &h)),
        Verdict::Allow
    );
    assert!(matches!(
        authorize(
            &c,
            &ratings(),
            &http(Some(&sleep), "POST", "/ratings/1", &h)
        ),
        Verdict::Deny(_)
    ));
    assert!(matches!(
        authorize(&c, &ratings(), &http(Some(&other), "GET", "/ratings/1", &h)),
        Verdict::Deny(_)
    ));
    assert!(matches!(
        authorize(&c, &ratings(), &http(None, "GET", "/ratings/1", &h)),
        Verdict::Deny(_)
    ));
}

#[test]
fn when_conditions_read_request_headers() {
    let c = config(POLICIES);
    let ops = id("central.isthmus.local", "ops", "oncall");
    let mut h = HeaderMap::new();
    assert!(matches!(
        authorize(&c, &ratings(), &http(Some(&ops), "DELETE", "/x", &h)),
        Verdict::Deny(_)
    ));
    h.insert("x-ticket", "OPS-1234".parse().unwrap());
    assert_eq!(
        authorize(&c, &ratings(), &http(Some(&ops), "DELETE", "/x", &h)),
        Verdict::Allow
    );
}

#[test]
fn deny_wins_over_allow() {
    let c = config(POLICIES);
    let h = HeaderMap::new();
    let ops = id("central.isthmus.local", "ops", "oncall");
    let mut ticket = HeaderMap::new();
    ticket.insert("x-ticket", "OPS-1".parse().unwrap());
    assert_eq!(
        authorize(
            &c,
            &ratings(),
            &http(Some(&ops), "GET", "/admin/users", &ticket)
        ),
        Verdict::Deny("default/no-admin".into())
    );
    // DENY applies to every workload in the namespace, even without ALLOW policies.
    let details = Workload {
        namespace: "default".into(),
        labels: [("app".to_string(), "details".to_string())].into(),
    };
    assert!(matches!(
        authorize(&c, &details, &http(Some(&ops), "GET", "/admin", &h)),
        Verdict::Deny(_)
    ));
    assert_eq!(
        authorize(&c, &details, &http(Some(&ops), "GET", "/", &h)),
        Verdict::Allow
    );
}

#[test]
fn no_policies_allow_everything_and_an_empty_allow_denies_everything() {
    let h = HeaderMap::new();
    let sleep = id("east.isthmus.local", "default", "sleep");
    assert_eq!(
        authorize(
            &MeshConfig::default(),
            &ratings(),
            &http(Some(&sleep), "GET", "/", &h)
        ),
        Verdict::Allow
    );
    let deny_all = config("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all}\nspec: {}\n");
    assert!(matches!(
        authorize(&deny_all, &ratings(), &http(Some(&sleep), "GET", "/", &h)),
        Verdict::Deny(_)
    ));
    let allow_all = config("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-all}\nspec: {rules: [{}]}\n");
    assert_eq!(
        authorize(&allow_all, &ratings(), &http(Some(&sleep), "GET", "/", &h)),
        Verdict::Allow
    );
}

#[test]
fn policies_in_other_namespaces_do_not_apply_but_the_root_namespace_does() {
    let h = HeaderMap::new();
    let sleep = id("east.isthmus.local", "default", "sleep");
    let elsewhere = config("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: shop}\nspec: {}\n");
    assert_eq!(
        authorize(&elsewhere, &ratings(), &http(Some(&sleep), "GET", "/", &h)),
        Verdict::Allow
    );
    let root = config("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: isthmus-system}\nspec: {}\n");
    assert!(matches!(
        authorize(&root, &ratings(), &http(Some(&sleep), "GET", "/", &h)),
        Verdict::Deny(_)
    ));
}

#[test]
fn opaque_tcp_never_matches_http_only_rules() {
    let c = config(POLICIES);
    let sleep = id("east.isthmus.local", "default", "sleep");
    let tcp = Inbound {
        caller: Some(&sleep),
        port: 9080,
        method: None,
        path: None,
        headers: None,
        auth: None,
    };
    assert!(matches!(authorize(&c, &ratings(), &tcp), Verdict::Deny(_)));
}

#[test]
fn the_most_specific_peer_authentication_wins_and_strict_is_the_default() {
    assert_eq!(
        mtls_mode(&MeshConfig::default(), &ratings(), 9080),
        MtlsMode::Strict
    );
    let mesh_permissive = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: isthmus-system}\nspec: {mtls: {mode: PERMISSIVE}}\n";
    assert_eq!(
        mtls_mode(&config(mesh_permissive), &ratings(), 9080),
        MtlsMode::Permissive
    );
    let ns_strict = format!("{mesh_permissive}---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default}}\nspec: {{mtls: {{mode: STRICT}}}}\n");
    assert_eq!(
        mtls_mode(&config(&ns_strict), &ratings(), 9080),
        MtlsMode::Strict
    );
    let workload = format!("{ns_strict}---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: ratings}}\nspec: {{selector: {{matchLabels: {{app: ratings}}}}, mtls: {{mode: PERMISSIVE}}}}\n");
    assert_eq!(
        mtls_mode(&config(&workload), &ratings(), 9080),
        MtlsMode::Permissive
    );
    let details = Workload {
        namespace: "default".into(),
        labels: [("app".to_string(), "details".to_string())].into(),
    };
    assert_eq!(
        mtls_mode(&config(&workload), &details, 9080),
        MtlsMode::Strict
    );
}

fn federation(yaml: &str) -> MeshConfig {
    let member = |name: &str| isthmus_core::mesh::ClusterInfo {
        name: name.into(),
        trust_domain: format!("{name}.isthmus.local"),
        gateway: None,
        ca_bundle_pem: String::new(),
        locality: None,
    };
    MeshConfig {
        cluster: "central".into(),
        clusters: vec![member("central"), member("east"), member("west")],
        ..config(yaml)
    }
}

#[test]
fn cluster_local_names_the_service_account_in_every_member_cluster() {
    // As Istio's documentation and nearly every policy in the wild write it.
    let c = federation(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-from-sleep}
spec:
  selector: {matchLabels: {app: ratings}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/sleep", "cluster.local/ns/ops/*"]}
"#,
    );
    let h = HeaderMap::new();
    let verdict =
        |caller: &SpiffeId| authorize(&c, &ratings(), &http(Some(caller), "GET", "/", &h));
    for td in ["central", "east", "west"] {
        let td = format!("{td}.isthmus.local");
        assert_eq!(
            verdict(&id(&td, "default", "sleep")),
            Verdict::Allow,
            "{td}"
        );
        assert_eq!(verdict(&id(&td, "ops", "oncall")), Verdict::Allow, "{td}");
        assert!(matches!(
            verdict(&id(&td, "default", "reviews")),
            Verdict::Deny(_)
        ));
        assert!(matches!(
            verdict(&id(&td, "other", "sleep")),
            Verdict::Deny(_)
        ));
    }
    // A trust domain that is no member's is not the mesh's.
    assert!(matches!(
        verdict(&id("evil.example", "default", "sleep")),
        Verdict::Deny(_)
    ));
    assert!(matches!(
        authorize(&c, &ratings(), &http(None, "GET", "/", &h)),
        Verdict::Deny(_)
    ));
}

#[test]
fn an_explicit_trust_domain_names_one_cluster_only_and_cluster_local_works_in_deny_and_when() {
    let c = federation(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-east}
spec:
  selector: {matchLabels: {app: ratings}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["east.isthmus.local/ns/default/sa/sleep"]}
  - when:
    - key: source.principal
      values: ["cluster.local/ns/default/sa/productpage"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-reviews}
spec:
  action: DENY
  rules:
  - from:
    - source: {notPrincipals: ["cluster.local/ns/default/sa/productpage", "cluster.local/ns/default/sa/sleep"]}
"#,
    );
    let h = HeaderMap::new();
    let verdict =
        |caller: &SpiffeId| authorize(&c, &ratings(), &http(Some(caller), "GET", "/", &h));
    assert_eq!(
        verdict(&id("east.isthmus.local", "default", "sleep")),
        Verdict::Allow
    );
    assert!(matches!(
        verdict(&id("west.isthmus.local", "default", "sleep")),
        Verdict::Deny(p) if p.starts_with("no ALLOW policy matched")
    ));
    for td in ["central", "east", "west"] {
        let td = format!("{td}.isthmus.local");
        assert_eq!(
            verdict(&id(&td, "default", "productpage")),
            Verdict::Allow,
            "{td}"
        );
        assert_eq!(
            verdict(&id(&td, "default", "reviews")),
            Verdict::Deny("default/no-reviews".into()),
            "{td}"
        );
    }
}

#[test]
fn principal_patterns_read_cluster_local_only_as_a_whole_trust_domain() {
    let members = ["east.isthmus.local"];
    let m = |p: &str, v: &str| principal_matches(p, v, &members);
    assert!(m("cluster.local/ns/a/sa/b", "east.isthmus.local/ns/a/sa/b"));
    assert!(m("cluster.local/*", "east.isthmus.local/ns/a/sa/b"));
    assert!(!m(
        "cluster.local/ns/a/sa/b",
        "west.isthmus.local/ns/a/sa/b"
    ));
    assert!(!m(
        "cluster.localx/ns/a/sa/b",
        "east.isthmus.local/ns/a/sa/b"
    ));
    assert!(!m(
        "cluster.local/ns/a/sa/b",
        "east.isthmus.local/ns/a/sa/bb"
    ));
    assert!(m("*/ns/a/sa/b", "west.isthmus.local/ns/a/sa/b"));
    assert!(m("*", "anything"));
    // A mesh whose trust domain really is cluster.local keeps its literal meaning.
    assert!(principal_matches(
        "cluster.local/ns/a/sa/b",
        "cluster.local/ns/a/sa/b",
        &["cluster.local"]
    ));
}

#[test]
fn port_level_mtls_overrides_the_workload_mode_on_its_port_only() {
    // As Istio's documentation writes it: STRICT for the workload, PERMISSIVE on 8080.
    let c = config(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: ratings}\nspec:\n  selector: {matchLabels: {app: ratings}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: PERMISSIVE}\n    9090: {mode: UNSET}\n",
    );
    assert_eq!(mtls_mode(&c, &ratings(), 8080), MtlsMode::Permissive);
    assert_eq!(mtls_mode(&c, &ratings(), 9080), MtlsMode::Strict);
    // UNSET inherits the workload's mode.
    assert_eq!(mtls_mode(&c, &ratings(), 9090), MtlsMode::Strict);
    let details = Workload {
        namespace: "default".into(),
        labels: [("app".to_string(), "details".to_string())].into(),
    };
    assert_eq!(mtls_mode(&c, &details, 8080), MtlsMode::Strict);
    // A workload-level UNSET inherits the namespace's mode, ports still override it.
    let c = config(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default}\nspec: {mtls: {mode: PERMISSIVE}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: ratings}\nspec:\n  selector: {matchLabels: {app: ratings}}\n  mtls: {mode: UNSET}\n  portLevelMtls: {8080: {mode: STRICT}}\n",
    );
    assert_eq!(mtls_mode(&c, &ratings(), 9080), MtlsMode::Permissive);
    assert_eq!(mtls_mode(&c, &ratings(), 8080), MtlsMode::Strict);
}
