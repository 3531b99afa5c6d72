//! Generated code for `proto/federation.proto`: the `RaftPeer` and `Kv` gRPC services, the
//! entry, log and snapshot encodings. Public so that tools (the benchmark client, other
//! languages' stubs) can speak the `Kv` API directly; [`crate::KvClient`] wraps it.

/// Generated messages, client and server of `isthmus.federation.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("isthmus.federation.v1");
}
