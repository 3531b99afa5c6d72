//! Writes waiting to be applied: each has a proposal id carried in its entry, a deadline,
//! and a time for its next attempt.
//!
//! A proposal can vanish without an error: a follower forwards it to a leader that then
//! steps down, or the message is dropped on the way. So a proposal that is not applied
//! within one election timeout is proposed again with the same id (the state machine skips
//! the duplicate if both copies commit), until its deadline. The caller is answered when
//! this member applies an entry carrying the proposal's id — never by log position.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use raft::eraftpb::ConfChangeV2;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::state::codec::encode_conf_context;
use crate::state::{encode_entry, Command, Outcome, ProposalId};
use crate::{StoreError, Writer};
use isthmus_core::tls::Identity;

/// Where the answer to one write goes: what applying it did, or why it failed.
pub(crate) type Reply = oneshot::Sender<Result<Outcome, StoreError>>;

/// What a proposal puts in the log.
#[derive(Debug, Clone)]
pub(crate) enum Payload {
    /// A normal entry's data (an encoded `EntryData`).
    Normal(Vec<u8>),
    /// A membership change, its context already holding the proposal id.
    ConfChange(ConfChangeV2),
}

/// A write as the caller asks for it.
#[derive(Debug, Clone)]
pub(crate) enum Request {
    Command(Command, Writer),
    /// A membership change and the addresses of the members it adds.
    ConfChange(ConfChangeV2, Vec<(u64, String)>),
}

struct Pending {
    data: Payload,
    reply: Reply,
    deadline: Instant,
    next_attempt: Instant,
}

/// The proposals of one member incarnation.
pub(crate) struct Proposals {
    node: u64,
    incarnation: u64,
    next_seq: u64,
    timeout: Duration,
    pending: HashMap<u64, Pending>,
    /// Signs the entries that need an owner (once per proposal: retries carry the same
    /// bytes).
    signer: Option<Arc<Identity>>,
}

impl Proposals {
    pub(crate) fn new(
        node: u64,
        incarnation: u64,
        timeout: Duration,
        signer: Option<Arc<Identity>>,
    ) -> Self {
        Proposals {
            node,
            incarnation,
            next_seq: 1,
            timeout,
            pending: HashMap::new(),
            signer,
        }
    }

    /// Registers a new write and returns the sequence number to attempt.
    pub(crate) fn add(&mut self, request: &Request, reply: Reply, now: Instant) -> u64 {
        let (seq, id) = self.next_id();
        let data = match request {
            Request::Command(command, writer) => {
                Payload::Normal(encode_entry(id, writer, command, self.signer.as_deref()))
            }
            Request::ConfChange(cc, members) => {
                let mut cc = cc.clone();
                cc.context = encode_conf_context(id, members).into();
                Payload::ConfChange(cc)
            }
        };
        self.pending.insert(
            seq,
            Pending {
                data,
                reply,
                deadline: now + self.timeout,
                next_attempt: now,
            },
        );
        seq
    }

    /// A fresh proposal id (for the sequence returned with it).
    pub(crate) fn next_id(&mut self) -> (u64, ProposalId) {
        let seq = self.next_seq;
        self.next_seq += 1;
        (
            seq,
            ProposalId {
                node: self.node,
                incarnation: self.incarnation,
                seq,
            },
        )
    }

    /// The entry data to propose for `seq`, if it is still waiting.
    pub(crate) fn data(&self, seq: u64) -> Option<Payload> {
        self.pending.get(&seq).map(|p| p.data.clone())
    }

    /// Schedules the next attempt of `seq` (if it is still not applied by then).
    pub(crate) fn retry_at(&mut self, seq: u64, at: Instant) {
        if let Some(pending) = self.pending.get_mut(&seq) {
            pending.next_attempt = at;
        }
    }

    /// Makes every waiting write due now: called when a new leader becomes known, since
    /// an attempt forwarded to the old one is lost and would otherwise wait out its
    /// election timeout.
    pub(crate) fn retry_all_at(&mut self, at: Instant) {
        for pending in self.pending.values_mut() {
            pending.next_attempt = pending.next_attempt.min(at);
        }
    }

    /// Answers the caller of `seq` with an error and forgets the proposal.
    pub(crate) fn fail(&mut self, seq: u64, error: StoreError) {
        if let Some(pending) = self.pending.remove(&seq) {
            let _ = pending.reply.send(Err(error));
        }
    }

    /// Called for every applied entry: answers the caller if the entry is one of ours.
    pub(crate) fn applied(&mut self, id: ProposalId, outcome: Result<Outcome, StoreError>) {
        if id.node != self.node || id.incarnation != self.incarnation {
            return;
        }
        if let Some(pending) = self.pending.remove(&id.seq) {
            // The caller may have given up; the write stands regardless.
            let _ = pending.reply.send(outcome);
        }
    }

    /// Fails proposals past their deadline, forgets those whose caller has gone, and
    /// returns the sequence numbers due for another attempt.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<u64> {
        let timeout = self.timeout;
        let mut expired = Vec::new();
        let mut retry = Vec::new();
        for (&seq, pending) in &self.pending {
            if pending.reply.is_closed() || now >= pending.deadline {
                expired.push(seq);
            } else if now >= pending.next_attempt {
                retry.push(seq);
            }
        }
        for seq in expired {
            self.fail(seq, StoreError::ProposalTimeout { timeout });
        }
        retry.sort_unstable();
        retry
    }

    /// How many writes are waiting.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }
}

/// A value that differs between runs of a member, so a restarted member's proposal ids
/// never repeat those of its earlier run.
pub(crate) fn new_incarnation() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::decode_entry;

    fn put() -> Request {
        Request::Command(
            Command::Put {
                key: "k".to_string(),
                value: b"v".to_vec(),
                lease_ttl_ms: 0,
                at_ms: 0,
            },
            Writer::Member,
        )
    }

    fn normal(p: Option<Payload>) -> Vec<u8> {
        match p {
            Some(Payload::Normal(data)) => data,
            other => panic!("not a pending normal proposal: {other:?}"),
        }
    }

    #[test]
    fn caller_is_answered_by_proposal_id_not_position() {
        let now = Instant::now();
        let mut proposals = Proposals::new(1, 42, Duration::from_secs(5), None);
        let (tx_a, mut rx_a) = oneshot::channel();
        let (tx_b, mut rx_b) = oneshot::channel();
        let a = proposals.add(&put(), tx_a, now);
        let b = proposals.add(&put(), tx_b, now);
        let id_b = decode_entry(&normal(proposals.data(b)))
            .expect("decodes")
            .id;
        // b commits first (say a was lost and is being retried).
        proposals.applied(id_b, Ok(Outcome::Done(17)));
        assert_eq!(
            rx_b.try_recv().ok().and_then(|r| r.ok()),
            Some(Outcome::Done(17))
        );
        assert!(rx_a.try_recv().is_err());
        assert_eq!(proposals.len(), 1);
        assert!(proposals.data(a).is_some());
    }

    #[test]
    fn entries_of_other_members_or_incarnations_answer_nobody() {
        let now = Instant::now();
        let mut proposals = Proposals::new(1, 42, Duration::from_secs(5), None);
        let (tx, mut rx) = oneshot::channel();
        let seq = proposals.add(&put(), tx, now);
        for (node, incarnation) in [(2, 42), (1, 41)] {
            proposals.applied(
                ProposalId {
                    node,
                    incarnation,
                    seq,
                },
                Ok(Outcome::Done(9)),
            );
        }
        assert!(rx.try_recv().is_err());
        assert_eq!(proposals.len(), 1);
    }

    #[test]
    fn unapplied_proposal_is_retried_then_times_out() {
        let start = Instant::now();
        let mut proposals = Proposals::new(1, 42, Duration::from_secs(5), None);
        let (tx, mut rx) = oneshot::channel();
        let seq = proposals.add(&put(), tx, start);
        assert_eq!(proposals.due(start), vec![seq]);
        proposals.retry_at(seq, start + Duration::from_secs(1));
        assert!(proposals.due(start + Duration::from_millis(500)).is_empty());
        assert_eq!(proposals.due(start + Duration::from_secs(1)), vec![seq]);
        assert!(proposals.due(start + Duration::from_secs(5)).is_empty());
        assert!(matches!(
            rx.try_recv(),
            Ok(Err(StoreError::ProposalTimeout { .. }))
        ));
        assert_eq!(proposals.len(), 0);
    }

    #[test]
    fn proposal_whose_caller_gave_up_is_forgotten() {
        let now = Instant::now();
        let mut proposals = Proposals::new(1, 42, Duration::from_secs(5), None);
        let (tx, rx) = oneshot::channel();
        proposals.add(&put(), tx, now);
        drop(rx);
        assert!(proposals.due(now).is_empty());
        assert_eq!(proposals.len(), 0);
    }

    #[test]
    fn incarnations_differ_between_calls() {
        assert_ne!(new_incarnation(), new_incarnation());
    }
}
