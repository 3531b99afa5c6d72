use super::*;

/// Bookinfo's documents, as Istio's task pages write them.
pub(crate) const BOOKINFO_ALL_V1: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
  - name: v3
    labels:
      version: v3
"#;

const REVIEWS_50_50: &str = r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: reviews
  namespace: default
spec:
  hosts:
    - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v2
      weight: 50
    - destination:
        host: reviews
        subset: v3
      weight: 50
"#;

const RATINGS_FAULTS: &str = r#"
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      delay:
        percentage:
          value: 100.0
        fixedDelay: 7s
    route:
    - destination:
        host: ratings
        subset: v1
  - fault:
      abort:
        percentage:
          value: 100
        httpStatus: 500
    route:
    - destination:
        host: ratings
        subset: v1
"#;

#[test]
fn bookinfo_documents_parse_as_istio_writes_them() {
    let docs = parse_documents("all-v1.yaml", BOOKINFO_ALL_V1).unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0].kind(), Kind::VirtualService);
    assert_eq!(docs[0].namespace, "default");
    assert_eq!(
        docs[1].store_key(),
        "policies/destinationrule/default/reviews"
    );
    let split = parse_documents("split.yaml", REVIEWS_50_50).unwrap();
    let Spec::VirtualService(vs) = &split[0].spec else {
        panic!()
    };
    assert_eq!(vs.http[0].route[1].weight, Some(50));
    let faults = parse_documents("faults.yaml", RATINGS_FAULTS).unwrap();
    let Spec::VirtualService(vs) = &faults[0].spec else {
        panic!()
    };
    let delay = vs.http[0].fault.as_ref().unwrap().delay.as_ref().unwrap();
    assert_eq!(
        parse_duration_istio(&delay.fixed_delay),
        Some(std::time::Duration::from_secs(7))
    );
    assert!((delay.percentage.as_ref().unwrap().fraction() - 1.0).abs() < 1e-9);
}

#[test]
fn stored_json_round_trips_to_the_same_policy() {
    for p in parse_documents("x.yaml", &format!("{BOOKINFO_ALL_V1}---{RATINGS_FAULTS}")).unwrap() {
        let json = serde_json::to_vec(&p.to_json()).unwrap();
        assert_eq!(Policy::from_json(&json).unwrap(), p);
    }
}

fn error(text: &str) -> PolicyError {
    parse_documents("bad.yaml", text).unwrap_err()
}

#[test]
fn unsupported_fields_are_rejected_by_name_with_file_document_and_path() {
    let text = format!(
        "{BOOKINFO_ALL_V1}---\n{}",
        REVIEWS_50_50.replace(
            "      weight: 50\n    - destination",
            "      weight: 50\n      corsPolicy: {{}}\n    - destination"
        )
    );
    let e = error(&text);
    assert_eq!(e.file, "bad.yaml");
    assert_eq!(e.document, 3);
    assert_eq!(e.field, "spec.http[0].route[0].corsPolicy");
    assert!(e.message.contains("corsPolicy"), "{e}");
    assert!(
        e.to_string().contains("VirtualService default/reviews"),
        "{e}"
    );
}

#[test]
fn meaning_errors_name_the_field() {
    let cases = [
        (
            REVIEWS_50_50.replace(
                "weight: 50\n    - destination",
                "weight: 40\n    - destination",
            ),
            "spec.http[0].route",
            "add up to 90",
        ),
        (
            RATINGS_FAULTS.replace("fixedDelay: 7s", "fixedDelay: soon"),
            "spec.http[0].fault.delay.fixedDelay",
            "soon",
        ),
        (
            RATINGS_FAULTS.replace("fixedDelay: 7s", "fixedDelay: 9999999999999999999s"),
            "spec.http[0].fault.delay.fixedDelay",
            "longer than the maximum, 720h",
        ),
        (
            RATINGS_FAULTS.replace(
                "    fault:\n",
                "    corsPolicy: {allowOrigins: [{exact: a, prefix: b}]}\n    fault:\n",
            ),
            "spec.http[0].corsPolicy.allowOrigins[0]",
            "exactly one",
        ),
        (
            RATINGS_FAULTS.replace(
                "    fault:\n",
                "    corsPolicy: {maxAge: soon, allowMethods: [GET]}\n    fault:\n",
            ),
            "spec.http[0].corsPolicy.maxAge",
            "soon",
        ),
        (
            RATINGS_FAULTS.replace(
                "    fault:\n",
                "    directResponse: {status: 200, body: {bytes: \"%%%\"}}\n    fault:\n",
            ),
            "spec.http[0].directResponse",
            "one of route, redirect and directResponse",
        ),
        (
            RATINGS_FAULTS.replace("httpStatus: 500", "httpStatus: 999"),
            "spec.http[1].fault.abort.httpStatus",
            "999",
        ),
        (
            RATINGS_FAULTS.replace("exact: jason", "regex: \"(unclosed\""),
            "spec.http[0].match[0].headers.end-user.regex",
            "invalid regex",
        ),
        (
            RATINGS_FAULTS.replace("value: 100.0", "value: 250"),
            "spec.http[0].fault.delay.percentage.value",
            "250",
        ),
        (
            BOOKINFO_ALL_V1.replace("ISTIO_MUTUAL", "SIMPLE"),
            "spec.trafficPolicy.tls.mode",
            "SIMPLE",
        ),
        (
            BOOKINFO_ALL_V1.replace("name: v3", "name: v2"),
            "spec.subsets[2].name",
            "twice",
        ),
        (
            BOOKINFO_ALL_V1.replace(
                "networking.istio.io/v1\nkind: VirtualService",
                "networking.istio.io/v2\nkind: VirtualService",
            ),
            "apiVersion",
            "v2",
        ),
    ];
    for (text, field, words) in cases {
        let e = error(&text);
        assert_eq!(e.field, field, "{e}");
        assert!(e.to_string().contains(words), "{e}");
    }
}

#[test]
fn unknown_kinds_and_garbage_are_refused() {
    assert_eq!(
        error("apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {}\n").field,
        "kind"
    );
    assert_eq!(error("{{{").field, "(document)");
    assert_eq!(
        error("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\n")
            .field,
        "(document)"
    );
}

#[test]
fn security_documents_parse_and_validate() {
    let ok = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-viewer, namespace: default}
spec:
  selector: {matchLabels: {app: ratings}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["east.isthmus.local/ns/default/sa/sleep"]
    to:
    - operation:
        methods: ["GET"]
        ports: ["9080"]
    when:
    - key: request.headers[x-user]
      values: ["alice"]
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec:
  mtls: {mode: STRICT}
"#;
    assert_eq!(parse_documents("authz.yaml", ok).unwrap().len(), 2);
    let e = error(&ok.replace("action: ALLOW", "action: AUDIT"));
    assert_eq!(e.field, "spec.action");
    let e = error(&ok.replace("request.headers[x-user]", "request.auth.type"));
    assert_eq!(e.field, "spec.rules[0].when[0].key");
    let e = error(&ok.replace("mode: STRICT", "mode: LOOSE"));
    assert_eq!((e.document, e.field.as_str()), (2, "spec.mtls.mode"));
}

#[test]
fn hosts_resolve_relative_to_the_policy_namespace() {
    let expect = Some(("reviews".to_string(), "default".to_string()));
    for host in [
        "reviews",
        "reviews.default",
        "reviews.default.svc.cluster.local",
        "Reviews.default.svc.clusterset.local.",
    ] {
        assert_eq!(resolve_host(host, "default"), expect, "{host}");
    }
    assert_eq!(
        resolve_host("reviews", "shop"),
        Some(("reviews".into(), "shop".into()))
    );
    assert_eq!(resolve_host("www.example.com", "default"), None);
}

#[test]
fn istio_durations_parse() {
    use std::time::Duration;
    assert_eq!(
        parse_duration_istio("0.5s"),
        Some(Duration::from_millis(500))
    );
    assert_eq!(
        parse_duration_istio("250ms"),
        Some(Duration::from_millis(250))
    );
    assert_eq!(parse_duration_istio("1m"), Some(Duration::from_secs(60)));
    assert_eq!(
        parse_duration_istio("720h"),
        Some(Duration::from_secs(2_592_000))
    );
    for bad in ["", "s", "10", "-1s", "1x", "721h", "9999999999999999999s"] {
        assert_eq!(parse_duration_istio(bad), None, "{bad}");
    }
}

#[test]
fn istios_deprecated_whole_number_fault_percent_is_accepted() {
    use crate::policy::networking::Percent;
    // As Istio's fault-injection task files write it.
    let docs = parse_documents(
        "faults.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ratings}\nspec:\n  hosts: [ratings]\n  http:\n  - fault:\n      delay: {fixedDelay: 7s, percent: 100}\n      abort: {httpStatus: 500, percent: 20}\n    route:\n    - destination: {host: ratings, subset: v1}\n",
    )
    .unwrap();
    let Spec::VirtualService(vs) = &docs[0].spec else {
        panic!()
    };
    let fault = vs.http[0].fault.as_ref().unwrap();
    let abort = fault.abort.as_ref().unwrap();
    assert_eq!(
        Percent::fault_fraction(abort.percentage.as_ref(), abort.percent),
        0.2
    );
    let delay = fault.delay.as_ref().unwrap();
    assert_eq!(
        Percent::fault_fraction(delay.percentage.as_ref(), delay.percent),
        1.0
    );
    let err = parse_documents(
        "faults.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ratings}\nspec:\n  hosts: [ratings]\n  http:\n  - fault:\n      abort: {httpStatus: 500, percent: 120}\n    route:\n    - destination: {host: ratings}\n",
    )
    .unwrap_err();
    assert_eq!(err.field, "spec.http[0].fault.abort.percent");
}

/// A VirtualService routing TLS the application originates by server name, as Istio's
/// "TLS passthrough" examples write it.
const TLS_ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: db
spec:
  hosts:
  - db
  tls:
  - match:
    - port: 5432
      sniHosts:
      - primary.db.example.com
    route:
    - destination:
        host: db
        subset: primary
  - match:
    - sniHosts:
      - "*.db.example.com"
    route:
    - destination:
        host: db
        subset: replica
      weight: 80
    - destination:
        host: db-standby
      weight: 20
"#;

#[test]
fn tls_routes_parse_and_each_error_names_its_field() {
    let policies = parse_documents("tls.yaml", TLS_ROUTES).unwrap();
    let Spec::VirtualService(vs) = &policies[0].spec else {
        panic!("a VirtualService");
    };
    assert_eq!(vs.tls.len(), 2);
    assert_eq!(vs.tls[0].matches[0].sni_hosts, ["primary.db.example.com"]);
    assert_eq!(vs.tls[0].matches[0].port, Some(5432));
    let json = serde_json::to_vec(&policies[0].to_json()).unwrap();
    assert_eq!(Policy::from_json(&json).unwrap(), policies[0]);

    let cases = [
        (
            TLS_ROUTES.replace(
                "    - port: 5432\n      sniHosts:\n      - primary.db.example.com\n",
                "    - port: 5432\n      sniHosts: []\n",
            ),
            "spec.tls[0].match[0].sniHosts",
            "at least one server name",
        ),
        (
            TLS_ROUTES.replace("primary.db.example.com", "primary..example.com"),
            "spec.tls[0].match[0].sniHosts[0]",
            "not a server name",
        ),
        (
            TLS_ROUTES.replace("\"*.db.example.com\"", "\"db.*.com\""),
            "spec.tls[1].match[0].sniHosts[0]",
            "not a server name",
        ),
        (
            TLS_ROUTES.replace("port: 5432", "port: 70000"),
            "spec.tls[0].match[0].port",
            "not a port",
        ),
        (
            TLS_ROUTES.replace("weight: 20", "weight: 30"),
            "spec.tls[1].route",
            "100",
        ),
        (
            TLS_ROUTES.replace(
                "    - port: 5432\n",
                "    - port: 5432\n      destinationSubnets: [10.0.0.0/8]\n",
            ),
            "spec.tls[0].match[0].destinationSubnets",
            "destinationSubnets",
        ),
    ];
    for (text, field, words) in cases {
        let e = error(&text);
        assert_eq!(e.field, field, "{e}");
        assert!(e.to_string().contains(words), "{e}");
    }
}

/// A fresh Ed25519 public key as a JWKS document.
fn jwks() -> String {
    use crate::jwt::testing;
    testing::jwks(&[&testing::signer(jsonwebtoken::Algorithm::EdDSA, "k1")])
}

fn request_authentication(rule: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: ratings}}}}\n  jwtRules:\n{rule}"
    )
}

#[test]
fn request_authentication_is_accepted_as_istio_writes_it() {
    let yaml = request_authentication(&format!(
        "  - issuer: testing@secure.istio.io\n    audiences: [bookinfo]\n    jwks: '{}'\n    fromHeaders:\n    - name: x-jwt-assertion\n      prefix: 'Bearer '\n    fromParams: [token]\n    fromCookies: [session]\n    outputPayloadToHeader: x-jwt-payload\n    outputClaimToHeaders:\n    - header: x-jwt-group\n      claim: group\n    forwardOriginalToken: true\n",
        jwks()
    ));
    let docs = parse_documents("ra.yaml", &yaml).unwrap();
    let Spec::RequestAuthentication(ra) = &docs[0].spec else {
        panic!("{:?}", docs[0].spec)
    };
    assert_eq!(docs[0].kind(), Kind::RequestAuthentication);
    let rule = &ra.jwt_rules[0];
    assert_eq!(rule.issuer, "testing@secure.istio.io");
    assert_eq!(rule.from_headers[0].prefix.as_deref(), Some("Bearer "));
    assert!(rule.forward_original_token);
    assert_eq!(rule.output_claim_to_headers[0].claim, "group");
    // Stored as JSON and read back unchanged.
    let back = Policy::from_json(&serde_json::to_vec(&docs[0].to_json()).unwrap()).unwrap();
    assert_eq!(back, docs[0]);
    assert_eq!(
        Kind::parse("requestauthentications"),
        Some(Kind::RequestAuthentication)
    );
}

#[test]
fn bad_request_authentications_are_refused_naming_the_field() {
    let refused =
        |rule: String| parse_documents("ra.yaml", &request_authentication(&rule)).unwrap_err();
    let e = refused("  - issuer: a\n    jwksUri: https://idp.example.com/keys\n".into());
    assert_eq!(e.field, "spec.jwtRules[0].jwksUri");
    assert!(e.message.contains("unknown field `jwksUri`"), "{e}");
    let e = refused("  - issuer: a\n".into());
    assert_eq!(e.field, "spec.jwtRules[0].jwks");
    let e = refused(
        "  - issuer: a\n    jwks: '{\"keys\":[{\"kty\":\"oct\",\"k\":\"c2VjcmV0\"}]}'\n".into(),
    );
    assert_eq!(e.field, "spec.jwtRules[0].jwks");
    assert!(
        e.message.starts_with("keys[0]: a symmetric (oct) key"),
        "{e}"
    );
    let k = jwks();
    let e = refused(format!(
        "  - issuer: a\n    jwks: '{k}'\n  - issuer: a\n    jwks: '{k}'\n"
    ));
    assert_eq!(e.field, "spec.jwtRules[1].issuer");
    let e = refused(format!("  - issuer: ''\n    jwks: '{k}'\n"));
    assert_eq!(e.field, "spec.jwtRules[0].issuer");
    let e = refused(format!(
        "  - issuer: a\n    jwks: '{k}'\n    outputPayloadToHeader: 'bad header'\n"
    ));
    assert_eq!(e.field, "spec.jwtRules[0].outputPayloadToHeader");
    let e = refused(format!(
        "  - issuer: a\n    jwks: '{k}'\n    fromHeaders: [{{name: ''}}]\n"
    ));
    assert_eq!(e.field, "spec.jwtRules[0].fromHeaders[0].name");
}

#[test]
fn authorization_rules_on_end_users_are_accepted_and_bad_claim_keys_refused() {
    let policy = |when_key: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: users}}\nspec:\n  rules:\n  - from:\n    - source: {{requestPrincipals: ['testing@secure.istio.io/*'], notRequestPrincipals: ['*/bob']}}\n    when:\n    - key: {when_key}\n      values: [group1]\n")
    };
    for key in [
        "request.auth.claims[groups]",
        "request.auth.claims[org][team]",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
    ] {
        let docs =
            parse_documents("ap.yaml", &policy(key)).unwrap_or_else(|e| panic!("{key}: {e}"));
        let Spec::AuthorizationPolicy(ap) = &docs[0].spec else {
            panic!()
        };
        assert_eq!(
            ap.rules[0].from[0].source.request_principals,
            vec!["testing@secure.istio.io/*"]
        );
    }
    for key in [
        "request.auth.claims[]",
        "request.auth.claims",
        "request.auth.claims[a",
        "request.auth.claimsx[a]",
        "request.auth.type",
    ] {
        let e = parse_documents("ap.yaml", &policy(key)).unwrap_err();
        assert_eq!(e.field, "spec.rules[0].when[0].key", "{key}");
    }
    assert_eq!(
        claim_path("request.auth.claims[a][b]"),
        Some(vec!["a", "b"])
    );
}

#[test]
fn port_level_mtls_is_accepted_with_a_selector_and_refused_naming_the_port() {
    let pa = |spec: &str| {
        parse_documents(
            "pa.yaml",
            &format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: ratings}}\nspec:\n{spec}"),
        )
    };
    let ok = pa("  selector: {matchLabels: {app: ratings}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: PERMISSIVE}\n").unwrap();
    let Spec::PeerAuthentication(spec) = &ok[0].spec else {
        panic!()
    };
    assert_eq!(spec.port_level_mtls.get("8080").unwrap().mode, "PERMISSIVE");
    let back = Policy::from_json(&serde_json::to_vec(&ok[0].to_json()).unwrap()).unwrap();
    assert_eq!(back, ok[0]);
    let e = pa("  portLevelMtls: {8080: {mode: PERMISSIVE}}\n").unwrap_err();
    assert_eq!(e.field, "spec.portLevelMtls");
    let e = pa(
        "  selector: {matchLabels: {app: ratings}}\n  portLevelMtls: {70000: {mode: PERMISSIVE}}\n",
    )
    .unwrap_err();
    assert_eq!(e.field, "spec.portLevelMtls[70000]");
    let e =
        pa("  selector: {matchLabels: {app: ratings}}\n  portLevelMtls: {8080: {mode: DISABLE}}\n")
            .unwrap_err();
    assert_eq!(e.field, "spec.portLevelMtls[8080].mode");
}
