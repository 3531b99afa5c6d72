//! The `isthmus` command line: every daemon (`isthmus control|gateway|dns|sidecar`), the
//! all-in-one local federation (`isthmus demo`, from the `isthmus-demo` crate), and the
//! operator commands (`apply`, `get`, `delete`, `explain`, `status`, `cluster`).
//!
//! The daemons and the demo are thin wrappers over the component crates: each crate owns its
//! config format and its daemon's start-up; the files here parse flags and call them.

pub mod cluster_cmd;
pub mod daemon;
pub mod policy_cmd;
