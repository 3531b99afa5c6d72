//! gRPC definitions and their conversion to and from the [`crate::mesh`] types.
//!
//! Conversions from the wire check every field and name the one that is wrong, so a
//! malformed snapshot is refused whole and the consumer keeps its last good one.

use std::collections::BTreeMap;

use crate::mesh::{
    ClusterInfo, Endpoint, Headless, HeadlessEndpoint, MeshConfig, MeshService, RemoteExport,
    ServicePort,
};

/// Generated messages, clients and servers of `isthmus.mesh.v1`.
#[allow(clippy::all, missing_docs)]
pub mod mesh {
    tonic::include_proto!("isthmus.mesh.v1");
}

/// A field of a received message that does not hold a valid value.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("field {field}: invalid value {value:?}: {reason}")]
pub struct WireError {
    pub field: String,
    pub value: String,
    pub reason: String,
}

fn wire<T, E: std::fmt::Display>(
    field: impl Into<String>,
    value: &str,
    r: Result<T, E>,
) -> Result<T, WireError> {
    r.map_err(|e| WireError {
        field: field.into(),
        value: value.to_string(),
        reason: e.to_string(),
    })
}

impl From<&MeshConfig> for mesh::MeshConfigSnapshot {
    fn from(c: &MeshConfig) -> Self {
        mesh::MeshConfigSnapshot {
            version: c.version,
            cluster: c.cluster.clone(),
            services: c
                .services
                .iter()
                .map(|s| mesh::Service {
                    name: s.name.clone(),
                    namespace: s.namespace.clone(),
                    vip: s.vip.to_string(),
                    ports: s
                        .ports
                        .iter()
                        .map(|p| mesh::Port {
                            name: p.name.clone(),
                            port: u32::from(p.port),
                            protocol: p.protocol.as_str().to_string(),
                        })
                        .collect(),
                    identities: s.identities.clone(),
                    local_endpoints: s
                        .local_endpoints
                        .iter()
                        .map(|e| mesh::Endpoint {
                            address: e.address.to_string(),
                            labels: e.labels.clone().into_iter().collect(),
                            identity: e.identity.clone(),
                            healthy: e.healthy,
                            ports: e
                                .ports
                                .iter()
                                .map(|(k, v)| (u32::from(*k), u32::from(*v)))
                                .collect(),
                        })
                        .collect(),
                    remote: s
                        .remote
                        .iter()
                        .map(|r| mesh::RemoteExport {
                            cluster: r.cluster.clone(),
                            gateway: r.gateway.to_string(),
                            healthy_endpoints: r.healthy_endpoints,
                            subsets: r.subsets.clone().into_iter().collect(),
                            endpoints: r.endpoints,
                            lease_expired_at_unix_ms: r.lease_expired_at_ms.unwrap_or(0),
                        })
                        .collect(),
                    exported: s.exported,
                    headless: s.headless.as_ref().map(|h| mesh::Headless {
                        endpoints: h
                            .endpoints
                            .iter()
                            .map(|e| mesh::HeadlessEndpoint {
                                cluster: e.cluster.clone(),
                                id: e.id.clone(),
                                hostname: e.hostname.clone().unwrap_or_default(),
                                vip: e.vip.to_string(),
                                ready: e.ready,
                            })
                            .collect(),
                    }),
                })
                .collect(),
            clusters: c
                .clusters
                .iter()
                .map(|k| mesh::Cluster {
                    name: k.name.clone(),
                    trust_domain: k.trust_domain.clone(),
                    gateway: k.gateway.map(|g| g.to_string()).unwrap_or_default(),
                    ca_bundle_pem: k.ca_bundle_pem.clone(),
                    locality: k.locality.clone().unwrap_or_default(),
                })
                .collect(),
            policies_json: c.policies.iter().map(|p| p.to_json().to_string()).collect(),
        }
    }
}

impl TryFrom<mesh::MeshConfigSnapshot> for MeshConfig {
    type Error = WireError;

    fn try_from(m: mesh::MeshConfigSnapshot) -> Result<Self, WireError> {
        let mut services = Vec::with_capacity(m.services.len());
        for (i, s) in m.services.into_iter().enumerate() {
            let at = format!("services[{i}]");
            let vip = wire(format!("{at}.vip"), &s.vip, s.vip.parse())?;
            let mut ports = Vec::new();
            for (j, p) in s.ports.into_iter().enumerate() {
                let pf = format!("{at}.ports[{j}]");
                let port = wire(
                    format!("{pf}.port"),
                    &p.port.to_string(),
                    u16::try_from(p.port),
                )?;
                let protocol = wire(format!("{pf}.protocol"), &p.protocol, p.protocol.parse())?;
                ports.push(ServicePort {
                    name: p.name,
                    port,
                    protocol,
                });
            }
            let mut local_endpoints = Vec::new();
            for (j, e) in s.local_endpoints.into_iter().enumerate() {
                let address = wire(
                    format!("{at}.local_endpoints[{j}].address"),
                    &e.address,
                    e.address.parse(),
                )?;
                let mut ports = BTreeMap::new();
                for (service_port, port) in e.ports {
                    let field = format!("{at}.local_endpoints[{j}].ports[{service_port}]");
                    match (u16::try_from(service_port), u16::try_from(port)) {
                        (Ok(s), Ok(p)) if s != 0 && p != 0 => {
                            ports.insert(s, p);
                        }
                        _ => {
                            return Err(WireError {
                                field,
                                value: port.to_string(),
                                reason: "ports are 1 to 65535".to_string(),
                            })
                        }
                    }
                }
                local_endpoints.push(Endpoint {
                    address,
                    labels: e.labels.into_iter().collect::<BTreeMap<_, _>>(),
                    identity: e.identity,
                    healthy: e.healthy,
                    ports,
                });
            }
            let mut remote = Vec::new();
            for (j, r) in s.remote.into_iter().enumerate() {
                let gateway = wire(
                    format!("{at}.remote[{j}].gateway"),
                    &r.gateway,
                    r.gateway.parse(),
                )?;
                remote.push(RemoteExport {
                    cluster: r.cluster,
                    gateway,
                    healthy_endpoints: r.healthy_endpoints,
                    subsets: r.subsets.into_iter().collect(),
                    endpoints: r.endpoints,
                    lease_expired_at_ms: (r.lease_expired_at_unix_ms != 0)
                        .then_some(r.lease_expired_at_unix_ms),
                });
            }
            let headless = match s.headless {
                None => None,
                Some(h) => {
                    let mut endpoints = Vec::with_capacity(h.endpoints.len());
                    for (j, e) in h.endpoints.into_iter().enumerate() {
                        let ef = format!("{at}.headless.endpoints[{j}]");
                        let vip = wire(format!("{ef}.vip"), &e.vip, e.vip.parse())?;
                        if e.id.is_empty() {
                            return Err(WireError {
                                field: format!("{ef}.id"),
                                value: String::new(),
                                reason: "a headless endpoint needs an id".into(),
                            });
                        }
                        endpoints.push(HeadlessEndpoint {
                            cluster: e.cluster,
                            id: e.id,
                            hostname: (!e.hostname.is_empty()).then_some(e.hostname),
                            vip,
                            ready: e.ready,
                        });
                    }
                    Some(Headless { endpoints })
                }
            };
            services.push(MeshService {
                name: s.name,
                namespace: s.namespace,
                vip,
                ports,
                identities: s.identities,
                local_endpoints,
                remote,
                exported: s.exported,
                headless,
            });
        }
        let mut clusters = Vec::new();
        for (i, k) in m.clusters.into_iter().enumerate() {
            let gateway = if k.gateway.is_empty() {
                None
            } else {
                Some(wire(
                    format!("clusters[{i}].gateway"),
                    &k.gateway,
                    k.gateway.parse(),
                )?)
            };
            clusters.push(ClusterInfo {
                name: k.name,
                trust_domain: k.trust_domain,
                gateway,
                ca_bundle_pem: k.ca_bundle_pem,
                locality: (!k.locality.is_empty()).then_some(k.locality),
            });
        }
        let mut policies = Vec::with_capacity(m.policies_json.len());
        for (i, json) in m.policies_json.iter().enumerate() {
            let policy =
                crate::policy::Policy::from_json(json.as_bytes()).map_err(|e| WireError {
                    field: format!("policies_json[{i}]"),
                    value: json.chars().take(80).collect(),
                    reason: e.to_string(),
                })?;
            policies.push(policy);
        }
        Ok(MeshConfig {
            version: m.version,
            cluster: m.cluster,
            services,
            clusters,
            policies,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::Protocol;

    fn sample() -> MeshConfig {
        MeshConfig {
            version: 7,
            cluster: "east".into(),
            services: vec![MeshService {
                name: "ratings".into(),
                namespace: "default".into(),
                vip: "127.10.0.1".parse().unwrap(),
                ports: vec![ServicePort {
                    name: "http".into(),
                    port: 9080,
                    protocol: Protocol::Http,
                }],
                identities: vec!["spiffe://central.isthmus.local/ns/default/sa/ratings".into()],
                local_endpoints: vec![Endpoint {
                    address: "127.1.0.5:15006".parse().unwrap(),
                    labels: [("version".to_string(), "v1".to_string())].into(),
                    identity: "spiffe://east.isthmus.local/ns/default/sa/ratings".into(),
                    healthy: true,
                    ports: [(9090, 8443)].into(),
                }],
                remote: vec![RemoteExport {
                    cluster: "central".into(),
                    gateway: "127.0.0.1:15443".parse().unwrap(),
                    healthy_endpoints: 2,
                    subsets: [("version=v1".to_string(), 2)].into(),
                    endpoints: 3,
                    lease_expired_at_ms: Some(1_700_000_000_000),
                }],
                exported: true,
                headless: Some(Headless {
                    endpoints: vec![
                        HeadlessEndpoint {
                            cluster: "central".into(),
                            id: "ratings-0".into(),
                            hostname: Some("ratings-0".into()),
                            vip: "127.10.0.2".parse().unwrap(),
                            ready: true,
                        },
                        HeadlessEndpoint {
                            cluster: "east".into(),
                            id: "ep.0123456789abcdef".into(),
                            hostname: None,
                            vip: "127.10.0.3".parse().unwrap(),
                            ready: false,
                        },
                    ],
                }),
            }],
            clusters: vec![ClusterInfo {
                name: "east".into(),
                trust_domain: "east.isthmus.local".into(),
                gateway: None,
                ca_bundle_pem: "PEM".into(),
                locality: Some("us-east-1/a".into()),
            }],
            policies: crate::policy::parse_documents(
                "vs.yaml",
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n\
                 spec: {hosts: [ratings], http: [{route: [{destination: {host: ratings}}]}]}\n",
            )
            .unwrap(),
        }
    }

    #[test]
    fn an_endpoint_port_out_of_range_refuses_the_snapshot_naming_it() {
        let mut wire: mesh::MeshConfigSnapshot = (&sample()).into();
        wire.services[0].local_endpoints[0]
            .ports
            .insert(9090, 70_000);
        let err = MeshConfig::try_from(wire).unwrap_err();
        assert_eq!(err.field, "services[0].local_endpoints[0].ports[9090]");
    }

    #[test]
    fn a_malformed_policy_on_the_wire_refuses_the_snapshot() {
        let mut wire: mesh::MeshConfigSnapshot = (&sample()).into();
        wire.policies_json[0] = "{\"kind\": \"VirtualService\"}".into();
        assert_eq!(
            MeshConfig::try_from(wire).unwrap_err().field,
            "policies_json[0]"
        );
    }

    #[test]
    fn snapshot_round_trips_through_the_wire_type() {
        let c = sample();
        let wire: mesh::MeshConfigSnapshot = (&c).into();
        assert_eq!(MeshConfig::try_from(wire).unwrap(), c);
    }

    #[test]
    fn malformed_snapshot_names_the_bad_field() {
        let mut wire: mesh::MeshConfigSnapshot = (&sample()).into();
        wire.services[0].ports[0].port = 70000;
        let err = MeshConfig::try_from(wire).unwrap_err();
        assert_eq!(err.field, "services[0].ports[0].port");
        let mut wire: mesh::MeshConfigSnapshot = (&sample()).into();
        wire.services[0].vip = "not-an-ip".into();
        assert_eq!(
            MeshConfig::try_from(wire).unwrap_err().field,
            "services[0].vip"
        );
        let mut wire: mesh::MeshConfigSnapshot = (&sample()).into();
        if let Some(h) = wire.services[0].headless.as_mut() {
            h.endpoints[1].vip = "nowhere".into();
        }
        assert_eq!(
            MeshConfig::try_from(wire).unwrap_err().field,
            "services[0].headless.endpoints[1].vip"
        );
    }

    #[test]
    fn a_clusterset_ip_service_stays_without_headless_endpoints_on_the_wire() {
        let mut c = sample();
        c.services[0].headless = None;
        let wire: mesh::MeshConfigSnapshot = (&c).into();
        assert!(wire.services[0].headless.is_none());
        assert_eq!(
            MeshConfig::try_from(wire).unwrap().services[0].headless,
            None
        );
    }
}
