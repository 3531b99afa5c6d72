//! The pool of outbound QUIC connections: one long-lived connection per peer cluster, made on
//! first use and remade when it has died or the peer's gateway has moved.
//!
//! Connecting is single-flight per cluster: callers that arrive while an attempt is running
//! wait for it and share its outcome, so a dead peer costs one handshake timeout, not one per
//! waiting caller. A failure is also remembered for [`HOLD_DOWN`], during which callers are
//! answered at once instead of starting another attempt that would wait out the same timeout.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isthmus_core::mesh::MeshConfig;
use isthmus_core::tls::MESH_SERVER_NAME;
use quinn::{Connection, Endpoint};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::quic::{self, codes};
use crate::{GatewayError, Stop};

/// Where and whom to connect to for one peer cluster.
#[derive(Debug, Clone)]
pub(crate) struct PeerTarget {
    pub cluster: String,
    pub addr: SocketAddr,
    pub trust_domain: String,
}

pub(crate) struct Peers {
    endpoint: Endpoint,
    connect_timeout: Duration,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

#[derive(Default)]
struct Slot {
    /// Connection attempts started so far; lets a waiter tell whether an attempt ran while it
    /// waited for the lock.
    attempts: AtomicU64,
    state: tokio::sync::Mutex<SlotState>,
}

/// How long a failed connection attempt is trusted before the next caller tries again.
pub(crate) const HOLD_DOWN: Duration = Duration::from_millis(500);

#[derive(Default)]
struct SlotState {
    conn: Option<Connection>,
    last_failure: Option<Failure>,
}

struct Failure {
    at: Instant,
    addr: SocketAddr,
    reason: String,
}

impl Peers {
    pub(crate) fn new(endpoint: Endpoint, connect_timeout: Duration) -> Self {
        Peers {
            endpoint,
            connect_timeout,
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, cluster: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(cluster.to_string()).or_default().clone()
    }

    /// A live connection to `target`'s gateway: the pooled one, or a new one.
    pub(crate) async fn connection(&self, target: &PeerTarget) -> Result<Connection, GatewayError> {
        let slot = self.slot(&target.cluster);
        let seen = slot.attempts.load(Ordering::Acquire);
        let mut state = slot.state.lock().await;
        if let Some(conn) = &state.conn {
            if conn.close_reason().is_none() && conn.remote_address() == target.addr {
                return Ok(conn.clone());
            }
        }
        if let Some(old) = state.conn.take() {
            if let Some(reason) = old.close_reason() {
                info!(cluster = %target.cluster, %reason, "connection to peer gateway lost; reconnecting");
            } else {
                info!(cluster = %target.cluster, old = %old.remote_address(), new = %target.addr,
                    "peer gateway moved; reconnecting");
                old.close(codes::STALE, b"gateway address changed");
            }
        }
        if let Some(failure) = &state.last_failure {
            // Someone else tried while we waited, or tried a moment ago: share their failure
            // rather than queueing another full handshake timeout behind it.
            let tried_meanwhile = slot.attempts.load(Ordering::Acquire) != seen;
            let recent = failure.at.elapsed() < HOLD_DOWN;
            if failure.addr == target.addr && (tried_meanwhile || recent) {
                return Err(GatewayError::PeerUnavailable {
                    cluster: target.cluster.clone(),
                    reason: failure.reason.clone(),
                });
            }
        }
        slot.attempts.fetch_add(1, Ordering::AcqRel);
        match self.connect(target).await {
            Ok(conn) => {
                info!(cluster = %target.cluster, addr = %target.addr, "connected to peer gateway");
                state.conn = Some(conn.clone());
                state.last_failure = None;
                Ok(conn)
            }
            Err(e) => {
                state.last_failure = Some(Failure {
                    at: Instant::now(),
                    addr: target.addr,
                    reason: e.chain(),
                });
                Err(e)
            }
        }
    }

    async fn connect(&self, target: &PeerTarget) -> Result<Connection, GatewayError> {
        let connecting = self
            .endpoint
            .connect(target.addr, MESH_SERVER_NAME)
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

    /// Drops pooled connections to clusters that left the mesh or whose gateway moved or
    /// disappeared, so they do not linger on keep-alives.
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
            // The slot may be mid-connect; close whatever it ends up holding.
            tokio::spawn(async move {
                let mut state = slot.state.lock().await;
                if let Some(conn) = state.conn.take() {
                    conn.close(codes::STALE, b"cluster left the mesh");
                }
            });
        }
        // Moved gateways are handled lazily by `connection`, which compares addresses.
    }

    /// Waits for configuration changes and prunes the pool after each, until `stop` fires.
    /// When the configuration sender goes away the gateway keeps its last view.
    pub(crate) async fn watch(
        self: Arc<Self>,
        mut config: tokio::sync::watch::Receiver<Arc<MeshConfig>>,
        mut stop: Stop,
    ) {
        loop {
            tokio::select! {
                _ = stop.fired() => return,
                changed = config.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let current = config.borrow_and_update().clone();
                    self.prune(&current);
                }
            }
        }
        warn!("the configuration source is gone; the gateway keeps serving its last configuration");
    }
}
