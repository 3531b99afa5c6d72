use super::*;
use isthmus_core::mesh::MeshConfig;
use isthmus_core::policy::parse_documents;

fn table(yaml: &str) -> RouteTable {
    let config = MeshConfig {
        policies: if yaml.is_empty() {
            Vec::new()
        } else {
            parse_documents("t.yaml", yaml).unwrap()
        },
        ..MeshConfig::default()
    };
    RouteTable::build(&config)
}

fn key(s: &str) -> ServiceKey {
    (s.to_string(), "default".to_string())
}

fn head(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut req = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(()).unwrap().into_parts().0
}

const ROLLS: Rolls = Rolls {
    route: 0.5,
    delay: 0.5,
    abort: 0.5,
};

/// Plans a request to `reviews` on port 9080 with no rate limit.
fn plan_of(table: &RouteTable, parts: &mut http::request::Parts, rolls: Rolls) -> Plan {
    plan_with(table, parts, rolls, PathNormalization::Base, |_| Ok(()))
}

fn plan_with(
    table: &RouteTable,
    parts: &mut http::request::Parts,
    rolls: Rolls,
    paths: PathNormalization,
    limit: impl FnOnce(Option<&str>) -> Result<(), String>,
) -> Plan {
    let source = SourceWorkload::default();
    let inbound = Inbound {
        port: 9080,
        source: &source,
        paths,
    };
    plan(table, &key("reviews"), parts, &inbound, rolls, limit)
}

/// The destination (service, subset, port) and delay of a forwarded plan.
fn forwarded(plan: Plan) -> (String, Option<String>, Option<u16>, Option<Duration>) {
    match plan {
        Plan::Forward { dest, delay, .. } => (dest.service.0, dest.subset, dest.port, delay),
        Plan::Answer { answer, .. } => panic!("answered {answer:?}"),
    }
}

fn answered(plan: Plan) -> (Answer, Option<Duration>) {
    match plan {
        Plan::Answer { answer, delay } => (answer, delay),
        Plan::Forward { dest, .. } => panic!("forwarded to {dest:?}"),
    }
}

const VS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http:\n";

#[test]
fn without_a_virtual_service_the_request_goes_to_the_service_itself() {
    let mut parts = head("GET", "/a", &[]);
    assert_eq!(
        forwarded(plan_of(&table(""), &mut parts, ROLLS)),
        ("reviews".into(), None, None, None)
    );
}

#[test]
fn the_first_matching_route_wins_and_a_request_no_route_matches_is_404() {
    let t = table(&format!(
        "{VS}  - match: [{{uri: {{prefix: /v2}}}}]\n    route: [{{destination: {{host: reviews, subset: v2}}}}]\n\
         \x20 - match: [{{uri: {{prefix: /v}}}}]\n    route: [{{destination: {{host: reviews, subset: v1}}}}]\n\
         \x20 - match: [{{headers: {{end-user: {{exact: jason}}}}}}]\n    route: [{{destination: {{host: reviews, subset: v3, port: {{number: 9090}}}}}}]\n"
    ));
    for (uri, headers, subset, port) in [
        ("/v2/x", vec![], "v2", None),
        ("/v1/x", vec![], "v1", None),
        // Both of the first two match /v2; the first is taken.
        ("/v2", vec![("end-user", "jason")], "v2", None),
        ("/other", vec![("end-user", "jason")], "v3", Some(9090)),
    ] {
        let mut parts = head("GET", uri, &headers);
        let (service, s, p, _) = forwarded(plan_of(&t, &mut parts, ROLLS));
        assert_eq!(
            (service.as_str(), s.as_deref(), p),
            ("reviews", Some(subset), port),
            "{uri}"
        );
    }
    let mut parts = head("GET", "/other", &[]);
    let (answer, _) = answered(plan_of(&t, &mut parts, ROLLS));
    assert_eq!(
        (answer.status, answer.flag),
        (StatusCode::NOT_FOUND, Some("NR"))
    );
}

#[test]
fn weights_split_by_the_roll() {
    let t = table(&format!(
        "{VS}  - route:\n    - {{destination: {{host: reviews, subset: v1}}, weight: 20}}\n    - {{destination: {{host: reviews, subset: v2}}, weight: 80}}\n"
    ));
    for (roll, want) in [(0.0, "v1"), (0.19, "v1"), (0.2, "v2"), (0.99, "v2")] {
        let mut parts = head("GET", "/", &[]);
        let rolls = Rolls {
            route: roll,
            ..ROLLS
        };
        let (_, subset, _, _) = forwarded(plan_of(&t, &mut parts, rolls));
        assert_eq!(subset.as_deref(), Some(want), "roll {roll}");
    }
}

#[test]
fn paths_are_matched_and_forwarded_normalized_and_a_bad_one_is_400() {
    let t = table(&format!(
        "{VS}  - match: [{{uri: {{prefix: /admin}}}}]\n    route: [{{destination: {{host: admin}}}}]\n\
         \x20 - route: [{{destination: {{host: reviews}}}}]\n"
    ));
    for path in ["/x/../admin", "/./admin", "/%61dmin"] {
        let mut parts = head("GET", path, &[]);
        let (service, ..) = forwarded(plan_of(&t, &mut parts, ROLLS));
        assert_eq!(service, "admin", "{path}");
        assert_eq!(parts.uri.path(), "/admin", "{path} is forwarded normalized");
    }
    let mut parts = head("GET", "//admin", &[]);
    let merged = plan_with(
        &t,
        &mut parts,
        ROLLS,
        PathNormalization::MergeSlashes,
        |_| Ok(()),
    );
    assert_eq!(forwarded(merged).0, "admin");
    // A broken escape cannot be normalized: refused here, never forwarded as it came.
    let mut parts = head("GET", "/a%zzb", &[]);
    let (answer, _) = answered(plan_of(&t, &mut parts, ROLLS));
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{answer:?}");
}

#[test]
fn faults_delay_and_abort_below_their_percentages() {
    let t = table(&format!(
        "{VS}  - fault:\n      delay: {{fixedDelay: 7s, percentage: {{value: 50}}}}\n      abort: {{httpStatus: 503, percentage: {{value: 10}}}}\n    route: [{{destination: {{host: reviews}}}}]\n"
    ));
    let seven = Some(Duration::from_secs(7));
    for (delay, abort, want_delay, aborted) in [
        (0.49, 0.5, seven, false),
        (0.5, 0.5, None, false),
        (0.49, 0.09, seven, true),
        (0.9, 0.0, None, true),
    ] {
        let mut parts = head("GET", "/", &[]);
        let rolls = Rolls {
            route: 0.0,
            delay,
            abort,
        };
        match plan_of(&t, &mut parts, rolls) {
            Plan::Answer { answer, delay } => {
                assert!(aborted, "rolls {delay:?} {abort}");
                assert_eq!(
                    (answer.status, answer.flag, delay),
                    (StatusCode::SERVICE_UNAVAILABLE, Some("FI"), want_delay)
                );
            }
            Plan::Forward { delay, .. } => {
                assert!(!aborted);
                assert_eq!(delay, want_delay);
            }
        }
    }
}

#[test]
fn redirects_and_direct_responses_are_answered_here() {
    let t = table(&format!(
        "{VS}  - match: [{{uri: {{exact: /old}}}}]\n    redirect: {{uri: /new, authority: new.example.com, redirectCode: 308}}\n\
         \x20 - match: [{{uri: {{exact: /gone}}}}]\n    directResponse: {{status: 410, body: {{string: bye}}}}\n"
    ));
    let mut parts = head("GET", "/old", &[("host", "reviews:9080")]);
    let (answer, _) = answered(plan_of(&t, &mut parts, ROLLS));
    assert_eq!(answer.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        answer.headers[http::header::LOCATION],
        "http://new.example.com/new"
    );
    let mut parts = head("GET", "/gone", &[]);
    let (answer, _) = answered(plan_of(&t, &mut parts, ROLLS));
    assert_eq!(
        (answer.status, answer.body, answer.flag),
        (StatusCode::GONE, Bytes::from("bye"), Some("-"))
    );
}

#[test]
fn the_rate_limiter_is_asked_with_the_route_name_and_refuses_with_429() {
    let t = table(&format!(
        "{VS}  - name: main\n    route: [{{destination: {{host: reviews}}}}]\n"
    ));
    let mut asked = None;
    let mut parts = head("GET", "/", &[]);
    let (answer, _) = answered(plan_with(
        &t,
        &mut parts,
        ROLLS,
        PathNormalization::Base,
        |name| {
            asked = name.map(str::to_string);
            Err("default/limit".into())
        },
    ));
    assert_eq!(asked.as_deref(), Some("main"));
    assert_eq!(
        (answer.status, answer.flag),
        (StatusCode::TOO_MANY_REQUESTS, Some("RL"))
    );
    assert_eq!(answer.headers["x-envoy-ratelimited"], "true");
}

#[test]
fn cors_preflights_are_answered_and_allowed_origins_decorated() {
    let t = table(&format!(
        "{VS}  - corsPolicy:\n      allowOrigins: [{{exact: https://app.example.com}}]\n      allowMethods: [GET, POST]\n    route: [{{destination: {{host: reviews}}}}]\n"
    ));
    let mut preflight = head(
        "OPTIONS",
        "/",
        &[
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "POST"),
        ],
    );
    let (answer, _) = answered(plan_of(&t, &mut preflight, ROLLS));
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    let mut get = head("GET", "/", &[("origin", "https://app.example.com")]);
    match plan_of(&t, &mut get, ROLLS) {
        Plan::Forward { cors: Some(h), .. } => {
            assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn rewrites_and_header_operations_apply_to_the_forwarded_head() {
    let t = table(&format!(
        "{VS}  - match: [{{uri: {{prefix: /api/v1}}}}]\n    rewrite: {{uri: /v1, authority: backend:9080}}\n\
         \x20   headers: {{request: {{set: {{x-route: main}}, add: {{x-extra: a}}, remove: [x-drop]}}}}\n\
         \x20   route:\n    - destination: {{host: reviews}}\n      headers: {{request: {{set: {{x-dest: reviews}}}}}}\n"
    ));
    let mut parts = head(
        "GET",
        "/api/v1/items?page=2",
        &[("host", "reviews:9080"), ("x-drop", "1")],
    );
    forwarded(plan_of(&t, &mut parts, ROLLS));
    assert_eq!(parts.uri.path(), "/v1/items");
    assert_eq!(parts.uri.query(), Some("page=2"));
    assert_eq!(parts.headers[http::header::HOST], "backend:9080");
    assert_eq!(parts.headers["x-route"], "main");
    assert_eq!(parts.headers["x-extra"], "a");
    assert_eq!(parts.headers["x-dest"], "reviews");
    assert!(!parts.headers.contains_key("x-drop"));
}
