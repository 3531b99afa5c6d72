//! The federation store: a replicated key-value map with watches, built on raft-rs, that
//! holds what must be the same in every cluster of the mesh (cluster membership, service
//! exports, mesh-wide policies, trust bundles). Every cluster's control plane hosts one
//! member.
//!
//! Writes ([`Store::put`], [`Store::delete`]) work on any member: they are proposed to raft
//! (a follower forwards them to the leader) and return the revision — the raft index of
//! the entry — once this member has applied them. Reads ([`Store::get`], [`Store::list`])
//! are served from the local replica with no network hop. [`Store::revision`] and
//! [`Store::subscribe`] tell readers when something changed.
//!
//! Starting is two steps, so a whole federation can run in one process on port 0:
//! [`bind`] the peer listener (and learn its address), then [`Binding::start`] with every
//! member's address.
//!
//! Tasks a running member owns (all stopped by [`Store::shutdown`]):
//! - the raft loop (`node.rs`): ticks raft, steps incoming messages, proposes writes, and
//!   handles each `Ready` in the order raft requires (persist, send, apply);
//! - the peer gRPC server (`server.rs`): `RaftPeer.Send` on the peer listener, decoding and
//!   checking raft messages before handing them to the raft loop;
//! - one client task per other member (`transport.rs`): a bounded queue drained into
//!   `RaftPeer.Send` batches, dropping messages rather than ever blocking the raft loop.
//!
//! Walking-skeleton limits: the log is kept in memory (the `LogStore` trait in `storage.rs`
//! is the seam a durable store replaces) and the member set is fixed at start.

mod error;
mod logging;
mod node;
mod proposals;
mod proto;
mod replica;
mod server;
mod state;
mod storage;
mod transport;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

pub use error::StoreError;
pub use replica::{MemberStatus, Role};
pub use state::{Record, WatchEvent};

use node::{NodeConfig, NodeInputs, ProposeRequest, RaftNode};
use replica::Replica;
use state::Command;
use storage::MemLogStore;
use transport::{GrpcTiming, GrpcTransport};

/// How many raft messages from peers wait for the raft loop.
const INBOUND_QUEUE: usize = 4096;
/// How many writes wait for the raft loop before `put`/`delete` callers wait.
const PROPOSAL_QUEUE: usize = 1024;
/// How long [`Store::shutdown`] waits for each task before aborting it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Lower bound of the per-RPC timeout between members.
const MIN_RPC_TIMEOUT: Duration = Duration::from_secs(1);

/// How a member joins a static federation, and its raft timing.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// This member's raft id (non-zero, and a key of `peers`).
    pub node_id: u64,
    /// Every member's raft id and peer address, this member included. Every member must be
    /// started with the same ids.
    pub peers: BTreeMap<u64, SocketAddr>,
    /// Length of one raft tick (default 100ms).
    pub tick: Duration,
    /// Ticks without a leader before a follower starts an election (default 10).
    pub election_ticks: usize,
    /// Ticks between the leader's heartbeats (default 2).
    pub heartbeat_ticks: usize,
    /// How long a write may take before it fails with [`StoreError::ProposalTimeout`]
    /// (default 5s).
    pub proposal_timeout: Duration,
}

impl StoreOptions {
    /// Options with the default timing.
    pub fn new(node_id: u64, peers: BTreeMap<u64, SocketAddr>) -> Self {
        StoreOptions {
            node_id,
            peers,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            proposal_timeout: Duration::from_secs(5),
        }
    }

    fn node_config(&self) -> Result<NodeConfig, StoreError> {
        let invalid = |field, reason: String| StoreError::InvalidOptions { field, reason };
        if self.node_id == 0 {
            return Err(invalid("node_id", "0 is not a valid raft id".to_string()));
        }
        if !self.peers.contains_key(&self.node_id) {
            return Err(invalid(
                "peers",
                format!("does not contain this member's id {}", self.node_id),
            ));
        }
        if self.tick.is_zero() {
            return Err(invalid("tick", "must be longer than zero".to_string()));
        }
        if self.proposal_timeout.is_zero() {
            return Err(invalid(
                "proposal_timeout",
                "must be longer than zero".to_string(),
            ));
        }
        if self.heartbeat_ticks == 0 || self.election_ticks <= self.heartbeat_ticks {
            return Err(invalid(
                "election_ticks",
                format!(
                    "must be greater than heartbeat_ticks ({}), which must be at least 1; got {}",
                    self.heartbeat_ticks, self.election_ticks
                ),
            ));
        }
        let config = NodeConfig {
            id: self.node_id,
            tick: self.tick,
            election_ticks: self.election_ticks,
            heartbeat_ticks: self.heartbeat_ticks,
            proposal_timeout: self.proposal_timeout,
            incarnation: proposals::new_incarnation(),
        };
        config.validate()?;
        Ok(config)
    }
}

/// Binds the peer listener. Port 0 picks a free port; read it with
/// [`Binding::local_addr`] before starting the members.
pub async fn bind(listen: SocketAddr) -> Result<Binding, StoreError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| StoreError::Bind {
            addr: listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(StoreError::LocalAddr)?;
    Ok(Binding {
        listener,
        local_addr,
    })
}

/// A bound peer listener, not yet serving.
#[derive(Debug)]
pub struct Binding {
    listener: TcpListener,
    local_addr: SocketAddr,
}

impl Binding {
    /// The address the peer listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Starts the member: the peer server, the raft loop and the peer clients.
    pub async fn start(self, opts: StoreOptions) -> Result<Store, StoreError> {
        let config = opts.node_config()?;
        let node_id = config.id;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
        let (proposals_tx, proposals_rx) = mpsc::channel(PROPOSAL_QUEUE);
        let replica = Arc::new(Replica::new(node_id));

        let timing = GrpcTiming {
            rpc_timeout: config.election_timeout().max(MIN_RPC_TIMEOUT),
            reconnect_backoff: config.heartbeat_interval(),
        };
        let (transport, mut tasks) =
            GrpcTransport::start(node_id, &opts.peers, timing, shutdown_rx.clone());
        let store = MemLogStore::new(node::voters(&opts.peers));
        let node = match RaftNode::new(config, store, Arc::new(transport), replica.clone()) {
            Ok(node) => node,
            Err(err) => {
                shutdown_tx.send_replace(true);
                return Err(err);
            }
        };
        replica.publish_status(node.status());
        tasks.push(tokio::spawn(node::run(
            node,
            NodeInputs {
                inbound: inbound_rx,
                proposals: proposals_rx,
                shutdown: shutdown_rx.clone(),
            },
        )));

        let members: BTreeSet<u64> = opts.peers.keys().copied().collect();
        let service = server::PeerService::new(node_id, members, inbound_tx);
        let incoming = TcpListenerStream::new(self.listener);
        let mut server_shutdown = shutdown_rx;
        tasks.push(tokio::spawn(async move {
            let signal = async move {
                let _ = server_shutdown.wait_for(|stopped| *stopped).await;
            };
            if let Err(err) = tonic::transport::Server::builder()
                // One service, so no router (tonic's `router` feature would pull in axum).
                .serve_with_incoming_shutdown(service, incoming, signal)
                .await
            {
                tracing::error!(member = node_id, "federation peer server failed: {err}");
            }
        }));

        tracing::info!(
            member = node_id,
            peer_addr = %self.local_addr,
            members = ?opts.peers,
            tick = ?opts.tick,
            election_ticks = opts.election_ticks,
            heartbeat_ticks = opts.heartbeat_ticks,
            "federation store member started"
        );
        Ok(Store {
            inner: Arc::new(Inner {
                peer_addr: self.local_addr,
                replica,
                proposals: proposals_tx,
                shutdown: shutdown_tx,
                tasks: Mutex::new(tasks),
            }),
        })
    }
}

/// A handle on a running member. Cheap to clone; every clone talks to the same member.
/// When the last handle is dropped the member stops (without waiting, unlike
/// [`Store::shutdown`]).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    peer_addr: SocketAddr,
    replica: Arc<Replica>,
    proposals: mpsc::Sender<ProposeRequest>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

impl Store {
    /// The address of this member's peer listener.
    pub fn peer_addr(&self) -> SocketAddr {
        self.inner.peer_addr
    }

    /// Sets `key` to `value` and returns the revision of the write once this member has
    /// applied it. Works on any member; retried internally while there is no leader, until
    /// the proposal timeout.
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        self.write(Command::Put {
            key: key.to_string(),
            value,
        })
        .await
    }

    /// Removes `key` and returns the revision of the delete once this member has applied
    /// it. Deleting a missing key succeeds and changes nothing.
    pub async fn delete(&self, key: &str) -> Result<u64, StoreError> {
        self.write(Command::Delete {
            key: key.to_string(),
        })
        .await
    }

    async fn write(&self, command: Command) -> Result<u64, StoreError> {
        state::validate_key(command.key()).map_err(|reason| StoreError::InvalidKey {
            key: command.key().to_string(),
            reason,
        })?;
        let (reply, outcome) = oneshot::channel();
        self.inner
            .proposals
            .send(ProposeRequest { command, reply })
            .await
            .map_err(|_| StoreError::Stopped)?;
        outcome.await.map_err(|_| StoreError::Stopped)?
    }

    /// The record at `key` in this member's replica.
    pub fn get(&self, key: &str) -> Option<Record> {
        self.inner.replica.get(key)
    }

    /// Every record whose key starts with `prefix` in this member's replica, sorted by key.
    pub fn list(&self, prefix: &str) -> Vec<(String, Record)> {
        self.inner.replica.list(prefix)
    }

    /// The highest raft index applied to this replica. It changes whenever anything is
    /// applied (including the empty entry of a new leader), so after a write returns
    /// revision `r`, any replica whose revision is at least `r` holds that write.
    pub fn revision(&self) -> watch::Receiver<u64> {
        self.inner.replica.revision()
    }

    /// Every change applied to this replica from now on, in order.
    pub fn subscribe(&self) -> broadcast::Receiver<WatchEvent> {
        self.inner.replica.subscribe()
    }

    /// This member's raft state, as of its last loop iteration.
    pub fn status(&self) -> MemberStatus {
        self.inner.replica.status()
    }

    /// Stops the raft loop, the peer server and the peer clients, and waits for them; the
    /// peer port is closed when this returns. Waiting writes fail with
    /// [`StoreError::Stopped`]. Other handles on the same member see it stopped.
    pub async fn shutdown(self) {
        self.inner.shutdown.send_replace(true);
        let tasks = match self.inner.tasks.lock() {
            Ok(mut tasks) => std::mem::take(&mut *tasks),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for mut task in tasks {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                task.abort();
                let _ = task.await;
            }
        }
        tracing::info!(peer_addr = %self.inner.peer_addr, "federation store member stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_send_sync<T: Send + Sync>() {}
    fn is_send<T: Send>(_: T) {}

    #[test]
    fn handles_and_errors_can_cross_tasks() {
        is_send_sync::<Store>();
        is_send_sync::<StoreError>();
        is_send_sync::<WatchEvent>();
    }

    // Compiles only if the write futures can be spawned on a multi-threaded runtime.
    #[allow(dead_code)]
    fn write_futures_are_send(store: &Store) {
        is_send(store.put("k", Vec::new()));
        is_send(store.delete("k"));
        is_send(store.clone().shutdown());
    }
}
