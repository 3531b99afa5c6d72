//! Choosing an upstream for one request: load balancing, outlier ejection and the circuit
//! breaker's admission decision.
//!
//! Pure state machines with time passed in (`now`), so ejection and return are tested without
//! sleeping. The proxy owns one [`Balancer`] and feeds it outcomes.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::time::Duration;

use isthmus_core::policy::networking::{
    ConnectionPoolSettings, LoadBalancerSettings, OutlierDetection,
};
use isthmus_core::policy::parse_duration_istio;
use tokio::time::Instant;

/// Where an attempt goes: a local endpoint's sidecar, or a remote cluster through the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Upstream {
    Local(SocketAddr),
    Remote(String),
}

/// The load balancing algorithm in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Algorithm {
    RoundRobin,
    LeastRequest,
    Random,
    /// Hash of the given key (header value, cookie or source IP), when one was present.
    ConsistentHash,
}

impl Algorithm {
    pub fn from_settings(lb: Option<&LoadBalancerSettings>) -> Algorithm {
        match lb {
            Some(lb) if lb.consistent_hash.is_some() => Algorithm::ConsistentHash,
            Some(lb) => match lb.simple.as_deref() {
                Some("LEAST_REQUEST") | Some("LEAST_CONN") => Algorithm::LeastRequest,
                Some("RANDOM") => Algorithm::Random,
                _ => Algorithm::RoundRobin,
            },
            None => Algorithm::RoundRobin,
        }
    }
}

/// Outlier detection settings with Istio's defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierSettings {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway: Option<u32>,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

impl OutlierSettings {
    pub fn from_policy(o: &OutlierDetection) -> OutlierSettings {
        OutlierSettings {
            consecutive_5xx: o.consecutive5xx_errors.filter(|n| *n > 0),
            consecutive_gateway: o.consecutive_gateway_errors.filter(|n| *n > 0),
            base_ejection: o
                .base_ejection_time
                .as_deref()
                .and_then(parse_duration_istio)
                .unwrap_or(Duration::from_secs(30)),
            max_ejection_percent: o.max_ejection_percent.unwrap_or(10),
        }
    }
}

#[derive(Debug, Default, Clone)]
struct UpstreamState {
    active: u32,
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

/// How an attempt ended, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Status(u16),
    /// No response: connect failure, reset or timeout (counts as a gateway error).
    Failed,
}

/// Per-destination balancing state: counters, ejections and the round-robin cursor.
#[derive(Debug, Default)]
pub struct Balancer {
    upstreams: HashMap<Upstream, UpstreamState>,
    cursor: usize,
}

impl Balancer {
    /// Whether `u` is ejected at `now`.
    pub fn is_ejected(&self, u: &Upstream, now: Instant) -> bool {
        self.upstreams
            .get(u)
            .and_then(|s| s.ejected_until)
            .is_some_and(|t| now < t)
    }

    /// Picks among `candidates` (already filtered for health and subset), skipping ejected
    /// ones unless every candidate is ejected (then, like Envoy's panic mode, all are used).
    /// `roll` is uniform in [0, 1); `hash_key` is the consistent-hash input, if any.
    pub fn pick(
        &mut self,
        candidates: &[Upstream],
        algorithm: &Algorithm,
        now: Instant,
        roll: f64,
        hash_key: Option<&str>,
    ) -> Option<Upstream> {
        let live: Vec<&Upstream> = candidates
            .iter()
            .filter(|u| !self.is_ejected(u, now))
            .collect();
        let pool: Vec<&Upstream> = if live.is_empty() {
            candidates.iter().collect()
        } else {
            live
        };
        if pool.is_empty() {
            return None;
        }
        let index = match (algorithm, hash_key) {
            (Algorithm::ConsistentHash, Some(key)) => jump_hash(hash64(key), pool.len()),
            (Algorithm::Random, _) => scale_roll(roll, pool.len()),
            (Algorithm::LeastRequest, _) if pool.len() > 1 => {
                // Power of two choices.
                let a = scale_roll(roll, pool.len());
                let b = (a + 1 + self.cursor % (pool.len() - 1)) % pool.len();
                self.cursor = self.cursor.wrapping_add(1);
                let load = |i: usize| self.upstreams.get(pool[i]).map_or(0, |s| s.active);
                if load(b) < load(a) {
                    b
                } else {
                    a
                }
            }
            _ => {
                self.cursor = self.cursor.wrapping_add(1);
                self.cursor % pool.len()
            }
        };
        Some(pool[index].clone())
    }

    /// Marks an attempt to `u` as started.
    pub fn started(&mut self, u: &Upstream) {
        self.upstreams.entry(u.clone()).or_default().active += 1;
    }

    /// Records how an attempt to `u` ended; may eject it. `pool_size` is the number of
    /// candidates, for the ejection cap.
    pub fn finished(
        &mut self,
        u: &Upstream,
        outcome: Outcome,
        outlier: Option<&OutlierSettings>,
        pool_size: usize,
        now: Instant,
    ) {
        let ejected_now = self
            .upstreams
            .values()
            .filter(|s| s.ejected_until.is_some_and(|t| now < t))
            .count();
        let state = self.upstreams.entry(u.clone()).or_default();
        state.active = state.active.saturating_sub(1);
        let (is_5xx, is_gateway) = match outcome {
            Outcome::Status(s) => (s >= 500, matches!(s, 502..=504)),
            Outcome::Failed => (true, true),
        };
        if is_5xx {
            state.consecutive_5xx += 1;
        } else {
            state.consecutive_5xx = 0;
        }
        if is_gateway {
            state.consecutive_gateway += 1;
        } else {
            state.consecutive_gateway = 0;
        }
        let Some(o) = outlier else { return };
        let tripped = o
            .consecutive_5xx
            .is_some_and(|n| state.consecutive_5xx >= n)
            || o.consecutive_gateway
                .is_some_and(|n| state.consecutive_gateway >= n);
        if !tripped || state.ejected_until.is_some_and(|t| now < t) {
            return;
        }
        // Envoy's cap, but always allowing one ejection so small pools are protected too.
        let cap = ((pool_size as u64 * u64::from(o.max_ejection_percent)) / 100).max(1) as usize;
        if ejected_now >= cap {
            return;
        }
        state.ejections += 1;
        state.ejected_until = Some(now + o.base_ejection * state.ejections);
        state.consecutive_5xx = 0;
        state.consecutive_gateway = 0;
    }

    /// Requests in flight to `u`.
    pub fn active(&self, u: &Upstream) -> u32 {
        self.upstreams.get(u).map_or(0, |s| s.active)
    }
}

fn hash64(key: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// A uniform `roll` in [0, 1) as an index into `len` (> 0) choices.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "the product is clamped to [0, len) before the cast"
)]
fn scale_roll(roll: f64, len: usize) -> usize {
    ((roll.clamp(0.0, 0.999_999) * len as f64) as usize).min(len - 1)
}

/// Lamping and Veach's jump consistent hash: few keys move when the pool changes size.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "the published algorithm's arithmetic: every value stays in [-1, buckets)"
)]
fn jump_hash(mut key: u64, buckets: usize) -> usize {
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as usize
}

/// The circuit breaker's limits for one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests that may be in flight at once.
    pub max_requests: u32,
    /// Requests that may wait for one of those slots.
    pub max_pending: u32,
}

impl Limits {
    /// From a DestinationRule's connection pool: in flight = tcp.maxConnections (HTTP/1.1 has
    /// one request per connection) capped by http2MaxRequests; pending = http1MaxPendingRequests.
    pub fn from_policy(pool: Option<&ConnectionPoolSettings>) -> Limits {
        let unlimited = u32::MAX;
        let max_connections = pool
            .and_then(|p| p.tcp.as_ref())
            .and_then(|t| t.max_connections)
            .unwrap_or(unlimited);
        let http = pool.and_then(|p| p.http.as_ref());
        let max_requests = http
            .and_then(|h| h.http2_max_requests)
            .unwrap_or(unlimited)
            .min(max_connections);
        let max_pending = http
            .and_then(|h| h.http1_max_pending_requests)
            .unwrap_or(unlimited);
        Limits {
            max_requests: max_requests.max(1),
            max_pending,
        }
    }
}

#[cfg(test)]
mod tests;
