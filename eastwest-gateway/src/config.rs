//! The `isthmus gateway` daemon's config file (YAML), validated into [`GatewayConfig`];
//! errors name the file, the field and the bad value.
//!
//! ```yaml
//! cluster: east
//! control: 127.0.0.1:15012           # the cluster's control plane gRPC API
//! controlCa: ca.pem                  # the cluster CA (the control plane's <dataDir>/ca.pem)
//! token: "bootstrap-token"           # allowed isthmus-system/eastwest-gateway
//! listen: {quic: 0.0.0.0:15443, local: 0.0.0.0:15444, admin: 0.0.0.0:15020}
//! keepAlive: 250ms
//! idleTimeout: 1s
//! replicaSecretFile: /etc/isthmus/gateway-replicas   # optional: run as one of several replicas
//! ```
//!
//! With `replicaSecretFile` (64 hex digits: the secret every replica of this cluster's gateway
//! shares) the gateway shares its ports with the other replicas on the same addresses; see
//! `docs/gateway.md`, "Replicas".

use isthmus_core::admin::AdminListen;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use isthmus_core::attach::cluster_and_trust_domain;
use isthmus_core::config::{duration, host_port, socket_addr, ConfigError, FieldError};
use serde::Deserialize;

use crate::{ReplicaSet, SECRET_LEN};

/// The config file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawGatewayConfig {
    pub cluster: String,
    #[serde(default)]
    pub trust_domain: Option<String>,
    pub control: String,
    /// The cluster CA's PEM file (relative to this file): what the control-plane API's
    /// certificate must chain to.
    #[serde(default)]
    pub control_ca: Option<String>,
    pub token: String,
    #[serde(default)]
    pub listen: RawListen,
    #[serde(default = "default_keep_alive")]
    pub keep_alive: String,
    #[serde(default = "default_idle")]
    pub idle_timeout: String,
    #[serde(default)]
    pub replica_secret_file: Option<String>,
}

fn default_keep_alive() -> String {
    "250ms".into()
}
fn default_idle() -> String {
    "1s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawListen {
    #[serde(default = "default_quic")]
    pub quic: String,
    #[serde(default = "default_local")]
    pub local: String,
    #[serde(default = "default_admin")]
    pub admin: String,
    /// Serve the admin port's `/debug/config` beyond loopback clients.
    #[serde(default)]
    pub expose_debug: bool,
}

impl Default for RawListen {
    fn default() -> Self {
        RawListen {
            quic: default_quic(),
            local: default_local(),
            admin: default_admin(),
            expose_debug: false,
        }
    }
}
fn default_quic() -> String {
    "0.0.0.0:15443".into()
}
fn default_local() -> String {
    "0.0.0.0:15444".into()
}
fn default_admin() -> String {
    "0.0.0.0:15020".into()
}

/// The validated config.
#[derive(Debug)]
pub struct GatewayConfig {
    pub cluster: String,
    pub trust_domain: String,
    /// `host:port` of the control plane's gRPC API (an IP or a DNS name).
    pub control: String,
    /// `controlCa` as written (read at start, relative to the config file).
    pub control_ca: Option<String>,
    pub token: String,
    pub quic: SocketAddr,
    pub local: SocketAddr,
    pub admin: AdminListen,
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
    pub replica_secret_file: Option<std::path::PathBuf>,
}

impl TryFrom<RawGatewayConfig> for GatewayConfig {
    type Error = FieldError;
    fn try_from(raw: RawGatewayConfig) -> Result<Self, FieldError> {
        let trust_domain = cluster_and_trust_domain(&raw.cluster, raw.trust_domain)?;
        if raw.token.is_empty() {
            return Err(FieldError::new(
                "token",
                "",
                "the bootstrap token is required",
            ));
        }
        Ok(GatewayConfig {
            cluster: raw.cluster,
            trust_domain,
            control: host_port("control", &raw.control)?,
            control_ca: raw.control_ca,
            token: raw.token,
            quic: socket_addr("listen.quic", &raw.listen.quic)?,
            local: socket_addr("listen.local", &raw.listen.local)?,
            admin: AdminListen {
                addr: socket_addr("listen.admin", &raw.listen.admin)?,
                expose_debug: raw.listen.expose_debug,
            },
            keep_alive: duration("keepAlive", &raw.keep_alive)?,
            idle_timeout: duration("idleTimeout", &raw.idle_timeout)?,
            replica_secret_file: match raw.replica_secret_file {
                Some(p) if p.is_empty() => {
                    return Err(FieldError::new(
                        "replicaSecretFile",
                        "",
                        "must be a path (or left out)",
                    ))
                }
                other => other.map(Into::into),
            },
        })
    }
}

impl GatewayConfig {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        isthmus_core::config::load_file::<RawGatewayConfig, GatewayConfig>(path)
    }
}

/// Reads the replicas' shared secret: 64 hex digits (surrounding whitespace ignored).
pub fn read_replica_secret(path: &Path) -> Result<ReplicaSet, FieldError> {
    let field = |reason: String| FieldError::new("replicaSecretFile", path.display(), reason);
    let text = std::fs::read_to_string(path)
        .map_err(|e| field(format!("reading {} failed: {e}", path.display())))?;
    let text = text.trim();
    let bad = || {
        field(format!(
            "must hold {} hex digits, got {} characters",
            2 * SECRET_LEN,
            text.len()
        ))
    };
    if text.len() != 2 * SECRET_LEN || !text.is_ascii() {
        return Err(bad());
    }
    let bytes = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| bad())?;
    ReplicaSet::from_secret(&bytes).map_err(|e| field(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret_file(name: &str, text: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("isthmus-gw-secret-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_replica_secret_file_holds_64_hex_digits() {
        let good = secret_file("good", &format!("{}\n", "ab".repeat(32)));
        let set = read_replica_secret(&good).unwrap();
        assert_eq!(set.secret(), &[0xab; 32]);

        for (name, text, says) in [
            ("short", "abcd".to_string(), "got 4 characters"),
            ("not-hex", "zz".repeat(32), "hex digits"),
            ("zeros", "00".repeat(32), "all zeros"),
        ] {
            let path = secret_file(name, &text);
            let e = read_replica_secret(&path).unwrap_err().to_string();
            assert!(
                e.contains("replicaSecretFile") && e.contains(says),
                "{name}: {e}"
            );
            std::fs::remove_file(path).unwrap();
        }
        let e = read_replica_secret(Path::new("/nonexistent/isthmus-secret"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("reading /nonexistent/isthmus-secret"), "{e}");
        std::fs::remove_file(good).unwrap();
    }
}
