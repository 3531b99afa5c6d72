//! End-user authentication on the inbound side: Istio's `RequestAuthentication`.
//!
//! Pure (the clock is passed in). The rules of every RequestAuthentication that applies to the
//! workload (its namespace or the root namespace, selector labels all on the workload) are
//! compiled once per config version ([`Rules::for_workload`]). For each request
//! ([`Rules::authenticate`]), as Envoy's `jwt_authn` filter does for Istio:
//! - the token is looked for where the rules say (`fromHeaders` with their prefix,
//!   `fromParams`, `fromCookies`; a rule that names none looks in `Authorization: Bearer` and
//!   the `access_token` parameter), the first one found is used;
//! - no token: the request goes on unauthenticated, and authorization decides;
//! - a token that does not verify ([`isthmus_core::jwt::verify`]): 401 with
//!   `www-authenticate: Bearer realm=..., error="invalid_token"`;
//! - a token that verifies: the rule of its issuer removes it from its header unless
//!   `forwardOriginalToken`, and sets `outputPayloadToHeader` and `outputClaimToHeaders`.
//!
//! Every header a rule outputs is removed from every request first, so a caller cannot
//! hand the application a claim no token made.
//!
//! Tokens that verified are kept (at most [`CACHE_ENTRIES`], each at most
//! [`CACHE_TOKEN_BYTES`], least recently used dropped first), as Envoy's `jwt_cache` does: a
//! client sending the same token again skips the signature check, while its lifetime is
//! checked on every request. The cache belongs to one compilation of the rules, so new keys
//! or rules start it empty. Refused tokens are never kept.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use isthmus_core::jwt::{self, Issuer, KeySet, Refusal, Verified};
use isthmus_core::mesh::MeshConfig;
use isthmus_core::policy::security::JwtRule;
use isthmus_core::policy::Spec;

use crate::authz::{applies, Workload};

/// How many verified tokens a workload's rules keep.
pub const CACHE_ENTRIES: usize = 256;
/// The longest token kept.
pub const CACHE_TOKEN_BYTES: usize = 4096;

/// The RequestAuthentication rules of one workload, compiled: `rules[i]` is the rule of
/// `issuers[i]`.
#[derive(Debug)]
pub struct Rules {
    rules: Vec<Rule>,
    issuers: Vec<Issuer>,
    verified: Mutex<lru::LruCache<String, Arc<Verified>>>,
}

/// One `jwtRules` entry with the places it looks for a token resolved once.
#[derive(Debug)]
struct Rule {
    spec: JwtRule,
    /// Header name and the text before the token.
    headers: Vec<(HeaderName, String)>,
    params: Vec<String>,
}

impl Rule {
    fn new(spec: JwtRule) -> Rule {
        let defaults = spec.from_headers.is_empty()
            && spec.from_params.is_empty()
            && spec.from_cookies.is_empty();
        let (headers, params) = if defaults {
            (
                vec![(http::header::AUTHORIZATION, "Bearer ".to_string())],
                vec!["access_token".to_string()],
            )
        } else {
            (
                spec.from_headers
                    .iter()
                    .filter_map(|h| {
                        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
                        Some((name, h.prefix.clone().unwrap_or_default()))
                    })
                    .collect(),
                spec.from_params.clone(),
            )
        };
        Rule {
            spec,
            headers,
            params,
        }
    }
}

impl Default for Rules {
    fn default() -> Self {
        Rules::new(Vec::new(), Vec::new())
    }
}

/// What a request's token made of it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// No token anywhere the rules look.
    Anonymous,
    /// Shared with the cache of verified tokens.
    Verified(Arc<Verified>),
    Refused(Refusal),
}

/// Where a token was found.
enum Place {
    Header(HeaderName),
    Param,
    Cookie,
}

impl Rules {
    /// The rules that apply to workload `w` under `config`. Key sets were checked when the
    /// policy was applied; one that no longer parses is left out (and logged).
    pub fn for_workload(config: &MeshConfig, w: &Workload) -> Rules {
        let (mut rules, mut issuers) = (Vec::new(), Vec::new());
        for policy in &config.policies {
            let Spec::RequestAuthentication(spec) = &policy.spec else {
                continue;
            };
            if !applies(spec.selector.as_ref(), &policy.namespace, w) {
                continue;
            }
            for rule in &spec.jwt_rules {
                match KeySet::parse(rule.jwks.as_deref().unwrap_or("")) {
                    Ok(keys) => {
                        issuers.push(Issuer {
                            issuer: rule.issuer.clone(),
                            audiences: rule.audiences.clone(),
                            keys,
                        });
                        rules.push(Rule::new(rule.clone()));
                    }
                    Err(e) => tracing::warn!(
                        policy = %format!("{}/{}", policy.namespace, policy.name),
                        issuer = %rule.issuer, error = %e, "a JWT rule's key set is left out"
                    ),
                }
            }
        }
        Rules::new(rules, issuers)
    }

    fn new(rules: Vec<Rule>, issuers: Vec<Issuer>) -> Rules {
        let entries = NonZeroUsize::new(CACHE_ENTRIES).unwrap_or(NonZeroUsize::MIN);
        Rules {
            rules,
            issuers,
            verified: Mutex::new(lru::LruCache::new(entries)),
        }
    }

    /// Checks `token` at `now`: from the cache when it verified before (its lifetime checked
    /// again), else in full, keeping it when it passes.
    fn check(&self, token: &str, now: u64) -> Result<Arc<Verified>, Refusal> {
        let mut cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = cache.get(token) {
            return v.check_time(now).map(|()| v.clone());
        }
        drop(cache);
        let verified = Arc::new(jwt::verify(token, &self.issuers, now)?);
        if token.len() <= CACHE_TOKEN_BYTES {
            self.verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .put(token.to_string(), verified.clone());
        }
        Ok(verified)
    }

    /// How many verified tokens are kept.
    pub fn cached(&self) -> usize {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Authenticates one request at `now` (seconds since the epoch), taking the token out of
    /// `headers` and adding the output headers as its rule says.
    pub fn authenticate(&self, uri: &Uri, headers: &mut HeaderMap, now: u64) -> Outcome {
        if self.rules.is_empty() {
            return Outcome::Anonymous;
        }
        for rule in &self.rules {
            for h in output_headers(&rule.spec) {
                headers.remove(h);
            }
        }
        let Some((token, place)) = self.find_token(uri, headers) else {
            return Outcome::Anonymous;
        };
        let verified = match self.check(&token, now) {
            Ok(v) => v,
            Err(refusal) => return Outcome::Refused(refusal),
        };
        let rule = self
            .issuers
            .iter()
            .position(|i| i.issuer == verified.issuer)
            .map(|i| &self.rules[i].spec);
        if let Some(rule) = rule {
            if let (false, Place::Header(name)) = (rule.forward_original_token, &place) {
                headers.remove(name);
            }
            if let Some(h) = &rule.output_payload_to_header {
                set(headers, h, &verified.payload_b64);
            }
            for c in &rule.output_claim_to_headers {
                let path: Vec<&str> = c.claim.split('.').collect();
                let value = match verified.claim(&path) {
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                        Some(v.to_string())
                    }
                    _ => None,
                };
                if let Some(v) = value {
                    set(headers, &c.header, &v);
                }
            }
        }
        Outcome::Verified(verified)
    }

    fn find_token(&self, uri: &Uri, headers: &HeaderMap) -> Option<(String, Place)> {
        for rule in &self.rules {
            for (name, prefix) in &rule.headers {
                for value in headers.get_all(name) {
                    let Ok(value) = value.to_str() else { continue };
                    if let Some(token) = strip_prefix_ignore_case(value, prefix) {
                        let token = token.trim();
                        if !token.is_empty() {
                            return Some((token.to_string(), Place::Header(name.clone())));
                        }
                    }
                }
            }
            for p in &rule.params {
                if let Some(token) = query_param(uri, p) {
                    return Some((token, Place::Param));
                }
            }
            for c in &rule.spec.from_cookies {
                if let Some(token) = cookie(headers, c) {
                    return Some((token, Place::Cookie));
                }
            }
        }
        None
    }
}

fn output_headers(rule: &JwtRule) -> impl Iterator<Item = &str> {
    rule.output_payload_to_header.as_deref().into_iter().chain(
        rule.output_claim_to_headers
            .iter()
            .map(|c| c.header.as_str()),
    )
}

fn set(headers: &mut HeaderMap, name: &str, value: &str) {
    if let (Ok(n), Ok(v)) = (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(value),
    ) {
        headers.insert(n, v);
    }
}

/// `Bearer ` is matched case-insensitively, as RFC 7235 auth schemes are.
fn strip_prefix_ignore_case<'a>(value: &'a str, prefix: &str) -> Option<&'a str> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &value[prefix.len()..])
}

fn query_param(uri: &Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name && !v.is_empty()).then(|| v.to_string())
    })
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name && !v.is_empty()).then(|| v.to_string())
        })
}

/// The `www-authenticate` value of a 401, as Envoy writes it.
pub fn challenge(uri: &Uri, headers: &HeaderMap) -> HeaderValue {
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    let realm = format!("http://{host}{}", uri.path());
    HeaderValue::from_str(&format!(
        "Bearer realm=\"{}\", error=\"invalid_token\"",
        realm.replace(['"', '\\'], "")
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("Bearer error=\"invalid_token\""))
}

#[cfg(test)]
mod tests;
