//! The `isthmus dns` daemon's config file (YAML), validated into [`DnsConfig`]; errors name
//! the file, the field and the bad value.
//!
//! ```yaml
//! cluster: east
//! control: 127.0.0.1:15012
//! controlCa: ca.pem                # the cluster CA (the control plane's <dataDir>/ca.pem)
//! token: "bootstrap-token"          # allowed isthmus-system/dns: for the proxy's certificate
//! listen: {dns: 0.0.0.0:15053, admin: 0.0.0.0:15020}
//! upstreams: [192.0.2.53:53]    # default: the nameservers of /etc/resolv.conf
//! ttl: 5
//! ```

use isthmus_core::admin::AdminListen;
use std::net::SocketAddr;
use std::path::Path;

use isthmus_core::attach::cluster_and_trust_domain;
use isthmus_core::config::{host_port, socket_addr, ConfigError, FieldError};
use serde::Deserialize;

/// The config file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawDnsConfig {
    pub cluster: String,
    #[serde(default)]
    pub trust_domain: Option<String>,
    pub control: String,
    /// The cluster CA's PEM file (relative to this file): what the control-plane API's
    /// certificate must chain to.
    #[serde(default)]
    pub control_ca: Option<String>,
    /// A bootstrap token that allows `isthmus-system/dns`: the proxy's certificate, which it
    /// presents to the control plane to stream its configuration.
    pub token: String,
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
    /// Serve the admin port's `/debug/config` beyond loopback clients.
    #[serde(default)]
    pub expose_debug: bool,
}

impl Default for RawListen {
    fn default() -> Self {
        RawListen {
            dns: default_dns(),
            admin: default_admin(),
            expose_debug: false,
        }
    }
}
fn default_dns() -> String {
    "0.0.0.0:15053".into()
}
fn default_admin() -> String {
    "0.0.0.0:15020".into()
}

/// The validated config.
#[derive(Debug)]
pub struct DnsConfig {
    pub cluster: String,
    pub trust_domain: String,
    /// `host:port` of the control plane's gRPC API (an IP or a DNS name).
    pub control: String,
    /// `controlCa` as written (read at start, relative to the config file).
    pub control_ca: Option<String>,
    pub token: String,
    pub dns: SocketAddr,
    pub admin: AdminListen,
    /// None: read /etc/resolv.conf.
    pub upstreams: Option<Vec<SocketAddr>>,
    pub ttl: u32,
}

impl TryFrom<RawDnsConfig> for DnsConfig {
    type Error = FieldError;
    fn try_from(raw: RawDnsConfig) -> Result<Self, FieldError> {
        let trust_domain = cluster_and_trust_domain(&raw.cluster, raw.trust_domain)?;
        if raw.token.is_empty() {
            return Err(FieldError::new(
                "token",
                "",
                "the bootstrap token is required (one that allows isthmus-system/dns)",
            ));
        }
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
            trust_domain,
            control: host_port("control", &raw.control)?,
            control_ca: raw.control_ca,
            token: raw.token,
            dns: socket_addr("listen.dns", &raw.listen.dns)?,
            admin: AdminListen {
                addr: socket_addr("listen.admin", &raw.listen.admin)?,
                expose_debug: raw.listen.expose_debug,
            },
            upstreams,
            ttl: raw.ttl,
        })
    }
}

impl DnsConfig {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        isthmus_core::config::load_file::<RawDnsConfig, DnsConfig>(path)
    }
}
