//! Route selection: the mesh's VirtualServices and DestinationRules compiled into a table
//! the outbound proxy consults per request.
//!
//! Pure: no I/O, no clock, no randomness of its own (the weighted pick takes a number in
//! [0, 1) from the caller), so every decision is unit-tested. Order of use for one request:
//! [`RouteTable::http_route`] (first route whose match list matches, as Istio evaluates them),
//! then [`HttpRoute::pick`] for the destination, then [`RouteTable::subset_labels`] and
//! [`RouteTable::policy`] for that destination.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use isthmus_core::mesh::MeshConfig;
use isthmus_core::policy::networking::{
    self as net, HeaderOperations, HttpFaultInjection, StringMatch, TrafficPolicy,
};
use isthmus_core::policy::{parse_duration_istio, resolve_host, Spec};

/// A service by `(name, namespace)`.
pub type ServiceKey = (String, String);

/// A compiled string matcher.
#[derive(Debug, Clone)]
pub enum Matcher {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
}

impl Matcher {
    pub(crate) fn compile(m: &StringMatch) -> Option<Matcher> {
        if let Some(e) = &m.exact {
            Some(Matcher::Exact(e.clone()))
        } else if let Some(p) = &m.prefix {
            Some(Matcher::Prefix(p.clone()))
        } else {
            // Anchored, as Envoy's safe_regex is a full match.
            m.regex
                .as_ref()
                .and_then(|r| regex::Regex::new(&format!("^(?:{r})$")).ok())
                .map(Matcher::Regex)
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            Matcher::Exact(e) => value == e,
            Matcher::Prefix(p) => value.starts_with(p.as_str()),
            Matcher::Regex(r) => r.is_match(value),
        }
    }
}

/// One `match` entry: every condition in it must hold.
#[derive(Debug, Clone, Default)]
pub struct RequestMatch {
    uri: Option<Matcher>,
    ignore_uri_case: bool,
    method: Option<Matcher>,
    headers: Vec<(String, Matcher)>,
    query: Vec<(String, Matcher)>,
    port: Option<u16>,
    source_labels: Vec<(String, String)>,
    source_namespace: Option<String>,
    authority: Option<Matcher>,
    scheme: Option<Matcher>,
    without_headers: Vec<(String, Matcher)>,
}

/// What a request looks like to the router.
pub struct RequestView<'a> {
    pub method: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub port: u16,
    /// The request's authority (`:authority`, or `Host`).
    pub authority: &'a str,
    /// `http` or `https`.
    pub scheme: &'a str,
    /// The calling workload (this sidecar's own).
    pub source: &'a SourceWorkload,
}

/// The workload whose sidecar routes: what `sourceLabels` and `sourceNamespace` match.
#[derive(Debug, Clone, Default)]
pub struct SourceWorkload {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

impl RequestMatch {
    fn compile(m: &net::HttpMatchRequest) -> RequestMatch {
        let lower = |k: &String| k.to_ascii_lowercase();
        RequestMatch {
            uri: m.uri.as_ref().and_then(Matcher::compile),
            ignore_uri_case: m.ignore_uri_case.unwrap_or(false),
            method: m.method.as_ref().and_then(Matcher::compile),
            headers: m
                .headers
                .iter()
                .filter_map(|(k, v)| Some((lower(k), Matcher::compile(v)?)))
                .collect(),
            query: m
                .query_params
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), Matcher::compile(v)?)))
                .collect(),
            port: m.port.and_then(|p| u16::try_from(p).ok()),
            source_labels: m
                .source_labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            source_namespace: m.source_namespace.clone(),
            authority: m.authority.as_ref().and_then(Matcher::compile),
            scheme: m.scheme.as_ref().and_then(Matcher::compile),
            without_headers: m
                .without_headers
                .iter()
                .filter_map(|(k, v)| Some((lower(k), Matcher::compile(v)?)))
                .collect(),
        }
    }

    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        if let Some(p) = self.port {
            if p != req.port {
                return false;
            }
        }
        if let Some(ns) = &self.source_namespace {
            if *ns != req.source.namespace {
                return false;
            }
        }
        if !self
            .source_labels
            .iter()
            .all(|(k, v)| req.source.labels.get(k) == Some(v))
        {
            return false;
        }
        if let Some(m) = &self.authority {
            if !m.matches(req.authority) {
                return false;
            }
        }
        if let Some(m) = &self.scheme {
            if !m.matches(req.scheme) {
                return false;
            }
        }
        for (name, m) in &self.without_headers {
            if let Some(v) = req.headers.get(name.as_str()).and_then(|v| v.to_str().ok()) {
                if m.matches(v) {
                    return false;
                }
            }
        }
        if let Some(uri) = &self.uri {
            let ok = if self.ignore_uri_case {
                let lowered = req.path.to_ascii_lowercase();
                match uri {
                    Matcher::Exact(e) => lowered == e.to_ascii_lowercase(),
                    Matcher::Prefix(p) => lowered.starts_with(&p.to_ascii_lowercase()),
                    Matcher::Regex(r) => r.is_match(&lowered),
                }
            } else {
                uri.matches(req.path)
            };
            if !ok {
                return false;
            }
        }
        if let Some(m) = &self.method {
            if !m.matches(req.method) {
                return false;
            }
        }
        for (name, m) in &self.headers {
            match req.headers.get(name.as_str()).and_then(|v| v.to_str().ok()) {
                Some(v) if m.matches(v) => {}
                _ => return false,
            }
        }
        for (name, m) in &self.query {
            let value = req.query.and_then(|q| {
                q.split('&').find_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k == name).then_some(v)
                })
            });
            match value {
                Some(v) if m.matches(v) => {}
                _ => return false,
            }
        }
        true
    }
}

/// A weighted destination of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedDestination {
    pub service: ServiceKey,
    pub subset: Option<String>,
    pub port: Option<u16>,
    pub weight: u32,
    pub headers: Option<net::Headers>,
}

/// Picks one of `dests` by weight (HTTP routes and `tcp` routes alike); `roll` is uniform
/// in [0, 1). All weights zero: the first.
pub fn pick_weighted(dests: &[WeightedDestination], roll: f64) -> Option<&WeightedDestination> {
    let total: u32 = dests.iter().map(|d| d.weight).sum();
    if total == 0 {
        return dests.first();
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "the product is clamped to [0, total) before the cast"
    )]
    let mut target = (roll.clamp(0.0, 0.999_999_999) * f64::from(total)) as u32;
    for d in dests {
        if target < d.weight {
            return Some(d);
        }
        target -= d.weight;
    }
    dests.last()
}

/// Retry policy of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: Vec<String>,
    /// Retries go to the next failover priorities in turn
    /// ([`isthmus_core::failover::Table::retry_clusters`]).
    pub remote_localities: bool,
}

impl RetryPolicy {
    /// The mesh default when a route says nothing: two retries on connection failures and
    /// refused streams, as Istio does.
    pub fn mesh_default() -> Self {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            retry_on: vec!["connect-failure".into(), "refused-stream".into()],
            remote_localities: false,
        }
    }

    /// Whether an attempt that ended with `status` (None: no response, the connection failed
    /// or was reset; `connect` tells which) should be retried.
    pub fn retriable(&self, status: Option<u16>, connect_failure: bool) -> bool {
        self.retry_on
            .iter()
            .any(|cond| match (cond.as_str(), status) {
                ("connect-failure", None) => connect_failure,
                ("reset", None) => !connect_failure,
                ("refused-stream", None) => connect_failure,
                ("5xx", None) => true,
                ("5xx", Some(s)) => s >= 500,
                ("gateway-error", Some(s)) => matches!(s, 502..=504),
                ("gateway-error", None) => true,
                ("retriable-4xx", Some(409)) => true,
                ("retriable-status-codes", Some(503)) => true,
                (code, Some(s)) => code.parse::<u16>() == Ok(s),
                _ => false,
            })
    }
}

impl RetryPolicy {
    /// Whether a gRPC failure with status `code` (from a trailers-only response) should be
    /// retried, by Istio's gRPC `retryOn` names.
    pub fn retriable_grpc(&self, code: u32) -> bool {
        let name = match code {
            1 => "cancelled",
            4 => "deadline-exceeded",
            8 => "resource-exhausted",
            13 => "internal",
            14 => "unavailable",
            _ => return false,
        };
        self.retry_on.iter().any(|c| c == name)
    }
}

/// Where a route sends a matching request.
#[derive(Debug, Clone)]
pub enum RouteAction {
    Forward(Vec<WeightedDestination>),
    Redirect {
        uri: Option<String>,
        authority: Option<String>,
        code: u16,
    },
    /// Answered by the sidecar: status and body.
    Direct {
        status: u16,
        body: bytes::Bytes,
    },
}

/// One compiled http route.
#[derive(Debug, Clone)]
pub struct HttpRoute {
    pub name: Option<String>,
    matches: Vec<RequestMatch>,
    pub action: RouteAction,
    pub rewrite: Option<net::HttpRewrite>,
    pub timeout: Option<Duration>,
    pub retries: Option<RetryPolicy>,
    pub fault: Option<HttpFaultInjection>,
    pub mirror: Option<(ServiceKey, Option<String>, f64)>,
    pub headers: Option<net::Headers>,
    pub cors: Option<crate::cors::Cors>,
}

impl HttpRoute {
    fn matches(&self, req: &RequestView<'_>) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.matches(req))
    }

    /// Picks a destination by weight; `roll` is uniform in [0, 1).
    pub fn pick(&self, roll: f64) -> Option<&WeightedDestination> {
        let RouteAction::Forward(dests) = &self.action else {
            return None;
        };
        pick_weighted(dests, roll)
    }

    /// The route used when no VirtualService applies: the service itself.
    pub fn default_for(service: ServiceKey) -> HttpRoute {
        HttpRoute {
            name: None,
            matches: Vec::new(),
            action: RouteAction::Forward(vec![WeightedDestination {
                service,
                subset: None,
                port: None,
                weight: 100,
                headers: None,
            }]),
            rewrite: None,
            timeout: None,
            retries: None,
            fault: None,
            mirror: None,
            headers: None,
            cors: None,
        }
    }
}

fn destination(
    d: &net::Destination,
    namespace: &str,
    weight: Option<u32>,
    headers: Option<net::Headers>,
) -> Option<WeightedDestination> {
    Some(WeightedDestination {
        service: resolve_host(&d.host, namespace)?,
        subset: d.subset.clone(),
        port: d.port.and_then(|p| u16::try_from(p.number).ok()),
        weight: weight.unwrap_or(100),
        headers,
    })
}

fn compile_http(r: &net::HttpRoute, ns: &str) -> HttpRoute {
    let action = if let Some(d) = &r.direct_response {
        RouteAction::Direct {
            status: u16::try_from(d.status).unwrap_or(500),
            body: d
                .body
                .as_ref()
                .and_then(net::HttpBody::to_bytes)
                .unwrap_or_default()
                .into(),
        }
    } else if let Some(red) = &r.redirect {
        RouteAction::Redirect {
            uri: red.uri.clone(),
            authority: red.authority.clone(),
            code: red
                .redirect_code
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(301),
        }
    } else {
        RouteAction::Forward(
            r.route
                .iter()
                .filter_map(|d| destination(&d.destination, ns, d.weight, d.headers.clone()))
                .collect(),
        )
    };
    HttpRoute {
        name: r.name.clone(),
        matches: r.matches.iter().map(RequestMatch::compile).collect(),
        action,
        rewrite: r.rewrite.clone(),
        timeout: r.timeout.as_deref().and_then(parse_duration_istio),
        retries: r.retries.as_ref().map(|x| RetryPolicy {
            attempts: x.attempts,
            per_try_timeout: x.per_try_timeout.as_deref().and_then(parse_duration_istio),
            retry_on: x
                .retry_on
                .as_deref()
                .unwrap_or("connect-failure,refused-stream,5xx")
                .split(',')
                .map(|s| s.trim().to_string())
                .collect(),
            remote_localities: x.retry_remote_localities.unwrap_or(false),
        }),
        fault: r.fault.clone(),
        cors: r.cors_policy.as_ref().map(crate::cors::Cors::compile),
        mirror: r.mirror.as_ref().and_then(|m| {
            let key = resolve_host(&m.host, ns)?;
            let fraction = r
                .mirror_percentage
                .as_ref()
                .map(|p| p.fraction())
                .unwrap_or(1.0);
            Some((key, m.subset.clone(), fraction))
        }),
        headers: r.headers.clone(),
    }
}

/// Applies header operations (set, add, remove) to a header map.
pub fn apply_header_ops(headers: &mut HeaderMap, ops: &HeaderOperations) {
    use http::header::{HeaderName, HeaderValue};
    for (k, v) in &ops.set {
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(k.as_str()),
            HeaderValue::try_from(v.as_str()),
        ) {
            headers.insert(name, value);
        }
    }
    for (k, v) in &ops.add {
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(k.as_str()),
            HeaderValue::try_from(v.as_str()),
        ) {
            headers.append(name, value);
        }
    }
    for k in &ops.remove {
        headers.remove(k.as_str());
    }
}

/// Rewrites a path as Istio's `rewrite.uri` does: the matched prefix is replaced when the
/// route matched on a prefix, otherwise the whole path is.
pub fn rewrite_path(path: &str, matched_prefix: Option<&str>, replacement: &str) -> String {
    match matched_prefix {
        Some(prefix) if path.starts_with(prefix) => {
            format!("{replacement}{}", &path[prefix.len()..])
        }
        _ => replacement.to_string(),
    }
}

impl HttpRoute {
    /// The uri prefix this route matched `req` on, if it matched by prefix (for rewrites).
    pub fn matched_prefix(&self, req: &RequestView<'_>) -> Option<String> {
        self.matches
            .iter()
            .find(|m| m.matches(req))
            .and_then(|m| match &m.uri {
                Some(Matcher::Prefix(p)) => Some(p.clone()),
                _ => None,
            })
    }
}

mod table;
pub use table::{EffectivePolicy, RouteTable};

#[cfg(test)]
mod tests;
