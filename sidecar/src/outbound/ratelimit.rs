//! Local rate limiting: `RateLimitPolicy` token buckets, one per policy, in each calling
//! sidecar. Pure, with time passed in.

use std::collections::HashMap;
use std::time::Duration;

use isthmus_core::mesh::MeshConfig;
use isthmus_core::policy::isthmus::RateLimitPolicySpec;
use isthmus_core::policy::{parse_duration_istio, resolve_host, Spec};
use tokio::time::Instant;

use crate::routing::ServiceKey;

/// A token bucket: up to `max` tokens, `per_fill` added every `interval`.
#[derive(Debug, Clone)]
pub struct Bucket {
    max: u32,
    per_fill: u32,
    interval: Duration,
    tokens: u32,
    last_fill: Instant,
}

impl Bucket {
    pub fn new(max: u32, per_fill: u32, interval: Duration, now: Instant) -> Bucket {
        Bucket {
            max,
            per_fill,
            interval,
            tokens: max,
            last_fill: now,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        if !self.interval.is_zero() {
            let fills = u64::try_from(
                now.saturating_duration_since(self.last_fill).as_nanos() / self.interval.as_nanos(),
            )
            .unwrap_or(u64::MAX);
            if fills > 0 {
                let added = fills.saturating_mul(u64::from(self.per_fill));
                let tokens = u64::from(self.tokens).saturating_add(added);
                self.tokens = u32::try_from(tokens).map_or(self.max, |t| t.min(self.max));
                self.last_fill += self.interval * u32::try_from(fills).unwrap_or(u32::MAX);
            }
        }
        if self.tokens > 0 {
            self.tokens -= 1;
            true
        } else {
            false
        }
    }
}

/// Every rate limit policy of the mesh, with its bucket.
#[derive(Debug, Default)]
pub struct Limiter {
    /// Policy `namespace/name` → (service, route name, spec, bucket).
    buckets: HashMap<String, (ServiceKey, Option<String>, RateLimitPolicySpec, Bucket)>,
}

impl Limiter {
    /// Brings the buckets in line with `config`: new policies get a full bucket, changed ones
    /// a new bucket, removed ones go; unchanged ones keep their state.
    pub fn sync(&mut self, config: &MeshConfig, now: Instant) {
        let mut seen = Vec::new();
        for policy in &config.policies {
            let Spec::RateLimitPolicy(spec) = &policy.spec else {
                continue;
            };
            let Some(service) = resolve_host(&spec.host, &policy.namespace) else {
                continue;
            };
            let Some(interval) = parse_duration_istio(&spec.token_bucket.fill_interval) else {
                continue;
            };
            let id = format!("{}/{}", policy.namespace, policy.name);
            seen.push(id.clone());
            if self.buckets.get(&id).is_some_and(|(_, _, s, _)| s == spec) {
                continue;
            }
            let tb = &spec.token_bucket;
            let bucket = Bucket::new(
                tb.max_tokens,
                tb.tokens_per_fill.unwrap_or(tb.max_tokens),
                interval,
                now,
            );
            self.buckets
                .insert(id, (service, spec.route.clone(), spec.clone(), bucket));
        }
        self.buckets.retain(|id, _| seen.contains(id));
    }

    /// Whether a request to `service` on route `route` may go; takes a token from every
    /// bucket that applies. Returns the name of the policy that refused it.
    pub fn admit(
        &mut self,
        service: &ServiceKey,
        route: Option<&str>,
        now: Instant,
    ) -> Result<(), String> {
        for (id, (s, r, _, bucket)) in self.buckets.iter_mut() {
            let applies = s == service && r.as_deref().is_none_or(|r| Some(r) == route);
            if applies && !bucket.try_take(now) {
                return Err(id.clone());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_core::policy::parse_documents;

    #[test]
    fn a_bucket_empties_and_refills_by_interval() {
        let t0 = Instant::now();
        let mut b = Bucket::new(3, 1, Duration::from_secs(1), t0);
        assert!((0..3).all(|_| b.try_take(t0)));
        assert!(!b.try_take(t0));
        assert!(!b.try_take(t0 + Duration::from_millis(999)));
        assert!(b.try_take(t0 + Duration::from_millis(1000)));
        assert!(!b.try_take(t0 + Duration::from_millis(1500)));
        // Long idle refills to the maximum, no more.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| b.try_take(later)));
        assert!(!b.try_take(later));
    }

    fn config(yaml: &str) -> MeshConfig {
        MeshConfig {
            policies: parse_documents("rl.yaml", yaml).unwrap(),
            ..MeshConfig::default()
        }
    }

    const RL: &str = "apiVersion: isthmus.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: ratings}\nspec:\n  host: ratings\n  tokenBucket: {maxTokens: 2, fillInterval: 1s}\n";

    #[test]
    fn policies_limit_only_their_service_and_route() {
        let t0 = Instant::now();
        let mut l = Limiter::default();
        l.sync(&config(RL), t0);
        let ratings = ("ratings".to_string(), "default".to_string());
        let reviews = ("reviews".to_string(), "default".to_string());
        assert!(l.admit(&ratings, None, t0).is_ok() && l.admit(&ratings, None, t0).is_ok());
        assert_eq!(l.admit(&ratings, None, t0), Err("default/ratings".into()));
        assert!(l.admit(&reviews, None, t0).is_ok());
        // Re-syncing the same policy keeps the (empty) bucket; changing it starts a new one.
        l.sync(&config(RL), t0);
        assert!(l.admit(&ratings, None, t0).is_err());
        l.sync(&config(&RL.replace("maxTokens: 2", "maxTokens: 5")), t0);
        assert!(l.admit(&ratings, None, t0).is_ok());
        let routed = RL
            .replace("  host: ratings\n", "  host: ratings\n  route: slow\n")
            .replace("maxTokens: 2", "maxTokens: 1");
        l.sync(&config(&routed), t0);
        assert!(l.admit(&ratings, Some("slow"), t0).is_ok());
        assert!(l.admit(&ratings, Some("slow"), t0).is_err());
        assert!(l.admit(&ratings, Some("fast"), t0).is_ok());
        l.sync(&MeshConfig::default(), t0);
        assert!(l.admit(&ratings, Some("slow"), t0).is_ok());
    }

    #[test]
    fn bad_rate_limit_documents_are_refused_by_field() {
        for (text, field) in [
            (
                RL.replace("maxTokens: 2", "maxTokens: 0"),
                "spec.tokenBucket.maxTokens",
            ),
            (
                RL.replace("fillInterval: 1s", "fillInterval: often"),
                "spec.tokenBucket.fillInterval",
            ),
            (
                RL.replace("isthmus.io/v1alpha1", "isthmus.io/v1"),
                "apiVersion",
            ),
            (
                RL.replace("maxTokens: 2", "maxTokens: 2, burst: 3"),
                "spec.tokenBucket.burst",
            ),
        ] {
            let e = parse_documents("rl.yaml", &text).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
    }
}
