use super::*;
use serde_json::json;

fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
    Arc::new(serde_json::from_value(v).unwrap())
}

fn snapshot() -> Snapshot {
    Snapshot {
        namespaces: vec![
            obj(json!({"metadata": {"name": "default"}})),
            obj(json!({"metadata": {"name": "gone"}, "status": {"phase": "Terminating"}})),
        ],
        services: vec![
            obj(
                json!({"metadata": {"name": "ratings", "namespace": "default"},
                       "spec": {"ports": [
                           {"name": "web", "port": 9080, "appProtocol": "kubernetes.io/h2c"},
                           {"name": "grpc-api", "port": 9090},
                           {"name": "dns", "port": 53, "protocol": "UDP"},
                           {"name": "sctp", "port": 99, "protocol": "SCTP"}]}}),
            ),
            obj(json!({"metadata": {"name": "web", "namespace": "default"},
                       "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}})),
            obj(json!({"metadata": {"name": "ext", "namespace": "default"},
                       "spec": {"type": "ExternalName", "externalName": "example.org"}})),
            obj(json!({"metadata": {"name": "old", "namespace": "gone"},
                       "spec": {"ports": [{"name": "http", "port": 80}]}})),
        ],
        slices: vec![
            obj(
                json!({"metadata": {"name": "ratings-a", "namespace": "default",
                                    "labels": {"kubernetes.io/service-name": "ratings"}},
                       "addressType": "IPv4", "endpoints": [
                           {"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": "r1"}},
                           {"addresses": ["10.0.0.2"], "conditions": {"ready": false},
                            "targetRef": {"kind": "Pod", "name": "r2"}},
                           {"addresses": ["10.0.0.3"], "targetRef": {"kind": "Pod", "name": "unknown"}}]}),
            ),
            // The same pod in a second slice, ready there: one endpoint, ready.
            obj(
                json!({"metadata": {"name": "ratings-b", "namespace": "default",
                                    "labels": {"kubernetes.io/service-name": "ratings"}},
                       "addressType": "IPv4", "endpoints": [
                           {"addresses": ["10.0.0.2"], "conditions": {"ready": true},
                            "targetRef": {"kind": "Pod", "name": "r2"}}]}),
            ),
            obj(json!({"metadata": {"name": "web-a", "namespace": "default",
                                    "labels": {"kubernetes.io/service-name": "web"}},
                       "addressType": "IPv4", "endpoints": [
                           {"addresses": ["10.0.1.1"], "hostname": "web-0"},
                           {"addresses": ["10.0.1.2"], "hostname": "Bad_Name"}]})),
        ],
        pods: vec![
            obj(json!({"metadata": {"name": "r1", "namespace": "default",
                                    "labels": {"version": "v1", "isthmus.io/endpoint": "forged"}},
                       "spec": {"serviceAccountName": "ratings", "containers": []}})),
            obj(json!({"metadata": {"name": "r2", "namespace": "default"},
                       "spec": {"containers": []}})),
        ],
        exports: vec![obj(
            json!({"metadata": {"name": "ratings", "namespace": "default",
                                              "creationTimestamp": "2024-01-01T00:00:00Z"}}),
        )],
    }
}

#[test]
fn services_ports_and_exports_map_as_documented() {
    let (d, problems) = discovery(&snapshot(), 15006);
    let names: Vec<&str> = d.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["ratings", "web"],
        "ExternalName and terminating namespaces skipped"
    );
    let ratings = &d.services[0];
    assert!(ratings.export);
    assert_eq!(ratings.exported_at_ms, Some(1_704_067_200_000));
    let ports: Vec<(u16, Protocol)> = ratings.ports.iter().map(|p| (p.port, p.protocol)).collect();
    assert_eq!(
        ports,
        [
            (53, Protocol::Udp),
            (9080, Protocol::Http2),
            (9090, Protocol::Grpc)
        ]
    );
    assert!(!d.services[1].export);
    assert!(d.services[1].headless);
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn endpoints_take_pod_identity_and_the_sidecar_port() {
    let (d, _) = discovery(&snapshot(), 15006);
    let eps = &d.services[0].endpoints;
    assert_eq!(
        eps.len(),
        2,
        "the endpoint whose pod is unknown waits for it"
    );
    assert_eq!(eps[0].address.to_string(), "10.0.0.1:15006");
    assert_eq!(eps[0].service_account, "ratings");
    assert_eq!(eps[0].labels.get("version").map(String::as_str), Some("v1"));
    assert!(
        !eps[0].labels.contains_key(ENDPOINT_LABEL),
        "reserved label dropped"
    );
    assert!(eps[0].healthy, "unset ready means ready");
    assert_eq!(eps[1].service_account, "default");
    assert!(eps[1].healthy, "the ready copy of a doubled endpoint wins");
    let web = &d.services[1].endpoints;
    assert_eq!(web[0].hostname.as_deref(), Some("web-0"));
    assert_eq!(web[1].hostname, None, "an invalid hostname is dropped");
}

#[test]
fn endpoints_are_dialled_at_the_target_port_of_the_first_tcp_port() {
    let mut snap = snapshot();
    // ratings' slices list the target ports by service port name: 8080 behind `web`.
    for slice in snap.slices.iter_mut() {
        if slice.metadata.name.as_deref() == Some("ratings-a") {
            std::sync::Arc::make_mut(slice).ports = Some(vec![
                k8s_openapi::api::discovery::v1::EndpointPort {
                    name: Some("dns".into()),
                    port: Some(5353),
                    protocol: Some("UDP".into()),
                    ..Default::default()
                },
                k8s_openapi::api::discovery::v1::EndpointPort {
                    name: Some("web".into()),
                    port: Some(8080),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
            ]);
        }
    }
    let (d, _) = discovery(&snap, 15006);
    let addrs: Vec<String> = d.services[0]
        .endpoints
        .iter()
        .map(|e| e.address.to_string())
        .collect();
    // 10.0.0.1 is in ratings-a (ports listed); 10.0.0.2's ready copy is in ratings-b (none).
    assert_eq!(addrs, ["10.0.0.1:8080", "10.0.0.2:15006"]);
    // The other ports with a target of their own: UDP dns 53 -> 5353 (grpc-api 9090 is not
    // listed by the slice, so it dials the address).
    let ep = &d.services[0].endpoints[0];
    assert_eq!(ep.ports, [(53, 5353)].into());
    assert!(d.services[0].endpoints[1].ports.is_empty());
}
