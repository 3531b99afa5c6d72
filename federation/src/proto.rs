//! Generated code for `proto/federation.proto`: the `RaftPeer` gRPC service and the
//! entry-data messages.

/// Generated messages, client and server of `isthmus.federation.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("isthmus.federation.v1");
}
