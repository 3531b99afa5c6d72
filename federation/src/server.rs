//! Incoming raft traffic: the `RaftPeer` gRPC service on the peer listener.
//!
//! Every message of a batch is decoded and checked before any is handed to the raft loop,
//! so a batch with one bad message is rejected whole with `INVALID_ARGUMENT`, logged and
//! counted (`MemberStatus::rejected_peer_batches`). When the peer port serves TLS, a batch
//! whose `from` is not the member the caller's certificate is bound to is refused with
//! `PERMISSION_DENIED` and counted as a sender mismatch (`Store::peer_refusals`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::peer_tls::{PeerMember, PeerRefusals};
use crate::proto::v1::raft_peer_server::{RaftPeer, RaftPeerServer};
use crate::proto::v1::{RaftBatch, SendAck};
use crate::replica::Replica;

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
            messages.push(message);
        }
        Ok(messages)
    }
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
