//! `isthmus control --config FILE`: the cluster's control plane with its federation member.
//! The config format is documented in `isthmus_control::config`.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use isthmus_control::config::{load_ca, ControlConfig, DiscoveryConfig};

use super::admin::ComponentAdmin;
use super::common::{print_ready, wait_for_shutdown_signal};

/// Runs the control plane until a shutdown signal.
pub async fn run(path: &Path) -> anyhow::Result<()> {
    let config = ControlConfig::load(path)?;
    let ca = load_ca(&config)?;
    // The webhook's serving certificate, for its Service's DNS names, from the cluster CA.
    let webhook_cert = config
        .webhook
        .as_ref()
        .map(|w| ca.issue_server(&w.dns_names, Duration::from_secs(365 * 24 * 3600)))
        .transpose()?;
    let binding = isthmus_federation::bind(config.peer_listen).await?;
    let federation = binding.local_addr();
    let mut options = isthmus_federation::StoreOptions::new(config.node_id, config.peers.clone());
    // The raft log, hard state and snapshots live beside the CA, under <dataDir>/raft/.
    options.data_dir = Some(config.data_dir.clone());
    options.join = config.join;
    if let Some(tick) = config.tick {
        options.tick = tick;
    }
    let store = binding.start(options).await?;
    let (publish_stop, publish_stopped) = tokio::sync::watch::channel(false);
    let mut publishing = None;
    let discovery = match &config.discovery {
        DiscoveryConfig::File { path, poll } => isthmus_control::DiscoverySource::File {
            path: path.clone(),
            poll: *poll,
        },
        DiscoveryConfig::Kubernetes {
            connection,
            inbound_port,
        } => {
            let client = isthmus_control::kubernetes::client(connection)
                .await
                .context("connecting to the Kubernetes API")?;
            let mut source = isthmus_control::kubernetes::KubeSource::new(client);
            source.inbound_port = *inbound_port;
            let publish = isthmus_control::kubernetes::publish::Publish {
                ca_root: config
                    .ca_root
                    .as_ref()
                    .map(|r| (r.namespace.clone(), r.config_map.clone())),
                webhook_configuration: config
                    .webhook
                    .as_ref()
                    .and_then(|w| w.configuration.clone()),
                ca_pem: ca.cert_pem().to_string(),
            };
            if publish.ca_root.is_some() || publish.webhook_configuration.is_some() {
                publishing = Some(tokio::spawn(isthmus_control::kubernetes::publish::run(
                    source.clone(),
                    publish,
                    publish_stopped.clone(),
                )));
            }
            isthmus_control::DiscoverySource::Kubernetes(source)
        }
    };
    let control = isthmus_control::start(
        isthmus_control::ControlOptions {
            cluster: config.cluster.clone(),
            trust_domain: config.trust_domain.clone(),
            locality: config.locality.clone(),
            grpc_listen: config.grpc_listen,
            discovery,
            vip_range: config.vip_range,
            gateway_address: config.gateway_address,
            tokens: config.tokens.clone(),
            cert_lifetime: config.cert_lifetime,
            export_lease: config.export_lease,
            ca: ca.clone(),
        },
        store.clone(),
    )
    .await?;
    let admin = ComponentAdmin::start("control", config.admin_listen, control.config()).await?;
    let (webhook_stop, webhook_stopped) = tokio::sync::watch::channel(false);
    let mut webhook_addr = None;
    if let (Some(w), Some(cert)) = (&config.webhook, &webhook_cert) {
        let tls = isthmus_control::webhook::tls_config(&cert.cert_chain_pem, &cert.key_pem)
            .map_err(|e| anyhow::anyhow!("the webhook's TLS configuration: {e}"))?;
        let listener = tokio::net::TcpListener::bind(w.listen)
            .await
            .with_context(|| format!("binding webhook.listen {}", w.listen))?;
        webhook_addr = Some(listener.local_addr()?.to_string());
        // Injected sidecars are given the CA that the API's certificate chains to.
        let inject = isthmus_control::webhook::InjectConfig {
            ca_pem: ca.cert_pem().to_string(),
            ..w.inject.clone()
        };
        tokio::spawn(isthmus_control::webhook::serve(
            listener,
            std::sync::Arc::new(tls),
            inject,
            webhook_stopped,
        ));
    }
    print_ready(
        "control",
        serde_json::json!({
            "cluster": config.cluster,
            "grpc": control.grpc_addr().to_string(),
            "federation": federation.to_string(),
            "member": config.node_id,
            "admin": admin.addr().to_string(),
            "webhook": webhook_addr,
        }),
    );
    wait_for_shutdown_signal().await?;
    let _ = webhook_stop.send(true);
    let _ = publish_stop.send(true);
    if let Some(task) = publishing {
        let _ = task.await;
    }
    control.shutdown().await;
    admin.shutdown().await;
    store.shutdown().await;
    Ok(())
}
