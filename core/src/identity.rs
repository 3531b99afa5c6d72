//! Cluster names and SPIFFE identities.
//!
//! A workload identity is `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`; each
//! cluster has its own trust domain, by default `<cluster>.isthmus.local`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The namespace Isthmus's own components run in.
pub const SYSTEM_NAMESPACE: &str = "isthmus-system";
/// The service account of east-west gateways.
pub const GATEWAY_SERVICE_ACCOUNT: &str = "eastwest-gateway";
/// The service account of control planes.
pub const CONTROL_SERVICE_ACCOUNT: &str = "control";

/// Errors from parsing names and identities.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("{what} {value:?} is not a valid DNS label (lowercase letters, digits and '-', 1 to 63 characters, starting and ending with a letter or digit)")]
    InvalidLabel { what: &'static str, value: String },
    #[error("{value:?} is not a SPIFFE ID: {reason}")]
    InvalidSpiffeId { value: String, reason: &'static str },
}

/// Checks a Kubernetes-style DNS label (RFC 1123): cluster, namespace and service names.
pub fn validate_label(what: &'static str, value: &str) -> Result<(), IdentityError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(IdentityError::InvalidLabel {
            what,
            value: value.to_string(),
        })
    }
}

/// The default trust domain of a cluster.
pub fn default_trust_domain(cluster: &str) -> String {
    format!("{cluster}.isthmus.local")
}

/// A SPIFFE ID of the form `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// A workload identity.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        SpiffeId {
            trust_domain: trust_domain.to_ascii_lowercase(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }

    /// The identity of a cluster's east-west gateways.
    pub fn gateway(trust_domain: &str) -> Self {
        Self::new(trust_domain, SYSTEM_NAMESPACE, GATEWAY_SERVICE_ACCOUNT)
    }

    /// The identity of a cluster's DNS proxies.
    pub fn dns(trust_domain: &str) -> Self {
        Self::new(trust_domain, SYSTEM_NAMESPACE, DNS_SERVICE_ACCOUNT)
    }

    /// The identity of a cluster's control plane.
    pub fn control(trust_domain: &str) -> Self {
        Self::new(trust_domain, SYSTEM_NAMESPACE, CONTROL_SERVICE_ACCOUNT)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// Checks that the namespace is a Kubernetes namespace name (an RFC 1123 label) and the
    /// service account a Kubernetes service-account name (an RFC 1123 subdomain: lowercase
    /// letters, digits, '-' and '.', at most 253 characters), as the identities `Sign` issues
    /// must be.
    pub fn check_kubernetes_names(&self) -> Result<(), IdentityError> {
        validate_label("namespace", &self.namespace)?;
        let sa = &self.service_account;
        let ok = sa.len() <= 253
            && sa
                .split('.')
                .all(|part| validate_label("service account", part).is_ok());
        if ok {
            Ok(())
        } else {
            Err(IdentityError::InvalidLabel {
                what: "service account",
                value: sa.clone(),
            })
        }
    }

    /// Whether this is the control-plane identity of some trust domain.
    pub fn is_control(&self) -> bool {
        self.namespace == SYSTEM_NAMESPACE && self.service_account == CONTROL_SERVICE_ACCOUNT
    }

    /// Whether this is the gateway identity of some trust domain.
    pub fn is_gateway(&self) -> bool {
        self.namespace == SYSTEM_NAMESPACE && self.service_account == GATEWAY_SERVICE_ACCOUNT
    }

    /// Whether this is the DNS-proxy identity of some trust domain.
    pub fn is_dns(&self) -> bool {
        self.namespace == SYSTEM_NAMESPACE && self.service_account == DNS_SERVICE_ACCOUNT
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Splits `spiffe://<trust-domain>/<path>` into its checked trust domain and its path.
/// Checks a trust domain as a SPIFFE ID spells it (lowercase letters, digits, '-', '.').
pub fn validate_trust_domain(trust_domain: &str) -> Result<(), IdentityError> {
    split_spiffe(&format!("spiffe://{trust_domain}/")).map(|_| ())
}

fn split_spiffe(s: &str) -> Result<(&str, &str), IdentityError> {
    let bad = |reason| IdentityError::InvalidSpiffeId {
        value: s.to_string(),
        reason,
    };
    let rest = s
        .strip_prefix("spiffe://")
        .ok_or_else(|| bad("it must start with spiffe://"))?;
    let (td, path) = rest.split_once('/').ok_or_else(|| bad("it has no path"))?;
    if td.is_empty()
        || !td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Err(bad(
            "the trust domain must be lowercase letters, digits, '-' and '.'",
        ));
    }
    Ok((td, path))
}

impl FromStr for SpiffeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| IdentityError::InvalidSpiffeId {
            value: s.to_string(),
            reason,
        };
        let (td, path) = split_spiffe(s)?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] if !ns.is_empty() && !sa.is_empty() => {
                Ok(SpiffeId::new(td, ns, sa))
            }
            _ => Err(bad("the path must be /ns/<namespace>/sa/<service-account>")),
        }
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = IdentityError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.to_string()
    }
}

/// The service account of DNS proxies.
pub const DNS_SERVICE_ACCOUNT: &str = "dns";

/// An operator's role, certified by the CA that issued the operator's credential
/// (docs/security.md §3, §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Reads: `get`, `status`, `explain`.
    Viewer,
    /// Reads and writes of this cluster's own records; with a mesh-admin grant, the mesh.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        }
    }
}

impl FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "admin" => Ok(Role::Admin),
            _ => Err(IdentityError::InvalidSpiffeId {
                value: s.to_string(),
                reason: "an operator role is viewer or admin",
            }),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An operator identity, `spiffe://<trust-domain>/operator/<role>/<name>`: a person or a
/// tool using the CLI or the Terraform provider. It can never be a workload identity (whose
/// path is `/ns/<ns>/sa/<sa>`), so `Sign` cannot issue one and the data plane never accepts
/// one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OperatorId {
    trust_domain: String,
    role: Role,
    name: String,
}

impl OperatorId {
    /// An operator identity; `name` must be a DNS label.
    pub fn new(trust_domain: &str, role: Role, name: &str) -> Result<Self, IdentityError> {
        validate_label("operator name", name)?;
        Ok(OperatorId {
            trust_domain: trust_domain.to_ascii_lowercase(),
            role,
            name: name.to_string(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for OperatorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/operator/{}/{}",
            self.trust_domain, self.role, self.name
        )
    }
}

/// Whoever presented a verified certificate to the control-plane API: a workload-form
/// identity (workloads, gateways, DNS proxies, control planes) or an operator.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    Workload(SpiffeId),
    Operator(OperatorId),
}

impl Principal {
    pub fn trust_domain(&self) -> &str {
        match self {
            Principal::Workload(id) => id.trust_domain(),
            Principal::Operator(op) => op.trust_domain(),
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Workload(id) => id.fmt(f),
            Principal::Operator(op) => op.fmt(f),
        }
    }
}

impl FromStr for Principal {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (td, path) = split_spiffe(s)?;
        match path.split('/').collect::<Vec<_>>().as_slice() {
            ["operator", role, name] => Ok(Principal::Operator(OperatorId::new(
                td,
                role.parse()?,
                name,
            )?)),
            _ => s.parse().map(Principal::Workload),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_id_round_trips_through_text() {
        let id: SpiffeId = "spiffe://east.isthmus.local/ns/default/sa/ratings"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "east.isthmus.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "ratings");
        assert_eq!(
            id.to_string(),
            "spiffe://east.isthmus.local/ns/default/sa/ratings"
        );
    }

    #[test]
    fn spiffe_id_rejects_malformed_text_with_a_reason() {
        for bad in [
            "http://east/ns/a/sa/b",
            "spiffe://east",
            "spiffe://East/ns/a/sa/b",
            "spiffe://east/ns/a",
            "spiffe://east/ns//sa/b",
            "spiffe://east/ns/a/sa/b/c",
        ] {
            let err = bad.parse::<SpiffeId>().unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn gateway_identity_is_recognised() {
        assert!(SpiffeId::gateway("west.isthmus.local").is_gateway());
        assert!(!SpiffeId::new("west.isthmus.local", "default", "x").is_gateway());
    }

    #[test]
    fn labels_follow_rfc1123() {
        assert!(validate_label("cluster", "east-1").is_ok());
        for bad in ["", "East", "-a", "a-", "a_b", &"a".repeat(64)] {
            assert!(validate_label("cluster", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn principals_parse_operators_and_workloads_apart() {
        let op: Principal = "spiffe://east.isthmus.local/operator/admin/alice"
            .parse()
            .unwrap();
        let Principal::Operator(op) = op else {
            panic!("not an operator")
        };
        assert_eq!(op.trust_domain(), "east.isthmus.local");
        assert_eq!(op.role(), Role::Admin);
        assert_eq!(op.name(), "alice");
        assert_eq!(
            op.to_string(),
            "spiffe://east.isthmus.local/operator/admin/alice"
        );
        let w: Principal = "spiffe://east.isthmus.local/ns/default/sa/ratings"
            .parse()
            .unwrap();
        assert!(matches!(w, Principal::Workload(_)));
        // An operator path is never a workload identity, and odd roles or names are refused.
        assert!("spiffe://east.isthmus.local/operator/admin/alice"
            .parse::<SpiffeId>()
            .is_err());
        for bad in [
            "spiffe://east.isthmus.local/operator/root/alice",
            "spiffe://east.isthmus.local/operator/admin/Alice",
            "spiffe://east.isthmus.local/operator/admin",
            "spiffe://East/operator/admin/alice",
            "spiffe://east.isthmus.local/operator/admin/alice/x",
        ] {
            assert!(bad.parse::<Principal>().is_err(), "{bad}");
        }
    }
}
