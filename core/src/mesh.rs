//! The merged mesh configuration a control plane streams to its cluster's sidecars, DNS
//! proxies and gateway.
//!
//! One [`MeshConfig`] is a complete state-of-the-world snapshot: every service this cluster can
//! reach (local and imported), with its virtual IP, ports, the identities allowed to serve it,
//! local endpoints and the remote clusters that export it, plus every member cluster's trust
//! bundle and gateway address. Consumers replace their whole view on each snapshot, so a
//! missed intermediate version is never a problem.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// A complete configuration snapshot for one cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshConfig {
    /// Increases with every change; consumers may skip versions.
    pub version: u64,
    /// The cluster this snapshot was built for.
    pub cluster: String,
    /// Services reachable from this cluster, sorted by (namespace, name).
    pub services: Vec<MeshService>,
    /// Every member cluster, this one included, sorted by name.
    pub clusters: Vec<ClusterInfo>,
    /// Mesh-wide policies (routes, destination rules, authorization), sorted by store key.
    #[serde(default)]
    pub policies: Vec<crate::policy::Policy>,
}

impl MeshConfig {
    /// Finds a service by namespace and name (both compared case-insensitively, as DNS does).
    pub fn service(&self, namespace: &str, name: &str) -> Option<&MeshService> {
        self.services.iter().find(|s| {
            s.namespace.eq_ignore_ascii_case(namespace) && s.name.eq_ignore_ascii_case(name)
        })
    }

    /// Finds the service whose virtual IP is `vip`.
    pub fn service_by_vip(&self, vip: IpAddr) -> Option<&MeshService> {
        self.services.iter().find(|s| s.vip == vip)
    }

    /// Finds the headless endpoint whose virtual IP is `vip`, with its service.
    pub fn endpoint_by_vip(&self, vip: IpAddr) -> Option<(&MeshService, &HeadlessEndpoint)> {
        self.services.iter().find_map(|s| {
            s.headless
                .as_ref()?
                .endpoints
                .iter()
                .find(|e| e.vip == vip)
                .map(|e| (s, e))
        })
    }

    /// Finds a member cluster by name.
    pub fn cluster_info(&self, name: &str) -> Option<&ClusterInfo> {
        self.clusters.iter().find(|c| c.name == name)
    }

    /// Every member's CA certificates (PEM), the set of roots workloads and gateways trust.
    pub fn trust_bundles(&self) -> Vec<String> {
        self.clusters
            .iter()
            .map(|c| c.ca_bundle_pem.clone())
            .collect()
    }
}

/// One service as seen from one cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshService {
    pub name: String,
    pub namespace: String,
    /// The virtual IP this cluster allocated for the service (stable for the life of the import).
    pub vip: IpAddr,
    pub ports: Vec<ServicePort>,
    /// SPIFFE IDs allowed to serve this service; a caller checks the server's identity against it.
    pub identities: Vec<String>,
    /// Endpoints in this cluster.
    pub local_endpoints: Vec<Endpoint>,
    /// Other clusters that export this service, reachable through their gateways.
    pub remote: Vec<RemoteExport>,
    /// Whether this cluster exports the service to the others.
    pub exported: bool,
    /// Present when the service is headless: its endpoints in every cluster, each with a
    /// virtual IP of its own (`vip` above stays internal: DNS does not publish it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headless: Option<Headless>,
}

/// The label key the exporting cluster puts on each endpoint of a headless service, with the
/// endpoint's id as value: the tunnel subset `isthmus.io/endpoint=<id>` selects that one
/// endpoint at its cluster's gateway.
pub const ENDPOINT_LABEL: &str = "isthmus.io/endpoint";

/// The endpoints of a headless service, as seen from one cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Headless {
    /// Sorted by (cluster, id).
    pub endpoints: Vec<HeadlessEndpoint>,
}

/// One endpoint of a headless service, local or remote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadlessEndpoint {
    /// The cluster the endpoint runs in.
    pub cluster: String,
    /// Its id within that cluster's export: the hostname, or `ep.<hex>` without one.
    pub id: String,
    /// `<hostname>.<cluster>.<svc>.<ns>.svc.clusterset.local` names it, when set.
    pub hostname: Option<String>,
    /// The virtual IP this cluster allocated for the endpoint.
    pub vip: IpAddr,
    /// Whether it is ready (DNS lists only ready endpoints).
    pub ready: bool,
}

impl HeadlessEndpoint {
    /// The tunnel subset that selects this endpoint at its cluster's gateway.
    pub fn selector(&self) -> String {
        format!("{ENDPOINT_LABEL}={}", self.id)
    }
}

impl Default for ServicePort {
    fn default() -> Self {
        ServicePort {
            name: String::new(),
            port: 0,
            protocol: Protocol::Tcp,
        }
    }
}

impl MeshService {
    /// The port declared with number `port`, if any.
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// The local endpoint a headless endpoint of this cluster stands for (the one carrying
    /// its [`ENDPOINT_LABEL`]).
    pub fn local_endpoint(&self, endpoint: &HeadlessEndpoint) -> Option<&Endpoint> {
        self.local_endpoints
            .iter()
            .find(|e| e.labels.get(ENDPOINT_LABEL) == Some(&endpoint.id))
    }

    /// `<name>.<namespace>`, the key used on the tunnel and in logs.
    pub fn key(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }
}

/// A named service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// The application protocol a port carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tcp,
    Udp,
    /// Not declared: the sidecars detect HTTP from the traffic itself (see
    /// `isthmus_sidecar::protocol`), else relay it as opaque TCP.
    Auto,
}

impl Protocol {
    /// The transport protocol label used in SRV names (`_tcp` / `_udp`).
    pub fn transport(self) -> &'static str {
        match self {
            Protocol::Udp => "udp",
            _ => "tcp",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Auto => "auto",
        }
    }

    /// Whether the sidecars proxy this port at L7 whatever its traffic looks like.
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "http" => Ok(Protocol::Http),
            "http2" => Ok(Protocol::Http2),
            "grpc" => Ok(Protocol::Grpc),
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "auto" => Ok(Protocol::Auto),
            other => Err(format!(
                "unknown protocol {other:?} (expected http, http2, grpc, tcp, udp or auto)"
            )),
        }
    }
}

/// One local endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Where a caller's sidecar connects (mTLS) to reach this endpoint.
    pub address: SocketAddr,
    /// Labels such as `version`.
    pub labels: BTreeMap<String, String>,
    /// The endpoint's SPIFFE ID.
    pub identity: String,
    pub healthy: bool,
    /// Service port -> the port to dial at this endpoint's IP, where it differs from
    /// `address`'s (a Kubernetes service's target ports). Empty: every port dials `address`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<u16, u16>,
}

impl Endpoint {
    /// Where to connect for `service_port`.
    pub fn dial(&self, service_port: u16) -> SocketAddr {
        match self.ports.get(&service_port) {
            Some(p) => SocketAddr::new(self.address.ip(), *p),
            None => self.address,
        }
    }
}

/// A remote cluster exporting a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteExport {
    pub cluster: String,
    /// That cluster's east-west gateway (QUIC, UDP).
    pub gateway: SocketAddr,
    /// Healthy endpoints behind it, as last exported.
    pub healthy_endpoints: u32,
    /// Healthy endpoint counts by `label=value` (e.g. `version=v2`), for subset routing.
    #[serde(default)]
    pub subsets: BTreeMap<String, u32>,
    /// All endpoints behind it, healthy or not (for the healthy share failover uses).
    #[serde(default)]
    pub endpoints: u32,
    /// When the export's lease in the federation store lapsed (unix ms): the exporting
    /// cluster stopped renewing it (cut off from the federation, or its control plane
    /// down). `None` while live. What it means for traffic is the FailoverPolicy's
    /// `onPartition`.
    #[serde(default)]
    pub lease_expired_at_ms: Option<u64>,
}

impl RemoteExport {
    /// Whether the cluster has healthy endpoints carrying every one of `labels`.
    pub fn serves(&self, labels: &BTreeMap<String, String>) -> bool {
        self.healthy_endpoints > 0
            && labels.iter().all(|(k, v)| {
                self.subsets
                    .get(&format!("{k}={v}"))
                    .is_some_and(|n| *n > 0)
            })
    }
}

/// An endpoint count as the records carry it (`u32`), saturating at `u32::MAX`.
pub fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A member cluster of the federation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub name: String,
    pub trust_domain: String,
    /// The cluster's east-west gateway address (QUIC, UDP).
    pub gateway: Option<SocketAddr>,
    /// The cluster CA's certificate(s), PEM.
    pub ca_bundle_pem: String,
    /// `region/zone`, when the cluster published one (failover orders by it).
    #[serde(default)]
    pub locality: Option<String>,
}
