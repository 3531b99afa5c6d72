//! Local discovery from a YAML file: the services of this cluster, their ports and endpoints.
//!
//! The file is the local-mode stand-in for Kubernetes Services and EndpointSlices (the kube
//! discovery replaces it in Kubernetes). It is re-read when it changes; a file that does not
//! validate is reported and the last good discovery is kept, so a typo never withdraws a
//! service.
//!
//! ```yaml
//! services:
//!   - name: ratings
//!     namespace: default
//!     export: true            # visible to the other clusters (default false)
//!     ports:
//!       - {name: http, port: 9080, protocol: http}
//!     endpoints:
//!       - address: 127.1.0.5:15006   # where callers' sidecars connect (mTLS)
//!         serviceAccount: ratings
//!         labels: {version: v1}
//!         healthy: true              # default true
//!   - name: web
//!     headless: true          # no ClusterSetIP: DNS answers each ready endpoint (default false)
//!     ports:
//!       - {name: http, port: 8080}
//!     endpoints:
//!       - address: 127.1.0.7:15006
//!         serviceAccount: web
//!         hostname: web-0            # web-0.<cluster>.web.default.svc.clusterset.local
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;

use isthmus_core::config::{socket_addr, FieldError};
use isthmus_core::identity::validate_label;
use isthmus_core::mesh::{Protocol, ServicePort, ENDPOINT_LABEL};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawDiscovery {
    #[serde(default)]
    pub services: Vec<RawService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawService {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub export: bool,
    #[serde(default)]
    pub headless: bool,
    pub ports: Vec<RawPort>,
    #[serde(default)]
    pub endpoints: Vec<RawEndpoint>,
}

fn default_namespace() -> String {
    "default".to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPort {
    pub name: String,
    pub port: u32,
    #[serde(default)]
    pub protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawEndpoint {
    pub address: String,
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "default_true")]
    pub healthy: bool,
    #[serde(default)]
    pub hostname: Option<String>,
}

fn default_true() -> bool {
    true
}

/// The validated result of discovery.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Discovery {
    pub services: Vec<LocalService>,
}

/// A service discovered in this cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalService {
    pub name: String,
    pub namespace: String,
    pub export: bool,
    /// No ClusterSetIP: each endpoint gets an address (and, with a hostname, a name) of its own.
    pub headless: bool,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<LocalEndpoint>,
    /// When the service was exported (unix ms; Kubernetes: the ServiceExport's creation),
    /// so the oldest export wins a conflict. `None` in file mode.
    pub exported_at_ms: Option<u64>,
}

/// An endpoint discovered in this cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEndpoint {
    pub address: SocketAddr,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub healthy: bool,
    /// Names the endpoint of a headless service (`<hostname>.<cluster>.<svc>...`).
    pub hostname: Option<String>,
    /// Service port -> port to dial at `address`'s IP, where it differs (Kubernetes target
    /// ports); see [`isthmus_core::mesh::Endpoint::ports`].
    pub ports: BTreeMap<u16, u16>,
}

impl LocalEndpoint {
    /// The endpoint's id in a headless service's export (the value of its
    /// [`ENDPOINT_LABEL`]): the hostname, else `ep.` and the FNV-1a hash of its address. The
    /// dot keeps generated ids apart from every hostname, which is a single DNS label.
    pub fn headless_id(&self) -> String {
        match &self.hostname {
            Some(h) => h.clone(),
            None => {
                let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
                for b in self.address.to_string().bytes() {
                    hash ^= u64::from(b);
                    hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
                }
                format!("ep.{hash:016x}")
            }
        }
    }
}

/// The protocol a port declares: explicit, or from Istio's port-name convention
/// (`http`, `http-web`, `http2-api`, `grpc-api`, `tcp-db`; `https`, `tls`, `mongo`, `mysql`
/// and `redis` are opaque TCP as in Istio), else detected from the traffic (`auto`).
pub fn port_protocol(name: &str, explicit: Option<&str>) -> Result<Protocol, String> {
    if let Some(p) = explicit {
        return p.parse();
    }
    let prefix = name.split('-').next().unwrap_or(name).to_ascii_lowercase();
    Ok(match prefix.as_str() {
        "http" => Protocol::Http,
        "http2" => Protocol::Http2,
        "grpc" | "grpc-web" => Protocol::Grpc,
        "tcp" | "https" | "tls" | "mongo" | "mysql" | "redis" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => Protocol::Auto,
    })
}

impl TryFrom<RawDiscovery> for Discovery {
    type Error = FieldError;

    fn try_from(raw: RawDiscovery) -> Result<Self, FieldError> {
        let mut seen = BTreeSet::new();
        let mut services = Vec::with_capacity(raw.services.len());
        for (i, s) in raw.services.into_iter().enumerate() {
            let at = format!("services[{i}]");
            validate_label("service name", &s.name)
                .map_err(|e| FieldError::new(format!("{at}.name"), &s.name, e.to_string()))?;
            validate_label("namespace", &s.namespace).map_err(|e| {
                FieldError::new(format!("{at}.namespace"), &s.namespace, e.to_string())
            })?;
            if !seen.insert((s.namespace.clone(), s.name.clone())) {
                return Err(FieldError::new(
                    format!("{at}.name"),
                    &s.name,
                    format!("service {}/{} is declared twice", s.namespace, s.name),
                ));
            }
            if s.ports.is_empty() {
                return Err(FieldError::new(
                    format!("{at}.ports"),
                    "[]",
                    "a service needs at least one port",
                ));
            }
            let mut ports = Vec::new();
            for (j, p) in s.ports.into_iter().enumerate() {
                let pf = format!("{at}.ports[{j}]");
                let number = u16::try_from(p.port)
                    .ok()
                    .filter(|n| *n != 0)
                    .ok_or_else(|| {
                        FieldError::new(format!("{pf}.port"), p.port, "a port is 1 to 65535")
                    })?;
                if ports.iter().any(|q: &ServicePort| q.port == number) {
                    return Err(FieldError::new(
                        format!("{pf}.port"),
                        number,
                        "port declared twice",
                    ));
                }
                let protocol = port_protocol(&p.name, p.protocol.as_deref()).map_err(|reason| {
                    FieldError::new(
                        format!("{pf}.protocol"),
                        p.protocol.as_deref().unwrap_or(""),
                        reason,
                    )
                })?;
                ports.push(ServicePort {
                    name: p.name,
                    port: number,
                    protocol,
                });
            }
            let mut endpoints = Vec::new();
            for (j, e) in s.endpoints.into_iter().enumerate() {
                let ef = format!("{at}.endpoints[{j}]");
                let address = socket_addr(&format!("{ef}.address"), &e.address)?;
                validate_label("service account", &e.service_account).map_err(|err| {
                    FieldError::new(
                        format!("{ef}.serviceAccount"),
                        &e.service_account,
                        err.to_string(),
                    )
                })?;
                if e.labels.contains_key(ENDPOINT_LABEL) {
                    return Err(FieldError::new(
                        format!("{ef}.labels"),
                        ENDPOINT_LABEL,
                        "this label key is reserved (the control plane sets it on headless endpoints)",
                    ));
                }
                if let Some(hostname) = &e.hostname {
                    let hf = format!("{ef}.hostname");
                    if !s.headless {
                        return Err(FieldError::new(
                            hf,
                            hostname,
                            "only endpoints of a headless service (headless: true) have hostnames",
                        ));
                    }
                    validate_label("hostname", hostname)
                        .map_err(|err| FieldError::new(&hf, hostname, err.to_string()))?;
                    if endpoints
                        .iter()
                        .any(|o: &LocalEndpoint| o.hostname.as_ref() == Some(hostname))
                    {
                        return Err(FieldError::new(
                            hf,
                            hostname,
                            "hostname declared twice in this service",
                        ));
                    }
                }
                if s.headless && endpoints.iter().any(|o| o.address == address) {
                    return Err(FieldError::new(
                        format!("{ef}.address"),
                        address,
                        "endpoint address declared twice in this headless service",
                    ));
                }
                endpoints.push(LocalEndpoint {
                    address,
                    service_account: e.service_account,
                    labels: e.labels,
                    healthy: e.healthy,
                    hostname: e.hostname,
                    ports: BTreeMap::new(),
                });
            }
            services.push(LocalService {
                name: s.name,
                namespace: s.namespace,
                export: s.export,
                headless: s.headless,
                ports,
                endpoints,
                exported_at_ms: None,
            });
        }
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Ok(Discovery { services })
    }
}

/// Reads and validates a discovery file.
pub fn load(path: &Path) -> Result<Discovery, isthmus_core::config::ConfigError> {
    isthmus_core::config::load_file::<RawDiscovery, Discovery>(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Discovery, String> {
        isthmus_core::config::load_str::<RawDiscovery, Discovery>(Path::new("svc.yaml"), text)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_valid_file_yields_sorted_services_with_protocols() {
        let d = parse(
            "services:\n- name: reviews\n  export: true\n  ports: [{name: http, port: 9080}]\n  endpoints:\n  - {address: 127.0.0.1:1000, serviceAccount: reviews, labels: {version: v2}}\n- name: db\n  namespace: data\n  ports: [{name: tcp-pg, port: 5432}]\n",
        )
        .unwrap();
        assert_eq!(d.services[0].name, "db");
        assert_eq!(d.services[0].ports[0].protocol, Protocol::Tcp);
        assert_eq!(d.services[1].ports[0].protocol, Protocol::Http);
        assert!(d.services[1].export);
        assert!(d.services[1].endpoints[0].healthy);
        assert_eq!(d.services[1].endpoints[0].labels["version"], "v2");
    }

    #[test]
    fn undeclared_protocols_come_from_istios_name_prefixes_else_detection() {
        let cases = [
            ("http", Protocol::Http),
            ("http-web", Protocol::Http),
            ("HTTP2-api", Protocol::Http2),
            ("grpc", Protocol::Grpc),
            ("grpc-echo", Protocol::Grpc),
            ("tcp-db", Protocol::Tcp),
            ("https", Protocol::Tcp),
            ("tls-passthrough", Protocol::Tcp),
            ("mysql", Protocol::Tcp),
            ("web", Protocol::Auto),
            ("", Protocol::Auto),
        ];
        for (name, want) in cases {
            assert_eq!(port_protocol(name, None), Ok(want), "{name}");
        }
        assert_eq!(port_protocol("web", Some("grpc")), Ok(Protocol::Grpc));
        assert_eq!(port_protocol("http", Some("auto")), Ok(Protocol::Auto));
    }

    #[test]
    fn errors_name_the_file_field_and_value() {
        let cases = [
            ("services:\n- name: Bad\n  ports: [{name: http, port: 80}]\n", "services[0].name", "Bad"),
            ("services:\n- name: a\n  ports: [{name: http, port: 70000}]\n", "services[0].ports[0].port", "70000"),
            ("services:\n- name: a\n  ports: [{name: http, port: 80, protocol: smtp}]\n", "services[0].ports[0].protocol", "smtp"),
            (
                "services:\n- name: a\n  ports: [{name: http, port: 80}]\n  endpoints: [{address: here, serviceAccount: a}]\n",
                "services[0].endpoints[0].address",
                "here",
            ),
            ("services:\n- name: a\n  ports: []\n", "services[0].ports", "[]"),
        ];
        for (text, field, value) in cases {
            let err = parse(text).unwrap_err();
            assert!(
                err.contains("svc.yaml") && err.contains(field) && err.contains(value),
                "{err}"
            );
        }
    }

    #[test]
    fn a_headless_service_keeps_hostnames_and_ids_its_endpoints() {
        let d = parse(
            "services:\n- name: web\n  headless: true\n  ports: [{name: http, port: 8080}]\n  endpoints:\n  - {address: 127.1.0.7:15006, serviceAccount: web, hostname: web-0}\n  - {address: 127.1.0.8:15006, serviceAccount: web}\n",
        )
        .unwrap();
        let web = &d.services[0];
        assert!(web.headless);
        assert_eq!(web.endpoints[0].hostname.as_deref(), Some("web-0"));
        assert_eq!(web.endpoints[0].headless_id(), "web-0");
        let generated = web.endpoints[1].headless_id();
        assert!(
            generated.starts_with("ep.") && generated.len() == 19,
            "{generated}"
        );
        // Stable: the same address always gets the same id.
        assert_eq!(web.endpoints[1].clone().headless_id(), generated);
    }

    #[test]
    fn bad_headless_fields_are_rejected_by_field_and_value() {
        let headless = "services:\n- name: web\n  headless: true\n  ports: [{name: http, port: 8080}]\n  endpoints:\n";
        let cases = [
            (
                format!("{headless}  - {{address: 127.1.0.7:1, serviceAccount: web, hostname: Web_0}}\n"),
                "services[0].endpoints[0].hostname",
                "Web_0",
            ),
            (
                format!("{headless}  - {{address: 127.1.0.7:1, serviceAccount: web, hostname: web-0.east}}\n"),
                "services[0].endpoints[0].hostname",
                "web-0.east",
            ),
            (
                format!("{headless}  - {{address: 127.1.0.7:1, serviceAccount: web, hostname: web-0}}\n  - {{address: 127.1.0.8:1, serviceAccount: web, hostname: web-0}}\n"),
                "services[0].endpoints[1].hostname",
                "declared twice",
            ),
            (
                format!("{headless}  - {{address: 127.1.0.7:1, serviceAccount: web}}\n  - {{address: 127.1.0.7:1, serviceAccount: web}}\n"),
                "services[0].endpoints[1].address",
                "declared twice",
            ),
            (
                format!("{headless}  - {{address: 127.1.0.7:1, serviceAccount: web, labels: {{isthmus.io/endpoint: x}}}}\n"),
                "services[0].endpoints[0].labels",
                "reserved",
            ),
            (
                "services:\n- name: web\n  ports: [{name: http, port: 8080}]\n  endpoints:\n  - {address: 127.1.0.7:1, serviceAccount: web, hostname: web-0}\n".to_string(),
                "services[0].endpoints[0].hostname",
                "headless: true",
            ),
        ];
        for (text, field, needle) in cases {
            let err = parse(&text).unwrap_err();
            assert!(
                err.contains("svc.yaml") && err.contains(field) && err.contains(needle),
                "{err}"
            );
        }
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        let err = parse("services:\n- name: a\n  prots: []\n").unwrap_err();
        assert!(err.contains("prots"), "{err}");
    }

    #[test]
    fn duplicate_services_are_rejected() {
        let err = parse(
            "services:\n- name: a\n  ports: [{name: http, port: 80}]\n- name: a\n  ports: [{name: http, port: 80}]\n",
        )
        .unwrap_err();
        assert!(err.contains("declared twice"), "{err}");
    }
}
