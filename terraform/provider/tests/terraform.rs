//! The provider driven by the real `terraform` binary against a live federation: the demo's
//! three clusters (with sidecars and sample services, in this process) and a fourth
//! cluster's control plane that Terraform joins to it.
//!
//! One configuration joins the cluster and creates a DestinationRule, a VirtualService and
//! a FailoverPolicy; the test checks what the CLI's own code reports (`isthmus status`,
//! `isthmus get`) and that calls through the sidecars follow the policies. Then: a second
//! plan has no changes; a weight change is an in-place update that moves the traffic; a
//! change made with the CLI shows as drift; import of existing objects plans no change;
//! destroy removes everything; and invalid attributes are diagnostics naming them, with
//! nothing applied. The whole cycle runs under every Terraform this machine has (PyPI's 1.0.3
//! and the system's own), each joining a north of its own: a removed member's id is never
//! reused.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use isthmus_core::client::ControlClient;
use isthmus_core::policy::{parse_documents, Kind};
use isthmus_demo::probe::call_sample;
use isthmus_demo::{vip_of, Demo, DemoCluster, DemoOptions, SAMPLE_PORT};
use support::{header, header_as, Workspace};

mod support;

fn options() -> DemoOptions {
    DemoOptions::fast(222)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Starts cluster `north`'s control plane (as `isthmus control` does, from a config file)
/// as a new, empty federation member that the demo's members will hear from once joined.
/// Its CA is made first (`north-data/ca.pem`, the bundle its join records); its config names
/// each demo member with its trust domain and CA, so it authenticates them.
fn start_north(demo: &Demo, dir: &Path, peer_port: u16, id: u64) -> tokio::task::JoinHandle<()> {
    isthmus_testkit::discovery::Discovery::new().write(&dir.join("services.yaml"));
    let data = dir.join("north-data");
    std::fs::create_dir_all(&data).unwrap();
    let ca = isthmus_core::ca::CertificateAuthority::generate("north.isthmus.local").unwrap();
    std::fs::write(data.join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(data.join("ca-key.pem"), ca.key_pem()).unwrap();
    let mut peers: Vec<String> = demo
        .clusters
        .iter()
        .enumerate()
        .map(|(i, c)| {
            format!(
                "{}: {{addr: \"{}\", trustDomain: {}, caFile: \"{}\"}}",
                i + 1,
                c.federation,
                c.trust_domain,
                c.ca_file.display()
            )
        })
        .collect();
    peers.push(format!("{id}: \"127.0.0.1:{peer_port}\""));
    let config = format!(
        "cluster: north\nlocality: eu-west-1/a\ndataDir: north-data\n\
         discovery: {{file: services.yaml, pollInterval: 100ms}}\nvipRange: 127.225.0.0/16\n\
         listen: {{grpc: \"127.0.0.1:0\", admin: \"127.0.0.1:0\"}}\n\
         federation: {{nodeId: {id}, listen: \"127.0.0.1:{peer_port}\", join: true, tick: 20ms, peers: {{{}}}}}\n",
        peers.join(", ")
    );
    let path = dir.join("north.yaml");
    std::fs::write(&path, config).unwrap();
    tokio::spawn(async move {
        let _daemon = isthmus_control::daemon::Daemon::start_from_file(&path)
            .await
            .unwrap_or_else(|e| panic!("north's control plane failed: {e:#}"));
        // Serves until the test's runtime ends, as `isthmus control` does until a signal.
        std::future::pending::<()>().await
    })
}

const DESTINATION_RULE: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v3
    labels: {version: v3}
"#;

fn virtual_service(v1: u32, v3: u32) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {{host: reviews, subset: v1}}
      weight: {v1}
    - destination: {{host: reviews, subset: v3}}
      weight: {v3}
"#
    )
}

/// North joins with its trust domain and CA bundle (`north_dir/north-data/ca.pem`).
fn configuration(
    east: &DemoCluster,
    (north_dir, north_peer, id): (&Path, u16, u64),
    v1: u32,
    v3: u32,
) -> String {
    format!(
        r#"{header}
resource "isthmus_cluster" "north" {{
  name         = "north"
  member_id    = {id}
  peer_address = "127.0.0.1:{north_peer}"
  locality     = "eu-west-1/a"
  trust_domain = "north.isthmus.local"
  trust_bundle = file("{bundle}")
}}

resource "isthmus_policy" "reviews_subsets" {{
  yaml = <<EOT
{DESTINATION_RULE}EOT
}}

resource "isthmus_policy" "reviews_route" {{
  yaml = <<EOT
{vs}EOT
}}

resource "isthmus_failover_policy" "details" {{
  name       = "details"
  service    = "details"
  hysteresis = "1s"
  priority {{
    clusters = ["west"]
  }}
}}

data "isthmus_federation" "mesh" {{}}

data "isthmus_services" "default" {{
  namespace = "default"
}}

"#,
        header = header_as(
            &east.control.grpc_addr().to_string(),
            &east.ca_file,
            &east.admin_credential
        ),
        vs = virtual_service(v1, v3),
        bundle = north_dir.join("north-data/ca.pem").display(),
    )
}

/// Calls `service` from `from`'s client sidecar until `want` (version, cluster) answers ten
/// times in a row, or fails after the deadline with what it saw.
async fn traffic_goes_to(from: &DemoCluster, service: &str, want: (&str, &str), why: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut in_a_row = 0;
    let mut last = Vec::new();
    while in_a_row < 10 {
        let vip = vip_of(&from.config.borrow(), service).expect("the service has a VIP");
        let seen = match call_sample(SocketAddr::new(vip, SAMPLE_PORT)).await {
            Ok(r) => (r.version, r.cluster),
            Err(e) => (format!("error: {e}"), String::new()),
        };
        if (seen.0.as_str(), seen.1.as_str()) == want {
            in_a_row += 1;
        } else {
            in_a_row = 0;
            last.push(seen);
            assert!(
                Instant::now() < deadline,
                "{why}: calls to {service} from {} never all went to {want:?}; recent answers: {:?}",
                from.name,
                &last[last.len().saturating_sub(5)..]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The values of the resource or data source at `address`, from `terraform show -json`.
async fn state_values(ws: &Workspace, address: &str) -> serde_json::Value {
    let shown: serde_json::Value =
        serde_json::from_str(&ws.ok(&["show", "-json", "-no-color"]).await.stdout)
            .expect("terraform show -json prints JSON");
    shown["values"]["root_module"]["resources"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["address"] == address))
        .map(|r| r["values"].clone())
        .unwrap_or_else(|| panic!("{address} is not in the state: {shown:#}"))
}

/// `isthmus status`, as the CLI renders it (through `control`).
async fn status_table(control: &ControlClient) -> String {
    let report = isthmus_federation::status::gather_status(control)
        .await
        .expect("isthmus status");
    isthmus_federation::status::render_table(&report)
}

/// `isthmus get KIND NAME -o yaml`, or None when there is no such policy.
async fn cli_get(client: &ControlClient, kind: Kind, name: &str) -> Option<String> {
    let found = client
        .get_policies(Some(kind), Some("default"), Some(name))
        .await
        .expect("isthmus get");
    found
        .first()
        .map(|p| serde_yaml::to_string(&p.to_json()).expect("yaml"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terraform_joins_a_cluster_and_manages_policies_that_traffic_follows_with_drift_import_and_destroy(
) {
    let demo = Demo::start(options()).await.expect("the demo starts");
    // Under every Terraform this machine has; each run joins its own north (a removed
    // member's id is never reused).
    for (i, (bin, version)) in support::terraforms().into_iter().enumerate() {
        let id = 4 + u64::try_from(i).unwrap();
        lifecycle(&Workspace::using(bin), &demo, id, &version).await;
    }
    let east = demo.cluster("east").unwrap();
    invalid_attributes_are_named_and_nothing_is_applied(east, &east.control.client()).await;
    demo.shutdown().await;
}

/// Join north as member `id`, manage policies, check traffic, drift, import, destroy.
async fn lifecycle(ws: &Workspace, demo: &Demo, id: u64, version: &str) {
    let east = demo.cluster("east").unwrap();
    let west = demo.cluster("west").unwrap();
    let central = demo.cluster("central").unwrap();
    let control = east.control.client();
    let north_dir = tempfile::tempdir().unwrap();
    let north_peer = free_port();
    let north = start_north(demo, north_dir.path(), north_peer, id);
    let north_at = (north_dir.path(), north_peer, id);

    // Before: local first, then by locality (central's nearest details is east's).
    traffic_goes_to(west, "reviews", ("v2", "west"), "before apply").await;
    traffic_goes_to(central, "details", ("v1", "east"), "before apply").await;

    // Apply: north joins; subsets, all of reviews to v1, details from central to west.
    ws.write(&configuration(east, north_at, 100, 0));
    ws.apply().await;
    let status = status_table(&control).await;
    assert!(
        status
            .lines()
            .any(|l| l.starts_with(&format!("{id} ")) && l.contains("north")),
        "{version}: isthmus status does not show north as member {id}:\n{status}"
    );
    let vs = cli_get(&control, Kind::VirtualService, "reviews").await;
    assert!(
        vs.as_deref().is_some_and(|y| y.contains("subset: v1")),
        "{vs:?}"
    );
    assert!(cli_get(&control, Kind::DestinationRule, "reviews")
        .await
        .is_some());
    let fp = cli_get(&control, Kind::FailoverPolicy, "details")
        .await
        .expect("the failover policy is stored");
    assert!(fp.contains("- west"), "{fp}");
    traffic_goes_to(
        west,
        "reviews",
        ("v1", "east"),
        "the VirtualService routes to v1",
    )
    .await;
    traffic_goes_to(
        central,
        "details",
        ("v1", "west"),
        "the FailoverPolicy prefers west",
    )
    .await;
    let token = state_values(ws, "isthmus_cluster.north").await["join_token"].clone();
    assert!(
        token.as_str().is_some_and(|t| t.contains('.')),
        "the minted join token is kept in the state: {token}"
    );

    // Nothing changed: nothing to do.
    let again = ws.plan().await;
    assert_eq!(
        again.code,
        0,
        "a second plan should be empty:\n{}",
        again.text()
    );

    // A weight: an in-place update, and the traffic moves.
    ws.write(&configuration(east, north_at, 0, 100));
    let plan = ws.plan().await;
    assert_eq!(plan.code, 2, "{}", plan.text());
    assert!(
        plan.stdout.contains("update in-place")
            && plan.stdout.contains("0 to add, 1 to change, 0 to destroy"),
        "a weight change should be one in-place update:\n{}",
        plan.stdout
    );
    ws.apply().await;
    traffic_goes_to(
        west,
        "reviews",
        ("v3", "central"),
        "the weights moved to v3",
    )
    .await;
    let mesh = state_values(ws, "data.isthmus_federation.mesh").await;
    let names: Vec<&str> = mesh["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["central", "east", "north", "west"], "{mesh:#}");
    let north_record = &mesh["clusters"][2];
    assert_eq!(north_record["locality"], "eu-west-1/a", "{mesh:#}");
    assert!(
        mesh["trust_bundle"]
            .as_str()
            .unwrap()
            .matches("BEGIN CERTIFICATE")
            .count()
            >= 4
    );
    let services = state_values(ws, "data.isthmus_services.default").await;
    let reviews = services["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "reviews")
        .cloned()
        .unwrap_or_else(|| panic!("no reviews in {services:#}"));
    assert_eq!(
        reviews["clusters"],
        serde_json::json!(["central", "east", "west"])
    );

    // Drift: the failover policy changed with the CLI (`isthmus apply`).
    let changed = parse_documents(
        "drift.yaml",
        "apiVersion: isthmus.io/v1alpha1\nkind: FailoverPolicy\nmetadata: {name: details}\n\
         spec: {service: details, priorities: [{clusters: [east]}], minHealthyPercent: 30, hysteresis: 1s}\n",
    )
    .unwrap();
    control.apply(&changed, false).await.unwrap();
    let drift = ws.plan().await;
    assert_eq!(
        drift.code,
        2,
        "the CLI's change should show:\n{}",
        drift.text()
    );
    assert!(
        drift.stdout.contains("min_healthy_percent") && drift.stdout.contains("\"east\""),
        "the plan should show the drifted attributes:\n{}",
        drift.stdout
    );
    ws.apply().await;
    let fp = cli_get(&control, Kind::FailoverPolicy, "details")
        .await
        .unwrap();
    assert!(
        fp.contains("- west") && !fp.contains("minHealthyPercent"),
        "apply should restore the configuration: {fp}"
    );

    // Import: objects that exist come under management with no change to plan.
    for (address, id) in [
        ("isthmus_failover_policy.details", "default/details"),
        ("isthmus_cluster.north", "north"),
    ] {
        ws.ok(&["state", "rm", "-no-color", address]).await;
        ws.ok(&["import", "-input=false", "-no-color", address, id])
            .await;
    }
    let imported = ws.plan().await;
    assert_eq!(
        imported.code,
        0,
        "after import nothing should change:\n{}",
        imported.text()
    );

    // Destroy: every object is gone, and traffic is back to the defaults.
    ws.ok(&["destroy", "-auto-approve", "-input=false", "-no-color"])
        .await;
    for (kind, name) in [
        (Kind::VirtualService, "reviews"),
        (Kind::DestinationRule, "reviews"),
        (Kind::FailoverPolicy, "details"),
    ] {
        assert_eq!(
            cli_get(&control, kind, name).await,
            None,
            "{kind} {name} remains"
        );
    }
    let status = status_table(&control).await;
    assert!(
        !status.lines().any(|l| l.starts_with(&format!("{id} "))),
        "{version}: member {id} remains after destroy:\n{status}"
    );
    traffic_goes_to(central, "details", ("v1", "east"), "after destroy").await;
    north.abort();
}

/// A configuration with bad attributes beside a good resource: each bad one is a diagnostic
/// naming it, and not even the good one is applied.
async fn invalid_attributes_are_named_and_nothing_is_applied(
    east: &DemoCluster,
    control: &ControlClient,
) {
    let ws = Workspace::new();
    ws.write(&format!(
        r#"{header}
resource "isthmus_failover_policy" "bad" {{
  name                = "bad"
  min_healthy_percent = 150
}}

resource "isthmus_cluster" "bad" {{
  name         = "bad"
  member_id    = 9
  peer_address = "nowhere"
}}

resource "isthmus_policy" "bad_route" {{
  yaml = <<EOT
{bad_vs}EOT
}}

resource "isthmus_policy" "fine" {{
  yaml = <<EOT
{DESTINATION_RULE}EOT
}}
"#,
        header = header_as(
            &east.control.grpc_addr().to_string(),
            &east.ca_file,
            &east.admin_credential
        ),
        bad_vs = virtual_service(100, 0).replace(
            "  - route:",
            "  - delegate: {name: reviews-routes}\n    route:"
        ),
    ));
    let run = ws
        .run(&["apply", "-auto-approve", "-input=false", "-no-color"])
        .await;
    assert_ne!(
        run.code,
        0,
        "invalid attributes were accepted:\n{}",
        run.text()
    );
    let text = run.text();
    for (attr, detail) in [
        ("min_healthy_percent = 150", "not a percentage"),
        ("peer_address = \"nowhere\"", "is not ip:port"),
        ("yaml = <<EOT", "spec.http[0].delegate"),
    ] {
        assert!(
            text.contains(attr) && text.contains(detail),
            "the diagnostics should show `{attr}` and say {detail:?}:\n{text}"
        );
    }
    let stored = control.get_policies(None, None, None).await.unwrap();
    assert!(
        stored.is_empty(),
        "nothing should have been applied, found {:?}",
        stored
            .iter()
            .map(|p| format!("{} {}", p.kind(), p.name))
            .collect::<Vec<_>>()
    );

    // The provider talks to the control plane over TLS, trusting only the CA it is given:
    // a CA that is not PEM is a diagnostic on ca_certificate, and a control plane whose
    // certificate does not chain to the given CA is not talked to at all.
    let stranger = tempfile::tempdir().unwrap();
    let stranger_ca = stranger.path().join("ca.pem");
    std::fs::write(
        &stranger_ca,
        isthmus_core::ca::CertificateAuthority::generate("east.isthmus.local")
            .unwrap()
            .cert_pem(),
    )
    .unwrap();
    let control_addr = east.control.grpc_addr().to_string();
    let fine = format!(
        "resource \"isthmus_policy\" \"fine\" {{\n  yaml = <<EOT\n{DESTINATION_RULE}EOT\n}}\n"
    );
    for (provider, expect) in [
        (
            header(&control_addr, &east.ca_file).replace(
                &format!("file(\"{}\")", east.ca_file.display()),
                "\"not a certificate\"",
            ),
            "Invalid ca_certificate",
        ),
        (
            header(&control_addr, &stranger_ca),
            "invalid peer certificate",
        ),
        // The right CA but no operator credential: the control plane refuses the call.
        (
            header(&control_addr, &east.ca_file),
            "this method needs a client",
        ),
    ] {
        let ws = Workspace::new();
        ws.write(&format!("{provider}\n{fine}"));
        let run = ws
            .run(&["apply", "-auto-approve", "-input=false", "-no-color"])
            .await;
        let text = run.text();
        assert_ne!(run.code, 0, "applied despite a bad CA:\n{text}");
        assert!(text.contains(expect), "expected {expect:?} in:\n{text}");
        assert!(control
            .get_policies(None, None, None)
            .await
            .unwrap()
            .is_empty());
    }
}
