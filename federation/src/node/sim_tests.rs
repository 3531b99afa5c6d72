//! Randomized histories against the raft core, checked for linearizability.
//!
//! A deterministic simulator (seeded RNG, virtual clock) runs three members on an
//! in-memory network that drops, reorders and partitions messages, crashes members and
//! restarts them from their log (everything raft made durable survives, nothing else), and
//! lets clients issue puts, compare-and-sets and linearizable reads against random members.
//! Each history is checked by [`crate::checker`]. `ISTHMUS_HISTORIES=<n>` runs more than the
//! default (the bench script runs thousands).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::oneshot;

use super::outbox::Outbox;
use super::*;
use crate::checker::{check, Op, OpKind, OpResult};
use crate::replica::Role;
use crate::state::{Command, Outcome, WatchEvent};
use crate::storage::RaftLog;

const TICK: Duration = Duration::from_millis(10);
const KEYS: [&str; 2] = ["a", "b"];
const MEMBERS: [u64; 3] = [1, 2, 3];

enum Waiting {
    Write(oneshot::Receiver<Result<Outcome, StoreError>>),
    ReadIndex(oneshot::Receiver<Result<u64, StoreError>>),
    Apply(u64),
}

struct Pending {
    op: usize,
    member: u64,
    waiting: Waiting,
}

struct Member {
    node: Option<RaftNode<RaftLog>>,
    /// The log of a crashed member, waiting for its restart.
    down: Option<RaftLog>,
    outbox: Arc<Outbox>,
    replica: Arc<Replica>,
}

struct Sim {
    rng: StdRng,
    step: u64,
    now: Instant,
    members: BTreeMap<u64, Member>,
    network: Vec<Message>,
    isolated: BTreeSet<u64>,
    incarnation: u64,
    ops: Vec<Op>,
    pending: Vec<Pending>,
    next_value: u64,
}

fn config(id: u64, incarnation: u64) -> NodeConfig {
    NodeConfig {
        id,
        tick: TICK,
        election_ticks: 10,
        heartbeat_ticks: 2,
        proposal_timeout: Duration::from_secs(3),
        incarnation,
        snapshot_every: 10_000,
        snapshot_keep: 100,
        peers: BTreeMap::new(),
        signer: None,
    }
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let now = Instant::now();
        let mut sim = Sim {
            rng: StdRng::seed_from_u64(seed),
            step: 0,
            now,
            members: BTreeMap::new(),
            network: Vec::new(),
            isolated: BTreeSet::new(),
            incarnation: 1,
            ops: Vec::new(),
            pending: Vec::new(),
            next_value: 0,
        };
        for id in MEMBERS {
            let log = RaftLog::in_memory(&MEMBERS, Vec::new());
            let outbox = Arc::new(Outbox::default());
            let replica = Arc::new(Replica::new(id));
            sim.incarnation += 1;
            let node = RaftNode::new(
                config(id, sim.incarnation),
                log,
                outbox.clone(),
                replica.clone(),
                now,
            )
            .expect("node");
            sim.members.insert(
                id,
                Member {
                    node: Some(node),
                    down: None,
                    outbox,
                    replica,
                },
            );
        }
        sim
    }

    fn crash(&mut self, id: u64) {
        let member = self.members.get_mut(&id).expect("member");
        if let Some(node) = member.node.take() {
            // Everything raft was promised is synced at the end of each ready; the rest
            // (the node's memory, its replica, queued messages) is lost.
            member.down = Some(node.raw.store().durable_copy());
            member.outbox.take();
        }
    }

    fn restart(&mut self, id: u64) {
        self.incarnation += 1;
        let now = self.now;
        let incarnation = self.incarnation;
        let member = self.members.get_mut(&id).expect("member");
        if let Some(log) = member.down.take() {
            member.replica = Arc::new(Replica::new(id));
            let node = RaftNode::new(
                config(id, incarnation),
                log,
                member.outbox.clone(),
                member.replica.clone(),
                now,
            )
            .expect("restart");
            member.node = Some(node);
        }
    }

    fn alive(&self) -> Vec<u64> {
        self.members
            .iter()
            .filter(|(_, m)| m.node.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Handles readies, then delivers a random part of the network (dropping some, and
    /// everything across the partition or to crashed members).
    fn pump(&mut self, drop_per_mille: u32) {
        for member in self.members.values_mut() {
            if let Some(node) = member.node.as_mut() {
                node.handle_ready().expect("ready");
                let sent = member.outbox.take();
                self.network.extend(sent);
            }
        }
        let mut kept = Vec::new();
        for message in std::mem::take(&mut self.network) {
            if self.rng.random_range(0..4) == 0 {
                kept.push(message); // delayed: maybe next time (reordering)
                continue;
            }
            let cut = self.isolated.contains(&message.from) || self.isolated.contains(&message.to);
            if cut || self.rng.random_range(0..1000) < drop_per_mille {
                continue;
            }
            if let Some(node) = self
                .members
                .get_mut(&message.to)
                .and_then(|m| m.node.as_mut())
            {
                node.handle_message(message);
            }
        }
        self.network = kept;
    }

    fn tick(&mut self) {
        self.now += TICK;
        let now = self.now;
        for member in self.members.values_mut() {
            if let Some(node) = member.node.as_mut() {
                node.handle_tick(now);
            }
        }
    }

    fn invoke(&mut self) {
        let alive = self.alive();
        if alive.is_empty() {
            return;
        }
        let member = alive[self.rng.random_range(0..alive.len())];
        let key = KEYS[self.rng.random_range(0..KEYS.len())].to_string();
        self.next_value += 1;
        let value = format!("v{}", self.next_value).into_bytes();
        let kind = match self.rng.random_range(0..10) {
            0..=3 => OpKind::Read,
            4..=6 => OpKind::Put { value },
            _ => {
                // Expect what this member last saw (often stale on purpose).
                let expected = self.members[&member].replica.get(&key).map(|r| r.revision);
                OpKind::Cas { expected, value }
            }
        };
        let now = self.now;
        let node = self
            .members
            .get_mut(&member)
            .and_then(|m| m.node.as_mut())
            .expect("alive");
        let waiting = match &kind {
            OpKind::Read => {
                let (reply, rx) = oneshot::channel();
                node.handle_read(ReadRequest { reply }, now);
                Waiting::ReadIndex(rx)
            }
            OpKind::Put { value } | OpKind::Cas { value, .. } => {
                let command = match &kind {
                    OpKind::Cas { expected, .. } => Command::CompareAndSet {
                        key: key.clone(),
                        expected: *expected,
                        value: value.clone(),
                    },
                    _ => Command::Put {
                        key: key.clone(),
                        value: value.clone(),
                        lease_ttl_ms: 0,
                        at_ms: 0,
                    },
                };
                let (reply, rx) = oneshot::channel();
                node.handle_propose(
                    ProposeRequest {
                        request: Proposal::Write(command, crate::Writer::Member),
                        reply,
                    },
                    now,
                );
                Waiting::Write(rx)
            }
        };
        self.pending.push(Pending {
            op: self.ops.len(),
            member,
            waiting,
        });
        self.ops.push(Op {
            key,
            kind,
            invoke: self.step,
            complete: None,
            result: OpResult::Unknown,
        });
    }

    /// Collects answers; an operation whose member crashed or that failed stays unknown.
    fn collect(&mut self) {
        let step = self.step;
        let mut still = Vec::new();
        for mut p in std::mem::take(&mut self.pending) {
            let replica = self.members[&p.member].replica.clone();
            let alive = self.members[&p.member].node.is_some();
            let op = &mut self.ops[p.op];
            let done = match &mut p.waiting {
                Waiting::Write(rx) => match rx.try_recv() {
                    Ok(Ok(Outcome::Done(rev))) => Some(OpResult::Written(rev)),
                    Ok(Ok(Outcome::Conflict(current))) => Some(OpResult::Conflict(current)),
                    Ok(_) | Err(oneshot::error::TryRecvError::Closed) => None,
                    Err(oneshot::error::TryRecvError::Empty) => {
                        still.push(p);
                        continue;
                    }
                },
                Waiting::ReadIndex(rx) => match rx.try_recv() {
                    Ok(Ok(index)) => {
                        p.waiting = Waiting::Apply(index);
                        still.push(p);
                        continue;
                    }
                    Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => None,
                    Err(oneshot::error::TryRecvError::Empty) => {
                        still.push(p);
                        continue;
                    }
                },
                Waiting::Apply(index) => {
                    if !alive {
                        None
                    } else if replica.applied() >= *index {
                        let seen = replica.get(&op.key).map(|r| (r.value, r.revision));
                        Some(OpResult::Read(seen))
                    } else {
                        still.push(p);
                        continue;
                    }
                }
            };
            if let Some(result) = done {
                op.result = result;
                op.complete = Some(step);
            }
        }
        self.pending = still;
    }

    fn fault(&mut self) {
        match self.rng.random_range(0..6) {
            0 => {
                // Crash a member (never more than one down at once).
                let alive = self.alive();
                if alive.len() == MEMBERS.len() {
                    let id = alive[self.rng.random_range(0..alive.len())];
                    self.crash(id);
                }
            }
            1 => {
                let down: Vec<u64> = self
                    .members
                    .iter()
                    .filter(|(_, m)| m.node.is_none())
                    .map(|(id, _)| *id)
                    .collect();
                for id in down {
                    self.restart(id);
                }
            }
            2 => {
                self.isolated.clear();
                self.isolated
                    .insert(MEMBERS[self.rng.random_range(0..MEMBERS.len())]);
            }
            _ => self.isolated.clear(),
        }
    }

    fn run(&mut self) {
        for _ in 0..600 {
            self.step += 1;
            if self.rng.random_range(0..3) == 0 {
                self.invoke();
            }
            if self.rng.random_range(0..60) == 0 {
                self.fault();
            }
            self.pump(50);
            if self.step.is_multiple_of(2) {
                self.tick();
            }
            self.collect();
        }
        // Heal, restart everyone, and let every pending operation finish or time out.
        self.isolated.clear();
        for id in MEMBERS {
            self.restart(id);
        }
        for _ in 0..2000 {
            if self.pending.is_empty() {
                break;
            }
            self.step += 1;
            self.pump(0);
            self.tick();
            self.collect();
        }
        for _ in 0..200 {
            self.pump(0);
            self.tick();
        }
    }

    /// The applied versions of every key, from a member's full change history.
    fn versions(&self) -> BTreeMap<String, Vec<(u64, Vec<u8>)>> {
        let replica = &self.members[&1].replica;
        let (events, _) = replica.watch("", 2).expect("full history kept");
        let mut versions: BTreeMap<String, Vec<(u64, Vec<u8>)>> = BTreeMap::new();
        for event in events {
            if let WatchEvent::Put {
                key,
                value,
                revision,
            } = event
            {
                versions.entry(key).or_default().push((revision, value));
            }
        }
        versions
    }
}

#[test]
fn randomized_histories_under_crashes_and_partitions_are_linearizable() {
    let histories: u64 = std::env::var("ISTHMUS_HISTORIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut operations = 0;
    let mut acknowledged = 0;
    for seed in 0..histories {
        let mut sim = Sim::new(0x5EED_0000 + seed);
        sim.run();
        let leaders = sim
            .members
            .values()
            .filter(|m| {
                m.node
                    .as_ref()
                    .is_some_and(|n| n.status().role == Role::Leader)
            })
            .count();
        assert!(leaders <= 1, "seed {seed}: {leaders} leaders");
        let states: Vec<_> = sim.members.values().map(|m| m.replica.list("")).collect();
        assert!(
            states.windows(2).all(|w| w[0] == w[1]),
            "seed {seed}: replicas diverged: {states:?}"
        );
        if let Err(violation) = check(&sim.ops, &sim.versions()) {
            panic!("seed {seed}: {violation}\nhistory: {:#?}", sim.ops);
        }
        operations += sim.ops.len();
        acknowledged += sim.ops.iter().filter(|o| o.complete.is_some()).count();
    }
    // The histories must actually exercise the store.
    assert!(
        acknowledged * 2 > operations,
        "{acknowledged} of {operations} answered"
    );
}
