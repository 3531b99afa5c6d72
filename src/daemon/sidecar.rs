//! `isthmus sidecar --config FILE`.
//!
//! ```yaml
//! cluster: east
//! control: 127.0.0.1:15012
//! controlCa: ca.pem                # the cluster CA (the control plane's <dataDir>/ca.pem)
//! token: "bootstrap-token"
//! namespace: default
//! serviceAccount: sleep
//! labels: {app: sleep}             # for policy selectors
//! gateway: 127.0.0.1:15444         # the local east-west gateway's sidecar port
//! outbound: true                   # listen on every service's VIP
//! inbound:
//!   - {listen: 127.0.0.1:15006, forwardTo: 127.0.0.1:9080, protocol: http}
//! listen: {admin: 127.0.0.1:15020}
//! redirectOutbound: 0.0.0.0:15001  # Kubernetes: where `isthmus sidecar init` sends the
//! redirectInbound: 0.0.0.0:15006   # pod's outbound and inbound TCP
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use isthmus_core::config::{host_port, socket_addr, FieldError};
use isthmus_core::identity::{validate_label, SpiffeId};
use isthmus_core::mesh::Protocol;
use serde::Deserialize;

use super::admin::ComponentAdmin;
use super::common::{
    attach, cluster_and_trust_domain, print_ready, wait_for_shutdown_signal, ControlTarget,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawSidecarConfig {
    pub cluster: String,
    #[serde(default)]
    pub trust_domain: Option<String>,
    pub control: String,
    /// The cluster CA's PEM file (relative to this file): what the control-plane API's
    /// certificate must chain to.
    #[serde(default)]
    pub control_ca: Option<String>,
    pub token: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub service_account: String,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub outbound: bool,
    #[serde(default)]
    pub inbound: Vec<RawInbound>,
    #[serde(default)]
    pub listen: RawListen,
    /// `off` (default), `stdout`, or a file path (appended to).
    #[serde(default)]
    pub access_log: Option<String>,
    /// Where connections redirected by `isthmus sidecar init` arrive (needs `outbound`).
    #[serde(default)]
    pub redirect_outbound: Option<String>,
    /// Where inbound connections redirected by `isthmus sidecar init` arrive.
    #[serde(default)]
    pub redirect_inbound: Option<String>,
}

fn default_namespace() -> String {
    "default".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawInbound {
    pub listen: String,
    pub forward_to: String,
    #[serde(default = "default_protocol")]
    pub protocol: String,
}

fn default_protocol() -> String {
    "tcp".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawListen {
    #[serde(default = "default_admin")]
    pub admin: String,
}

impl Default for RawListen {
    fn default() -> Self {
        RawListen {
            admin: default_admin(),
        }
    }
}
fn default_admin() -> String {
    "127.0.0.1:15020".into()
}

#[derive(Debug)]
pub struct SidecarConfig {
    pub cluster: String,
    pub identity: SpiffeId,
    /// `host:port` of the control plane's gRPC API (an IP or a DNS name).
    pub control: String,
    /// `controlCa` as written (read at start, relative to the config file).
    pub control_ca: Option<String>,
    pub token: String,
    pub gateway: Option<SocketAddr>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub outbound: bool,
    pub inbound: Vec<isthmus_sidecar::InboundPort>,
    pub admin: SocketAddr,
    pub access_log: isthmus_sidecar::observe::AccessLogTarget,
    pub redirect_outbound: Option<SocketAddr>,
    pub redirect_inbound: Option<SocketAddr>,
}

impl TryFrom<RawSidecarConfig> for SidecarConfig {
    type Error = FieldError;
    fn try_from(raw: RawSidecarConfig) -> Result<Self, FieldError> {
        let trust_domain = cluster_and_trust_domain(&raw.cluster, raw.trust_domain)?;
        validate_label("namespace", &raw.namespace)
            .map_err(|e| FieldError::new("namespace", &raw.namespace, e.to_string()))?;
        validate_label("service account", &raw.service_account)
            .map_err(|e| FieldError::new("serviceAccount", &raw.service_account, e.to_string()))?;
        let mut inbound = Vec::new();
        for (i, p) in raw.inbound.iter().enumerate() {
            let protocol: Protocol = p.protocol.parse().map_err(|reason: String| {
                FieldError::new(format!("inbound[{i}].protocol"), &p.protocol, reason)
            })?;
            inbound.push(isthmus_sidecar::InboundPort {
                listen: socket_addr(&format!("inbound[{i}].listen"), &p.listen)?,
                forward_to: socket_addr(&format!("inbound[{i}].forwardTo"), &p.forward_to)?,
                protocol,
            });
        }
        let redirect_inbound = raw
            .redirect_inbound
            .as_deref()
            .map(|a| socket_addr("redirectInbound", a))
            .transpose()?;
        if !raw.outbound && inbound.is_empty() && redirect_inbound.is_none() {
            return Err(FieldError::new(
                "inbound",
                "[]",
                "a sidecar with outbound: false needs at least one inbound port",
            ));
        }
        let access_log = match raw.access_log.as_deref() {
            None | Some("off") => isthmus_sidecar::observe::AccessLogTarget::Off,
            Some("stdout") => isthmus_sidecar::observe::AccessLogTarget::Stdout,
            Some("") => {
                return Err(FieldError::new(
                    "accessLog",
                    "",
                    "expected off, stdout or a file path",
                ))
            }
            Some(path) => isthmus_sidecar::observe::AccessLogTarget::File(path.into()),
        };
        let redirect_outbound = raw
            .redirect_outbound
            .as_deref()
            .map(|a| socket_addr("redirectOutbound", a))
            .transpose()?;
        if let (Some(addr), false) = (redirect_outbound, raw.outbound) {
            return Err(FieldError::new(
                "redirectOutbound",
                addr.to_string(),
                "redirected outbound traffic needs outbound: true",
            ));
        }
        Ok(SidecarConfig {
            redirect_outbound,
            redirect_inbound,
            identity: SpiffeId::new(&trust_domain, &raw.namespace, &raw.service_account),
            cluster: raw.cluster,
            control: host_port("control", &raw.control)?,
            control_ca: raw.control_ca,
            token: raw.token,
            gateway: raw
                .gateway
                .as_deref()
                .map(|g| socket_addr("gateway", g))
                .transpose()?,
            labels: raw.labels,
            outbound: raw.outbound,
            inbound,
            admin: socket_addr("listen.admin", &raw.listen.admin)?,
            access_log,
        })
    }
}

/// Runs the sidecar until a shutdown signal.
pub async fn run(path: &Path) -> anyhow::Result<()> {
    let config: SidecarConfig =
        isthmus_core::config::load_file::<RawSidecarConfig, SidecarConfig>(path)?;
    let control = ControlTarget::load(path, &config.control, config.control_ca.as_deref())?;
    let att = attach(
        &control,
        &format!("sidecar/{}", config.identity.service_account()),
        Some((&config.identity, &config.token)),
    )
    .await?;
    let identity = att
        .identity
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no workload identity"))?;
    let metrics = isthmus_sidecar::metrics::Metrics::default();
    let mut sidecar = isthmus_sidecar::start(
        isthmus_sidecar::SidecarOptions {
            cluster: config.cluster.clone(),
            identity,
            trust: att.trust.clone(),
            labels: config.labels.clone(),
            outbound: config.outbound,
            inbound: config.inbound.clone(),
            gateway: config.gateway,
            connect_timeout: Duration::from_secs(2),
            metrics: metrics.clone(),
            access_log: config.access_log.clone(),
        },
        att.config.clone(),
    )
    .await?;
    if let Some(addr) = config.redirect_outbound {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding redirectOutbound {addr}"))?;
        let bound = sidecar.serve_redirected(listener)?;
        tracing::info!(%bound, "serving redirected outbound connections");
    }
    if let Some(addr) = config.redirect_inbound {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding redirectInbound {addr}"))?;
        let bound = sidecar.serve_redirected_inbound(listener)?;
        tracing::info!(%bound, "serving redirected inbound connections");
    }
    let reporter = super::common::report_failover(
        &control,
        &format!("sidecar/{}", config.identity.service_account()),
        sidecar.failover_health(),
    )?;
    let admin = ComponentAdmin::start_full(
        "sidecar",
        config.admin,
        att.config.clone(),
        |_| {},
        |root| metrics.register(root),
    )
    .await?;
    let inbound: Vec<String> = sidecar
        .inbound_addrs()
        .iter()
        .map(|a| a.to_string())
        .collect();
    print_ready(
        "sidecar",
        serde_json::json!({"identity": config.identity.to_string(), "inbound": inbound, "admin": admin.addr().to_string()}),
    );
    wait_for_shutdown_signal().await?;
    reporter.abort();
    sidecar.shutdown().await;
    admin.shutdown().await;
    for t in att.tasks {
        t.abort();
    }
    Ok(())
}
