//! The control plane over a real (one-member) federation store and its real gRPC API.

use std::sync::Arc;
use std::time::Duration;

use isthmus_control::tokens::TokenPolicy;
use isthmus_core::ca::CertificateAuthority;
use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::MeshConfig;
use tokio::sync::watch;

const TOKEN: &str = "test-bootstrap-token-0123";

struct Running {
    control: isthmus_control::ControlHandle,
    store: isthmus_federation::Store,
    discovery: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn start(services_yaml: &str) -> Running {
    start_polling(services_yaml, Duration::from_millis(20)).await
}

/// Like [`start`], re-reading the discovery file every `poll`.
async fn start_polling(services_yaml: &str, poll: Duration) -> Running {
    isthmus_core::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let discovery = dir.path().join("services.yaml");
    std::fs::write(&discovery, services_yaml).unwrap();
    let store = isthmus_testkit::store::one_member_store().await;
    let control = isthmus_control::start(
        isthmus_control::ControlOptions {
            cluster: "east".into(),
            trust_domain: "east.isthmus.local".into(),
            locality: None,
            grpc_listen: "127.0.0.1:0".parse().unwrap(),
            discovery: isthmus_control::DiscoverySource::File {
                path: discovery.clone(),
                poll,
            },
            vip_range: "127.10.0.0/16".parse().unwrap(),
            gateway_address: Some("127.0.0.1:15443".parse().unwrap()),
            tokens: TokenPolicy::single(TOKEN, &["default"]),
            cert_lifetime: Duration::from_secs(600),
            export_lease: Duration::from_secs(10),
            ca: Arc::new(CertificateAuthority::generate("east.isthmus.local").unwrap()),
            bootstrap_admin: Some(isthmus_control::BOOTSTRAP_ADMIN.to_string()),
            members: None,
        },
        store.clone(),
    )
    .await
    .unwrap();
    Running {
        control,
        store,
        discovery,
        _dir: dir,
    }
}

const ONE_SERVICE: &str = "services:\n- name: ratings\n  export: true\n  ports: [{name: http, port: 9080}]\n  endpoints: [{address: 127.0.0.1:7000, serviceAccount: ratings}]\n";

async fn wait_for(
    rx: &mut watch::Receiver<Arc<MeshConfig>>,
    what: &str,
    check: impl Fn(&MeshConfig) -> bool,
) -> Arc<MeshConfig> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let c = rx.borrow_and_update().clone();
            if check(&c) {
                return c;
            }
            rx.changed().await.expect("config stream open");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn wait_for_key(store: &isthmus_federation::Store, key: &str) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while store.get(key).is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{key} was never published"));
}

#[tokio::test]
async fn config_stream_carries_discovered_services_and_follows_file_changes() {
    let r = start(ONE_SERVICE).await;
    let client = r.control.client();
    let (mut rx, _task) = client
        .watch_config("test", Duration::from_secs(10))
        .await
        .unwrap();
    let c = wait_for(&mut rx, "ratings", |c| {
        c.service("default", "ratings").is_some()
    })
    .await;
    let ratings = c.service("default", "ratings").unwrap();
    assert_eq!(ratings.vip.to_string(), "127.10.0.1");
    assert_eq!(
        ratings.local_endpoints[0].identity,
        "spiffe://east.isthmus.local/ns/default/sa/ratings"
    );
    assert_eq!(c.clusters[0].name, "east");

    std::fs::write(
        &r.discovery,
        format!("{ONE_SERVICE}- name: details\n  ports: [{{name: http, port: 9080}}]\n"),
    )
    .unwrap();
    wait_for(&mut rx, "details", |c| {
        c.service("default", "details").is_some()
    })
    .await;

    // The export reached the federation store.
    wait_for_key(&r.store, "exports/default/ratings/east").await;
    assert!(r.store.get("clusters/east").is_some());
    r.control.shutdown().await;
    r.store.shutdown().await;
}

#[tokio::test]
async fn an_invalid_discovery_file_keeps_the_last_good_services() {
    let r = start(ONE_SERVICE).await;
    let mut rx = r.control.config();
    wait_for(&mut rx, "ratings", |c| {
        c.service("default", "ratings").is_some()
    })
    .await;
    wait_for_key(&r.store, "exports/default/ratings/east").await;
    let version = rx.borrow().version;
    std::fs::write(&r.discovery, "services:\n- name: Ratings!\n").unwrap();
    // Give the poller many chances to (wrongly) act on the bad file.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(r
            .control
            .config()
            .borrow()
            .service("default", "ratings")
            .is_some());
    }
    assert_eq!(rx.borrow().version, version);
    assert!(r.store.get("exports/default/ratings/east").is_some());
    r.control.shutdown().await;
    r.store.shutdown().await;
}

const HEADLESS: &str = "services:\n- name: web\n  headless: true\n  export: true\n  ports: [{name: http, port: 8080}]\n  endpoints:\n  - {address: 127.0.0.1:7001, serviceAccount: web, hostname: web-0}\n  - {address: 127.0.0.1:7002, serviceAccount: web}\n";

#[tokio::test]
async fn a_headless_service_reaches_the_config_stream_and_the_store_with_its_endpoints() {
    let r = start(HEADLESS).await;
    let mut rx = r.control.config();
    let c = wait_for(&mut rx, "headless web", |c| {
        c.service("default", "web")
            .is_some_and(|s| s.headless.is_some())
    })
    .await;
    let web = c.service("default", "web").unwrap();
    let endpoints = &web.headless.as_ref().unwrap().endpoints;
    assert_eq!(endpoints.len(), 2);
    assert!(endpoints.iter().all(|e| e.cluster == "east" && e.ready));
    assert!(endpoints
        .iter()
        .any(|e| e.hostname.as_deref() == Some("web-0")));
    wait_for_key(&r.store, "exports/default/web/east").await;
    let record: serde_json::Value =
        serde_json::from_slice(&r.store.get("exports/default/web/east").unwrap().value).unwrap();
    assert_eq!(record["headless"]["endpoints"][0]["id"], "web-0");
    r.control.shutdown().await;
    r.store.shutdown().await;
}

#[tokio::test]
async fn an_invalid_hostname_keeps_the_last_good_headless_service() {
    let r = start(HEADLESS).await;
    let mut rx = r.control.config();
    wait_for(&mut rx, "headless web", |c| {
        c.service("default", "web")
            .is_some_and(|s| s.headless.is_some())
    })
    .await;
    let before = rx.borrow().clone();
    let bad = HEADLESS.replace("hostname: web-0", "hostname: Web.0");
    std::fs::write(&r.discovery, &bad).unwrap();
    // What the poller reports: the file, the field and the value.
    let err = isthmus_control::discovery::load(&r.discovery)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("services[0].endpoints[0].hostname") && err.contains("Web.0"),
        "{err}"
    );
    // For many polls the last good configuration stays as it was.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(*r.control.config().borrow(), before);
    }
    // The poller was reading all along: a good file is taken at once.
    std::fs::write(&r.discovery, HEADLESS.replace("web-0", "web-1")).unwrap();
    wait_for(&mut rx, "web-1", |c| {
        c.service("default", "web").is_some_and(|s| {
            s.headless
                .as_ref()
                .is_some_and(|h| h.endpoints.iter().any(|e| e.id == "web-1"))
        })
    })
    .await;
    r.control.shutdown().await;
    r.store.shutdown().await;
}

#[tokio::test]
async fn certificates_are_signed_only_for_identities_the_token_allows() {
    let r = start(ONE_SERVICE).await;
    let client = r.control.client();
    let ok = SpiffeId::new("east.isthmus.local", "default", "ratings");
    let (identity, bundles, not_after) = client.request_identity(&ok, TOKEN).await.unwrap();
    assert_eq!(identity.id(), &ok);
    assert!(bundles.iter().any(|(td, _)| td == "east.isthmus.local"));
    assert!(not_after > 0);

    let wrong_ns = SpiffeId::new("east.isthmus.local", "kube-system", "admin");
    let err = client
        .request_identity(&wrong_ns, TOKEN)
        .await
        .expect_err("refused")
        .to_string();
    assert!(err.contains("does not allow"), "{err}");
    let other_domain = SpiffeId::new("west.isthmus.local", "default", "ratings");
    let err = client
        .request_identity(&other_domain, TOKEN)
        .await
        .expect_err("refused")
        .to_string();
    assert!(err.contains("trust domain"), "{err}");
    let err = client
        .request_identity(&ok, "wrong-token-wrong-token")
        .await
        .expect_err("refused")
        .to_string();
    assert!(err.contains("does not allow"), "{err}");
    r.control.shutdown().await;
    r.store.shutdown().await;
}

#[tokio::test]
async fn the_api_is_tls_only_and_trusted_only_through_the_cluster_ca() {
    let r = start(ONE_SERVICE).await;
    // Trusting the cluster CA: policies, and the federation's Kv API on the same TLS port.
    let client = r.control.client();
    assert!(client
        .get_policies(None, None, None)
        .await
        .unwrap()
        .is_empty());
    let mut kv = isthmus_federation::KvClient::from_channel(client.channel());
    let status = kv
        .status()
        .await
        .expect("Kv over the control plane's TLS port");
    assert_eq!(status.id, 1);

    // Trusting some other CA: the handshake fails, nothing is answered.
    let other = CertificateAuthority::generate("east.isthmus.local").unwrap();
    let stranger = isthmus_core::client::ControlClient::new(
        &r.control.grpc_addr().to_string(),
        other.cert_pem(),
    )
    .unwrap();
    let err = stranger
        .get_policies(None, None, None)
        .await
        .expect_err("a server certificate from another CA is refused");
    assert!(err.to_string().contains("get failed"), "{err}");

    // Plaintext gRPC gets no answer either.
    let plain =
        tonic::transport::Endpoint::from_shared(format!("http://{}", r.control.grpc_addr()))
            .unwrap()
            .connect_lazy();
    let mut policies =
        isthmus_core::proto::mesh::policy_service_client::PolicyServiceClient::new(plain);
    let refused = policies
        .get(isthmus_core::proto::mesh::GetPoliciesRequest::default())
        .await;
    assert!(refused.is_err(), "plaintext was answered: {refused:?}");

    // A CA that is not PEM is refused before any connection.
    let bad = isthmus_core::client::ControlClient::new("127.0.0.1:1", "not a certificate")
        .err()
        .expect("refused")
        .to_string();
    assert!(bad.contains("CA"), "{bad}");
    let addr = r.control.grpc_addr();
    r.control.shutdown().await;
    // Once shut down, the TLS port is closed (its accept loop owns the listener).
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    r.store.shutdown().await;
}

#[tokio::test]
async fn a_config_stream_larger_than_grpcs_default_4_mib_reaches_its_client() {
    use isthmus_testkit::discovery::{Discovery, Service};
    // 1 000 services with 60 endpoints each: about 6 MiB of configuration.
    let mut discovery = Discovery::new();
    for s in 0..1000 {
        let mut service = Service::new(&format!("service-{s:04}")).port("http", 8080);
        for e in 0..60 {
            service = service.endpoint(
                &format!("10.{}.{}.{}:8080", s / 250, s % 250, e + 1),
                &format!("a-rather-long-service-account-name-{s:04}"),
            );
        }
        discovery = discovery.service(service);
    }
    // Read once: re-reading 6 MiB of YAML every 20 ms would only load the machine.
    let r = start_polling(&discovery.yaml(), Duration::from_secs(3600)).await;
    let (mut rx, _task) = r
        .control
        .client()
        .watch_config("test", Duration::from_secs(60))
        .await
        .expect("the first snapshot arrives whole");
    let c = wait_for(&mut rx, "every service", |c| c.services.len() == 1000).await;
    let endpoints: usize = c.services.iter().map(|s| s.local_endpoints.len()).sum();
    assert_eq!(endpoints, 60_000);
    let encoded = serde_json::to_vec(&*c).unwrap().len();
    assert!(encoded > 4 * 1024 * 1024, "only {encoded} bytes");
}
