//! The data sources: what the federation knows, read-only.

pub mod federation;
pub mod services;
