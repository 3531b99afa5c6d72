//! The daemons: `isthmus control|gateway|dns|sidecar --config FILE`.
//!
//! Each loads and validates its YAML config (errors name the file, the field and the bad
//! value, and the process exits non-zero), starts its component from the same library code
//! the demo uses, prints one `ready` line with its bound addresses as JSON (so scripts and
//! tests can start it on port 0 and read where it listens), and runs until SIGINT/SIGTERM.

pub mod admin;
mod common;
pub mod control;
pub mod dns;
pub mod gateway;
pub mod redirect;
pub mod sidecar;

pub use common::{attach, report_failover, wait_for_shutdown_signal, Attached, ControlTarget};
