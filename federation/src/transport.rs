//! Outgoing raft traffic: the [`Transport`] seam the raft loop sends through, and its gRPC
//! implementation (one client task per peer, each behind a bounded queue).
//!
//! Sending never blocks the raft loop: a message that does not fit in its peer's queue, or
//! that cannot be delivered (peer down, connection refused, RPC timed out), is dropped and
//! logged at debug level. Raft retries on its own (heartbeats, probes, re-sent appends).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::sync::{mpsc, watch};
use tonic::transport::{Channel, Endpoint};

use crate::peer_tls::PeerTls;
use crate::proto::v1::raft_peer_client::RaftPeerClient;
use crate::proto::v1::RaftBatch;

/// Carries raft messages to the other members. Implementations must return at once: the
/// raft loop calls this while it holds the raft state, and a message may be dropped.
///
/// The gRPC transport is the real one; an in-memory one with drop and partition filters can
/// replace it in tests.
pub(crate) trait Transport: Send + Sync + 'static {
    /// Queues `message` for the member `message.to`.
    fn send(&self, message: Message);

    /// Sets the members (other than this one) messages can go to, and their addresses.
    /// Called at start and after every membership change.
    fn set_peers(&self, _peers: &BTreeMap<u64, SocketAddr>) {}
}

/// How many messages wait for one peer before further ones are dropped.
const PEER_QUEUE: usize = 1024;
/// How many queued messages go out in one RPC.
const MAX_BATCH: usize = 256;

/// Timing of the gRPC transport.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GrpcTiming {
    /// Limit on connecting to a peer and on one RPC.
    pub(crate) rpc_timeout: Duration,
    /// After a failed connect, messages for that peer are dropped for this long.
    pub(crate) reconnect_backoff: Duration,
}

/// Sends raft messages over the `RaftPeer.Send` RPC: one task per peer, fed by a bounded
/// queue, connecting lazily and reconnecting after any failure.
pub(crate) struct GrpcTransport {
    self_id: u64,
    timing: GrpcTiming,
    tls: Option<PeerTls>,
    shutdown: watch::Receiver<bool>,
    queues: Mutex<HashMap<u64, (SocketAddr, mpsc::Sender<Message>)>>,
}

impl GrpcTransport {
    /// A transport with no peers yet ([`Transport::set_peers`] adds them). Peer tasks end
    /// when their peer is removed, the transport is dropped, or `shutdown` turns true.
    pub(crate) fn new(
        self_id: u64,
        timing: GrpcTiming,
        tls: Option<PeerTls>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        GrpcTransport {
            self_id,
            timing,
            tls,
            shutdown,
            queues: Mutex::new(HashMap::new()),
        }
    }

    fn spawn_peer(&self, id: u64, addr: SocketAddr) -> mpsc::Sender<Message> {
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        let peer = PeerSender {
            from: self.self_id,
            to: id,
            addr,
            timing: self.timing,
            tls: self.tls.clone(),
            client: None,
            connect_not_before: None,
        };
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = peer.run(rx) => {}
                _ = shutdown.wait_for(|stopped| *stopped) => {}
            }
        });
        tx
    }
}

impl Transport for GrpcTransport {
    fn send(&self, message: Message) {
        let to = message.to;
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        match queues.get(&to) {
            Some((_, queue)) => {
                if let Err(err) = queue.try_send(message) {
                    tracing::debug!(peer = to, "dropping raft message: {err}");
                }
            }
            None => tracing::debug!(peer = to, "dropping raft message for an unknown member"),
        }
    }

    fn set_peers(&self, peers: &BTreeMap<u64, SocketAddr>) {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        // Dropping a queue's sender ends its task.
        queues.retain(|id, (addr, _)| peers.get(id) == Some(addr));
        for (&id, &addr) in peers {
            if id != self.self_id && !queues.contains_key(&id) {
                let tx = self.spawn_peer(id, addr);
                queues.insert(id, (addr, tx));
            }
        }
    }
}

/// The client side of one peer link.
struct PeerSender {
    from: u64,
    to: u64,
    addr: SocketAddr,
    timing: GrpcTiming,
    tls: Option<PeerTls>,
    client: Option<RaftPeerClient<Channel>>,
    connect_not_before: Option<tokio::time::Instant>,
}

impl PeerSender {
    async fn run(mut self, mut queue: mpsc::Receiver<Message>) {
        while let Some(first) = queue.recv().await {
            let mut batch = Vec::with_capacity(MAX_BATCH);
            self.push_encoded(&mut batch, &first);
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(message) => self.push_encoded(&mut batch, &message),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                continue;
            }
            self.deliver(batch).await;
        }
    }

    fn push_encoded(&self, batch: &mut Vec<Vec<u8>>, message: &Message) {
        match message.write_to_bytes() {
            Ok(bytes) => batch.push(bytes),
            Err(err) => tracing::warn!(peer = self.to, "cannot encode raft message: {err}"),
        }
    }

    /// Sends one batch, or drops it; never retries (raft does).
    async fn deliver(&mut self, messages: Vec<Vec<u8>>) {
        let Some(client) = self.connected_client().await else {
            return;
        };
        let mut client = client.clone();
        let batch = RaftBatch {
            from: self.from,
            to: self.to,
            messages,
        };
        match tokio::time::timeout(self.timing.rpc_timeout, client.send(batch)).await {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => {
                tracing::debug!(peer = self.to, addr = %self.addr, "raft send failed: {status}");
                self.client = None;
            }
            Err(_) => {
                tracing::debug!(peer = self.to, addr = %self.addr, "raft send timed out");
                self.client = None;
            }
        }
    }

    async fn connected_client(&mut self) -> Option<&mut RaftPeerClient<Channel>> {
        if self.client.is_none() {
            let now = tokio::time::Instant::now();
            if self.connect_not_before.is_some_and(|t| now < t) {
                return None;
            }
            match self.connect().await {
                Ok(client) => {
                    tracing::debug!(peer = self.to, addr = %self.addr, "connected to raft peer");
                    self.client = Some(client);
                    self.connect_not_before = None;
                }
                Err(reason) => {
                    tracing::debug!(peer = self.to, addr = %self.addr, "cannot reach raft peer: {reason}");
                    self.connect_not_before = Some(now + self.timing.reconnect_backoff);
                    return None;
                }
            }
        }
        self.client.as_mut()
    }

    async fn connect(&self) -> Result<RaftPeerClient<Channel>, String> {
        if let Some(tls) = &self.tls {
            let timeout = self.timing.rpc_timeout;
            return match tokio::time::timeout(
                timeout,
                crate::peer_tls::connect(tls, self.to, self.addr, timeout),
            )
            .await
            {
                Ok(Ok(channel)) => {
                    Ok(RaftPeerClient::new(channel).max_decoding_message_size(usize::MAX))
                }
                Ok(Err(err)) => Err(err),
                Err(_) => Err("connect timed out".to_string()),
            };
        }
        let endpoint = Endpoint::from_shared(format!("http://{}", self.addr))
            .map_err(|err| err.to_string())?
            .connect_timeout(self.timing.rpc_timeout)
            .tcp_nodelay(true);
        match tokio::time::timeout(self.timing.rpc_timeout, endpoint.connect()).await {
            Ok(Ok(channel)) => {
                Ok(RaftPeerClient::new(channel).max_decoding_message_size(usize::MAX))
            }
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err("connect timed out".to_string()),
        }
    }
}
