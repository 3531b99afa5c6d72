//! `MeshService` and `MeshConfig` fixtures. A test names what it cares about and takes the
//! rest from here with struct update syntax:
//!
//! ```
//! use isthmus_core::mesh::{MeshService, Protocol};
//! let web = MeshService {
//!     exported: true,
//!     ..isthmus_testkit::mesh::service("web", "shop", "240.240.0.1", &[("http", 80, Protocol::Http)])
//! };
//! assert_eq!(web.ports[0].port, 80);
//! ```

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::{ClusterInfo, Endpoint, MeshConfig, MeshService, Protocol, ServicePort};

/// A service `name.namespace` with VIP `vip` and ports `(name, number, protocol)`: no
/// identities, no endpoints, not exported, not headless.
pub fn service(
    name: &str,
    namespace: &str,
    vip: &str,
    ports: &[(&str, u16, Protocol)],
) -> MeshService {
    MeshService {
        name: name.into(),
        namespace: namespace.into(),
        vip: vip.parse().expect("fixture VIPs are IP addresses"),
        ports: ports
            .iter()
            .map(|&(name, port, protocol)| port_of(name, port, protocol))
            .collect(),
        identities: Vec::new(),
        local_endpoints: Vec::new(),
        remote: Vec::new(),
        exported: false,
        headless: None,
    }
}

/// One service port.
pub fn port_of(name: &str, port: u16, protocol: Protocol) -> ServicePort {
    ServicePort {
        name: name.into(),
        port,
        protocol,
    }
}

/// Cluster `cluster`'s configuration at `version` with `services`, no member clusters and
/// no policies.
pub fn config(version: u64, cluster: &str, services: Vec<MeshService>) -> Arc<MeshConfig> {
    Arc::new(MeshConfig {
        version,
        cluster: cluster.into(),
        services,
        clusters: Vec::new(),
        policies: Vec::new(),
    })
}

/// Service `name` in namespace `default` of trust domain `td`, served by its own identity
/// (`spiffe://<td>/ns/default/sa/<name>`) at each of `endpoints` (healthy, no labels).
pub fn served(
    td: &str,
    name: &str,
    vip: IpAddr,
    ports: &[(&str, u16, Protocol)],
    endpoints: &[SocketAddr],
) -> MeshService {
    let identity = SpiffeId::new(td, "default", name).to_string();
    MeshService {
        vip,
        identities: vec![identity.clone()],
        local_endpoints: endpoints
            .iter()
            .map(|&address| endpoint(address, &identity))
            .collect(),
        ..service(name, "default", "0.0.0.0", ports)
    }
}

/// A healthy endpoint at `address` serving as `identity`, no labels, no port mapping.
pub fn endpoint(address: SocketAddr, identity: &str) -> Endpoint {
    Endpoint {
        address,
        labels: Default::default(),
        identity: identity.into(),
        healthy: true,
        ports: Default::default(),
    }
}

/// A member cluster with no gateway and no locality, trusting `ca_pem` for `trust_domain`.
pub fn member(name: &str, trust_domain: &str, ca_pem: &str) -> ClusterInfo {
    ClusterInfo {
        name: name.into(),
        trust_domain: trust_domain.into(),
        gateway: None,
        ca_bundle_pem: ca_pem.into(),
        locality: None,
    }
}
