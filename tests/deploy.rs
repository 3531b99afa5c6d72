//! The daemon configs the Helm chart renders (deploy/kustomize/config.yaml, kept equal to the
//! chart's rendering by deploy/check) load with the daemons' own validating loaders, so the
//! chart and the config formats cannot drift apart.

use std::path::Path;

fn rendered_configs() -> serde_yaml::Mapping {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kustomize/config.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let secret: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(secret["kind"], "Secret");
    secret["stringData"].as_mapping().unwrap().clone()
}

fn file(configs: &serde_yaml::Mapping, name: &str, dir: &Path) -> std::path::PathBuf {
    let text = configs[name].as_str().unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_charts_daemon_configs_load_with_the_daemons_loaders() {
    let configs = rendered_configs();
    let dir = tempfile::tempdir().unwrap();

    let control =
        isthmus_control::config::ControlConfig::load(&file(&configs, "control.yaml", dir.path()))
            .unwrap_or_else(|e| panic!("control.yaml from the chart: {e}"));
    assert_eq!(control.cluster, "east");
    // The other member is named with its trust domain and a CA file the Secret carries
    // beside control.yaml (both are mounted at /etc/isthmus).
    let [peer] = control.peer_members.as_slice() else {
        panic!("one other member: {:?}", control.peer_members);
    };
    assert_eq!(
        (peer.id, peer.trust_domain.as_str()),
        (2, "west.isthmus.local")
    );
    let ca_name = peer.ca_file.file_name().unwrap().to_str().unwrap();
    assert_eq!(peer.ca_file, dir.path().join(ca_name));
    let ca_pem = configs[ca_name]
        .as_str()
        .expect("the Secret carries the CA file");
    assert_eq!(
        isthmus_core::ca::trust_domain_named_by(ca_pem).as_deref(),
        Some("west.isthmus.local")
    );
    let webhook = control.webhook.expect("the chart enables the webhook");
    assert_eq!(
        webhook.dns_names,
        vec!["isthmus-control.isthmus-system.svc".to_string()]
    );
    assert_eq!(
        webhook.inject.control,
        "isthmus-control.isthmus-system.svc:15012"
    );

    let gateway =
        isthmus_gateway::config::GatewayConfig::load(&file(&configs, "gateway.yaml", dir.path()))
            .unwrap_or_else(|e| panic!("gateway.yaml from the chart: {e}"));
    assert_eq!(gateway.control, "isthmus-control.isthmus-system.svc:15012");

    let dns = isthmus_dns::config::DnsConfig::load(&file(&configs, "dns.yaml", dir.path()))
        .unwrap_or_else(|e| panic!("dns.yaml from the chart: {e}"));
    assert_eq!(dns.control, "isthmus-control.isthmus-system.svc:15012");

    // The gateway's and the DNS proxy's tokens get them their own identities, and nothing of
    // the control plane's.
    use isthmus_core::identity::SpiffeId;
    let td = "east.isthmus.local";
    assert!(control
        .tokens
        .allows(&gateway.token, &SpiffeId::gateway(td)));
    assert!(control.tokens.allows(&dns.token, &SpiffeId::dns(td)));
    assert!(!control.tokens.allows(&dns.token, &SpiffeId::control(td)));
}
