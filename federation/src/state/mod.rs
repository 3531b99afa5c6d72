//! The replicated state machine: a sorted map of versioned records (with optional leases),
//! the duplicate filter, the member table and the join tokens; the commands that change
//! them; and their encoding in raft entries and snapshots ([`codec`]).
//!
//! Everything here is pure: no I/O, no clock (times come inside the commands). Applying the
//! same entries in the same order gives the same state on every replica, including which
//! retried duplicates are skipped.

pub(crate) mod codec;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use isthmus_core::entry_signature::{self, EntrySignature};
use isthmus_core::identity::SpiffeId;
use isthmus_core::keyspace::rules::{self, Change, Reason, Refusal};
use isthmus_core::keyspace::writers::{self, Proposer, Writer};

pub(crate) use codec::{decode_entry, encode_entry, EntryContent};

/// The lease of a record as readers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseState {
    /// When the lease runs out if not renewed, by the clock of the member that wrote or last
    /// renewed it. Informational: expiry is decided by the leader's own clock.
    pub expires_at_unix_ms: u64,
    /// The leader saw the lease run out (and the owner has not renewed it since).
    pub expired: bool,
}

/// One stored value and the revision (raft index) of the write that produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The value as written.
    pub value: Vec<u8>,
    /// Raft index of the entry that last wrote this key's value.
    pub revision: u64,
    /// The record's lease, if it was written with one.
    pub lease: Option<LeaseState>,
    /// Who wrote this value (None in records written before writers were recorded).
    pub writer: Option<RecordWriter>,
}

/// Who wrote a record: the member that proposed the write and the writer it acted for, as
/// every replica checked them on apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordWriter {
    /// The proposing member's raft id.
    pub member: u64,
    pub writer: Writer,
}

impl std::fmt::Display for RecordWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.writer {
            Writer::Member => write!(f, "member {}", self.member),
            Writer::Operator(op) => write!(f, "{op} (through member {})", self.member),
        }
    }
}

/// A change applied to the map, as seen by [`crate::Store::subscribe`] and
/// [`crate::Store::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// `key` now holds `value`, written at `revision`.
    Put {
        /// The key written.
        key: String,
        /// Its new value.
        value: Vec<u8>,
        /// Raft index of the write.
        revision: u64,
    },
    /// `key` was removed at `revision`. Deleting a key that does not exist sends no event.
    Delete {
        /// The key removed.
        key: String,
        /// Raft index of the delete.
        revision: u64,
    },
    /// The lease of `key` expired (`expired: true`) or was renewed after having expired
    /// (`expired: false`), at raft index `revision`. The record's own revision is unchanged.
    Lease {
        /// The key whose lease changed.
        key: String,
        /// Whether the lease is now expired.
        expired: bool,
        /// Raft index of the change.
        revision: u64,
    },
}

impl WatchEvent {
    /// The key this event is about.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put { key, .. }
            | WatchEvent::Delete { key, .. }
            | WatchEvent::Lease { key, .. } => key,
        }
    }

    /// The revision (raft index) at which the change was applied.
    pub fn revision(&self) -> u64 {
        match self {
            WatchEvent::Put { revision, .. }
            | WatchEvent::Delete { revision, .. }
            | WatchEvent::Lease { revision, .. } => *revision,
        }
    }
}

/// A write the store can replicate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    Put {
        key: String,
        value: Vec<u8>,
        /// 0 = no lease.
        lease_ttl_ms: u64,
        /// Proposer's wall clock.
        at_ms: u64,
    },
    Delete {
        key: String,
    },
    CompareAndSet {
        key: String,
        expected: Option<u64>,
        value: Vec<u8>,
    },
    Renew {
        key: String,
        at_ms: u64,
    },
    ExpireLease {
        key: String,
        epoch: u64,
    },
    MintToken {
        id: String,
        digest: Vec<u8>,
        expires_at_ms: u64,
        /// When it was proposed (0 in entries written before this was recorded).
        at_ms: u64,
    },
    ConsumeToken {
        id: String,
        digest: Vec<u8>,
        at_ms: u64,
        /// A record created in the same entry (an admitted cluster's `clusters/<name>`):
        /// the token is kept and nothing written when the key exists.
        record: Option<(String, Vec<u8>)>,
    },
}

impl Command {
    /// The key whose owner the command needs (`isthmus_core::keyspace::writers`): writes,
    /// deletes and renewals. Tokens authorize themselves, and expiring a lease is the
    /// leader's duty whoever the leader is.
    pub(crate) fn owned_key(&self) -> Option<&str> {
        match self {
            Command::Put { key, .. }
            | Command::Delete { key }
            | Command::CompareAndSet { key, .. }
            | Command::Renew { key, .. } => Some(key),
            Command::ExpireLease { .. }
            | Command::MintToken { .. }
            | Command::ConsumeToken { .. } => None,
        }
    }

    /// Whether its entry must carry the signature of its proposer, when bound: writes that
    /// need an owner (`writers::needs_signature`), minting a join token (only a mesh admin
    /// may) and consuming one (its time, which judges the token's expiry, and the record it
    /// creates are the proposer's, not a leader's to change).
    pub(crate) fn needs_signature(&self, writer: &Writer) -> bool {
        match self {
            Command::MintToken { .. } | Command::ConsumeToken { .. } => true,
            _ => self
                .owned_key()
                .is_some_and(|key| writers::needs_signature(writer, key)),
        }
    }

    /// The key a client command is about (empty for internal commands).
    pub(crate) fn key(&self) -> &str {
        match self {
            Command::Put { key, .. }
            | Command::Delete { key }
            | Command::CompareAndSet { key, .. }
            | Command::Renew { key, .. }
            | Command::ExpireLease { key, .. } => key,
            Command::MintToken { .. } | Command::ConsumeToken { .. } => "",
        }
    }
}

/// Identifies one proposal across retries, so its proposer can answer the caller when the
/// entry is applied (never by position in the log) and replicas can skip duplicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ProposalId {
    pub(crate) node: u64,
    pub(crate) incarnation: u64,
    pub(crate) seq: u64,
}

/// What a command's proposer is told once it is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Applied at this raft index.
    Done(u64),
    /// A compare-and-set found another revision (None: the key does not exist).
    Conflict(Option<u64>),
    /// A renew found no lease.
    NoLease,
    /// A token could not be consumed (or minted).
    TokenRefused(&'static str),
    /// The store's rules refused the change (`isthmus_core::keyspace::rules`): nothing was
    /// written, on any replica.
    Refused(Refusal),
}

/// Refuses keys the store cannot hold, before proposing (the rules check them again on
/// apply).
pub(crate) fn validate_key(key: &str) -> Result<(), &'static str> {
    rules::check_key(key)
}

/// How many recent sequence numbers are remembered per proposer incarnation to skip
/// retried duplicates. A proposer never has this many writes in flight at once.
const DEDUP_WINDOW: usize = 4096;

/// What applying one entry did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Applied {
    /// Applied: what watchers are told (if anything changed) and what the proposer is told.
    Done {
        event: Option<WatchEvent>,
        outcome: Outcome,
    },
    /// The proposal had already been applied from an earlier copy and was skipped.
    Duplicate,
}

/// A lease as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Lease {
    pub(crate) ttl_ms: u64,
    pub(crate) expires_at_ms: u64,
    pub(crate) expired: bool,
    /// Raft index of the write or renew that started the current lease period.
    pub(crate) epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    /// `record.lease` is always None here; [`Stored::record`] fills it in.
    pub(crate) record: Record,
    pub(crate) lease: Option<Lease>,
}

impl Stored {
    fn record(&self) -> Record {
        Record {
            lease: self.lease.as_ref().map(|l| LeaseState {
                expires_at_unix_ms: l.expires_at_ms,
                expired: l.expired,
            }),
            ..self.record.clone()
        }
    }
}

/// One member's peer address, as replicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MemberInfo {
    pub(crate) peer_addr: String,
    /// Raft index of the change that added it (0 for the initial members).
    pub(crate) added_at: u64,
}

/// Join tokens that may be outstanding at once (minted, not used, not expired): a bound on
/// what an operator mistake or a loop can make every replica keep.
pub(crate) const MAX_OUTSTANDING_TOKENS: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Token {
    pub(crate) digest: Vec<u8>,
    pub(crate) expires_at_ms: u64,
}

/// The state every replica holds, plus the duplicate filter that keeps it identical when a
/// proposer retries a proposal that had in fact been committed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct StateMachine {
    pub(crate) records: BTreeMap<String, Stored>,
    pub(crate) seen: HashMap<(u64, u64), BTreeSet<u64>>,
    pub(crate) members: BTreeMap<u64, MemberInfo>,
    pub(crate) tokens: BTreeMap<String, Token>,
    /// The keys of `records` that hold a lease: what the leader's lease clock reads every
    /// tick, without walking every record. Kept by [`StateMachine::put`] and the delete.
    pub(crate) leased: BTreeSet<String>,
}

impl StateMachine {
    /// Records `id` as applied; false if it already was (a retried duplicate).
    pub(crate) fn first_time(&mut self, id: ProposalId) -> bool {
        let seen = self.seen.entry((id.node, id.incarnation)).or_default();
        // Older than every remembered one of a full window: applied long ago (a proposer
        // never has a window's worth in flight), so a copy replayed by a leader is skipped.
        let forgotten = seen.len() >= DEDUP_WINDOW && seen.first().is_some_and(|&min| id.seq < min);
        if forgotten || !seen.insert(id.seq) {
            return false;
        }
        if seen.len() > DEDUP_WINDOW {
            seen.pop_first();
        }
        true
    }

    /// Applies the command of the entry at raft `index`, proposed by member `id.node` for
    /// its writer: refused (changing nothing) when the writer may not write its key, or when
    /// the entry needs its proposer's signature and lacks a valid one.
    pub(crate) fn apply(&mut self, index: u64, entry: EntryContent) -> Applied {
        let EntryContent {
            id,
            writer,
            command,
            signature,
        } = entry;
        if !self.first_time(id) {
            return Applied::Duplicate;
        }
        let proposer = Proposer::new(&*self, id.node);
        let owned = Self::owns(&proposer, &writer, &command)
            .and_then(|()| Self::signed(&proposer, &writer, &command, signature.as_ref()));
        if let Err(refusal) = owned {
            return Applied::Done {
                event: None,
                outcome: Outcome::Refused(refusal),
            };
        }
        let by = RecordWriter {
            member: id.node,
            writer,
        };
        let (event, outcome) = self.apply_command(index, &by, command);
        Applied::Done { event, outcome }
    }

    /// Whether the entry carries the signature it needs: a bound member's write that needs an
    /// owner must be signed by that member's control plane, whose certificate chains to its
    /// cluster's CA bundle as this replica holds it (`isthmus_core::entry_signature`).
    fn signed(
        proposer: &Proposer<'_, Self>,
        writer: &Writer,
        command: &Command,
        signature: Option<&(EntrySignature, Vec<u8>)>,
    ) -> Result<(), Refusal> {
        if !command.needs_signature(writer) {
            return Ok(());
        }
        let key = command.owned_key().unwrap_or("join token");
        let Some((trust_domain, bundle)) = proposer.signer() else {
            return Ok(());
        };
        let refuse = |why: String| Refusal {
            reason: Reason::BadSignature,
            message: format!(
                "{key}: the entry of member {} ({trust_domain}): {why}",
                proposer.id()
            ),
        };
        let Some((signature, message)) = signature else {
            return Err(refuse(
                "it is not signed, and a bound member's writes that need an owner are".into(),
            ));
        };
        let expected = SpiffeId::control(trust_domain);
        entry_signature::verify(signature, message, bundle, &expected).map_err(refuse)
    }

    /// Whether `writer`, through member `proposer`, may make this change
    /// (`isthmus_core::keyspace::writers`). Tokens are authorized by themselves (a join's
    /// record by its token), and expiring a lease is the leader's duty.
    fn owns(
        proposer: &Proposer<'_, Self>,
        writer: &Writer,
        command: &Command,
    ) -> Result<(), Refusal> {
        let (key, change) = match command {
            Command::Put { key, value, .. } | Command::CompareAndSet { key, value, .. } => {
                (key, Change::Write(value))
            }
            Command::Delete { key } => (key, Change::Delete),
            Command::Renew { key, .. } => match proposer.records().records.get(key) {
                Some(stored) => (key, Change::Write(&stored.record.value)),
                None => return Ok(()),
            },
            Command::MintToken { .. } => return proposer.may_mint(writer),
            Command::ExpireLease { .. } | Command::ConsumeToken { .. } => return Ok(()),
        };
        proposer.may_write(writer, key, change)
    }

    fn put(
        &mut self,
        (index, writer): (u64, &RecordWriter),
        key: String,
        value: Vec<u8>,
        lease: Option<Lease>,
    ) -> WatchEvent {
        if lease.is_some() {
            self.leased.insert(key.clone());
        } else {
            self.leased.remove(&key);
        }
        self.records.insert(
            key.clone(),
            Stored {
                record: Record {
                    value: value.clone(),
                    revision: index,
                    lease: None,
                    writer: Some(writer.clone()),
                },
                lease,
            },
        );
        WatchEvent::Put {
            key,
            value,
            revision: index,
        }
    }

    fn apply_command(
        &mut self,
        index: u64,
        by: &RecordWriter,
        command: Command,
    ) -> (Option<WatchEvent>, Outcome) {
        let done = Outcome::Done(index);
        match command {
            Command::Put {
                key,
                value,
                lease_ttl_ms,
                at_ms,
            } => {
                if let Err(refusal) = rules::admit(self, &key, Change::Write(&value)) {
                    return (None, Outcome::Refused(refusal));
                }
                let lease = (lease_ttl_ms > 0).then_some(Lease {
                    ttl_ms: lease_ttl_ms,
                    expires_at_ms: at_ms.saturating_add(lease_ttl_ms),
                    expired: false,
                    epoch: index,
                });
                (Some(self.put((index, by), key, value, lease)), done)
            }
            Command::Delete { key } => {
                if let Err(refusal) = rules::admit(self, &key, Change::Delete) {
                    return (None, Outcome::Refused(refusal));
                }
                self.leased.remove(&key);
                let event = self.records.remove(&key).map(|_| WatchEvent::Delete {
                    key,
                    revision: index,
                });
                (event, done)
            }
            Command::CompareAndSet {
                key,
                expected,
                value,
            } => {
                let current = self.records.get(&key).map(|s| s.record.revision);
                if current != expected {
                    return (None, Outcome::Conflict(current));
                }
                if let Err(refusal) = rules::admit(self, &key, Change::Write(&value)) {
                    return (None, Outcome::Refused(refusal));
                }
                (Some(self.put((index, by), key, value, None)), done)
            }
            Command::Renew { key, at_ms } => {
                let Some(lease) = self.records.get_mut(&key).and_then(|s| s.lease.as_mut()) else {
                    return (None, Outcome::NoLease);
                };
                let was_expired = lease.expired;
                lease.expires_at_ms = at_ms.saturating_add(lease.ttl_ms);
                lease.expired = false;
                lease.epoch = index;
                let event = was_expired.then_some(WatchEvent::Lease {
                    key,
                    expired: false,
                    revision: index,
                });
                (event, done)
            }
            Command::ExpireLease { key, epoch } => {
                let lease = self.records.get_mut(&key).and_then(|s| s.lease.as_mut());
                match lease {
                    Some(lease) if lease.epoch == epoch && !lease.expired => {
                        lease.expired = true;
                        (
                            Some(WatchEvent::Lease {
                                key,
                                expired: true,
                                revision: index,
                            }),
                            done,
                        )
                    }
                    // Renewed, rewritten or deleted since the leader decided: nothing to do.
                    _ => (None, done),
                }
            }
            Command::MintToken {
                id,
                digest,
                expires_at_ms,
                at_ms,
            } => {
                // Expired tokens are dropped whenever one is minted or consumed.
                self.tokens.retain(|_, t| t.expires_at_ms > at_ms);
                if self.tokens.contains_key(&id) {
                    return (None, Outcome::TokenRefused("a token with this id exists"));
                }
                if self.tokens.len() >= MAX_OUTSTANDING_TOKENS {
                    return (
                        None,
                        Outcome::TokenRefused(
                            "too many unused join tokens (1000): let some expire or use them",
                        ),
                    );
                }
                self.tokens.insert(
                    id,
                    Token {
                        digest,
                        expires_at_ms,
                    },
                );
                (None, done)
            }
            Command::ConsumeToken {
                id,
                digest,
                at_ms,
                record,
            } => {
                // Expired tokens are dropped whenever any token is consumed.
                self.tokens.retain(|_, t| t.expires_at_ms > at_ms);
                match self.tokens.get(&id) {
                    None => (
                        None,
                        Outcome::TokenRefused("unknown, already used or expired"),
                    ),
                    Some(t) if t.digest != digest => {
                        (None, Outcome::TokenRefused("the secret does not match"))
                    }
                    Some(_) => match record {
                        Some((key, _)) if self.records.contains_key(&key) => {
                            let current = self.records.get(&key).map(|s| s.record.revision);
                            (None, Outcome::Conflict(current))
                        }
                        Some((key, value)) => {
                            // A refused record keeps the token, like a conflict.
                            if let Err(refusal) = rules::admit(self, &key, Change::Write(&value)) {
                                return (None, Outcome::Refused(refusal));
                            }
                            self.tokens.remove(&id);
                            (Some(self.put((index, by), key, value, None)), done)
                        }
                        None => {
                            self.tokens.remove(&id);
                            (None, done)
                        }
                    },
                }
            }
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<Record> {
        self.records.get(key).map(Stored::record)
    }

    /// Every record whose key starts with `prefix`, sorted by key.
    pub(crate) fn list(&self, prefix: &str) -> Vec<(String, Record)> {
        self.under(prefix)
            .map(|(key, stored)| (key.clone(), stored.record()))
            .collect()
    }

    /// The stored records whose key starts with `prefix`, in key order.
    fn under<'a, 'p>(
        &'a self,
        prefix: &'p str,
    ) -> impl Iterator<Item = (&'a String, &'a Stored)> + use<'a, 'p> {
        self.records
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(move |(key, _)| key.starts_with(prefix))
    }

    /// Every live (not expired) lease: key, epoch, length.
    pub(crate) fn live_leases(&self) -> Vec<(String, u64, u64)> {
        self.leased
            .iter()
            .filter_map(|key| {
                let lease = self.records.get(key)?.lease.as_ref()?;
                (!lease.expired).then(|| (key.clone(), lease.epoch, lease.ttl_ms))
            })
            .collect()
    }
}

/// The rules read the records as this replica holds them before the change.
impl rules::Records for StateMachine {
    fn value(&self, key: &str) -> Option<&[u8]> {
        self.records.get(key).map(|s| s.record.value.as_slice())
    }

    fn values<'a>(&'a self, prefix: &str) -> Vec<(&'a str, &'a [u8])> {
        self.under(prefix)
            .map(|(key, stored)| (key.as_str(), stored.record.value.as_slice()))
            .collect()
    }
}

#[cfg(test)]
mod tests;
