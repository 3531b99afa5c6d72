//! The `isthmus` binary as a user runs it: bad config files are refused with a message naming
//! the file, the field and the bad value, and a non-zero exit code; the demo runs and exits
//! cleanly with `--exit-after`, writing its ports file.

use std::path::Path;
use std::process::{Command, Output};

fn isthmus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_isthmus"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn run_with_config(daemon: &str, dir: &Path, text: &str) -> (bool, String) {
    let path = dir.join(format!("{daemon}.yaml"));
    std::fs::write(&path, text).unwrap();
    let out = isthmus(&[daemon, "--config", path.to_str().unwrap()]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn bad_config_files_name_file_field_and_value_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "control",
            "cluster: east\ndataDir: d\ndiscovery: {file: s.yaml}\nvipRange: 300.1.0.0/16\nfederation: {nodeId: 1, peers: {1: 127.0.0.1:0}}\n",
            "vipRange",
            "300.1.0.0/16",
        ),
        (
            "control",
            "cluster: east\ndataDir: d\ndiscovery: {file: s.yaml, pollInterval: often}\nfederation: {nodeId: 1, peers: {1: 127.0.0.1:0}}\n",
            "discovery.pollInterval",
            "often",
        ),
        ("gateway", "cluster: east\ncontrol: 127.0.0.1:1\ntoken: t\nlisten: {quic: localhost}\n", "listen.quic", "localhost"),
        ("gateway", "cluster: east\ncontrol: 127.0.0.1:1\ntoken: t\nkeepAlive: 1 second\n", "keepAlive", "1 second"),
        ("dns", "cluster: east\ncontrol: 127.0.0.1:1\ntoken: t\nupstreams: [8.8.8.8]\n", "upstreams[0]", "8.8.8.8"),
        ("dns", "cluster: East\ncontrol: 127.0.0.1:1\ntoken: t\n", "cluster", "East"),
        ("dns", "cluster: east\ncontrol: 127.0.0.1:1\ntoken: \"\"\n", "token", "isthmus-system/dns"),
        (
            "sidecar",
            "cluster: east\ncontrol: 127.0.0.1:1\ntoken: t\nserviceAccount: sleep\ninbound: [{listen: 127.0.0.1:0, forwardTo: 127.0.0.1:1, protocol: smtp}]\n",
            "inbound[0].protocol",
            "smtp",
        ),
    ];
    for (daemon, text, field, value) in cases {
        let (ok, stderr) = run_with_config(daemon, dir.path(), text);
        assert!(!ok, "{daemon} accepted a bad config: {text}");
        let file = format!("{daemon}.yaml");
        assert!(
            stderr.contains(&file) && stderr.contains(field) && stderr.contains(value),
            "{daemon}: the error should name {file}, {field} and {value}: {stderr}"
        );
    }
}

#[test]
fn unknown_fields_and_missing_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stderr) = run_with_config(
        "dns",
        dir.path(),
        "cluster: east\ncontrol: 127.0.0.1:1\nlisten: {dsn: 127.0.0.1:53}\n",
    );
    assert!(!ok);
    assert!(
        stderr.contains("dns.yaml") && stderr.contains("dsn"),
        "{stderr}"
    );
    let out = isthmus(&["gateway", "--config", "/nonexistent/gateway.yaml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/gateway.yaml"));
}

#[test]
fn demo_runs_writes_its_ports_file_and_contexts_that_the_cli_uses_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let ports = dir.path().join("ports.json");
    // The operator's contexts file, with a context of their own that the demo must keep.
    let contexts = dir.path().join("config.yaml");
    std::fs::write(
        &contexts,
        "currentContext: prod\ncontexts:\n  prod: {control: \"10.0.0.1:15012\", caFile: /etc/prod-ca.pem}\n",
    )
    .unwrap();
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_isthmus"))
            .args(args)
            .env("ISTHMUS_CONFIG", &contexts)
            .env_remove("ISTHMUS_CONTROL")
            .env_remove("ISTHMUS_CA_FILE")
            .output()
            .expect("the binary runs")
    };
    let demo = Command::new(env!("CARGO_BIN_EXE_isthmus"))
        .args(["demo", "--exit-after", "20s", "--ports-file"])
        .arg(&ports)
        .env("ISTHMUS_CONFIG", &contexts)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !ports.exists() {
        assert!(std::time::Instant::now() < deadline, "no ports file");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // With the demo's contexts, the CLI needs no address flags.
    let status = cli(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && text.contains("leader:"),
        "isthmus status: {text}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let west = cli(&["status", "-o", "json", "--context", "demo-west"]);
    assert!(
        west.status.success(),
        "{}",
        String::from_utf8_lossy(&west.stderr)
    );
    let get = cli(&["get", "virtualservice", "-n", "default"]);
    assert!(
        get.status.success(),
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );
    let list = String::from_utf8_lossy(&cli(&["context", "list"]).stdout).to_string();
    assert!(
        list.contains("* demo-east") && list.contains("demo-west") && list.contains("prod"),
        "{list}"
    );
    let unknown = cli(&["status", "--context", "nope"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no context named \"nope\""));

    // Who may change the mesh: the demo's context presents east's admin, the first mesh
    // admin; without a credential, and with a viewer's, the control plane refuses.
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: cli-check, namespace: default}\nspec: {host: nowhere.default.svc.cluster.local}\n",
    )
    .unwrap();
    let policy = policy.to_str().unwrap();
    let ok = |out: &Output, what: &str| {
        assert!(
            out.status.success(),
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let refused = |out: &Output, why: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(why),
            "expected {why:?}: {stderr}"
        );
    };
    ok(
        &cli(&["apply", "-f", policy, "--dry-run"]),
        "mesh admin apply",
    );
    let east: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ports).unwrap()).unwrap();
    let east = &east["clusters"][0];
    let (east_control, east_ca) = (
        east["control"].as_str().unwrap(),
        east["ca_file"].as_str().unwrap(),
    );
    refused(
        &cli(&[
            "apply",
            "-f",
            policy,
            "--control",
            east_control,
            "--ca-file",
            east_ca,
        ]),
        "needs a client certificate",
    );
    let data_dir = std::path::Path::new(east_ca).parent().unwrap();
    let creds = dir.path().join("creds");
    ok(
        &cli(&[
            "credentials",
            "issue",
            "--name",
            "ann",
            "--role",
            "viewer",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--out",
            creds.to_str().unwrap(),
            "--add-context",
            "east-viewer",
            "--control",
            east_control,
        ]),
        "credentials issue",
    );
    ok(
        &cli(&["get", "all", "--context", "east-viewer"]),
        "viewer get",
    );
    refused(
        &cli(&["apply", "-f", policy, "--context", "east-viewer"]),
        "the viewer role reads only",
    );
    // Without --data-dir, east's control plane issues the credential to east's admin (the
    // current context), who keeps the key; a viewer may not ask for one.
    let creds2 = dir.path().join("creds2");
    ok(
        &cli(&[
            "credentials",
            "issue",
            "--name",
            "carol",
            "--role",
            "viewer",
            "--out",
            creds2.to_str().unwrap(),
            "--add-context",
            "east-carol",
        ]),
        "credentials issue through the API",
    );
    ok(&cli(&["status", "--context", "east-carol"]), "carol reads");
    refused(
        &cli(&[
            "credentials",
            "issue",
            "--name",
            "dave",
            "--role",
            "admin",
            "--context",
            "east-viewer",
            "--out",
            creds2.to_str().unwrap(),
        ]),
        "may not call CredentialService.Issue",
    );

    let out = demo.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("served by central"), "{stdout}");
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ports).unwrap()).unwrap();
    let clusters = file["clusters"].as_array().unwrap();
    let names: Vec<&str> = clusters
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["east", "west", "central"]);
    for c in clusters {
        for key in ["dns", "control", "gateway"] {
            let addr: std::net::SocketAddr = c[key].as_str().unwrap().parse().unwrap();
            assert!(
                addr.ip().is_loopback(),
                "{key} of {} is not on loopback",
                c["name"]
            );
        }
        // The process is gone and left nothing listening.
        let control: std::net::SocketAddr = c["control"].as_str().unwrap().parse().unwrap();
        assert!(std::net::TcpStream::connect(control).is_err());
    }
}
