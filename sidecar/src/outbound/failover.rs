//! Where a service's traffic goes from this sidecar: the failover priority table of
//! `isthmus_core::failover`, fed with what this sidecar sees.
//!
//! Three health sources, none configured: the export leases and endpoint health in the
//! configuration; the gateways' reason codes (a remote cluster whose tunnel is refused with
//! `Unreachable` or `NoHealthyEndpoint` is down for this caller at once); and passive
//! detection of local endpoints (a connection that cannot be made takes the endpoint out at
//! once). Down endpoints and clusters are probed every [`PROBE_EVERY`] (a TCP connect, or a
//! tunnel request through the gateway) and come back when a probe succeeds; traffic then
//! returns to them only after the policy's hysteresis.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isthmus_core::failover::{health_from_config, plan, Hysteresis, Settings, Table};
use isthmus_core::mesh::{MeshConfig, MeshService};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::balance::Upstream;
use crate::upstream::Connector;

/// How often down endpoints and clusters are probed.
pub const PROBE_EVERY: Duration = Duration::from_millis(200);
/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
struct Down {
    reason: String,
}

/// A remote cluster this sidecar cannot reach, and how to probe it.
#[derive(Debug, Clone)]
struct ClusterDown {
    reason: String,
    service: MeshService,
    port: u16,
}

#[derive(Default)]
struct State {
    endpoints: HashMap<SocketAddr, Down>,
    clusters: HashMap<String, ClusterDown>,
    hysteresis: HashMap<String, Hysteresis>,
    tables: BTreeMap<String, Table>,
}

/// This sidecar's view of upstream health, shared by its L4 and L7 paths.
#[derive(Default)]
pub struct Health {
    state: Mutex<State>,
}

fn matches(labels: Option<&BTreeMap<String, String>>, have: &BTreeMap<String, String>) -> bool {
    labels.is_none_or(|l| l.iter().all(|(k, v)| have.get(k) == Some(v)))
}

/// Which upstreams one attempt of a request may use.
#[derive(Debug, Clone, Copy)]
pub struct Pick {
    /// `Some(n)` when retries may leave the active priority (`retryRemoteLocalities`):
    /// attempt `n` goes to [`Table::retry_clusters`]`(n)`.
    pub attempt: Option<u32>,
    /// In [0, 1): picks the share under `localityLbSetting.distribute`
    /// ([`Table::distributed_clusters`]).
    pub roll: f64,
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection to local endpoint `addr` could not be made.
    pub fn endpoint_failed(&self, addr: SocketAddr, reason: &str) {
        let mut s = self.lock();
        if let std::collections::hash_map::Entry::Vacant(slot) = s.endpoints.entry(addr) {
            tracing::info!(endpoint = %addr, %reason, "local endpoint down; failing over around it");
            slot.insert(Down {
                reason: reason.to_string(),
            });
        }
    }

    /// Local endpoint `addr` answered.
    pub fn endpoint_ok(&self, addr: SocketAddr) {
        let mut s = self.lock();
        if s.endpoints.remove(&addr).is_some() {
            tracing::info!(endpoint = %addr, "local endpoint back");
        }
    }

    /// The gateway refused a tunnel to `cluster` in a way that means it cannot serve now.
    pub fn cluster_failed(&self, cluster: &str, reason: &str, service: &MeshService, port: u16) {
        let mut s = self.lock();
        if !s.clusters.contains_key(cluster) {
            tracing::info!(%cluster, %reason, "remote cluster down for this caller; failing over");
        }
        s.clusters.insert(
            cluster.to_string(),
            ClusterDown {
                reason: reason.to_string(),
                service: service.clone(),
                port,
            },
        );
    }

    /// A tunnel to `cluster` was opened.
    pub fn cluster_ok(&self, cluster: &str) {
        let mut s = self.lock();
        if s.clusters.remove(cluster).is_some() {
            tracing::info!(%cluster, "remote cluster reachable again");
        }
    }

    /// The priority tables computed most recently, by `<svc>.<ns>[/subset]`.
    pub fn tables(&self) -> BTreeMap<String, Table> {
        self.lock().tables.clone()
    }

    /// The upstreams to try for `service` (endpoints carrying `labels`, when a subset is
    /// asked for), in the active priority. The table that chose them is kept for
    /// [`Health::tables`] (`isthmus explain`).
    pub fn candidates(
        &self,
        config: &MeshConfig,
        service: &MeshService,
        labels: Option<&BTreeMap<String, String>>,
        subset: Option<&str>,
        gateway: bool,
    ) -> Vec<Upstream> {
        self.candidates_for_attempt(
            config,
            service,
            labels,
            subset,
            gateway,
            Pick {
                attempt: None,
                roll: rand::random(),
            },
        )
    }

    /// Like [`Health::candidates`], for one attempt of one request ([`Pick`]).
    pub fn candidates_for_attempt(
        &self,
        config: &MeshConfig,
        service: &MeshService,
        labels: Option<&BTreeMap<String, String>>,
        subset: Option<&str>,
        gateway: bool,
        pick: Pick,
    ) -> Vec<Upstream> {
        let now = Instant::now();
        let now_ms = isthmus_core::clock::unix_ms();
        let mut s = self.lock();
        let local_locality = config
            .cluster_info(&config.cluster)
            .and_then(|c| c.locality.clone());
        let local: Vec<_> = service
            .local_endpoints
            .iter()
            .filter(|e| matches(labels, &e.labels))
            .collect();
        let mut clusters = health_from_config(config, service, labels);
        for c in &mut clusters {
            if c.cluster == config.cluster {
                // Minus the endpoints this sidecar found dead.
                c.healthy = isthmus_core::mesh::count_u32(
                    local
                        .iter()
                        .filter(|e| e.healthy && !s.endpoints.contains_key(&e.address))
                        .count(),
                );
            } else if !gateway {
                c.gateway_down = Some("this sidecar has no gateway configured".to_string());
            } else {
                c.gateway_down = s.clusters.get(&c.cluster).map(|d| d.reason.clone());
            }
        }
        let settings = Settings::resolve(
            &config.policies,
            &service.namespace,
            &service.name,
            local_locality.as_deref(),
        );
        let key = match subset {
            Some(sub) => format!("{}/{sub}", service.key()),
            None => service.key(),
        };
        let mut table = plan(
            &key,
            &settings,
            &config.cluster,
            local_locality.as_deref(),
            &clusters,
            now_ms,
        );
        s.hysteresis.entry(key.clone()).or_default().decide(
            &mut table,
            settings.hysteresis,
            now.into_std(),
        );
        let clusters = match pick.attempt {
            Some(n) if n > 0 => table.retry_clusters(n),
            _ => table
                .distributed_clusters(pick.roll)
                .unwrap_or_else(|| table.active_clusters()),
        };
        // Panic mode (every endpoint, healthy or not) only when the attempt stays within
        // an active tier that has no healthy endpoint.
        let active = table.active_clusters();
        let panic = table
            .active
            .and_then(|i| table.tiers.get(i))
            .is_some_and(|t| t.healthy == 0)
            && clusters.iter().all(|c| active.contains(c));
        let mut upstreams = Vec::new();
        for cluster in clusters {
            if cluster == config.cluster {
                upstreams.extend(
                    local
                        .iter()
                        .filter(|e| panic || (e.healthy && !s.endpoints.contains_key(&e.address)))
                        .map(|e| Upstream::Local(e.address)),
                );
            } else {
                upstreams.push(Upstream::Remote(cluster.to_string()));
            }
        }
        for e in &local {
            if let Some(d) = s.endpoints.get(&e.address) {
                table.notes.push(format!(
                    "local endpoint {} is down: {}",
                    e.address, d.reason
                ));
            }
        }
        s.tables.insert(key, table);
        upstreams
    }

    fn down(&self) -> (Vec<SocketAddr>, Vec<(String, ClusterDown)>) {
        let s = self.lock();
        (
            s.endpoints.keys().copied().collect(),
            s.clusters
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }
}

/// Probes what is down until `stop`: local endpoints with a TCP connect, remote clusters with
/// a tunnel request through the gateway.
pub(crate) async fn probe(
    health: Arc<Health>,
    connector: Arc<Connector>,
    mut stop: watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(PROBE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = every.tick() => {}
        }
        let (endpoints, clusters) = health.down();
        for addr in endpoints {
            let up =
                tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await;
            if matches!(up, Ok(Ok(ref tcp)) if !crate::upstream::is_self_connected(tcp)) {
                health.endpoint_ok(addr);
            }
        }
        for (cluster, down) in clusters {
            let probe = connector.probe_remote(&down.service, down.port, &cluster);
            if let Ok(Ok(())) = tokio::time::timeout(PROBE_TIMEOUT, probe).await {
                health.cluster_ok(&cluster);
            }
        }
    }
}
