//! Builds the cluster's merged [`MeshConfig`] from local discovery and the federation store.
//!
//! Pure: no I/O and no clock. Every local service is visible in its own cluster; a service
//! that another cluster exports is imported; both get a virtual IP from this cluster's range
//! that stays the same for as long as the process runs. A headless service also gets one VIP
//! per endpoint, local or remote (see docs/dns.md, "Headless services"), and its local
//! endpoints carry the [`ENDPOINT_LABEL`] that lets a gateway pick exactly one of them. The
//! version only moves when the content changes, so consumers are not woken for nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::Ipv4Net;
use isthmus_core::identity::validate_label;
use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::{
    ClusterInfo, Endpoint, Headless, HeadlessEndpoint, MeshConfig, MeshService, RemoteExport,
    ServicePort, ENDPOINT_LABEL,
};
use isthmus_core::policy::Policy;

use crate::discovery::{Discovery, LocalService};
use crate::records::{ClusterRecord, ExportRecord, ExportedEndpoint, HeadlessExport};

/// Hands out virtual IPs from a range, one per service and one per headless endpoint, never
/// reusing one.
#[derive(Debug)]
pub struct VipAllocator {
    range: Ipv4Net,
    next: u32,
    assigned: BTreeMap<VipKey, Ipv4Addr>,
}

/// What a VIP stands for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum VipKey {
    /// (namespace, name)
    Service(String, String),
    /// (namespace, name, cluster, endpoint id)
    Endpoint(String, String, String, String),
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
        self.allocate(VipKey::Service(namespace.to_string(), name.to_string()))
    }

    /// The VIP of endpoint `id` of headless service `namespace/name` in `cluster`, allocating
    /// one on first use; `None` when the range is used up.
    pub fn endpoint_vip(
        &mut self,
        namespace: &str,
        name: &str,
        cluster: &str,
        id: &str,
    ) -> Option<Ipv4Addr> {
        self.allocate(VipKey::Endpoint(
            namespace.to_string(),
            name.to_string(),
            cluster.to_string(),
            id.to_string(),
        ))
    }

    fn allocate(&mut self, key: VipKey) -> Option<Ipv4Addr> {
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

/// An imported export's cluster and, when it declares the service headless, its endpoints.
type Declaration<'a> = (&'a str, Option<&'a HeadlessExport>);

/// The catalog of one cluster's control plane.
#[derive(Debug)]
pub struct Catalog {
    cluster: String,
    trust_domain: String,
    vips: VipAllocator,
    current: Arc<MeshConfig>,
    /// Problems with imported headless exports already logged (each is logged once).
    reported: BTreeSet<String>,
}

impl Catalog {
    pub fn new(cluster: &str, trust_domain: &str, vip_range: Ipv4Net) -> Self {
        Catalog {
            cluster: cluster.to_string(),
            trust_domain: trust_domain.to_string(),
            vips: VipAllocator::new(vip_range),
            reported: BTreeSet::new(),
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
                    endpoints: isthmus_core::mesh::count_u32(s.endpoints.len()),
                    healthy_endpoints: isthmus_core::mesh::count_u32(
                        s.endpoints.iter().filter(|e| e.healthy).count(),
                    ),
                    subsets,
                    headless: s.headless.then(|| HeadlessExport {
                        endpoints: s
                            .endpoints
                            .iter()
                            .map(|e| ExportedEndpoint {
                                id: e.headless_id(),
                                hostname: e.hostname.clone(),
                                ready: e.healthy,
                            })
                            .collect(),
                    }),
                    exported_at_ms: s.exported_at_ms,
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
        let (clusters, problems) = admit_trust_domains(&self.cluster, &self.trust_domain, clusters);
        for problem in problems {
            if self.reported.insert(problem.clone()) {
                tracing::warn!("{problem}");
            }
        }
        let gateways: BTreeMap<&str, &ClusterRecord> =
            clusters.iter().map(|c| (c.name.as_str(), *c)).collect();
        // (namespace, name) → service under construction.
        let mut services: BTreeMap<(String, String), MeshService> = BTreeMap::new();
        // (namespace, name) → each imported export's cluster and headless endpoints.
        let mut imported: BTreeMap<(String, String), Vec<Declaration<'_>>> = BTreeMap::new();
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
                    labels: if s.headless {
                        let mut labels = e.labels.clone();
                        labels.insert(ENDPOINT_LABEL.to_string(), e.headless_id());
                        labels
                    } else {
                        e.labels.clone()
                    },
                    identity: SpiffeId::new(&self.trust_domain, &s.namespace, &e.service_account)
                        .to_string(),
                    healthy: e.healthy,
                    ports: e.ports.clone(),
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
                    headless: None,
                },
            );
        }
        // Oldest export first (then by cluster), so where clusters declare a port number
        // differently the oldest export's declaration is the one merged, as KEP-1645 says;
        // a local service keeps its own declarations.
        let mut remote_exports: Vec<&ExportRecord> = exports
            .iter()
            .filter(|x| x.cluster != self.cluster)
            .collect();
        remote_exports.sort_by_key(|x| (x.exported_at_ms.unwrap_or(u64::MAX), x.cluster.clone()));
        for x in remote_exports {
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
                        headless: None,
                    },
                );
            }
            let Some(service) = services.get_mut(&key) else {
                continue;
            };
            merge_ports(&mut service.ports, &x.ports);
            let mut ids: BTreeSet<String> = service.identities.drain(..).collect();
            // A cluster vouches only for identities of its own trust domain.
            let exporter_td = gateways
                .get(x.cluster.as_str())
                .map(|c| c.trust_domain.as_str());
            for id in &x.identities {
                let parsed = id.parse::<SpiffeId>().ok();
                if parsed.as_ref().map(SpiffeId::trust_domain) == exporter_td {
                    ids.insert(id.clone());
                } else {
                    let problem = format!(
                        "ignoring identity {id} in cluster {}'s export of {}/{}: it is not in {}'s trust domain",
                        x.cluster, x.namespace, x.name, x.cluster
                    );
                    if self.reported.insert(problem.clone()) {
                        tracing::warn!("{problem}");
                    }
                }
            }
            service.identities = ids.into_iter().collect();
            service.remote.push(RemoteExport {
                cluster: x.cluster.clone(),
                gateway,
                healthy_endpoints: x.healthy_endpoints,
                subsets: x.subsets.clone(),
                endpoints: x.endpoints,
                lease_expired_at_ms: x.lease_expired_at_ms,
            });
            imported
                .entry(key)
                .or_default()
                .push((x.cluster.as_str(), x.headless.as_ref()));
        }
        for s in services.values_mut() {
            s.remote.sort_by(|a, b| a.cluster.cmp(&b.cluster));
        }
        for (key, service) in &mut services {
            let here = local
                .services
                .iter()
                .find(|l| l.namespace == key.0 && l.name == key.1);
            let remotes = imported.get(key).map(Vec::as_slice).unwrap_or_default();
            service.headless = self.headless(key, here, remotes);
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

impl Catalog {
    /// The headless endpoints of service `key`, with their VIPs: `None` unless every
    /// declaration of the service (the local one, if any, and every imported export) says
    /// headless. Disagreement makes it a ClusterSetIP service, logged once.
    fn headless(
        &mut self,
        key: &(String, String),
        here: Option<&LocalService>,
        remotes: &[Declaration<'_>],
    ) -> Option<Headless> {
        let (namespace, name) = (key.0.as_str(), key.1.as_str());
        let any = here.is_some_and(|l| l.headless) || remotes.iter().any(|(_, h)| h.is_some());
        if !any {
            return None;
        }
        if !here.is_none_or(|l| l.headless) || remotes.iter().any(|(_, h)| h.is_none()) {
            let mut headless: Vec<&str> = remotes
                .iter()
                .filter(|(_, h)| h.is_some())
                .map(|(c, _)| *c)
                .collect();
            if here.is_some_and(|l| l.headless) {
                headless.push(&self.cluster);
            }
            self.report(format!(
                "service {namespace}/{name} is headless in {} only, not in every cluster that                  declares it; treating it as a ClusterSetIP service",
                headless.join(", ")
            ));
            return None;
        }
        let mut endpoints = Vec::new();
        let mut add =
            |vips: &mut VipAllocator, cluster: &str, id: String, hostname, ready| match vips
                .endpoint_vip(namespace, name, cluster, &id)
            {
                Some(vip) => {
                    endpoints.push(HeadlessEndpoint {
                        cluster: cluster.to_string(),
                        id,
                        hostname,
                        vip: IpAddr::V4(vip),
                        ready,
                    });
                    true
                }
                None => false,
            };
        let mut exhausted = false;
        for e in here.map(|l| l.endpoints.as_slice()).unwrap_or_default() {
            let cluster = self.cluster.clone();
            exhausted |= !add(
                &mut self.vips,
                &cluster,
                e.headless_id(),
                e.hostname.clone(),
                e.healthy,
            );
        }
        for (cluster, export) in remotes {
            for e in export.map(|h| h.endpoints.as_slice()).unwrap_or_default() {
                if let Err(reason) = check_exported(e) {
                    self.report(format!(
                        "skipping endpoint {:?} of {namespace}/{name} exported by {cluster}:                          {reason}",
                        e.id
                    ));
                    continue;
                }
                exhausted |= !add(
                    &mut self.vips,
                    cluster,
                    e.id.clone(),
                    e.hostname.clone(),
                    e.ready,
                );
            }
        }
        if exhausted {
            tracing::error!(service = %name, %namespace, "VIP range exhausted; some headless endpoints skipped");
        }
        endpoints.sort_by(|a, b| (&a.cluster, &a.id).cmp(&(&b.cluster, &b.id)));
        endpoints.dedup_by(|a, b| a.cluster == b.cluster && a.id == b.id);
        Some(Headless { endpoints })
    }

    fn report(&mut self, problem: String) {
        if !self.reported.contains(&problem) {
            tracing::warn!("{problem}");
            self.reported.insert(problem);
        }
    }
}

/// Whether another cluster's headless endpoint can be imported: its id must be usable as a
/// tunnel subset value, and its hostname (the id, when present) a DNS label.
fn check_exported(e: &ExportedEndpoint) -> Result<(), String> {
    if let Some(h) = &e.hostname {
        validate_label("hostname", h).map_err(|err| err.to_string())?;
        if *h != e.id {
            return Err(format!(
                "the id of an endpoint with hostname {h:?} must be the hostname"
            ));
        }
        return Ok(());
    }
    let generated =
        e.id.strip_prefix("ep.")
            .is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if generated {
        Ok(())
    } else {
        Err("an endpoint without a hostname needs an id of the form ep.<16 hex digits>".into())
    }
}

/// The member clusters whose trust bundles count: a trust domain belongs to one cluster.
/// This cluster's own trust domain is always its own (another record claiming it is left
/// out); two other clusters claiming one trust domain are both left out, as neither can be
/// told from an impostor here. Returns the clusters kept and one message per one left out.
pub fn admit_trust_domains<'a>(
    own_cluster: &str,
    own_trust_domain: &str,
    clusters: &'a [ClusterRecord],
) -> (Vec<&'a ClusterRecord>, Vec<String>) {
    let mut claims: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for c in clusters {
        claims
            .entry(c.trust_domain.to_ascii_lowercase())
            .or_default()
            .push(c.name.as_str());
    }
    let mut kept = Vec::new();
    let mut problems = Vec::new();
    for c in clusters {
        let td = c.trust_domain.to_ascii_lowercase();
        let claimants = &claims[&td];
        if c.name == own_cluster {
            kept.push(c);
        } else if td == own_trust_domain {
            problems.push(format!(
                "trust domain {td} belongs to cluster {own_cluster}; leaving out cluster {}, which claims it",
                c.name
            ));
        } else if claimants.len() > 1 {
            problems.push(format!(
                "clusters {} all claim trust domain {td}; leaving out cluster {}",
                claimants.join(", "),
                c.name
            ));
        } else {
            kept.push(c);
        }
    }
    (kept, problems)
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

/// Adds the ports of `from` that `into` does not declare yet (the first declaration of a
/// port number wins: the caller merges the oldest export first).
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
