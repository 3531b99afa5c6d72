//! The gateway as the `isthmus gateway` daemon runs it: attached to its control plane (its
//! gateway identity and the config stream), serving QUIC and the local port, and its admin
//! port; alone or as one of several replicas.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use isthmus_core::admin::ComponentAdmin;
use isthmus_core::attach::{attach, Attached, ControlTarget};
use isthmus_core::identity::SpiffeId;

use crate::config::{read_replica_secret, GatewayConfig};

/// A running gateway daemon.
pub struct Daemon {
    gateway: crate::GatewayHandle,
    admin: ComponentAdmin,
    attached: Attached,
}

impl Daemon {
    /// Loads the config at `path` (its `controlCa` relative to it) and starts the daemon.
    pub async fn start_from_file(path: &Path) -> anyhow::Result<Self> {
        let config = GatewayConfig::load(path)?;
        let control = ControlTarget::load(path, &config.control, config.control_ca.as_deref())?;
        Self::start(config, control).await
    }

    /// Reads the replica secret (a bad one fails before anything connects anywhere), gets the
    /// gateway's certificate and config, then starts the gateway and the admin server.
    pub async fn start(config: GatewayConfig, control: ControlTarget) -> anyhow::Result<Self> {
        let replicas = config
            .replica_secret_file
            .as_deref()
            .map(read_replica_secret)
            .transpose()?;
        let id = SpiffeId::gateway(&config.trust_domain);
        let attached = attach(
            &control,
            "gateway",
            Some((&id, config.token.as_str().into())),
        )
        .await?;
        let identity = attached
            .identity
            .clone()
            .context("the control plane gave no gateway identity")?;
        let opts = crate::GatewayOptions {
            cluster: config.cluster.clone(),
            quic_listen: config.quic,
            local_listen: config.local,
            identity,
            trust: attached.trust.clone(),
            keep_alive: config.keep_alive,
            idle_timeout: config.idle_timeout,
            connect_timeout: Duration::from_secs(2),
            transport: crate::Transport::Quic,
        };
        let gateway = match &replicas {
            None => crate::start(opts, attached.config.clone()).await?,
            Some(set) => crate::start_replica(opts, set, attached.config.clone()).await?,
        };
        let metrics = gateway.metrics();
        let admin = ComponentAdmin::start_with(
            "gateway",
            config.admin,
            attached.config.clone(),
            |registry| {
                metrics.register(registry);
                isthmus_core::tls::TrustBundleMetrics::register(attached.trust.clone(), registry);
            },
        )
        .await
        .with_context(|| format!("binding listen.admin {}", config.admin.addr))?;
        Ok(Daemon {
            gateway,
            admin,
            attached,
        })
    }

    /// The addresses it serves, as the daemon's `ready` line prints them.
    pub fn ready(&self) -> serde_json::Value {
        serde_json::json!({
            "quic": self.gateway.quic_addr().to_string(),
            "local": self.gateway.local_addr().to_string(),
            "admin": self.admin.addr().to_string(),
        })
    }

    /// Stops serving and closes every port.
    pub async fn shutdown(self) {
        self.gateway.shutdown().await;
        self.admin.shutdown().await;
        self.attached.detach();
    }
}
