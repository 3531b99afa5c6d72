use super::*;
use isthmus_core::policy::parse_documents;

fn table(yaml: &str) -> RouteTable {
    let config = MeshConfig {
        policies: parse_documents("t.yaml", yaml).unwrap(),
        ..MeshConfig::default()
    };
    RouteTable::build(&config)
}

fn key(s: &str) -> ServiceKey {
    (s.to_string(), "default".to_string())
}

static NO_SOURCE: std::sync::LazyLock<SourceWorkload> =
    std::sync::LazyLock::new(SourceWorkload::default);

fn view<'a>(method: &'a str, path: &'a str, headers: &'a HeaderMap) -> RequestView<'a> {
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    RequestView {
        method,
        path,
        query,
        headers,
        port: 9080,
        authority: "reviews:9080",
        scheme: "http",
        source: &NO_SOURCE,
    }
}

const REVIEWS: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        end-user: {exact: jason}
    route:
    - destination: {host: reviews, subset: v2}
  - match:
    - uri: {prefix: /api/}
      method: {exact: POST}
    - queryParams:
        debug: {regex: "t(rue)?"}
    route:
    - destination: {host: reviews, subset: v3}
    timeout: 2s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "5xx,connect-failure"}
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 80
    - destination: {host: reviews.default.svc.cluster.local, subset: v3}
      weight: 20
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    portLevelSettings:
    - port: {number: 9080}
      loadBalancer: {simple: LEAST_REQUEST}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {simple: RANDOM}
      outlierDetection: {consecutive5xxErrors: 3}
  - name: v3
    labels: {version: v3}
"#;

fn subset(route: &HttpRoute, roll: f64) -> Option<String> {
    route.pick(roll).and_then(|d| d.subset.clone())
}

#[test]
fn header_match_routes_the_user_to_its_subset() {
    let t = table(REVIEWS);
    let mut h = HeaderMap::new();
    h.insert("end-user", "jason".parse().unwrap());
    let r = t
        .http_route(&key("reviews"), &view("GET", "/", &h))
        .unwrap();
    assert_eq!(subset(&r, 0.5).as_deref(), Some("v2"));
    h.insert("end-user", "json".parse().unwrap());
    let r = t
        .http_route(&key("reviews"), &view("GET", "/", &h))
        .unwrap();
    assert_ne!(subset(&r, 0.1).as_deref(), Some("v2"));
}

#[test]
fn source_labels_and_namespace_select_the_calling_workload() {
    // Istio's task: requests from v2 of productpage (in bookinfo) to reviews go to v2.
    let t = table(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match:
    - sourceLabels: {app: productpage, version: v2}
      sourceNamespace: bookinfo
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
"#,
    );
    let h = HeaderMap::new();
    let from = |namespace: &str, labels: &[(&str, &str)]| {
        let source = SourceWorkload {
            namespace: namespace.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let view = RequestView {
            source: &source,
            ..view("GET", "/", &h)
        };
        subset(&t.http_route(&key("reviews"), &view).unwrap(), 0.0)
    };
    let v2 = [("app", "productpage"), ("version", "v2"), ("team", "a")];
    assert_eq!(from("bookinfo", &v2).as_deref(), Some("v2"));
    assert_eq!(from("default", &v2).as_deref(), Some("v1"));
    assert_eq!(
        from("bookinfo", &[("app", "productpage"), ("version", "v1")]).as_deref(),
        Some("v1")
    );
    assert_eq!(
        from("bookinfo", &[("app", "productpage")]).as_deref(),
        Some("v1")
    );
}

#[test]
fn authority_scheme_and_without_headers_match_as_istios() {
    let t = table(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match:
    - authority: {prefix: "reviews.internal"}
      scheme: {exact: http}
      withoutHeaders:
        x-canary: {exact: "no"}
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
"#,
    );
    let pick = |authority: &str, headers: &HeaderMap| {
        let view = RequestView {
            authority,
            ..view("GET", "/", headers)
        };
        subset(&t.http_route(&key("reviews"), &view).unwrap(), 0.0)
    };
    let none = HeaderMap::new();
    assert_eq!(pick("reviews.internal:9080", &none).as_deref(), Some("v2"));
    assert_eq!(pick("reviews:9080", &none).as_deref(), Some("v1"));
    let mut yes = HeaderMap::new();
    yes.insert("x-canary", "yes".parse().unwrap());
    assert_eq!(pick("reviews.internal", &yes).as_deref(), Some("v2"));
    let mut no = HeaderMap::new();
    no.insert("x-canary", "no".parse().unwrap());
    assert_eq!(pick("reviews.internal", &no).as_deref(), Some("v1"));
}

#[test]
fn uri_method_and_query_matches_follow_istio_semantics() {
    let t = table(REVIEWS);
    let h = HeaderMap::new();
    let v3 = |m, p| {
        subset(
            &t.http_route(&key("reviews"), &view(m, p, &h)).unwrap(),
            0.0,
        )
    };
    assert_eq!(v3("POST", "/api/x").as_deref(), Some("v3"));
    // Within one match entry every condition must hold: GET on /api/ falls through.
    assert_eq!(v3("GET", "/api/x").as_deref(), Some("v1"));
    // Entries are alternatives: the query entry matches alone.
    assert_eq!(v3("GET", "/?debug=true").as_deref(), Some("v3"));
    assert_eq!(v3("GET", "/?debug=t").as_deref(), Some("v3"));
    // Regexes are full matches.
    assert_eq!(v3("GET", "/?debug=trueish").as_deref(), Some("v1"));
    let r = t
        .http_route(&key("reviews"), &view("POST", "/api/x", &h))
        .unwrap();
    assert_eq!(r.timeout, Some(Duration::from_secs(2)));
    let retry = r.retries.unwrap();
    assert_eq!(
        (retry.attempts, retry.per_try_timeout),
        (3, Some(Duration::from_millis(500)))
    );
}

#[test]
fn weights_split_traffic_in_proportion() {
    let t = table(REVIEWS);
    let h = HeaderMap::new();
    let r = t
        .http_route(&key("reviews"), &view("GET", "/", &h))
        .unwrap();
    let n = 1000;
    let v1 = (0..n)
        .filter(|i| subset(&r, *i as f64 / n as f64).as_deref() == Some("v1"))
        .count();
    assert_eq!(v1, 800);
    // Hosts written as FQDNs resolve to the same service.
    assert_eq!(r.pick(0.9).unwrap().service, key("reviews"));
}

#[test]
fn services_without_a_virtual_service_route_to_themselves() {
    let t = table(REVIEWS);
    let h = HeaderMap::new();
    let r = t
        .http_route(&key("ratings"), &view("GET", "/", &h))
        .unwrap();
    let d = r.pick(0.3).unwrap();
    assert_eq!(
        (d.service.clone(), d.subset.clone()),
        (key("ratings"), None)
    );
    assert!(!t.has_http_routes(&key("ratings")));
}

#[test]
fn a_request_matching_no_route_gets_none() {
    let t = table(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n\
         spec: {hosts: [ratings], http: [{match: [{uri: {exact: /only}}], route: [{destination: {host: ratings}}]}]}\n",
    );
    let h = HeaderMap::new();
    assert!(t
        .http_route(&key("ratings"), &view("GET", "/other", &h))
        .is_none());
    assert!(t
        .http_route(&key("ratings"), &view("GET", "/only", &h))
        .is_some());
}

#[test]
fn subsets_and_policy_precedence_follow_istio() {
    let t = table(REVIEWS);
    assert_eq!(
        t.subset_labels(&key("reviews"), "v2").unwrap()["version"],
        "v2"
    );
    assert!(t.subset_labels(&key("reviews"), "v9").is_none());
    let simple = |p: EffectivePolicy| p.load_balancer.and_then(|lb| lb.simple);
    // Port-level beats top-level; subset beats both.
    assert_eq!(
        simple(t.policy(&key("reviews"), None, 9080)).as_deref(),
        Some("LEAST_REQUEST")
    );
    assert_eq!(
        simple(t.policy(&key("reviews"), None, 80)).as_deref(),
        Some("ROUND_ROBIN")
    );
    let v2 = t.policy(&key("reviews"), Some("v2"), 9080);
    assert_eq!(simple(v2.clone()).as_deref(), Some("RANDOM"));
    assert_eq!(v2.outlier_detection.unwrap().consecutive5xx_errors, Some(3));
}

#[test]
fn retry_conditions_classify_outcomes() {
    let p = RetryPolicy {
        attempts: 2,
        per_try_timeout: None,
        retry_on: vec!["5xx".into()],
        remote_localities: false,
    };
    assert!(
        p.retriable(Some(503), false) && p.retriable(None, true) && !p.retriable(Some(404), false)
    );
    let g = RetryPolicy {
        retry_on: vec!["gateway-error".into()],
        ..p.clone()
    };
    assert!(g.retriable(Some(502), false) && !g.retriable(Some(500), false));
    let c = RetryPolicy {
        retry_on: vec!["connect-failure".into(), "429".into()],
        ..p.clone()
    };
    assert!(c.retriable(None, true) && !c.retriable(None, false) && c.retriable(Some(429), false));
    let d = RetryPolicy::mesh_default();
    assert!(d.retriable(None, true) && !d.retriable(Some(503), false));
}

#[test]
fn redirects_rewrites_and_header_operations() {
    let t = table(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n\
         spec:\n  hosts: [ratings]\n  http:\n\
         \x20 - match: [{uri: {prefix: /old}}]\n    redirect: {uri: /new, redirectCode: 302}\n\
         \x20 - match: [{uri: {prefix: /v1/}}]\n    rewrite: {uri: /}\n    route: [{destination: {host: ratings}}]\n\
         \x20   headers: {request: {set: {x-a: '1'}, add: {x-b: '2'}, remove: [x-c]}}\n",
    );
    let h = HeaderMap::new();
    let r = t
        .http_route(&key("ratings"), &view("GET", "/old/x", &h))
        .unwrap();
    assert!(matches!(r.action, RouteAction::Redirect { code: 302, .. }));
    let req = view("GET", "/v1/ratings/7", &h);
    let r = t.http_route(&key("ratings"), &req).unwrap();
    let prefix = r.matched_prefix(&req);
    assert_eq!(
        rewrite_path("/v1/ratings/7", prefix.as_deref(), "/"),
        "/ratings/7"
    );
    let mut headers = HeaderMap::new();
    headers.insert("x-c", "gone".parse().unwrap());
    headers.insert("x-b", "1".parse().unwrap());
    apply_header_ops(
        &mut headers,
        r.headers.as_ref().unwrap().request.as_ref().unwrap(),
    );
    assert_eq!(headers["x-a"], "1");
    assert_eq!(headers.get_all("x-b").iter().count(), 2);
    assert!(headers.get("x-c").is_none());
}

#[test]
fn tcp_routes_select_by_port() {
    let t = table(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: db}\n\
         spec: {hosts: [db], tcp: [{match: [{port: 5432}], route: [{destination: {host: db-v2}}]}]}\n",
    );
    assert_eq!(
        t.tcp_route(&key("db"), 5432).unwrap()[0].service,
        key("db-v2")
    );
    assert!(t.tcp_route(&key("db"), 5433).is_none());
}

#[test]
fn tls_routes_select_by_port_and_server_name_in_order_then_tcp() {
    let t = table(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: db}\nspec:\n  hosts: [db]\n  tls:\n  - match: [{port: 5432, sniHosts: [primary.example.com]}]\n    route: [{destination: {host: primary}}]\n  - match: [{sniHosts: ['*.example.com']}]\n    route: [{destination: {host: replica}}]\n  tcp:\n  - route: [{destination: {host: fallback}}]\n",
    );
    let db = key("db");
    let to = |port, name: Option<&str>| {
        super::super::l4::routes(&t, &db, port, name).map(|d| d[0].service.0.clone())
    };
    assert!(t.has_tls_routes(&db));
    assert!(!t.has_tls_routes(&key("other")));
    for (port, name, want) in [
        (5432, Some("primary.example.com"), "primary"),
        // The first route names port 5432 only; the second takes any port.
        (5433, Some("primary.example.com"), "replica"),
        (5432, Some("PRIMARY.example.com"), "primary"),
        (5432, Some("r1.example.com"), "replica"),
        (5432, Some("example.com"), "fallback"),
        (5432, Some("db.internal"), "fallback"),
        (5432, None, "fallback"),
    ] {
        assert_eq!(to(port, name).as_deref(), Some(want), "{port} {name:?}");
    }
}
