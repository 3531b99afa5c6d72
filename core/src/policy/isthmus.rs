//! Isthmus's own policy kinds (`isthmus.io/v1alpha1`), for what Istio's resources do not
//! express. Unknown fields are rejected by name.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::parse_duration_istio;

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

/// `FailoverPolicy.spec`: where a service's traffic goes when its nearer capacity is gone.
/// The caller's own cluster always comes first (local-first); then the `priorities`, in
/// order. A cluster that no priority names receives no traffic, unless a `byLocality` entry
/// adds the remaining clusters, nearest locality first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FailoverPolicySpec {
    /// The service (in the policy's namespace) it governs; absent: every service of the
    /// namespace without a policy of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Ordered priorities after the caller's own cluster; none: every other cluster by
    /// locality, as without a policy.
    #[serde(default)]
    pub priorities: Vec<PriorityEntry>,
    /// A priority keeps the traffic while at least this share of its endpoints is healthy
    /// (default 0: while any is); below it, traffic spills to the next priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_healthy_percent: Option<u32>,
    /// How long a nearer priority must stay healthy before traffic returns to it (default
    /// 5s). Failing over is immediate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hysteresis: Option<String>,
    /// What a cluster whose export lease lapsed (cut off from the federation) means for
    /// traffic: `keepLastKnown`, `drainToNext` (the default) or `{withdrawAfter: 30s}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_partition: Option<OnPartitionSpec>,
}

/// One priority: named clusters, clusters of named regions, or every remaining cluster by
/// locality. Exactly one of the three.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PriorityEntry {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub by_locality: bool,
}

/// `onPartition` as written: a mode name, or `{withdrawAfter: <duration>}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OnPartitionSpec {
    Mode(String),
    WithdrawAfter(WithdrawAfter),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WithdrawAfter {
    pub withdraw_after: String,
}

/// What a lapsed export lease means for traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPartition {
    /// Keep routing as if the lease were live (gateway liveness still protects callers).
    KeepLastKnown,
    /// Move the cluster behind every other priority: used only when nothing else can serve.
    DrainToNext,
    /// Keep routing for this long after the lease lapsed, then stop.
    WithdrawAfter(Duration),
}

/// Parses `onPartition`; `Err` names what is wrong (validation reports it).
pub fn parse_on_partition(spec: Option<&OnPartitionSpec>) -> Result<OnPartition, String> {
    match spec {
        None => Ok(OnPartition::DrainToNext),
        Some(OnPartitionSpec::Mode(m)) => match m.as_str() {
            "keepLastKnown" => Ok(OnPartition::KeepLastKnown),
            "drainToNext" => Ok(OnPartition::DrainToNext),
            other => Err(format!(
                "unknown mode {other:?} (keepLastKnown, drainToNext or {{withdrawAfter: 30s}})"
            )),
        },
        Some(OnPartitionSpec::WithdrawAfter(w)) => parse_duration_istio(&w.withdraw_after)
            .map(OnPartition::WithdrawAfter)
            .ok_or_else(|| {
                format!(
                    "withdrawAfter: invalid duration {:?} (e.g. 30s; at most 720h)",
                    w.withdraw_after
                )
            }),
    }
}
