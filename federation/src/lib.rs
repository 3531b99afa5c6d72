//! The federation store: a replicated key-value map with watches, built on raft-rs, that
//! holds what must be the same in every cluster of the mesh (cluster membership, service
//! exports, mesh-wide policies, trust bundles). Every cluster's control plane hosts one
//! member.
//!
//! Writes ([`Store::put`], [`Store::put_with_lease`], [`Store::delete`],
//! [`Store::compare_and_set`]) work on any member: they are proposed to raft (a follower
//! forwards them to the leader) and return the revision — the raft index of the entry —
//! once this member has applied them. Reads ([`Store::get`], [`Store::list`]) are served
//! from the local replica with no network hop; [`Store::get_linearizable`] and
//! [`Store::list_linearizable`] confirm with a quorum first (ReadIndex). [`Store::watch`]
//! follows changes from a revision, [`Store::revision`] and [`Store::subscribe`] tell
//! readers when something changed. Members are added and removed with joint consensus
//! ([`Store::add_member`], [`Store::remove_member`], join tokens). Every member serves the
//! `Kv` gRPC client API on its peer port ([`KvClient`]).
//!
//! With [`StoreOptions::data_dir`] the log, hard state and snapshots are on disk and fsynced
//! before raft acknowledges anything (see `docs/federation-durability.md`); a restarted
//! member rejoins with every acknowledged write. Without it, everything is in memory.
//!
//! Starting is two steps, so a whole federation can run in one process on port 0:
//! [`bind`] the peer listener (and learn its address), then [`Binding::start`] with every
//! member's address.
//!
//! Tasks a running member owns (all stopped by [`Store::shutdown`]):
//! - the raft loop (`node/`): ticks raft, steps incoming messages, proposes writes, and
//!   handles each `Ready` in the order raft requires (send, persist + fsync, send the
//!   persisted messages, apply, snapshot);
//! - the gRPC server (`server.rs`, `api.rs`): `RaftPeer.Send`, decoding and checking raft
//!   messages before handing them to the raft loop, and the `Kv` client API;
//! - one client task per other member (`transport.rs`): a bounded queue drained into
//!   `RaftPeer.Send` batches, dropping messages rather than ever blocking the raft loop;
//!   the set of peers follows the replicated member table.

// Code that ships: no unwrap on what input or the network can make fail, no silent lossy
// casts (see [workspace.lints] in the root Cargo.toml).
#![warn(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod api;
#[cfg(test)]
mod checker;
mod client;
mod error;
mod logging;
mod node;
mod peer_tls;
mod proposals;
pub mod proto;
mod removal;
mod replica;
mod server;
mod state;
pub mod status;
mod storage;
#[cfg(feature = "testing")]
pub mod testing;
mod tokens;
pub use tokens::federation_digest;
mod transport;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

/// The largest value one record may hold. The records Isthmus writes are a few kilobytes (an
/// export with thousands of identities stays far below); the limit keeps one writer from
/// making every replica hold, log and snapshot megabytes.
pub const MAX_VALUE_BYTES: usize = isthmus_core::keyspace::rules::MAX_VALUE_BYTES;

/// HTTP/2 streams one connection to the peer port may have open at once.
const PEER_MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// Connections without a client certificate the peer port holds at once (joiners' `Kv.JoinInfo`
/// and `Kv.Join`; a member presents its certificate): more are closed after their handshake,
/// counted as `anonymous_limit`.
pub const PEER_MAX_ANONYMOUS_CONNECTIONS: usize = 32;

/// The longest a join token may be valid.
pub const MAX_JOIN_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

pub use api::{KvService, KvWrite, WriteGuard};
pub use client::{KvClient, KvWatch, RemoteStatus};
pub use error::StoreError;
pub use isthmus_core::keyspace::writers::Writer;
pub use isthmus_core::keyspace::ClusterRecord;
pub use peer_tls::{MemberDirectory, PeerRefusalCounts, PeerTls};
pub use replica::{MemberStatus, Role, Watch};
pub use state::{LeaseState, Record, RecordWriter, WatchEvent};
pub use storage::{lock_data_dir, DataDirLock};

use node::{NodeConfig, NodeInputs, Proposal, ProposeRequest, RaftNode, ReadRequest};
use replica::Replica;
use state::{Command, Outcome};
use storage::RaftLog;
use transport::{GrpcTiming, GrpcTransport};

/// How many raft messages from peers wait for the raft loop.
const INBOUND_QUEUE: usize = 4096;
/// How many writes wait for the raft loop before `put`/`delete` callers wait.
const PROPOSAL_QUEUE: usize = 4096;
/// How many linearizable reads wait for the raft loop.
const READ_QUEUE: usize = 4096;
/// How long [`Store::shutdown`] waits for each task before aborting it, and how long a
/// member starting on a data directory waits for a previous member of this process to
/// release it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How long a linearizable read waits for this member to apply the confirmed index.
const READ_APPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Lower bound of the per-RPC timeout between members.
const MIN_RPC_TIMEOUT: Duration = Duration::from_secs(1);

/// How a member joins a federation, where it keeps its log, and its raft timing.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// This member's raft id (non-zero, and a key of `peers`).
    pub node_id: u64,
    /// Peer addresses by raft id, this member included. For the initial members of a
    /// federation this is the initial configuration (every one must be started with the
    /// same map); for a member that `join`s it is where to reach the existing members until
    /// it has learnt the replicated member table.
    pub peers: BTreeMap<u64, SocketAddr>,
    /// Where the raft log and snapshots live (`<data_dir>/raft/`); `None` keeps them in
    /// memory (lost when the process exits).
    pub data_dir: Option<PathBuf>,
    /// This member is being added to a running federation (see [`Store::add_member`]): it
    /// starts empty and catches up from the leader's snapshot instead of bootstrapping the
    /// initial configuration from `peers`.
    pub join: bool,
    /// Length of one raft tick (default 100ms).
    pub tick: Duration,
    /// Ticks without a leader before a follower starts an election (default 10).
    pub election_ticks: usize,
    /// Ticks between the leader's heartbeats (default 2).
    pub heartbeat_ticks: usize,
    /// How long a write may take before it fails with [`StoreError::ProposalTimeout`]
    /// (default 5s); also bounds linearizable reads.
    pub proposal_timeout: Duration,
    /// Snapshot the state and compact the log every this many applied entries (default
    /// 100 000, etcd's `--snapshot-count`: a snapshot encodes the whole state in the raft
    /// loop, so taking one often costs throughput and tail latency under load).
    pub snapshot_every: u64,
    /// Entries kept before each snapshot so briefly lagging members catch up from the log
    /// (default 1 000).
    pub snapshot_keep: u64,
    /// The control-plane identity this member signs its entries with (those that need an
    /// owner, docs/security.md §7); with [`Binding::with_tls`] and none given, the identity
    /// the peer port presents. A member its cluster's record binds must sign, or every
    /// replica refuses those entries.
    pub signer: Option<Arc<isthmus_core::tls::Identity>>,
    /// Test seam: filter (and optionally replace) this member's raft traffic.
    #[cfg(feature = "testing")]
    pub network: Option<testing::TestNetwork>,
}

impl StoreOptions {
    /// Options with the default timing, in memory, as an initial member.
    pub fn new(node_id: u64, peers: BTreeMap<u64, SocketAddr>) -> Self {
        StoreOptions {
            node_id,
            peers,
            data_dir: None,
            join: false,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            proposal_timeout: Duration::from_secs(5),
            snapshot_every: 100_000,
            snapshot_keep: 1_000,
            signer: None,
            #[cfg(feature = "testing")]
            network: None,
        }
    }

    fn node_config(&self) -> Result<NodeConfig, StoreError> {
        let invalid = |field, reason: String| StoreError::InvalidOptions { field, reason };
        if self.node_id == 0 {
            return Err(invalid("node_id", "0 is not a valid raft id".to_string()));
        }
        if !self.join && !self.peers.contains_key(&self.node_id) {
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
        if self.snapshot_every == 0 {
            return Err(invalid("snapshot_every", "must be at least 1".to_string()));
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
            snapshot_every: self.snapshot_every,
            snapshot_keep: self.snapshot_keep,
            peers: self.peers.clone(),
            signer: self.signer.clone(),
        };
        config.validate()?;
        Ok(config)
    }

    /// The initial voters, and the state machine every initial member starts from (the
    /// member table holding `peers`). Empty for a joining member.
    fn bootstrap(&self) -> (Vec<u64>, Vec<u8>) {
        if self.join {
            return (Vec::new(), Vec::new());
        }
        let mut sm = state::StateMachine::default();
        for (&id, addr) in &self.peers {
            sm.members.insert(
                id,
                state::MemberInfo {
                    peer_addr: addr.to_string(),
                    added_at: 0,
                },
            );
        }
        (
            self.peers.keys().copied().collect(),
            state::codec::encode_snapshot(&sm),
        )
    }

    async fn open_log(&self) -> Result<RaftLog, StoreError> {
        let (voters, empty_state) = self.bootstrap();
        let Some(dir) = &self.data_dir else {
            return Ok(RaftLog::in_memory(&voters, empty_state));
        };
        let dir = dir.join("raft");
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        loop {
            match RaftLog::open(&dir, &voters, empty_state.clone()) {
                // A member of this process that is stopping still holds it.
                Err(StoreError::DataDirInUse(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                result => return result,
            }
        }
    }
}

/// What a cluster asks for when it joins (`Kv.Join`).
#[derive(Debug, Clone)]
pub struct JoinApplication {
    /// Its member id: not 0, never used before in this federation.
    pub id: u64,
    /// Where the other members reach its peer port.
    pub peer_addr: SocketAddr,
    /// The cluster itself; required by a member whose peer port serves TLS.
    pub cluster: Option<ClusterClaim>,
}

/// A joining cluster's name, trust domain and CA bundle.
#[derive(Debug, Clone)]
pub struct ClusterClaim {
    pub name: String,
    pub trust_domain: String,
    pub ca_bundle_pem: String,
}

/// A compare-and-set found the key at another revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict {
    /// The key's revision when the compare-and-set was applied; `None` if it did not exist.
    pub current_revision: Option<u64>,
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
        client_writes: true,
        tls: None,
    })
}

/// A bound peer listener, not yet serving.
pub struct Binding {
    listener: TcpListener,
    local_addr: SocketAddr,
    /// Whether the peer port's `Kv` takes writes (Put, Delete, CompareAndSet, MintJoinToken,
    /// RemoveMember). A member run by a control plane refuses them there: its authenticated
    /// API port serves `Kv` to operators (docs/security.md §6).
    client_writes: bool,
    /// Members authenticate each other (docs/security.md §4); `None` serves plaintext, for
    /// in-process tests and benchmarks of the store alone.
    tls: Option<PeerTls>,
}

impl std::fmt::Debug for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Binding")
            .field("local_addr", &self.local_addr)
            .field("client_writes", &self.client_writes)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Binding {
    /// Serves the peer port over mutual TLS only and dials the other members the same way:
    /// every call but `Kv.Join` needs a member's certificate, and raft batches are taken only
    /// from the member the certificate is bound to (docs/security.md §4).
    pub fn with_tls(mut self, tls: PeerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Refuses `Kv` writes on the peer port (`UNAUTHENTICATED`, pointing at the control-plane
    /// API); reads, `Status` and `Join` (authorized by its token) stay served there.
    pub fn refuse_client_writes(mut self) -> Self {
        self.client_writes = false;
        self
    }

    /// The address the peer listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Starts the member: opens (or creates) its log, then starts the peer server, the
    /// raft loop and the peer clients. Fails with [`StoreError::CorruptLog`] if the log on
    /// disk does not verify.
    pub async fn start(self, mut opts: StoreOptions) -> Result<Store, StoreError> {
        if opts.signer.is_none() {
            opts.signer = self.tls.as_ref().map(|tls| tls.identity.clone());
        }
        let config = opts.node_config()?;
        let node_id = config.id;
        let election_timeout = config.election_timeout();
        let refusals = Arc::new(peer_tls::PeerRefusals::default());
        let server_tls = match &self.tls {
            None => None,
            Some(tls) => Some(Arc::new(
                isthmus_core::api_tls::server_config_accepting(
                    tls.identity.clone(),
                    tls.bundles.clone(),
                    Some(peer_tls::accept_members(
                        tls.directory.clone(),
                        refusals.clone(),
                    )),
                )
                .map_err(|e| StoreError::Tls(e.to_string()))?,
            )),
        };
        let log = opts.open_log().await?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
        let (proposals_tx, proposals_rx) = mpsc::channel(PROPOSAL_QUEUE);
        let (reads_tx, reads_rx) = mpsc::channel(READ_QUEUE);
        let replica = Arc::new(Replica::new(node_id));

        let timing = GrpcTiming {
            rpc_timeout: config.election_timeout().max(MIN_RPC_TIMEOUT),
            reconnect_backoff: config.heartbeat_interval(),
        };
        let transport: Arc<dyn transport::Transport> = Arc::new(GrpcTransport::new(
            node_id,
            timing,
            self.tls.clone(),
            shutdown_rx.clone(),
        ));
        #[cfg(feature = "testing")]
        let transport: Arc<dyn transport::Transport> = match &opts.network {
            None => transport,
            Some(testing::TestNetwork {
                filter,
                memory: Some(memory),
            }) => {
                memory.register(node_id, inbound_tx.clone());
                Arc::new(testing::MemoryTransport {
                    network: memory.clone(),
                    filter: filter.clone(),
                })
            }
            Some(testing::TestNetwork {
                filter,
                memory: None,
            }) => Arc::new(testing::FilteredTransport {
                inner: Arc::new(GrpcTransport::new(
                    node_id,
                    timing,
                    self.tls.clone(),
                    shutdown_rx.clone(),
                )),
                filter: filter.clone(),
            }),
        };
        let node = match RaftNode::new(
            config,
            log,
            transport,
            replica.clone(),
            tokio::time::Instant::now(),
        ) {
            Ok(node) => node,
            Err(err) => {
                shutdown_tx.send_replace(true);
                return Err(err);
            }
        };
        replica.publish_status(node.status());
        let mut tasks = vec![tokio::spawn(node::run(
            node,
            NodeInputs {
                inbound: inbound_rx,
                proposals: proposals_rx,
                reads: reads_rx,
                shutdown: shutdown_rx.clone(),
            },
        ))];

        let store = Store {
            inner: Arc::new(Inner {
                peer_addr: self.local_addr,
                replica: replica.clone(),
                proposals: proposals_tx,
                reads: reads_tx,
                shutdown: shutdown_tx,
                tasks: Mutex::new(Vec::new()),
                refusals: refusals.clone(),
                authenticated: self.tls.is_some(),
            }),
            writer: Writer::Member,
        };
        tasks.push(tokio::spawn(removal::watch(
            store.downgrade(),
            removal::Watch {
                id: node_id,
                tls: self.tls.clone(),
                check_every: election_timeout,
                patience: (election_timeout * 5).max(removal::MIN_PATIENCE),
            },
            shutdown_rx.clone(),
        )));
        let peer = server::PeerService::new(
            node_id,
            replica,
            inbound_tx,
            self.tls.is_some().then(|| refusals.clone()),
        );
        let kv = if self.client_writes {
            api::KvService::new(store.downgrade(), None)
        } else {
            api::KvService::peer_port_without_writes(store.downgrade())
        };
        let mut server_shutdown = shutdown_rx.clone();
        let signal = async move {
            let _ = server_shutdown.wait_for(|stopped| *stopped).await;
        };
        // Streams per connection (a peer's sender and watches need a few) and HTTP/2
        // keep-alives that find a dead peer.
        let server = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(PEER_MAX_STREAMS_PER_CONNECTION))
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)));
        match (&self.tls, server_tls) {
            (Some(tls), Some(config)) => {
                let observer: isthmus_core::api_tls::HandshakeObserver = {
                    let refusals = refusals.clone();
                    Arc::new(move |failure| refusals.handshake_failed(failure))
                };
                let (incoming, accepting) = isthmus_core::api_tls::incoming_observed(
                    self.listener,
                    config,
                    shutdown_rx,
                    isthmus_core::api_tls::PortGuards {
                        observer: Some(observer),
                        anonymous_limit: Some(PEER_MAX_ANONYMOUS_CONNECTIONS),
                        registry: Some(tls.directory.connections()),
                    },
                );
                tasks.push(accepting);
                let guard = peer_tls::PeerGuardLayer {
                    directory: tls.directory.clone(),
                    refusals: refusals.clone(),
                };
                let mut server = server.layer(guard);
                tasks.push(tokio::spawn(async move {
                    if let Err(err) = server
                        .add_service(peer)
                        .add_service(kv)
                        .serve_with_incoming_shutdown(incoming, signal)
                        .await
                    {
                        tracing::error!(member = node_id, "federation peer server failed: {err}");
                    }
                }));
            }
            _ => {
                let incoming = TcpListenerStream::new(self.listener);
                let mut server = server;
                tasks.push(tokio::spawn(async move {
                    if let Err(err) = server
                        .add_service(peer)
                        .add_service(kv)
                        .serve_with_incoming_shutdown(incoming, signal)
                        .await
                    {
                        tracing::error!(member = node_id, "federation peer server failed: {err}");
                    }
                }));
            }
        }
        *store.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;

        tracing::info!(
            member = node_id,
            peer_addr = %self.local_addr,
            members = ?opts.peers,
            data_dir = ?opts.data_dir,
            join = opts.join,
            tick = ?opts.tick,
            election_ticks = opts.election_ticks,
            heartbeat_ticks = opts.heartbeat_ticks,
            snapshot_every = opts.snapshot_every,
            "federation store member started"
        );
        Ok(store)
    }
}

/// A handle on a running member. Cheap to clone; every clone talks to the same member.
/// When the last handle is dropped the member stops (without waiting, unlike
/// [`Store::shutdown`]).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    /// Whom this handle's writes are proposed for ([`Store::acting_for`]).
    writer: Writer,
}

struct Inner {
    peer_addr: SocketAddr,
    replica: Arc<Replica>,
    proposals: mpsc::Sender<ProposeRequest>,
    reads: mpsc::Sender<ReadRequest>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    refusals: Arc<peer_tls::PeerRefusals>,
    /// The peer port serves TLS: joins must bring their cluster.
    authenticated: bool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

impl Store {
    /// The address of this member's peer listener (which also serves the `Kv` client API).
    pub fn peer_addr(&self) -> SocketAddr {
        self.inner.peer_addr
    }

    /// The `Kv` client API of this member as a gRPC service, for a server other than the
    /// peer listener to carry it (the control plane's TLS API port). It does not keep the
    /// member running.
    pub fn kv_service(&self) -> proto::v1::kv_server::KvServer<KvService> {
        api::KvService::new(self.downgrade(), None)
    }

    /// Like [`Store::kv_service`], asking `guard` about every `Put`, `Delete` and
    /// `CompareAndSet` before it is proposed.
    pub fn guarded_kv_service(
        &self,
        guard: api::WriteGuard,
    ) -> proto::v1::kv_server::KvServer<KvService> {
        api::KvService::new(self.downgrade(), Some(guard))
    }

    /// A handle that does not keep the member running (for the servers it runs).
    pub(crate) fn downgrade(&self) -> std::sync::Weak<Inner> {
        Arc::downgrade(&self.inner)
    }

    pub(crate) fn upgrade(weak: &std::sync::Weak<Inner>) -> Option<Store> {
        weak.upgrade().map(|inner| Store {
            inner,
            writer: Writer::Member,
        })
    }

    /// A handle whose writes this member proposes on behalf of `writer` (an operator its API
    /// authenticated). Every replica checks, when it applies the entry, that the writer may
    /// write the key (docs/security.md §7); a refusal is [`StoreError::Refused`] with
    /// reason `not_owner`. A plain handle writes as the member's own control plane.
    pub fn acting_for(&self, writer: Writer) -> Store {
        Store {
            inner: self.inner.clone(),
            writer,
        }
    }

    /// Sets `key` to `value` and returns the revision of the write once this member has
    /// applied it. Works on any member; retried internally while there is no leader, until
    /// the proposal timeout.
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        self.put_command(key, value, 0).await
    }

    /// Like [`Store::put`], with a lease: unless renewed ([`Store::renew`]) within `lease`,
    /// the leader marks the record expired (readers see `Record::lease`). Rewriting the key
    /// with [`Store::put`] drops the lease.
    pub async fn put_with_lease(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Duration,
    ) -> Result<u64, StoreError> {
        let ttl = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1);
        self.put_command(key, value, ttl).await
    }

    async fn put_command(
        &self,
        key: &str,
        value: Vec<u8>,
        lease_ttl_ms: u64,
    ) -> Result<u64, StoreError> {
        let outcome = self
            .write(Command::Put {
                key: key.to_string(),
                value,
                lease_ttl_ms,
                at_ms: isthmus_core::clock::unix_ms(),
            })
            .await?;
        done(outcome, key)
    }

    /// Restarts the lease of `key` (clearing its expired flag) and returns the revision of
    /// the renewal (the record's own revision does not change). Fails with
    /// [`StoreError::NoLease`] if the key does not exist or has no lease.
    pub async fn renew(&self, key: &str) -> Result<u64, StoreError> {
        let outcome = self
            .write(Command::Renew {
                key: key.to_string(),
                at_ms: isthmus_core::clock::unix_ms(),
            })
            .await?;
        done(outcome, key)
    }

    /// Removes `key` and returns the revision of the delete once this member has applied
    /// it. Deleting a missing key succeeds and changes nothing.
    pub async fn delete(&self, key: &str) -> Result<u64, StoreError> {
        let outcome = self
            .write(Command::Delete {
                key: key.to_string(),
            })
            .await?;
        done(outcome, key)
    }

    /// Sets `key` to `value` only if its current revision is `expected_revision` (`None`:
    /// only if it does not exist). `Ok(Ok(revision))` when written, `Ok(Err(conflict))`
    /// when the key was at another revision.
    pub async fn compare_and_set(
        &self,
        key: &str,
        expected_revision: Option<u64>,
        value: Vec<u8>,
    ) -> Result<Result<u64, Conflict>, StoreError> {
        let outcome = self
            .write(Command::CompareAndSet {
                key: key.to_string(),
                expected: expected_revision,
                value,
            })
            .await?;
        match outcome {
            Outcome::Conflict(current_revision) => Ok(Err(Conflict { current_revision })),
            other => done(other, key).map(Ok),
        }
    }

    async fn write(&self, command: Command) -> Result<Outcome, StoreError> {
        state::validate_key(command.key()).map_err(|reason| StoreError::InvalidKey {
            key: command.key().to_string(),
            reason,
        })?;
        if let Command::Put { key, value, .. } | Command::CompareAndSet { key, value, .. } =
            &command
        {
            if value.len() > MAX_VALUE_BYTES {
                return Err(StoreError::ValueTooLarge {
                    key: key.clone(),
                    size: value.len(),
                    limit: MAX_VALUE_BYTES,
                });
            }
        }
        self.propose(Proposal::Write(command, self.writer.clone()))
            .await
    }

    async fn propose(&self, request: Proposal) -> Result<Outcome, StoreError> {
        let (reply, outcome) = oneshot::channel();
        self.inner
            .proposals
            .send(ProposeRequest { request, reply })
            .await
            .map_err(|_| StoreError::Stopped)?;
        outcome.await.map_err(|_| StoreError::Stopped)?
    }

    /// The record at `key` in this member's replica (no network hop; may be stale).
    pub fn get(&self, key: &str) -> Option<Record> {
        self.inner.replica.get(key)
    }

    /// Every record whose key starts with `prefix` in this member's replica, sorted by key.
    pub fn list(&self, prefix: &str) -> Vec<(String, Record)> {
        self.inner.replica.list(prefix)
    }

    /// Waits until this replica has applied everything committed when the call was made,
    /// as confirmed by the leader with a quorum (raft's ReadIndex). Returns that index.
    pub async fn sync_read(&self) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .reads
            .send(ReadRequest { reply })
            .await
            .map_err(|_| StoreError::Stopped)?;
        let index = answer.await.map_err(|_| StoreError::Stopped)??;
        let mut revision = self.inner.replica.revision();
        // The read index is committed, so this member applies it soon.
        let applied = tokio::time::timeout(
            READ_APPLY_TIMEOUT,
            revision.wait_for(|applied| *applied >= index),
        )
        .await
        .map(|waited| waited.is_ok());
        match applied {
            Ok(true) => Ok(index),
            Ok(false) => Err(StoreError::Stopped),
            Err(_) => Err(StoreError::ReadTimeout {
                timeout: READ_APPLY_TIMEOUT,
            }),
        }
    }

    /// The record at `key`, linearizable: it reflects every write that completed before
    /// this call started, on any member.
    pub async fn get_linearizable(&self, key: &str) -> Result<Option<Record>, StoreError> {
        self.sync_read().await?;
        Ok(self.get(key))
    }

    /// Every record under `prefix`, linearizable (see [`Store::get_linearizable`]).
    pub async fn list_linearizable(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, Record)>, StoreError> {
        self.sync_read().await?;
        Ok(self.list(prefix))
    }

    /// Changes under `prefix` from revision `from_revision` on (0: from now), then live
    /// changes, none lost or repeated. A client that reconnects watches again from
    /// [`Watch::next_revision`]. Fails with [`StoreError::Compacted`] when `from_revision`
    /// is older than the history this member keeps (the last 10 000 changes, or since its
    /// snapshot): re-list, then watch from the list's revision + 1.
    pub fn watch(&self, prefix: &str, from_revision: u64) -> Result<Watch, StoreError> {
        Watch::start(self.inner.replica.clone(), prefix, from_revision)
    }

    /// The highest raft index applied to this replica. It changes whenever anything is
    /// applied (including the empty entry of a new leader), so after a write returns
    /// revision `r`, any replica whose revision is at least `r` holds that write.
    pub fn revision(&self) -> watch::Receiver<u64> {
        self.inner.replica.revision()
    }

    /// Every change applied to this replica from now on, in order. (A snapshot installed
    /// from the leader replaces the state without events; [`Store::watch`] reports that
    /// as [`StoreError::Compacted`].)
    pub fn subscribe(&self) -> broadcast::Receiver<WatchEvent> {
        self.inner.replica.subscribe()
    }

    /// Resolves once this member's raft loop has stopped: `None` after [`Store::shutdown`],
    /// `Some(reason)` when it stopped on its own because its log could not be written or
    /// fsynced (the reason names the file and the error). A daemon exits on the latter.
    pub async fn stopped(&self) -> Option<String> {
        self.inner.replica.stopped().await
    }

    /// This member's raft state, as of its last loop iteration.
    pub fn status(&self) -> MemberStatus {
        self.inner.replica.status()
    }

    /// Every member's peer address, from the replicated member table.
    pub fn members(&self) -> BTreeMap<u64, String> {
        self.inner.replica.with_state(|sm| {
            sm.members
                .iter()
                .map(|(&id, m)| (id, m.peer_addr.clone()))
                .collect()
        })
    }

    /// Adds member `id` (reachable at `addr`) to the federation with joint consensus. It
    /// votes if `voter` and there are fewer than five voters; otherwise it is a learner.
    /// Start the new member with [`StoreOptions::join`] set. Returns the change's revision.
    pub async fn add_member(
        &self,
        id: u64,
        addr: SocketAddr,
        voter: bool,
    ) -> Result<u64, StoreError> {
        let outcome = self
            .propose(Proposal::AddMember { id, addr, voter })
            .await?;
        done(outcome, "")
    }

    /// Removes member `id` with joint consensus; if it voted, the oldest learner is promoted
    /// in the same change. Removing the leader hands leadership to another voter.
    ///
    /// Then the id is recorded as removed (`members/removed/<id>`: never reused by a join),
    /// and what its cluster (the `clusters/<name>` record naming this member id) owned goes
    /// too (docs/security.md §5): its exports, its Kubernetes policies, the mesh-admin grants
    /// of its trust domain, its policy-writer grant, and last its record, so every member stops binding its trust
    /// domain and every control plane drops its CA bundle. Refused beforehand, changing
    /// nothing, when that would delete every mesh-admin grant. The membership change comes
    /// first, so the removed cluster can no longer write back what is deleted; the deletes are
    /// separate entries after it (should one fail, a mesh admin deletes what is left).
    pub async fn remove_member(&self, id: u64) -> Result<u64, StoreError> {
        let owned = self.owned_by_member(id).await?;
        let outcome = self.propose(Proposal::RemoveMember { id }).await?;
        let mut revision = done(outcome, "")?;
        let removed = serde_json::json!({
            "id": id,
            "removedAtMs": isthmus_core::clock::unix_ms(),
        });
        self.put(
            &isthmus_core::keyspace::removed_member(id),
            removed.to_string().into_bytes(),
        )
        .await?;
        for key in owned {
            revision = self.delete(&key).await?;
        }
        Ok(revision)
    }

    /// The keys the cluster of member `id` owns, its `clusters/<name>` record last; none when
    /// no record names the member. Read linearizably (the records first, after which this
    /// replica holds at least that state): a grant written just before counts.
    async fn owned_by_member(&self, id: u64) -> Result<Vec<String>, StoreError> {
        use isthmus_core::keyspace::{self as ks, ClusterRecord, Key};
        let Some((record_key, record)) = self
            .list_linearizable(ks::CLUSTERS_PREFIX)
            .await?
            .into_iter()
            .filter_map(|(k, r)| Some((k, serde_json::from_slice::<ClusterRecord>(&r.value).ok()?)))
            .find(|(_, r)| r.member_id == Some(id))
        else {
            return Ok(Vec::new());
        };
        let grants = self.list(ks::MESH_ADMIN_GRANTS_PREFIX);
        let theirs: Vec<String> = grants
            .iter()
            .filter(|(k, _)| {
                matches!(Key::parse(k), Key::MeshAdminGrant { trust_domain, .. }
                    if trust_domain.eq_ignore_ascii_case(&record.trust_domain))
            })
            .map(|(k, _)| k.clone())
            .collect();
        if !grants.is_empty() && theirs.len() == grants.len() {
            return Err(StoreError::Membership(format!(
                "removing member {id} (cluster {}) would delete every mesh-admin grant (all are \
                 of its trust domain {}): grant a mesh admin of another cluster first",
                record.name, record.trust_domain
            )));
        }
        let mut owned: Vec<String> = [ks::EXPORTS_PREFIX, ks::KUBERNETES_POLICIES_PREFIX]
            .into_iter()
            .flat_map(|prefix| self.list(prefix))
            .map(|(k, _)| k)
            .filter(|k| Key::parse(k).owner() == Some(record.name.as_str()))
            .collect();
        owned.extend(theirs);
        let policy_writer = ks::policy_writer_grant(&record.name);
        if self.get(&policy_writer).is_some() {
            owned.push(policy_writer);
        }
        owned.push(record_key);
        Ok(owned)
    }

    /// Mints a one-time join token valid for `ttl`, stored (as a digest) in the replicated
    /// map so that any member can check it. The token is `<id>.<secret>.<digest>`, the last
    /// part the digest of the federation's bundle set as this member has it once the token is
    /// minted ([`Store::bundle_set`]); show it once to the operator (`isthmus cluster token`).
    pub async fn mint_join_token(&self, ttl: Duration) -> Result<String, StoreError> {
        if ttl.is_zero() || ttl > MAX_JOIN_TOKEN_TTL {
            return Err(StoreError::TokenTtl {
                ttl,
                max: MAX_JOIN_TOKEN_TTL,
            });
        }
        let (id, secret) = tokens::generate()?;
        let now = isthmus_core::clock::unix_ms();
        let outcome = self
            .propose(Proposal::Write(
                Command::MintToken {
                    id: id.clone(),
                    digest: tokens::digest(&secret),
                    expires_at_ms: now.saturating_add(isthmus_core::clock::millis(ttl)),
                    at_ms: now,
                },
                self.writer.clone(),
            ))
            .await?;
        done(outcome, "")?;
        let digest = isthmus_core::join::digest(&self.bundle_set())
            .map_err(|e| StoreError::Membership(format!("the federation's bundle set: {e}")))?;
        Ok(format!("{id}.{secret}.{digest}"))
    }

    /// How many join tokens this member's replica holds (minted, not used; expired ones go
    /// at the next mint or use).
    pub fn outstanding_join_tokens(&self) -> usize {
        self.inner.replica.with_state(|sm| sm.tokens.len())
    }

    /// The ids of the members this federation removed, in this member's replica
    /// (`members/removed/<id>`).
    pub fn removed_members(&self) -> Vec<u64> {
        self.list(isthmus_core::keyspace::REMOVED_MEMBERS_PREFIX)
            .into_iter()
            .filter_map(|(key, _)| {
                key.strip_prefix(isthmus_core::keyspace::REMOVED_MEMBERS_PREFIX)?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// The federation's bundle set in this member's replica (`Kv.JoinInfo`): every
    /// `clusters/<name>` record's name, trust domain and CA bundle, in key order.
    pub fn bundle_set(&self) -> Vec<isthmus_core::join::BundleEntry> {
        let records = self.list(isthmus_core::keyspace::CLUSTERS_PREFIX);
        isthmus_core::join::bundle_set(
            records
                .iter()
                .map(|(k, r)| (k.as_str(), r.value.as_slice())),
        )
    }

    /// Consumes a join token: succeeds exactly once per token, before it expires (checked
    /// atomically in the replicated state machine). Fails with [`StoreError::Token`].
    pub async fn consume_join_token(&self, token: &str) -> Result<u64, StoreError> {
        self.consume_join_token_creating(token, None).await
    }

    /// Consumes a join token and, in the same entry, creates `record` (key, value): both or
    /// neither. A key that exists keeps the token and is refused naming the key.
    async fn consume_join_token_creating(
        &self,
        token: &str,
        record: Option<(String, Vec<u8>)>,
    ) -> Result<u64, StoreError> {
        let (id, secret) = tokens::parse(token)?;
        let key = record.as_ref().map(|(k, _)| k.clone()).unwrap_or_default();
        if let Some((key, value)) = &record {
            if value.len() > MAX_VALUE_BYTES {
                return Err(StoreError::ValueTooLarge {
                    key: key.clone(),
                    size: value.len(),
                    limit: MAX_VALUE_BYTES,
                });
            }
        }
        let outcome = self
            .propose(Proposal::Write(
                Command::ConsumeToken {
                    id,
                    digest: tokens::digest(secret),
                    at_ms: isthmus_core::clock::unix_ms(),
                    record,
                },
                self.writer.clone(),
            ))
            .await?;
        match outcome {
            Outcome::Conflict(current) => Err(StoreError::InvalidJoin {
                field: "cluster",
                reason: format!(
                    "{key} was written by someone else while joining (revision {current:?}); \
                     the token was kept"
                ),
            }),
            outcome => done(outcome, ""),
        }
    }

    /// What `isthmus cluster join --token` asks an existing member to do (docs/security.md
    /// §5): check the application; in one entry, consume the token and record the cluster
    /// (`clusters/<name>`, with its trust domain, CA bundle and member id, so the members
    /// authenticate it); then add the member (a voter while there are fewer than five, else a
    /// learner).
    ///
    /// Refused before the token is touched when the id is taken or was removed, or the
    /// cluster's name or trust domain is already another cluster's, or its bundle does not
    /// parse; a member whose peer port serves TLS refuses an application without a cluster. A
    /// record written under the same name meanwhile refuses the entry and keeps the token. The
    /// membership change is a second entry (raft's): should it fail, the token is spent and the
    /// record stays, and a mesh admin removes it.
    pub async fn join_with_token(
        &self,
        token: &str,
        application: JoinApplication,
    ) -> Result<u64, StoreError> {
        let JoinApplication {
            id,
            peer_addr,
            cluster,
        } = application;
        let refuse = |field, reason: String| StoreError::InvalidJoin { field, reason };
        if id == 0 {
            return Err(refuse("id", "0 is not a valid member id".into()));
        }
        if self.members().contains_key(&id) {
            return Err(refuse(
                "id",
                format!("member {id} already exists; choose another id"),
            ));
        }
        if self
            .get(&isthmus_core::keyspace::removed_member(id))
            .is_some()
        {
            return Err(refuse(
                "id",
                format!(
                    "member {id} was removed from this federation and its id is not reused: \
                     a rejoining cluster takes a new id (and starts with an empty raft log)"
                ),
            ));
        }
        let record = match cluster {
            Some(claim) => Some(self.admit(claim, id)?),
            None if self.inner.authenticated => {
                return Err(refuse(
                    "cluster",
                    "this federation authenticates its members: give the joining cluster's \
                     name, trust domain and CA bundle"
                        .into(),
                ))
            }
            None => None,
        };
        self.consume_join_token_creating(token, record).await?;
        self.add_member(id, peer_addr, true).await
    }

    /// Checks a joining cluster's claim against this replica: the record to write.
    fn admit(&self, claim: ClusterClaim, id: u64) -> Result<(String, Vec<u8>), StoreError> {
        let refuse = |field, reason: String| StoreError::InvalidJoin { field, reason };
        isthmus_core::identity::validate_label("cluster", &claim.name)
            .map_err(|e| refuse("cluster", e.to_string()))?;
        isthmus_core::identity::validate_trust_domain(&claim.trust_domain)
            .map_err(|e| refuse("trust_domain", e.to_string()))?;
        isthmus_core::tls::TrustBundles::new()
            .replace([(claim.trust_domain.as_str(), claim.ca_bundle_pem.as_str())])
            .map_err(|e| refuse("ca_bundle_pem", e.to_string()))?;
        let key = isthmus_core::keyspace::cluster(&claim.name);
        if self.get(&key).is_some() {
            return Err(refuse(
                "cluster",
                format!("{} is already a member cluster", claim.name),
            ));
        }
        for (other_key, other) in self.list(isthmus_core::keyspace::CLUSTERS_PREFIX) {
            let Ok(other) =
                serde_json::from_slice::<isthmus_core::keyspace::ClusterRecord>(&other.value)
            else {
                continue;
            };
            if other.trust_domain.eq_ignore_ascii_case(&claim.trust_domain) {
                return Err(refuse(
                    "trust_domain",
                    format!(
                        "{} is already the trust domain of cluster {} ({other_key}); cluster {} \
                         cannot claim it",
                        claim.trust_domain, other.name, claim.name
                    ),
                ));
            }
        }
        let record = isthmus_core::keyspace::ClusterRecord {
            name: claim.name,
            trust_domain: claim.trust_domain,
            gateway: None,
            ca_bundle_pem: claim.ca_bundle_pem,
            locality: None,
            member_id: Some(id),
            control: None,
        };
        let value = serde_json::to_vec(&record).map_err(|e| refuse("cluster", e.to_string()))?;
        Ok((key, value))
    }

    /// Entries this replica's store rules refused on apply since start, for every reason
    /// (docs/security.md §7): every replica refuses the same entries.
    pub fn entries_refused(&self) -> Vec<(isthmus_core::keyspace::rules::Reason, u64)> {
        self.inner.replica.refused()
    }

    /// Snapshots from a leader this member refused since start, because they would have
    /// broken a trust binding it holds (docs/security.md §7, "Snapshots").
    pub fn snapshots_refused(&self) -> u64 {
        self.inner.replica.refused_snapshots()
    }

    /// Calls and raft batches the peer port refused since start, by reason (all zero when it
    /// serves plaintext).
    pub fn peer_refusals(&self) -> PeerRefusalCounts {
        self.inner.refusals.counts()
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

/// The revision of an applied write, or the error its outcome stands for.
fn done(outcome: Outcome, key: &str) -> Result<u64, StoreError> {
    match outcome {
        Outcome::Done(revision) => Ok(revision),
        Outcome::NoLease => Err(StoreError::NoLease {
            key: key.to_string(),
        }),
        Outcome::TokenRefused(reason) => Err(StoreError::Token(reason)),
        Outcome::Refused(refusal) => Err(StoreError::Refused(refusal)),
        Outcome::Conflict(current) => Err(StoreError::Membership(format!(
            "unexpected conflict at revision {current:?}"
        ))),
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
        is_send(store.compare_and_set("k", None, Vec::new()));
        is_send(store.get_linearizable("k"));
        is_send(store.add_member(4, "127.0.0.1:1".parse().expect("addr"), false));
        is_send(store.clone().shutdown());
    }
}
