//! Operator contexts, as kubectl keeps them: one YAML file (`$ISTHMUS_CONFIG`, else
//! `$XDG_CONFIG_HOME/isthmus/config.yaml`, else `~/.config/isthmus/config.yaml`) with named
//! contexts — each a control plane's API address, the CA its certificate chains to, and the
//! operator credential presented to it — and the one in use.
//!
//! ```yaml
//! currentContext: demo-east
//! contexts:
//!   demo-east:
//!     control: "127.0.0.1:40123"
//!     caFile: /tmp/.../east/ca.pem
//!     certFile: /tmp/.../east/admin.pem      # isthmus credentials issue
//!     keyFile: /tmp/.../east/admin-key.pem
//! ```
//!
//! The CLI's `--context NAME` picks one for a command; `isthmus context use NAME` changes the
//! current one. Writers change only the contexts they own and keep every other one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::durable::{write_atomic, Access};

/// The environment variable that moves the file (tests point it at a temporary file).
pub const CONFIG_ENV: &str = "ISTHMUS_CONFIG";

/// Errors reading or writing the contexts file.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no context named {name:?} (contexts: {known})")]
    Unknown {
        path: PathBuf,
        name: String,
        known: String,
    },
    #[error("no home directory to keep operator contexts in: set ${CONFIG_ENV}")]
    NoHome,
}

/// The contexts file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Contexts {
    /// The context commands use when none is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// One control plane to talk to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Context {
    /// The control-plane API, `host:port`.
    pub control: String,
    /// The cluster CA's PEM file, which the API's certificate chains to.
    pub ca_file: PathBuf,
    /// The operator credential (certificate chain, PEM) presented to the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

/// Where the contexts file is, from the environment (`env` reads a variable).
pub fn config_path(env: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf, ContextError> {
    if let Some(path) = env(CONFIG_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let base = match env("XDG_CONFIG_HOME").filter(|p| !p.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env("HOME").ok_or(ContextError::NoHome)?).join(".config"),
    };
    Ok(base.join("isthmus").join("config.yaml"))
}

impl Contexts {
    /// Reads the file at `path`; a missing file is an empty one.
    pub fn load(path: &Path) -> Result<Self, ContextError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(ContextError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        crate::config::parse_yaml(&text).map_err(|(field, message)| ContextError::Parse {
            path: path.to_path_buf(),
            message: if field == "(document)" {
                message
            } else {
                format!("field {field}: {message}")
            },
        })
    }

    /// Writes the file atomically, readable by its owner only (it names credentials).
    pub fn save(&self, path: &Path) -> Result<(), ContextError> {
        let write = |source| ContextError::Write {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(write)?;
        }
        let text =
            serde_yaml::to_string(self).map_err(|e| write(std::io::Error::other(e.to_string())))?;
        write_atomic(path, text.as_bytes(), Access::Private).map_err(write)
    }

    /// The context named `name`, or the current one when `name` is `None`; `Ok(None)` when
    /// no name is given and none is current.
    pub fn select(
        &self,
        path: &Path,
        name: Option<&str>,
    ) -> Result<Option<&Context>, ContextError> {
        let Some(name) = name.or(self.current_context.as_deref()) else {
            return Ok(None);
        };
        self.contexts
            .get(name)
            .map(Some)
            .ok_or_else(|| ContextError::Unknown {
                path: path.to_path_buf(),
                name: name.to_string(),
                known: if self.contexts.is_empty() {
                    "none".to_string()
                } else {
                    self.contexts.keys().cloned().collect::<Vec<_>>().join(", ")
                },
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_file_is_found_as_kubectl_finds_its_own() {
        let at = |pairs: &[(&str, &str)]| config_path(&env(pairs)).unwrap();
        assert_eq!(
            at(&[(CONFIG_ENV, "/tmp/x.yaml"), ("HOME", "/home/a")]),
            PathBuf::from("/tmp/x.yaml")
        );
        assert_eq!(
            at(&[("XDG_CONFIG_HOME", "/cfg"), ("HOME", "/home/a")]),
            PathBuf::from("/cfg/isthmus/config.yaml")
        );
        assert_eq!(
            at(&[("HOME", "/home/a")]),
            PathBuf::from("/home/a/.config/isthmus/config.yaml")
        );
        assert!(matches!(config_path(&env(&[])), Err(ContextError::NoHome)));
    }

    #[test]
    fn contexts_round_trip_and_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.yaml");
        assert_eq!(Contexts::load(&path).unwrap(), Contexts::default());
        let mut c = Contexts::default();
        c.contexts.insert(
            "east".into(),
            Context {
                control: "127.0.0.1:1".into(),
                ca_file: "/ca.pem".into(),
                cert_file: Some("/admin.pem".into()),
                key_file: Some("/admin-key.pem".into()),
            },
        );
        c.current_context = Some("east".into());
        c.save(&path).unwrap();
        assert_eq!(Contexts::load(&path).unwrap(), c);
        assert_eq!(
            c.select(&path, None).unwrap().map(|x| x.control.as_str()),
            Some("127.0.0.1:1")
        );
        let err = c.select(&path, Some("west")).unwrap_err().to_string();
        assert!(err.contains("west") && err.contains("east"), "{err}");
    }

    #[test]
    fn a_malformed_file_names_the_file_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(
            &path,
            "contexts:\n  east: {control: a, caFile: b, extra: 1}\n",
        )
        .unwrap();
        let err = Contexts::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("config.yaml") && err.contains("extra"),
            "{err}"
        );
    }
}
