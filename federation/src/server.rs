//! Incoming raft traffic: the `RaftPeer` gRPC service on the peer listener.
//!
//! Every message of a batch is decoded and checked before any is handed to the raft loop,
//! so a batch with one bad message is rejected whole with `INVALID_ARGUMENT`, logged and
//! counted (`MemberStatus::rejected_peer_batches`). When the peer port serves TLS, a batch
//! whose `from` is not the member the caller's certificate is bound to is refused with
//! `PERMISSION_DENIED` and counted as a sender mismatch (`Store::peer_refusals`).
//!
//! A forwarded proposal (`MsgPropose`) carries only its sender's own proposals: each entry's
//! proposal id names the proposing member, which is what every replica's ownership check
//! reads (docs/security.md §7), so a member cannot propose an entry as another one.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::{ConfChangeV2, EntryType, Message, MessageType};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::peer_tls::{PeerMember, PeerRefusals};
use crate::proto::v1::raft_peer_server::{RaftPeer, RaftPeerServer};
use crate::proto::v1::{RaftBatch, SendAck};
use crate::replica::Replica;
use crate::state::codec::{decode_conf_context, proposer_of};

/// Largest batch a member accepts (raft append messages carry log entries).
const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;

/// Serves `RaftPeer.Send` for one member, forwarding checked messages to its raft loop.
pub(crate) struct PeerService {
    node_id: u64,
    replica: Arc<Replica>,
    inbound: mpsc::Sender<Message>,
    /// Set when the port serves TLS: every batch must come from the caller's own member.
    authenticated: Option<Arc<PeerRefusals>>,
}

impl PeerService {
    pub(crate) fn new(
        node_id: u64,
        replica: Arc<Replica>,
        inbound: mpsc::Sender<Message>,
        authenticated: Option<Arc<PeerRefusals>>,
    ) -> RaftPeerServer<Self> {
        RaftPeerServer::new(PeerService {
            node_id,
            replica,
            inbound,
            authenticated,
        })
        .max_decoding_message_size(MAX_BATCH_BYTES)
    }

    fn check(&self, batch: &RaftBatch) -> Result<Vec<Message>, Status> {
        if batch.to != self.node_id {
            return Err(Status::invalid_argument(format!(
                "batch addressed to member {}, this is member {}",
                batch.to, self.node_id
            )));
        }
        if !self.replica.is_known_peer(batch.from) || batch.from == self.node_id {
            return Err(Status::invalid_argument(format!(
                "batch from {} which is not another member of this federation",
                batch.from
            )));
        }
        let mut messages = Vec::with_capacity(batch.messages.len());
        for (i, bytes) in batch.messages.iter().enumerate() {
            let message = Message::parse_from_bytes(bytes).map_err(|err| {
                Status::invalid_argument(format!("message {i} is not a raft message: {err}"))
            })?;
            if message.to != self.node_id || message.from != batch.from {
                return Err(Status::invalid_argument(format!(
                    "message {i} is from {} to {}, but the batch is from {} to {}",
                    message.from, message.to, batch.from, batch.to
                )));
            }
            if message.get_msg_type() == MessageType::MsgPropose {
                check_proposer(&message, batch.from)
                    .map_err(|why| Status::invalid_argument(format!("message {i}: {why}")))?;
            }
            messages.push(message);
        }
        Ok(messages)
    }
}

/// Whether every entry of a forwarded proposal was proposed by `from` itself.
fn check_proposer(message: &Message, from: u64) -> Result<(), String> {
    for entry in message.get_entries() {
        let proposer = match entry.get_entry_type() {
            EntryType::EntryNormal if entry.data.is_empty() => continue,
            EntryType::EntryNormal => proposer_of(&entry.data).map_err(|e| e.to_string()),
            EntryType::EntryConfChangeV2 => ConfChangeV2::parse_from_bytes(&entry.data)
                .map_err(|e| e.to_string())
                .and_then(|cc| decode_conf_context(&cc.context).map_err(|e| e.to_string()))
                .map(|(id, _)| id.node),
            EntryType::EntryConfChange => {
                return Err("a forwarded proposal holds a v1 membership change".into())
            }
        }
        .map_err(|e| format!("a forwarded entry does not decode: {e}"))?;
        if proposer != from {
            return Err(format!(
                "member {from} forwarded an entry proposed by member {proposer}; a member \
                 forwards only its own proposals"
            ));
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn send(&self, request: Request<RaftBatch>) -> Result<Response<SendAck>, Status> {
        let remote = request.remote_addr();
        let sender = request.extensions().get::<PeerMember>().copied();
        let batch = request.into_inner();
        if let Some(refusals) = &self.authenticated {
            // The guard let only members through; the batch must be the caller's own.
            if sender != Some(PeerMember(batch.from)) {
                refusals.sender_mismatch.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    member = self.node_id,
                    remote = ?remote,
                    claimed = batch.from,
                    authenticated = ?sender.map(|m| m.0),
                    "dropped a raft batch whose sender is not the member its certificate is bound to"
                );
                return Err(Status::permission_denied(format!(
                    "batch from member {} sent with the certificate of {}",
                    batch.from,
                    sender.map_or("no member".to_string(), |m| format!("member {}", m.0))
                )));
            }
        }
        let messages = self.check(&batch).inspect_err(|status| {
            self.replica
                .rejected_peer_batches
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                member = self.node_id,
                remote = ?remote,
                "rejected raft batch: {}",
                status.message()
            );
        })?;
        let accepted = messages.len();
        for message in messages {
            // The raft loop drains this queue continuously; waiting here only pushes back
            // on the sending peer, never on the raft loop.
            if self.inbound.send(message).await.is_err() {
                return Err(Status::unavailable("this member is shutting down"));
            }
        }
        Ok(Response::new(SendAck {
            accepted: u32::try_from(accepted).unwrap_or(u32::MAX),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{encode_entry, Command, ProposalId};
    use crate::Writer;
    use raft::eraftpb::Entry;

    fn forwarded(proposer: u64) -> Message {
        let entry = Entry {
            data: encode_entry(
                ProposalId {
                    node: proposer,
                    incarnation: 1,
                    seq: 1,
                },
                &Writer::Member,
                &Command::Delete {
                    key: "clusters/west".into(),
                },
                None,
            )
            .into(),
            ..Default::default()
        };
        let mut message = Message::default();
        message.set_msg_type(MessageType::MsgPropose);
        message.from = 2;
        message.set_entries(vec![entry].into());
        message
    }

    #[test]
    fn a_member_forwards_only_its_own_proposals() {
        assert!(check_proposer(&forwarded(2), 2).is_ok());
        let why = check_proposer(&forwarded(3), 2).expect_err("another member's proposal");
        assert!(
            why.contains("member 2 forwarded an entry proposed by member 3"),
            "{why}"
        );
        let mut garbage = forwarded(2);
        garbage.mut_entries()[0].data = vec![0xff, 0xff].into();
        assert!(check_proposer(&garbage, 2)
            .expect_err("garbage")
            .contains("does not decode"));
    }
}
