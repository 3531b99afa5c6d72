//! The control plane's discovery file (`discovery: {file: ...}`), built in code:
//!
//! ```
//! use isthmus_testkit::discovery::{Discovery, Service};
//! let yaml = Discovery::new()
//!     .service(Service::new("ratings").export().port("http", 9080).endpoint("127.0.0.1:7000", "ratings"))
//!     .yaml();
//! assert!(yaml.contains("ratings"));
//! assert_eq!(Discovery::new().yaml(), "services: []\n");
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

/// A discovery file: the services this cluster runs.
#[derive(Debug, Default, Serialize)]
pub struct Discovery {
    services: Vec<Service>,
}

/// One service of a discovery file (namespace `default` unless set).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    name: String,
    namespace: String,
    export: bool,
    headless: bool,
    ports: Vec<Port>,
    endpoints: Vec<Endpoint>,
}

#[derive(Debug, Serialize)]
struct Port {
    name: String,
    port: u16,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Endpoint {
    address: String,
    service_account: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    healthy: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    hostname: Option<String>,
}

impl Discovery {
    /// A file with no services (`services: []`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a service.
    pub fn service(mut self, service: Service) -> Self {
        self.services.push(service);
        self
    }

    /// The file's YAML.
    pub fn yaml(&self) -> String {
        if self.services.is_empty() {
            return "services: []\n".to_string();
        }
        serde_yaml::to_string(self).expect("a discovery file serializes")
    }

    /// Writes the file at `path` (replacing it: the control plane picks the change up at its
    /// next poll).
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.yaml())
            .unwrap_or_else(|e| panic!("writing the discovery file {}: {e}", path.display()));
    }
}

impl Service {
    /// Service `name` in namespace `default`, not exported, no ports, no endpoints.
    pub fn new(name: &str) -> Self {
        Service {
            name: name.into(),
            namespace: "default".into(),
            export: false,
            headless: false,
            ports: Vec::new(),
            endpoints: Vec::new(),
        }
    }

    /// In namespace `namespace`.
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Exported to the federation.
    pub fn export(mut self) -> Self {
        self.export = true;
        self
    }

    /// Headless: each endpoint gets an address of its own.
    pub fn headless(mut self) -> Self {
        self.headless = true;
        self
    }

    /// A port (protocol from its name, as in the file).
    pub fn port(mut self, name: &str, port: u16) -> Self {
        self.ports.push(Port {
            name: name.into(),
            port,
        });
        self
    }

    /// A healthy endpoint at `address` running as `service_account`.
    pub fn endpoint(self, address: &str, service_account: &str) -> Self {
        self.endpoint_with(address, service_account, None, &[])
    }

    /// A healthy endpoint with a hostname (headless services name it) and labels.
    pub fn endpoint_with(
        mut self,
        address: &str,
        service_account: &str,
        hostname: Option<&str>,
        labels: &[(&str, &str)],
    ) -> Self {
        self.endpoints.push(Endpoint {
            address: address.into(),
            service_account: service_account.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            healthy: true,
            hostname: hostname.map(Into::into),
        });
        self
    }
}
