//! End to end: the demo federation in one process, used as a user would use it.

use std::net::SocketAddr;

use hickory_proto::op::ResponseCode;
use isthmus_demo::probe::{call_sample, http2_get, query_a, resolve_a};
use isthmus_demo::{vip_of, Demo, DemoOptions, SAMPLE_PORT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cluster_resolves_and_calls_ratings_served_by_central_with_its_own_identity() {
    let demo = Demo::start(DemoOptions::fast(110))
        .await
        .expect("the demo federation starts");
    let name = "ratings.default.svc.clusterset.local";
    let mut vips = Vec::new();
    for c in &demo.clusters {
        let expected =
            vip_of(&c.config.borrow(), "ratings").expect("ratings is imported everywhere");
        let answers = resolve_a(c.dns.udp_addr(), name)
            .await
            .expect("the DNS proxy answers");
        assert_eq!(
            answers
                .iter()
                .map(|ip| std::net::IpAddr::V4(*ip))
                .collect::<Vec<_>>(),
            vec![expected],
            "{}",
            c.name
        );
        let reply = call_sample(SocketAddr::new(expected, SAMPLE_PORT))
            .await
            .expect("the call succeeds");
        assert_eq!(reply.service, "ratings");
        assert_eq!(
            reply.cluster, "central",
            "ratings runs only in central (called from {})",
            c.name
        );
        // The server saw the calling workload's own identity: the gateways carried its mTLS
        // session without terminating it.
        assert_eq!(
            reply.caller,
            c.client_identity().to_string(),
            "caller seen when called from {}",
            c.name
        );
        // The same call in HTTP/2 (h2c from the app): h2 inside the mTLS session through both
        // gateways; ratings' port is `http`, so its sidecar speaks HTTP/1.1 to the app.
        let (status, body) = http2_get(SocketAddr::new(expected, SAMPLE_PORT), "/")
            .await
            .expect("the HTTP/2 call succeeds");
        assert_eq!(status, 200, "{body}");
        let reply: isthmus_demo::sample::SampleReply = serde_json::from_str(&body).unwrap();
        assert_eq!(reply.cluster, "central");
        assert_eq!(reply.caller, c.client_identity().to_string());
        assert_eq!(reply.protocol, "HTTP/1.1");
        vips.push(expected);
    }
    // Each cluster allocates VIPs from its own range.
    vips.dedup();
    assert_eq!(vips.len(), 3, "{vips:?}");
    demo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_stay_local_when_the_service_runs_locally_and_cross_when_it_does_not() {
    let demo = Demo::start(DemoOptions::fast(120))
        .await
        .expect("the demo federation starts");
    let east = demo.cluster("east").unwrap();
    let config = east.config.borrow().clone();
    // reviews runs in east (v1): local first.
    let reviews = call_sample(SocketAddr::new(
        vip_of(&config, "reviews").unwrap(),
        SAMPLE_PORT,
    ))
    .await
    .unwrap();
    assert_eq!(
        (reviews.cluster.as_str(), reviews.version.as_str()),
        ("east", "v1")
    );
    // productpage is exported by east only; west reaches it through the gateways.
    let west = demo.cluster("west").unwrap();
    let west_config = west.config.borrow().clone();
    let pp = call_sample(SocketAddr::new(
        vip_of(&west_config, "productpage").unwrap(),
        SAMPLE_PORT,
    ))
    .await
    .unwrap();
    assert_eq!(pp.cluster, "east");
    assert_eq!(pp.caller, west.client_identity().to_string());
    demo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_outside_the_mesh_under_clusterset_local_are_nxdomain() {
    let demo = Demo::start(DemoOptions::fast(130))
        .await
        .expect("the demo federation starts");
    let east = demo.cluster("east").unwrap();
    let (code, answers) = query_a(east.dns.udp_addr(), "nosuch.default.svc.clusterset.local")
        .await
        .unwrap();
    assert_eq!(code, ResponseCode::NXDomain);
    assert!(answers.is_empty());
    demo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_leaves_no_listener_behind() {
    let demo = Demo::start(DemoOptions::fast(140))
        .await
        .expect("the demo federation starts");
    let ports = demo.ports();
    let east = demo.cluster("east").unwrap();
    let vip = vip_of(&east.config.borrow(), "ratings").unwrap();
    demo.shutdown().await;
    for c in &ports.clusters {
        let control: SocketAddr = c.control.parse().unwrap();
        assert!(
            tokio::net::TcpStream::connect(control).await.is_err(),
            "control of {} still listening",
            c.name
        );
        let dns: SocketAddr = c.dns.parse().unwrap();
        assert!(
            tokio::net::TcpStream::connect(dns).await.is_err(),
            "dns of {} still listening",
            c.name
        );
        for admin in c.admin.values() {
            let admin: SocketAddr = admin.parse().unwrap();
            assert!(
                tokio::net::TcpStream::connect(admin).await.is_err(),
                "admin {admin} still listening"
            );
        }
    }
    assert!(
        tokio::net::TcpStream::connect(SocketAddr::new(vip, SAMPLE_PORT))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_metrics_use_istio_names_with_source_and_destination_clusters() {
    let demo = Demo::start(DemoOptions::fast(190))
        .await
        .expect("the demo federation starts");
    let east = demo.cluster("east").unwrap();
    let vip = vip_of(&east.config.borrow(), "ratings").unwrap();
    for _ in 0..3 {
        call_sample(SocketAddr::new(vip, SAMPLE_PORT))
            .await
            .unwrap();
    }
    let admin: SocketAddr = demo.ports().clusters[0].admin["sidecar"].parse().unwrap();
    let (status, text) = isthmus_demo::probe::http_get(admin, "/metrics")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("destination_service_name=\"ratings\"")
        })
        .unwrap_or_else(|| panic!("no istio_requests_total for ratings in:\n{text}"));
    for label in [
        "reporter=\"source\"",
        "source_cluster=\"east\"",
        "destination_cluster=\"central\"",
        "response_code=\"200\"",
        "source_principal=\"spiffe://east.isthmus.local/ns/default/sa/sleep\"",
    ] {
        assert!(line.contains(label), "{label} missing from {line}");
    }
    assert!(line.ends_with(" 3"), "{line}");
    assert!(
        text.contains("isthmus_sidecar_config_version"),
        "component gauges keep their prefix"
    );
    demo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reads_federation_status_through_the_control_planes_tls_api() {
    let demo = Demo::start(DemoOptions::fast(195))
        .await
        .expect("the demo federation starts");
    let east = demo.cluster("east").unwrap();
    let (control, ca) = (
        east.control.grpc_addr().to_string(),
        east.ca_file.display().to_string(),
    );
    let (cert, key) = (
        east.admin_credential.0.display().to_string(),
        east.admin_credential.1.display().to_string(),
    );
    // The CLI with `args`; `tls` appends `--control` and `--ca-file` for east, and east's
    // admin credential (the first mesh admin).
    let run = |args: &[&str], tls: bool| {
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if tls {
            args.extend([
                "--control".into(),
                control.clone(),
                "--ca-file".into(),
                ca.clone(),
                "--cert".into(),
                cert.clone(),
                "--key".into(),
                key.clone(),
            ]);
        }
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_isthmus"))
                    .args(&args)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let succeeded = |out: &std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Every member answers through its own cluster's control plane (the address and CA its
    // cluster published), none through a peer port.
    let out = succeeded(&run(&["status", "-o", "json"], true).await);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let members = report["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    for m in members {
        assert_ne!(m["role"], "unreachable", "{m}");
        assert!(m["cluster"].is_string(), "{m}");
    }
    assert!(report["leader"].is_u64());
    // A join token minted the same way.
    let out = succeeded(&run(&["cluster", "token", "--ttl", "1m"], true).await);
    assert!(out.trim().contains('.'));
    // Mesh-wide policies from a cluster's Kubernetes need a mesh admin's grant: west's own
    // member is refused on apply until `cluster grant-policies west`, and again after
    // `cluster revoke-policies west`.
    let west = demo.cluster("west").unwrap().store();
    let policy = isthmus_core::policy::Policy::from_json_at(
        "test",
        1,
        br#"{"apiVersion":"networking.istio.io/v1","kind":"VirtualService",
             "metadata":{"name":"ratings-k8s","namespace":"default"},
             "spec":{"hosts":["ratings"],"http":[{"route":[{"destination":{"host":"ratings"}}]}]}}"#,
    )
    .unwrap();
    let write = || {
        let west = west.clone();
        let (key, value) = (policy.store_key(), policy.to_json().to_string());
        async move { west.put(&key, value.into_bytes()).await }
    };
    let refused = write().await.expect_err("no grant yet");
    assert!(
        refused.to_string().contains("grants/policy-writer/west"),
        "{refused}"
    );
    let out = succeeded(&run(&["cluster", "grant-policies", "west"], true).await);
    assert!(out.contains("cluster west may now write"), "{out}");
    eventually_ok(write).await;
    // Who wrote what: the grant by east's mesh admin, west's record by west's own member.
    let out = succeeded(&run(&["records", "grants/policy-writer/"], true).await);
    assert!(
        out.contains("grants/policy-writer/west")
            && out.contains(&format!(
                "spiffe://{}/operator/admin/admin (through member",
                east.trust_domain
            )),
        "{out}"
    );
    let out = succeeded(&run(&["records", "clusters/", "--values"], true).await);
    let west_member = demo.cluster("west").unwrap().store().status().id;
    let west_line = out
        .lines()
        .find(|l| l.starts_with("clusters/west"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        west_line.ends_with(&format!("member {west_member}")),
        "{west_line}"
    );
    assert!(out.contains("\"trustDomain\""), "{out}");
    succeeded(&run(&["cluster", "revoke-policies", "west"], true).await);
    eventually_err(write).await;
    let out = run(&["cluster", "grant-policies", "nowhere"], true).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no cluster named \"nowhere\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without the CA the CLI says what is missing.
    let out = run(&["status", "--control", &control], false).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca-file"));
    demo.shutdown().await;
}

/// Retries `write` (a store write through a member whose replica may lag the grant) until it
/// succeeds, for at most 10 s.
async fn eventually_ok<F, Fut, T, E>(write: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match write().await {
            Ok(_) => return,
            Err(e) if std::time::Instant::now() > deadline => panic!("never succeeded: {e}"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}

/// Retries `write` until it fails, for at most 10 s.
async fn eventually_err<F, Fut, T, E>(write: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while write().await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "never refused");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
