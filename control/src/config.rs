//! The `isthmus control` daemon's config file, and the CA kept in its data directory.
//!
//! ```yaml
//! cluster: east
//! trustDomain: east.isthmus.local      # default <cluster>.isthmus.local
//! locality: us-east-1/a                # optional, region/zone
//! dataDir: /var/lib/isthmus            # CA key and certificate (created on first start),
//!                                      # and the federation member's raft log (raft/)
//! # caDir: /etc/isthmus-ca             # or an operator-supplied CA: ca.pem + ca-key.pem
//! listen: {grpc: 0.0.0.0:15012, admin: 0.0.0.0:15020}
//! discovery: {file: services.yaml, pollInterval: 500ms}
//! # or, in Kubernetes (see docs/kubernetes.md, "Discovery"):
//! # discovery:
//! #   kubernetes:
//! #     inCluster: true                 # the pod's service account; or:
//! #     # kubeconfig: ~/.kube/config    # with its current context unless
//! #     # context: east                 # one is named
//! #     inboundPort: 15006              # the sidecar's inbound port on each pod
//! vipRange: 240.240.0.0/16
//! gatewayAddress: 203.0.113.7:15443    # how other clusters reach this cluster's gateway
//! certLifetime: 1h
//! exportLease: 10s                     # lease on this cluster's exports; lapses when it
//!                                      # stops renewing (see docs/failover.md)
//! bootstrapTokens: [{token: "...", allow: ["default/*"]}]
//! federation:
//!   nodeId: 1
//!   listen: 0.0.0.0:15017
//!   peers: {1: 10.0.0.1:15017, 2: 10.0.1.1:15017, 3: 10.0.2.1:15017}
//!   # join: true     # a new member of a running federation: peers lists the existing
//!   #                # members (and this one); it starts empty and catches up from the
//!   #                # leader once `isthmus cluster join` has added it
//!   # joinWith: {tokenFile: /etc/isthmus/join-token, via: 10.0.0.1:15017}
//!   #                # or it joins itself at start with that token, through any member
//!   #                # (peers must then hold this member's own address, as the others
//!   #                # reach it)
//!   # tick: 100ms    # raft tick; elections after 10-20 ticks, heartbeats every 2
//! webhook:                             # optional: the sidecar injection webhook (Kubernetes)
//!   listen: 0.0.0.0:15018
//!   image: isthmus/isthmus:0.1.0       # injected init and sidecar containers
//!   dnsNames: [isthmus-control.isthmus-system.svc]   # its certificate, from the cluster CA
//!   control: isthmus-control.isthmus-system.svc:15012 # as pods reach the control plane
//!   gateway: isthmus-gateway.isthmus-system.svc:15444
//!   configuration: isthmus-sidecar-injector # optional: keep its caBundle equal to the CA
//! caRoot: {namespace: isthmus-system, configMap: isthmus-ca-root}  # optional (Kubernetes):
//!                                      # publish the CA certificate for the API's clients
//! ```
//! Relative paths are relative to the config file's directory.

use isthmus_core::admin::AdminListen;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use isthmus_core::ca::CertificateAuthority;
use isthmus_core::config::{duration, socket_addr, FieldError};
use isthmus_core::durable::{write_atomic, Access};
use isthmus_core::identity::{default_trust_domain, validate_label};
use serde::Deserialize;

use crate::tokens::{RawToken, TokenPolicy};
use crate::ControlError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawControlConfig {
    pub cluster: String,
    #[serde(default)]
    pub trust_domain: Option<String>,
    #[serde(default)]
    pub locality: Option<String>,
    pub data_dir: String,
    /// An operator-supplied CA: a directory with `ca.pem` and `ca-key.pem` (a mounted Secret).
    #[serde(default)]
    pub ca_dir: Option<String>,
    #[serde(default)]
    pub listen: RawListen,
    pub discovery: RawDiscoverySource,
    #[serde(default = "default_vip_range")]
    pub vip_range: String,
    #[serde(default)]
    pub gateway_address: Option<String>,
    #[serde(default = "default_cert_lifetime")]
    pub cert_lifetime: String,
    #[serde(default = "default_export_lease")]
    pub export_lease: String,
    #[serde(default)]
    pub bootstrap_tokens: Vec<RawToken>,
    pub federation: RawFederation,
    #[serde(default)]
    pub webhook: Option<RawWebhook>,
    /// Publish the cluster CA's certificate as a ConfigMap (Kubernetes discovery only).
    #[serde(default)]
    pub ca_root: Option<RawCaRoot>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawCaRoot {
    pub namespace: String,
    pub config_map: String,
}

/// Where the control plane publishes the cluster CA's certificate (`ca.pem`) for the pods that
/// must trust its API (the gateway, the DNS proxy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaRoot {
    pub namespace: String,
    pub config_map: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawWebhook {
    #[serde(default = "default_webhook_listen")]
    pub listen: String,
    pub image: String,
    pub dns_names: Vec<String>,
    pub control: String,
    pub gateway: String,
    /// The MutatingWebhookConfiguration whose caBundle the control plane keeps equal to the
    /// cluster CA (when the chart could not render it).
    #[serde(default)]
    pub configuration: Option<String>,
}

fn default_webhook_listen() -> String {
    "0.0.0.0:15018".into()
}

/// The injection webhook, validated.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub listen: SocketAddr,
    pub dns_names: Vec<String>,
    pub inject: crate::webhook::InjectConfig,
    pub configuration: Option<String>,
}

fn default_vip_range() -> String {
    "240.240.0.0/16".into()
}
fn default_cert_lifetime() -> String {
    "1h".into()
}
fn default_export_lease() -> String {
    "10s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawListen {
    #[serde(default = "default_grpc")]
    pub grpc: String,
    #[serde(default = "default_admin")]
    pub admin: String,
    /// Serve the admin port's `/debug/config` beyond loopback clients.
    #[serde(default)]
    pub expose_debug: bool,
}

impl Default for RawListen {
    fn default() -> Self {
        RawListen {
            grpc: default_grpc(),
            admin: default_admin(),
            expose_debug: false,
        }
    }
}
fn default_grpc() -> String {
    "0.0.0.0:15012".into()
}
fn default_admin() -> String {
    "0.0.0.0:15020".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawDiscoverySource {
    #[serde(default)]
    pub file: Option<String>,
    #[serde(default = "default_poll")]
    pub poll_interval: String,
    #[serde(default)]
    pub kubernetes: Option<RawKubernetes>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawKubernetes {
    #[serde(default)]
    pub in_cluster: bool,
    #[serde(default)]
    pub kubeconfig: Option<String>,
    #[serde(default)]
    pub context: Option<String>,
    #[serde(default = "default_inbound_port")]
    pub inbound_port: u16,
}
fn default_inbound_port() -> u16 {
    crate::kubernetes::DEFAULT_INBOUND_PORT
}

/// Where the daemon's services come from, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryConfig {
    File {
        path: PathBuf,
        poll: Duration,
    },
    Kubernetes {
        connection: crate::kubernetes::Connection,
        inbound_port: u16,
    },
}

impl DiscoveryConfig {
    fn from_raw(raw: RawDiscoverySource) -> Result<Self, FieldError> {
        match (raw.file, raw.kubernetes) {
            (Some(file), None) => Ok(DiscoveryConfig::File {
                path: PathBuf::from(file),
                poll: duration("discovery.pollInterval", &raw.poll_interval)?,
            }),
            (None, Some(k)) => {
                let connection = match (k.in_cluster, k.kubeconfig) {
                    (true, None) => {
                        if let Some(context) = k.context {
                            return Err(FieldError::new(
                                "discovery.kubernetes.context",
                                context,
                                "a context needs a kubeconfig",
                            ));
                        }
                        crate::kubernetes::Connection::InCluster
                    }
                    (false, Some(path)) => crate::kubernetes::Connection::Kubeconfig {
                        path: PathBuf::from(path),
                        context: k.context,
                    },
                    (true, Some(path)) => {
                        return Err(FieldError::new(
                            "discovery.kubernetes.kubeconfig",
                            path,
                            "give inCluster: true or a kubeconfig, not both",
                        ))
                    }
                    (false, None) => {
                        return Err(FieldError::new(
                            "discovery.kubernetes",
                            "{}",
                            "say how to reach the API server: inCluster: true or a kubeconfig",
                        ))
                    }
                };
                if k.inbound_port == 0 {
                    return Err(FieldError::new(
                        "discovery.kubernetes.inboundPort",
                        0,
                        "a port is 1 to 65535",
                    ));
                }
                Ok(DiscoveryConfig::Kubernetes {
                    connection,
                    inbound_port: k.inbound_port,
                })
            }
            (Some(file), Some(_)) => Err(FieldError::new(
                "discovery.file",
                file,
                "give a discovery file or kubernetes, not both",
            )),
            (None, None) => Err(FieldError::new(
                "discovery",
                "{}",
                "a discovery source is required: file or kubernetes",
            )),
        }
    }
}
fn default_poll() -> String {
    "500ms".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawFederation {
    pub node_id: u64,
    #[serde(default = "default_peer_listen")]
    pub listen: String,
    #[serde(default)]
    pub peers: BTreeMap<u64, RawPeer>,
    #[serde(default)]
    pub join: bool,
    #[serde(default)]
    pub join_with: Option<RawJoinWith>,
    #[serde(default)]
    pub tick: Option<String>,
}

/// `federation.joinWith`: a joining member joins itself at start.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawJoinWith {
    pub token_file: PathBuf,
    pub via: String,
}
/// A `federation.peers` entry: this member's own address alone, or another member's address
/// with what authenticates it (its trust domain and CA file).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawPeer {
    Addr(String),
    Member(RawPeerMember),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPeerMember {
    pub addr: String,
    pub trust_domain: String,
    pub ca_file: PathBuf,
}

impl RawPeer {
    fn addr(&self) -> &str {
        match self {
            RawPeer::Addr(a) => a,
            RawPeer::Member(m) => &m.addr,
        }
    }
}

/// Another member named in the config, authenticated by its trust domain's CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerMemberConfig {
    pub id: u64,
    pub trust_domain: String,
    pub ca_file: PathBuf,
}

fn default_peer_listen() -> String {
    "0.0.0.0:15017".into()
}

/// The validated daemon configuration.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub cluster: String,
    pub trust_domain: String,
    pub locality: Option<String>,
    pub data_dir: PathBuf,
    /// Where an operator-supplied CA is read from; `None`: created in `data_dir`.
    pub ca_dir: Option<PathBuf>,
    pub grpc_listen: SocketAddr,
    pub admin_listen: AdminListen,
    pub discovery: DiscoveryConfig,
    pub vip_range: Ipv4Net,
    pub gateway_address: Option<SocketAddr>,
    pub cert_lifetime: Duration,
    /// The lease on this cluster's exports in the federation store.
    pub export_lease: Duration,
    pub tokens: TokenPolicy,
    pub node_id: u64,
    pub peer_listen: SocketAddr,
    pub peers: BTreeMap<u64, SocketAddr>,
    /// The other members of `peers`, with their trust domains and CA files: the peer port
    /// authenticates them before any record replicates (docs/security.md §4).
    pub peer_members: Vec<PeerMemberConfig>,
    /// Joining a running federation (see `isthmus cluster join`).
    pub join: bool,
    /// Joining itself at start, with a token, through a member (`federation.joinWith`).
    pub join_with: Option<crate::join::JoinWith>,
    /// The raft tick, when not the default.
    pub tick: Option<Duration>,
    pub webhook: Option<WebhookConfig>,
    pub ca_root: Option<CaRoot>,
}

impl ControlConfig {
    /// Whether this member starts the federation: not joining, and the lowest id among the
    /// initial members. Its control plane writes the first mesh-admin grant
    /// (docs/security.md §6).
    pub fn is_first_member(&self) -> bool {
        !self.join && self.peers.keys().all(|id| *id >= self.node_id)
    }
}

impl TryFrom<RawControlConfig> for ControlConfig {
    type Error = FieldError;

    fn try_from(raw: RawControlConfig) -> Result<Self, FieldError> {
        validate_label("cluster name", &raw.cluster)
            .map_err(|e| FieldError::new("cluster", &raw.cluster, e.to_string()))?;
        let trust_domain = raw
            .trust_domain
            .unwrap_or_else(|| default_trust_domain(&raw.cluster));
        if trust_domain.is_empty()
            || !trust_domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            return Err(FieldError::new(
                "trustDomain",
                &trust_domain,
                "lowercase letters, digits, '-' and '.' only",
            ));
        }
        let vip_range: Ipv4Net = raw.vip_range.parse().map_err(|_| {
            FieldError::new(
                "vipRange",
                &raw.vip_range,
                "expected an IPv4 CIDR such as 240.240.0.0/16",
            )
        })?;
        if vip_range.prefix_len() > 30 {
            return Err(FieldError::new(
                "vipRange",
                &raw.vip_range,
                "the range is too small (at most /30)",
            ));
        }
        let gateway_address = raw
            .gateway_address
            .as_deref()
            .map(|g| socket_addr("gatewayAddress", g))
            .transpose()?;
        if raw.federation.node_id == 0 {
            return Err(FieldError::new(
                "federation.nodeId",
                0,
                "node ids start at 1",
            ));
        }
        if !raw.federation.join && !raw.federation.peers.contains_key(&raw.federation.node_id) {
            return Err(FieldError::new(
                "federation.nodeId",
                raw.federation.node_id,
                "this member's id must be one of federation.peers (or set federation.join)",
            ));
        }
        let mut peers = BTreeMap::new();
        let mut peer_members = Vec::new();
        for (id, peer) in &raw.federation.peers {
            if *id == 0 {
                return Err(FieldError::new(
                    "federation.peers",
                    id,
                    "node ids start at 1",
                ));
            }
            let field = format!("federation.peers.{id}");
            peers.insert(*id, socket_addr(&field, peer.addr())?);
            match peer {
                RawPeer::Member(m) => {
                    isthmus_core::identity::validate_trust_domain(&m.trust_domain).map_err(
                        |e| {
                            FieldError::new(
                                format!("{field}.trustDomain"),
                                &m.trust_domain,
                                e.to_string(),
                            )
                        },
                    )?;
                    peer_members.push(PeerMemberConfig {
                        id: *id,
                        trust_domain: m.trust_domain.clone(),
                        ca_file: m.ca_file.clone(),
                    });
                }
                RawPeer::Addr(addr) if *id != raw.federation.node_id => {
                    return Err(FieldError::new(
                        &field,
                        addr,
                        "members authenticate each other: give another member as \
                         {addr, trustDomain, caFile} (its trust domain and its CA's certificate file)",
                    ));
                }
                RawPeer::Addr(_) => {}
            }
        }
        if raw.federation.join && !peers.keys().any(|id| *id != raw.federation.node_id) {
            return Err(FieldError::new(
                "federation.peers",
                format!("{:?}", raw.federation.peers),
                "a joining member needs the existing members' addresses",
            ));
        }
        let join_with = match raw.federation.join_with {
            None => None,
            Some(_) if !raw.federation.join => {
                return Err(FieldError::new(
                    "federation.joinWith",
                    "",
                    "only a joining member joins itself: set federation.join: true",
                ))
            }
            Some(_) if !peers.contains_key(&raw.federation.node_id) => {
                return Err(FieldError::new(
                    "federation.peers",
                    format!("{:?}", raw.federation.peers.keys().collect::<Vec<_>>()),
                    format!(
                        "a member that joins itself gives its own address, as the other members                          reach it, under its id {}",
                        raw.federation.node_id
                    ),
                ))
            }
            Some(j) => {
                if j.via.trim().is_empty() {
                    return Err(FieldError::new(
                        "federation.joinWith.via",
                        "",
                        "a member's federation or control-plane address (host:port) is required",
                    ));
                }
                Some(crate::join::JoinWith {
                    token_file: j.token_file,
                    via: j.via,
                })
            }
        };
        let webhook = match raw.webhook {
            None => None,
            Some(w) => {
                if w.image.trim().is_empty() {
                    return Err(FieldError::new("webhook.image", "", "an image is required"));
                }
                if w.dns_names.is_empty() {
                    return Err(FieldError::new(
                        "webhook.dnsNames",
                        "[]",
                        "the webhook Service's DNS name is required (the API server checks it)",
                    ));
                }
                Some(WebhookConfig {
                    listen: socket_addr("webhook.listen", &w.listen)?,
                    dns_names: w.dns_names,
                    inject: crate::webhook::InjectConfig {
                        image: w.image,
                        cluster: raw.cluster.clone(),
                        trust_domain: trust_domain.clone(),
                        control: w.control,
                        gateway: w.gateway,
                        // Filled in once the CA is loaded (ControlConfig::load_ca).
                        ca_pem: String::new(),
                    },
                    configuration: w.configuration,
                })
            }
        };
        let discovery = DiscoveryConfig::from_raw(raw.discovery)?;
        let ca_root = match raw.ca_root {
            None => None,
            Some(r) => {
                if !matches!(discovery, DiscoveryConfig::Kubernetes { .. }) {
                    return Err(FieldError::new(
                        "caRoot",
                        r.config_map,
                        "publishing a ConfigMap needs discovery: {kubernetes: ...}",
                    ));
                }
                validate_label("namespace", &r.namespace).map_err(|e| {
                    FieldError::new("caRoot.namespace", &r.namespace, e.to_string())
                })?;
                validate_label("ConfigMap name", &r.config_map).map_err(|e| {
                    FieldError::new("caRoot.configMap", &r.config_map, e.to_string())
                })?;
                Some(CaRoot {
                    namespace: r.namespace,
                    config_map: r.config_map,
                })
            }
        };
        Ok(ControlConfig {
            webhook,
            ca_root,
            cluster: raw.cluster,
            trust_domain,
            locality: raw.locality,
            data_dir: PathBuf::from(raw.data_dir),
            ca_dir: raw.ca_dir.map(PathBuf::from),
            grpc_listen: socket_addr("listen.grpc", &raw.listen.grpc)?,
            admin_listen: AdminListen {
                addr: socket_addr("listen.admin", &raw.listen.admin)?,
                expose_debug: raw.listen.expose_debug,
            },
            discovery,
            vip_range,
            gateway_address,
            cert_lifetime: duration("certLifetime", &raw.cert_lifetime)?,
            export_lease: match duration("exportLease", &raw.export_lease)? {
                d if d < Duration::from_millis(100) => {
                    return Err(FieldError::new(
                        "exportLease",
                        &raw.export_lease,
                        "at least 100ms (it is renewed every third of it)",
                    ))
                }
                d => d,
            },
            tokens: TokenPolicy::from_raw("bootstrapTokens", raw.bootstrap_tokens)?,
            node_id: raw.federation.node_id,
            peer_listen: socket_addr("federation.listen", &raw.federation.listen)?,
            peers,
            peer_members,
            join: raw.federation.join,
            join_with,
            tick: raw
                .federation
                .tick
                .as_deref()
                .map(|t| duration("federation.tick", t))
                .transpose()?,
        })
    }
}

impl ControlConfig {
    /// Loads and validates a config file; relative paths become relative to its directory.
    pub fn load(path: &Path) -> Result<Self, isthmus_core::config::ConfigError> {
        let mut config: ControlConfig =
            isthmus_core::config::load_file::<RawControlConfig, ControlConfig>(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.data_dir = base.join(&config.data_dir);
        config.ca_dir = config.ca_dir.as_ref().map(|d| base.join(d));
        for m in &mut config.peer_members {
            m.ca_file = base.join(&m.ca_file);
        }
        if let Some(j) = &mut config.join_with {
            j.token_file = base.join(&j.token_file);
        }
        match &mut config.discovery {
            DiscoveryConfig::File { path, .. } => *path = base.join(&*path),
            DiscoveryConfig::Kubernetes {
                connection: crate::kubernetes::Connection::Kubeconfig { path, .. },
                ..
            } => *path = base.join(&*path),
            DiscoveryConfig::Kubernetes { .. } => {}
        }
        Ok(config)
    }
}

/// The cluster CA: the operator's from `ca_dir` when configured (both files must be there;
/// nothing is created), else [`load_or_create_ca`] in `data_dir`.
pub fn load_ca(config: &ControlConfig) -> Result<Arc<CertificateAuthority>, ControlError> {
    let Some(dir) = &config.ca_dir else {
        return load_or_create_ca(&config.data_dir, &config.trust_domain);
    };
    let err = |reason: String| ControlError::Ca {
        dir: dir.clone(),
        reason: format!("caDir: {reason}"),
    };
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|e| err(format!("reading {}: {e}", path.display())))
    };
    let ca = CertificateAuthority::from_pem(
        &config.trust_domain,
        &read("ca.pem")?,
        &read("ca-key.pem")?,
    )
    .map_err(|e| err(torn_hint(dir, e)))?;
    let ca = crate::ca_rotation::overlapping(dir, ca).map_err(err)?;
    Ok(Arc::new(ca))
}

/// A CA that does not load, with the way out when an interrupted rotation tore it apart.
fn torn_hint(dir: &Path, e: isthmus_core::ca::CaError) -> String {
    let interrupted = matches!(e, isthmus_core::ca::CaError::KeyMismatch)
        && dir.join(crate::ca_rotation::NEXT_CERT).exists();
    if interrupted {
        format!("{e}: a `isthmus ca rotate` was interrupted; run it again to finish it")
    } else {
        e.to_string()
    }
}

/// Loads the cluster CA from `dir` (`ca.pem`, `ca-key.pem`), creating and saving a new one on
/// first start. Both files are written atomically and fsynced, the key (mode 0600) first: a
/// `ca.pem` means the CA is whole. A key without a certificate is what a crash during the
/// first start leaves; that CA never served, so a new one replaces it.
pub fn load_or_create_ca(
    dir: &Path,
    trust_domain: &str,
) -> Result<Arc<CertificateAuthority>, ControlError> {
    let err = |reason: String| ControlError::Ca {
        dir: dir.to_path_buf(),
        reason,
    };
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca-key.pem");
    if cert_path.exists() {
        let cert = std::fs::read_to_string(&cert_path)
            .map_err(|e| err(format!("reading {}: {e}", cert_path.display())))?;
        let key = std::fs::read_to_string(&key_path)
            .map_err(|e| err(format!("reading {}: {e}", key_path.display())))?;
        let ca = CertificateAuthority::from_pem(trust_domain, &cert, &key)
            .map_err(|e| err(torn_hint(dir, e)))?;
        let ca = crate::ca_rotation::overlapping(dir, ca).map_err(err)?;
        return Ok(Arc::new(ca));
    }
    std::fs::create_dir_all(dir).map_err(|e| err(format!("creating the directory: {e}")))?;
    let ca = CertificateAuthority::generate(trust_domain).map_err(|e| err(e.to_string()))?;
    write_atomic(&key_path, ca.key_pem().as_bytes(), Access::Private)
        .map_err(|e| err(e.to_string()))?;
    write_atomic(&cert_path, ca.cert_pem().as_bytes(), Access::Default)
        .map_err(|e| err(e.to_string()))?;
    Ok(Arc::new(ca))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "cluster: east\ndataDir: data\ndiscovery: {file: services.yaml}\nfederation:\n  nodeId: 1\n  peers: {1: 127.0.0.1:15017}\n";

    fn load(text: &str) -> Result<ControlConfig, String> {
        isthmus_core::config::load_str::<RawControlConfig, ControlConfig>(
            Path::new("control.yaml"),
            text,
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_fill_in_what_is_not_written() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.trust_domain, "east.isthmus.local");
        assert_eq!(c.grpc_listen.port(), 15012);
        assert_eq!(c.vip_range.to_string(), "240.240.0.0/16");
        assert_eq!(c.cert_lifetime, Duration::from_secs(3600));
        assert!(
            matches!(c.discovery, DiscoveryConfig::File { poll, .. } if poll == Duration::from_millis(500))
        );
    }

    #[test]
    fn kubernetes_discovery_takes_in_cluster_or_a_kubeconfig() {
        let k = |s: &str| GOOD.replace("discovery: {file: services.yaml}", s);
        let c = load(&k("discovery: {kubernetes: {inCluster: true}}")).unwrap();
        assert_eq!(
            c.discovery,
            DiscoveryConfig::Kubernetes {
                connection: crate::kubernetes::Connection::InCluster,
                inbound_port: 15006
            }
        );
        let c = load(&k(
            "discovery: {kubernetes: {kubeconfig: kc.yaml, context: east, inboundPort: 16006}}",
        ))
        .unwrap();
        assert_eq!(
            c.discovery,
            DiscoveryConfig::Kubernetes {
                connection: crate::kubernetes::Connection::Kubeconfig {
                    path: "kc.yaml".into(),
                    context: Some("east".into())
                },
                inbound_port: 16006
            }
        );
        let cases = [
            (
                "discovery: {kubernetes: {}}",
                "discovery.kubernetes",
                "inCluster",
            ),
            (
                "discovery: {kubernetes: {inCluster: true, kubeconfig: kc}}",
                "discovery.kubernetes.kubeconfig",
                "not both",
            ),
            (
                "discovery: {file: s.yaml, kubernetes: {inCluster: true}}",
                "discovery.file",
                "not both",
            ),
            ("discovery: {}", "discovery", "required"),
            (
                "discovery: {kubernetes: {inCluster: true, inboundPort: 0}}",
                "discovery.kubernetes.inboundPort",
                "0",
            ),
        ];
        for (text, field, needle) in cases {
            let err = load(&k(text)).unwrap_err();
            assert!(err.contains(field) && err.contains(needle), "{err}");
        }
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            (
                GOOD.replace("cluster: east", "cluster: East"),
                "cluster",
                "East",
            ),
            (
                format!("{GOOD}vipRange: 10.0.0.0/33\n"),
                "vipRange",
                "10.0.0.0/33",
            ),
            (
                format!("{GOOD}webhook: {{image: i, dnsNames: [], control: c, gateway: g}}\n"),
                "webhook.dnsNames",
                "[]",
            ),
            (
                format!("{GOOD}webhook: {{listen: here, image: i, dnsNames: [a.svc], control: c, gateway: g}}\n"),
                "webhook.listen",
                "here",
            ),
            (
                format!("{GOOD}certLifetime: forever\n"),
                "certLifetime",
                "forever",
            ),
            (
                GOOD.replace("nodeId: 1", "nodeId: 4"),
                "federation.nodeId",
                "4",
            ),
            (
                GOOD.replace("127.0.0.1:15017", "nowhere"),
                "federation.peers.1",
                "nowhere",
            ),
            (
                GOOD.replace("nodeId: 1", "nodeId: 1\n  join: true"),
                "federation.peers",
                "existing members",
            ),
            (
                GOOD.replace("{1: 127.0.0.1:15017}", "{1: 127.0.0.1:15017, 2: 127.0.0.1:15018}"),
                "federation.peers.2",
                "127.0.0.1:15018",
            ),
            (
                GOOD.replace(
                    "{1: 127.0.0.1:15017}",
                    "{1: 127.0.0.1:15017, 2: {addr: 127.0.0.1:15018, trustDomain: \"Not A Domain\", \
                     caFile: w.pem}}",
                ),
                "federation.peers.2.trustDomain",
                "Not A Domain",
            ),
            (
                GOOD.replace("nodeId: 1", "nodeId: 1\n  tick: soon"),
                "federation.tick",
                "soon",
            ),
        ];
        for (text, field, value) in cases {
            let err = load(&text).unwrap_err();
            assert!(
                err.contains("control.yaml") && err.contains(field) && err.contains(value),
                "{err}"
            );
        }
    }

    #[test]
    fn a_joining_member_may_leave_itself_out_of_peers() {
        let c = load(&GOOD.replace(
            "nodeId: 1\n  peers: {1: 127.0.0.1:15017}",
            "nodeId: 4\n  join: true\n  tick: 20ms\n  peers: {1: {addr: 127.0.0.1:15017, \
             trustDomain: east.isthmus.local, caFile: east-ca.pem}}",
        ))
        .unwrap();
        assert!(c.join);
        assert_eq!(c.tick, Some(Duration::from_millis(20)));
    }

    #[test]
    fn a_member_joins_itself_only_when_joining_and_naming_its_own_address() {
        let member =
            "{addr: 127.0.0.1:15017, trustDomain: east.isthmus.local, caFile: east-ca.pem}";
        let with = |federation: &str| {
            load(&GOOD.replace("nodeId: 1\n  peers: {1: 127.0.0.1:15017}", federation))
        };
        let c = with(&format!(
            "nodeId: 4\n  join: true\n  joinWith: {{tokenFile: token, via: 127.0.0.1:15017}}\n  \
             peers: {{1: {member}, 4: 127.0.0.2:15017}}"
        ))
        .unwrap();
        let j = c.join_with.expect("joinWith");
        assert_eq!(
            (j.token_file, j.via),
            ("token".into(), "127.0.0.1:15017".to_string())
        );
        for (federation, field, says) in [
            (
                format!("nodeId: 4\n  joinWith: {{tokenFile: t, via: a:1}}\n  peers: {{1: {member}, 4: 127.0.0.2:1}}"),
                "federation.joinWith",
                "set federation.join: true",
            ),
            (
                format!("nodeId: 4\n  join: true\n  joinWith: {{tokenFile: t, via: a:1}}\n  peers: {{1: {member}}}"),
                "federation.peers",
                "its own address",
            ),
            (
                format!("nodeId: 4\n  join: true\n  joinWith: {{tokenFile: t, via: ' '}}\n  peers: {{1: {member}, 4: 127.0.0.2:1}}"),
                "federation.joinWith.via",
                "is required",
            ),
        ] {
            let err = with(&federation).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains(says), "{err}");
        }
    }

    #[test]
    fn ca_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_ca(dir.path(), "east.isthmus.local").unwrap();
        let again = load_or_create_ca(dir.path(), "east.isthmus.local").unwrap();
        assert_eq!(first.cert_pem(), again.cert_pem());
    }

    #[test]
    fn an_operator_ca_is_read_from_ca_dir_and_never_created() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = load(&format!("{GOOD}caDir: ca\n")).unwrap();
        c.data_dir = dir.path().join("data");
        c.ca_dir = Some(dir.path().join("ca"));
        let Err(err) = load_ca(&c) else {
            panic!("missing files are an error")
        };
        let err = err.to_string();
        assert!(err.contains("caDir") && err.contains("ca.pem"), "{err}");
        assert!(
            !dir.path().join("data/ca.pem").exists(),
            "no CA was created instead"
        );

        let operator = CertificateAuthority::generate("east.isthmus.local").unwrap();
        std::fs::create_dir_all(dir.path().join("ca")).unwrap();
        std::fs::write(dir.path().join("ca/ca.pem"), operator.cert_pem()).unwrap();
        std::fs::write(dir.path().join("ca/ca-key.pem"), operator.key_pem()).unwrap();
        assert_eq!(load_ca(&c).unwrap().cert_pem(), operator.cert_pem());

        std::fs::write(dir.path().join("ca/ca-key.pem"), "garbage").unwrap();
        let Err(err) = load_ca(&c) else {
            panic!("a bad key is an error")
        };
        let err = err.to_string();
        assert!(err.contains("caDir"), "{err}");
    }
}
