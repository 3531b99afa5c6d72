//! Mesh-wide policies: the documents users apply with `isthmus apply -f`.
//!
//! Istio's `VirtualService`, `DestinationRule`, `AuthorizationPolicy`, `PeerAuthentication` and
//! `RequestAuthentication` are accepted as Istio's documentation writes them. Parsing is two passes: the structure
//! (unknown fields rejected by name), then the meaning ([`validate`]: weights, regexes,
//! durations, enumerations). Every error names the file, the document (1-based) and the field
//! path, and a file with any bad document is refused whole.

pub mod isthmus;
pub mod networking;
pub mod security;
mod validate;

use std::fmt;

use serde::{Deserialize, Serialize};

use networking::{DestinationRuleSpec, VirtualServiceSpec};
use security::{AuthorizationPolicySpec, PeerAuthenticationSpec, RequestAuthenticationSpec};

pub use validate::{claim_path, parse_duration_istio, resolve_host};

/// The kinds of policy Isthmus stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    VirtualService,
    DestinationRule,
    AuthorizationPolicy,
    PeerAuthentication,
    RequestAuthentication,
    RateLimitPolicy,
    FailoverPolicy,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
        Kind::RequestAuthentication,
        Kind::RateLimitPolicy,
        Kind::FailoverPolicy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::RequestAuthentication => "RequestAuthentication",
            Kind::RateLimitPolicy => "RateLimitPolicy",
            Kind::FailoverPolicy => "FailoverPolicy",
        }
    }

    /// The API versions accepted for this kind.
    pub fn api_versions(self) -> &'static [&'static str] {
        match self {
            Kind::VirtualService | Kind::DestinationRule => &[
                "networking.istio.io/v1",
                "networking.istio.io/v1beta1",
                "networking.istio.io/v1alpha3",
            ],
            Kind::RateLimitPolicy | Kind::FailoverPolicy => &["isthmus.io/v1alpha1"],
            Kind::AuthorizationPolicy | Kind::PeerAuthentication | Kind::RequestAuthentication => {
                &["security.istio.io/v1", "security.istio.io/v1beta1"]
            }
        }
    }

    /// Parses a kind name as written in `kind:` (or its lowercase / plural CLI spelling).
    pub fn parse(s: &str) -> Option<Kind> {
        let lower = s.to_ascii_lowercase();
        Kind::ALL.into_iter().find(|k| {
            let name = k.as_str().to_ascii_lowercase();
            let plural = match name.strip_suffix('y') {
                Some(stem) => format!("{stem}ies"),
                None => format!("{name}s"),
            };
            lower == name || lower == plural
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy's specification, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    VirtualService(VirtualServiceSpec),
    DestinationRule(Box<DestinationRuleSpec>),
    AuthorizationPolicy(AuthorizationPolicySpec),
    PeerAuthentication(PeerAuthenticationSpec),
    RequestAuthentication(RequestAuthenticationSpec),
    RateLimitPolicy(isthmus::RateLimitPolicySpec),
    FailoverPolicy(isthmus::FailoverPolicySpec),
}

/// One validated policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub api_version: String,
    pub name: String,
    pub namespace: String,
    pub spec: Spec,
}

impl Policy {
    pub fn kind(&self) -> Kind {
        match self.spec {
            Spec::VirtualService(_) => Kind::VirtualService,
            Spec::DestinationRule(_) => Kind::DestinationRule,
            Spec::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Spec::PeerAuthentication(_) => Kind::PeerAuthentication,
            Spec::RequestAuthentication(_) => Kind::RequestAuthentication,
            Spec::RateLimitPolicy(_) => Kind::RateLimitPolicy,
            Spec::FailoverPolicy(_) => Kind::FailoverPolicy,
        }
    }

    /// The federation store key: `policies/<kind>/<namespace>/<name>`.
    pub fn store_key(&self) -> String {
        store_key(self.kind(), &self.namespace, &self.name)
    }

    /// The document as JSON in Kubernetes shape (`apiVersion`, `kind`, `metadata`, `spec`).
    pub fn to_json(&self) -> serde_json::Value {
        let spec = match &self.spec {
            Spec::VirtualService(s) => serde_json::to_value(s),
            Spec::DestinationRule(s) => serde_json::to_value(s),
            Spec::AuthorizationPolicy(s) => serde_json::to_value(s),
            Spec::PeerAuthentication(s) => serde_json::to_value(s),
            Spec::RequestAuthentication(s) => serde_json::to_value(s),
            Spec::RateLimitPolicy(s) => serde_json::to_value(s),
            Spec::FailoverPolicy(s) => serde_json::to_value(s),
        }
        .unwrap_or(serde_json::Value::Null);
        serde_json::json!({
            "apiVersion": self.api_version,
            "kind": self.kind().as_str(),
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": spec,
        })
    }

    /// Parses one stored (JSON) document, validating it again.
    pub fn from_json(json: &[u8]) -> Result<Policy, PolicyError> {
        Self::from_json_at("(stored)", 1, json)
    }

    /// Parses one JSON document received from `source` at position `document` (1-based),
    /// validating it; errors name that source and position.
    pub fn from_json_at(source: &str, document: usize, json: &[u8]) -> Result<Policy, PolicyError> {
        let value: serde_yaml::Value = serde_json::from_slice(json)
            .map_err(|e| PolicyError::new(source, document, "(document)", e.to_string()))?;
        parse_value(source, document, value)
    }
}

impl Serialize for Policy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Policy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        let bytes = serde_json::to_vec(&value).map_err(serde::de::Error::custom)?;
        Policy::from_json(&bytes).map_err(serde::de::Error::custom)
    }
}

/// The store key of a policy.
pub fn store_key(kind: Kind, namespace: &str, name: &str) -> String {
    crate::keyspace::policy(kind.as_str(), namespace, name)
}

/// The store prefix under which every policy lives.
pub const STORE_PREFIX: &str = crate::keyspace::POLICIES_PREFIX;

/// A document that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: document {document}{what}: field {field}: {message}")]
pub struct PolicyError {
    pub file: String,
    /// 1-based position of the document in the file.
    pub document: usize,
    /// ` (Kind namespace/name)` when known.
    pub what: String,
    pub field: String,
    pub message: String,
}

impl PolicyError {
    fn new(
        file: &str,
        document: usize,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        PolicyError {
            file: file.to_string(),
            document,
            what: String::new(),
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Envelope {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: serde_yaml::Value,
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
}

fn default_namespace() -> String {
    "default".to_string()
}

/// Parses every document of a multi-document YAML file. `file` is used in messages only.
/// Empty documents (e.g. a trailing `---`) are skipped.
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<Policy>, PolicyError> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let value = serde_yaml::Value::deserialize(de).map_err(|e| {
            PolicyError::new(file, document, "(document)", format!("not valid YAML: {e}"))
        })?;
        if value.is_null() {
            continue;
        }
        out.push(parse_value(file, document, value)?);
    }
    Ok(out)
}

fn parse_value(
    file: &str,
    document: usize,
    value: serde_yaml::Value,
) -> Result<Policy, PolicyError> {
    let envelope: Envelope = serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        PolicyError::new(
            file,
            document,
            if field == "." {
                "(document)".into()
            } else {
                field
            },
            e.into_inner().to_string(),
        )
    })?;
    let kind = Kind::ALL
        .into_iter()
        .find(|k| k.as_str() == envelope.kind)
        .ok_or_else(|| {
            PolicyError::new(
                file,
                document,
                "kind",
                format!(
                    "unsupported kind {:?} (supported: VirtualService, DestinationRule, AuthorizationPolicy, PeerAuthentication, RequestAuthentication, RateLimitPolicy, FailoverPolicy)",
                    envelope.kind
                ),
            )
        })?;
    let what = format!(
        " ({} {}/{})",
        kind, envelope.metadata.namespace, envelope.metadata.name
    );
    let err = |field: String, message: String| PolicyError {
        file: file.to_string(),
        document,
        what: what.clone(),
        field,
        message,
    };
    if !kind.api_versions().contains(&envelope.api_version.as_str()) {
        return Err(err(
            "apiVersion".into(),
            format!(
                "{:?} is not an API version of {kind} (use one of {})",
                envelope.api_version,
                kind.api_versions().join(", ")
            ),
        ));
    }
    for (field, value) in [
        ("metadata.name", &envelope.metadata.name),
        ("metadata.namespace", &envelope.metadata.namespace),
    ] {
        if let Err(e) = crate::identity::validate_label(field, value) {
            return Err(err(field.into(), e.to_string()));
        }
    }
    fn typed<T: serde::de::DeserializeOwned>(
        spec: serde_yaml::Value,
    ) -> Result<T, (String, String)> {
        serde_path_to_error::deserialize(spec).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "spec".to_string()
            } else {
                format!("spec.{path}")
            };
            (field, e.into_inner().to_string())
        })
    }
    let spec = match kind {
        Kind::VirtualService => typed(envelope.spec).map(Spec::VirtualService),
        Kind::DestinationRule => typed(envelope.spec).map(|s| Spec::DestinationRule(Box::new(s))),
        Kind::AuthorizationPolicy => typed(envelope.spec).map(Spec::AuthorizationPolicy),
        Kind::PeerAuthentication => typed(envelope.spec).map(Spec::PeerAuthentication),
        Kind::RequestAuthentication => typed(envelope.spec).map(Spec::RequestAuthentication),
        Kind::RateLimitPolicy => typed(envelope.spec).map(Spec::RateLimitPolicy),
        Kind::FailoverPolicy => typed(envelope.spec).map(Spec::FailoverPolicy),
    }
    .map_err(|(field, message)| err(field, message))?;
    let policy = Policy {
        api_version: envelope.api_version,
        name: envelope.metadata.name,
        namespace: envelope.metadata.namespace,
        spec,
    };
    validate::validate(&policy).map_err(|(field, message)| err(field, message))?;
    Ok(policy)
}

#[cfg(test)]
mod tests;
