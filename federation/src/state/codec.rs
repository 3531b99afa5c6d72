//! How commands travel in raft entries and how the state machine travels in snapshots.
//!
//! Entry encoding: the data of every normal entry the store writes is a prost-encoded
//! `isthmus.federation.v1.EntryData` (see `proto/federation.proto`): the proposal id
//! (proposer's raft id, its incarnation, a sequence number) and one command. Membership
//! changes are `ConfChangeV2` entries whose `context` is a `ConfChangeContext` (proposal id
//! and the added members' addresses). Snapshot data is a `StateSnapshot`.

use std::collections::BTreeMap;

use prost::Message as _;

use super::{
    Command, Lease, MemberInfo, ProposalId, Record, RecordWriter, StateMachine, Stored, Token,
};
use crate::proto::v1 as pb;
use isthmus_core::entry_signature::{self, EntrySignature};
use isthmus_core::keyspace::writers::Writer;
use isthmus_core::tls::Identity;

/// Why an entry's or snapshot's data could not be read back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("data does not decode")]
    Protobuf(#[from] prost::DecodeError),
    #[error("data has no {0}")]
    Missing(&'static str),
    #[error("{0}")]
    BadWriter(String),
}

fn pb_id(id: ProposalId) -> pb::ProposalId {
    pb::ProposalId {
        node: id.node,
        incarnation: id.incarnation,
        seq: id.seq,
    }
}

fn from_pb_id(id: pb::ProposalId) -> ProposalId {
    ProposalId {
        node: id.node,
        incarnation: id.incarnation,
        seq: id.seq,
    }
}

/// An entry's content, as [`decode_entry`] reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EntryContent {
    pub(crate) id: ProposalId,
    pub(crate) writer: Writer,
    pub(crate) command: Command,
    /// The proposer's signature and the bytes it signed (the entry without it).
    pub(crate) signature: Option<(EntrySignature, Vec<u8>)>,
}

/// Encodes a command, its proposal id and writer as the data of a raft entry, signed with
/// `signer` when the command needs it ([`Command::needs_signature`]).
pub(crate) fn encode_entry(
    id: ProposalId,
    writer: &Writer,
    command: &Command,
    signer: Option<&Identity>,
) -> Vec<u8> {
    let mut entry = entry_data(id, writer, command);
    let Some(signer) = signer.filter(|_| command.needs_signature(writer)) else {
        return entry.encode_to_vec();
    };
    let message = entry.encode_to_vec();
    match entry_signature::sign(signer, &message, isthmus_core::clock::unix_ms()) {
        Ok(sig) => {
            entry.signature = Some(pb::EntrySignature {
                cert_der: sig.cert_der,
                scheme: u32::from(sig.scheme),
                signature: sig.signature,
                signed_at_unix_ms: sig.signed_at_ms,
            });
            entry.encode_to_vec()
        }
        Err(e) => {
            // Every replica refuses the unsigned entry (bad_signature), and the writer hears it.
            tracing::error!(error = %e, "could not sign a federation entry");
            message
        }
    }
}

fn entry_data(id: ProposalId, writer: &Writer, command: &Command) -> pb::EntryData {
    use pb::entry_data::Command as C;
    let command = match command.clone() {
        Command::Put {
            key,
            value,
            lease_ttl_ms,
            at_ms,
        } => C::Put(pb::PutCommand {
            key,
            value,
            lease_ttl_ms,
            proposed_at_unix_ms: at_ms,
        }),
        Command::Delete { key } => C::Delete(pb::DeleteCommand { key }),
        Command::CompareAndSet {
            key,
            expected,
            value,
        } => C::CompareAndSet(pb::CompareAndSetCommand {
            key,
            expected_revision: expected,
            value,
        }),
        Command::Renew { key, at_ms } => C::Renew(pb::RenewCommand {
            key,
            proposed_at_unix_ms: at_ms,
        }),
        Command::ExpireLease { key, epoch } => C::ExpireLease(pb::ExpireLeaseCommand {
            key,
            lease_epoch: epoch,
        }),
        Command::MintToken {
            id,
            digest,
            expires_at_ms,
            at_ms,
        } => C::MintToken(pb::MintTokenCommand {
            token_id: id,
            digest,
            expires_at_unix_ms: expires_at_ms,
            proposed_at_unix_ms: at_ms,
        }),
        Command::ConsumeToken {
            id,
            digest,
            at_ms,
            record,
        } => {
            let (record_key, record_value) = record.unwrap_or_default();
            C::ConsumeToken(pb::ConsumeTokenCommand {
                token_id: id,
                digest,
                proposed_at_unix_ms: at_ms,
                record_key,
                record_value,
            })
        }
    };
    pb::EntryData {
        proposal: Some(pb_id(id)),
        command: Some(command),
        writer: writer.encode(),
        signature: None,
    }
}

/// The part of an `EntryData` that names its proposer: decoding it skips the command and
/// signature unread.
#[derive(Clone, PartialEq, prost::Message)]
struct EntryProposer {
    #[prost(message, optional, tag = "1")]
    proposal: Option<pb::ProposalId>,
}

/// The raft id of the member that proposed an entry [`encode_entry`] wrote, read without
/// decoding the rest.
pub(crate) fn proposer_of(data: &[u8]) -> Result<u64, DecodeError> {
    EntryProposer::decode(data)?
        .proposal
        .map(|id| id.node)
        .ok_or(DecodeError::Missing("proposal id"))
}

/// Reads back what [`encode_entry`] wrote.
pub(crate) fn decode_entry(data: &[u8]) -> Result<EntryContent, DecodeError> {
    use pb::entry_data::Command as C;
    let mut entry = pb::EntryData::decode(data)?;
    let signature = entry.signature.take().map(|s| {
        (
            EntrySignature {
                cert_der: s.cert_der,
                scheme: u16::try_from(s.scheme).unwrap_or(u16::MAX),
                signature: s.signature,
                signed_at_ms: s.signed_at_unix_ms,
            },
            // What the proposer signed: the entry as it was before the signature was added.
            entry.encode_to_vec(),
        )
    });
    let id = entry.proposal.ok_or(DecodeError::Missing("proposal id"))?;
    let writer = Writer::decode(&entry.writer).map_err(DecodeError::BadWriter)?;
    let command = match entry.command.ok_or(DecodeError::Missing("command"))? {
        C::Put(c) => Command::Put {
            key: c.key,
            value: c.value,
            lease_ttl_ms: c.lease_ttl_ms,
            at_ms: c.proposed_at_unix_ms,
        },
        C::Delete(c) => Command::Delete { key: c.key },
        C::CompareAndSet(c) => Command::CompareAndSet {
            key: c.key,
            expected: c.expected_revision,
            value: c.value,
        },
        C::Renew(c) => Command::Renew {
            key: c.key,
            at_ms: c.proposed_at_unix_ms,
        },
        C::ExpireLease(c) => Command::ExpireLease {
            key: c.key,
            epoch: c.lease_epoch,
        },
        C::MintToken(c) => Command::MintToken {
            id: c.token_id,
            digest: c.digest,
            expires_at_ms: c.expires_at_unix_ms,
            at_ms: c.proposed_at_unix_ms,
        },
        C::ConsumeToken(c) => Command::ConsumeToken {
            id: c.token_id,
            digest: c.digest,
            at_ms: c.proposed_at_unix_ms,
            record: (!c.record_key.is_empty()).then_some((c.record_key, c.record_value)),
        },
    };
    Ok(EntryContent {
        id: from_pb_id(id),
        writer,
        command,
        signature,
    })
}

/// The context carried in a membership change: who proposed it, and the addresses of the
/// members it adds.
pub(crate) fn encode_conf_context(id: ProposalId, members: &[(u64, String)]) -> Vec<u8> {
    pb::ConfChangeContext {
        proposal: Some(pb_id(id)),
        members: members
            .iter()
            .map(|(id, addr)| pb::MemberInfo {
                id: *id,
                peer_addr: addr.clone(),
                added_at: 0,
            })
            .collect(),
    }
    .encode_to_vec()
}

/// Reads back what [`encode_conf_context`] wrote.
pub(crate) fn decode_conf_context(
    data: &[u8],
) -> Result<(ProposalId, Vec<(u64, String)>), DecodeError> {
    let cx = pb::ConfChangeContext::decode(data)?;
    let id = cx.proposal.ok_or(DecodeError::Missing("proposal id"))?;
    let members = cx
        .members
        .into_iter()
        .map(|m| (m.id, m.peer_addr))
        .collect();
    Ok((from_pb_id(id), members))
}

/// Encodes the whole state machine as snapshot data.
pub(crate) fn encode_snapshot(sm: &StateMachine) -> Vec<u8> {
    pb::StateSnapshot {
        records: sm
            .records
            .iter()
            .map(|(key, stored)| {
                let lease = stored.lease.clone().unwrap_or_default();
                pb::SnapshotRecord {
                    key: key.clone(),
                    value: stored.record.value.clone(),
                    revision: stored.record.revision,
                    lease_ttl_ms: lease.ttl_ms,
                    lease_expires_at_unix_ms: lease.expires_at_ms,
                    lease_expired: lease.expired,
                    lease_epoch: lease.epoch,
                    writer_member: stored.record.writer.as_ref().map_or(0, |w| w.member),
                    writer: stored
                        .record
                        .writer
                        .as_ref()
                        .map(|w| w.writer.encode())
                        .unwrap_or_default(),
                }
            })
            .collect(),
        dedup: sm
            .seen
            .iter()
            .map(|(&(node, incarnation), seqs)| pb::SnapshotDedup {
                node,
                incarnation,
                seqs: seqs.iter().copied().collect(),
            })
            .collect(),
        members: sm
            .members
            .iter()
            .map(|(&id, m)| pb::MemberInfo {
                id,
                peer_addr: m.peer_addr.clone(),
                added_at: m.added_at,
            })
            .collect(),
        tokens: sm
            .tokens
            .iter()
            .map(|(id, t)| pb::SnapshotToken {
                token_id: id.clone(),
                digest: t.digest.clone(),
                expires_at_unix_ms: t.expires_at_ms,
            })
            .collect(),
    }
    .encode_to_vec()
}

/// Rebuilds a state machine from snapshot data.
pub(crate) fn decode_snapshot(data: &[u8]) -> Result<StateMachine, DecodeError> {
    let snap = pb::StateSnapshot::decode(data)?;
    let mut sm = StateMachine::default();
    for r in snap.records {
        let writer = match r.writer_member {
            0 => None,
            member => Some(RecordWriter {
                member,
                writer: Writer::decode(&r.writer).map_err(DecodeError::BadWriter)?,
            }),
        };
        let lease = (r.lease_ttl_ms > 0).then_some(Lease {
            ttl_ms: r.lease_ttl_ms,
            expires_at_ms: r.lease_expires_at_unix_ms,
            expired: r.lease_expired,
            epoch: r.lease_epoch,
        });
        if lease.is_some() {
            sm.leased.insert(r.key.clone());
        }
        sm.records.insert(
            r.key,
            Stored {
                record: Record {
                    value: r.value,
                    revision: r.revision,
                    lease: None,
                    writer,
                },
                lease,
            },
        );
    }
    for d in snap.dedup {
        sm.seen
            .insert((d.node, d.incarnation), d.seqs.into_iter().collect());
    }
    sm.members = snap
        .members
        .into_iter()
        .map(|m| {
            (
                m.id,
                MemberInfo {
                    peer_addr: m.peer_addr,
                    added_at: m.added_at,
                },
            )
        })
        .collect::<BTreeMap<_, _>>();
    for t in snap.tokens {
        sm.tokens.insert(
            t.token_id,
            Token {
                digest: t.digest,
                expires_at_ms: t.expires_at_unix_ms,
            },
        );
    }
    Ok(sm)
}
