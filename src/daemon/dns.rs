//! `isthmus dns --config FILE`.
//!
//! ```yaml
//! cluster: east
//! control: 127.0.0.1:15012
//! controlCa: ca.pem                # the cluster CA (the control plane's <dataDir>/ca.pem)
//! listen: {dns: 0.0.0.0:15053, admin: 0.0.0.0:15020}
//! upstreams: [192.0.2.53:53]    # default: the nameservers of /etc/resolv.conf
//! ttl: 5
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use isthmus_core::config::{host_port, socket_addr, FieldError};
use serde::Deserialize;

use super::admin::ComponentAdmin;
use super::common::{
    attach, cluster_and_trust_domain, print_ready, wait_for_shutdown_signal, ControlTarget,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawDnsConfig {
    pub cluster: String,
    pub control: String,
    /// The cluster CA's PEM file (relative to this file): what the control-plane API's
    /// certificate must chain to.
    #[serde(default)]
    pub control_ca: Option<String>,
    #[serde(default)]
    pub listen: RawListen,
    #[serde(default)]
    pub upstreams: Option<Vec<String>>,
    #[serde(default = "default_ttl")]
    pub ttl: u32,
}

fn default_ttl() -> u32 {
    5
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawListen {
    #[serde(default = "default_dns")]
    pub dns: String,
    #[serde(default = "default_admin")]
    pub admin: String,
}

impl Default for RawListen {
    fn default() -> Self {
        RawListen {
            dns: default_dns(),
            admin: default_admin(),
        }
    }
}
fn default_dns() -> String {
    "0.0.0.0:15053".into()
}
fn default_admin() -> String {
    "0.0.0.0:15020".into()
}

#[derive(Debug)]
pub struct DnsConfig {
    pub cluster: String,
    /// `host:port` of the control plane's gRPC API (an IP or a DNS name).
    pub control: String,
    /// `controlCa` as written (read at start, relative to the config file).
    pub control_ca: Option<String>,
    pub dns: SocketAddr,
    pub admin: SocketAddr,
    /// None: read /etc/resolv.conf.
    pub upstreams: Option<Vec<SocketAddr>>,
    pub ttl: u32,
}

impl TryFrom<RawDnsConfig> for DnsConfig {
    type Error = FieldError;
    fn try_from(raw: RawDnsConfig) -> Result<Self, FieldError> {
        cluster_and_trust_domain(&raw.cluster, None)?;
        let upstreams = match raw.upstreams {
            None => None,
            Some(list) => Some(
                list.iter()
                    .enumerate()
                    .map(|(i, u)| socket_addr(&format!("upstreams[{i}]"), u))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        if raw.ttl > 86_400 {
            return Err(FieldError::new("ttl", raw.ttl, "at most 86400 seconds"));
        }
        Ok(DnsConfig {
            cluster: raw.cluster,
            control: host_port("control", &raw.control)?,
            control_ca: raw.control_ca,
            dns: socket_addr("listen.dns", &raw.listen.dns)?,
            admin: socket_addr("listen.admin", &raw.listen.admin)?,
            upstreams,
            ttl: raw.ttl,
        })
    }
}

/// Runs the DNS proxy until a shutdown signal.
pub async fn run(path: &Path) -> anyhow::Result<()> {
    let config: DnsConfig = isthmus_core::config::load_file::<RawDnsConfig, DnsConfig>(path)?;
    let control = ControlTarget::load(path, &config.control, config.control_ca.as_deref())?;
    let att = attach(&control, "dns", None).await?;
    let upstreams = match config.upstreams {
        Some(u) => u,
        None => std::fs::read_to_string("/etc/resolv.conf")
            .map(|t| isthmus_dns::upstreams_from_resolv_conf(&t))
            .unwrap_or_default(),
    };
    let dns = isthmus_dns::start(
        isthmus_dns::DnsOptions {
            listen: config.dns,
            upstreams,
            upstream_timeout: Duration::from_secs(2),
            ttl: config.ttl,
            ..Default::default()
        },
        att.config.clone(),
    )
    .await?;
    let admin = ComponentAdmin::start_with("dns", config.admin, att.config.clone(), |registry| {
        dns.metrics().register(registry)
    })
    .await?;
    print_ready(
        "dns",
        serde_json::json!({"cluster": config.cluster, "udp": dns.udp_addr().to_string(), "tcp": dns.tcp_addr().to_string(), "admin": admin.addr().to_string()}),
    );
    wait_for_shutdown_signal().await?;
    dns.shutdown().await;
    admin.shutdown().await;
    for t in att.tasks {
        t.abort();
    }
    Ok(())
}
