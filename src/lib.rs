//! The `isthmus` command line: every daemon (`isthmus control|gateway|dns|sidecar`), the
//! all-in-one local federation (`isthmus demo`, from the `isthmus-demo` crate), and the
//! operator commands (`apply`, `get`, `delete`, `explain`, `status`, `cluster`, `context`).
//!
//! The daemons and the demo are thin wrappers over the component crates: each crate owns its
//! config format and its daemon's start-up; the files here parse flags and call them.

// Code that ships: no unwrap on what input or the network can make fail, no silent lossy
// casts (see [workspace.lints] in the root Cargo.toml).
#![warn(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

pub mod ca_cmd;
pub mod cluster_cmd;
pub mod context_cmd;
pub mod credentials_cmd;
pub mod daemon;
pub mod policy_cmd;
