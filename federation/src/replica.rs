//! This member's readable replica: the applied map, the revision watch, the change
//! broadcast and the member status, shared between the raft loop (the only writer) and the
//! [`crate::Store`] handles (readers).

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::{broadcast, watch};

use crate::state::{Applied, Command, ProposalId, Record, StateMachine, WatchEvent};

/// How many change events a slow subscriber may fall behind before it sees `Lagged`.
const EVENT_BUFFER: usize = 1024;

/// A member's role in raft.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Checking, before a real election, whether it could win one (raft pre-vote).
    PreCandidate,
    /// Asking for votes in an election.
    Candidate,
    /// Leads the federation: every write goes through it.
    Leader,
}

impl From<raft::StateRole> for Role {
    fn from(role: raft::StateRole) -> Self {
        match role {
            raft::StateRole::Follower => Role::Follower,
            raft::StateRole::PreCandidate => Role::PreCandidate,
            raft::StateRole::Candidate => Role::Candidate,
            raft::StateRole::Leader => Role::Leader,
        }
    }
}

/// A snapshot of one member's raft state, for `isthmus status` and readiness checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    /// This member's raft id.
    pub id: u64,
    /// Its current role.
    pub role: Role,
    /// The leader it knows of, if any.
    pub leader_id: Option<u64>,
    /// Its current raft term.
    pub term: u64,
    /// Highest log index known to be committed.
    pub commit_index: u64,
    /// Highest log index applied to this replica's map.
    pub applied_index: u64,
}

impl MemberStatus {
    pub(crate) fn starting(id: u64) -> Self {
        MemberStatus {
            id,
            role: Role::Follower,
            leader_id: None,
            term: 0,
            commit_index: 0,
            applied_index: 0,
        }
    }
}

pub(crate) struct Replica {
    state: RwLock<StateMachine>,
    revision: watch::Sender<u64>,
    events: broadcast::Sender<WatchEvent>,
    status: watch::Sender<MemberStatus>,
}

impl Replica {
    pub(crate) fn new(id: u64) -> Self {
        Replica {
            state: RwLock::new(StateMachine::default()),
            revision: watch::Sender::new(0),
            events: broadcast::Sender::new(EVENT_BUFFER),
            status: watch::Sender::new(MemberStatus::starting(id)),
        }
    }

    // A panic while holding the lock cannot leave the map half-updated (apply replaces
    // whole records), so a poisoned lock is still safe to use.
    fn read(&self) -> RwLockReadGuard<'_, StateMachine> {
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, StateMachine> {
        self.state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies one command entry and tells subscribers what changed.
    pub(crate) fn apply(&self, index: u64, id: ProposalId, command: Command) -> Applied {
        let applied = self.write().apply(index, id, command);
        if let Applied::Changed(event) = &applied {
            // No subscribers is not an error.
            let _ = self.events.send(event.clone());
        }
        applied
    }

    /// Records that every entry up to `index` has been applied.
    pub(crate) fn set_applied(&self, index: u64) {
        self.revision.send_if_modified(|current| {
            if index > *current {
                *current = index;
                true
            } else {
                false
            }
        });
    }

    pub(crate) fn publish_status(&self, status: MemberStatus) {
        self.status.send_if_modified(|current| {
            if *current != status {
                *current = status;
                true
            } else {
                false
            }
        });
    }

    pub(crate) fn get(&self, key: &str) -> Option<Record> {
        self.read().get(key)
    }

    pub(crate) fn list(&self, prefix: &str) -> Vec<(String, Record)> {
        self.read().list(prefix)
    }

    pub(crate) fn revision(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<WatchEvent> {
        self.events.subscribe()
    }

    pub(crate) fn status(&self) -> MemberStatus {
        self.status.borrow().clone()
    }
}
