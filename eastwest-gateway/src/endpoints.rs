//! Choosing the local endpoint that serves an inbound tunnel: the subset filter, and the
//! least-loaded pick (fewest active tunnels, ties broken round-robin).
//!
//! Pure logic, no I/O: the inbound role asks for a pick and holds the returned [`Active`]
//! guard for as long as the tunnel lives.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use isthmus_core::mesh::Endpoint;

/// The label a bare subset name (no `=`) selects on, as Istio subsets usually do.
pub(crate) const DEFAULT_SUBSET_LABEL: &str = "version";

/// Whether `labels` satisfy `subset`: `key=value` pairs separated by `,` (all must match), or
/// a bare value meaning `version=<value>`. No subset matches everything.
pub(crate) fn subset_matches(subset: Option<&str>, labels: &BTreeMap<String, String>) -> bool {
    let Some(subset) = subset else {
        return true;
    };
    subset.split(',').all(|term| {
        let (key, value) = term.split_once('=').unwrap_or((DEFAULT_SUBSET_LABEL, term));
        labels.get(key).is_some_and(|v| v == value)
    })
}

/// Where to dial `port` on each endpoint of `endpoints` that is healthy and in `subset`.
pub(crate) fn candidates(
    endpoints: &[Endpoint],
    subset: Option<&str>,
    port: u16,
) -> Vec<SocketAddr> {
    endpoints
        .iter()
        .filter(|e| e.healthy && subset_matches(subset, &e.labels))
        .map(|e| e.dial(port))
        .collect()
}

/// Counts active tunnels per endpoint and picks the least loaded.
#[derive(Debug, Default)]
pub(crate) struct Balancer {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    active: HashMap<SocketAddr, usize>,
    /// Advances on every pick; chooses among equally loaded endpoints.
    next: usize,
}

/// One active tunnel to `addr`; dropping it releases the count.
#[derive(Debug)]
pub(crate) struct Active {
    balancer: Arc<Balancer>,
    addr: SocketAddr,
}

impl Active {
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        let mut state = self.balancer.lock();
        if let Some(count) = state.active.get_mut(&self.addr) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                state.active.remove(&self.addr);
            }
        }
    }
}

impl Balancer {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Balancer::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Picks the candidate with the fewest active tunnels (ties: round-robin) and counts one
    /// more tunnel on it. `None` when there are no candidates.
    ///
    /// The round-robin cursor walks the candidate list itself, not the list of tied
    /// candidates: the first least-loaded candidate at or after the cursor wins, and the
    /// cursor moves past it. (Indexing into the tied list instead would starve an endpoint
    /// whenever the tied set changes from one pick to the next, as it does when tunnels are
    /// short.)
    pub(crate) fn pick(self: &Arc<Self>, candidates: &[SocketAddr]) -> Option<Active> {
        let mut state = self.lock();
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        let start = state.next % n;
        let (index, addr) = (0..n)
            .map(|k| (start + k) % n)
            .map(|i| (i, candidates[i]))
            .min_by_key(|(_, a)| state.active.get(a).copied().unwrap_or(0))?;
        state.next = index + 1;
        *state.active.entry(addr).or_default() += 1;
        Some(Active {
            balancer: self.clone(),
            addr,
        })
    }

    /// Active tunnels to `addr` right now.
    #[cfg(test)]
    pub(crate) fn active(&self, addr: SocketAddr) -> usize {
        self.lock().active.get(&addr).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn no_candidates_means_no_pick() {
        assert!(Balancer::new().pick(&[]).is_none());
    }

    #[test]
    fn equally_loaded_endpoints_take_turns() {
        let b = Balancer::new();
        let eps = [addr(1), addr(2), addr(3)];
        let picks: Vec<SocketAddr> = (0..6).map(|_| b.pick(&eps).unwrap().addr()).collect();
        assert_eq!(
            picks,
            vec![addr(1), addr(2), addr(3), addr(1), addr(2), addr(3)]
        );
    }

    #[test]
    fn the_least_loaded_endpoint_is_picked_while_others_are_busy() {
        let b = Balancer::new();
        let eps = [addr(1), addr(2)];
        let first = b.pick(&eps).unwrap();
        let second = b.pick(&eps).unwrap();
        assert_ne!(first.addr(), second.addr());
        let third = b.pick(&eps).unwrap();
        // Both have one; the third lands somewhere, and the next must go to the other one.
        let fourth = b.pick(&eps).unwrap();
        assert_ne!(third.addr(), fourth.addr());
        assert_eq!(b.active(addr(1)), 2);
        assert_eq!(b.active(addr(2)), 2);
        // Finishing a tunnel on one endpoint makes it the only least-loaded choice.
        let freed = first.addr();
        drop(first);
        for _ in 0..3 {
            let next = b.pick(&eps).unwrap();
            assert_eq!(next.addr(), freed);
            drop(next);
        }
        drop((second, third, fourth));
        assert_eq!(b.active(addr(1)), 0);
        assert_eq!(b.active(addr(2)), 0);
    }

    #[test]
    fn short_tunnels_that_overlap_by_one_still_rotate_evenly() {
        // Each tunnel is still counted when the next one is picked (closing is asynchronous).
        let b = Balancer::new();
        let eps = [addr(1), addr(2), addr(3)];
        let mut counts = HashMap::new();
        let mut previous = b.pick(&eps).unwrap();
        for _ in 0..299 {
            let next = b.pick(&eps).unwrap();
            *counts.entry(previous.addr()).or_insert(0) += 1;
            previous = next;
        }
        *counts.entry(previous.addr()).or_insert(0) += 1;
        for ep in eps {
            assert_eq!(counts[&ep], 100, "{counts:?}");
        }
    }

    #[test]
    fn load_on_endpoints_outside_the_candidates_is_ignored() {
        let b = Balancer::new();
        let _busy = b.pick(&[addr(9)]).unwrap();
        assert_eq!(b.pick(&[addr(1)]).unwrap().addr(), addr(1));
    }

    #[test]
    fn subsets_select_by_label_pairs_or_by_version() {
        let v1 = labels(&[("version", "v1"), ("zone", "a")]);
        assert!(subset_matches(None, &v1));
        assert!(subset_matches(Some("v1"), &v1));
        assert!(subset_matches(Some("version=v1"), &v1));
        assert!(subset_matches(Some("version=v1,zone=a"), &v1));
        assert!(!subset_matches(Some("v2"), &v1));
        assert!(!subset_matches(Some("version=v1,zone=b"), &v1));
        assert!(!subset_matches(Some("tier=gold"), &v1));
        assert!(!subset_matches(Some("v1"), &labels(&[])));
    }

    #[test]
    fn only_healthy_endpoints_in_the_subset_are_candidates() {
        let ep = |port, version: &str, healthy| Endpoint {
            address: addr(port),
            labels: labels(&[("version", version)]),
            identity: String::new(),
            healthy,
            ports: Default::default(),
        };
        let eps = [ep(1, "v1", true), ep(2, "v2", true), ep(3, "v1", false)];
        assert_eq!(candidates(&eps, None, 80), vec![addr(1), addr(2)]);
        assert_eq!(candidates(&eps, Some("v1"), 80), vec![addr(1)]);
        assert!(candidates(&eps, Some("v3"), 80).is_empty());
    }

    #[test]
    fn a_port_with_its_own_target_is_dialled_there() {
        let mut ep = Endpoint {
            address: "10.1.0.5:9080".parse().unwrap(),
            labels: labels(&[]),
            identity: String::new(),
            healthy: true,
            ports: Default::default(),
        };
        ep.ports.insert(9090, 8443);
        let eps = [ep];
        assert_eq!(
            candidates(&eps, None, 9080),
            vec!["10.1.0.5:9080".parse().unwrap()]
        );
        assert_eq!(
            candidates(&eps, None, 9090),
            vec!["10.1.0.5:8443".parse().unwrap()]
        );
    }
}
