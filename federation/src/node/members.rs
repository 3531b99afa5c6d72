//! Membership and leader duties of the raft node: planning membership changes (joint
//! consensus with ConfChangeV2, at most [`MAX_VOTERS`] voters, the oldest learner promoted
//! when a voter leaves), keeping the member table and the transport in step with the
//! configuration, and timing leases on the leader.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use raft::eraftpb::{ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2};
use tokio::time::Instant;

use super::RaftNode;
use crate::proposals::Request;
use crate::state::codec::decode_conf_context;
use crate::state::{Command, MemberInfo, ProposalId, StateMachine};
use crate::storage::LogStore;
use crate::{StoreError, Writer};

/// Most voters a federation has; further members join as learners.
pub(crate) const MAX_VOTERS: usize = 5;

/// What a caller asks the raft loop to propose.
#[derive(Debug, Clone)]
pub(crate) enum Proposal {
    /// A change to the map (or tokens).
    Write(Command, Writer),
    /// Add a member; `voter` asks for a vote, granted while there are fewer than
    /// [`MAX_VOTERS`] voters.
    AddMember {
        id: u64,
        addr: SocketAddr,
        voter: bool,
    },
    /// Remove a member; if it votes, the oldest learner is promoted in the same change.
    RemoveMember { id: u64 },
}

/// The proposal id and added members carried in a conf change's context (None for the
/// empty change raft proposes to leave a joint configuration).
pub(crate) fn decode_context(cc: &ConfChangeV2) -> Option<(ProposalId, Vec<(u64, String)>)> {
    if cc.context.is_empty() {
        return None;
    }
    decode_conf_context(&cc.context).ok()
}

/// Updates the member table for an applied change.
pub(crate) fn record_change(
    sm: &mut StateMachine,
    cc: &ConfChangeV2,
    added: &[(u64, String)],
    index: u64,
) {
    for change in cc.get_changes() {
        match change.get_change_type() {
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                if let Some((_, addr)) = added.iter().find(|(id, _)| *id == change.node_id) {
                    sm.members
                        .entry(change.node_id)
                        .or_insert_with(|| MemberInfo {
                            peer_addr: addr.clone(),
                            added_at: index,
                        });
                }
            }
            ConfChangeType::RemoveNode => {
                sm.members.remove(&change.node_id);
            }
        }
    }
}

fn single(node_id: u64, change_type: ConfChangeType) -> ConfChangeSingle {
    let mut change = ConfChangeSingle {
        node_id,
        ..Default::default()
    };
    change.set_change_type(change_type);
    change
}

fn joint(changes: Vec<ConfChangeSingle>) -> ConfChangeV2 {
    let mut cc = ConfChangeV2::default();
    // Implicit: always through a joint configuration, left automatically once applied.
    cc.set_transition(ConfChangeTransition::Implicit);
    cc.set_changes(changes.into());
    cc
}

impl<S: LogStore> RaftNode<S> {
    /// Turns a caller's proposal into what raft is asked to log, deciding voter or learner
    /// and which learner to promote from this member's view of the configuration.
    pub(super) fn plan_membership(&self, proposal: Proposal) -> Result<Request, StoreError> {
        let cs = &self.conf_state;
        let refuse = |reason: String| Err(StoreError::Membership(reason));
        match proposal {
            Proposal::Write(command, writer) => Ok(Request::Command(command, writer)),
            Proposal::AddMember { id, addr, voter } => {
                if id == 0 {
                    return refuse("0 is not a valid member id".to_string());
                }
                if cs.voters.contains(&id) || cs.learners.contains(&id) {
                    return refuse(format!("member {id} is already in the federation"));
                }
                let change = if voter && cs.voters.len() < MAX_VOTERS {
                    ConfChangeType::AddNode
                } else {
                    ConfChangeType::AddLearnerNode
                };
                Ok(Request::ConfChange(
                    joint(vec![single(id, change)]),
                    vec![(id, addr.to_string())],
                ))
            }
            Proposal::RemoveMember { id } => {
                let is_voter = cs.voters.contains(&id);
                if !is_voter && !cs.learners.contains(&id) {
                    return refuse(format!("member {id} is not in the federation"));
                }
                let mut changes = vec![single(id, ConfChangeType::RemoveNode)];
                if is_voter {
                    let oldest_learner = self.replica.with_state(|sm| {
                        cs.learners
                            .iter()
                            .min_by_key(|l| sm.members.get(l).map_or(u64::MAX, |m| m.added_at))
                            .copied()
                    });
                    match oldest_learner {
                        Some(learner) => changes.push(single(learner, ConfChangeType::AddNode)),
                        None if cs.voters.len() == 1 => {
                            return refuse(format!("member {id} is the last voter"));
                        }
                        None => {}
                    }
                }
                Ok(Request::ConfChange(joint(changes), Vec::new()))
            }
        }
    }

    /// Points the transport (and the peer server's sender check) at every known member:
    /// the replicated member table, then the addresses from the options for the others.
    pub(super) fn update_peers(&self) {
        let mut peers: BTreeMap<u64, SocketAddr> = self.config.peers.clone();
        let table = self.replica.with_state(|sm| sm.members.clone());
        for (id, member) in table {
            match member.peer_addr.parse() {
                Ok(addr) => {
                    peers.insert(id, addr);
                }
                Err(_) => tracing::warn!(
                    member = self.config.id,
                    peer = id,
                    addr = member.peer_addr,
                    "member has an unusable peer address"
                ),
            }
        }
        peers.remove(&self.config.id);
        self.replica
            .set_known_peers(peers.keys().copied().collect());
        self.transport.set_peers(&peers);
    }

    /// A leader that is no longer a voter hands leadership to the most up-to-date voter.
    /// Called after every change and on every tick: a handover can fail (the chosen voter
    /// may not have applied the change yet) and raft aborts it after an election timeout.
    pub(super) fn after_conf_change(&mut self) {
        let id = self.config.id;
        if self.raw.raft.state != raft::StateRole::Leader
            || self.conf_state.voters.contains(&id)
            || !self.conf_state.voters_outgoing.is_empty()
            || self.raw.raft.lead_transferee.is_some()
        {
            return;
        }
        let best = self
            .conf_state
            .voters
            .iter()
            .filter_map(|v| self.raw.raft.prs().get(*v).map(|p| (p.matched, *v)))
            .max();
        if let Some((_, to)) = best {
            tracing::info!(member = id, to, "removed as voter: handing over leadership");
            self.raw.transfer_leader(to);
        }
    }

    /// As leader: leave a joint configuration a previous leader left behind, and expire
    /// leases its clock says ran out. As follower: forget lease timers.
    pub(super) fn leader_duties(&mut self, now: Instant) {
        if self.raw.raft.state != raft::StateRole::Leader {
            self.leases.clear();
            return;
        }
        self.after_conf_change();
        let applied = self.raw.raft.raft_log.applied;
        if !self.conf_state.voters_outgoing.is_empty()
            && self.raw.raft.pending_conf_index <= applied
        {
            let _ = self
                .raw
                .propose_conf_change(Vec::new(), ConfChangeV2::default());
        }
        let live = self.replica.with_state(|sm| sm.live_leases());
        for (key, epoch) in self.leases.due(live, now, self.config.election_timeout()) {
            let (_, id) = self.proposals.next_id();
            let data = crate::state::encode_entry(
                id,
                &Writer::Member,
                &Command::ExpireLease { key, epoch },
                None,
            );
            let _ = self.raw.propose(Vec::new(), data);
        }
    }
}

struct Timer {
    epoch: u64,
    deadline: Instant,
    proposed: Option<Instant>,
}

/// The leader's lease clock: when each live lease runs out by this member's monotonic
/// clock. A new leader starts every lease afresh (the owner gets a full period of grace),
/// as etcd's lessor does on promotion.
#[derive(Default)]
pub(crate) struct LeaseTimer {
    timers: HashMap<String, Timer>,
}

impl LeaseTimer {
    /// Given the live leases (key, epoch, ttl in ms), returns those to expire now. An
    /// expiry not applied after `retry` is proposed again.
    pub(crate) fn due(
        &mut self,
        live: Vec<(String, u64, u64)>,
        now: Instant,
        retry: Duration,
    ) -> Vec<(String, u64)> {
        let mut timers = HashMap::with_capacity(live.len());
        let mut due = Vec::new();
        for (key, epoch, ttl_ms) in live {
            let mut timer = match self.timers.remove(&key) {
                Some(t) if t.epoch == epoch => t,
                _ => Timer {
                    epoch,
                    deadline: now + Duration::from_millis(ttl_ms),
                    proposed: None,
                },
            };
            if now >= timer.deadline && timer.proposed.is_none_or(|at| now >= at + retry) {
                timer.proposed = Some(now);
                due.push((key.clone(), epoch));
            }
            timers.insert(key, timer);
        }
        self.timers = timers;
        due
    }

    /// Forgets every timer (this member is not the leader).
    pub(crate) fn clear(&mut self) {
        self.timers.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_runs_out_after_its_ttl_and_renewal_restarts_it() {
        let start = Instant::now();
        let retry = Duration::from_millis(250);
        let mut timer = LeaseTimer::default();
        let live = |epoch| vec![("k".to_string(), epoch, 1000)];
        assert!(timer.due(live(2), start, retry).is_empty());
        assert!(timer
            .due(live(2), start + Duration::from_millis(999), retry)
            .is_empty());
        // Renewed (new epoch) just in time: the clock restarts.
        assert!(timer
            .due(live(5), start + Duration::from_millis(1000), retry)
            .is_empty());
        let expired_at = start + Duration::from_millis(2000);
        assert_eq!(
            timer.due(live(5), expired_at, retry),
            vec![("k".to_string(), 5)]
        );
        // Not proposed again until the retry interval passes.
        assert!(timer
            .due(live(5), expired_at + Duration::from_millis(100), retry)
            .is_empty());
        assert_eq!(
            timer.due(live(5), expired_at + retry, retry),
            vec![("k".to_string(), 5)]
        );
        // Gone from the live set (expired or deleted): forgotten.
        assert!(timer.due(Vec::new(), expired_at + retry, retry).is_empty());
        assert!(timer.timers.is_empty());
    }
}
