//! The `isthmus` command line: every daemon (`isthmus control|gateway|dns|sidecar`), the
//! all-in-one local federation (`isthmus demo`), and the sample application the demo runs.
//!
//! The daemons and the demo are thin wrappers over the component crates; the demo runs whole
//! federations in one process on loopback, which is also how the end-to-end tests use it.

pub mod cluster_cmd;
pub mod daemon;
pub mod demo;
pub mod policy_cmd;
pub mod sample;
