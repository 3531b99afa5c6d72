//! The `isthmus sidecar` daemon's config: from its file (YAML), validated into
//! [`SidecarConfig`] with errors that name the file, the field and the bad value; or, for a
//! sidecar the injection webhook put in a pod, from the pod ([`kubernetes_config`]).
//!
//! ```yaml
//! cluster: east
//! control: 127.0.0.1:15012
//! controlCa: ca.pem                # the cluster CA (the control plane's <dataDir>/ca.pem)
//! token: "bootstrap-token"
//! namespace: default
//! serviceAccount: sleep
//! labels: {app: sleep}             # for policy selectors
//! gateway: 127.0.0.1:15444         # the local east-west gateway's sidecar port
//! outbound: true                   # listen on every service's VIP
//! inbound:
//!   - {listen: 127.0.0.1:15006, forwardTo: 127.0.0.1:9080, protocol: http}
//! listen: {admin: 127.0.0.1:15020}
//! redirectOutbound: 127.0.0.1:15001  # Kubernetes: where `isthmus sidecar init` sends the
//! redirectInbound: 0.0.0.0:15006   # pod's outbound and inbound TCP
//! pathNormalization: MERGE_SLASHES  # Istio's modes: NONE, BASE, MERGE_SLASHES (default),
//!                                   # DECODE_AND_MERGE_SLASHES
//! ```

use isthmus_core::admin::AdminListen;
use isthmus_core::http_path::PathNormalization;
use std::net::SocketAddr;
use std::path::Path;

use isthmus_core::attach::{cluster_and_trust_domain, PODINFO_DIR, TOKEN_DIR};
use isthmus_core::client::Token;
use isthmus_core::config::{host_port, socket_addr, ConfigError, FieldError};
use isthmus_core::identity::{validate_label, SpiffeId};
use isthmus_core::mesh::Protocol;
use serde::Deserialize;

use crate::observe::AccessLogTarget;
use crate::InboundPort;

/// The config file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawSidecarConfig {
    pub cluster: String,
    #[serde(default)]
    pub trust_domain: Option<String>,
    pub control: String,
    /// The cluster CA's PEM file (relative to this file): what the control-plane API's
    /// certificate must chain to.
    #[serde(default)]
    pub control_ca: Option<String>,
    /// A bootstrap token; or `tokenFile`, read for every certificate request (a projected
    /// Kubernetes service-account token the control plane verifies with a TokenReview).
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_file: Option<String>,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub service_account: String,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub outbound: bool,
    #[serde(default)]
    pub inbound: Vec<RawInbound>,
    #[serde(default)]
    pub listen: RawListen,
    /// `off` (default), `stdout`, or a file path (appended to).
    #[serde(default)]
    pub access_log: Option<String>,
    /// Where connections redirected by `isthmus sidecar init` arrive (needs `outbound`).
    #[serde(default)]
    pub redirect_outbound: Option<String>,
    /// Where inbound connections redirected by `isthmus sidecar init` arrive.
    #[serde(default)]
    pub redirect_inbound: Option<String>,
    /// Istio's `pathNormalization`: `NONE`, `BASE`, `MERGE_SLASHES` (default) or
    /// `DECODE_AND_MERGE_SLASHES`.
    #[serde(default)]
    pub path_normalization: Option<String>,
}

fn default_namespace() -> String {
    "default".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawInbound {
    pub listen: String,
    pub forward_to: String,
    #[serde(default = "default_protocol")]
    pub protocol: String,
}

fn default_protocol() -> String {
    "tcp".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawListen {
    #[serde(default = "default_admin")]
    pub admin: String,
    /// Serve the admin port's `/debug/config` beyond loopback clients.
    #[serde(default)]
    pub expose_debug: bool,
}

impl Default for RawListen {
    fn default() -> Self {
        RawListen {
            admin: default_admin(),
            expose_debug: false,
        }
    }
}
fn default_admin() -> String {
    "127.0.0.1:15020".into()
}

/// The validated config.
#[derive(Debug)]
pub struct SidecarConfig {
    pub cluster: String,
    pub identity: SpiffeId,
    /// `host:port` of the control plane's gRPC API (an IP or a DNS name).
    pub control: String,
    /// `controlCa` as written (read at start, relative to the config file).
    pub control_ca: Option<String>,
    pub token: Token,
    pub gateway: Option<SocketAddr>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub outbound: bool,
    pub inbound: Vec<InboundPort>,
    pub admin: AdminListen,
    pub access_log: AccessLogTarget,
    pub redirect_outbound: Option<SocketAddr>,
    pub redirect_inbound: Option<SocketAddr>,
    pub path_normalization: PathNormalization,
}

impl TryFrom<RawSidecarConfig> for SidecarConfig {
    type Error = FieldError;
    fn try_from(raw: RawSidecarConfig) -> Result<Self, FieldError> {
        let trust_domain = cluster_and_trust_domain(&raw.cluster, raw.trust_domain)?;
        validate_label("namespace", &raw.namespace)
            .map_err(|e| FieldError::new("namespace", &raw.namespace, e.to_string()))?;
        validate_label("service account", &raw.service_account)
            .map_err(|e| FieldError::new("serviceAccount", &raw.service_account, e.to_string()))?;
        let mut inbound = Vec::new();
        for (i, p) in raw.inbound.iter().enumerate() {
            let protocol: Protocol = p.protocol.parse().map_err(|reason: String| {
                FieldError::new(format!("inbound[{i}].protocol"), &p.protocol, reason)
            })?;
            inbound.push(InboundPort {
                listen: socket_addr(&format!("inbound[{i}].listen"), &p.listen)?,
                forward_to: socket_addr(&format!("inbound[{i}].forwardTo"), &p.forward_to)?,
                protocol,
            });
        }
        let redirect_inbound = raw
            .redirect_inbound
            .as_deref()
            .map(|a| socket_addr("redirectInbound", a))
            .transpose()?;
        if !raw.outbound && inbound.is_empty() && redirect_inbound.is_none() {
            return Err(FieldError::new(
                "inbound",
                "[]",
                "a sidecar with outbound: false needs at least one inbound port",
            ));
        }
        let access_log = match raw.access_log.as_deref() {
            None | Some("off") => AccessLogTarget::Off,
            Some("stdout") => AccessLogTarget::Stdout,
            Some("") => {
                return Err(FieldError::new(
                    "accessLog",
                    "",
                    "expected off, stdout or a file path",
                ))
            }
            Some(path) => AccessLogTarget::File(path.into()),
        };
        let redirect_outbound = raw
            .redirect_outbound
            .as_deref()
            .map(|a| socket_addr("redirectOutbound", a))
            .transpose()?;
        if let Some(addr) = redirect_outbound.filter(|a| !a.ip().is_loopback()) {
            // The redirect delivers the pod's own connections to loopback; any other
            // address would also take connections from other pods, an open proxy that
            // re-originates them with this workload's identity.
            return Err(FieldError::new(
                "redirectOutbound",
                addr.to_string(),
                "must be a loopback address (127.0.0.1:15001): the redirect delivers the pod's own connections there, and any other address would let other pods use the sidecar as a proxy with this workload's identity",
            ));
        }
        if let (Some(addr), false) = (redirect_outbound, raw.outbound) {
            return Err(FieldError::new(
                "redirectOutbound",
                addr.to_string(),
                "redirected outbound traffic needs outbound: true",
            ));
        }
        let path_normalization = match raw.path_normalization.as_deref() {
            None => PathNormalization::default(),
            Some(mode) => mode
                .parse()
                .map_err(|reason: String| FieldError::new("pathNormalization", mode, reason))?,
        };
        Ok(SidecarConfig {
            path_normalization,
            redirect_outbound,
            redirect_inbound,
            identity: SpiffeId::new(&trust_domain, &raw.namespace, &raw.service_account),
            cluster: raw.cluster,
            control: host_port("control", &raw.control)?,
            control_ca: raw.control_ca,
            token: match (raw.token, raw.token_file) {
                (Some(t), None) => Token::Static(t),
                (None, Some(f)) => Token::File(f.into()),
                (Some(_), Some(f)) => {
                    return Err(FieldError::new("tokenFile", f, "give token or tokenFile, not both"))
                }
                (None, None) => {
                    return Err(FieldError::new(
                        "token",
                        "",
                        "a bootstrap token (token) or a service-account token file (tokenFile) is required",
                    ))
                }
            },
            gateway: raw
                .gateway
                .as_deref()
                .map(|g| socket_addr("gateway", g))
                .transpose()?,
            labels: raw.labels,
            outbound: raw.outbound,
            inbound,
            admin: AdminListen {
                addr: socket_addr("listen.admin", &raw.listen.admin)?,
                expose_debug: raw.listen.expose_debug,
            },
            access_log,
        })
    }
}

impl SidecarConfig {
    /// Reads and validates the config file at `path`; a `tokenFile` is relative to it.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config = isthmus_core::config::load_file::<RawSidecarConfig, SidecarConfig>(path)?;
        if let Token::File(file) = &mut config.token {
            *file = path.parent().unwrap_or(Path::new(".")).join(&*file);
        }
        Ok(config)
    }
}

/// The sidecar's settings in a pod the webhook injected, from its environment (`env`), its
/// labels as the downward API writes them (`labels`: `key="value"` lines) and the gateway
/// address once resolved: outbound and inbound traffic redirected by `isthmus sidecar
/// init` (15001, 15006), admin on 15020, and the projected service-account token as the
/// credential for its certificate. Returns the config and the control plane's CA (PEM).
pub fn kubernetes_config(
    env: &dyn Fn(&str) -> Option<String>,
    labels: &str,
    gateway: Option<SocketAddr>,
) -> Result<(SidecarConfig, String), FieldError> {
    let need = |name: &str| {
        env(name).filter(|v| !v.trim().is_empty()).ok_or_else(|| {
            FieldError::new(
                name,
                "",
                "required in the environment (the injection webhook sets it)",
            )
        })
    };
    let raw = RawSidecarConfig {
        cluster: need("ISTHMUS_CLUSTER")?,
        trust_domain: env("ISTHMUS_TRUST_DOMAIN").filter(|t| !t.is_empty()),
        control: need("ISTHMUS_CONTROL")?,
        control_ca: None,
        token: None,
        // The webhook's projected token; ISTHMUS_TOKEN_FILE moves it (tests, other layouts).
        token_file: Some(
            env("ISTHMUS_TOKEN_FILE").unwrap_or_else(|| format!("{}/token", TOKEN_DIR)),
        ),
        namespace: need("POD_NAMESPACE")?,
        service_account: need("SERVICE_ACCOUNT")?,
        gateway: gateway.map(|g| g.to_string()),
        labels: parse_downward_labels(labels)
            .map_err(|reason| FieldError::new(format!("{}/labels", PODINFO_DIR), labels, reason))?,
        outbound: true,
        inbound: Vec::new(),
        listen: RawListen {
            admin: "0.0.0.0:15020".into(),
            expose_debug: false,
        },
        access_log: None,
        redirect_outbound: Some("127.0.0.1:15001".into()),
        redirect_inbound: Some("0.0.0.0:15006".into()),
        path_normalization: env("ISTHMUS_PATH_NORMALIZATION").filter(|v| !v.is_empty()),
    };
    let ca_pem = need("ISTHMUS_CONTROL_CA")?;
    isthmus_core::api_tls::client_config(&ca_pem)
        .map_err(|e| FieldError::new("ISTHMUS_CONTROL_CA", "(PEM)", e.to_string()))?;
    Ok((SidecarConfig::try_from(raw)?, ca_pem))
}

/// Parses the downward API's `metadata.labels` file: one `key="value"` per line, the value
/// quoted as Go's `%q` does (which JSON string syntax reads for every label value).
pub fn parse_downward_labels(
    text: &str,
) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut labels = std::collections::BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (key, quoted) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: expected key=\"value\"", i + 1))?;
        let value: String = serde_json::from_str(quoted).map_err(|e| {
            format!(
                "line {}: the value of {key} is not a quoted string: {e}",
                i + 1
            )
        })?;
        labels.insert(key.to_string(), value);
    }
    Ok(labels)
}

#[cfg(test)]
mod kubernetes_tests {
    use super::*;

    fn env_of<'a>(pairs: &'a [(&'a str, String)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn downward_api_labels_are_read_with_their_quoting() {
        let labels = parse_downward_labels(
            "app=\"ratings\"\nversion=\"v1\"\nexample.com/note=\"a \\\"quoted\\\" word\"\n",
        )
        .unwrap();
        assert_eq!(labels["app"], "ratings");
        assert_eq!(labels["version"], "v1");
        assert_eq!(labels["example.com/note"], "a \"quoted\" word");
        assert!(parse_downward_labels("").unwrap().is_empty());
        let err = parse_downward_labels("app=ratings\n").unwrap_err();
        assert!(err.contains("line 1") && err.contains("app"), "{err}");
    }

    #[test]
    fn an_injected_sidecar_is_configured_from_its_pod() {
        let ca = isthmus_core::ca::CertificateAuthority::generate("east.isthmus.local").unwrap();
        let pairs = [
            ("ISTHMUS_CLUSTER", "east".to_string()),
            ("ISTHMUS_TRUST_DOMAIN", "east.isthmus.local".to_string()),
            (
                "ISTHMUS_CONTROL",
                "isthmus-control.isthmus-system.svc:15012".to_string(),
            ),
            ("ISTHMUS_CONTROL_CA", ca.cert_pem().to_string()),
            ("POD_NAMESPACE", "bookinfo".to_string()),
            ("SERVICE_ACCOUNT", "ratings".to_string()),
        ];
        let gateway: SocketAddr = "10.96.0.20:15444".parse().unwrap();
        let (config, ca_pem) =
            kubernetes_config(&env_of(&pairs), "app=\"ratings\"\n", Some(gateway)).unwrap();
        assert_eq!(ca_pem, ca.cert_pem());
        assert_eq!(
            config.identity.to_string(),
            "spiffe://east.isthmus.local/ns/bookinfo/sa/ratings"
        );
        assert_eq!(config.control, "isthmus-control.isthmus-system.svc:15012");
        assert_eq!(
            config.token,
            Token::File("/var/run/secrets/isthmus/token".into())
        );
        assert_eq!(config.gateway, Some(gateway));
        assert_eq!(config.labels["app"], "ratings");
        assert!(config.outbound);
        assert_eq!(
            config.redirect_outbound,
            Some("127.0.0.1:15001".parse().unwrap())
        );
        assert_eq!(
            config.redirect_inbound,
            Some("0.0.0.0:15006".parse().unwrap())
        );

        // Each missing or bad variable is named.
        for (drop, named) in [
            ("ISTHMUS_CLUSTER", "ISTHMUS_CLUSTER"),
            ("SERVICE_ACCOUNT", "SERVICE_ACCOUNT"),
            ("ISTHMUS_CONTROL_CA", "ISTHMUS_CONTROL_CA"),
        ] {
            let fewer: Vec<(&str, String)> =
                pairs.iter().filter(|(k, _)| *k != drop).cloned().collect();
            let err = kubernetes_config(&env_of(&fewer), "", None)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(named), "{err}");
        }
        let mut bad = pairs.to_vec();
        bad[3].1 = "not a certificate".into();
        let err = kubernetes_config(&env_of(&bad), "", None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("ISTHMUS_CONTROL_CA"), "{err}");
    }

    #[test]
    fn redirected_outbound_listens_on_loopback_only() {
        let config = |addr: &str| {
            let yaml = format!(
                "cluster: east\nserviceAccount: sleep\ncontrol: 127.0.0.1:15012\ntoken: t\noutbound: true\nredirectOutbound: \"{addr}\"\n"
            );
            isthmus_core::config::load_str::<RawSidecarConfig, SidecarConfig>(
                Path::new("sleep.yaml"),
                &yaml,
            )
        };
        config("127.0.0.1:15001").unwrap();
        assert!(config("[::1]:15001").is_ok());
        let err = isthmus_core::config::load_str::<RawSidecarConfig, SidecarConfig>(
            Path::new("sleep.yaml"),
            "cluster: east\nserviceAccount: sleep\ncontrol: 127.0.0.1:15012\ntoken: t\noutbound: true\npathNormalization: merge\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("pathNormalization") && err.contains("MERGE_SLASHES"),
            "{err}"
        );
        for open in ["0.0.0.0:15001", "10.0.0.7:15001", "[::]:15001"] {
            let err = config(open).unwrap_err().to_string();
            assert!(
                err.contains("redirectOutbound") && err.contains("loopback"),
                "{open}: {err}"
            );
        }
    }
}
