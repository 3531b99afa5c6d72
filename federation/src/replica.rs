//! This member's readable replica: the applied state, a window of recent changes for
//! watches, the revision watch, the change broadcast and the member status, shared between
//! the raft loop (the only writer) and the [`crate::Store`] handles (readers).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::{broadcast, watch};

use isthmus_core::keyspace::rules::Reason;

use crate::state::{Applied, EntryContent, Outcome, Record, StateMachine, WatchEvent};
use crate::StoreError;

/// How many change events a slow subscriber may fall behind before it sees `Lagged`.
const EVENT_BUFFER: usize = 4096;
/// How many recent changes are kept for watches that start in the past.
pub(crate) const HISTORY_WINDOW: usize = 10_000;

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
    /// Voting members, as this member knows the configuration.
    pub voters: Vec<u64>,
    /// Non-voting members (learners).
    pub learners: Vec<u64>,
    /// Index of this member's latest snapshot (the log before it may be compacted).
    pub snapshot_index: u64,
    /// Peer batches rejected as garbage or misaddressed since start.
    pub rejected_peer_batches: u64,
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
            voters: Vec::new(),
            learners: Vec::new(),
            snapshot_index: 0,
            rejected_peer_batches: 0,
        }
    }

    /// Whether this member is a learner (replicates but does not vote).
    pub fn is_learner(&self) -> bool {
        self.learners.contains(&self.id)
    }
}

struct State {
    sm: StateMachine,
    history: VecDeque<WatchEvent>,
    /// Every change with a revision above this is in `history`.
    compacted: u64,
}

pub(crate) struct Replica {
    state: RwLock<State>,
    revision: watch::Sender<u64>,
    events: broadcast::Sender<WatchEvent>,
    status: watch::Sender<MemberStatus>,
    /// Turns true when the raft loop stops.
    stopped: watch::Sender<bool>,
    /// Why the raft loop stopped, when it stopped on a failure rather than a shutdown.
    failure: std::sync::Mutex<Option<String>>,
    /// Members other than this one that may send raft traffic here.
    known_peers: RwLock<std::collections::BTreeSet<u64>>,
    /// Counted by the peer server, reported in the status.
    pub(crate) rejected_peer_batches: AtomicU64,
    /// Entries the store's rules refused on apply, by reason.
    refused: std::sync::Mutex<std::collections::BTreeMap<Reason, u64>>,
    /// Snapshots from the leader refused because they break a trust binding.
    refused_snapshots: AtomicU64,
}

impl Replica {
    pub(crate) fn new(id: u64) -> Self {
        Replica {
            state: RwLock::new(State {
                sm: StateMachine::default(),
                history: VecDeque::new(),
                compacted: 0,
            }),
            revision: watch::Sender::new(0),
            events: broadcast::Sender::new(EVENT_BUFFER),
            status: watch::Sender::new(MemberStatus::starting(id)),
            stopped: watch::Sender::new(false),
            failure: std::sync::Mutex::new(None),
            known_peers: RwLock::new(Default::default()),
            rejected_peer_batches: AtomicU64::new(0),
            refused: Default::default(),
            refused_snapshots: AtomicU64::new(0),
        }
    }

    // A panic while holding the lock cannot leave the map half-updated (apply replaces
    // whole records), so a poisoned lock is still safe to use.
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies one command entry, records the change and tells subscribers. The broadcast
    /// happens under the lock so [`Replica::watch`] sees history and live events without a
    /// gap or an overlap.
    pub(crate) fn apply(&self, index: u64, entry: EntryContent) -> Applied {
        let mut state = self.write();
        let applied = state.sm.apply(index, entry);
        if let Applied::Done {
            outcome: Outcome::Refused(refusal),
            ..
        } = &applied
        {
            tracing::warn!(
                index,
                reason = refusal.reason.label(),
                "refused on apply: {refusal}"
            );
            *self
                .refused
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(refusal.reason)
                .or_default() += 1;
        }
        if let Applied::Done {
            event: Some(event), ..
        } = &applied
        {
            state.history.push_back(event.clone());
            if state.history.len() > HISTORY_WINDOW {
                if let Some(old) = state.history.pop_front() {
                    state.compacted = old.revision();
                }
            }
            // No subscribers is not an error.
            let _ = self.events.send(event.clone());
        }
        applied
    }

    /// How many entries the rules refused on apply since start, for every reason.
    pub(crate) fn refused(&self) -> Vec<(Reason, u64)> {
        let counts = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        Reason::ALL
            .iter()
            .map(|r| (*r, counts.get(r).copied().unwrap_or(0)))
            .collect()
    }

    pub(crate) fn count_refused_snapshot(&self) {
        self.refused_snapshots.fetch_add(1, Ordering::Relaxed);
    }

    /// How many snapshots from a leader this member refused since start.
    pub(crate) fn refused_snapshots(&self) -> u64 {
        self.refused_snapshots.load(Ordering::Relaxed)
    }

    /// Runs `f` on the state machine (for membership bookkeeping and snapshots).
    pub(crate) fn with_state<T>(&self, f: impl FnOnce(&mut StateMachine) -> T) -> T {
        f(&mut self.write().sm)
    }

    /// Replaces the whole state with a snapshot's, at raft `index`. Watches that started
    /// before `index` can no longer be served from history.
    pub(crate) fn restore(&self, sm: StateMachine, index: u64) {
        {
            let mut state = self.write();
            state.sm = sm;
            state.history.clear();
            state.compacted = index;
        }
        self.revision.send_replace(index);
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

    pub(crate) fn publish_status(&self, mut status: MemberStatus) {
        status.rejected_peer_batches = self.rejected_peer_batches.load(Ordering::Relaxed);
        self.status.send_if_modified(|current| {
            if *current != status {
                *current = status;
                true
            } else {
                false
            }
        });
    }

    pub(crate) fn set_known_peers(&self, peers: std::collections::BTreeSet<u64>) {
        *self
            .known_peers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = peers;
    }

    /// Whether `id` is another member this one knows of (the peer server refuses others).
    pub(crate) fn is_known_peer(&self, id: u64) -> bool {
        self.known_peers
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(&id)
    }

    /// Marks the member stopped: watches end with [`StoreError::Stopped`].
    pub(crate) fn set_stopped(&self) {
        self.stopped.send_replace(true);
    }

    /// Records why the raft loop is stopping on a failure (before it marks itself stopped).
    pub(crate) fn set_failure(&self, reason: String) {
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    }

    /// Waits until the raft loop has stopped; returns why, when it was a failure.
    pub(crate) async fn stopped(&self) -> Option<String> {
        let mut stopped = self.stopped.subscribe();
        let _ = stopped.wait_for(|stopped| *stopped).await;
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn get(&self, key: &str) -> Option<Record> {
        self.read().sm.get(key)
    }

    pub(crate) fn list(&self, prefix: &str) -> Vec<(String, Record)> {
        self.read().sm.list(prefix)
    }

    pub(crate) fn revision(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    pub(crate) fn applied(&self) -> u64 {
        *self.revision.borrow()
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<WatchEvent> {
        self.events.subscribe()
    }

    pub(crate) fn status(&self) -> MemberStatus {
        let mut status = self.status.borrow().clone();
        status.rejected_peer_batches = self.rejected_peer_batches.load(Ordering::Relaxed);
        status
    }

    /// The changes under `prefix` from revision `from` on that this replica still holds,
    /// and a receiver for every later change. `from == 0` means "from now".
    pub(crate) fn watch(
        &self,
        prefix: &str,
        from: u64,
    ) -> Result<(VecDeque<WatchEvent>, broadcast::Receiver<WatchEvent>), StoreError> {
        let state = self.read();
        let live = self.events.subscribe();
        if from == 0 {
            return Ok((VecDeque::new(), live));
        }
        if from <= state.compacted {
            return Err(StoreError::Compacted {
                requested: from,
                oldest: state.compacted + 1,
            });
        }
        let backlog = state
            .history
            .iter()
            .filter(|e| e.revision() >= from && e.key().starts_with(prefix))
            .cloned()
            .collect();
        Ok((backlog, live))
    }
}

/// A stream of changes under a prefix, from a revision on, with none lost or repeated.
/// Made by [`crate::Store::watch`].
pub struct Watch {
    replica: Arc<Replica>,
    prefix: String,
    backlog: VecDeque<WatchEvent>,
    live: broadcast::Receiver<WatchEvent>,
    stopped: watch::Receiver<bool>,
    /// Revision the next event must have at least.
    next: u64,
}

impl Watch {
    pub(crate) fn start(
        replica: Arc<Replica>,
        prefix: &str,
        from: u64,
    ) -> Result<Self, StoreError> {
        let from = if from == 0 {
            replica.applied() + 1
        } else {
            from
        };
        let (backlog, live) = replica.watch(prefix, from)?;
        let stopped = replica.stopped.subscribe();
        Ok(Watch {
            stopped,
            replica,
            prefix: prefix.to_string(),
            backlog,
            live,
            next: from,
        })
    }

    /// The revision the next event will have at least; a client that reconnects watches
    /// from here.
    pub fn next_revision(&self) -> u64 {
        self.next
    }

    /// The next change. Fails with [`StoreError::Compacted`] if this watch fell so far
    /// behind that the changes it missed are no longer held (re-list), and with
    /// [`StoreError::Stopped`] when the member stops.
    pub async fn next(&mut self) -> Result<WatchEvent, StoreError> {
        loop {
            let event = match self.backlog.pop_front() {
                Some(event) => event,
                None => match tokio::select! {
                    received = self.live.recv() => received,
                    _ = self.stopped.wait_for(|stopped| *stopped) => return Err(StoreError::Stopped),
                } {
                    Ok(event) => event,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Catch up from the history window, seamlessly if it still holds
                        // what was missed.
                        let (backlog, live) = self.replica.watch(&self.prefix, self.next)?;
                        self.backlog = backlog;
                        self.live = live;
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Err(StoreError::Stopped),
                },
            };
            if event.revision() < self.next || !event.key().starts_with(&self.prefix) {
                continue;
            }
            self.next = event.revision() + 1;
            return Ok(event);
        }
    }
}
