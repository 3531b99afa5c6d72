//! isthmus-core: the pieces every Isthmus component shares.
//!
//! - [`identity`]: cluster names and SPIFFE workload identities.
//! - [`ca`]: a cluster's certificate authority (rcgen) and workload CSRs.
//! - [`tls`]: rustls client/server configurations that verify peers against the federated
//!   trust bundles (one bundle per trust domain) and expose the peer's SPIFFE ID.
//! - [`mesh`]: the merged configuration snapshot streamed from a control plane to its
//!   sidecars, DNS proxies and gateway.
//! - [`policy`]: the Istio-compatible policy documents users apply, parsed and validated.
//! - [`proto`]: gRPC definitions (config stream, certificate signing), generated at build time
//!   with the pure-Rust `protox` compiler, so no system `protoc` is needed.
//! - [`tunnel`]: the stream header spoken by sidecars and gateways on tunnelled connections.
//! - [`client`]: the data plane's client of its control plane (config stream, certificates).
//! - [`clock`]: wall-clock milliseconds since the Unix epoch, as records carry them.
//! - [`durable`]: files written atomically and fsynced (CA files, the raft log's files).
//! - [`contexts`]: the operator's named contexts (control plane and CA), as kubectl keeps them.
//! - [`config`]: loading YAML config files into validated structs with errors that name the
//!   file, the field and the bad value.
//! - [`admin`]: the admin HTTP server (`/metrics`, `/ready`, `/debug/config`), and
//!   [`admin::ComponentAdmin`], the one every daemon runs with the metrics they all share.
//! - [`join`]: the federation's bundle set and its digest, which join tokens carry.
//! - [`attach`]: how a data-plane daemon joins its control plane at start (certificate,
//!   config stream, trust bundles).
//! - [`http_path`]: request paths normalized as Istio's `pathNormalization` does, before
//!   authorization and routing see them.
//! - [`revocation`]: a port's open connections by their caller's trust domain, closed at
//!   once when that domain loses its rights.
//!
//! This crate runs no tasks of its own except the admin server's accept loop and the tasks
//! [`attach::attach`] starts (certificate rotation, config stream, trust bundles), and depends
//! on none of raft, quinn, kube or hickory.

// Code that ships: no unwrap on what input or the network can make fail, no silent lossy
// casts (see [workspace.lints] in the root Cargo.toml).
#![warn(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

pub mod admin;
pub mod api_tls;
pub mod attach;
pub mod ca;
pub mod client;
pub mod clock;
pub mod config;
pub mod contexts;
pub mod durable;
pub mod entry_signature;
pub mod failover;
pub mod http_path;
pub mod identity;
pub mod join;
pub mod jwt;
pub mod keyspace;
pub mod mesh;
pub mod policy;
pub mod proto;
pub mod revocation;
pub mod tls;
pub mod tunnel;

/// Installs the workspace's one rustls crypto provider (ring) as the process default.
/// Safe to call many times.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
