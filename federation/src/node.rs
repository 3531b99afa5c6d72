//! The raft loop: one [`RaftNode`] per member wraps raft-rs's `RawNode`, and [`run`] drives
//! it from a tokio task.
//!
//! `RaftNode` does no I/O and reads no clock (the caller passes `now`); its methods are
//! grouped as in quinn's `Connection`:
//!
//! - inputs: [`RaftNode::handle_tick`], [`RaftNode::handle_message`],
//!   [`RaftNode::handle_propose`];
//! - output: [`RaftNode::handle_ready`], to be called after every batch of inputs — it
//!   persists to the log store, sends through the transport and applies to the replica;
//! - getter: [`RaftNode::status`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use raft::eraftpb::{Entry, EntryType, Message};
use raft::RawNode;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};

use crate::proposals::Proposals;
use crate::replica::{MemberStatus, Replica};
use crate::state::{decode_entry, Applied, Command, ProposalId};
use crate::storage::LogStore;
use crate::transport::Transport;
use crate::StoreError;

/// Largest append message raft builds (it always sends at least one entry).
const MAX_APPEND_BYTES: u64 = 1024 * 1024;
/// How many incoming messages are stepped before the loop handles a ready.
const MAX_STEPS_PER_READY: usize = 256;

/// A write for the raft loop to propose, and where to send its outcome.
pub(crate) struct ProposeRequest {
    pub(crate) command: Command,
    pub(crate) reply: oneshot::Sender<Result<u64, StoreError>>,
}

/// How one member's raft is set up.
#[derive(Debug, Clone)]
pub(crate) struct NodeConfig {
    pub(crate) id: u64,
    pub(crate) tick: Duration,
    pub(crate) election_ticks: usize,
    pub(crate) heartbeat_ticks: usize,
    pub(crate) proposal_timeout: Duration,
    pub(crate) incarnation: u64,
}

impl NodeConfig {
    fn raft_config(&self) -> raft::Config {
        raft::Config {
            id: self.id,
            election_tick: self.election_ticks,
            heartbeat_tick: self.heartbeat_ticks,
            max_size_per_msg: MAX_APPEND_BYTES,
            max_inflight_msgs: 256,
            // A leader cut off from the quorum steps down, and a member coming back from a
            // partition does not depose a healthy leader.
            check_quorum: true,
            pre_vote: true,
            ..raft::Config::default()
        }
    }

    /// Checks what raft-rs would refuse, before anything is started.
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        self.raft_config()
            .validate()
            .map_err(StoreError::CreateRaft)
    }

    /// How long followers wait for a leader before campaigning (at least).
    pub(crate) fn election_timeout(&self) -> Duration {
        ticks(self.tick, self.election_ticks)
    }

    /// How often the leader sends heartbeats.
    pub(crate) fn heartbeat_interval(&self) -> Duration {
        ticks(self.tick, self.heartbeat_ticks)
    }
}

fn ticks(tick: Duration, n: usize) -> Duration {
    tick.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))
}

/// One member's raft state machine driver.
pub(crate) struct RaftNode<S: LogStore> {
    raw: RawNode<S>,
    config: NodeConfig,
    transport: Arc<dyn Transport>,
    replica: Arc<Replica>,
    proposals: Proposals,
}

impl<S: LogStore> RaftNode<S> {
    pub(crate) fn new(
        config: NodeConfig,
        store: S,
        transport: Arc<dyn Transport>,
        replica: Arc<Replica>,
    ) -> Result<Self, StoreError> {
        let logger = crate::logging::raft_logger();
        let raw =
            RawNode::new(&config.raft_config(), store, &logger).map_err(StoreError::CreateRaft)?;
        let proposals = Proposals::new(config.id, config.incarnation, config.proposal_timeout);
        Ok(RaftNode {
            raw,
            config,
            transport,
            replica,
            proposals,
        })
    }

    // ----- inputs -----

    /// Advances raft's logical clock by one tick, and retries or expires waiting writes.
    pub(crate) fn handle_tick(&mut self, now: Instant) {
        self.raw.tick();
        for seq in self.proposals.due(now) {
            self.try_propose(seq, now);
        }
    }

    /// Steps a message received from another member.
    pub(crate) fn handle_message(&mut self, message: Message) {
        let from = message.from;
        let kind = message.get_msg_type();
        if let Err(err) = self.raw.step(message) {
            // Stale or unexpected messages are normal in raft; they are dropped.
            tracing::debug!(
                member = self.config.id,
                from,
                ?kind,
                "raft ignored message: {err}"
            );
        }
    }

    /// Starts a write. Its caller is answered when this member applies the entry.
    pub(crate) fn handle_propose(&mut self, request: ProposeRequest, now: Instant) {
        let seq = self.proposals.add(&request.command, request.reply, now);
        self.try_propose(seq, now);
    }

    fn try_propose(&mut self, seq: u64, now: Instant) {
        let Some(data) = self.proposals.data(seq) else {
            return;
        };
        match self.raw.propose(Vec::new(), data) {
            // In the local log (leader) or forwarded to the leader (follower). Either may
            // still be lost, so try again if it is not applied within an election timeout.
            Ok(()) => self
                .proposals
                .retry_at(seq, now + self.config.election_timeout()),
            // No leader known yet: try again on the next tick.
            Err(raft::Error::ProposalDropped) => self.proposals.retry_at(seq, now),
            Err(err) => self.proposals.fail(seq, StoreError::Propose(err)),
        }
    }

    // ----- output -----

    /// Handles everything raft has ready: sends, persists, applies.
    ///
    /// ORDER-CRITICAL. The steps follow raft-rs's `examples/five_mem_node` and the `Ready`
    /// documentation; reordering them breaks raft's safety:
    ///
    /// 1. send `messages` (they need nothing persisted: the leader's appends and heartbeats
    ///    may go out while it writes its own log);
    /// 2. apply a received snapshot to the log store (`advance` stabilises it);
    /// 3. apply `committed_entries` to the state machine;
    /// 4. append `entries` to the log store;
    /// 5. persist the hard state (term, vote, commit);
    /// 6. only now send `persisted_messages` (votes and append responses promise that
    ///    steps 4–5 are durable);
    /// 7. `advance`, then from the light ready: persist the commit index, send its messages,
    ///    apply its committed entries;
    /// 8. `advance_apply`.
    ///
    /// A log store error stops the member (fail-stop): continuing after a lost write could
    /// break raft's promises.
    pub(crate) fn handle_ready(&mut self) -> Result<(), StoreError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();

        // 1. Messages that do not wait for persistence.
        self.send_all(ready.take_messages());

        // 2. Snapshot (none are produced yet; kept so the order is right when they are).
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            self.raw
                .mut_store()
                .apply_snapshot(snapshot)
                .map_err(StoreError::Storage)?;
        }

        // 3. Committed entries: already durable on a quorum.
        self.apply_entries(ready.take_committed_entries());

        // 4. New log entries.
        if !ready.entries().is_empty() {
            self.raw
                .mut_store()
                .append(ready.entries())
                .map_err(StoreError::Storage)?;
        }

        // 5. Hard state.
        if let Some(hard_state) = ready.hs() {
            self.raw
                .mut_store()
                .set_hard_state(hard_state.clone())
                .map_err(StoreError::Storage)?;
        }

        // 6. Messages that promise the writes above are durable.
        self.send_all(ready.take_persisted_messages());

        // 7. Advance, then the light ready.
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw
                .mut_store()
                .set_commit(commit)
                .map_err(StoreError::Storage)?;
        }
        self.send_all(light.take_messages());
        self.apply_entries(light.take_committed_entries());

        // 8. Tell raft the entries are applied.
        self.raw.advance_apply();
        Ok(())
    }

    fn send_all(&self, messages: Vec<Message>) {
        for message in messages {
            self.transport.send(message);
        }
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            let proposal = self.apply_entry(&entry);
            // Per entry, so a writer answered below already sees its revision applied.
            self.replica.set_applied(entry.index);
            if let Some(id) = proposal {
                self.proposals.applied(id, entry.index);
            }
        }
    }

    /// Applies one entry to the replica; returns the proposal to answer, if any.
    fn apply_entry(&self, entry: &Entry) -> Option<ProposalId> {
        if entry.data.is_empty() {
            // The empty entry a new leader appends to commit its term.
            return None;
        }
        if entry.get_entry_type() != EntryType::EntryNormal {
            // Membership is static for now: no conf change is ever proposed.
            tracing::warn!(
                member = self.config.id,
                index = entry.index,
                "skipping an unexpected conf change entry"
            );
            return None;
        }
        match decode_entry(&entry.data) {
            Ok((id, command)) => match self.replica.apply(entry.index, id, command) {
                // Its first copy was answered already.
                Applied::Duplicate => None,
                Applied::Changed(_) | Applied::Unchanged => Some(id),
            },
            // Every replica skips the same bytes, so replicas stay identical.
            Err(err) => {
                tracing::error!(
                    member = self.config.id,
                    index = entry.index,
                    "skipping an entry that does not decode: {err}"
                );
                None
            }
        }
    }

    // ----- getters -----

    /// This member's raft state now.
    pub(crate) fn status(&self) -> MemberStatus {
        let raft = &self.raw.raft;
        MemberStatus {
            id: raft.id,
            role: raft.state.into(),
            leader_id: (raft.leader_id != raft::INVALID_ID).then_some(raft.leader_id),
            term: raft.term,
            commit_index: raft.raft_log.committed,
            applied_index: raft.raft_log.applied,
        }
    }
}

/// What drives one member's raft loop besides its clock.
pub(crate) struct NodeInputs {
    /// Messages from other members (from the peer server).
    pub(crate) inbound: mpsc::Receiver<Message>,
    /// Writes from [`crate::Store`] handles.
    pub(crate) proposals: mpsc::Receiver<ProposeRequest>,
    /// Turns true when the store shuts down.
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// Runs the raft loop until shutdown (or a log store failure). Every iteration handles one
/// input (or a burst of incoming messages), then the ready, then publishes the status.
pub(crate) async fn run<S: LogStore>(mut node: RaftNode<S>, mut inputs: NodeInputs) {
    let mut ticker = tokio::time::interval(node.config.tick);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = inputs.shutdown.wait_for(|stopped| *stopped) => break,
            Some(message) = inputs.inbound.recv() => {
                node.handle_message(message);
                for _ in 1..MAX_STEPS_PER_READY {
                    match inputs.inbound.try_recv() {
                        Ok(message) => node.handle_message(message),
                        Err(_) => break,
                    }
                }
            }
            Some(request) = inputs.proposals.recv() => node.handle_propose(request, Instant::now()),
            _ = ticker.tick() => node.handle_tick(Instant::now()),
        }
        if let Err(err) = node.handle_ready() {
            tracing::error!(
                member = node.config.id,
                error = &err as &dyn std::error::Error,
                "stopping the raft loop"
            );
            break;
        }
        node.replica.publish_status(node.status());
    }
    tracing::debug!(member = node.config.id, "raft loop stopped");
    // Dropping the node answers every waiting write with `Stopped`.
}

/// Every member's raft id, for the initial configuration.
pub(crate) fn voters<V>(peers: &BTreeMap<u64, V>) -> Vec<u64> {
    peers.keys().copied().collect()
}

#[cfg(test)]
mod tests {
    //! The raft core driven by hand: an in-memory transport with a partition filter, a
    //! clock advanced by the test, no gRPC and no tasks.

    use std::collections::BTreeSet;
    use std::sync::Mutex;

    use tokio::sync::oneshot::error::TryRecvError;

    use super::*;
    use crate::replica::Role;
    use crate::storage::MemLogStore;

    const TICK: Duration = Duration::from_millis(100);

    /// Collects what a node sends; the test network delivers it.
    #[derive(Default)]
    struct Outbox(Mutex<Vec<Message>>);

    impl Transport for Outbox {
        fn send(&self, message: Message) {
            self.0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(message);
        }
    }

    impl Outbox {
        fn take(&self) -> Vec<Message> {
            std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
        }
    }

    struct Net {
        nodes: BTreeMap<u64, RaftNode<MemLogStore>>,
        outboxes: BTreeMap<u64, Arc<Outbox>>,
        replicas: BTreeMap<u64, Arc<Replica>>,
        isolated: BTreeSet<u64>,
        now: Instant,
    }

    impl Net {
        fn new(n: u64) -> Net {
            let ids: Vec<u64> = (1..=n).collect();
            let mut net = Net {
                nodes: BTreeMap::new(),
                outboxes: BTreeMap::new(),
                replicas: BTreeMap::new(),
                isolated: BTreeSet::new(),
                now: Instant::now(),
            };
            for &id in &ids {
                let outbox = Arc::new(Outbox::default());
                let replica = Arc::new(Replica::new(id));
                let config = NodeConfig {
                    id,
                    tick: TICK,
                    election_ticks: 10,
                    heartbeat_ticks: 2,
                    proposal_timeout: Duration::from_secs(30),
                    incarnation: 7,
                };
                let node = RaftNode::new(
                    config,
                    MemLogStore::new(ids.clone()),
                    outbox.clone(),
                    replica.clone(),
                )
                .expect("raft node");
                net.nodes.insert(id, node);
                net.outboxes.insert(id, outbox);
                net.replicas.insert(id, replica);
            }
            net
        }

        /// Handles readies and delivers messages (dropping those across the partition)
        /// until the network is quiet.
        fn settle(&mut self) {
            for _ in 0..1000 {
                let mut in_flight = Vec::new();
                for (id, node) in &mut self.nodes {
                    node.handle_ready().expect("ready");
                    in_flight.extend(self.outboxes[id].take());
                }
                if in_flight.is_empty() {
                    return;
                }
                for message in in_flight {
                    if self.isolated.contains(&message.from) || self.isolated.contains(&message.to)
                    {
                        continue;
                    }
                    if let Some(node) = self.nodes.get_mut(&message.to) {
                        node.handle_message(message);
                    }
                }
            }
            panic!("network never went quiet");
        }

        fn tick(&mut self) {
            self.now += TICK;
            for node in self.nodes.values_mut() {
                node.handle_tick(self.now);
            }
            self.settle();
        }

        fn tick_until(&mut self, what: &str, mut done: impl FnMut(&Net) -> bool) {
            for _ in 0..500 {
                if done(self) {
                    return;
                }
                self.tick();
            }
            panic!("{what} did not happen within 500 ticks");
        }

        fn leader_among(&self, ids: &[u64]) -> Option<u64> {
            ids.iter()
                .copied()
                .find(|id| self.nodes[id].status().role == Role::Leader)
        }

        fn propose(&mut self, on: u64, key: &str) -> oneshot::Receiver<Result<u64, StoreError>> {
            let (reply, outcome) = oneshot::channel();
            let command = Command::Put {
                key: key.to_string(),
                value: b"v".to_vec(),
            };
            let now = self.now;
            if let Some(node) = self.nodes.get_mut(&on) {
                node.handle_propose(ProposeRequest { command, reply }, now);
            }
            self.settle();
            outcome
        }
    }

    #[test]
    fn follower_write_is_forwarded_committed_and_answered_with_its_revision() {
        let mut net = Net::new(3);
        net.tick_until("a leader", |net| net.leader_among(&[1, 2, 3]).is_some());
        let leader = net.leader_among(&[1, 2, 3]).expect("leader");
        let follower = [1, 2, 3]
            .into_iter()
            .find(|&id| id != leader)
            .expect("follower");

        let mut outcome = net.propose(follower, "clusters/east");
        // Followers learn the commit index with the next append or heartbeat.
        net.tick_until("the write to be answered", |_| {
            !matches!(outcome.try_recv(), Err(TryRecvError::Empty))
        });
        net.tick_until("every replica to apply the write", |net| {
            net.replicas
                .values()
                .all(|r| r.get("clusters/east").is_some())
        });
        let revisions: BTreeSet<u64> = net
            .replicas
            .values()
            .filter_map(|r| r.get("clusters/east").map(|rec| rec.revision))
            .collect();
        assert_eq!(revisions.len(), 1, "replicas disagree: {revisions:?}");
    }

    #[test]
    fn write_lost_with_an_isolated_leader_is_retried_and_applied_once() {
        let mut net = Net::new(3);
        net.tick_until("a leader", |net| net.leader_among(&[1, 2, 3]).is_some());
        let old = net.leader_among(&[1, 2, 3]).expect("leader");
        let others: Vec<u64> = [1, 2, 3].into_iter().filter(|&id| id != old).collect();
        let proposer = others[0];
        let mut events = net.replicas[&proposer].subscribe();

        // The proposer still believes in the old leader and forwards to it; the partition
        // swallows the forwarded proposal.
        net.isolated.insert(old);
        let mut outcome = net.propose(proposer, "clusters/retried");
        assert!(matches!(outcome.try_recv(), Err(TryRecvError::Empty)));

        net.tick_until("a new leader among the majority", |net| {
            net.leader_among(&others).is_some()
        });
        let mut answer = None;
        net.tick_until("the retried write to be answered", |_| {
            match outcome.try_recv() {
                Ok(result) => {
                    answer = Some(result);
                    true
                }
                Err(_) => false,
            }
        });
        let revision = match answer {
            Some(Ok(revision)) => revision,
            other => panic!("write failed: {other:?}"),
        };

        // Healing the partition brings the old leader up to date.
        net.isolated.clear();
        net.tick_until("the old leader to catch up", |net| {
            net.replicas[&old]
                .get("clusters/retried")
                .is_some_and(|r| r.revision == revision)
        });
        let mut puts = 0;
        while let Ok(event) = events.try_recv() {
            if event.key() == "clusters/retried" {
                puts += 1;
            }
        }
        assert_eq!(puts, 1, "the write was applied {puts} times");
    }
}
