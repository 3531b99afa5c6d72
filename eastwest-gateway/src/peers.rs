//! The pool of QUIC connections to peer gateways: one long-lived connection per peer cluster,
//! whichever side dialled it, reconnected with backoff when it dies.
//!
//! - **Reuse both ways.** A connection a peer gateway dialled to us is adopted into the pool
//!   (once its certificate names a member cluster), and we open our streams to that cluster on
//!   it too; connections we dial are served for the peer's streams the same way. So between
//!   two gateways there is one connection, used in both directions. (Only a simultaneous first
//!   dial from both sides leaves two; each side then keeps using the one it holds, both are
//!   served, and neither is closed under its tunnels.)
//! - **Single flight.** Callers that arrive while a first connection attempt is running wait
//!   for it and share its outcome, so a dead peer costs one handshake timeout, not one per
//!   caller.
//! - **Fast failure.** Once a peer has failed (a connection attempt failed, or a connection
//!   died: keep-alives stopped being answered within the idle timeout, or the peer closed it),
//!   callers are answered at once with [`GatewayError::PeerUnavailable`] while a background
//!   task reconnects with exponential backoff ([`backoff`]), so sidecars can fail over
//!   immediately instead of waiting for handshakes.
//! - **Moves and departures.** A dialled connection to an address the configuration no longer
//!   gives is replaced; clusters that left the mesh lose their connection and reconnect task.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isthmus_core::mesh::MeshConfig;
use isthmus_core::tls::TrustBundles;
use quinn::{Connection, Endpoint};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::metrics::{Metrics, PeerLabels};
use crate::quic::{self, codes};
use crate::{GatewayError, Stop};

/// First delay before a reconnect attempt after the first failure.
pub(crate) const BACKOFF_INITIAL: Duration = Duration::from_millis(250);
/// Longest delay between two reconnect attempts.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(4);
/// How often the round-trip time of each connection is sampled into the metrics.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// The delay before reconnect attempt number `failures` (1 = right after the first failure):
/// zero for the first, then doubling from [`BACKOFF_INITIAL`] up to [`BACKOFF_MAX`], with ±20%
/// jitter so that many gateways do not retry in step.
pub(crate) fn backoff(failures: u32) -> Duration {
    if failures <= 1 {
        return Duration::ZERO;
    }
    let exp = (failures - 2).min(16);
    let base = BACKOFF_INITIAL.saturating_mul(1u32 << exp).min(BACKOFF_MAX);
    let jitter = 0.8 + 0.4 * rand::random::<f64>();
    base.mul_f64(jitter)
}

/// Where and whom to connect to for one peer cluster.
#[derive(Debug, Clone)]
pub(crate) struct PeerTarget {
    pub cluster: String,
    pub addr: SocketAddr,
    pub trust_domain: String,
}

/// A connection to a peer gateway, served for its streams by the inbound role.
#[derive(Debug)]
pub(crate) struct Established {
    pub conn: Connection,
    pub cluster: String,
}

pub(crate) struct Peers {
    /// This gateway's own cluster.
    own: String,
    /// Whether pairs are connected before their first tunnel ([`Peers::warm`]): with the QUIC
    /// transport, whose connections this pool holds.
    warm: bool,
    endpoint: Endpoint,
    config: watch::Receiver<Arc<MeshConfig>>,
    /// The member bundles the handshakes verify against: a peer refused for want of its
    /// bundle is dialled again as soon as they change, not after the backoff.
    trust: Arc<TrustBundles>,
    connect_timeout: Duration,
    metrics: Arc<Metrics>,
    /// Connections we dialled, for the inbound role to serve the peer's streams on.
    serve: mpsc::UnboundedSender<Established>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    stop: Stop,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").field("own", &self.own).finish()
    }
}

#[derive(Default)]
struct Slot {
    state: tokio::sync::Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    conn: Option<Pooled>,
    /// Set while the peer is considered down: callers fail at once.
    down: Option<Down>,
    /// Whether a background reconnect task is running for this slot.
    reconnecting: bool,
    /// Bumped whenever the slot's connection changes, so a stale loss report is ignored.
    generation: u64,
}

#[derive(Clone)]
struct Pooled {
    conn: Connection,
    /// `Some(addr)` when we dialled it (to that address); `None` when the peer dialled us.
    dialled: Option<SocketAddr>,
}

struct Down {
    failures: u32,
    reason: String,
}

impl Peers {
    #[allow(clippy::too_many_arguments, reason = "one constructor, called once")]
    pub(crate) fn new(
        own: String,
        warm: bool,
        endpoint: Endpoint,
        config: watch::Receiver<Arc<MeshConfig>>,
        trust: Arc<TrustBundles>,
        connect_timeout: Duration,
        metrics: Arc<Metrics>,
        serve: mpsc::UnboundedSender<Established>,
        stop: Stop,
    ) -> Self {
        Peers {
            own,
            warm,
            endpoint,
            config,
            trust,
            connect_timeout,
            metrics,
            serve,
            slots: Mutex::new(HashMap::new()),
            stop,
        }
    }

    fn slot(&self, cluster: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(cluster.to_string()).or_default().clone()
    }

    /// The gateway address and trust domain of `cluster`, from the current configuration.
    pub(crate) fn target(&self, cluster: &str) -> Result<PeerTarget, String> {
        let config = self.config.borrow().clone();
        let info = config
            .cluster_info(cluster)
            .ok_or_else(|| format!("cluster {cluster} is not a member of the mesh"))?;
        let addr = info
            .gateway
            .ok_or_else(|| format!("cluster {cluster} has no known gateway"))?;
        Ok(PeerTarget {
            cluster: cluster.to_string(),
            addr,
            trust_domain: info.trust_domain.clone(),
        })
    }

    /// A live connection to `target`'s gateway: the pooled one, or a new one on a cold start.
    /// Fails at once while the peer is down (a reconnect task is then at work).
    pub(crate) async fn connection(
        self: &Arc<Self>,
        target: &PeerTarget,
    ) -> Result<Connection, GatewayError> {
        let slot = self.slot(&target.cluster);
        let mut state = slot.state.lock().await;
        if let Some(pooled) = &state.conn {
            let moved = pooled.dialled.is_some_and(|addr| addr != target.addr);
            if pooled.conn.close_reason().is_none() && !moved {
                return Ok(pooled.conn.clone());
            }
            if moved {
                info!(cluster = %target.cluster, new = %target.addr, "peer gateway moved; reconnecting");
                pooled.conn.close(codes::STALE, b"gateway address changed");
                state.conn = None;
                state.generation += 1;
            } else {
                // Its loss watcher has not run yet; treat it as lost now.
                let reason = pooled
                    .conn
                    .close_reason()
                    .map_or_else(String::new, |r| r.to_string());
                self.mark_down(&target.cluster, &mut state, &slot, reason);
            }
        }
        if let Some(reason) = state.down.as_ref().map(|d| d.reason.clone()) {
            if !state.reconnecting {
                // The last reconnect task gave up (the gateway was gone from the
                // configuration for a moment); it is back, so start another.
                state.reconnecting = true;
                let this = self.clone();
                let slot = slot.clone();
                let cluster = target.cluster.clone();
                tokio::spawn(async move { this.reconnect(cluster, slot).await });
            }
            return Err(GatewayError::PeerUnavailable {
                cluster: target.cluster.clone(),
                reason,
            });
        }
        // Cold start (or after a move): connect now, holding the slot so that concurrent
        // callers wait for this attempt and share its outcome.
        match self.connect(target).await {
            Ok(conn) => {
                self.install(&mut state, &target.cluster, conn.clone(), Some(target.addr));
                Ok(conn)
            }
            Err(e) => {
                warn!(cluster = %target.cluster, error = %e.chain(), "connecting to peer gateway failed");
                self.mark_down(&target.cluster, &mut state, &slot, e.chain());
                Err(e)
            }
        }
    }

    /// Adopts a connection a peer gateway of `cluster` dialled to us, unless the pool already
    /// holds a live one for that cluster.
    pub(crate) async fn adopt(self: &Arc<Self>, cluster: &str, conn: &Connection) {
        let slot = self.slot(cluster);
        let mut state = slot.state.lock().await;
        let live = state
            .conn
            .as_ref()
            .is_some_and(|p| p.conn.close_reason().is_none());
        if live {
            debug!(%cluster, "keeping the pooled connection; the new one is served but not pooled");
            return;
        }
        debug!(%cluster, "adopting the peer's connection for our own streams too");
        self.install(&mut state, cluster, conn.clone(), None);
    }

    fn install(
        self: &Arc<Self>,
        state: &mut SlotState,
        cluster: &str,
        conn: Connection,
        dialled: Option<SocketAddr>,
    ) {
        state.generation += 1;
        state.down = None;
        state.conn = Some(Pooled {
            conn: conn.clone(),
            dialled,
        });
        if dialled.is_some() {
            // The peer may adopt it and open streams to us on it.
            let _ = self.serve.send(Established {
                conn: conn.clone(),
                cluster: cluster.to_string(),
            });
        }
        let generation = state.generation;
        let this = self.clone();
        let cluster = cluster.to_string();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                reason = conn.closed() => this.lost(&cluster, generation, reason.to_string()).await,
                _ = stop.fired() => {}
            }
        });
    }

    /// The pooled connection of `cluster` (generation `generation`) has closed.
    async fn lost(self: &Arc<Self>, cluster: &str, generation: u64, reason: String) {
        let Some(slot) = self.existing_slot(cluster) else {
            return;
        };
        let mut state = slot.state.lock().await;
        if state.generation != generation {
            return;
        }
        info!(%cluster, %reason, "connection to peer gateway lost");
        self.mark_down(
            cluster,
            &mut state,
            &slot,
            format!("connection lost: {reason}"),
        );
    }

    fn existing_slot(&self, cluster: &str) -> Option<Arc<Slot>> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.get(cluster).cloned()
    }

    /// Records a failure, answers callers at once from now on, and makes sure a reconnect task
    /// is running.
    fn mark_down(
        self: &Arc<Self>,
        cluster: &str,
        state: &mut SlotState,
        slot: &Arc<Slot>,
        reason: String,
    ) {
        state.conn = None;
        state.generation += 1;
        let failures = state.down.as_ref().map_or(0, |d| d.failures) + 1;
        state.down = Some(Down { failures, reason });
        if !state.reconnecting {
            state.reconnecting = true;
            let this = self.clone();
            let slot = slot.clone();
            let cluster = cluster.to_string();
            tokio::spawn(async move { this.reconnect(cluster, slot).await });
        }
    }

    /// Reconnects with backoff until connected, until the cluster has no gateway any more, or
    /// until the gateway stops. Runs without holding the slot, so callers keep failing fast.
    async fn reconnect(self: Arc<Self>, cluster: String, slot: Arc<Slot>) {
        let mut stop = self.stop.clone();
        let mut bundles = self.trust.changes();
        bundles.mark_unchanged();
        loop {
            let failures = slot
                .state
                .lock()
                .await
                .down
                .as_ref()
                .map_or(1, |d| d.failures);
            tokio::select! {
                _ = stop.fired() => return,
                _ = tokio::time::sleep(backoff(failures)) => {}
                // New bundles (the peer's may have just arrived): dial now.
                Ok(()) = bundles.changed() => {
                    debug!(%cluster, "trust bundles changed; dialling the peer gateway again");
                }
            }
            let target = match self.target(&cluster) {
                Ok(target) => target,
                Err(reason) => {
                    debug!(%cluster, %reason, "no longer reconnecting");
                    slot.state.lock().await.reconnecting = false;
                    return;
                }
            };
            let outcome = tokio::select! {
                _ = stop.fired() => return,
                outcome = self.connect(&target) => outcome,
            };
            let mut state = slot.state.lock().await;
            match outcome {
                Ok(conn) => {
                    info!(%cluster, addr = %target.addr, "reconnected to peer gateway");
                    state.reconnecting = false;
                    // The peer may have reached us meanwhile; keep a live adopted connection.
                    let live = state
                        .conn
                        .as_ref()
                        .is_some_and(|p| p.conn.close_reason().is_none());
                    if live {
                        // Still served for the peer's streams; unused by us.
                        let _ = self.serve.send(Established { conn, cluster });
                    } else {
                        self.install(&mut state, &cluster, conn, Some(target.addr));
                    }
                    return;
                }
                Err(e) => {
                    if state.conn.is_some() {
                        // Adopted a peer's connection meanwhile: done.
                        state.reconnecting = false;
                        return;
                    }
                    let down = state.down.get_or_insert(Down {
                        failures: 0,
                        reason: String::new(),
                    });
                    down.failures += 1;
                    down.reason = e.chain();
                    if down.failures == 1 {
                        warn!(%cluster, error = %down.reason, "peer gateway unreachable; retrying with backoff");
                    } else {
                        debug!(%cluster, failures = down.failures, error = %down.reason, "reconnect failed");
                    }
                }
            }
        }
    }

    async fn connect(&self, target: &PeerTarget) -> Result<Connection, GatewayError> {
        let started = Instant::now();
        let result = self.handshake(target).await;
        match &result {
            Ok(_) => {
                self.metrics
                    .handshake_took(&target.cluster, started.elapsed().as_secs_f64());
                info!(cluster = %target.cluster, addr = %target.addr,
                    took = ?started.elapsed(), "connected to peer gateway");
            }
            Err(e) => {
                self.metrics
                    .connect_failures
                    .get_or_create(&PeerLabels {
                        peer: target.cluster.clone(),
                    })
                    .inc();
                // The caller logs: once per outage at warn, retries at debug.
                debug!(cluster = %target.cluster, error = %e.chain(), "connecting to peer gateway failed");
            }
        }
        result
    }

    async fn handshake(&self, target: &PeerTarget) -> Result<Connection, GatewayError> {
        let connecting = self
            .endpoint
            .connect(target.addr, &quic::server_name(&target.cluster))
            .map_err(|source| GatewayError::Connect {
                cluster: target.cluster.clone(),
                addr: target.addr,
                source,
            })?;
        let conn = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Err(_) => {
                return Err(GatewayError::HandshakeTimeout {
                    cluster: target.cluster.clone(),
                    addr: target.addr,
                    after: self.connect_timeout,
                })
            }
            Ok(Err(source)) => {
                return Err(GatewayError::Handshake {
                    cluster: target.cluster.clone(),
                    addr: target.addr,
                    source,
                })
            }
            Ok(Ok(conn)) => conn,
        };
        // The TLS verifier admitted a gateway of *some* member; this connection must reach the
        // gateway of the cluster we were asked for.
        let peer = quic::peer_id(&conn);
        let expected = peer.as_ref().is_some_and(|id| {
            id.is_gateway() && id.trust_domain().eq_ignore_ascii_case(&target.trust_domain)
        });
        if !expected {
            conn.close(codes::WRONG_PEER, b"not the expected cluster's gateway");
            return Err(GatewayError::WrongPeer {
                cluster: target.cluster.clone(),
                addr: target.addr,
                trust_domain: target.trust_domain.clone(),
                found: peer.map_or_else(|| "no SPIFFE identity".to_string(), |id| id.to_string()),
            });
        }
        Ok(conn)
    }

    /// Drops pooled connections of clusters that left the mesh or lost their gateway, so they
    /// do not linger on keep-alives (their reconnect tasks end on their own).
    pub(crate) fn prune(&self, config: &MeshConfig) {
        let stale: Vec<(String, Arc<Slot>)> = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            let names: Vec<String> = slots
                .keys()
                .filter(|name| config.cluster_info(name).and_then(|c| c.gateway).is_none())
                .cloned()
                .collect();
            names
                .into_iter()
                .filter_map(|n| slots.remove(&n).map(|s| (n, s)))
                .collect()
        };
        for (cluster, slot) in stale {
            debug!(%cluster, "dropping the pooled connection of a cluster without a gateway");
            self.metrics.connections.remove(&PeerLabels {
                peer: cluster.clone(),
            });
            self.metrics
                .rtt_seconds
                .remove(&PeerLabels { peer: cluster });
            // The slot may be mid-connect; close whatever it ends up holding.
            tokio::spawn(async move {
                let mut state = slot.state.lock().await;
                state.generation += 1;
                if let Some(pooled) = state.conn.take() {
                    pooled.conn.close(codes::STALE, b"cluster left the mesh");
                }
            });
        }
        // Moved gateways are handled lazily by `connection`, which compares addresses.
    }

    /// Connects to the gateway of each member cluster whose name sorts after this one's that
    /// has none yet, so every pair of gateways is connected before its first tunnel (one
    /// connection per pair: the other side adopts it, and dials the clusters sorting after
    /// it). A peer that cannot be reached yet is retried with backoff, and at once when new
    /// trust bundles arrive (its own may have been missing). Each attempt shares the slot's
    /// single flight with callers.
    pub(crate) fn warm(self: &Arc<Self>, config: &MeshConfig) {
        if !self.warm {
            return;
        }
        for cluster in &config.clusters {
            if cluster.name <= self.own || cluster.gateway.is_none() {
                continue;
            }
            let Ok(target) = self.target(&cluster.name) else {
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.connection(&target).await {
                    debug!(cluster = %target.cluster, error = %e, "warming the connection to a peer gateway failed; retrying");
                }
            });
        }
    }

    /// The member clusters this gateway holds a live connection to (dialled or adopted).
    pub(crate) async fn connected(&self) -> std::collections::BTreeSet<String> {
        self.pooled()
            .await
            .into_iter()
            .filter_map(|(cluster, conn)| conn.map(|_| cluster))
            .collect()
    }

    /// Every slot's cluster with its pooled connection, when that one is live.
    async fn pooled(&self) -> Vec<(String, Option<Connection>)> {
        let slots: Vec<(String, Arc<Slot>)> = {
            let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let mut pooled = Vec::with_capacity(slots.len());
        for (cluster, slot) in slots {
            let conn = slot
                .state
                .lock()
                .await
                .conn
                .as_ref()
                .map(|p| p.conn.clone())
                .filter(|c| c.close_reason().is_none());
            pooled.push((cluster, conn));
        }
        pooled
    }

    /// Samples each pooled connection's round-trip time and liveness into the metrics.
    async fn sample(&self) {
        for (cluster, conn) in self.pooled().await {
            let labels = PeerLabels { peer: cluster };
            match conn {
                Some(conn) => {
                    self.metrics.connections.get_or_create(&labels).set(1);
                    self.metrics
                        .rtt_seconds
                        .get_or_create(&labels)
                        .set(conn.rtt().as_secs_f64());
                }
                None => {
                    self.metrics.connections.get_or_create(&labels).set(0);
                }
            }
        }
    }

    /// Follows configuration changes (pruning the pool and warming it after each) and samples the metrics,
    /// until `stop` fires. When the configuration sender goes away the gateway keeps its last
    /// view.
    pub(crate) async fn watch(self: Arc<Self>, mut stop: Stop) {
        let mut config = self.config.clone();
        let mut follow = true;
        let current = config.borrow_and_update().clone();
        self.warm(&current);
        let mut ticker = tokio::time::interval(SAMPLE_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.fired() => return,
                _ = ticker.tick() => self.sample().await,
                changed = config.changed(), if follow => {
                    if changed.is_err() {
                        warn!("the configuration source is gone; the gateway keeps serving its last configuration");
                        follow = false;
                        continue;
                    }
                    let current = config.borrow_and_update().clone();
                    self.prune(&current);
                    self.warm(&current);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_once_then_doubles_up_to_the_cap() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::ZERO);
        let within =
            |d: Duration, base: Duration| d >= base.mul_f64(0.79) && d <= base.mul_f64(1.21);
        assert!(within(backoff(2), BACKOFF_INITIAL));
        assert!(within(backoff(3), BACKOFF_INITIAL * 2));
        assert!(within(backoff(4), BACKOFF_INITIAL * 4));
        for n in 6..100 {
            assert!(within(backoff(n), BACKOFF_MAX), "{n}: {:?}", backoff(n));
        }
    }
}
