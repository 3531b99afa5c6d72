//! Who may call what on a running control plane's API (docs/security.md §6), with real gRPC
//! clients over TLS: refusals for anonymous, workload, viewer, foreign and non-mesh-admin
//! callers, each leaving the federation store byte for byte as it was; then the calls the
//! right callers may make.

use std::sync::Arc;
use std::time::Duration;

use isthmus_control::tokens::TokenPolicy;
use isthmus_core::ca::CertificateAuthority;
use isthmus_core::client::ControlClient;
use isthmus_core::identity::{OperatorId, Role, SpiffeId};
use isthmus_core::proto::mesh::policy_service_client::PolicyServiceClient;
use isthmus_core::proto::mesh::{ApplyRequest, DeletePolicyRequest, GetPoliciesRequest};
use isthmus_federation::proto::v1 as kv;
use isthmus_federation::proto::v1::kv_client::KvClient;
use tonic::Code;

const TOKEN: &str = "test-bootstrap-token-0123";
const TD: &str = "east.isthmus.local";

const DENY_ALL: &str = r#"{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"name":"deny-all","namespace":"default"},"spec":{"action":"DENY","rules":[{}]}}"#;

struct Running {
    control: isthmus_control::ControlHandle,
    store: isthmus_federation::Store,
    ca: Arc<CertificateAuthority>,
    _dir: tempfile::TempDir,
}

async fn start() -> Running {
    isthmus_core::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let discovery = dir.path().join("services.yaml");
    std::fs::write(&discovery, "services: []\n").unwrap();
    let store = isthmus_testkit::store::one_member_store().await;
    let ca = Arc::new(CertificateAuthority::generate(TD).unwrap());
    let control = isthmus_control::start(
        isthmus_control::ControlOptions {
            cluster: "east".into(),
            trust_domain: TD.into(),
            locality: None,
            grpc_listen: "127.0.0.1:0".parse().unwrap(),
            discovery: isthmus_control::DiscoverySource::File {
                path: discovery,
                poll: Duration::from_millis(50),
            },
            vip_range: "127.10.0.0/16".parse().unwrap(),
            gateway_address: Some("127.0.0.1:15443".parse().unwrap()),
            tokens: TokenPolicy::single(TOKEN, &["default"]),
            cert_lifetime: Duration::from_secs(600),
            export_lease: Duration::from_secs(3600),
            ca: ca.clone(),
            bootstrap_admin: Some(isthmus_control::BOOTSTRAP_ADMIN.to_string()),
            members: None,
        },
        store.clone(),
    )
    .await
    .unwrap();
    // Settle: the cluster record and the first mesh-admin grant are written.
    tokio::time::timeout(Duration::from_secs(10), async {
        while store.get("clusters/east").is_none() || store.list("grants/mesh-admin/").is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the control plane publishes its record and the first grant");
    Running {
        control,
        store,
        ca,
        _dir: dir,
    }
}

/// Every record of the store: key, value and revision.
fn snapshot(store: &isthmus_federation::Store) -> Vec<(String, Vec<u8>, u64)> {
    store
        .list("")
        .into_iter()
        .map(|(k, r)| (k, r.value, r.revision))
        .collect()
}

/// The code of every state-changing call, in order: Kv Put, Delete, CompareAndSet,
/// MintJoinToken, RemoveMember, PolicyService Apply, Delete.
async fn state_changing_codes(client: &ControlClient) -> Vec<(&'static str, Code)> {
    let mut kv = KvClient::new(client.channel());
    let mut policies = PolicyServiceClient::new(client.channel());
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    vec![
        (
            "Kv.Put",
            code(
                kv.put(kv::PutRequest {
                    key: "clusters/west".into(),
                    value: b"{}".to_vec(),
                    lease_ttl_ms: 0,
                })
                .await
                .map(|_| ()),
            ),
        ),
        (
            "Kv.Delete",
            code(
                kv.delete(kv::DeleteRequest {
                    key: "grants/mesh-admin/east.isthmus.local/admin".into(),
                })
                .await
                .map(|_| ()),
            ),
        ),
        (
            "Kv.CompareAndSet",
            code(
                kv.compare_and_set(kv::CompareAndSetRequest {
                    key: "grants/mesh-admin/east.isthmus.local/mallory".into(),
                    expected_revision: None,
                    value: b"{}".to_vec(),
                })
                .await
                .map(|_| ()),
            ),
        ),
        (
            "Kv.MintJoinToken",
            code(
                kv.mint_join_token(kv::MintJoinTokenRequest { ttl_ms: 60_000 })
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "Kv.RemoveMember",
            code(
                kv.remove_member(kv::RemoveMemberRequest { id: 1 })
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "PolicyService.Apply",
            code(
                policies
                    .apply(ApplyRequest {
                        documents_json: vec![DENY_ALL.into()],
                        dry_run: false,
                    })
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "PolicyService.Delete",
            code(
                policies
                    .delete(DeletePolicyRequest {
                        kind: "AuthorizationPolicy".into(),
                        namespace: "default".into(),
                        name: "deny-all".into(),
                    })
                    .await
                    .map(|_| ()),
            ),
        ),
    ]
}

/// A client presenting an operator credential that `issuer` signed, trusting the control
/// plane's CA `trusted`.
fn operator(
    issuer: &CertificateAuthority,
    addr: &str,
    trusted: &str,
    role: Role,
    name: &str,
) -> ControlClient {
    let id = OperatorId::new(issuer.trust_domain(), role, name).unwrap();
    let issued = issuer
        .issue_operator(&id, Duration::from_secs(600))
        .unwrap();
    let credential =
        isthmus_core::tls::StaticClientCert::from_pem(&issued.cert_chain_pem, &issued.key_pem)
            .unwrap();
    ControlClient::authenticated(addr, trusted, credential).unwrap()
}

#[tokio::test]
async fn callers_without_the_right_change_nothing() {
    let r = start().await;
    let addr = r.control.grpc_addr().to_string();
    let trusted = r.ca.cert_pem();
    let before = snapshot(&r.store);

    // No certificate: every state-changing method is UNAUTHENTICATED.
    let anonymous = r.control.anonymous_client();
    for (method, code) in state_changing_codes(&anonymous).await {
        assert_eq!(code, Code::Unauthenticated, "anonymous {method}");
    }
    // ... and so are reads.
    let status = KvClient::new(anonymous.channel())
        .status(kv::StatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("needs a client certificate"),
        "{status:?}"
    );

    // Not even the configuration stream.
    let stream =
        isthmus_core::proto::mesh::mesh_config_service_client::MeshConfigServiceClient::new(
            anonymous.channel(),
        )
        .stream_config(isthmus_core::proto::mesh::StreamConfigRequest::default())
        .await
        .unwrap_err();
    assert_eq!(stream.code(), Code::Unauthenticated);

    // A workload of this cluster (its certificate from Sign) streams config, nothing else.
    let ratings = SpiffeId::new(TD, "default", "ratings");
    let (identity, _, _) = anonymous.request_identity(&ratings, TOKEN).await.unwrap();
    let workload = ControlClient::authenticated(
        &addr,
        r.ca.cert_pem(),
        isthmus_core::tls::identity_resolver(identity),
    )
    .unwrap();
    for (method, code) in state_changing_codes(&workload).await {
        assert_eq!(code, Code::PermissionDenied, "workload {method}");
    }
    let (config, _task) = workload
        .watch_config("ratings-1", Duration::from_secs(10))
        .await
        .expect("a workload streams its configuration");
    assert_eq!(config.borrow().cluster, "east");

    // A viewer reads and changes nothing.
    let viewer = operator(&r.ca, &addr, trusted, Role::Viewer, "ann");
    for (method, code) in state_changing_codes(&viewer).await {
        assert_eq!(code, Code::PermissionDenied, "viewer {method}");
    }
    KvClient::new(viewer.channel())
        .status(kv::StatusRequest {})
        .await
        .expect("a viewer reads the federation's status");
    PolicyServiceClient::new(viewer.channel())
        .get(GetPoliciesRequest::default())
        .await
        .expect("a viewer reads policies");

    // An admin without a mesh-admin grant: no policies, tokens, members or other records.
    let bob = operator(&r.ca, &addr, trusted, Role::Admin, "bob");
    for (method, code) in state_changing_codes(&bob).await {
        assert_eq!(code, Code::PermissionDenied, "admin bob {method}");
    }

    // Credentials this control plane cannot verify do not even complete the handshake: an
    // impostor CA for this trust domain, and a trust domain that is no member's.
    for stranger in [
        CertificateAuthority::generate(TD).unwrap(),
        CertificateAuthority::generate("zzz.isthmus.local").unwrap(),
    ] {
        let client = operator(&stranger, &addr, trusted, Role::Admin, "admin");
        let err = KvClient::new(client.channel())
            .put(kv::PutRequest {
                key: "clusters/west".into(),
                value: b"{}".to_vec(),
                lease_ttl_ms: 0,
            })
            .await
            .unwrap_err();
        // The server's TLS alert ends the connection before any request is read.
        assert!(format!("{err:?}").contains("alert"), "{err:?}");
    }

    assert_eq!(
        snapshot(&r.store),
        before,
        "a refused call changed the store"
    );

    // Every refusal is counted by method and code.
    use isthmus_control::authz::Method;
    let m = r.control.api_metrics();
    assert_eq!(m.refused(Method::PolicyApply, Code::Unauthenticated), 1);
    // The workload, the viewer and bob.
    assert_eq!(m.refused(Method::PolicyApply, Code::PermissionDenied), 3);
    assert!(m.refused(Method::KvWrite, Code::PermissionDenied) >= 9);
}

#[tokio::test]
async fn an_admin_writes_its_own_records_and_a_mesh_admin_the_mesh() {
    let r = start().await;
    let addr = r.control.grpc_addr().to_string();
    let trusted = r.ca.cert_pem();

    // Cluster east's admin (no grant) may change east's own export record.
    let bob = operator(&r.ca, &addr, trusted, Role::Admin, "bob");
    let mut kv = KvClient::new(bob.channel());
    let export = serde_json::json!({
        "cluster": "east", "namespace": "default", "name": "extra", "ports": [],
        "identities": [], "endpoints": 0, "healthyEndpoints": 0,
    });
    kv.put(kv::PutRequest {
        key: "exports/default/extra/east".into(),
        value: serde_json::to_vec(&export).unwrap(),
        lease_ttl_ms: 0,
    })
    .await
    .expect("an admin writes its own cluster's export");
    let err = kv
        .put(kv::PutRequest {
            key: "exports/default/extra/west".into(),
            value: b"{}".to_vec(),
            lease_ttl_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("exports/default/extra/west"),
        "{err:?}"
    );

    // The bootstrap mesh admin applies a mesh-wide policy, grants bob, and bob then may too.
    let root = r.control.client();
    let mut policies = PolicyServiceClient::new(root.channel());
    policies
        .apply(ApplyRequest {
            documents_json: vec![DENY_ALL.into()],
            dry_run: false,
        })
        .await
        .expect("the mesh admin applies a policy");
    let grant = serde_json::json!({
        "identity": OperatorId::new(TD, Role::Admin, "bob").unwrap().to_string(),
        "grantedBy": "spiffe://east.isthmus.local/operator/admin/admin",
        "grantedAtMs": 1,
    });
    KvClient::new(root.channel())
        .put(kv::PutRequest {
            key: "grants/mesh-admin/east.isthmus.local/bob".into(),
            value: serde_json::to_vec(&grant).unwrap(),
            lease_ttl_ms: 0,
        })
        .await
        .expect("a mesh admin grants another");
    PolicyServiceClient::new(bob.channel())
        .delete(DeletePolicyRequest {
            kind: "AuthorizationPolicy".into(),
            namespace: "default".into(),
            name: "deny-all".into(),
        })
        .await
        .expect("bob, now a mesh admin, deletes the policy");

    // The last grant cannot be deleted: bob deletes admin's, then his own is the last.
    let mut kv = KvClient::new(bob.channel());
    kv.delete(kv::DeleteRequest {
        key: "grants/mesh-admin/east.isthmus.local/admin".into(),
    })
    .await
    .expect("one of two grants may go");
    let err = kv
        .delete(kv::DeleteRequest {
            key: "grants/mesh-admin/east.isthmus.local/bob".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(r
        .store
        .get("grants/mesh-admin/east.isthmus.local/bob")
        .is_some());
    // With a grant on record, the bootstrap admin is no longer a mesh admin.
    let err = PolicyServiceClient::new(root.channel())
        .apply(ApplyRequest {
            documents_json: vec![DENY_ALL.into()],
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}
