//! Every part as its own daemon, from config files, as an operator runs them: one cluster with
//! a control plane (and its one-member federation), a gateway, a DNS proxy, a sidecar in
//! front of a workload and a client sidecar. The client's call resolves through the DNS proxy
//! and reaches the workload over mTLS with the client's identity.

use std::net::SocketAddr;
use std::time::Duration;

use isthmus_demo::probe::{call_sample, resolve_a};
use isthmus_demo::sample::{self, SampleApp};
use isthmus_testkit::discovery::{Discovery, Service};
use support::{addr, daemon, free_port, stop};

mod support;

const TOKEN: &str = "daemon-test-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cluster_of_daemons_serves_dns_and_an_mtls_call_with_the_callers_identity() {
    let dir = tempfile::tempdir().unwrap();
    let app = sample::start(
        SampleApp {
            service: "echo".into(),
            version: "v1".into(),
            cluster: "solo".into(),
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let (grpc, peer, inbound) = (free_port(), free_port(), free_port());
    Discovery::new().write(&dir.path().join("services.yaml"));
    let (control, ready) = daemon(
        dir.path(),
        "control",
        "control",
        &format!(
            "cluster: solo\ndataDir: data\ndiscovery: {{file: services.yaml, pollInterval: 50ms}}\nvipRange: 127.44.0.0/16\n\
             listen: {{grpc: \"{}\", admin: \"127.0.0.1:0\"}}\n\
             bootstrapTokens: [{{token: {TOKEN}, allow: [\"default/*\", \"isthmus-system/eastwest-gateway\", \"isthmus-system/dns\"]}}]\n\
             federation: {{nodeId: 1, listen: \"{}\", peers: {{1: \"{}\"}}}}\n",
            addr(grpc),
            addr(peer),
            addr(peer)
        ),
    )
    .await;
    assert_eq!(ready["grpc"], addr(grpc));
    assert!(
        dir.path().join("data/ca.pem").exists(),
        "the CA is created in the data directory"
    );

    let (gateway, gw_ready) = daemon(
        dir.path(),
        "gateway",
        "gateway",
        &format!(
            "cluster: solo\ncontrol: \"{}\"\ncontrolCa: data/ca.pem\ntoken: {TOKEN}\nlisten: {{quic: \"127.0.0.1:0\", local: \"127.0.0.1:0\", admin: \"127.0.0.1:0\"}}\n",
            addr(grpc)
        ),
    )
    .await;
    let (server, _) = daemon(
        dir.path(),
        "sidecar-echo",
        "sidecar",
        &format!(
            "cluster: solo\ncontrol: \"{}\"\ncontrolCa: data/ca.pem\ntoken: {TOKEN}\nserviceAccount: echo\n\
             inbound: [{{listen: \"{}\", forwardTo: \"{}\", protocol: http}}]\nlisten: {{admin: \"127.0.0.1:0\"}}\n",
            addr(grpc),
            addr(inbound),
            app.addr
        ),
    )
    .await;
    Discovery::new()
        .service(
            Service::new("echo")
                .port("http", 9080)
                .endpoint(&addr(inbound).to_string(), "echo"),
        )
        .write(&dir.path().join("services.yaml"));
    let (client, _) = daemon(
        dir.path(),
        "sidecar-sleep",
        "sidecar",
        &format!(
            "cluster: solo\ncontrol: \"{}\"\ncontrolCa: data/ca.pem\ntoken: {TOKEN}\nserviceAccount: sleep\noutbound: true\ngateway: {}\nlisten: {{admin: \"127.0.0.1:0\"}}\n",
            addr(grpc),
            gw_ready["local"]
        ),
    )
    .await;
    let (dns, dns_ready) = daemon(
        dir.path(),
        "dns",
        "dns",
        &format!("cluster: solo\ncontrol: \"{}\"\ncontrolCa: data/ca.pem\ntoken: {TOKEN}\nupstreams: []\nlisten: {{dns: \"127.0.0.1:0\", admin: \"127.0.0.1:0\"}}\n", addr(grpc)),
    )
    .await;
    let dns_addr: SocketAddr = dns_ready["udp"].as_str().unwrap().parse().unwrap();

    // The service appears once the control plane has read the discovery file.
    let reply = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Ok(ips) = resolve_a(dns_addr, "echo.default.svc.clusterset.local").await {
                if let Some(vip) = ips.first() {
                    if let Ok(reply) = call_sample(SocketAddr::new((*vip).into(), 9080)).await {
                        return reply;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("echo becomes reachable by name");
    assert_eq!(reply.service, "echo");
    assert_eq!(
        reply.caller,
        "spiffe://solo.isthmus.local/ns/default/sa/sleep"
    );

    for (child, name) in [
        (dns, "dns"),
        (client, "client sidecar"),
        (server, "server sidecar"),
        (gateway, "gateway"),
        (control, "control"),
    ] {
        stop(child, name).await;
    }
    app.shutdown();
}
