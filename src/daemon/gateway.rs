//! `isthmus gateway --config FILE`.
//!
//! ```yaml
//! cluster: east
//! control: 127.0.0.1:15012           # the cluster's control plane gRPC API
//! token: "bootstrap-token"           # allowed isthmus-system/eastwest-gateway
//! listen: {quic: 0.0.0.0:15443, local: 0.0.0.0:15444, admin: 0.0.0.0:15020}
//! keepAlive: 250ms
//! idleTimeout: 1s
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use isthmus_core::config::{duration, socket_addr, FieldError};
use isthmus_core::identity::SpiffeId;
use serde::Deserialize;

use super::admin::ComponentAdmin;
use super::common::{attach, cluster_and_trust_domain, print_ready, wait_for_shutdown_signal};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawGatewayConfig {
    pub cluster: String,
    #[serde(default)]
    pub trust_domain: Option<String>,
    pub control: String,
    pub token: String,
    #[serde(default)]
    pub listen: RawListen,
    #[serde(default = "default_keep_alive")]
    pub keep_alive: String,
    #[serde(default = "default_idle")]
    pub idle_timeout: String,
}

fn default_keep_alive() -> String {
    "250ms".into()
}
fn default_idle() -> String {
    "1s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawListen {
    #[serde(default = "default_quic")]
    pub quic: String,
    #[serde(default = "default_local")]
    pub local: String,
    #[serde(default = "default_admin")]
    pub admin: String,
}

impl Default for RawListen {
    fn default() -> Self {
        RawListen {
            quic: default_quic(),
            local: default_local(),
            admin: default_admin(),
        }
    }
}
fn default_quic() -> String {
    "0.0.0.0:15443".into()
}
fn default_local() -> String {
    "0.0.0.0:15444".into()
}
fn default_admin() -> String {
    "0.0.0.0:15020".into()
}

#[derive(Debug)]
pub struct GatewayConfig {
    pub cluster: String,
    pub trust_domain: String,
    pub control: SocketAddr,
    pub token: String,
    pub quic: SocketAddr,
    pub local: SocketAddr,
    pub admin: SocketAddr,
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
}

impl TryFrom<RawGatewayConfig> for GatewayConfig {
    type Error = FieldError;
    fn try_from(raw: RawGatewayConfig) -> Result<Self, FieldError> {
        let trust_domain = cluster_and_trust_domain(&raw.cluster, raw.trust_domain)?;
        if raw.token.is_empty() {
            return Err(FieldError::new(
                "token",
                "",
                "the bootstrap token is required",
            ));
        }
        Ok(GatewayConfig {
            cluster: raw.cluster,
            trust_domain,
            control: socket_addr("control", &raw.control)?,
            token: raw.token,
            quic: socket_addr("listen.quic", &raw.listen.quic)?,
            local: socket_addr("listen.local", &raw.listen.local)?,
            admin: socket_addr("listen.admin", &raw.listen.admin)?,
            keep_alive: duration("keepAlive", &raw.keep_alive)?,
            idle_timeout: duration("idleTimeout", &raw.idle_timeout)?,
        })
    }
}

/// Runs the gateway until a shutdown signal.
pub async fn run(path: &Path) -> anyhow::Result<()> {
    let config: GatewayConfig =
        isthmus_core::config::load_file::<RawGatewayConfig, GatewayConfig>(path)?;
    let id = SpiffeId::gateway(&config.trust_domain);
    let att = attach(
        &config.control.to_string(),
        "gateway",
        Some((&id, &config.token)),
    )
    .await?;
    let identity = att
        .identity
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no gateway identity"))?;
    let gateway = isthmus_gateway::start(
        isthmus_gateway::GatewayOptions {
            cluster: config.cluster.clone(),
            quic_listen: config.quic,
            local_listen: config.local,
            identity,
            trust: att.trust.clone(),
            keep_alive: config.keep_alive,
            idle_timeout: config.idle_timeout,
            connect_timeout: Duration::from_secs(2),
            transport: isthmus_gateway::Transport::Quic,
        },
        att.config.clone(),
    )
    .await?;
    let admin = ComponentAdmin::start("gateway", config.admin, att.config.clone()).await?;
    print_ready(
        "gateway",
        serde_json::json!({"quic": gateway.quic_addr().to_string(), "local": gateway.local_addr().to_string(), "admin": admin.addr().to_string()}),
    );
    wait_for_shutdown_signal().await?;
    gateway.shutdown().await;
    admin.shutdown().await;
    for t in att.tasks {
        t.abort();
    }
    Ok(())
}
