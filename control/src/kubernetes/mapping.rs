//! From the Kubernetes objects the reflectors hold to the control plane's [`Discovery`].
//!
//! Pure: the same snapshot always gives the same discovery, so this is where the resource
//! mapping (docs/kubernetes.md, "Discovery") is tested in detail.
//!
//! - A Service in a namespace that exists and is not terminating is discovered; it is
//!   exported iff a ServiceExport of the same namespace and name exists (and is not being
//!   deleted). `ExternalName` Services are skipped (the MCS API does not export them);
//!   `clusterIP: None` makes a headless service.
//! - Ports: `name`, `port`, and `appProtocol` (else Istio's name convention, as in file mode)
//!   give the protocol; `UDP` ports are UDP, `SCTP` ports are left out.
//! - Endpoints come from the EndpointSlices labelled `kubernetes.io/service-name`: the first
//!   address of each endpoint, `ready` (unset = ready) is healthy, the `targetRef` Pod gives
//!   the labels and the service account. The address callers' sidecars dial is the pod IP
//!   and the sidecar's inbound port (15006 by default), never the application's port.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use isthmus_core::identity::validate_label;
use isthmus_core::mesh::{Protocol, ServicePort, ENDPOINT_LABEL};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::resources::ServiceExport;
use crate::discovery::{port_protocol, Discovery, LocalEndpoint, LocalService};

/// The EndpointSlice label naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One consistent view of the watched objects.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub namespaces: Vec<Arc<Namespace>>,
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub pods: Vec<Arc<Pod>>,
    pub exports: Vec<Arc<ServiceExport>>,
}

fn key(ns: Option<&String>, name: Option<&String>) -> Option<(String, String)> {
    Some((ns?.clone(), name?.clone()))
}

/// The unix time in milliseconds of a ServiceExport's creation, when the API server set it.
pub fn export_time_ms(export: &ServiceExport) -> Option<u64> {
    export
        .metadata
        .creation_timestamp
        .as_ref()
        .and_then(|t| u64::try_from(t.0.timestamp_millis()).ok())
}

/// Maps a snapshot to the discovery model; `inbound_port` is the sidecar's inbound port.
/// Objects that cannot be mapped are skipped with a reason in the second result.
pub fn discovery(snapshot: &Snapshot, inbound_port: u16) -> (Discovery, Vec<String>) {
    let mut problems = Vec::new();
    let live_namespaces: BTreeSet<&str> = snapshot
        .namespaces
        .iter()
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_none_or(|p| p != "Terminating")
        })
        .filter_map(|n| n.metadata.name.as_deref())
        .collect();
    let exports: BTreeMap<(String, String), &ServiceExport> = snapshot
        .exports
        .iter()
        .filter(|x| x.metadata.deletion_timestamp.is_none())
        .filter_map(|x| {
            Some((
                key(x.metadata.namespace.as_ref(), x.metadata.name.as_ref())?,
                &**x,
            ))
        })
        .collect();
    let pods: BTreeMap<(String, String), &Pod> = snapshot
        .pods
        .iter()
        .filter_map(|p| {
            Some((
                key(p.metadata.namespace.as_ref(), p.metadata.name.as_ref())?,
                &**p,
            ))
        })
        .collect();
    let mut slices: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in &snapshot.slices {
        let service = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL));
        if let Some(k) = key(s.metadata.namespace.as_ref(), service) {
            slices.entry(k).or_default().push(s);
        }
    }

    let mut services = Vec::new();
    for svc in &snapshot.services {
        let Some((namespace, name)) =
            key(svc.metadata.namespace.as_ref(), svc.metadata.name.as_ref())
        else {
            continue;
        };
        if !live_namespaces.contains(namespace.as_str()) {
            continue;
        }
        let spec = svc.spec.clone().unwrap_or_default();
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        if validate_label("service name", &name).is_err()
            || validate_label("namespace", &namespace).is_err()
        {
            problems.push(format!(
                "service {namespace}/{name}: the name is not a DNS label"
            ));
            continue;
        }
        let headless = spec.cluster_ip.as_deref() == Some("None");
        let mut ports: Vec<ServicePort> = Vec::new();
        for p in spec.ports.unwrap_or_default() {
            let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
                "UDP" => Protocol::Udp,
                "TCP" => app_protocol(p.name.as_deref().unwrap_or(""), p.app_protocol.as_deref()),
                _ => continue,
            };
            let Some(number) = u16::try_from(p.port).ok().filter(|n| *n != 0) else {
                continue;
            };
            if ports.iter().any(|q| q.port == number) {
                continue;
            }
            ports.push(ServicePort {
                name: p.name.unwrap_or_default(),
                port: number,
                protocol,
            });
        }
        if ports.is_empty() {
            problems.push(format!("service {namespace}/{name}: no TCP or UDP port"));
            continue;
        }
        ports.sort_by_key(|p| p.port);
        let k = (namespace.clone(), name.clone());
        let endpoints = endpoints(
            slices.get(&k).map(Vec::as_slice).unwrap_or_default(),
            &pods,
            &namespace,
            headless,
            &ports,
            inbound_port,
        );
        let export = exports.get(&k);
        services.push(LocalService {
            name,
            namespace,
            export: export.is_some(),
            headless,
            ports,
            endpoints,
            exported_at_ms: export.and_then(|x| export_time_ms(x)),
        });
    }
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    (Discovery { services }, problems)
}

/// A TCP port's protocol from its `appProtocol` (the IANA names and Kubernetes' own
/// `kubernetes.io/h2c`), else from its name as in file mode; unknown values are detected.
fn app_protocol(name: &str, app_protocol: Option<&str>) -> Protocol {
    match app_protocol.map(str::to_ascii_lowercase).as_deref() {
        Some("kubernetes.io/h2c") | Some("h2c") => Protocol::Http2,
        Some("kubernetes.io/ws") => Protocol::Http,
        Some("kubernetes.io/wss") => Protocol::Tcp,
        Some(other) => port_protocol(name, Some(other))
            .or_else(|_| port_protocol(other, None))
            .unwrap_or(Protocol::Auto),
        None => port_protocol(name, None).unwrap_or(Protocol::Auto),
    }
}

fn endpoints(
    slices: &[&EndpointSlice],
    pods: &BTreeMap<(String, String), &Pod>,
    namespace: &str,
    headless: bool,
    service_ports: &[ServicePort],
    fallback_port: u16,
) -> Vec<LocalEndpoint> {
    // The address's port is the first TCP port's target; other ports whose targets differ
    // are listed in `ports`.
    let first = service_ports
        .iter()
        .find(|p| p.protocol != Protocol::Udp)
        .unwrap_or(&service_ports[0]);
    // By pod IP: a pod in two slices (being rebalanced, or while its ports change) is one
    // endpoint.
    let mut by_address: BTreeMap<IpAddr, LocalEndpoint> = BTreeMap::new();
    for slice in slices {
        if slice.address_type == "FQDN" {
            continue;
        }
        // Callers dial the pod's target port of the service port they call; the pod's
        // redirect (`isthmus sidecar init`) hands the connection to its sidecar, which
        // forwards it to that original destination after mTLS. A slice lists target ports by
        // service port name; one that lists none for the first port gets the sidecar's
        // inbound port.
        let target = |name: &str| {
            slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref().unwrap_or_default() == name)
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0)
        };
        let target_port = target(&first.name).unwrap_or(fallback_port);
        let other_ports: BTreeMap<u16, u16> = service_ports
            .iter()
            .filter_map(|p| Some((p.port, target(&p.name)?)))
            .filter(|(_, t)| *t != target_port)
            .collect();
        for e in &slice.endpoints {
            let Some(ip) = e.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            let (labels, service_account) = match &e.target_ref {
                Some(r) if r.kind.as_deref() == Some("Pod") => {
                    let pod_ns = r.namespace.clone().unwrap_or_else(|| namespace.to_string());
                    let Some(pod) = r.name.clone().and_then(|n| pods.get(&(pod_ns, n))) else {
                        // The Pod is not in the reflector yet: its identity is unknown, so the
                        // endpoint waits for it rather than being served as the wrong account.
                        continue;
                    };
                    let sa = pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.service_account_name.clone())
                        .unwrap_or_else(|| "default".to_string());
                    (pod.metadata.labels.clone().unwrap_or_default(), sa)
                }
                _ => (BTreeMap::new(), "default".to_string()),
            };
            let mut labels = labels;
            labels.remove(ENDPOINT_LABEL);
            let healthy = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let hostname = e
                .hostname
                .clone()
                .filter(|h| headless && validate_label("hostname", h).is_ok());
            let address = SocketAddr::new(ip, target_port);
            let endpoint = LocalEndpoint {
                address,
                service_account,
                labels,
                healthy,
                hostname,
                ports: other_ports.clone(),
            };
            // The same pod can sit in two slices for a moment while they are rebalanced:
            // keep one, preferring the ready copy.
            match by_address.get(&ip) {
                Some(old) if old.healthy || !endpoint.healthy => {}
                _ => {
                    by_address.insert(ip, endpoint);
                }
            }
        }
    }
    let mut out: Vec<LocalEndpoint> = by_address.into_values().collect();
    if headless {
        let mut seen = BTreeSet::new();
        for e in &mut out {
            if let Some(h) = &e.hostname {
                if !seen.insert(h.clone()) {
                    e.hostname = None;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
