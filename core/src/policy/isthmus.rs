//! Isthmus's own policy kinds (`isthmus.io/v1alpha1`), for what Istio's resources do not
//! express. Unknown fields are rejected by name.

use serde::{Deserialize, Serialize};

/// `RateLimitPolicy.spec`: a local token bucket, enforced by every calling sidecar for its own
/// requests to `host` (optionally only on the VirtualService http route named `route`).
/// A request that finds the bucket empty is answered 429 without leaving the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitPolicySpec {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    pub token_bucket: TokenBucket,
}

/// Envoy's local rate limit bucket: up to `maxTokens`, refilled by `tokensPerFill` every
/// `fillInterval`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokenBucket {
    pub max_tokens: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_fill: Option<u32>,
    pub fill_interval: String,
}
