//! A cluster CA rotated as an operator does it (docs/security.md §5), on daemons run as
//! processes from config files: `isthmus ca rotate` three times, the control plane restarted
//! after each, while a client sidecar calls a server sidecar over mTLS every 100 ms.
//!
//! - After staging, the cluster record publishes the old and the new CA.
//! - After activation, the data plane, started trusting only the old CA, reconnects to the
//!   control plane whose certificate the new CA signed, and renews its certificates from it;
//!   a certificate from the old CA is still accepted (the overlap). Retiring before one
//!   `certLifetime` has passed is refused, and changes nothing.
//! - After retirement the bundle is the new CA alone: calls go on, and a certificate the old
//!   CA signed, or an operator credential it issued, is refused.
//!
//! Not one call fails throughout.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::ca::CertificateAuthority;
use isthmus_core::identity::SpiffeId;
use isthmus_core::tls::{Identity, TrustBundles};
use isthmus_demo::probe::{call_sample, resolve_a};
use isthmus_demo::sample::{self, SampleApp};
use isthmus_testkit::discovery::{Discovery, Service};
use support::{addr, daemon, free_port, stop};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Child;

mod support;

const TOKEN: &str = "rotation-test-token-0123456789";
const TD: &str = "solo.isthmus.local";
/// Short, so renewals (at half of it) and the retirement's wait fit in the test.
const LIFETIME: &str = "4s";

fn cli(dir: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_isthmus"))
        .args(args)
        .current_dir(dir)
        .env("ISTHMUS_CONFIG", dir.join("isthmus-config.yaml"))
        .output()
        .unwrap()
}

fn rotate(dir: &Path) -> Output {
    cli(
        dir,
        &[
            "ca",
            "rotate",
            "--data-dir",
            "data",
            "--cert-lifetime",
            LIFETIME,
        ],
    )
}

fn rotate_ok(dir: &Path, expect: &str) {
    let out = rotate(dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(expect),
        "isthmus ca rotate: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How many CA certificates the cluster record `clusters/solo` publishes, read as an
/// operator reads it; `Err` with the CLI's words when the read fails.
fn published_cas(dir: &Path, grpc: u16, credential: &str) -> Result<usize, String> {
    let out = cli(
        dir,
        &[
            "records",
            "clusters/solo",
            "--values",
            "--control",
            &addr(grpc),
            "--ca-file",
            "data/ca.pem",
            "--cert",
            &format!("{credential}.pem"),
            "--key",
            &format!("{credential}-key.pem"),
        ],
    );
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .matches("BEGIN CERTIFICATE")
        .count())
}

async fn wait_for_published(dir: &Path, grpc: u16, credential: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let seen = published_cas(dir, grpc, credential);
        if seen == Ok(n) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "clusters/solo never published {n} CAs: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn issue_viewer(dir: &Path, name: &str) {
    let out = cli(
        dir,
        &[
            "credentials",
            "issue",
            "--data-dir",
            "data",
            "--name",
            name,
            "--role",
            "viewer",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn control_config(grpc: u16, peer: u16) -> String {
    format!(
        "cluster: solo\ndataDir: data\ndiscovery: {{file: services.yaml, pollInterval: 50ms}}\nvipRange: 127.45.0.0/16\n\
         certLifetime: {LIFETIME}\n\
         listen: {{grpc: \"{}\", admin: \"127.0.0.1:0\"}}\n\
         bootstrapTokens: [{{token: {TOKEN}, allow: [\"default/*\", \"isthmus-system/eastwest-gateway\", \"isthmus-system/dns\"]}}]\n\
         federation: {{nodeId: 1, listen: \"{}\", peers: {{1: \"{}\"}}}}\n",
        addr(grpc),
        addr(peer),
        addr(peer)
    )
}

async fn restart_control(dir: &Path, control: Child, config: &str) -> Child {
    stop(control, "control").await;
    daemon(dir, "control", "control", config).await.0
}

/// Calls the server sidecar's inbound port over mTLS presenting a certificate for `sleep`
/// issued by `ca`: `Ok` with the HTTP status line when the call is served.
async fn call_as(ca: &CertificateAuthority, trusted: &str, inbound: u16) -> Result<String, String> {
    let id = SpiffeId::new(TD, "default", "sleep");
    let issued = ca.issue(&id, Duration::from_secs(60)).unwrap();
    let identity = Identity::from_pem(id, &issued.cert_chain_pem, &issued.key_pem).unwrap();
    let trust = TrustBundles::new();
    trust.replace([(TD, trusted)]).unwrap();
    let config = isthmus_core::tls::client_config(
        identity,
        trust,
        isthmus_core::tls::accept_any_member(),
        &[b"http/1.1"],
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", inbound))
        .await
        .map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(isthmus_core::tls::mesh_server_name(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let exchange = async {
        tls.write_all(b"GET / HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
            .await?;
        let mut reply = Vec::new();
        tls.read_to_end(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    let reply = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "no answer in 5 s".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&reply);
    match text.lines().next() {
        Some(status) if status.starts_with("HTTP/1.1 200") => Ok(status.to_string()),
        _ => Err(format!("not served: {text:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_ca_rotates_in_three_steps_without_failing_a_call() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
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
    Discovery::new().write(&dir.join("services.yaml"));
    let config = control_config(grpc, peer);
    let (mut control, _) = daemon(dir, "control", "control", &config).await;
    // The data plane is given the first CA only, as `controlCa`.
    std::fs::copy(dir.join("data/ca.pem"), dir.join("first-ca.pem")).unwrap();
    let old_ca = CertificateAuthority::from_pem(
        TD,
        &std::fs::read_to_string(dir.join("data/ca.pem")).unwrap(),
        &std::fs::read_to_string(dir.join("data/ca-key.pem")).unwrap(),
    )
    .unwrap();
    let (gateway, gw_ready) = daemon(
        dir,
        "gateway",
        "gateway",
        &format!(
            "cluster: solo\ncontrol: \"{}\"\ncontrolCa: first-ca.pem\ntoken: {TOKEN}\nlisten: {{quic: \"127.0.0.1:0\", local: \"127.0.0.1:0\", admin: \"127.0.0.1:0\"}}\n",
            addr(grpc)
        ),
    )
    .await;
    let (server, _) = daemon(
        dir,
        "sidecar-echo",
        "sidecar",
        &format!(
            "cluster: solo\ncontrol: \"{}\"\ncontrolCa: first-ca.pem\ntoken: {TOKEN}\nserviceAccount: echo\n\
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
        .write(&dir.join("services.yaml"));
    let (client, _) = daemon(
        dir,
        "sidecar-sleep",
        "sidecar",
        &format!(
            "cluster: solo\ncontrol: \"{}\"\ncontrolCa: first-ca.pem\ntoken: {TOKEN}\nserviceAccount: sleep\noutbound: true\ngateway: {}\nlisten: {{admin: \"127.0.0.1:0\"}}\n",
            addr(grpc),
            gw_ready["local"]
        ),
    )
    .await;
    let (dns, dns_ready) = daemon(
        dir,
        "dns",
        "dns",
        &format!("cluster: solo\ncontrol: \"{}\"\ncontrolCa: first-ca.pem\ntoken: {TOKEN}\nupstreams: []\nlisten: {{dns: \"127.0.0.1:0\", admin: \"127.0.0.1:0\"}}\n", addr(grpc)),
    )
    .await;
    let dns_addr: SocketAddr = dns_ready["udp"].as_str().unwrap().parse().unwrap();
    let vip = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Ok(ips) = resolve_a(dns_addr, "echo.default.svc.clusterset.local").await {
                if let Some(vip) = ips.first() {
                    let vip = SocketAddr::new((*vip).into(), 9080);
                    if call_sample(vip).await.is_ok() {
                        return vip;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("echo becomes reachable by name");
    issue_viewer(dir, "ann");
    wait_for_published(dir, grpc, "ann", 1).await;

    // A call every 100 ms, on a fresh connection, for the whole rotation.
    let running = Arc::new(AtomicBool::new(true));
    let (ok, failed) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let load = {
        let (running, ok, failed) = (running.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let mut errors = Vec::new();
            while running.load(Ordering::Relaxed) {
                match call_sample(vip).await {
                    Ok(reply) if reply.caller == format!("spiffe://{TD}/ns/default/sa/sleep") => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        errors.push(format!("{other:?}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            errors
        })
    };

    // 1. Stage: published beside the old CA, which still signs.
    rotate_ok(dir, "staged a new CA");
    let new_pem = std::fs::read_to_string(dir.join("data/ca-next.pem")).unwrap();
    control = restart_control(dir, control, &config).await;
    wait_for_published(dir, grpc, "ann", 2).await;

    // 2. Activate: the new CA signs. The data plane, which trusted only the first CA,
    // reconnects and renews its certificates from the new one within a lifetime.
    rotate_ok(dir, "the new CA is");
    let new_ca = CertificateAuthority::from_pem(
        TD,
        &new_pem,
        &std::fs::read_to_string(dir.join("data/ca-key.pem")).unwrap(),
    )
    .unwrap();
    control = restart_control(dir, control, &config).await;
    wait_for_published(dir, grpc, "ann", 2).await;
    let both = format!("{}{new_pem}", old_ca.cert_pem());
    // The overlap: what either CA signed is accepted.
    call_as(&old_ca, &both, inbound)
        .await
        .expect("a certificate from the old CA is accepted during the overlap");
    call_as(&new_ca, &both, inbound)
        .await
        .expect("a certificate from the new CA is accepted");
    // Retiring now is refused, naming why, and changes nothing.
    let out = rotate(dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("ca-previous.pem")
            && stderr.contains("retire it in"),
        "{stderr}"
    );
    assert!(dir.join("data/ca-previous.pem").exists());
    tokio::time::sleep(Duration::from_secs(4)).await;

    // 3. Retire: the bundle is the new CA alone.
    rotate_ok(dir, "retired the old CA");
    control = restart_control(dir, control, &config).await;
    issue_viewer(dir, "bob");
    wait_for_published(dir, grpc, "bob", 1).await;
    let refused = published_cas(dir, grpc, "ann");
    assert!(
        refused.is_err(),
        "a credential from the retired CA is refused: {refused:?}"
    );
    // The server sidecar follows the new bundle within a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if call_as(&old_ca, &new_pem, inbound).await.is_err() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a certificate from the retired CA is still accepted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    call_as(&new_ca, &new_pem, inbound)
        .await
        .expect("a certificate from the new CA is accepted");
    // Calls go on for a whole lifetime with the new CA alone.
    let before = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(4)).await;

    running.store(false, Ordering::Relaxed);
    let errors = load.await.unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("calls during the rotation: {ok} served, {failed} failed");
    assert!(
        ok - before >= 10,
        "calls kept being served after retirement"
    );
    assert_eq!(failed, 0, "no call fails during a rotation: {errors:?}");
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
