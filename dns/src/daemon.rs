//! The DNS proxy as the `isthmus dns` daemon runs it: attached to its control plane for the
//! config stream, serving DNS, and serving its admin port.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use isthmus_core::admin::ComponentAdmin;
use isthmus_core::attach::{attach, Attached, ControlTarget};

use crate::config::DnsConfig;

/// A running DNS proxy daemon.
pub struct Daemon {
    cluster: String,
    dns: crate::DnsHandle,
    admin: ComponentAdmin,
    attached: Attached,
}

impl Daemon {
    /// Loads the config at `path` (its `controlCa` relative to it) and starts the daemon.
    pub async fn start_from_file(path: &Path) -> anyhow::Result<Self> {
        let config = DnsConfig::load(path)?;
        let control = ControlTarget::load(path, &config.control, config.control_ca.as_deref())?;
        Self::start(config, control).await
    }

    /// Attaches to the control plane, then starts the DNS servers and the admin server.
    pub async fn start(config: DnsConfig, control: ControlTarget) -> anyhow::Result<Self> {
        // Its own certificate, presented to stream the configuration (docs/security.md §6).
        let id = isthmus_core::identity::SpiffeId::dns(&config.trust_domain);
        let attached = attach(
            &control,
            "dns",
            Some((
                &id,
                isthmus_core::client::Token::Static(config.token.clone()),
            )),
        )
        .await?;
        let upstreams = match config.upstreams {
            Some(u) => u,
            None => std::fs::read_to_string("/etc/resolv.conf")
                .map(|t| crate::upstreams_from_resolv_conf(&t))
                .unwrap_or_default(),
        };
        let dns = crate::start(
            crate::DnsOptions {
                listen: config.dns,
                upstreams,
                upstream_timeout: Duration::from_secs(2),
                ttl: config.ttl,
                ..Default::default()
            },
            attached.config.clone(),
        )
        .await
        .with_context(|| format!("starting the DNS proxy on {}", config.dns))?;
        let admin =
            ComponentAdmin::start_with("dns", config.admin, attached.config.clone(), |registry| {
                dns.metrics().register(registry);
                isthmus_core::tls::TrustBundleMetrics::register(attached.trust.clone(), registry);
            })
            .await
            .with_context(|| format!("binding listen.admin {}", config.admin.addr))?;
        Ok(Daemon {
            cluster: config.cluster,
            dns,
            admin,
            attached,
        })
    }

    /// The addresses it serves, as the daemon's `ready` line prints them.
    pub fn ready(&self) -> serde_json::Value {
        serde_json::json!({
            "cluster": self.cluster,
            "udp": self.dns.udp_addr().to_string(),
            "tcp": self.dns.tcp_addr().to_string(),
            "admin": self.admin.addr().to_string(),
        })
    }

    /// Stops serving and closes every port.
    pub async fn shutdown(self) {
        self.dns.shutdown().await;
        self.admin.shutdown().await;
        self.attached.detach();
    }
}
