//! The replicated state machine: a sorted map of versioned records, the commands that change
//! it, and how those commands are encoded in raft log entries.
//!
//! Entry encoding: the data of every normal entry the store writes is a prost-encoded
//! `isthmus.federation.v1.EntryData` (see `proto/federation.proto`): the proposal id
//! (proposer's raft id, its incarnation, a sequence number) and a `put` or `delete` command.
//! The revision of a record is the raft index of the entry that last wrote it.
//!
//! Everything here is pure: no I/O, no clock. Applying the same entries in the same order
//! gives the same map on every replica, including which retried duplicates are skipped.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prost::Message as _;

use crate::proto::v1 as pb;

/// One stored value and the revision (raft index) of the write that produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The value as written.
    pub value: Vec<u8>,
    /// Raft index of the entry that last wrote this key.
    pub revision: u64,
}

/// A change applied to the map, as seen by [`crate::Store::subscribe`].
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
}

impl WatchEvent {
    /// The key this event is about.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put { key, .. } | WatchEvent::Delete { key, .. } => key,
        }
    }

    /// The revision (raft index) at which the change was applied.
    pub fn revision(&self) -> u64 {
        match self {
            WatchEvent::Put { revision, .. } | WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// A write the store can replicate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

impl Command {
    pub(crate) fn key(&self) -> &str {
        match self {
            Command::Put { key, .. } | Command::Delete { key } => key,
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

/// Why an entry's data could not be read back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EntryDecodeError {
    #[error("entry data is not an EntryData message")]
    Protobuf(#[source] prost::DecodeError),
    #[error("entry data has no {0}")]
    Missing(&'static str),
}

/// Refuses keys the store cannot hold. Checked before proposing, so every replica agrees.
pub(crate) fn validate_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("the key is empty");
    }
    Ok(())
}

/// Encodes a command and its proposal id as the data of a raft entry.
pub(crate) fn encode_entry(id: ProposalId, command: &Command) -> Vec<u8> {
    let command = match command {
        Command::Put { key, value } => pb::entry_data::Command::Put(pb::PutCommand {
            key: key.clone(),
            value: value.clone(),
        }),
        Command::Delete { key } => {
            pb::entry_data::Command::Delete(pb::DeleteCommand { key: key.clone() })
        }
    };
    pb::EntryData {
        proposal: Some(pb::ProposalId {
            node: id.node,
            incarnation: id.incarnation,
            seq: id.seq,
        }),
        command: Some(command),
    }
    .encode_to_vec()
}

/// Reads back what [`encode_entry`] wrote.
pub(crate) fn decode_entry(data: &[u8]) -> Result<(ProposalId, Command), EntryDecodeError> {
    let entry = pb::EntryData::decode(data).map_err(EntryDecodeError::Protobuf)?;
    let id = entry
        .proposal
        .ok_or(EntryDecodeError::Missing("proposal id"))?;
    let command = match entry.command {
        Some(pb::entry_data::Command::Put(put)) => Command::Put {
            key: put.key,
            value: put.value,
        },
        Some(pb::entry_data::Command::Delete(delete)) => Command::Delete { key: delete.key },
        None => return Err(EntryDecodeError::Missing("command")),
    };
    Ok((
        ProposalId {
            node: id.node,
            incarnation: id.incarnation,
            seq: id.seq,
        },
        command,
    ))
}

/// How many recent sequence numbers are remembered per proposer incarnation to skip
/// retried duplicates. A proposer never has this many writes in flight at once.
const DEDUP_WINDOW: usize = 4096;

/// What applying one entry did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Applied {
    /// The map changed; watchers are told.
    Changed(WatchEvent),
    /// The entry was applied but changed nothing (a delete of a missing key).
    Unchanged,
    /// The proposal had already been applied from an earlier copy and was skipped.
    Duplicate,
}

/// The map every replica holds, plus the duplicate filter that keeps it identical when a
/// proposer retries a proposal that had in fact been committed.
#[derive(Debug, Default)]
pub(crate) struct StateMachine {
    records: BTreeMap<String, Record>,
    seen: HashMap<(u64, u64), BTreeSet<u64>>,
}

impl StateMachine {
    /// Applies the command of the entry at raft `index`.
    pub(crate) fn apply(&mut self, index: u64, id: ProposalId, command: Command) -> Applied {
        let seen = self.seen.entry((id.node, id.incarnation)).or_default();
        if !seen.insert(id.seq) {
            return Applied::Duplicate;
        }
        if seen.len() > DEDUP_WINDOW {
            seen.pop_first();
        }
        match command {
            Command::Put { key, value } => {
                self.records.insert(
                    key.clone(),
                    Record {
                        value: value.clone(),
                        revision: index,
                    },
                );
                Applied::Changed(WatchEvent::Put {
                    key,
                    value,
                    revision: index,
                })
            }
            Command::Delete { key } => match self.records.remove(&key) {
                Some(_) => Applied::Changed(WatchEvent::Delete {
                    key,
                    revision: index,
                }),
                None => Applied::Unchanged,
            },
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<Record> {
        self.records.get(key).cloned()
    }

    /// Every record whose key starts with `prefix`, sorted by key.
    pub(crate) fn list(&self, prefix: &str) -> Vec<(String, Record)> {
        self.records
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, record)| (key.clone(), record.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seq: u64) -> ProposalId {
        ProposalId {
            node: 1,
            incarnation: 7,
            seq,
        }
    }

    fn put(key: &str, value: &[u8]) -> Command {
        Command::Put {
            key: key.to_string(),
            value: value.to_vec(),
        }
    }

    #[test]
    fn entry_encoding_round_trips_puts_and_deletes() {
        for command in [
            put("clusters/east", b"{\"zone\":\"a\"}"),
            Command::Delete {
                key: "exports/ns/svc/east".to_string(),
            },
        ] {
            let data = encode_entry(id(3), &command);
            let (decoded_id, decoded) = decode_entry(&data).expect("decodes");
            assert_eq!(decoded_id, id(3));
            assert_eq!(decoded, command);
        }
    }

    #[test]
    fn garbage_entry_data_is_an_error_not_a_panic() {
        assert!(decode_entry(&[0xff, 0xff, 0xff, 0xff]).is_err());
        // Valid protobuf, but with no proposal id or command.
        assert!(matches!(
            decode_entry(&[]),
            Err(EntryDecodeError::Missing(_))
        ));
    }

    #[test]
    fn record_revision_is_the_index_of_the_last_write() {
        let mut sm = StateMachine::default();
        sm.apply(5, id(1), put("a", b"1"));
        sm.apply(9, id(2), put("a", b"2"));
        assert_eq!(
            sm.get("a"),
            Some(Record {
                value: b"2".to_vec(),
                revision: 9
            })
        );
    }

    #[test]
    fn retried_duplicate_proposal_is_applied_once() {
        let mut sm = StateMachine::default();
        assert!(matches!(
            sm.apply(5, id(1), put("a", b"1")),
            Applied::Changed(_)
        ));
        assert_eq!(sm.apply(8, id(1), put("a", b"1")), Applied::Duplicate);
        assert_eq!(sm.get("a").map(|r| r.revision), Some(5));
    }

    #[test]
    fn same_sequence_from_another_incarnation_is_not_a_duplicate() {
        let mut sm = StateMachine::default();
        sm.apply(5, id(1), put("a", b"1"));
        let restarted = ProposalId {
            incarnation: 8,
            ..id(1)
        };
        assert!(matches!(
            sm.apply(6, restarted, put("a", b"2")),
            Applied::Changed(_)
        ));
    }

    #[test]
    fn delete_of_missing_key_changes_nothing() {
        let mut sm = StateMachine::default();
        assert_eq!(
            sm.apply(
                3,
                id(1),
                Command::Delete {
                    key: "nope".to_string()
                }
            ),
            Applied::Unchanged
        );
        sm.apply(4, id(2), put("a", b"1"));
        assert_eq!(
            sm.apply(
                5,
                id(3),
                Command::Delete {
                    key: "a".to_string()
                }
            ),
            Applied::Changed(WatchEvent::Delete {
                key: "a".to_string(),
                revision: 5
            })
        );
        assert_eq!(sm.get("a"), None);
    }

    #[test]
    fn list_returns_only_the_prefix_sorted_by_key() {
        let mut sm = StateMachine::default();
        for (seq, key) in ["exports/b", "clusters/x", "exports/a", "exportsz", "f"]
            .iter()
            .enumerate()
        {
            sm.apply(seq as u64 + 1, id(seq as u64 + 1), put(key, b"v"));
        }
        let keys: Vec<String> = sm.list("exports/").into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec!["exports/a", "exports/b"]);
        assert_eq!(sm.list("").len(), 5);
    }

    #[test]
    fn dedup_window_stays_bounded() {
        let mut sm = StateMachine::default();
        for seq in 1..=(DEDUP_WINDOW as u64 + 10) {
            sm.apply(seq, id(seq), put("k", b"v"));
        }
        assert_eq!(sm.seen.get(&(1, 7)).map(|s| s.len()), Some(DEDUP_WINDOW));
    }

    #[test]
    fn empty_key_is_refused() {
        assert!(validate_key("").is_err());
        assert!(validate_key("clusters/east").is_ok());
    }
}
