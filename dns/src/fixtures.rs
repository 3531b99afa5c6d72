//! Test fixtures: mesh services built in one line.

use isthmus_core::mesh::{MeshService, Protocol, ServicePort};

/// A service `name.namespace` with VIP `vip` and ports `(name, number, protocol)`.
pub(crate) fn service(
    name: &str,
    namespace: &str,
    vip: &str,
    ports: &[(&str, u16, Protocol)],
) -> MeshService {
    MeshService {
        name: name.into(),
        namespace: namespace.into(),
        vip: vip.parse().expect("fixture VIPs are valid"),
        ports: ports
            .iter()
            .map(|(name, port, protocol)| ServicePort {
                name: (*name).into(),
                port: *port,
                protocol: *protocol,
            })
            .collect(),
        identities: Vec::new(),
        local_endpoints: Vec::new(),
        remote: Vec::new(),
        exported: false,
        headless: None,
    }
}
