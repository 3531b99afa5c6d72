//! Loading config files into validated structs.
//!
//! Each component declares a raw, serde-derived struct (with `deny_unknown_fields` and
//! defaults) and a validated struct built from it with [`TryFrom`], whose error is a
//! [`FieldError`] naming the field and the bad value. [`load_file`] ties the two together and
//! produces a [`ConfigError`] that also names the file, so every message tells the user
//! exactly what to fix: `config file east.yaml: field listen.dns: invalid value "x": ...`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

/// A validation failure inside one document: which field, which value, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub value: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(
        field: impl Into<String>,
        value: impl fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        FieldError {
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// Prefixes the field path (for errors from nested structs or list items).
    pub fn within(mut self, parent: impl fmt::Display) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "field {}: invalid value {:?}: {}",
            self.field, self.value, self.reason
        )
    }
}

impl std::error::Error for FieldError {}

/// Errors from loading a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: cannot be read")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: field {field}: {message}")]
    Parse {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("config file {path}: {error}")]
    Invalid { path: PathBuf, error: FieldError },
}

/// Reads `path` as YAML (JSON is YAML too) into `Raw`, then validates it into `T`.
pub fn load_file<Raw, T>(path: &Path) -> Result<T, ConfigError>
where
    Raw: DeserializeOwned,
    T: TryFrom<Raw, Error = FieldError>,
{
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    load_str::<Raw, T>(path, &text)
}

/// Like [`load_file`], for text already in memory (`path` is only used in messages).
pub fn load_str<Raw, T>(path: &Path, text: &str) -> Result<T, ConfigError>
where
    Raw: DeserializeOwned,
    T: TryFrom<Raw, Error = FieldError>,
{
    let raw = parse_yaml::<Raw>(text).map_err(|(field, message)| ConfigError::Parse {
        path: path.to_path_buf(),
        field,
        message,
    })?;
    T::try_from(raw).map_err(|error| ConfigError::Invalid {
        path: path.to_path_buf(),
        error,
    })
}

/// Parses YAML into `T`, returning the path of the offending field and serde's message.
pub fn parse_yaml<T: DeserializeOwned>(text: &str) -> Result<T, (String, String)> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." {
            "(document)".to_string()
        } else {
            field
        };
        (field, e.into_inner().to_string())
    })
}

/// Parses a socket address field (`ip:port`).
pub fn socket_addr(field: &str, value: &str) -> Result<SocketAddr, FieldError> {
    value.parse().map_err(|_| {
        FieldError::new(
            field,
            value,
            "expected an address as ip:port, e.g. 127.0.0.1:15012",
        )
    })
}

/// Checks a `host:port` field (an IP address or a DNS name such as a Kubernetes Service's,
/// and a port) and returns it as given.
pub fn host_port(field: &str, value: &str) -> Result<String, FieldError> {
    if value.parse::<SocketAddr>().is_ok() {
        return Ok(value.to_string());
    }
    let bad = |why: &str| FieldError::new(field, value, why.to_string());
    let (host, port) = value.rsplit_once(':').ok_or_else(|| {
        bad("expected host:port, e.g. 127.0.0.1:15012 or isthmus-control.isthmus-system.svc:15012")
    })?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?;
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(bad("the host must be an IP address or a DNS name"));
    }
    Ok(value.to_string())
}

/// Parses a duration field written as `250ms`, `5s`, `2m` or `1h`.
pub fn duration(field: &str, value: &str) -> Result<Duration, FieldError> {
    parse_duration(value).ok_or_else(|| {
        FieldError::new(
            field,
            value,
            "expected a duration such as 250ms, 5s, 2m or 1h",
        )
    })
}

/// Parses `250ms`, `5s`, `2m`, `1h` (a whole number and a unit).
pub fn parse_duration(value: &str) -> Option<Duration> {
    let value = value.trim();
    let split = value.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = value.split_at(split);
    let n: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(n.checked_mul(3600)?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[test]
    fn host_port_takes_ips_and_dns_names_and_names_what_is_wrong() {
        for good in [
            "127.0.0.1:15012",
            "[::1]:15012",
            "isthmus-control.isthmus-system.svc:15012",
            "control:1",
        ] {
            assert_eq!(host_port("control", good).unwrap(), good);
        }
        for (bad, why) in [
            ("isthmus-control", "host:port"),
            ("control:0", "port"),
            ("control:http", "port"),
            (":15012", "host"),
            ("bad_name.svc:15012", "host"),
            ("-x.svc:15012", "host"),
        ] {
            let e = host_port("control", bad).unwrap_err().to_string();
            assert!(
                e.contains("control") && e.contains(bad) && e.contains(why),
                "{e}"
            );
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct RawListen {
        dns: String,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Raw {
        cluster: String,
        listen: RawListen,
    }

    #[derive(Debug)]
    struct Valid {
        dns: SocketAddr,
    }

    impl TryFrom<Raw> for Valid {
        type Error = FieldError;
        fn try_from(raw: Raw) -> Result<Self, FieldError> {
            let _ = raw.cluster;
            Ok(Valid {
                dns: socket_addr("listen.dns", &raw.listen.dns)?,
            })
        }
    }

    fn load(text: &str) -> Result<Valid, ConfigError> {
        load_str::<Raw, Valid>(Path::new("east.yaml"), text)
    }

    #[test]
    fn invalid_value_names_file_field_and_value() {
        let err = load("cluster: east\nlisten:\n  dns: nowhere\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("east.yaml"), "{err}");
        assert!(err.contains("listen.dns"), "{err}");
        assert!(err.contains("\"nowhere\""), "{err}");
    }

    #[test]
    fn unknown_field_is_named_with_its_path() {
        let err = load("cluster: east\nlisten:\n  dns: 127.0.0.1:53\n  dsn: x\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("east.yaml") && err.contains("listen") && err.contains("dsn"),
            "{err}"
        );
    }

    #[test]
    fn wrong_type_is_named_with_its_path() {
        let err = load("cluster: [1]\nlisten: {dns: 127.0.0.1:53}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("field cluster"), "{err}");
    }

    #[test]
    fn valid_file_loads() {
        let v = load("cluster: east\nlisten: {dns: 127.0.0.1:5353}\n").unwrap();
        assert_eq!(v.dns.port(), 5353);
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        for bad in ["", "5", "s", "5x", "-1s", "1.5s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
