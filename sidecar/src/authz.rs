//! Inbound authorization: Istio's `AuthorizationPolicy` and `PeerAuthentication`, evaluated
//! for the workload behind this sidecar.
//!
//! Pure. Istio's order: a matching DENY policy denies; otherwise, when no ALLOW policy applies
//! to the workload the request is allowed, else it is allowed only if an ALLOW policy
//! matches. A policy applies when it is in the workload's namespace (or the mesh's root
//! namespace, `isthmus-system`) and its selector's labels are all on the workload. A rule
//! matches when its `from`, `to` and `when` all match (empty means "any"). Principals are
//! SPIFFE IDs without the scheme (`east.isthmus.local/ns/default/sa/sleep`); `*` may stand
//! for a prefix or a suffix of principals, paths and header values. A principal written with
//! Istio's `cluster.local` trust domain names that namespace and service account in every
//! member cluster ([`principal_matches`]). End users (`requestPrincipals`, `request.auth.*`)
//! are those a RequestAuthentication verified ([`crate::authn`]): `<iss>/<sub>`, claims by
//! name (`request.auth.claims[groups]`, nested `[a][b]`; a list claim matches when any item
//! does).

use std::collections::BTreeMap;

use http::HeaderMap;
use isthmus_core::identity::{SpiffeId, SYSTEM_NAMESPACE};
use isthmus_core::mesh::MeshConfig;
use isthmus_core::policy::security::{AuthorizationPolicySpec, Rule, WorkloadSelector};
use isthmus_core::policy::Spec;

/// The workload an inbound sidecar protects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// What is known of an inbound request. HTTP fields are None for opaque TCP.
pub struct Inbound<'a> {
    /// The caller's verified identity; None for plaintext (PERMISSIVE) connections.
    pub caller: Option<&'a SpiffeId>,
    pub port: u16,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    pub headers: Option<&'a HeaderMap>,
    /// The end user, when a RequestAuthentication verified a token ([`crate::authn`]).
    pub auth: Option<&'a isthmus_core::jwt::Verified>,
}

/// The verdict, with the policy that decided it (for logs and the 403 body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny(String),
}

/// Whether a policy in `policy_ns` with `selector` applies to workload `w`.
pub(crate) fn applies(selector: Option<&WorkloadSelector>, policy_ns: &str, w: &Workload) -> bool {
    (policy_ns == w.namespace || policy_ns == SYSTEM_NAMESPACE)
        && selector.is_none_or(|s| {
            s.match_labels
                .iter()
                .all(|(k, v)| w.labels.get(k) == Some(v))
        })
}

/// `*` as a whole value, a prefix (`/api/*`) or a suffix (`*.isthmus.local/ns/x/sa/y`).
fn glob(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

/// `include` must match one of `values` when non-empty; `exclude` must match none, by
/// `matches(pattern, value)`. No value matches nothing.
fn field_with<'v>(
    include: &[String],
    exclude: &[String],
    values: impl IntoIterator<Item = &'v str> + Clone,
    matches: impl Fn(&str, &str) -> bool,
) -> bool {
    let any = |patterns: &[String]| {
        values
            .clone()
            .into_iter()
            .any(|v| patterns.iter().any(|p| matches(p, v)))
    };
    (include.is_empty() || any(include)) && !any(exclude)
}

/// [`field_with`] for one value, by [`glob`].
fn field(include: &[String], exclude: &[String], value: Option<&str>) -> bool {
    field_with(include, exclude, value, glob)
}

fn principal(caller: Option<&SpiffeId>) -> Option<String> {
    caller.map(|c| c.to_string().trim_start_matches("spiffe://").to_string())
}

/// Istio's name for the mesh's own trust domain, as nearly every Istio policy writes it.
pub const MESH_TRUST_DOMAIN: &str = "cluster.local";

/// Whether principal `pattern` names caller `value` (`<trust domain>/ns/<ns>/sa/<sa>`).
///
/// Istio reads `cluster.local` in a principal as "the mesh's trust domain". A federation has
/// one trust domain per member cluster, so here it stands for each of them (`members`):
/// `cluster.local/ns/X/sa/Y` names service account Y of namespace X in every member cluster,
/// as Istio multicluster's namespace sameness has it, while `<trust domain>/ns/X/sa/Y` names
/// one cluster's only. A caller from a trust domain that is not a member's never matches it.
pub fn principal_matches(pattern: &str, value: &str, members: &[&str]) -> bool {
    let Some(rest) = pattern
        .strip_prefix(MESH_TRUST_DOMAIN)
        .and_then(|r| r.strip_prefix('/'))
    else {
        return glob(pattern, value);
    };
    value
        .split_once('/')
        .is_some_and(|(td, path)| members.contains(&td) && glob(rest, path))
}

fn rule_matches(rule: &Rule, req: &Inbound<'_>, members: &[&str]) -> bool {
    // Principals: `cluster.local` read as [`principal_matches`] does.
    let principal_field = |include: &[String], exclude: &[String], value: Option<&str>| {
        field_with(include, exclude, value, |p, v| {
            principal_matches(p, v, members)
        })
    };
    let principal = principal(req.caller);
    let request_principal = req.auth.map(|a| a.principal());
    let namespace = req.caller.map(|c| c.namespace().to_string());
    let from = rule.from.is_empty()
        || rule.from.iter().any(|f| {
            let s = &f.source;
            principal_field(&s.principals, &s.not_principals, principal.as_deref())
                && field(&s.namespaces, &s.not_namespaces, namespace.as_deref())
                && field(
                    &s.request_principals,
                    &s.not_request_principals,
                    request_principal.as_deref(),
                )
        });
    let port = req.port.to_string();
    let to = rule.to.is_empty()
        || rule.to.iter().any(|t| {
            let o = &t.operation;
            field(&o.methods, &o.not_methods, req.method)
                && field(&o.paths, &o.not_paths, req.path)
                && (o.ports.is_empty() || o.ports.contains(&port))
        });
    let when = rule.when.iter().all(|c| {
        let value: Option<String> = match c.key.as_str() {
            "source.principal" => {
                return principal_field(&c.values, &c.not_values, principal.as_deref())
            }
            "source.namespace" => namespace.clone(),
            "request.auth.principal" => request_principal.clone(),
            "request.auth.presenter" => req.auth.and_then(|a| a.presenter.clone()),
            "request.auth.audiences" => {
                return any_of(
                    &c.values,
                    &c.not_values,
                    req.auth.map(|a| a.audiences.clone()),
                )
            }
            key if key.starts_with("request.auth.claims") => {
                let path = isthmus_core::policy::claim_path(key).unwrap_or_default();
                let values = req.auth.and_then(|a| a.claim(&path)).map(claim_strings);
                return any_of(&c.values, &c.not_values, values);
            }
            key => key
                .strip_prefix("request.headers[")
                .and_then(|k| k.strip_suffix(']'))
                .and_then(|name| req.headers?.get(name)?.to_str().ok().map(str::to_string)),
        };
        field(&c.values, &c.not_values, value.as_deref())
    });
    from && to && when
}

/// A condition on a list-valued attribute (audiences, a claim that is a list): `values`
/// must match one of the items, and `notValues` none.
fn any_of(include: &[String], exclude: &[String], items: Option<Vec<String>>) -> bool {
    let items = items.unwrap_or_default();
    field_with(include, exclude, items.iter().map(String::as_str), glob)
}

/// A claim's value as the strings a condition compares: a string, each string of a list, or
/// a number or boolean written out.
fn claim_strings(v: &serde_json::Value) -> Vec<String> {
    match v {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => a.iter().flat_map(claim_strings).collect(),
        serde_json::Value::Number(_) | serde_json::Value::Bool(_) => vec![v.to_string()],
        _ => Vec::new(),
    }
}

fn policy_matches(p: &AuthorizationPolicySpec, req: &Inbound<'_>, members: &[&str]) -> bool {
    p.rules.iter().any(|r| rule_matches(r, req, members))
}

/// Decides one inbound request for workload `w` under the mesh's policies.
pub fn authorize(config: &MeshConfig, w: &Workload, req: &Inbound<'_>) -> Verdict {
    let members: Vec<&str> = config
        .clusters
        .iter()
        .map(|c| c.trust_domain.as_str())
        .collect();
    let policy_matches = |p: &AuthorizationPolicySpec| policy_matches(p, req, &members);
    let mut allow_policies = Vec::new();
    for policy in &config.policies {
        let Spec::AuthorizationPolicy(spec) = &policy.spec else {
            continue;
        };
        if !applies(spec.selector.as_ref(), &policy.namespace, w) {
            continue;
        }
        let name = format!("{}/{}", policy.namespace, policy.name);
        match spec.action.as_deref().unwrap_or("ALLOW") {
            "DENY" if policy_matches(spec) => return Verdict::Deny(name),
            "ALLOW" => allow_policies.push((name, spec)),
            _ => {}
        }
    }
    if allow_policies.is_empty() || allow_policies.iter().any(|(_, p)| policy_matches(p)) {
        Verdict::Allow
    } else {
        Verdict::Deny(format!(
            "no ALLOW policy matched ({})",
            allow_policies
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

/// The mutual TLS mode in force for workload `w` on its port `port`: the most specific
/// PeerAuthentication wins (a workload-selector policy's `portLevelMtls` entry for the port,
/// then its `mtls`, then namespace-wide, then mesh-wide in the root namespace); `UNSET` (or no
/// mode) inherits from the next. The mesh default is STRICT (Isthmus never accepts plaintext
/// unless told to).
pub fn mtls_mode(config: &MeshConfig, w: &Workload, port: u16) -> MtlsMode {
    fn mode(m: Option<&isthmus_core::policy::security::MutualTls>) -> Option<MtlsMode> {
        match m?.mode.as_str() {
            "STRICT" => Some(MtlsMode::Strict),
            "PERMISSIVE" => Some(MtlsMode::Permissive),
            _ => None,
        }
    }
    let mut best: Option<(u8, MtlsMode)> = None;
    let mut consider = |rank: u8, m: Option<MtlsMode>| {
        if let Some(m) = m {
            if best.as_ref().is_none_or(|(r, _)| rank > *r) {
                best = Some((rank, m));
            }
        }
    };
    for policy in &config.policies {
        let Spec::PeerAuthentication(spec) = &policy.spec else {
            continue;
        };
        if policy.namespace == w.namespace {
            match &spec.selector {
                Some(s) if !s.match_labels.is_empty() => {
                    if s.match_labels
                        .iter()
                        .all(|(k, v)| w.labels.get(k) == Some(v))
                    {
                        consider(4, mode(spec.port_level_mtls.get(port.to_string().as_str())));
                        consider(3, mode(spec.mtls.as_ref()));
                    }
                }
                _ => consider(2, mode(spec.mtls.as_ref())),
            }
        } else if policy.namespace == SYSTEM_NAMESPACE && spec.selector.is_none() {
            consider(1, mode(spec.mtls.as_ref()));
        }
    }
    best.map_or(MtlsMode::Strict, |(_, m)| m)
}

/// Whether an inbound port accepts plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsMode {
    Strict,
    Permissive,
}

#[cfg(test)]
mod tests;
