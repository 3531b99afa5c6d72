//! The attacks of docs/security.md §12 that the code refuses today, run against a running
//! demo federation (three clusters on loopback) with real gRPC and TCP clients. After each
//! refused attack every member's store is what it was: the same keys, values and revisions.
//! Rows whose rule is still planned (signed entries, against a lying leader) are listed in the
//! doc and not run here.

use std::sync::Arc;
use std::time::Duration;

use isthmus_core::ca::CertificateAuthority;
use isthmus_core::client::ControlClient;
use isthmus_core::identity::{Role, SpiffeId};
use isthmus_core::proto::mesh::certificate_service_client::CertificateServiceClient;
use isthmus_core::proto::mesh::mesh_config_service_client::MeshConfigServiceClient;
use isthmus_core::proto::mesh::policy_service_client::PolicyServiceClient;
use isthmus_core::proto::mesh::{
    ApplyRequest, DeletePolicyRequest, ExplainRequest, FailoverReport, SignRequest,
    StreamConfigRequest,
};
use isthmus_demo::{Demo, DemoOptions};
use isthmus_federation::proto::v1 as kv;
use isthmus_federation::proto::v1::kv_client::KvClient;
use isthmus_federation::proto::v1::raft_peer_client::RaftPeerClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

mod support;

const DENY_ALL: &str = r#"{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"name":"deny-all","namespace":"isthmus-system"},"spec":{"action":"DENY","rules":[{}]}}"#;

/// Every member's store: (key, value, revision) of every record.
/// One member's replica: every record (key, value, revision), the member table and how many
/// join tokens are outstanding.
type Replica = (
    Vec<(String, Vec<u8>, u64)>,
    std::collections::BTreeMap<u64, String>,
    usize,
);
/// Every member's replica.
type Snapshot = Vec<Replica>;

fn snapshot(demo: &Demo) -> Snapshot {
    demo.stores()
        .iter()
        .map(|s| {
            let records = s
                .list("")
                .into_iter()
                .map(|(k, r)| (k, r.value, r.revision))
                .collect();
            (records, s.members(), s.outstanding_join_tokens())
        })
        .collect()
}

/// Waits until every member holds the same records and stays so for a moment (the demo's
/// own publishing has settled), and returns that state.
async fn settled(demo: &Demo) -> Snapshot {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let a = snapshot(demo);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let b = snapshot(demo);
        if a == b && b.windows(2).all(|w| w[0] == w[1]) {
            return b;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the demo's store never settled"
        );
    }
}

fn code<T>(r: Result<T, tonic::Status>) -> Code {
    r.err().map_or(Code::Ok, |s| s.code())
}

/// The code of each state-changing call (and one read) a client can make on a control
/// plane's API.
async fn api_codes(client: &ControlClient) -> Vec<(&'static str, Code)> {
    let mut kv = KvClient::new(client.channel());
    let mut policies = PolicyServiceClient::new(client.channel());
    let mut mesh = MeshConfigServiceClient::new(client.channel());
    vec![
        (
            "Kv.Put",
            code(
                kv.put(kv::PutRequest {
                    key: "clusters/west".into(),
                    value: b"{}".to_vec(),
                    lease_ttl_ms: 0,
                })
                .await,
            ),
        ),
        (
            "Kv.Delete",
            code(
                kv.delete(kv::DeleteRequest {
                    key: "clusters/central".into(),
                })
                .await,
            ),
        ),
        (
            "Kv.CompareAndSet",
            code(
                kv.compare_and_set(kv::CompareAndSetRequest {
                    key: "grants/mesh-admin/west.isthmus.local/mallory".into(),
                    expected_revision: None,
                    value: b"{}".to_vec(),
                })
                .await,
            ),
        ),
        (
            "Kv.MintJoinToken",
            code(
                kv.mint_join_token(kv::MintJoinTokenRequest { ttl_ms: 60_000 })
                    .await,
            ),
        ),
        (
            "Kv.RemoveMember",
            code(kv.remove_member(kv::RemoveMemberRequest { id: 3 }).await),
        ),
        ("Kv.Get", code(kv.get(kv::GetRequest::default()).await)),
        (
            "PolicyService.Apply",
            code(
                policies
                    .apply(ApplyRequest {
                        documents_json: vec![DENY_ALL.into()],
                        dry_run: false,
                    })
                    .await,
            ),
        ),
        (
            "PolicyService.Delete",
            code(
                policies
                    .delete(DeletePolicyRequest {
                        kind: "AuthorizationPolicy".into(),
                        namespace: "isthmus-system".into(),
                        name: "deny-all".into(),
                    })
                    .await,
            ),
        ),
        (
            "MeshConfigService.ReportFailover",
            code(
                mesh.report_failover(FailoverReport {
                    node_id: "mallory".into(),
                    tables_json: "{}".into(),
                })
                .await,
            ),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacks_on_a_running_federation_are_refused_and_change_nothing() {
    let demo = Demo::start(DemoOptions::fast(200))
        .await
        .expect("the demo starts");
    let east = demo.cluster("east").unwrap();
    let west = demo.cluster("west").unwrap();
    let east_addr = east.control.grpc_addr().to_string();
    let east_ca = east.control.ca_pem().to_string();
    let before = settled(&demo).await;

    // #10: no client certificate on 15012.
    let anonymous = east.control.anonymous_client();
    for (method, code) in api_codes(&anonymous).await {
        assert_eq!(code, Code::Unauthenticated, "#10 anonymous {method}");
    }
    let mut mesh = MeshConfigServiceClient::new(anonymous.channel());
    assert_eq!(
        code(mesh.stream_config(StreamConfigRequest::default()).await),
        Code::Unauthenticated,
        "#10 anonymous StreamConfig"
    );
    assert_eq!(
        code(
            mesh.explain(ExplainRequest {
                service: "ratings".into(),
                ..Default::default()
            })
            .await
        ),
        Code::Unauthenticated,
        "#10 anonymous Explain"
    );

    // #11: a workload's certificate (east's client sidecar) on 15012.
    let workload = ControlClient::authenticated(
        &east_addr,
        &east_ca,
        isthmus_core::tls::identity_resolver(east.client_identity.clone()),
    )
    .unwrap();
    for (method, code) in api_codes(&workload).await {
        let want = if method == "MeshConfigService.ReportFailover" {
            Code::Ok // a sidecar reports its own failover tables
        } else {
            Code::PermissionDenied
        };
        assert_eq!(code, want, "#11 workload {method}");
    }

    // #21: 20 000 failover reports under distinct node ids from that one workload are
    // accepted, but it keeps at most 1 000 (its own stalest go), counted as evictions.
    let mut reporter = MeshConfigServiceClient::new(workload.channel());
    for n in 0..20_000 {
        reporter
            .report_failover(FailoverReport {
                node_id: format!("flood-{n}"),
                tables_json: "{}".into(),
            })
            .await
            .expect("a workload's report is accepted");
    }
    let evicted = scrape(&demo, "isthmus_control_failover_reports_evicted_total").await;
    assert!(
        evicted >= 19_000.0,
        "#21 only {evicted} reports evicted: one workload's reports are not bounded"
    );

    // #12: a mesh-wide DENY policy by a viewer, and by an admin without a mesh-admin grant
    // (west's admin, through west's own control plane).
    let viewer = east.control.operator_client(Role::Viewer, "ann");
    let west_admin = west.control.client();
    for (who, client) in [("viewer", &viewer), ("west's admin", &west_admin)] {
        let refused = PolicyServiceClient::new(client.channel())
            .apply(ApplyRequest {
                documents_json: vec![DENY_ALL.into()],
                dry_run: false,
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "#12 {who}");
    }

    // #13: west's admin writes east's and central's records through west.
    let mut kv_west = KvClient::new(west_admin.channel());
    for key in ["clusters/east", "exports/default/ratings/central"] {
        let refused = kv_west
            .put(kv::PutRequest {
                key: key.into(),
                value: b"{}".to_vec(),
                lease_ttl_ms: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "#13 {key}");
        assert!(refused.message().contains(key), "{refused:?}");
    }

    // #17: a value of 1 MiB + 1 byte, as the mesh admin.
    let mesh_admin = east.control.client();
    let too_big = KvClient::new(mesh_admin.channel())
        .put(kv::PutRequest {
            key: "attack/big".into(),
            value: vec![b'x'; 1024 * 1024 + 1],
            lease_ttl_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(too_big.code(), Code::InvalidArgument);
    assert!(
        too_big.message().contains("attack/big") && too_big.message().contains("1048576"),
        "#17 {too_big:?}"
    );

    // #9: a join token valid for 25 h.
    let ttl = KvClient::new(mesh_admin.channel())
        .mint_join_token(kv::MintJoinTokenRequest {
            ttl_ms: 25 * 3600 * 1000,
        })
        .await
        .unwrap_err();
    assert_eq!(ttl.code(), Code::InvalidArgument, "#9 {ttl:?}");

    // #6: Join with a token nobody minted.
    let join = KvClient::new(anonymous.channel())
        .join(kv::JoinRequest {
            token: "0123456789abcdef.0123456789abcdef0123456789abcdef".into(),
            id: 9,
            peer_addr: "127.0.0.1:9".into(),
            cluster: "intruder".into(),
            trust_domain: "intruder.local".into(),
            ca_bundle_pem: isthmus_core::ca::CertificateAuthority::generate("intruder.local")
                .unwrap()
                .cert_pem()
                .to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(join.code(), Code::PermissionDenied, "#6 {join:?}");

    // #19: Sign for the control plane's identity, for the gateway with a token that grants
    // only a namespace, and for names Kubernetes would not allow.
    let mut sign = CertificateServiceClient::new(anonymous.channel());
    for (identity, want) in [
        (
            SpiffeId::control(&east.trust_domain),
            Code::PermissionDenied,
        ),
        (
            SpiffeId::gateway(&east.trust_domain),
            Code::PermissionDenied,
        ),
        (
            SpiffeId::new(&east.trust_domain, "Default", "a_b"),
            Code::InvalidArgument,
        ),
    ] {
        let (csr_pem, _) = isthmus_core::ca::generate_csr(&identity).unwrap();
        let got = sign
            .sign(SignRequest {
                csr_pem,
                identity: identity.to_string(),
                token: "not-the-bootstrap-token-at-all".into(),
            })
            .await;
        assert_eq!(code(got), want, "#19 {identity}");
    }

    // #20: west's workload on east's StreamConfig; east's admin writing through west's API.
    let west_workload = ControlClient::authenticated(
        &east_addr,
        &east_ca,
        isthmus_core::tls::identity_resolver(west.client_identity.clone()),
    )
    .unwrap();
    assert_eq!(
        code(
            MeshConfigServiceClient::new(west_workload.channel())
                .stream_config(StreamConfigRequest::default())
                .await
        ),
        Code::PermissionDenied,
        "#20 west's workload on east"
    );
    let east_admin_at_west = ControlClient::authenticated(
        &west.control.grpc_addr().to_string(),
        west.control.ca_pem(),
        {
            let cred = &east.admin_credential;
            isthmus_core::tls::StaticClientCert::from_pem(
                &std::fs::read_to_string(&cred.0).unwrap(),
                &std::fs::read_to_string(&cred.1).unwrap(),
            )
            .unwrap()
        },
    )
    .unwrap();
    let refused = KvClient::new(east_admin_at_west.channel())
        .put(kv::PutRequest {
            key: "clusters/east".into(),
            value: b"{}".to_vec(),
            lease_ttl_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "#20 {refused:?}");
    assert!(
        refused
            .message()
            .contains("your own cluster's control plane"),
        "{refused:?}"
    );

    // #1: a member's federation port serves only the other members (mutual TLS with
    // member certificates). Plaintext gets no HTTP answer, and is counted.
    let not_tls_before = east.store().peer_refusals().not_tls;
    let mut tcp = tokio::net::TcpStream::connect(east.federation)
        .await
        .unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut back)).await;
    assert!(
        !back.windows(4).any(|w| w == b"HTTP") && back.first() != Some(&0),
        "#1 a plaintext client got an answer on the peer port: {back:?}"
    );
    counted("#1 not_tls", || {
        east.store().peer_refusals().not_tls > not_tls_before
    })
    .await;
    // TLS without a certificate reaches only Kv.Join; reads and writes are unauthenticated.
    let refused_before = east.store().peer_refusals();
    let peer_addr = east.federation.to_string();
    let no_cert = ControlClient::new(&peer_addr, &east_ca).unwrap();
    let mut peer = KvClient::new(no_cert.channel());
    let put = peer
        .put(kv::PutRequest {
            key: "clusters/west".into(),
            value: b"{}".to_vec(),
            lease_ttl_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(put.code(), Code::Unauthenticated, "#1 {put:?}");
    let get = peer
        .get(kv::GetRequest {
            key: "clusters/east".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(get.code(), Code::Unauthenticated, "#1 {get:?}");
    // #4: an operator's certificate (east's admin, the mesh admin) is not a member's: the
    // handshake fails, so no method is reached.
    let operator = east
        .control
        .client()
        .elsewhere(&peer_addr, &east_ca)
        .unwrap();
    let status = KvClient::new(operator.channel())
        .status(kv::StatusRequest::default())
        .await
        .unwrap_err();
    assert!(
        handshake_refused(&status),
        "#4 the handshake should fail: {status:?}"
    );
    let refused_after = east.store().peer_refusals();
    assert_eq!(
        refused_after.unauthenticated,
        refused_before.unauthenticated + 2,
        "#1 counted"
    );
    assert!(
        refused_after.not_a_member > refused_before.not_a_member,
        "#4 counted"
    );
    // And east's control plane shows them on /metrics.
    for (reason, count) in [
        ("unauthenticated", refused_after.unauthenticated),
        ("not_a_member", refused_after.not_a_member),
    ] {
        let series =
            format!("isthmus_control_federation_peer_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(
            scrape(&demo, &series).await,
            count as f64,
            "#1 {series} on east's /metrics"
        );
    }

    // Certificate-less connections to the peer port are bounded: the first that finds all
    // of them taken is closed after its handshake (counted), and a freed one serves again.
    drop((peer, no_cert));
    let limit = isthmus_federation::PEER_MAX_ANONYMOUS_CONNECTIONS;
    let limited_before = east.store().peer_refusals().anonymous_limit;
    let mut held = Vec::new();
    let refused = loop {
        assert!(
            held.len() <= limit,
            "more than {limit} anonymous connections held"
        );
        let client = ControlClient::new(&peer_addr, &east_ca).unwrap();
        let info = KvClient::new(client.channel())
            .join_info(kv::JoinInfoRequest::default())
            .await;
        match info {
            Ok(_) => held.push(client),
            Err(status) => break status,
        }
    };
    assert!(
        held.len() + 2 >= limit,
        "only {} anonymous connections served before {refused:?}",
        held.len()
    );
    counted("the certificate-less limit", || {
        east.store().peer_refusals().anonymous_limit > limited_before
    })
    .await;
    drop(held);
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let client = ControlClient::new(&peer_addr, &east_ca).unwrap();
            let info = KvClient::new(client.channel())
                .join_info(kv::JoinInfoRequest::default())
                .await;
            if info.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a freed certificate-less connection serves again");

    // #3: a control-plane certificate for east's own trust domain from a CA outside the
    // bundle set (an impostor's), on central's peer port: the handshake fails.
    let central = demo.cluster("central").unwrap();
    let central_peer = central.federation.to_string();
    let central_ca = central.control.ca_pem().to_string();
    let presenting = |identity: Arc<isthmus_core::tls::Identity>| {
        ControlClient::authenticated(
            &central_peer,
            &central_ca,
            isthmus_core::tls::identity_resolver(identity),
        )
        .unwrap()
    };
    let bad_certificates_before = central.store().peer_refusals().bad_certificate;
    let impostor_ca = CertificateAuthority::generate(&east.trust_domain).unwrap();
    let impostor = KvClient::new(presenting(control_identity(&impostor_ca)).channel())
        .status(kv::StatusRequest::default())
        .await
        .unwrap_err();
    assert!(
        handshake_refused(&impostor),
        "#3 the handshake should fail: {impostor:?}"
    );
    counted("#3 bad_certificate", || {
        central.store().peer_refusals().bad_certificate > bad_certificates_before
    })
    .await;

    // #5: west's real control-plane certificate (issued from west's CA files) sending
    // central a raft batch as east's member: dropped, PERMISSION_DENIED, counted.
    let west_ca = CertificateAuthority::from_pem(
        &west.trust_domain,
        &std::fs::read_to_string(&west.ca_file).unwrap(),
        &std::fs::read_to_string(west.ca_file.with_file_name("ca-key.pem")).unwrap(),
    )
    .unwrap();
    let mismatched_before = central.store().peer_refusals().sender_mismatch;
    let forged = RaftPeerClient::new(presenting(control_identity(&west_ca)).channel())
        .send(kv::RaftBatch {
            from: east.store().status().id,
            to: central.store().status().id,
            messages: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::PermissionDenied, "#5 {forged:?}");
    assert_eq!(
        central.store().peer_refusals().sender_mismatch,
        mismatched_before + 1,
        "#5 counted"
    );

    // #25: west's real control-plane certificate (a compromised member speaking as itself)
    // offering a follower a raft snapshot whose state gives east's trust domain the
    // impostor's CA: refused before raft sees it, counted; nothing changes (checked with
    // every replica at the end).
    let leader = central.store().status().leader_id;
    let target = ["central", "east"]
        .into_iter()
        .map(|name| demo.cluster(name).unwrap())
        .find(|c| Some(c.store().status().id) != leader)
        .unwrap();
    let east_key = isthmus_core::keyspace::cluster("east");
    let mut record: serde_json::Value =
        serde_json::from_slice(&target.store().get(&east_key).unwrap().value).unwrap();
    record["caBundlePem"] = impostor_ca.cert_pem().into();
    let data = isthmus_federation::testing::forged_snapshot_data(
        target.store(),
        &east_key,
        &serde_json::to_vec(&record).unwrap(),
    );
    let status = target.store().status();
    let mut message = raft::eraftpb::Message::default();
    message.set_msg_type(raft::eraftpb::MessageType::MsgSnapshot);
    message.from = west.store().status().id;
    message.to = status.id;
    message.term = status.term;
    let snapshot = message.mut_snapshot();
    snapshot.data = data.into();
    snapshot.mut_metadata().index = status.applied_index + 1_000;
    snapshot.mut_metadata().term = status.term;
    snapshot.mut_metadata().mut_conf_state().voters = status.voters.clone();
    let refused_before = target.store().snapshots_refused();
    let to_target = ControlClient::authenticated(
        &target.federation.to_string(),
        target.control.ca_pem(),
        isthmus_core::tls::identity_resolver(control_identity(&west_ca)),
    )
    .unwrap();
    RaftPeerClient::new(to_target.channel())
        .send(kv::RaftBatch {
            from: west.store().status().id,
            to: status.id,
            messages: vec![protobuf::Message::write_to_bytes(&message).unwrap()],
        })
        .await
        .expect("#25 west is a member: its batch is taken");
    counted("#25 snapshots_refused", || {
        target.store().snapshots_refused() > refused_before
    })
    .await;
    assert_eq!(
        scrape_cluster(
            &demo,
            &target.name,
            "isthmus_control_federation_snapshots_refused_total"
        )
        .await,
        1.0,
        "#25 on /metrics"
    );

    // #23: plaintext on 15012 gets no answer.
    let mut tcp = tokio::net::TcpStream::connect(&east_addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut back)).await;
    assert!(
        !back.windows(4).any(|w| w == b"HTTP") && back.first() != Some(&0),
        "#23 a plaintext client got an HTTP answer: {back:?}"
    );

    // #22: a tunnel to a service whose payload after Ok is plaintext.
    let gateway = east.gateway.as_ref().unwrap().local_addr();
    let mut tcp = tokio::net::TcpStream::connect(gateway).await.unwrap();
    let req = isthmus_core::tunnel::OpenRequest::new("ratings.default", 9080, "central");
    isthmus_core::tunnel::write_request(&mut tcp, &req)
        .await
        .unwrap();
    let resp = isthmus_core::tunnel::read_response(&mut tcp).await.unwrap();
    assert!(resp.is_ok(), "#22 {resp:?}");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: ratings\r\n\r\n")
        .await
        .unwrap();
    let mut back = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut back)).await;
    assert!(
        matches!(read, Ok(Err(_)) | Ok(Ok(0))),
        "#22 plaintext crossed: {read:?} {:?}",
        String::from_utf8_lossy(&back)
    );

    // #15, #16: records only the store's rules refuse (the mesh admin may write any record
    // through the API): refused on apply on every replica, naming what is wrong.
    let impostor = isthmus_core::ca::CertificateAuthority::generate(&east.trust_domain).unwrap();
    let record = serde_json::json!({
        "name": "zzz",
        "trustDomain": east.trust_domain,
        "gateway": "127.0.0.1:9",
        "caBundlePem": impostor.cert_pem(),
    });
    let mut kv_admin = KvClient::new(mesh_admin.channel());
    let refused = kv_admin
        .put(kv::PutRequest {
            key: "clusters/zzz".into(),
            value: serde_json::to_vec(&record).unwrap(),
            lease_ttl_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "#15 {refused:?}");
    assert!(
        refused.message().contains(&format!(
            "trust domain {} belongs to cluster east; cluster zzz cannot claim it",
            east.trust_domain
        )),
        "#15 {refused:?}"
    );
    let central_export = east
        .store()
        .get("exports/default/ratings/central")
        .expect("central exports ratings");
    let mut export: serde_json::Value = serde_json::from_slice(&central_export.value).unwrap();
    let foreign = format!("spiffe://{}/ns/default/sa/x", east.trust_domain);
    export["identities"] = serde_json::json!([foreign]);
    let refused = kv_admin
        .put(kv::PutRequest {
            key: "exports/default/ratings/central".into(),
            value: serde_json::to_vec(&export).unwrap(),
            lease_ttl_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "#16 {refused:?}");
    assert!(
        refused.message().contains(&format!(
            "identity {foreign} is not in central's trust domain"
        )),
        "#16 {refused:?}"
    );
    // #24: a stolen mesh-admin credential adds its own CA to central's bundle, keeping
    // central's (the value rules alone would take it as a rotation's overlap).
    let central_record = east
        .store()
        .get("clusters/central")
        .expect("central's record");
    let mut widened: serde_json::Value = serde_json::from_slice(&central_record.value).unwrap();
    let added = isthmus_core::ca::CertificateAuthority::generate("central.isthmus.local").unwrap();
    widened["caBundlePem"] = serde_json::json!(format!(
        "{}{}",
        widened["caBundlePem"].as_str().unwrap(),
        added.cert_pem()
    ));
    let refused = kv_admin
        .put(kv::PutRequest {
            key: "clusters/central".into(),
            value: serde_json::to_vec(&widened).unwrap(),
            lease_ttl_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "#24 {refused:?}");
    assert!(
        refused
            .message()
            .contains("cluster central's caBundlePem is changed only by cluster central itself"),
        "#24 {refused:?}"
    );
    // #14: east's own member (a compromised control plane, proposing in-process, past every
    // API check) writes west's record, alters central's export and deletes it: every replica
    // refuses each on apply, as not east's to write.
    let east_member = east.store();
    let mut west_record: serde_json::Value =
        serde_json::from_slice(&east_member.get("clusters/west").unwrap().value).unwrap();
    west_record["gateway"] = serde_json::json!("127.0.0.1:9");
    let mut central_export: serde_json::Value =
        serde_json::from_slice(&central_export.value).unwrap();
    central_export["endpoints"] = serde_json::json!(0);
    for (key, write) in [
        ("clusters/west", Some(west_record)),
        ("exports/default/ratings/central", Some(central_export)),
        ("exports/default/ratings/central", None),
    ] {
        let refused = match write {
            Some(value) => east_member
                .put(key, serde_json::to_vec(&value).unwrap())
                .await
                .unwrap_err(),
            None => east_member.delete(key).await.unwrap_err(),
        };
        let isthmus_federation::StoreError::Refused(refusal) = &refused else {
            panic!("#14 {key}: not refused on apply: {refused}");
        };
        assert_eq!(
            refusal.reason,
            isthmus_core::keyspace::rules::Reason::NotOwner,
            "#14 {key}: {refused}"
        );
        assert!(
            refused.to_string().contains("bound to cluster east"),
            "#14 {refused}"
        );
    }
    // ... and mints a join token for no mesh admin: refused on apply too.
    let refused = east_member
        .mint_join_token(Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("minted for a mesh admin"),
        "#14 {refused}"
    );
    for (series, what) in [
        ("trust_domain_taken", "#15"),
        ("foreign_identity", "#16"),
        ("not_owner", "#14 and #24"),
    ] {
        // #14 is four refused entries, #24 one.
        let want = if what == "#14 and #24" { 5.0 } else { 1.0 };

        let series =
            format!("isthmus_control_federation_entries_refused_total{{reason=\"{series}\"}}");
        assert_eq!(scrape(&demo, &series).await, want, "{what} is counted");
    }

    // #18: 5 000 concurrent streams on one connection and 200 more connections to 15012,
    // all held open while an operator asks for the status.
    let api = east.control.grpc_addr();
    let flood = tokio::spawn(flood_streams(api, east_ca.clone(), 5000));
    let mut crowd = Vec::new();
    for _ in 0..200 {
        let tcp = tokio::net::TcpStream::connect(api).await.unwrap();
        let config = isthmus_core::api_tls::client_config(&east_ca).unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(isthmus_core::tls::mesh_server_name(), tcp)
            .await
            .expect("#18 a connection within the port's limit completes its handshake");
        crowd.push(tls);
    }
    let started = std::time::Instant::now();
    let status = tokio::time::timeout(
        Duration::from_secs(2),
        KvClient::new(east.control.client().channel()).status(kv::StatusRequest::default()),
    )
    .await;
    assert!(
        matches!(status, Ok(Ok(_))),
        "#18 status during the flood: {status:?} after {:?}",
        started.elapsed()
    );
    let flooded = flood.await.unwrap();
    assert!(
        flooded.accepted - flooded.answered
            <= isthmus_core::api_tls::MAX_STREAMS_PER_CONNECTION as usize,
        "#18 more streams held open than the limit: {flooded:?}"
    );
    assert!(
        flooded.refused >= 1000 || flooded.goaway,
        "#18 excess streams are refused: {flooded:?}"
    );
    drop(crowd);

    // East's control plane counted what it refused, on its admin port's /metrics.
    let refused = scrape(
        &demo,
        "isthmus_control_api_refused_total{method=\"PolicyService.Apply\",code=\"Unauthenticated\"}",
    )
    .await;
    assert_eq!(refused, 1.0, "#10 the refusal is counted");

    // Nothing above changed any member's store.
    assert_eq!(
        settled(&demo).await,
        before,
        "a refused attack changed the store"
    );

    demo.shutdown().await;
}

/// Whether a call failed because the server refused the TLS handshake (no method was
/// reached). In TLS 1.3 the client sends its certificate last, so it sees the server close
/// the connection rather than a handshake alert.
fn handshake_refused(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}

/// Waits (briefly: the server counts as it closes the connection) until `check` holds.
async fn counted(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} was not counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A control-plane certificate of `ca`'s trust domain, as a member presents on 15017.
fn control_identity(ca: &CertificateAuthority) -> Arc<isthmus_core::tls::Identity> {
    let id = SpiffeId::control(ca.trust_domain());
    let issued = ca.issue(&id, Duration::from_secs(600)).unwrap();
    isthmus_core::tls::Identity::from_pem(id, &issued.cert_chain_pem, &issued.key_pem).unwrap()
}

/// The value of `series` (name and labels, as Prometheus prints them) on east's control-plane
/// admin port; 0 when absent.
async fn scrape(demo: &Demo, series: &str) -> f64 {
    scrape_cluster(demo, "east", series).await
}

/// The value of `series` on `cluster`'s control-plane admin port; 0 when absent.
async fn scrape_cluster(demo: &Demo, cluster: &str, series: &str) -> f64 {
    let ports = demo.ports();
    let admin = &ports
        .clusters
        .iter()
        .find(|c| c.name == cluster)
        .unwrap()
        .admin["control"];
    support::metric(admin, series).await
}

/// What one connection flooding a server with streams saw.
#[derive(Debug)]
struct Flood {
    /// Streams refused with `RST_STREAM(REFUSED_STREAM)`.
    refused: usize,
    /// Streams up to the last one the server's `GOAWAY` (if any) says it processed, and not
    /// refused: those the server took and holds open, waiting for their body.
    accepted: usize,
    /// Streams the server answered anyway (headers or another reset).
    answered: usize,
    /// The server closed the connection with `GOAWAY`.
    goaway: bool,
}

/// Opens `streams` gRPC streams at once on one HTTP/2 connection to `addr` (anonymous TLS),
/// ignoring the server's stream limit as an attacker would: raw frames, headers only, no
/// body, so every stream the server takes stays open. Reads what the server answers for up
/// to 5 s.
async fn flood_streams(addr: std::net::SocketAddr, ca_pem: String, streams: u32) -> Flood {
    const HEADERS: u8 = 0x1;
    const RST_STREAM: u8 = 0x3;
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const REFUSED_STREAM: [u8; 4] = 7u32.to_be_bytes();
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
    // HPACK: literal header fields without indexing, no Huffman coding.
    fn literal(block: &mut Vec<u8>, name: &str, value: &str) {
        block.push(0x00);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "https"),
        // Sign takes a caller without a certificate, so each stream waits for its body.
        (":path", "/isthmus.mesh.v1.CertificateService/Sign"),
        (":authority", "control"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        literal(&mut block, name, value);
    }

    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let config = isthmus_core::api_tls::client_config(&ca_pem).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(isthmus_core::tls::mesh_server_name(), tcp)
        .await
        .unwrap();
    let (mut rd, mut wr) = tokio::io::split(tls);
    wr.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    wr.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    async fn next<R: tokio::io::AsyncRead + Unpin>(rd: &mut R) -> Option<(u8, u8, u32, Vec<u8>)> {
        let mut head = [0u8; 9];
        rd.read_exact(&mut head).await.ok()?;
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        rd.read_exact(&mut payload).await.ok()?;
        Some((head[3], head[4], stream, payload))
    }
    // The server's SETTINGS first, acknowledged, then the flood.
    loop {
        let (kind, flags, _, _) = next(&mut rd).await.expect("the server's SETTINGS");
        if kind == SETTINGS && flags & 0x1 == 0 {
            break;
        }
    }
    wr.write_all(&frame(SETTINGS, 0x1, 0, &[])).await.unwrap();
    let writer = tokio::spawn(async move {
        let mut out = Vec::new();
        for i in 0..streams {
            out.extend(frame(HEADERS, 0x4, 2 * i + 1, &block));
            if out.len() > 64 * 1024 {
                if wr.write_all(&out).await.is_err() {
                    return;
                }
                out.clear();
            }
        }
        let _ = wr.write_all(&out).await;
        // Hold the write side open until the reader is done.
        tokio::time::sleep(Duration::from_secs(6)).await;
        drop(wr);
    });
    let mut refused = std::collections::BTreeSet::new();
    let mut answered = std::collections::BTreeSet::new();
    let mut last_processed = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Some((kind, _, stream, payload))) =
        tokio::time::timeout_at(deadline, next(&mut rd)).await
    {
        match kind {
            RST_STREAM if payload.get(..4) == Some(&REFUSED_STREAM) => {
                refused.insert(stream);
            }
            HEADERS | RST_STREAM => {
                answered.insert(stream);
            }
            GOAWAY if payload.len() >= 4 => {
                last_processed = Some(
                    u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                        & 0x7fff_ffff,
                );
                break;
            }
            _ => {}
        }
    }
    writer.abort();
    let last = last_processed.unwrap_or(2 * streams - 1);
    let opened = (1..=last).step_by(2).count();
    Flood {
        refused: refused.len(),
        accepted: opened - refused.iter().filter(|s| **s <= last).count(),
        answered: answered.len(),
        goaway: last_processed.is_some(),
    }
}
