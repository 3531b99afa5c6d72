//! Test seams (cargo feature `testing`): a network filter with partitions, message drops and
//! delays that sits in front of a member's outgoing raft traffic, and an in-memory network
//! that replaces gRPC between members of one process. The same scenario can therefore run
//! over real gRPC (filter only) and in memory (filter + [`MemoryNetwork`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use raft::eraftpb::Message;
use tokio::sync::mpsc;

/// What the filter decides for one message.
pub(crate) enum Verdict {
    Drop,
    Deliver(Duration),
}

#[derive(Default)]
struct FilterState {
    blocked: BTreeSet<(u64, u64)>,
    drop_per_mille: u64,
    delay: Duration,
}

/// Decides, for every raft message a member sends, whether it is dropped or delayed.
/// Share one filter between all members of a test federation.
#[derive(Default)]
pub struct NetFilter {
    state: RwLock<FilterState>,
    /// A deterministic pseudo-random sequence for drops.
    counter: AtomicU64,
}

impl NetFilter {
    /// A filter that lets everything through.
    pub fn new() -> Arc<Self> {
        Arc::new(NetFilter::default())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, FilterState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Cuts every link between a member of `a` and a member of `b`, both ways.
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        let mut state = self.write();
        for &x in a {
            for &y in b {
                state.blocked.insert((x, y));
                state.blocked.insert((y, x));
            }
        }
    }

    /// Restores every link (drops and delays stay as set).
    pub fn heal(&self) {
        self.write().blocked.clear();
    }

    /// Drops this many messages in a thousand, on every link.
    pub fn set_drop_per_mille(&self, per_mille: u64) {
        self.write().drop_per_mille = per_mille.min(1000);
    }

    /// Delays every message by this much.
    pub fn set_delay(&self, delay: Duration) {
        self.write().delay = delay;
    }

    pub(crate) fn verdict(&self, from: u64, to: u64) -> Verdict {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        if state.blocked.contains(&(from, to)) {
            return Verdict::Drop;
        }
        if state.drop_per_mille > 0 {
            // splitmix64 over a counter: cheap, deterministic per filter.
            let mut z = self
                .counter
                .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            if z % 1000 < state.drop_per_mille {
                return Verdict::Drop;
            }
        }
        Verdict::Deliver(state.delay)
    }
}

/// Raft traffic between members of one process without sockets: each member registers its
/// inbound queue; sending puts the message straight into the receiver's queue.
#[derive(Default)]
pub struct MemoryNetwork {
    members: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
}

impl MemoryNetwork {
    /// An empty network.
    pub fn new() -> Arc<Self> {
        Arc::new(MemoryNetwork::default())
    }

    pub(crate) fn register(&self, id: u64, inbound: mpsc::Sender<Message>) {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, inbound);
    }

    fn deliver(&self, message: Message) {
        let queue = self
            .members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&message.to)
            .cloned();
        if let Some(queue) = queue {
            // A full or closed queue drops the message, as the gRPC transport does.
            let _ = queue.try_send(message);
        }
    }
}

/// How a test wires a member's raft traffic: always through `filter`, and in memory when
/// `memory` is set (otherwise over gRPC).
#[derive(Clone)]
pub struct TestNetwork {
    /// The filter every outgoing message passes.
    pub filter: Arc<NetFilter>,
    /// The in-memory network, or `None` for real gRPC.
    pub memory: Option<Arc<MemoryNetwork>>,
}

impl std::fmt::Debug for TestNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNetwork")
            .field("memory", &self.memory.is_some())
            .finish()
    }
}

/// Applies the filter, then hands the message to `deliver` (now or after the delay).
pub(crate) fn filtered(
    filter: &NetFilter,
    message: Message,
    deliver: impl FnOnce(Message) + Send + 'static,
) {
    match filter.verdict(message.from, message.to) {
        Verdict::Drop => {}
        Verdict::Deliver(delay) if delay.is_zero() => deliver(message),
        Verdict::Deliver(delay) => {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                deliver(message);
            });
        }
    }
}

/// The in-memory transport of one member.
pub(crate) struct MemoryTransport {
    pub(crate) network: Arc<MemoryNetwork>,
    pub(crate) filter: Arc<NetFilter>,
}

impl crate::transport::Transport for MemoryTransport {
    fn send(&self, message: Message) {
        let network = self.network.clone();
        filtered(&self.filter, message, move |m| network.deliver(m));
    }
}

/// The gRPC transport behind a filter.
pub(crate) struct FilteredTransport<T> {
    pub(crate) inner: Arc<T>,
    pub(crate) filter: Arc<NetFilter>,
}

impl<T: crate::transport::Transport> crate::transport::Transport for FilteredTransport<T> {
    fn send(&self, message: Message) {
        let inner = self.inner.clone();
        filtered(&self.filter, message, move |m| inner.send(m));
    }

    fn set_peers(&self, peers: &std::collections::BTreeMap<u64, std::net::SocketAddr>) {
        self.inner.set_peers(peers);
    }
}

/// The data of a raft snapshot holding `store`'s current state with `key` set to `value`:
/// what a member that lies would send a follower as its leader's snapshot
/// (`tests/attacks.rs`).
pub fn forged_snapshot_data(store: &crate::Store, key: &str, value: &[u8]) -> Vec<u8> {
    store.inner.replica.with_state(|sm| {
        let mut forged = sm.clone();
        if let Some(stored) = forged.records.get_mut(key) {
            stored.record.value = value.to_vec();
        }
        crate::state::codec::encode_snapshot(&forged)
    })
}
