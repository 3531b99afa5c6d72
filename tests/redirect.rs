//! Transparent redirect for real (root only): a network namespace standing in for a pod,
//! `isthmus sidecar init` installing the nftables rules in it, sidecars serving inside it,
//! and an unprivileged application whose plain connections to a service's ClusterIP reach the
//! service through the mesh, while connections elsewhere pass through untouched.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_core::ca::CertificateAuthority;
use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::{MeshConfig, Protocol};
use isthmus_core::tls::{Identity, TrustBundles};
use isthmus_testkit::mesh;

const TD: &str = "pod.isthmus.local";
/// The service's virtual IP (the default VIP range), routed inside the namespace.
const VIP: &str = "240.240.0.10";
/// An address of the namespace's own, outside the mesh, for the passthrough case.
const OUTSIDE: &str = "240.240.0.254";

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted when dropped.
struct Netns(String);

impl Netns {
    fn create(suffix: &str) -> Netns {
        let name = format!("isthmus-{suffix}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        let ns = Netns(name);
        run(&["ip", "-n", &ns.0, "link", "set", "lo", "up"]);
        // The /16 on loopback routes the VIP range inside the namespace (no dummy module
        // needed), and OUTSIDE is a local address outside 127.0.0.0/8.
        let outside = format!("{OUTSIDE}/16");
        run(&["ip", "-n", &ns.0, "addr", "add", &outside, "dev", "lo"]);
        ns
    }

    /// Runs `args` inside the namespace as the unprivileged user `nobody`.
    fn as_nobody(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.0,
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
            ])
            .arg("--clear-groups")
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn identity(ca: &CertificateAuthority, sa: &str) -> Arc<Identity> {
    let id = SpiffeId::new(TD, "default", sa);
    let issued = ca.issue(&id, Duration::from_secs(600)).unwrap();
    Identity::from_pem(id, &issued.cert_chain_pem, &issued.key_pem).unwrap()
}

/// A tiny HTTP/1.1 app answering `<name> <x-forwarded-client-cert or none>`.
async fn app(listen: &str, name: &'static str) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = tcp.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                let xfcc = head
                    .lines()
                    .find_map(|l| l.strip_prefix("x-forwarded-client-cert: "))
                    .unwrap_or("none")
                    .to_string();
                let body = format!("{name} {xfcc}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

/// Inside the namespace: the app, its sidecar (inbound), and the caller's sidecar with the
/// redirected outbound port on 127.0.0.1:15001. Returns once all listen; runs until `stop`.
type Ready = (u16, tokio::sync::watch::Sender<Arc<MeshConfig>>);

fn start_pod(
    ns: &str,
    server_metrics: isthmus_sidecar::metrics::Metrics,
    ready: std::sync::mpsc::Sender<Ready>,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    // SAFETY: setns(2) takes a file descriptor that `file` keeps open for the call, and
    // changes only this thread's network namespace (the test runs it on a thread of its own).
    #[allow(unsafe_code)]
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        isthmus_core::install_crypto_provider();
        let ca = CertificateAuthority::generate(TD).unwrap();
        let trust = TrustBundles::new();
        trust.replace([(TD, ca.cert_pem())]).unwrap();
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(MeshConfig::default()));
        let web = app("127.0.0.1:0", "web").await;
        let outside = app(&format!("{OUTSIDE}:0"), "outside").await;
        // What callers from outside the pod reach on the pod's address (redirected inbound).
        app("0.0.0.0:9090", "podapp").await;
        let options = |id, inbound, outbound, metrics| isthmus_sidecar::SidecarOptions {
            cluster: "pod".into(),
            identity: id,
            trust: trust.clone(),
            labels: BTreeMap::new(),
            outbound,
            inbound,
            gateway: None,
            connect_timeout: Duration::from_secs(2),
            metrics,
            access_log: Default::default(),
            path_normalization: Default::default(),
            limits: Default::default(),
        };
        let mut server = isthmus_sidecar::start(
            options(
                identity(&ca, "web"),
                vec![isthmus_sidecar::InboundPort {
                    listen: "127.0.0.1:0".parse().unwrap(),
                    forward_to: web,
                    protocol: Protocol::Http,
                }],
                false,
                server_metrics,
            ),
            rx.clone(),
        )
        .await
        .unwrap();
        let inbound = tokio::net::TcpListener::bind("0.0.0.0:15006")
            .await
            .unwrap();
        server.serve_redirected_inbound(inbound).unwrap();
        let mut client = isthmus_sidecar::start(
            options(identity(&ca, "sleep"), vec![], true, Default::default()),
            rx,
        )
        .await
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:15001")
            .await
            .unwrap();
        client.serve_redirected(listener).unwrap();
        tx.send_replace(Arc::new(MeshConfig {
            version: 1,
            cluster: "pod".into(),
            services: vec![mesh::served(
                TD,
                "web",
                VIP.parse().unwrap(),
                &[("http", 9080, Protocol::Http)],
                &[server.inbound_addrs()[0]],
            )],
            clusters: vec![mesh::member("pod", TD, ca.cert_pem())],
            policies: vec![],
        }));
        ready.send((outside.port(), tx)).unwrap();
        let _ = stop.await;
        client.shutdown().await;
        server.shutdown().await;
    });
}

#[test]
fn init_redirects_the_pods_tcp_to_the_sidecar_which_finds_the_original_destination() {
    if !is_root() {
        eprintln!("skipped: network namespaces and nftables need root (CI runs as root)");
        return;
    }
    let ns = Netns::create("out");
    // The init container's job, with the real binary; the test's sidecars run as root, so
    // root is the exempt proxy user and the application runs as nobody.
    let init = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            env!("CARGO_BIN_EXE_isthmus"),
            "sidecar",
            "init",
        ])
        .args(["--proxy-uid", "0", "--proxy-gid", "none", "--no-inbound"])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "isthmus sidecar init failed: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    assert!(String::from_utf8_lossy(&init.stdout).contains("with nft"));

    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let pod = {
        let name = ns.0.clone();
        std::thread::spawn(move || start_pod(&name, Default::default(), ready_tx, stop_rx))
    };
    let (outside_port, _config) = ready_rx.recv_timeout(Duration::from_secs(20)).unwrap();

    // The app dials the ClusterIP with plain HTTP: redirected, recovered, carried over mTLS.
    let url = format!("http://{VIP}:9080/");
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let out = ns.as_nobody(&["curl", "-sS", "--max-time", "3", &url]);
        let body = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "curl {url} kept failing: {} {body}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(body.starts_with("web "), "{body}");
    assert!(
        body.contains("uri=spiffe://pod.isthmus.local/ns/default/sa/sleep"),
        "the mesh's identity header is missing, so the call did not go through the sidecars: {body}"
    );

    // Somewhere outside the mesh: redirected too (not loopback), and passed through to the
    // original destination as it was: no loop, no identity header.
    let out = ns.as_nobody(&[
        "curl",
        "-sS",
        "--max-time",
        "3",
        &format!("http://{OUTSIDE}:{outside_port}/"),
    ]);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(body, "outside none");

    // Straight to the outbound port (loopback is never redirected): the connection kept its
    // own address as its destination, so relaying it would dial the listener itself, again
    // and again. It is closed at once, and the sidecar still serves.
    let started = Instant::now();
    let out = ns.as_nobody(&["curl", "-sS", "--max-time", "3", "http://127.0.0.1:15001/"]);
    assert!(
        matches!(out.status.code(), Some(52 | 56)),
        "expected the connection closed (curl exit 52 or 56), got {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    // (Relayed, it would first wait out the 1 s protocol detection.)
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "closed only after {:?}",
        started.elapsed()
    );
    let out = ns.as_nobody(&["curl", "-sS", "--max-time", "3", &url]);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("web "),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Re-running init replaces the rules instead of stacking them.
    let again = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            env!("CARGO_BIN_EXE_isthmus"),
            "sidecar",
            "init",
        ])
        .args(["--proxy-uid", "0", "--proxy-gid", "none", "--no-inbound"])
        .output()
        .unwrap();
    assert!(again.status.success());
    let rules = Command::new("ip")
        .args([
            "netns", "exec", &ns.0, "nft", "list", "table", "inet", "isthmus",
        ])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert_eq!(rules.matches("redirect to :15001").count(), 1, "{rules}");

    let _ = stop_tx.send(());
    pod.join().unwrap();
}

const PERMISSIVE: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec:
  mtls: {mode: PERMISSIVE}
"#;

#[test]
fn init_redirects_inbound_tcp_to_the_sidecar_which_enforces_mtls_and_forwards_to_the_original_port()
{
    if !is_root() {
        eprintln!("skipped: network namespaces and nftables need root (CI runs as root)");
        return;
    }
    let pod_ns = Netns::create("in");
    let client_ns = Netns::create("cl");
    // A link between the pod and a caller outside it (test hosts of our own, in reserved
    // address space that never leaves these namespaces).
    run(&[
        "ip",
        "-n",
        &pod_ns.0,
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &client_ns.0,
    ]);
    run(&[
        "ip",
        "-n",
        &pod_ns.0,
        "addr",
        "add",
        "240.241.0.1/24",
        "dev",
        "eth0",
    ]);
    run(&[
        "ip",
        "-n",
        &client_ns.0,
        "addr",
        "add",
        "240.241.0.2/24",
        "dev",
        "eth0",
    ]);
    run(&["ip", "-n", &pod_ns.0, "link", "set", "eth0", "up"]);
    run(&["ip", "-n", &client_ns.0, "link", "set", "eth0", "up"]);
    let init = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod_ns.0,
            env!("CARGO_BIN_EXE_isthmus"),
            "sidecar",
            "init",
        ])
        .args(["--proxy-uid", "0", "--proxy-gid", "none"])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );

    let metrics = isthmus_sidecar::metrics::Metrics::default();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let pod = {
        let (name, metrics) = (pod_ns.0.clone(), metrics.clone());
        std::thread::spawn(move || start_pod(&name, metrics, ready_tx, stop_rx))
    };
    let (_, config) = ready_rx.recv_timeout(Duration::from_secs(20)).unwrap();
    let curl = |ns: &Netns| {
        Command::new("ip")
            .args(["netns", "exec", &ns.0, "curl", "-sS", "--max-time", "3"])
            .arg("http://240.241.0.1:9090/")
            .output()
            .unwrap()
    };

    // STRICT (the default): plaintext from outside the mesh is refused by the sidecar. The
    // application itself would have answered, so a refusal shows the redirect took it.
    let refused = curl(&client_ns);
    assert!(
        !refused.status.success(),
        "plaintext got through: {}",
        String::from_utf8_lossy(&refused.stdout)
    );

    // PERMISSIVE: served, through the sidecar (its destination-side metrics count it), to the
    // port the caller dialled.
    config.send_modify(|c| {
        Arc::make_mut(c).policies =
            isthmus_core::policy::parse_documents("pa.yaml", PERMISSIVE).unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let out = curl(&client_ns);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).to_string();
        }
        assert!(
            Instant::now() < deadline,
            "never served: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(body, "podapp none");
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let mut scraped = String::new();
    prometheus_client::encoding::text::encode(&mut scraped, &registry).unwrap();
    assert!(
        scraped.lines().any(
            |l| l.starts_with("istio_requests_total{reporter=\"destination\"")
                && l.contains("response_code=\"200\"")
                && l.contains("connection_security_policy=\"none\"")
        ),
        "{scraped}"
    );
    let _ = stop_tx.send(());
    pod.join().unwrap();
}
