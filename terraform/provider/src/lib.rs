//! `terraform-provider-isthmus`: Isthmus as Terraform resources, speaking Terraform's plugin
//! protocol 6 over gRPC with go-plugin's handshake (no Go, no `protoc`: see build.rs).
//!
//! - [`plugin`]: the launch handshake, AutoMTLS and go-plugin's side services.
//! - [`provider`]: the `tfplugin6.Provider` service; [`contract`]: the [`contract::Resource`]
//!   / [`contract::DataSource`] traits the types implement and the connection they get.
//! - [`cty`]: Terraform's values in MessagePack and JSON; [`schema`]: schemas;
//!   [`diag`]: diagnostics pinned to attributes.
//! - [`resources`]: `isthmus_cluster`, `isthmus_failover_policy`, `isthmus_policy`;
//!   [`data`]: `isthmus_federation`, `isthmus_services`.
//!
//! The process runs one tokio runtime with the gRPC server; each Terraform request is
//! answered by one or a few requests to the mesh's control plane or federation member. The
//! design (attributes, import IDs, drift) is in docs/terraform.md.

// Code that ships: no unwrap on what input or the network can make fail, no silent lossy
// casts (see [workspace.lints] in the root Cargo.toml).
#![warn(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

pub mod contract;
pub mod cty;
pub mod data;
pub mod diag;
pub mod plugin;
pub mod proto;
pub mod provider;
pub mod resources;
pub mod schema;
