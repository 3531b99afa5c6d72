//! Builds the cluster's merged [`MeshConfig`] from local discovery and the federation store.
//!
//! Pure: no I/O and no clock. Every local service is visible in its own cluster; a service
//! that another cluster exports is imported; both get a virtual IP from this cluster's range
//! that stays the same for as long as the process runs. The version only moves when the
//! content changes, so consumers are not woken for nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::Ipv4Net;
use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::{
    ClusterInfo, Endpoint, MeshConfig, MeshService, RemoteExport, ServicePort,
};
use isthmus_core::policy::Policy;

use crate::discovery::Discovery;
use crate::records::{ClusterRecord, ExportRecord};

/// Hands out virtual IPs from a range, one per service, never reusing one.
#[derive(Debug)]
pub struct VipAllocator {
    range: Ipv4Net,
    next: u32,
    assigned: BTreeMap<(String, String), Ipv4Addr>,
}

impl VipAllocator {
    pub fn new(range: Ipv4Net) -> Self {
        VipAllocator {
            range,
            next: 1,
            assigned: BTreeMap::new(),
        }
    }

    /// The VIP of `namespace/name`, allocating one on first use; `None` when the range is used up.
    pub fn vip(&mut self, namespace: &str, name: &str) -> Option<Ipv4Addr> {
        let key = (namespace.to_string(), name.to_string());
        if let Some(ip) = self.assigned.get(&key) {
            return Some(*ip);
        }
        let size = 1u64 << (32 - u32::from(self.range.prefix_len()));
        // Skip the network address and, for ranges larger than a /31, the broadcast address.
        if u64::from(self.next) >= size.saturating_sub(1) {
            return None;
        }
        let ip = Ipv4Addr::from(u32::from(self.range.network()) + self.next);
        self.next += 1;
        self.assigned.insert(key, ip);
        Some(ip)
    }
}

/// The catalog of one cluster's control plane.
#[derive(Debug)]
pub struct Catalog {
    cluster: String,
    trust_domain: String,
    vips: VipAllocator,
    current: Arc<MeshConfig>,
}

impl Catalog {
    pub fn new(cluster: &str, trust_domain: &str, vip_range: Ipv4Net) -> Self {
        Catalog {
            cluster: cluster.to_string(),
            trust_domain: trust_domain.to_string(),
            vips: VipAllocator::new(vip_range),
            current: Arc::new(MeshConfig {
                cluster: cluster.to_string(),
                ..MeshConfig::default()
            }),
        }
    }

    /// The last configuration built.
    pub fn current(&self) -> Arc<MeshConfig> {
        self.current.clone()
    }

    /// The export records this cluster should publish for `local`.
    pub fn exports(&self, local: &Discovery) -> Vec<ExportRecord> {
        local
            .services
            .iter()
            .filter(|s| s.export)
            .map(|s| {
                let mut subsets = BTreeMap::new();
                for e in s.endpoints.iter().filter(|e| e.healthy) {
                    for (k, v) in &e.labels {
                        *subsets.entry(format!("{k}={v}")).or_insert(0) += 1;
                    }
                }
                ExportRecord {
                    cluster: self.cluster.clone(),
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                    ports: s.ports.clone(),
                    identities: identities(
                        &self.trust_domain,
                        &s.namespace,
                        s.endpoints.iter().map(|e| e.service_account.as_str()),
                    ),
                    endpoints: s.endpoints.len() as u32,
                    healthy_endpoints: s.endpoints.iter().filter(|e| e.healthy).count() as u32,
                    subsets,
                    lease_expired_at_ms: None,
                }
            })
            .collect()
    }

    /// Rebuilds the configuration; returns it when it differs from the previous one.
    pub fn rebuild(
        &mut self,
        local: &Discovery,
        clusters: &[ClusterRecord],
        exports: &[ExportRecord],
        policies: &[Policy],
    ) -> Option<Arc<MeshConfig>> {
        let gateways: BTreeMap<&str, &ClusterRecord> =
            clusters.iter().map(|c| (c.name.as_str(), c)).collect();
        // (namespace, name) → service under construction.
        let mut services: BTreeMap<(String, String), MeshService> = BTreeMap::new();
        for s in &local.services {
            let Some(vip) = self.vips.vip(&s.namespace, &s.name) else {
                tracing::error!(service = %s.name, namespace = %s.namespace, "VIP range exhausted; service not configured");
                continue;
            };
            let local_endpoints = s
                .endpoints
                .iter()
                .map(|e| Endpoint {
                    address: e.address,
                    labels: e.labels.clone(),
                    identity: SpiffeId::new(&self.trust_domain, &s.namespace, &e.service_account)
                        .to_string(),
                    healthy: e.healthy,
                })
                .collect();
            services.insert(
                (s.namespace.clone(), s.name.clone()),
                MeshService {
                    name: s.name.clone(),
                    namespace: s.namespace.clone(),
                    vip: IpAddr::V4(vip),
                    ports: s.ports.clone(),
                    identities: identities(
                        &self.trust_domain,
                        &s.namespace,
                        s.endpoints.iter().map(|e| e.service_account.as_str()),
                    ),
                    local_endpoints,
                    remote: Vec::new(),
                    exported: s.export,
                },
            );
        }
        for x in exports.iter().filter(|x| x.cluster != self.cluster) {
            // A remote export is usable only through that cluster's gateway.
            let Some(gateway) = gateways.get(x.cluster.as_str()).and_then(|c| c.gateway) else {
                continue;
            };
            let key = (x.namespace.clone(), x.name.clone());
            if !services.contains_key(&key) {
                let Some(vip) = self.vips.vip(&x.namespace, &x.name) else {
                    tracing::error!(service = %x.name, namespace = %x.namespace, "VIP range exhausted; import skipped");
                    continue;
                };
                services.insert(
                    key.clone(),
                    MeshService {
                        name: x.name.clone(),
                        namespace: x.namespace.clone(),
                        vip: IpAddr::V4(vip),
                        ports: Vec::new(),
                        identities: Vec::new(),
                        local_endpoints: Vec::new(),
                        remote: Vec::new(),
                        exported: false,
                    },
                );
            }
            let Some(service) = services.get_mut(&key) else {
                continue;
            };
            merge_ports(&mut service.ports, &x.ports);
            let mut ids: BTreeSet<String> = service.identities.drain(..).collect();
            ids.extend(x.identities.iter().cloned());
            service.identities = ids.into_iter().collect();
            service.remote.push(RemoteExport {
                cluster: x.cluster.clone(),
                gateway,
                healthy_endpoints: x.healthy_endpoints,
                subsets: x.subsets.clone(),
                endpoints: x.endpoints,
                lease_expired_at_ms: x.lease_expired_at_ms,
            });
        }
        for s in services.values_mut() {
            s.remote.sort_by(|a, b| a.cluster.cmp(&b.cluster));
        }
        let mut members: Vec<ClusterInfo> = clusters
            .iter()
            .map(|c| ClusterInfo {
                name: c.name.clone(),
                trust_domain: c.trust_domain.clone(),
                gateway: c.gateway,
                ca_bundle_pem: c.ca_bundle_pem.clone(),
                locality: c.locality.clone(),
            })
            .collect();
        members.sort_by(|a, b| a.name.cmp(&b.name));
        let next = MeshConfig {
            version: self.current.version,
            cluster: self.cluster.clone(),
            services: services.into_values().collect(),
            clusters: members,
            policies: policies.to_vec(),
        };
        if next == *self.current {
            return None;
        }
        self.current = Arc::new(MeshConfig {
            version: self.current.version + 1,
            ..next
        });
        Some(self.current.clone())
    }
}

fn identities<'a>(
    trust_domain: &str,
    namespace: &str,
    accounts: impl Iterator<Item = &'a str>,
) -> Vec<String> {
    let set: BTreeSet<String> = accounts
        .map(|sa| SpiffeId::new(trust_domain, namespace, sa).to_string())
        .collect();
    set.into_iter().collect()
}

/// Adds the ports of `from` that `into` does not declare yet (first declaration wins).
fn merge_ports(into: &mut Vec<ServicePort>, from: &[ServicePort]) {
    for p in from {
        if !into.iter().any(|q| q.port == p.port) {
            into.push(p.clone());
        }
    }
    into.sort_by_key(|p| p.port);
}

#[cfg(test)]
mod tests;
