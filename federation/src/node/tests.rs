//! The raft core driven by hand: an in-memory transport with a partition filter, a clock
//! advanced by the test, no gRPC and no tasks.

use std::collections::BTreeSet;

use tokio::sync::oneshot::error::TryRecvError;

use super::outbox::Outbox;
use super::*;
use crate::replica::Role;
use crate::state::Command;
use crate::storage::RaftLog;

const TICK: Duration = Duration::from_millis(100);

struct Net {
    nodes: BTreeMap<u64, RaftNode<RaftLog>>,
    outboxes: BTreeMap<u64, Arc<Outbox>>,
    replicas: BTreeMap<u64, Arc<Replica>>,
    isolated: BTreeSet<u64>,
    /// Drops every append acknowledgement, so no leader can commit.
    drop_append_acks: bool,
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
            drop_append_acks: false,
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
                snapshot_every: 10_000,
                snapshot_keep: 100,
                peers: BTreeMap::new(),
                signer: None,
            };
            let node = RaftNode::new(
                config,
                RaftLog::in_memory(&ids, Vec::new()),
                outbox.clone(),
                replica.clone(),
                net.now,
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
                if self.isolated.contains(&message.from) || self.isolated.contains(&message.to) {
                    continue;
                }
                if self.drop_append_acks
                    && message.get_msg_type() == raft::prelude::MessageType::MsgAppendResponse
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

    /// Ticks until `answer` arrives (at most 500 ticks) and returns it.
    fn answered<T>(&mut self, what: &str, answer: &mut oneshot::Receiver<T>) -> T {
        let mut got = None;
        self.tick_until(what, |_| match answer.try_recv() {
            Ok(result) => {
                got = Some(result);
                true
            }
            Err(_) => false,
        });
        got.expect("tick_until returns once answered")
    }

    fn leader_among(&self, ids: &[u64]) -> Option<u64> {
        ids.iter()
            .copied()
            .find(|id| self.nodes[id].status().role == Role::Leader)
    }

    fn propose(&mut self, on: u64, key: &str) -> oneshot::Receiver<Result<Outcome, StoreError>> {
        let (reply, outcome) = oneshot::channel();
        let request = Proposal::Write(
            Command::Put {
                key: key.to_string(),
                value: b"v".to_vec(),
                lease_ttl_ms: 0,
                at_ms: 0,
            },
            crate::Writer::Member,
        );
        let now = self.now;
        if let Some(node) = self.nodes.get_mut(&on) {
            node.handle_propose(ProposeRequest { request, reply }, now);
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

    let mut outcome = net.propose(follower, "c/east");
    // Followers learn the commit index with the next append or heartbeat.
    net.tick_until("the write to be answered", |_| {
        !matches!(outcome.try_recv(), Err(TryRecvError::Empty))
    });
    net.tick_until("every replica to apply the write", |net| {
        net.replicas.values().all(|r| r.get("c/east").is_some())
    });
    let revisions: BTreeSet<u64> = net
        .replicas
        .values()
        .filter_map(|r| r.get("c/east").map(|rec| rec.revision))
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
    let mut outcome = net.propose(proposer, "c/retried");
    assert!(matches!(outcome.try_recv(), Err(TryRecvError::Empty)));

    net.tick_until("a new leader among the majority", |net| {
        net.leader_among(&others).is_some()
    });
    // The new leader makes the lost attempt due at once, not an election timeout later.
    let elected_at = net.now;
    let answer = net.answered("the retried write to be answered", &mut outcome);
    let ticks = (net.now - elected_at).as_millis() / TICK.as_millis();
    assert!(
        ticks <= 3,
        "the retried write took {ticks} ticks after the new leader (election timeout: 10)"
    );
    let revision = match answer {
        Ok(Outcome::Done(revision)) => revision,
        other => panic!("write failed: {other:?}"),
    };

    // Healing the partition brings the old leader up to date.
    net.isolated.clear();
    net.tick_until("the old leader to catch up", |net| {
        net.replicas[&old]
            .get("c/retried")
            .is_some_and(|r| r.revision == revision)
    });
    let mut puts = 0;
    while let Ok(event) = events.try_recv() {
        if event.key() == "c/retried" {
            puts += 1;
        }
    }
    assert_eq!(puts, 1, "the write was applied {puts} times");
}

#[test]
fn reads_made_before_a_new_leader_commits_in_its_term_are_answered_as_soon_as_it_does() {
    // raft drops a ReadIndex that reaches a leader before it has committed an entry of its
    // term; a read sent then would wait out a whole retry interval (an election timeout).
    // Both members number their first read 1: the leader must tell them apart.
    let mut net = Net::new(3);
    net.drop_append_acks = true;
    net.tick_until("a leader", |net| net.leader_among(&[1, 2, 3]).is_some());
    let leader = net.leader_among(&[1, 2, 3]).expect("leader");
    let follower = [1, 2, 3]
        .into_iter()
        .find(|&id| id != leader)
        .expect("follower");
    let mut reads = Vec::new();
    for on in [leader, follower] {
        let (reply, answer) = oneshot::channel();
        let now = net.now;
        net.nodes
            .get_mut(&on)
            .expect("member")
            .handle_read(ReadRequest { reply }, now);
        reads.push((on, answer));
    }
    for _ in 0..3 {
        net.tick();
    }
    for (on, answer) in &mut reads {
        assert!(
            matches!(answer.try_recv(), Err(TryRecvError::Empty)),
            "member {on} answered a read before its leader committed in its term"
        );
    }

    net.drop_append_acks = false;
    let healed_at = net.now;
    for (on, mut answer) in reads {
        let index = net.answered("the read to be answered", &mut answer);
        let ticks = (net.now - healed_at).as_millis() / TICK.as_millis();
        assert!(
            ticks <= 4,
            "member {on} answered its read {ticks} ticks after the leader could commit \
             (election timeout: 10)"
        );
        let index = index.expect("read index");
        assert!(
            index >= 1,
            "read index {index} precedes the leader's first entry"
        );
    }
}
