//! `isthmus control --config FILE`: the cluster's control plane with its federation member.
//! The config format is documented in `isthmus_control::config`.

use std::path::Path;

use isthmus_control::config::{load_or_create_ca, ControlConfig};

use super::admin::ComponentAdmin;
use super::common::{print_ready, wait_for_shutdown_signal};

/// Runs the control plane until a shutdown signal.
pub async fn run(path: &Path) -> anyhow::Result<()> {
    let config = ControlConfig::load(path)?;
    let ca = load_or_create_ca(&config.data_dir, &config.trust_domain)?;
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
    let control = isthmus_control::start(
        isthmus_control::ControlOptions {
            cluster: config.cluster.clone(),
            trust_domain: config.trust_domain.clone(),
            locality: config.locality.clone(),
            grpc_listen: config.grpc_listen,
            discovery_file: config.discovery_file.clone(),
            discovery_poll: config.discovery_poll,
            vip_range: config.vip_range,
            gateway_address: config.gateway_address,
            tokens: config.tokens.clone(),
            cert_lifetime: config.cert_lifetime,
            export_lease: config.export_lease,
            ca,
        },
        store.clone(),
    )
    .await?;
    let admin = ComponentAdmin::start("control", config.admin_listen, control.config()).await?;
    print_ready(
        "control",
        serde_json::json!({
            "cluster": config.cluster,
            "grpc": control.grpc_addr().to_string(),
            "federation": federation.to_string(),
            "member": config.node_id,
            "admin": admin.addr().to_string(),
        }),
    );
    wait_for_shutdown_signal().await?;
    control.shutdown().await;
    admin.shutdown().await;
    store.shutdown().await;
    Ok(())
}
