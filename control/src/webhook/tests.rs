use super::*;

fn config() -> InjectConfig {
    InjectConfig {
        image: "isthmus/isthmus:0.1.0".into(),
        cluster: "east".into(),
        trust_domain: "east.isthmus.local".into(),
        control: "isthmus-control.isthmus-system.svc:15012".into(),
        gateway: "isthmus-gateway.isthmus-system.svc:15444".into(),
        ca_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
    }
}

fn review_of(pod: Value) -> Vec<u8> {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": "default",
            "operation": "CREATE",
            "object": pod,
        }
    })
    .to_string()
    .into_bytes()
}

fn sample_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "ratings-v1-abc", "labels": {"app": "ratings", "version": "v1"}},
        "spec": {
            "serviceAccountName": "ratings",
            "containers": [{"name": "ratings", "image": "bookinfo/ratings:1.18", "ports": [{"containerPort": 9080}]}],
        }
    })
}

fn decoded_patch(answer: &Value) -> Value {
    let b64 = answer["response"]["patch"].as_str().expect("a patch");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    serde_json::from_slice(&raw).unwrap()
}

#[test]
fn a_sample_pod_gets_exactly_the_init_container_the_sidecar_and_the_status() {
    let answer = review(&review_of(sample_pod()), &config()).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(
        answer["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    let expected = json!([
        {"op": "add", "path": "/spec/initContainers", "value": [{
            "name": "isthmus-init",
            "image": "isthmus/isthmus:0.1.0",
            "args": ["sidecar", "init", "--proxy-uid", "1337", "--proxy-gid", "1337"],
            "securityContext": {
                "runAsUser": 0,
                "runAsNonRoot": false,
                "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            },
        }]},
        {"op": "add", "path": "/spec/containers/-", "value": {
            "name": "isthmus-proxy",
            "image": "isthmus/isthmus:0.1.0",
            "args": ["sidecar", "--kubernetes"],
            "env": [
                {"name": "ISTHMUS_CLUSTER", "value": "east"},
                {"name": "ISTHMUS_TRUST_DOMAIN", "value": "east.isthmus.local"},
                {"name": "ISTHMUS_CONTROL", "value": "isthmus-control.isthmus-system.svc:15012"},
                {"name": "ISTHMUS_CONTROL_CA", "value": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"},
                {"name": "ISTHMUS_GATEWAY", "value": "isthmus-gateway.isthmus-system.svc:15444"},
                {"name": "POD_NAMESPACE", "value": "default"},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            ],
            "ports": [{"name": "isthmus-admin", "containerPort": 15020, "protocol": "TCP"}],
            "volumeMounts": [
                {"name": "isthmus-token", "mountPath": "/var/run/secrets/isthmus", "readOnly": true},
                {"name": "isthmus-podinfo", "mountPath": "/etc/isthmus-pod", "readOnly": true},
            ],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": 15020}, "periodSeconds": 2},
            "securityContext": {
                "runAsUser": 1337,
                "runAsGroup": 1337,
                "runAsNonRoot": true,
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"]},
            },
        }},
        {"op": "add", "path": "/spec/volumes", "value": [
            {"name": "isthmus-token", "projected": {"sources": [
                {"serviceAccountToken": {"audience": "isthmus", "expirationSeconds": 3600, "path": "token"}},
            ]}},
            {"name": "isthmus-podinfo", "downwardAPI": {"items": [
                {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
            ]}},
        ]},
        {"op": "add", "path": "/metadata/annotations", "value": {"sidecar.isthmus.io/status": "injected"}},
    ]);
    assert_eq!(decoded_patch(&answer), expected);
}

#[test]
fn existing_init_containers_and_annotations_are_appended_to_not_replaced() {
    let mut pod = sample_pod();
    pod["spec"]["initContainers"] = json!([{"name": "migrate", "image": "db:1"}]);
    pod["metadata"]["annotations"] = json!({"team": "ratings"});
    pod["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
    let answer = review(&review_of(pod), &config()).unwrap();
    let patch = decoded_patch(&answer);
    assert_eq!(patch[0]["path"], "/spec/initContainers/-");
    assert_eq!(patch[0]["value"]["name"], "isthmus-init");
    assert_eq!(patch[2]["path"], "/spec/volumes/-");
    assert_eq!(patch[2]["value"]["name"], "isthmus-token");
    assert_eq!(patch[3]["path"], "/spec/volumes/-");
    assert_eq!(patch[3]["value"]["name"], "isthmus-podinfo");
    assert_eq!(
        patch[4]["path"],
        "/metadata/annotations/sidecar.isthmus.io~1status"
    );
    assert_eq!(patch[4]["value"], "injected");
}

#[test]
fn opted_out_host_network_and_already_injected_pods_are_allowed_unchanged() {
    let mut opted_out = sample_pod();
    opted_out["metadata"]["annotations"] = json!({"sidecar.isthmus.io/inject": "false"});
    let mut host = sample_pod();
    host["spec"]["hostNetwork"] = json!(true);
    let mut injected = sample_pod();
    injected["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "isthmus-proxy"}));
    for pod in [opted_out, host, injected] {
        let answer = review(&review_of(pod), &config()).unwrap();
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none(), "{answer}");
    }
}

#[test]
fn malformed_reviews_are_rejected_with_the_field_that_is_wrong() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{not json".to_vec(), "not JSON"),
        (br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#.to_vec(), "admission.k8s.io/v1beta1"),
        (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(), "request: missing"),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"object":{}}}"#.to_vec(),
            "request.uid",
        ),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","namespace":"d","object":{"kind":"Pod","spec":{}}}}"#.to_vec(),
            "request.object.spec.containers",
        ),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","namespace":"d","object":{"kind":"Service","spec":{}}}}"#.to_vec(),
            "request.object.kind",
        ),
        (vec![0xff, 0xfe, 0x00], "not JSON"),
    ];
    for (body, want) in cases {
        let (status, out) = handle(&body, &config());
        let text = String::from_utf8_lossy(&out);
        assert_eq!(status, 400, "{text}");
        assert!(text.contains(want), "{want} not in {text}");
    }
}
