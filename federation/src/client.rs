//! [`KvClient`]: a small client of the `isthmus.federation.v1.Kv` API that any member serves
//! on its peer port, for the CLI (`isthmus status`, `isthmus apply`) and the benchmark.

use std::net::SocketAddr;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

use crate::api::{OLDEST_HEADER, REQUESTED_HEADER};
use crate::proto::v1 as pb;
use crate::proto::v1::kv_client::KvClient as Grpc;
use crate::{Conflict, LeaseState, Record, RecordWriter, StoreError, WatchEvent, Writer};

/// How long connecting to a member may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest answer the client decodes: a `List` of a big mesh's records (each value is at
/// most 1 MiB; a whole federation's exports fit many times over), bounded so a server cannot
/// make the client allocate without limit.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// A connection to one member's `Kv` API. Cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct KvClient {
    grpc: Grpc<Channel>,
}

/// One member's view of the federation, as `Kv.Status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteStatus {
    /// The member's raft id.
    pub id: u64,
    /// `leader`, `follower`, `candidate` or `pre-candidate`.
    pub role: String,
    /// The leader it knows of.
    pub leader_id: Option<u64>,
    /// Its raft term.
    pub term: u64,
    /// Highest committed index.
    pub commit_index: u64,
    /// Highest applied index.
    pub applied_index: u64,
    /// Every member's id and peer address.
    pub members: Vec<(u64, String)>,
    /// Voting members.
    pub voters: Vec<u64>,
    /// Learners.
    pub learners: Vec<u64>,
    /// Peer batches it rejected as garbage since it started.
    pub rejected_peer_batches: u64,
    /// Index of its latest snapshot.
    pub snapshot_index: u64,
}

fn error(status: Status) -> StoreError {
    let header = |name: &str| {
        status
            .metadata()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    if status.code() == Code::FailedPrecondition {
        if let (Some(requested), Some(oldest)) = (header(REQUESTED_HEADER), header(OLDEST_HEADER)) {
            return StoreError::Compacted { requested, oldest };
        }
    }
    StoreError::Client(format!("{:?}: {}", status.code(), status.message()))
}

fn record(r: pb::KvRecord) -> (String, Record) {
    (
        r.key,
        Record {
            value: r.value,
            revision: r.revision,
            lease: r.lease.map(|l| LeaseState {
                expires_at_unix_ms: l.expires_at_unix_ms,
                expired: l.expired,
            }),
            // A writer this client cannot read is shown as not recorded.
            writer: match r.writer_member {
                0 => None,
                member => Writer::decode(&r.writer)
                    .ok()
                    .map(|writer| RecordWriter { member, writer }),
            },
        },
    )
}

impl KvClient {
    /// Connects to the member whose peer port is `addr`.
    pub async fn connect(addr: SocketAddr) -> Result<Self, StoreError> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| StoreError::Client(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| StoreError::Client(format!("connecting to {addr}: {e}")))?;
        Ok(KvClient {
            grpc: Grpc::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES),
        })
    }

    /// A client over an existing channel: the `Kv` API as a control plane serves it on its
    /// TLS API port (docs/control-api.md), next to its own services.
    pub fn from_channel(channel: Channel) -> Self {
        KvClient {
            grpc: Grpc::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES),
        }
    }

    /// The record at `key`: from the member's replica, or linearizable.
    pub async fn get(
        &mut self,
        key: &str,
        linearizable: bool,
    ) -> Result<Option<Record>, StoreError> {
        let response = self
            .grpc
            .get(pb::GetRequest {
                key: key.to_string(),
                linearizable,
            })
            .await
            .map_err(error)?;
        Ok(response.into_inner().record.map(|r| record(r).1))
    }

    /// Sets `key`; returns the write's revision.
    pub async fn put(&mut self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        self.put_with_lease(key, value, Duration::ZERO).await
    }

    /// Sets `key` with a lease (`Duration::ZERO`: none); returns the write's revision.
    pub async fn put_with_lease(
        &mut self,
        key: &str,
        value: Vec<u8>,
        lease: Duration,
    ) -> Result<u64, StoreError> {
        let response = self
            .grpc
            .put(pb::PutRequest {
                key: key.to_string(),
                value,
                lease_ttl_ms: u64::try_from(lease.as_millis()).unwrap_or(u64::MAX),
            })
            .await
            .map_err(error)?;
        Ok(response.into_inner().revision)
    }

    /// Removes `key`; returns the delete's revision.
    pub async fn delete(&mut self, key: &str) -> Result<u64, StoreError> {
        let response = self
            .grpc
            .delete(pb::DeleteRequest {
                key: key.to_string(),
            })
            .await
            .map_err(error)?;
        Ok(response.into_inner().revision)
    }

    /// Sets `key` only at `expected_revision` (`None`: only if absent).
    pub async fn compare_and_set(
        &mut self,
        key: &str,
        expected_revision: Option<u64>,
        value: Vec<u8>,
    ) -> Result<Result<u64, Conflict>, StoreError> {
        let response = self
            .grpc
            .compare_and_set(pb::CompareAndSetRequest {
                key: key.to_string(),
                expected_revision,
                value,
            })
            .await
            .map_err(error)?
            .into_inner();
        Ok(if response.succeeded {
            Ok(response.revision)
        } else {
            Err(Conflict {
                current_revision: response.current_revision,
            })
        })
    }

    /// Every record under `prefix` and the revision the list is at (watch from it + 1).
    pub async fn list(
        &mut self,
        prefix: &str,
        linearizable: bool,
    ) -> Result<(u64, Vec<(String, Record)>), StoreError> {
        let response = self
            .grpc
            .list(pb::ListRequest {
                prefix: prefix.to_string(),
                linearizable,
            })
            .await
            .map_err(error)?
            .into_inner();
        Ok((
            response.revision,
            response.records.into_iter().map(record).collect(),
        ))
    }

    /// Changes under `prefix` from `from_revision` on (0: from now).
    pub async fn watch(&mut self, prefix: &str, from_revision: u64) -> Result<KvWatch, StoreError> {
        let stream = self
            .grpc
            .watch(pb::WatchRequest {
                prefix: prefix.to_string(),
                from_revision,
            })
            .await
            .map_err(error)?
            .into_inner();
        Ok(KvWatch {
            stream,
            next: from_revision,
        })
    }

    /// The member's status.
    pub async fn status(&mut self) -> Result<RemoteStatus, StoreError> {
        let s = self
            .grpc
            .status(pb::StatusRequest {})
            .await
            .map_err(error)?
            .into_inner();
        Ok(RemoteStatus {
            id: s.id,
            role: s.role,
            leader_id: (s.leader_id != 0).then_some(s.leader_id),
            term: s.term,
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            members: s.members.into_iter().map(|m| (m.id, m.peer_addr)).collect(),
            voters: s.voters,
            learners: s.learners,
            rejected_peer_batches: s.rejected_peer_batches,
            snapshot_index: s.snapshot_index,
        })
    }

    /// Mints a one-time join token valid for `ttl`.
    pub async fn mint_join_token(&mut self, ttl: Duration) -> Result<String, StoreError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        Ok(self
            .grpc
            .mint_join_token(pb::MintJoinTokenRequest { ttl_ms })
            .await
            .map_err(error)?
            .into_inner()
            .token)
    }

    /// Consumes `token` and admits the applicant (see [`crate::Store::join_with_token`]);
    /// returns the change's revision and whether it votes (false: it joined as a learner).
    pub async fn join(
        &mut self,
        token: &str,
        application: &crate::JoinApplication,
    ) -> Result<(u64, bool), StoreError> {
        let cluster = application.cluster.clone();
        let r = self
            .grpc
            .join(pb::JoinRequest {
                token: token.to_string(),
                id: application.id,
                peer_addr: application.peer_addr.to_string(),
                cluster: cluster.as_ref().map(|c| c.name.clone()).unwrap_or_default(),
                trust_domain: cluster
                    .as_ref()
                    .map(|c| c.trust_domain.clone())
                    .unwrap_or_default(),
                ca_bundle_pem: cluster.map(|c| c.ca_bundle_pem).unwrap_or_default(),
            })
            .await
            .map_err(error)?
            .into_inner();
        Ok((r.revision, r.voter))
    }

    /// The federation's bundle set (`Kv.JoinInfo`), to check against a join token's digest.
    pub async fn join_info(&mut self) -> Result<Vec<isthmus_core::join::BundleEntry>, StoreError> {
        let r = self
            .grpc
            .join_info(pb::JoinInfoRequest {})
            .await
            .map_err(error)?
            .into_inner();
        Ok(r.clusters
            .into_iter()
            .map(|c| isthmus_core::join::BundleEntry {
                name: c.name,
                trust_domain: c.trust_domain,
                ca_bundle_pem: c.ca_bundle_pem,
            })
            .collect())
    }

    /// Removes member `id`; returns the change's revision.
    pub async fn remove_member(&mut self, id: u64) -> Result<u64, StoreError> {
        Ok(self
            .grpc
            .remove_member(pb::RemoveMemberRequest { id })
            .await
            .map_err(error)?
            .into_inner()
            .revision)
    }
}

/// A watch over gRPC. After a disconnect, watch again from [`KvWatch::next_revision`]: no
/// event is lost or repeated.
pub struct KvWatch {
    stream: Streaming<pb::WatchResponse>,
    next: u64,
}

impl KvWatch {
    /// The revision to resume from after a reconnect.
    pub fn next_revision(&self) -> u64 {
        self.next
    }

    /// The next change; `Ok(None)` when the member closed the stream.
    pub async fn next(&mut self) -> Result<Option<WatchEvent>, StoreError> {
        use pb::watch_response::Kind;
        let Some(message) = self.stream.message().await.map_err(error)? else {
            return Ok(None);
        };
        self.next = message.revision + 1;
        let event = match Kind::try_from(message.kind) {
            Ok(Kind::Put) => WatchEvent::Put {
                key: message.key,
                value: message.value,
                revision: message.revision,
            },
            Ok(Kind::Delete) => WatchEvent::Delete {
                key: message.key,
                revision: message.revision,
            },
            Ok(Kind::LeaseExpired) | Ok(Kind::LeaseRenewed) => WatchEvent::Lease {
                key: message.key,
                expired: message.kind == Kind::LeaseExpired as i32,
                revision: message.revision,
            },
            Err(_) => {
                return Err(StoreError::Client(format!(
                    "unknown watch event kind {}",
                    message.kind
                )))
            }
        };
        Ok(Some(event))
    }
}
