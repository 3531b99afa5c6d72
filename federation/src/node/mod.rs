//! The raft loop: one [`RaftNode`] per member wraps raft-rs's `RawNode`, and [`run`] drives
//! it from a tokio task.
//!
//! `RaftNode` does no network I/O and reads no clock (the caller passes `now`); its only
//! side effects go through its three seams: the [`LogStore`] (durable log), the
//! [`Transport`] (messages out) and the [`Replica`] (applied state). Its methods are grouped
//! as in quinn's `Connection`:
//!
//! - inputs: [`RaftNode::handle_tick`], [`RaftNode::handle_message`],
//!   [`RaftNode::handle_propose`], [`RaftNode::handle_read`];
//! - output: [`RaftNode::handle_ready`], to be called after every batch of inputs — it
//!   persists to the log store, sends through the transport, applies to the replica and
//!   takes snapshots;
//! - getter: [`RaftNode::status`].

mod members;
mod run;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::keyspace::rules;
use protobuf::Message as _;
use raft::eraftpb::{ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType, Snapshot};
use raft::{RawNode, ReadState};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::proposals::{Payload, Proposals};
use crate::replica::{MemberStatus, Replica};
use crate::state::codec::{decode_snapshot, encode_snapshot};
use crate::state::{decode_entry, Applied, Outcome};
use crate::storage::LogStore;
use crate::transport::Transport;
use crate::StoreError;

pub(crate) use members::Proposal;
pub(crate) use run::{run, NodeInputs};

/// Largest append message raft builds (it always sends at least one entry).
const MAX_APPEND_BYTES: u64 = 1024 * 1024;

/// A write (or membership change) for the raft loop to propose, and where to send its
/// outcome.
pub(crate) struct ProposeRequest {
    pub(crate) request: Proposal,
    pub(crate) reply: crate::proposals::Reply,
}

/// A linearizable read: the raft loop answers with the index the reader must wait for.
pub(crate) struct ReadRequest {
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
    /// Take a snapshot (and compact the log) after this many applied entries.
    pub(crate) snapshot_every: u64,
    /// Entries kept before a snapshot's index, so briefly lagging members catch up from the
    /// log rather than a snapshot.
    pub(crate) snapshot_keep: u64,
    /// Addresses known from the options (seeds; the replicated member table wins).
    pub(crate) peers: BTreeMap<u64, SocketAddr>,
    /// What this member signs its entries with.
    pub(crate) signer: Option<Arc<isthmus_core::tls::Identity>>,
}

impl NodeConfig {
    fn raft_config(&self, applied: u64) -> raft::Config {
        raft::Config {
            id: self.id,
            election_tick: self.election_ticks,
            heartbeat_tick: self.heartbeat_ticks,
            max_size_per_msg: MAX_APPEND_BYTES,
            max_inflight_msgs: 256,
            applied,
            // A leader cut off from the quorum steps down, and a member coming back from a
            // partition does not depose a healthy leader.
            check_quorum: true,
            pre_vote: true,
            ..raft::Config::default()
        }
    }

    /// Checks what raft-rs would refuse, before anything is started.
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        self.raft_config(0)
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

/// Whether a ReadIndex sent now reaches a leader that will answer it: a leader is known and
/// this replica's commit index lies in the current term. On the leader that is raft's own
/// condition for serving reads; a follower learns it with the leader's next append or
/// heartbeat, which carries the commit of the leader's first entry of its term.
fn read_index_ready<T: raft::Storage>(raft: &raft::Raft<T>) -> bool {
    raft.leader_id != raft::INVALID_ID && raft.commit_to_current_term()
}

fn ticks(tick: Duration, n: usize) -> Duration {
    tick.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))
}

struct PendingRead {
    reply: oneshot::Sender<Result<u64, StoreError>>,
    deadline: Instant,
    next_attempt: Instant,
}

/// One member's raft state machine driver.
pub(crate) struct RaftNode<S: LogStore> {
    raw: RawNode<S>,
    config: NodeConfig,
    transport: Arc<dyn Transport>,
    replica: Arc<Replica>,
    proposals: Proposals,
    reads: HashMap<u64, PendingRead>,
    next_read: u64,
    /// The configuration as of the applied index.
    conf_state: ConfState,
    /// Index of the latest snapshot (received or made).
    snapshot_index: u64,
    /// The latest time an input carried.
    now: Instant,
    leases: members::LeaseTimer,
    /// The leader as of the last tick ([`raft::INVALID_ID`] when none was known).
    leader_seen: u64,
}

impl<S: LogStore> RaftNode<S> {
    /// Builds the node from whatever the log store holds: the state machine is restored
    /// from its snapshot, and raft replays the committed entries after it.
    pub(crate) fn new(
        config: NodeConfig,
        store: S,
        transport: Arc<dyn Transport>,
        replica: Arc<Replica>,
        now: Instant,
    ) -> Result<Self, StoreError> {
        let snapshot = store.latest_snapshot().clone();
        let meta = snapshot.get_metadata();
        let snapshot_index = meta.index;
        let conf_state = meta.get_conf_state().clone();
        if snapshot_index > 0 {
            let sm = decode_snapshot(&snapshot.data).map_err(|e| StoreError::BadSnapshot {
                index: snapshot_index,
                reason: e.to_string(),
            })?;
            replica.restore(sm, snapshot_index);
        }
        let logger = crate::logging::raft_logger();
        let raw = RawNode::new(&config.raft_config(snapshot_index), store, &logger)
            .map_err(StoreError::CreateRaft)?;
        let proposals = Proposals::new(
            config.id,
            config.incarnation,
            config.proposal_timeout,
            config.signer.clone(),
        );
        let node = RaftNode {
            raw,
            config,
            transport,
            replica,
            proposals,
            reads: HashMap::new(),
            next_read: 1,
            conf_state,
            snapshot_index,
            now,
            leases: members::LeaseTimer::default(),
            leader_seen: raft::INVALID_ID,
        };
        node.update_peers();
        Ok(node)
    }

    // ----- inputs -----

    /// Advances raft's logical clock by one tick; retries or expires waiting writes and
    /// reads; as leader, times leases and finishes joint configurations.
    pub(crate) fn handle_tick(&mut self, now: Instant) {
        self.now = now;
        self.raw.tick();
        self.on_leader_change(now);
        for seq in self.proposals.due(now) {
            self.try_propose(seq, now);
        }
        self.retry_reads(now);
        self.leader_duties(now);
    }

    /// When a new leader becomes known, every waiting write and read is tried again at
    /// once: attempts forwarded to the old leader are lost, and waiting out their retry
    /// interval (an election timeout) would add up to that much to a failover.
    fn on_leader_change(&mut self, now: Instant) {
        let leader = self.raw.raft.leader_id;
        if leader == self.leader_seen {
            return;
        }
        self.leader_seen = leader;
        if leader == raft::INVALID_ID {
            return;
        }
        self.proposals.retry_all_at(now);
        for read in self.reads.values_mut() {
            read.next_attempt = read.next_attempt.min(now);
        }
    }

    /// Steps a message received from another member.
    pub(crate) fn handle_message(&mut self, message: Message) {
        let from = message.from;
        let kind = message.get_msg_type();
        if kind == MessageType::MsgSnapshot {
            if let Err(why) = self.vet_snapshot(message.get_snapshot()) {
                // Dropped before raft sees it: this member stays where it was, lagging, and
                // says why at every attempt (the leader keeps offering it).
                self.replica.count_refused_snapshot();
                tracing::error!(
                    member = self.config.id,
                    from,
                    index = message.get_snapshot().get_metadata().index,
                    "refused the leader's snapshot: {why}"
                );
                return;
            }
        }
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

    /// Starts a write (or membership change). Its caller is answered when this member
    /// applies the entry.
    pub(crate) fn handle_propose(&mut self, request: ProposeRequest, now: Instant) {
        self.now = now;
        let ProposeRequest { request, reply } = request;
        let request = match self.plan_membership(request) {
            Ok(request) => request,
            Err(err) => {
                let _ = reply.send(Err(err));
                return;
            }
        };
        let seq = self.proposals.add(&request, reply, now);
        self.try_propose(seq, now);
    }

    /// Starts a linearizable read: raft confirms leadership with a quorum (ReadIndex) and
    /// the caller is answered with the index to wait for.
    pub(crate) fn handle_read(&mut self, request: ReadRequest, now: Instant) {
        self.now = now;
        let ctx = self.next_read;
        self.next_read += 1;
        self.reads.insert(
            ctx,
            PendingRead {
                reply: request.reply,
                deadline: now + self.config.proposal_timeout,
                next_attempt: now,
            },
        );
        self.try_read(ctx, now);
    }

    fn try_read(&mut self, ctx: u64, now: Instant) {
        let ready = read_index_ready(&self.raw.raft);
        if let Some(read) = self.reads.get_mut(&ctx) {
            // raft drops a ReadIndex silently without a leader, and a leader drops it until
            // it has committed an entry of its own term: hold it until then, trying each
            // tick, rather than waiting out an election timeout for an answer that will
            // never come.
            read.next_attempt = if ready {
                now + self.config.election_timeout()
            } else {
                now
            };
            if ready {
                let context = self.read_context(ctx);
                self.raw.read_index(context);
            }
        }
    }

    fn retry_reads(&mut self, now: Instant) {
        self.reads.retain(|_, read| !read.reply.is_closed());
        let due: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| now >= r.next_attempt && now < r.deadline)
            .map(|(&ctx, _)| ctx)
            .collect();
        for ctx in due {
            self.try_read(ctx, now);
        }
    }

    fn expire_reads(&mut self, now: Instant) {
        let timeout = self.config.proposal_timeout;
        let expired: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| now >= r.deadline)
            .map(|(&ctx, _)| ctx)
            .collect();
        for ctx in expired {
            if let Some(read) = self.reads.remove(&ctx) {
                let _ = read.reply.send(Err(StoreError::ReadTimeout { timeout }));
            }
        }
    }

    /// A read's context as raft carries it to the leader: this member's id and
    /// incarnation, then the read's number. The leader keys pending reads by context and
    /// ignores one it already holds, so contexts must be unique across the federation:
    /// with bare counters, a follower's read that met the leader's own read of the same
    /// number was dropped and answered only an election timeout later.
    fn read_context(&self, ctx: u64) -> Vec<u8> {
        let mut context = self.read_prefix().to_vec();
        context.extend_from_slice(&ctx.to_be_bytes());
        context
    }

    /// What every read context of this member starts with: its id and incarnation.
    fn read_prefix(&self) -> [u8; 16] {
        let mut prefix = [0; 16];
        prefix[..8].copy_from_slice(&self.config.id.to_be_bytes());
        prefix[8..].copy_from_slice(&self.config.incarnation.to_be_bytes());
        prefix
    }

    fn answer_reads(&mut self, states: Vec<ReadState>) {
        let prefix = self.read_prefix();
        for state in states {
            let Some(ctx) = state
                .request_ctx
                .strip_prefix(prefix.as_slice())
                .and_then(|seq| <[u8; 8]>::try_from(seq).ok())
            else {
                continue;
            };
            if let Some(read) = self.reads.remove(&u64::from_be_bytes(ctx)) {
                let _ = read.reply.send(Ok(state.index));
            }
        }
    }

    fn try_propose(&mut self, seq: u64, now: Instant) {
        let Some(data) = self.proposals.data(seq) else {
            return;
        };
        let result = match data {
            Payload::Normal(data) => self.raw.propose(Vec::new(), data),
            Payload::ConfChange(cc) => self.raw.propose_conf_change(Vec::new(), cc),
        };
        match result {
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

    /// Handles everything raft has ready: sends, persists, applies, then snapshots if due.
    ///
    /// ORDER-CRITICAL. The steps follow raft-rs's `examples/five_mem_node` and the `Ready`
    /// documentation; reordering them breaks raft's safety:
    ///
    /// 1. send `messages` (they need nothing persisted: the leader's appends and heartbeats
    ///    may go out while it writes its own log);
    /// 2. install a received snapshot: durably in the log store (snapshot file and a new
    ///    log segment), then in the replica;
    /// 3. apply `committed_entries` (raft only hands out entries this member persisted);
    /// 4. append `entries` to the log store;
    /// 5. record the hard state;
    /// 6. **fsync** (one write and one fdatasync for steps 4–5);
    /// 7. only now send `persisted_messages` (votes and append responses promise that
    ///    steps 4–5 are durable), and answer read states;
    /// 8. `advance`, then from the light ready: record the commit index (fsynced with the
    ///    next batch; a lost commit index is learned again), send its messages, apply its
    ///    committed entries;
    /// 9. `advance_apply`, then take a snapshot if one is due or was asked for.
    ///
    /// A log store error stops the member (fail-stop): continuing after a lost write could
    /// break raft's promises.
    pub(crate) fn handle_ready(&mut self) -> Result<(), StoreError> {
        self.expire_reads(self.now);
        if !self.raw.has_ready() {
            return self.maybe_snapshot();
        }
        let mut ready = self.raw.ready();

        // 1. Messages that do not wait for persistence.
        self.send_all(ready.take_messages());

        // 2. A snapshot from the leader.
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            self.install_snapshot(snapshot)?;
        }

        // 3. Committed entries: already durable on a quorum (and here).
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

        // 6. The fsync point.
        self.raw.mut_store().sync().map_err(StoreError::Storage)?;

        // 7. Messages that promise the writes above are durable; confirmed reads.
        self.send_all(ready.take_persisted_messages());
        self.answer_reads(ready.take_read_states());

        // 8. Advance, then the light ready.
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw
                .mut_store()
                .set_commit(commit)
                .map_err(StoreError::Storage)?;
        }
        self.send_all(light.take_messages());
        self.apply_entries(light.take_committed_entries());

        // 9. Tell raft the entries are applied; compact if due.
        self.raw.advance_apply();
        self.maybe_snapshot()
    }

    fn send_all(&self, messages: Vec<Message>) {
        for message in messages {
            self.transport.send(message);
        }
    }

    /// Whether a snapshot offered by the leader may replace this member's state: it decodes,
    /// and it keeps every trust binding this member holds
    /// (`isthmus_core::keyspace::rules::snapshot`).
    fn vet_snapshot(&self, snapshot: &Snapshot) -> Result<(), String> {
        let incoming = decode_snapshot(&snapshot.data).map_err(|e| e.to_string())?;
        self.replica
            .with_state(|current| rules::snapshot::admit_snapshot(&*current, &incoming))
            .map_err(|refusal| refusal.to_string())
    }

    fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<(), StoreError> {
        let meta = snapshot.get_metadata();
        let index = meta.index;
        let sm = decode_snapshot(&snapshot.data).map_err(|e| StoreError::BadSnapshot {
            index,
            reason: e.to_string(),
        })?;
        self.conf_state = meta.get_conf_state().clone();
        self.raw
            .mut_store()
            .apply_snapshot(snapshot)
            .map_err(StoreError::Storage)?;
        self.replica.restore(sm, index);
        self.snapshot_index = index;
        tracing::info!(
            member = self.config.id,
            index,
            "installed a snapshot from the leader"
        );
        self.update_peers();
        Ok(())
    }

    /// Snapshots the state machine at the applied index and compacts the log, every
    /// `snapshot_every` entries, or when raft needs a newer snapshot for a follower.
    fn maybe_snapshot(&mut self) -> Result<(), StoreError> {
        let requested = self.raw.mut_store().take_snapshot_request();
        let applied = self.raw.raft.raft_log.applied;
        let due = applied >= self.snapshot_index + self.config.snapshot_every;
        if !(due || requested && applied > self.snapshot_index) {
            return Ok(());
        }
        let term = self
            .raw
            .store()
            .term(applied)
            .map_err(StoreError::Storage)?;
        let mut snapshot = Snapshot {
            data: self.replica.with_state(|sm| encode_snapshot(sm)).into(),
            ..Default::default()
        };
        let meta = snapshot.mut_metadata();
        meta.index = applied;
        meta.term = term;
        meta.set_conf_state(self.conf_state.clone());
        let compact_to = applied.saturating_sub(self.config.snapshot_keep) + 1;
        self.raw
            .mut_store()
            .save_snapshot(snapshot, compact_to)
            .map_err(StoreError::Storage)?;
        self.snapshot_index = applied;
        tracing::debug!(member = self.config.id, index = applied, "took a snapshot");
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            match entry.get_entry_type() {
                EntryType::EntryNormal => self.apply_normal(&entry),
                EntryType::EntryConfChangeV2 => self.apply_conf_change(&entry),
                EntryType::EntryConfChange => {
                    // The store only ever proposes ConfChangeV2.
                    tracing::warn!(
                        member = self.config.id,
                        index = entry.index,
                        "skipping a v1 conf change entry"
                    );
                }
            }
            // Per entry, so a writer answered below already sees its revision applied.
            self.replica.set_applied(entry.index);
        }
    }

    fn apply_normal(&mut self, entry: &Entry) {
        if entry.data.is_empty() {
            // The empty entry a new leader appends to commit its term.
            return;
        }
        match decode_entry(&entry.data) {
            Ok(content) => {
                let id = content.id;
                match self.replica.apply(entry.index, content) {
                    // Its first copy was answered already.
                    Applied::Duplicate => {}
                    Applied::Done { outcome, .. } => self.proposals.applied(id, Ok(outcome)),
                }
            }
            // Every replica skips the same bytes, so replicas stay identical.
            Err(err) => tracing::error!(
                member = self.config.id,
                index = entry.index,
                "skipping an entry that does not decode: {err}"
            ),
        }
    }

    fn apply_conf_change(&mut self, entry: &Entry) {
        let cc = match ConfChangeV2::parse_from_bytes(&entry.data) {
            Ok(cc) => cc,
            Err(err) => {
                tracing::error!(
                    member = self.config.id,
                    index = entry.index,
                    "skipping a conf change that does not decode: {err}"
                );
                return;
            }
        };
        let context = members::decode_context(&cc);
        if let Some((id, _)) = &context {
            if !self.replica.with_state(|sm| sm.first_time(*id)) {
                return;
            }
        }
        let outcome = match self.raw.apply_conf_change(&cc) {
            Ok(conf_state) => {
                self.conf_state = conf_state;
                let added = context.as_ref().map(|(_, m)| m.as_slice()).unwrap_or(&[]);
                self.replica
                    .with_state(|sm| members::record_change(sm, &cc, added, entry.index));
                self.update_peers();
                self.after_conf_change();
                Ok(Outcome::Done(entry.index))
            }
            Err(err) => {
                tracing::warn!(
                    member = self.config.id,
                    index = entry.index,
                    "membership change not applied: {err}"
                );
                Err(StoreError::Membership(err.to_string()))
            }
        };
        if let Some((id, _)) = context {
            self.proposals.applied(id, outcome);
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
            voters: self.conf_state.voters.clone(),
            learners: self.conf_state.learners.clone(),
            snapshot_index: self.snapshot_index,
            rejected_peer_batches: 0,
        }
    }
}

#[cfg(test)]
mod outbox;
#[cfg(test)]
mod sim_tests;
#[cfg(test)]
mod tests;
