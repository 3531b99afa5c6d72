//! The sidecar as the `isthmus sidecar` daemon runs it: attached to its control plane (its
//! workload certificate and the config stream), serving its outbound, inbound and redirect
//! ports and its admin port, and reporting its failover tables for `isthmus explain`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use isthmus_core::admin::ComponentAdmin;
use isthmus_core::attach::{attach, Attached, ControlTarget, PODINFO_DIR};
use isthmus_core::client::ControlClient;
use tokio::task::JoinHandle;

use crate::config::{kubernetes_config, SidecarConfig};

/// A running sidecar daemon.
pub struct Daemon {
    identity: String,
    sidecar: crate::SidecarHandle,
    admin: ComponentAdmin,
    reporter: JoinHandle<()>,
    attached: Attached,
}

impl Daemon {
    /// Loads the config at `path` (its `controlCa` and `tokenFile` relative to it) and starts
    /// the daemon.
    pub async fn start_from_file(path: &Path) -> anyhow::Result<Self> {
        let config = SidecarConfig::load(path)?;
        let control = ControlTarget::load(path, &config.control, config.control_ca.as_deref())?;
        Self::start(config, control).await
    }

    /// `isthmus sidecar --kubernetes`: the injected sidecar, configured from its pod's
    /// environment, token and labels files (`ISTHMUS_PODINFO_DIR` moves the latter).
    pub async fn start_kubernetes() -> anyhow::Result<Self> {
        let env = |name: &str| std::env::var(name).ok();
        let gateway = match env("ISTHMUS_GATEWAY").filter(|g| !g.is_empty()) {
            None => None,
            Some(g) => Some(
                tokio::net::lookup_host(g.as_str())
                    .await
                    .with_context(|| format!("ISTHMUS_GATEWAY: resolving {g}"))?
                    .next()
                    .with_context(|| format!("ISTHMUS_GATEWAY: {g} resolves to no address"))?,
            ),
        };
        let podinfo = env("ISTHMUS_PODINFO_DIR").unwrap_or_else(|| PODINFO_DIR.to_string());
        let labels = std::fs::read_to_string(format!("{podinfo}/labels")).unwrap_or_default();
        let (config, ca_pem) = kubernetes_config(&env, &labels, gateway)?;
        let control = ControlTarget {
            addr: config.control.clone(),
            ca_pem,
        };
        Self::start(config, control).await
    }

    /// Gets the workload's certificate and config, then starts the sidecar, its redirect
    /// listeners, the failover reporter and the admin server.
    pub async fn start(config: SidecarConfig, control: ControlTarget) -> anyhow::Result<Self> {
        let node = format!("sidecar/{}", config.identity.service_account());
        let attached = attach(
            &control,
            &node,
            Some((&config.identity, config.token.clone())),
        )
        .await?;
        let identity = attached
            .identity
            .clone()
            .context("the control plane gave no workload identity")?;
        let metrics = crate::metrics::Metrics::default();
        let mut sidecar = crate::start(
            crate::SidecarOptions {
                cluster: config.cluster.clone(),
                identity,
                trust: attached.trust.clone(),
                labels: config.labels.clone(),
                outbound: config.outbound,
                inbound: config.inbound.clone(),
                gateway: config.gateway,
                connect_timeout: Duration::from_secs(2),
                metrics: metrics.clone(),
                access_log: config.access_log.clone(),
                path_normalization: config.path_normalization,
                limits: Default::default(),
            },
            attached.config.clone(),
        )
        .await?;
        if let Some(addr) = config.redirect_outbound {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding redirectOutbound {addr}"))?;
            let bound = sidecar.serve_redirected(listener)?;
            tracing::info!(%bound, "serving redirected outbound connections");
            // nftables redirects the pod's IPv6 connections to ::1: listen there too, on
            // the same port, where the pod has IPv6 at all.
            if addr.ip() == std::net::Ipv4Addr::LOCALHOST {
                let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()));
                match tokio::net::TcpListener::bind(v6).await {
                    Ok(listener) => {
                        let bound = sidecar.serve_redirected(listener)?;
                        tracing::info!(%bound, "serving redirected outbound IPv6 connections");
                    }
                    Err(e) => {
                        tracing::debug!(%v6, error = %e, "no IPv6 loopback: IPv4 redirect only")
                    }
                }
            }
        }
        if let Some(addr) = config.redirect_inbound {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding redirectInbound {addr}"))?;
            let bound = sidecar.serve_redirected_inbound(listener)?;
            tracing::info!(%bound, "serving redirected inbound connections");
        }
        let reporter = report_failover(attached.client.clone(), &node, sidecar.failover_health());
        let admin = ComponentAdmin::start_full(
            "sidecar",
            config.admin,
            attached.config.clone(),
            |registry| {
                isthmus_core::tls::TrustBundleMetrics::register(attached.trust.clone(), registry)
            },
            |root| metrics.register(root),
        )
        .await
        .with_context(|| format!("binding listen.admin {}", config.admin.addr))?;
        Ok(Daemon {
            identity: config.identity.to_string(),
            sidecar,
            admin,
            reporter,
            attached,
        })
    }

    /// The addresses it serves, as the daemon's `ready` line prints them.
    pub fn ready(&self) -> serde_json::Value {
        let inbound: Vec<String> = self
            .sidecar
            .inbound_addrs()
            .iter()
            .map(|a| a.to_string())
            .collect();
        serde_json::json!({
            "identity": self.identity,
            "inbound": inbound,
            "admin": self.admin.addr().to_string(),
        })
    }

    /// Stops serving and closes every port.
    pub async fn shutdown(self) {
        self.reporter.abort();
        self.sidecar.shutdown().await;
        self.admin.shutdown().await;
        self.attached.detach();
    }
}

/// Reports a sidecar's failover tables to its control plane (for `isthmus explain`): on
/// change, checked every second, and at least every five seconds so the report stays fresh.
pub fn report_failover(
    client: ControlClient,
    node: &str,
    health: Arc<crate::failover::Health>,
) -> JoinHandle<()> {
    let node = node.to_string();
    tokio::spawn(async move {
        let mut last = String::new();
        let mut sent_at = tokio::time::Instant::now();
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let tables = health.tables();
            if tables.is_empty() {
                continue;
            }
            let Ok(json) = serde_json::to_string(&tables) else {
                continue;
            };
            if json == last && sent_at.elapsed() < Duration::from_secs(5) {
                continue;
            }
            match client.report_failover(&node, json.clone()).await {
                Ok(()) => {
                    last = json;
                    sent_at = tokio::time::Instant::now();
                }
                Err(e) => {
                    tracing::debug!(error = %e, "reporting failover tables failed; will retry")
                }
            }
        }
    })
}
