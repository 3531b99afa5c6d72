//! Bootstrap tokens: which workload identities a token may obtain certificates for (file
//! mode; in Kubernetes a service-account token verified by TokenReview takes its place).
//!
//! ```yaml
//! bootstrapTokens:
//!   - token: "a-long-random-secret"
//!     allow: ["default/*", "isthmus-system/eastwest-gateway"]   # namespace/serviceAccount
//! ```

use isthmus_core::config::FieldError;
use isthmus_core::identity::{SpiffeId, CONTROL_SERVICE_ACCOUNT, SYSTEM_NAMESPACE};
use serde::Deserialize;

/// The shortest token accepted, so a guessable token is refused at load time.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawToken {
    pub token: String,
    pub allow: Vec<String>,
}

/// One token and the `(namespace, service account or "*")` pairs it may ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    token: String,
    allow: Vec<(String, String)>,
}

/// The set of bootstrap tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenPolicy {
    grants: Vec<Grant>,
}

impl TokenPolicy {
    /// Validates raw tokens; `field` is the config path for messages.
    pub fn from_raw(field: &str, raw: Vec<RawToken>) -> Result<Self, FieldError> {
        let mut grants = Vec::new();
        for (i, t) in raw.into_iter().enumerate() {
            let at = format!("{field}[{i}]");
            if t.token.len() < MIN_TOKEN_LEN {
                return Err(FieldError::new(
                    format!("{at}.token"),
                    "(hidden)",
                    format!("a token needs at least {MIN_TOKEN_LEN} characters"),
                ));
            }
            let mut allow = Vec::new();
            for (j, a) in t.allow.iter().enumerate() {
                match a.split_once('/') {
                    Some((SYSTEM_NAMESPACE, sa)) if sa == "*" || sa == CONTROL_SERVICE_ACCOUNT => {
                        return Err(FieldError::new(
                            format!("{at}.allow[{j}]"),
                            a,
                            "isthmus-system identities are granted by exact name \
                             (isthmus-system/eastwest-gateway), and a control plane's identity \
                             is never issued to a token",
                        ))
                    }
                    Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                        allow.push((ns.to_string(), sa.to_string()))
                    }
                    _ => {
                        return Err(FieldError::new(
                            format!("{at}.allow[{j}]"),
                            a,
                            "expected namespace/serviceAccount, or namespace/* for any account",
                        ))
                    }
                }
            }
            grants.push(Grant {
                token: t.token,
                allow,
            });
        }
        Ok(TokenPolicy { grants })
    }

    /// A policy with one token allowed everything in the listed namespaces.
    pub fn single(token: &str, namespaces: &[&str]) -> Self {
        TokenPolicy {
            grants: vec![Grant {
                token: token.to_string(),
                allow: namespaces
                    .iter()
                    .map(|ns| (ns.to_string(), "*".to_string()))
                    .collect(),
            }],
        }
    }

    /// Whether `token` may obtain a certificate for `id` (already known to be in this
    /// cluster's trust domain). Tokens are compared in constant time. A control plane's
    /// identity is never allowed, and `isthmus-system` identities only by exact name: a
    /// wildcard there matches nothing (docs/security.md, §3).
    pub fn allows(&self, token: &str, id: &SpiffeId) -> bool {
        if id.is_control() {
            return false;
        }
        let system = id.namespace() == SYSTEM_NAMESPACE;
        self.grants.iter().any(|g| {
            constant_time_eq(g.token.as_bytes(), token.as_bytes())
                && g.allow.iter().any(|(ns, sa)| {
                    ns == id.namespace() && ((sa == "*" && !system) || sa == id.service_account())
                })
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> TokenPolicy {
        TokenPolicy::from_raw(
            "bootstrapTokens",
            vec![RawToken {
                token: "0123456789abcdef".into(),
                allow: vec!["default/*".into(), "isthmus-system/eastwest-gateway".into()],
            }],
        )
        .unwrap()
    }

    #[test]
    fn token_grants_only_the_listed_identities() {
        let p = policy();
        let td = "east.isthmus.local";
        assert!(p.allows(
            "0123456789abcdef",
            &SpiffeId::new(td, "default", "anything")
        ));
        assert!(p.allows("0123456789abcdef", &SpiffeId::gateway(td)));
        assert!(!p.allows("0123456789abcdef", &SpiffeId::control(td)));
        assert!(!p.allows("0123456789abcdeX", &SpiffeId::new(td, "default", "x")));
        assert!(!p.allows("", &SpiffeId::new(td, "default", "x")));
    }

    #[test]
    fn short_tokens_and_bad_grants_are_refused_at_load() {
        let err = TokenPolicy::from_raw(
            "t",
            vec![RawToken {
                token: "short".into(),
                allow: vec![],
            }],
        )
        .unwrap_err();
        assert_eq!(err.field, "t[0].token");
        let err = TokenPolicy::from_raw(
            "t",
            vec![RawToken {
                token: "0123456789abcdef".into(),
                allow: vec!["default".into()],
            }],
        )
        .unwrap_err();
        assert_eq!(err.field, "t[0].allow[0]");
        assert_eq!(err.value, "default");
    }

    #[test]
    fn system_identities_need_an_exact_grant_and_a_control_planes_is_never_granted() {
        let td = "east.isthmus.local";
        for grant in ["isthmus-system/*", "isthmus-system/control"] {
            let err = TokenPolicy::from_raw(
                "bootstrapTokens",
                vec![RawToken {
                    token: "0123456789abcdef".into(),
                    allow: vec![grant.into()],
                }],
            )
            .unwrap_err();
            assert_eq!(err.field, "bootstrapTokens[0].allow[0]");
            assert!(err.reason.contains("exact name"), "{err}");
        }
        // Built in code, a wildcard over isthmus-system still matches nothing there.
        let wide = TokenPolicy::single("0123456789abcdef", &["isthmus-system", "default"]);
        assert!(!wide.allows("0123456789abcdef", &SpiffeId::gateway(td)));
        assert!(!wide.allows("0123456789abcdef", &SpiffeId::control(td)));
        assert!(wide.allows("0123456789abcdef", &SpiffeId::new(td, "default", "web")));
    }
}
