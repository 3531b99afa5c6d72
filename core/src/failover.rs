//! Global failover: which clusters receive a service's traffic, in which order, and why.
//!
//! One model (see `docs/failover.md`): the caller's own cluster first; then the priorities of
//! the service's `FailoverPolicy` (or of a `DestinationRule`'s `localityLbSetting`, or, with
//! neither, every other cluster by locality: same zone, same region, the rest). The first
//! priority whose healthy share is at least `minHealthyPercent` (and that has a healthy
//! endpoint) takes all the traffic. Failing over is immediate; coming back to a nearer
//! priority waits until it has been eligible for `hysteresis`.
//!
//! Health is combined from three sources, none of which needs configuring: the export
//! leases in the federation store (`lease_expired_at_ms`, with `onPartition` deciding what a
//! lapsed lease means), the gateway's liveness and reason codes (`gateway_down`), and the
//! sidecar's passive outlier detection (already subtracted from `healthy`).
//!
//! Everything here is pure: time comes in as arguments.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use crate::policy::isthmus::{parse_on_partition, OnPartition};
use crate::policy::isthmus::{FailoverPolicySpec, PriorityEntry};
use crate::policy::{parse_duration_istio, resolve_host, Policy, Spec};

/// Default time a nearer priority must stay eligible before traffic returns to it.
pub const DEFAULT_HYSTERESIS: Duration = Duration::from_secs(5);

impl OnPartition {
    fn describe(self) -> String {
        match self {
            OnPartition::KeepLastKnown => "keepLastKnown".into(),
            OnPartition::DrainToNext => "drainToNext".into(),
            OnPartition::WithdrawAfter(d) => format!("withdrawAfter {}", human(d)),
        }
    }
}

/// One priority as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Priority {
    Clusters(Vec<String>),
    Regions(Vec<String>),
    /// Every remaining cluster: same zone, then same region, then the rest.
    ByLocality,
}

/// The failover settings in force for one service, and where they came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// e.g. `FailoverPolicy default/reviews` or `default (local first, then by locality)`.
    pub source: String,
    pub priorities: Vec<Priority>,
    pub min_healthy_percent: u32,
    pub hysteresis: Duration,
    pub on_partition: OnPartition,
    /// Parts of the source that are accepted but not applied (shown by `isthmus explain`).
    pub ignored: Vec<String>,
    /// `localityLbSetting.distribute`, for this caller's locality: locality patterns and
    /// their weights (empty: traffic follows the priorities).
    pub distribute: Vec<(String, u32)>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            source: "default (local first, then every cluster by locality)".into(),
            priorities: vec![Priority::ByLocality],
            min_healthy_percent: 0,
            hysteresis: DEFAULT_HYSTERESIS,
            on_partition: OnPartition::DrainToNext,
            ignored: Vec::new(),
            distribute: Vec::new(),
        }
    }
}

/// The region of a `region/zone` locality.
fn region(locality: &str) -> &str {
    locality.split('/').next().unwrap_or(locality)
}

impl Settings {
    /// Settings from a validated `FailoverPolicy` spec.
    /// No `priorities` means the default order (every other cluster by locality).
    pub fn from_spec(source: String, spec: &FailoverPolicySpec) -> Settings {
        let mut priorities: Vec<Priority> = spec
            .priorities
            .iter()
            .map(|p: &PriorityEntry| {
                if p.by_locality {
                    Priority::ByLocality
                } else if !p.regions.is_empty() {
                    Priority::Regions(p.regions.clone())
                } else {
                    Priority::Clusters(p.clusters.clone())
                }
            })
            .collect();
        if priorities.is_empty() {
            priorities.push(Priority::ByLocality);
        }
        Settings {
            source,
            priorities,
            min_healthy_percent: spec.min_healthy_percent.unwrap_or(0).min(100),
            hysteresis: spec
                .hysteresis
                .as_deref()
                .and_then(parse_duration_istio)
                .unwrap_or(DEFAULT_HYSTERESIS),
            on_partition: parse_on_partition(spec.on_partition.as_ref())
                .unwrap_or(OnPartition::DrainToNext),
            ignored: Vec::new(),
            distribute: Vec::new(),
        }
    }

    /// The settings for service `name` in `namespace`, called from a cluster at
    /// `local_locality`: its own `FailoverPolicy`, else its namespace's, else a
    /// `DestinationRule` with `localityLbSetting`, else the default.
    pub fn resolve(
        policies: &[Policy],
        namespace: &str,
        name: &str,
        local_locality: Option<&str>,
    ) -> Settings {
        let mut namespace_wide = None;
        for p in policies {
            let Spec::FailoverPolicy(spec) = &p.spec else {
                continue;
            };
            if !p.namespace.eq_ignore_ascii_case(namespace) {
                continue;
            }
            match &spec.service {
                Some(s) if s.eq_ignore_ascii_case(name) => {
                    return Settings::from_spec(
                        format!("FailoverPolicy {}/{}", p.namespace, p.name),
                        spec,
                    )
                }
                None if namespace_wide.is_none() => namespace_wide = Some((p, spec)),
                _ => {}
            }
        }
        if let Some((p, spec)) = namespace_wide {
            return Settings::from_spec(
                format!("FailoverPolicy {}/{} (namespace-wide)", p.namespace, p.name),
                spec,
            );
        }
        for p in policies {
            let Spec::DestinationRule(dr) = &p.spec else {
                continue;
            };
            if resolve_host(&dr.host, &p.namespace)
                != Some((name.to_ascii_lowercase(), namespace.to_ascii_lowercase()))
            {
                continue;
            }
            let setting = dr
                .traffic_policy
                .as_ref()
                .and_then(|t| t.load_balancer.as_ref())
                .and_then(|lb| lb.locality_lb_setting.as_ref());
            if let Some(setting) = setting {
                if let Some(s) = from_locality_lb_setting(
                    format!(
                        "DestinationRule {}/{} localityLbSetting",
                        p.namespace, p.name
                    ),
                    setting,
                    local_locality,
                ) {
                    return s;
                }
            }
        }
        Settings::default()
    }
}

/// Istio's `localityLbSetting` on the same machinery: the caller's region, then the
/// `failover` target region for that region, then every other cluster by locality; the
/// `distribute` rule for the caller's locality, if any. `failoverPriority` is accepted and
/// reported as not applied.
fn from_locality_lb_setting(
    source: String,
    setting: &serde_json::Value,
    local_locality: Option<&str>,
) -> Option<Settings> {
    if setting.get("enabled").and_then(|e| e.as_bool()) == Some(false) {
        return None;
    }
    let mut settings = Settings {
        source,
        ..Settings::default()
    };
    let mut priorities = Vec::new();
    if let Some(local) = local_locality.map(region) {
        priorities.push(Priority::Regions(vec![local.to_string()]));
        let targets: Vec<String> = setting
            .get("failover")
            .and_then(|f| f.as_array())
            .into_iter()
            .flatten()
            .filter(|f| f.get("from").and_then(|v| v.as_str()) == Some(local))
            .filter_map(|f| f.get("to").and_then(|v| v.as_str()).map(str::to_string))
            .collect();
        if !targets.is_empty() {
            priorities.push(Priority::Regions(targets));
        }
    }
    priorities.push(Priority::ByLocality);
    settings.priorities = priorities;
    // The first distribute rule whose `from` matches the caller.
    settings.distribute = setting
        .get("distribute")
        .and_then(|d| d.as_array())
        .into_iter()
        .flatten()
        .find(|rule| {
            rule.get("from")
                .and_then(|f| f.as_str())
                .zip(local_locality)
                .is_some_and(|(from, local)| locality_matches(from, local))
        })
        .and_then(|rule| rule.get("to").and_then(|t| t.as_object()))
        .map(|to| {
            to.iter()
                .map(|(l, w)| {
                    let w = w.as_u64().and_then(|w| u32::try_from(w).ok()).unwrap_or(0);
                    (l.clone(), w)
                })
                .collect()
        })
        .unwrap_or_default();
    if setting.get("failoverPriority").is_some() {
        settings
            .ignored
            .push("localityLbSetting.failoverPriority is not applied".to_string());
    }
    Some(settings)
}

/// Whether `locality` (`region/zone[/subzone]`) matches an Istio locality `pattern`: segment
/// by segment, `*` matching the rest; a shorter pattern matches the localities under it.
pub fn locality_matches(pattern: &str, locality: &str) -> bool {
    let mut have = locality.split('/');
    for want in pattern.split('/') {
        if want == "*" {
            return true;
        }
        match have.next() {
            Some(h) if h.eq_ignore_ascii_case(want) => {}
            _ => return false,
        }
    }
    true
}

/// What one caller knows about one cluster that serves the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterHealth {
    pub cluster: String,
    /// `region/zone`, when the cluster published one.
    pub locality: Option<String>,
    /// Endpoints that serve the request (subset applied).
    pub endpoints: u32,
    /// Of those, healthy and not ejected by this caller's outlier detection.
    pub healthy: u32,
    /// When its export lease lapsed (unix ms); `None` while live (always for the local
    /// cluster).
    pub lease_expired_at_ms: Option<u64>,
    /// Why the path through the gateways to it is down, as this caller last saw it.
    pub gateway_down: Option<String>,
}

/// What the configuration alone says about the clusters serving `service` (endpoints
/// carrying `labels`, when a subset is asked for), as seen from `config.cluster`: endpoint
/// health from discovery and the exports, and the export leases. A caller subtracts what it
/// saw itself (ejected endpoints, unreachable gateways).
pub fn health_from_config(
    config: &crate::mesh::MeshConfig,
    service: &crate::mesh::MeshService,
    labels: Option<&BTreeMap<String, String>>,
) -> Vec<ClusterHealth> {
    let matches = |have: &BTreeMap<String, String>| {
        labels.is_none_or(|l| l.iter().all(|(k, v)| have.get(k) == Some(v)))
    };
    let locality = |c: &str| config.cluster_info(c).and_then(|i| i.locality.clone());
    let mut out = Vec::new();
    let local: Vec<_> = service
        .local_endpoints
        .iter()
        .filter(|e| matches(&e.labels))
        .collect();
    if !local.is_empty() {
        out.push(ClusterHealth {
            cluster: config.cluster.clone(),
            locality: locality(&config.cluster),
            endpoints: crate::mesh::count_u32(local.len()),
            healthy: crate::mesh::count_u32(local.iter().filter(|e| e.healthy).count()),
            lease_expired_at_ms: None,
            gateway_down: None,
        });
    }
    for r in &service.remote {
        let (endpoints, healthy) = match labels {
            Some(l) if !l.is_empty() => {
                let n = l
                    .iter()
                    .map(|(k, v)| r.subsets.get(&format!("{k}={v}")).copied().unwrap_or(0))
                    .min()
                    .unwrap_or(0);
                (n, n)
            }
            _ => (r.endpoints.max(r.healthy_endpoints), r.healthy_endpoints),
        };
        out.push(ClusterHealth {
            cluster: r.cluster.clone(),
            locality: locality(&r.cluster),
            endpoints,
            healthy,
            lease_expired_at_ms: r.lease_expired_at_ms,
            gateway_down: None,
        });
    }
    out
}

/// One cluster's row in a priority table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRow {
    pub cluster: String,
    pub locality: Option<String>,
    pub healthy: u32,
    pub endpoints: u32,
    /// `live`, `expired Ns ago (…)` or `local`.
    pub lease: String,
    /// `up` or `down: <reason>`.
    pub gateway: String,
    /// Why it is in this priority.
    pub reason: String,
}

/// One priority of the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tier {
    pub priority: usize,
    pub clusters: Vec<ClusterRow>,
    pub healthy: u32,
    pub endpoints: u32,
    pub healthy_percent: u32,
    pub eligible: bool,
    /// `active`, `standby`, `ineligible: …`, `returning in 2.1s`.
    pub state: String,
}

impl Tier {
    fn key(&self) -> String {
        self.clusters
            .iter()
            .map(|c| c.cluster.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The priority table for one service, as one caller uses it right now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    pub service: String,
    pub source: String,
    pub min_healthy_percent: u32,
    pub hysteresis_ms: u64,
    pub on_partition: String,
    pub tiers: Vec<Tier>,
    /// Index into `tiers` of the priority taking the traffic.
    pub active: Option<usize>,
    /// Clusters that export the service but receive none of its traffic, and why.
    pub excluded: Vec<ClusterRow>,
    /// Accepted settings that are not applied, and how `distribute` splits traffic.
    pub notes: Vec<String>,
    /// `localityLbSetting.distribute` for this caller: the share of each locality pattern
    /// and its clusters with a healthy endpoint (empty: the priorities decide).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub distribution: Vec<Share>,
}

/// One `to` entry of a `distribute` rule, as planned for one caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    pub localities: String,
    pub weight: u32,
    /// Its clusters with a healthy endpoint.
    pub clusters: Vec<String>,
}

impl Table {
    /// The clusters a request goes to under `distribute`: a share picked by weight (`roll`
    /// in [0, 1)) among the shares with a healthy cluster, their weights renormalized; `None`
    /// when no share has one (the priorities decide then).
    pub fn distributed_clusters(&self, roll: f64) -> Option<Vec<&str>> {
        let live: Vec<&Share> = self
            .distribution
            .iter()
            .filter(|s| s.weight > 0 && !s.clusters.is_empty())
            .collect();
        let total: u32 = live.iter().map(|s| s.weight).sum();
        if total == 0 {
            return None;
        }
        let mut point = roll.clamp(0.0, 1.0) * f64::from(total);
        let share = live
            .iter()
            .find(|s| {
                let hit = point < f64::from(s.weight);
                point -= f64::from(s.weight);
                hit
            })
            .or(live.last())?;
        Some(share.clusters.iter().map(String::as_str).collect())
    }

    /// The clusters attempt `attempt` (0 = the first) of a request goes to when its retries
    /// may leave the active priority (VirtualService `retries.retryRemoteLocalities`, as
    /// Envoy's `previous_priorities`): the active priority first, then each later priority
    /// with a healthy endpoint in turn, starting over when they run out.
    pub fn retry_clusters(&self, attempt: u32) -> Vec<&str> {
        let Some(active) = self.active else {
            return Vec::new();
        };
        let later: Vec<&Tier> = self
            .tiers
            .iter()
            .skip(active + 1)
            .filter(|t| t.healthy > 0)
            .collect();
        let turn = attempt as usize % (later.len() + 1);
        if turn == 0 {
            return self.active_clusters();
        }
        later[turn - 1]
            .clusters
            .iter()
            .filter(|c| c.healthy > 0)
            .map(|c| c.cluster.as_str())
            .collect()
    }

    /// The clusters to send to: those of the active priority with a healthy endpoint (every
    /// cluster of it in panic mode, when none has).
    pub fn active_clusters(&self) -> Vec<&str> {
        let Some(tier) = self.active.and_then(|i| self.tiers.get(i)) else {
            return Vec::new();
        };
        let healthy: Vec<&str> = tier
            .clusters
            .iter()
            .filter(|c| c.healthy > 0)
            .map(|c| c.cluster.as_str())
            .collect();
        if healthy.is_empty() {
            tier.clusters.iter().map(|c| c.cluster.as_str()).collect()
        } else {
            healthy
        }
    }
}

fn row(h: &ClusterHealth, local: &str, now_ms: u64, reason: String) -> ClusterRow {
    let lease = if h.cluster == local {
        "local".to_string()
    } else {
        match h.lease_expired_at_ms {
            None => "live".to_string(),
            Some(at) => format!(
                "expired {} ago",
                human(Duration::from_millis(now_ms.saturating_sub(at)))
            ),
        }
    };
    ClusterRow {
        cluster: h.cluster.clone(),
        locality: h.locality.clone(),
        healthy: if h.gateway_down.is_some() {
            0
        } else {
            h.healthy
        },
        endpoints: h.endpoints,
        lease,
        gateway: match &h.gateway_down {
            None => "up".into(),
            Some(r) => format!("down: {r}"),
        },
        reason,
    }
}

fn human(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Orders `clusters` (the local one included, if it serves the service) into priorities.
/// Pure: the same inputs give the same table. Hysteresis is applied by [`Hysteresis`].
pub fn plan(
    service: &str,
    settings: &Settings,
    local: &str,
    local_locality: Option<&str>,
    clusters: &[ClusterHealth],
    now_ms: u64,
) -> Table {
    let mut remaining: BTreeMap<&str, &ClusterHealth> =
        clusters.iter().map(|c| (c.cluster.as_str(), c)).collect();
    let mut groups: Vec<Vec<(&ClusterHealth, String)>> = Vec::new();
    if let Some(h) = remaining.remove(local) {
        groups.push(vec![(h, "the caller's own cluster (local first)".into())]);
    }
    let local_region = local_locality.map(region);
    for (i, p) in settings.priorities.iter().enumerate() {
        match p {
            Priority::Clusters(names) => {
                let g: Vec<_> = names
                    .iter()
                    .filter_map(|n| remaining.remove(n.as_str()))
                    .map(|h| (h, format!("named by priority {}", i + 1)))
                    .collect();
                groups.push(g);
            }
            Priority::Regions(regions) => {
                let names: Vec<&str> = remaining
                    .values()
                    .filter(|h| {
                        h.locality
                            .as_deref()
                            .is_some_and(|l| regions.iter().any(|r| r == region(l)))
                    })
                    .map(|h| h.cluster.as_str())
                    .collect();
                let g = names
                    .into_iter()
                    .filter_map(|n| remaining.remove(n))
                    .map(|h| {
                        let r = h.locality.as_deref().map(region).unwrap_or("");
                        (h, format!("region {r} named by priority {}", i + 1))
                    })
                    .collect();
                groups.push(g);
            }
            Priority::ByLocality => {
                let mut zone = Vec::new();
                let mut same_region = Vec::new();
                let mut rest = Vec::new();
                for h in std::mem::take(&mut remaining).into_values() {
                    match (local_locality, h.locality.as_deref()) {
                        (Some(a), Some(b)) if a == b => {
                            zone.push((h, format!("same zone ({b}), by locality")))
                        }
                        (Some(_), Some(b)) if Some(region(b)) == local_region => same_region
                            .push((h, format!("same region ({}), by locality", region(b)))),
                        _ => rest.push((h, "other locality, by locality".to_string())),
                    }
                }
                groups.extend([zone, same_region, rest]);
            }
        }
    }
    let mut excluded: Vec<ClusterRow> = remaining
        .into_values()
        .map(|h| {
            row(
                h,
                local,
                now_ms,
                "named by no priority of the policy".into(),
            )
        })
        .collect();

    // Lapsed leases, by onPartition.
    let mut drained = Vec::new();
    for group in &mut groups {
        group.retain_mut(|(h, reason)| {
            let Some(at) = h.lease_expired_at_ms.filter(|_| h.cluster != local) else {
                return true;
            };
            let since = Duration::from_millis(now_ms.saturating_sub(at));
            match settings.on_partition {
                OnPartition::KeepLastKnown => {
                    reason.push_str("; lease lapsed, kept (keepLastKnown)");
                    true
                }
                OnPartition::WithdrawAfter(d) if since >= d => {
                    excluded.push(row(
                        h,
                        local,
                        now_ms,
                        format!("lease lapsed {} ago: withdrawn (withdrawAfter {})", human(since), human(d)),
                    ));
                    false
                }
                OnPartition::WithdrawAfter(d) => {
                    reason.push_str(&format!(
                        "; lease lapsed, withdrawn in {}",
                        human(d - since)
                    ));
                    true
                }
                OnPartition::DrainToNext => {
                    drained.push((
                        *h,
                        format!("{reason}; lease lapsed: drained behind every other priority (drainToNext)"),
                    ));
                    false
                }
            }
        });
    }
    groups.push(drained);

    let tiers: Vec<Tier> = groups
        .into_iter()
        .filter(|g| !g.is_empty())
        .enumerate()
        .map(|(priority, g)| {
            let clusters: Vec<ClusterRow> = g
                .into_iter()
                .map(|(h, reason)| row(h, local, now_ms, reason))
                .collect();
            let healthy: u32 = clusters.iter().map(|c| c.healthy).sum();
            let endpoints: u32 = clusters.iter().map(|c| c.endpoints).sum();
            let healthy_percent = u32::try_from(
                (u64::from(healthy) * 100)
                    .checked_div(u64::from(endpoints))
                    .unwrap_or(0),
            )
            .unwrap_or(u32::MAX);
            let eligible = healthy > 0 && healthy_percent >= settings.min_healthy_percent;
            let state = if eligible {
                "standby".to_string()
            } else if healthy == 0 {
                "ineligible: no healthy endpoint".to_string()
            } else {
                format!(
                    "ineligible: {healthy_percent}% healthy, below {}%",
                    settings.min_healthy_percent
                )
            };
            Tier {
                priority,
                clusters,
                healthy,
                endpoints,
                healthy_percent,
                eligible,
                state,
            }
        })
        .collect();
    Table {
        service: service.to_string(),
        source: settings.source.clone(),
        min_healthy_percent: settings.min_healthy_percent,
        hysteresis_ms: crate::clock::millis(settings.hysteresis),
        on_partition: settings.on_partition.describe(),
        distribution: distribution(&settings.distribute, &tiers),
        notes: settings
            .ignored
            .iter()
            .cloned()
            .chain((!settings.distribute.is_empty()).then(|| {
                format!(
                    "distribute: {} (while a share has a healthy endpoint; else the priorities)",
                    settings
                        .distribute
                        .iter()
                        .map(|(l, w)| format!("{l} {w}%"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }))
            .collect(),
        tiers,
        active: None,
        excluded,
    }
}

/// The shares of `distribute` over the clusters of `tiers` with a healthy endpoint.
fn distribution(distribute: &[(String, u32)], tiers: &[Tier]) -> Vec<Share> {
    distribute
        .iter()
        .map(|(localities, weight)| Share {
            localities: localities.clone(),
            weight: *weight,
            clusters: tiers
                .iter()
                .flat_map(|t| &t.clusters)
                .filter(|c| c.healthy > 0)
                .filter(|c| {
                    c.locality
                        .as_deref()
                        .is_some_and(|l| locality_matches(localities, l))
                })
                .map(|c| c.cluster.clone())
                .collect(),
        })
        .collect()
}

/// Per-service memory that makes traffic come home only after a nearer priority has been
/// eligible for the hysteresis: which priority is active, and since when each has been
/// eligible.
#[derive(Debug, Default, Clone)]
pub struct Hysteresis {
    active: Option<String>,
    eligible_since: HashMap<String, Instant>,
}

impl Hysteresis {
    /// Picks the active priority of `table` at `now`, filling in `active` and each tier's
    /// `state`.
    pub fn decide(&mut self, table: &mut Table, hysteresis: Duration, now: Instant) {
        let keys: Vec<String> = table.tiers.iter().map(Tier::key).collect();
        self.eligible_since
            .retain(|k, _| keys.iter().any(|key| key == k));
        for (tier, key) in table.tiers.iter().zip(&keys) {
            if tier.eligible {
                self.eligible_since.entry(key.clone()).or_insert(now);
            } else {
                self.eligible_since.remove(key);
            }
        }
        let first = table.tiers.iter().position(|t| t.eligible);
        let current = self
            .active
            .as_ref()
            .and_then(|a| keys.iter().position(|k| k == a))
            .filter(|&i| table.tiers[i].eligible);
        let active = match (first, current) {
            (None, _) => {
                // Nothing is eligible: like Envoy's panic mode, try the nearest priority
                // that has endpoints at all.
                let panic = table.tiers.iter().position(|t| t.endpoints > 0);
                if let Some(i) = panic {
                    table.tiers[i].state =
                        "active (panic: no priority is eligible; trying the nearest)".into();
                }
                self.active = None;
                table.active = panic;
                return;
            }
            (Some(f), Some(c)) if f < c => {
                let since = self.eligible_since[&keys[f]];
                let waited = now.saturating_duration_since(since);
                if waited >= hysteresis {
                    f
                } else {
                    table.tiers[f].state = format!(
                        "returning in {} (eligible for {}, hysteresis {})",
                        human(hysteresis - waited),
                        human(waited),
                        human(hysteresis)
                    );
                    c
                }
            }
            (Some(_), Some(c)) => c,
            (Some(f), None) => f,
        };
        self.active = Some(keys[active].clone());
        table.tiers[active].state = "active".into();
        table.active = Some(active);
    }
}

/// Renders a table the way `isthmus explain` prints it.
pub fn render(table: &Table, from: &str) -> String {
    let mut out = format!(
        "service {} from cluster {from}\npolicy: {}\n  minHealthyPercent {}%, hysteresis {}, onPartition {}\n",
        table.service,
        table.source,
        table.min_healthy_percent,
        human(Duration::from_millis(table.hysteresis_ms)),
        table.on_partition
    );
    for n in &table.notes {
        out.push_str(&format!("  note: {n}\n"));
    }
    out.push('\n');
    for t in &table.tiers {
        let mark = if Some(t.priority) == table.active {
            "*"
        } else {
            " "
        };
        out.push_str(&format!(
            "{mark} priority {}  {}/{} healthy ({}%)  {}\n",
            t.priority, t.healthy, t.endpoints, t.healthy_percent, t.state
        ));
        for c in &t.clusters {
            out.push_str(&format!(
                "      {:<12} {:<16} {}/{} healthy  lease {}  gateway {}\n        why: {}\n",
                c.cluster,
                c.locality.as_deref().unwrap_or("-"),
                c.healthy,
                c.endpoints,
                c.lease,
                c.gateway,
                c.reason
            ));
        }
    }
    if !table.excluded.is_empty() {
        out.push_str("  receiving no traffic:\n");
        for c in &table.excluded {
            out.push_str(&format!("      {:<12} {}\n", c.cluster, c.reason));
        }
    }
    out
}

#[cfg(test)]
mod tests;
