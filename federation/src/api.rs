//! The client API: the `isthmus.federation.v1.Kv` gRPC service, served by every member on
//! its peer port. Writes on a follower are forwarded to the leader by raft (the member
//! answers once it has applied them); reads are local unless `linearizable`.

use std::sync::Weak;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::proto::v1 as pb;
use crate::proto::v1::kv_server::{Kv, KvServer};
use crate::{Inner, Record, Role, Store, StoreError, WatchEvent, Writer};

/// Metadata of a `compacted` watch error: the revision asked for, and the oldest one a
/// watch can start from.
pub(crate) const REQUESTED_HEADER: &str = "x-isthmus-requested-revision";
pub(crate) const OLDEST_HEADER: &str = "x-isthmus-oldest-revision";

/// How many watch events wait for a slow gRPC client before the stream pushes back.
const WATCH_BUFFER: usize = 256;
/// Largest request accepted (a value plus its key).
const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;
/// The largest request the peer port's `Kv` takes where it serves no writes: a `Kv.Join`
/// (a cluster's name, trust domain and CA bundle) or a read.
const MAX_PEER_REQUEST_BYTES: usize = 256 * 1024;

/// One write a [`WriteGuard`] is asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvWrite<'a> {
    pub key: &'a str,
    /// A `Delete` (else a `Put` or `CompareAndSet`).
    pub delete: bool,
}

/// Decides, per request, whether its caller may make one write: the server that carries
/// the `Kv` service knows who the caller is (its TLS layer puts that in the request's
/// extensions) and what the caller may touch; the store does not.
pub type WriteGuard =
    std::sync::Arc<dyn Fn(&tonic::Extensions, KvWrite<'_>) -> Result<(), Status> + Send + Sync>;

/// Serves `Kv` for one member.
pub struct KvService {
    store: Weak<Inner>,
    guard: Option<WriteGuard>,
    /// False on the peer port of a member run by a control plane.
    writes: bool,
}

impl KvService {
    pub(crate) fn new(store: Weak<Inner>, guard: Option<WriteGuard>) -> KvServer<Self> {
        KvServer::new(KvService {
            store,
            guard,
            writes: true,
        })
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(usize::MAX)
    }

    /// The peer port's `Kv` of a member whose control plane serves the authenticated one:
    /// every write is refused.
    pub(crate) fn peer_port_without_writes(store: Weak<Inner>) -> KvServer<Self> {
        KvServer::new(KvService {
            store,
            guard: None,
            writes: false,
        })
        .max_decoding_message_size(MAX_PEER_REQUEST_BYTES)
        .max_encoding_message_size(usize::MAX)
    }

    /// Refuses `method` when this port takes no writes.
    fn writable(&self, method: &str) -> Result<(), Status> {
        if self.writes {
            Ok(())
        } else {
            Err(Status::unauthenticated(format!(
                "Kv.{method} is not served on the federation peer port: call it on a control \
                 plane's API (port 15012) with an operator credential (isthmus --context, or \
                 --control with --ca-file, --cert and --key)"
            )))
        }
    }

    fn check_write<T>(&self, request: &Request<T>, key: &str, delete: bool) -> Result<(), Status> {
        match &self.guard {
            Some(guard) => guard(request.extensions(), KvWrite { key, delete }),
            None => Ok(()),
        }
    }

    fn store(&self) -> Result<Store, Status> {
        Store::upgrade(&self.store).ok_or_else(|| Status::unavailable("member is shutting down"))
    }

    /// The store acting for the writer the server carrying this service authenticated (a
    /// [`Writer`] in the request's extensions; the member itself when there is none), so the
    /// entry names who asked and every replica checks what they may write.
    fn store_for<T>(&self, request: &Request<T>) -> Result<Store, Status> {
        let writer = request
            .extensions()
            .get::<Writer>()
            .cloned()
            .unwrap_or(Writer::Member);
        Ok(self.store()?.acting_for(writer))
    }
}

impl From<StoreError> for Status {
    fn from(err: StoreError) -> Status {
        status(err)
    }
}

/// Maps a store error to the gRPC status a client acts on.
pub(crate) fn status(err: StoreError) -> Status {
    let message = err.to_string();
    match err {
        StoreError::InvalidKey { .. }
        | StoreError::ValueTooLarge { .. }
        | StoreError::TokenTtl { .. }
        | StoreError::InvalidJoin { .. } => Status::invalid_argument(message),
        StoreError::Compacted { requested, oldest } => {
            let mut status = Status::failed_precondition(message);
            // So the client can rebuild the error exactly.
            status
                .metadata_mut()
                .insert(REQUESTED_HEADER, requested.into());
            status.metadata_mut().insert(OLDEST_HEADER, oldest.into());
            status
        }
        StoreError::NoLease { .. } => Status::not_found(message),
        StoreError::Refused(refusal)
            if refusal.reason == isthmus_core::keyspace::rules::Reason::NotOwner =>
        {
            Status::permission_denied(message)
        }
        StoreError::Refused(refusal) if refusal.reason.is_precondition() => {
            Status::failed_precondition(message)
        }
        StoreError::Refused(_) => Status::invalid_argument(message),
        StoreError::Token(_) => Status::permission_denied(message),
        StoreError::Membership(_) => Status::failed_precondition(message),
        StoreError::ProposalTimeout { .. } | StoreError::ReadTimeout { .. } => {
            Status::unavailable(message)
        }
        StoreError::Stopped => Status::unavailable(message),
        _ => Status::internal(message),
    }
}

pub(crate) fn record_to_pb(key: String, record: Record) -> pb::KvRecord {
    pb::KvRecord {
        key,
        value: record.value,
        revision: record.revision,
        lease: record.lease.map(|l| pb::LeaseInfo {
            expires_at_unix_ms: l.expires_at_unix_ms,
            expired: l.expired,
        }),
        writer_member: record.writer.as_ref().map_or(0, |w| w.member),
        writer: record.writer.map(|w| w.writer.encode()).unwrap_or_default(),
    }
}

pub(crate) fn event_to_pb(event: WatchEvent) -> pb::WatchResponse {
    use pb::watch_response::Kind;
    match event {
        WatchEvent::Put {
            key,
            value,
            revision,
        } => pb::WatchResponse {
            key,
            revision,
            kind: Kind::Put as i32,
            value,
        },
        WatchEvent::Delete { key, revision } => pb::WatchResponse {
            key,
            revision,
            kind: Kind::Delete as i32,
            value: Vec::new(),
        },
        WatchEvent::Lease {
            key,
            expired,
            revision,
        } => pb::WatchResponse {
            key,
            revision,
            kind: if expired {
                Kind::LeaseExpired as i32
            } else {
                Kind::LeaseRenewed as i32
            },
            value: Vec::new(),
        },
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Candidate => "candidate",
        Role::PreCandidate => "pre-candidate",
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let store = self.store()?;
        let request = request.into_inner();
        let record = if request.linearizable {
            store.get_linearizable(&request.key).await.map_err(status)?
        } else {
            store.get(&request.key)
        };
        Ok(Response::new(pb::GetResponse {
            record: record.map(|r| record_to_pb(request.key, r)),
            revision: *store.revision().borrow(),
        }))
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        self.writable("Put")?;
        let store = self.store_for(&request)?;
        self.check_write(&request, &request.get_ref().key, false)?;
        let request = request.into_inner();
        let revision = if request.lease_ttl_ms > 0 {
            let lease = std::time::Duration::from_millis(request.lease_ttl_ms);
            store
                .put_with_lease(&request.key, request.value, lease)
                .await
        } else {
            store.put(&request.key, request.value).await
        }
        .map_err(status)?;
        Ok(Response::new(pb::WriteResponse { revision }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        self.writable("Delete")?;
        let store = self.store_for(&request)?;
        self.check_write(&request, &request.get_ref().key, true)?;
        let revision = store
            .delete(&request.into_inner().key)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::WriteResponse { revision }))
    }

    async fn compare_and_set(
        &self,
        request: Request<pb::CompareAndSetRequest>,
    ) -> Result<Response<pb::CompareAndSetResponse>, Status> {
        self.writable("CompareAndSet")?;
        let store = self.store_for(&request)?;
        self.check_write(&request, &request.get_ref().key, false)?;
        let request = request.into_inner();
        let result = store
            .compare_and_set(&request.key, request.expected_revision, request.value)
            .await
            .map_err(status)?;
        Ok(Response::new(match result {
            Ok(revision) => pb::CompareAndSetResponse {
                succeeded: true,
                revision,
                current_revision: Some(revision),
            },
            Err(conflict) => pb::CompareAndSetResponse {
                succeeded: false,
                revision: 0,
                current_revision: conflict.current_revision,
            },
        }))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let store = self.store()?;
        let request = request.into_inner();
        // The revision is read first: every change after it reaches a watch started from
        // revision + 1, even if it is already in the list.
        let (revision, records) = if request.linearizable {
            let revision = store.sync_read().await.map_err(status)?;
            (
                revision.max(*store.revision().borrow()),
                store.list(&request.prefix),
            )
        } else {
            let revision = *store.revision().borrow();
            (revision, store.list(&request.prefix))
        };
        Ok(Response::new(pb::ListResponse {
            records: records
                .into_iter()
                .map(|(k, r)| record_to_pb(k, r))
                .collect(),
            revision,
        }))
    }

    type WatchStream = ReceiverStream<Result<pb::WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let store = self.store()?;
        let request = request.into_inner();
        let mut watch = store
            .watch(&request.prefix, request.from_revision)
            .map_err(status)?;
        // The stream must not keep the member alive.
        drop(store);
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    item = watch.next() => item,
                    _ = tx.closed() => return,
                };
                let message = item.map(event_to_pb).map_err(status);
                let end = message.is_err();
                if tx.send(message).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let store = self.store()?;
        let s = store.status();
        Ok(Response::new(pb::StatusResponse {
            id: s.id,
            role: role_name(s.role).to_string(),
            leader_id: s.leader_id.unwrap_or(0),
            term: s.term,
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            members: store
                .members()
                .into_iter()
                .map(|(id, peer_addr)| pb::MemberInfo {
                    id,
                    peer_addr,
                    added_at: 0,
                })
                .collect(),
            voters: s.voters,
            learners: s.learners,
            rejected_peer_batches: s.rejected_peer_batches,
            snapshot_index: s.snapshot_index,
        }))
    }

    async fn mint_join_token(
        &self,
        request: Request<pb::MintJoinTokenRequest>,
    ) -> Result<Response<pb::MintJoinTokenResponse>, Status> {
        self.writable("MintJoinToken")?;
        let store = self.store_for(&request)?;
        let ttl_ms = request.into_inner().ttl_ms;
        if ttl_ms == 0 {
            return Err(Status::invalid_argument(
                "ttl_ms: a join token must be valid for longer than zero",
            ));
        }
        let token = store
            .mint_join_token(std::time::Duration::from_millis(ttl_ms))
            .await
            .map_err(status)?;
        Ok(Response::new(pb::MintJoinTokenResponse { token }))
    }

    async fn join_info(
        &self,
        _request: Request<pb::JoinInfoRequest>,
    ) -> Result<Response<pb::JoinInfoResponse>, Status> {
        let clusters = self
            .store()?
            .bundle_set()
            .into_iter()
            .map(|e| pb::ClusterBundle {
                name: e.name,
                trust_domain: e.trust_domain,
                ca_bundle_pem: e.ca_bundle_pem,
            })
            .collect();
        let removed_members = self.store()?.removed_members();
        Ok(Response::new(pb::JoinInfoResponse {
            clusters,
            removed_members,
        }))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let req = request.into_inner();
        if req.id == 0 {
            return Err(Status::invalid_argument("id: 0 is not a valid member id"));
        }
        let addr: std::net::SocketAddr = req.peer_addr.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "peer_addr: {:?} is not an address such as 10.0.0.7:15017",
                req.peer_addr
            ))
        })?;
        let store = self.store()?;
        let claimed = !req.cluster.is_empty()
            || !req.trust_domain.is_empty()
            || !req.ca_bundle_pem.is_empty();
        let cluster = claimed.then_some(crate::ClusterClaim {
            name: req.cluster,
            trust_domain: req.trust_domain,
            ca_bundle_pem: req.ca_bundle_pem,
        });
        let revision = store
            .join_with_token(
                &req.token,
                crate::JoinApplication {
                    id: req.id,
                    peer_addr: addr,
                    cluster,
                },
            )
            .await
            .map_err(status)?;
        let voter = !store.status().learners.contains(&req.id);
        Ok(Response::new(pb::JoinResponse { revision, voter }))
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        self.writable("RemoveMember")?;
        let store = self.store_for(&request)?;
        let id = request.into_inner().id;
        if !store.members().contains_key(&id) {
            return Err(Status::not_found(format!("id: no member {id}")));
        }
        let revision = store.remove_member(id).await.map_err(status)?;
        Ok(Response::new(pb::WriteResponse { revision }))
    }
}
