//! The control plane's records in the federation store (see docs/federation-store.md).
//!
//! - `clusters/<name>` → [`ClusterRecord`]: membership, trust bundle, gateway address.
//! - `exports/<ns>/<svc>/<cluster>` → [`ExportRecord`]: one cluster's export of one service.
//!
//! Values are JSON. Each cluster writes only its own records.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use isthmus_core::mesh::ServicePort;
use serde::{Deserialize, Serialize};

/// A member cluster, as published by its own control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRecord {
    pub name: String,
    pub trust_domain: String,
    /// The east-west gateway's QUIC address, reachable from the other clusters.
    pub gateway: Option<SocketAddr>,
    /// The cluster CA's certificate(s), PEM.
    pub ca_bundle_pem: String,
    #[serde(default)]
    pub locality: Option<String>,
    /// The raft id of the cluster's federation member (`isthmus cluster remove NAME` finds
    /// the member by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_id: Option<u64>,
    /// The control plane's gRPC address, when it listens on a specific one (`isthmus
    /// explain --from` reaches the cluster's control plane through it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<SocketAddr>,
}

/// One cluster's export of one service: what the others need to route to it through that
/// cluster's gateway (the endpoints themselves stay private to the owning cluster).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportRecord {
    pub cluster: String,
    pub namespace: String,
    pub name: String,
    pub ports: Vec<ServicePort>,
    /// SPIFFE IDs of the endpoints, so callers can verify whom they reach.
    pub identities: Vec<String>,
    pub endpoints: u32,
    pub healthy_endpoints: u32,
    /// Healthy endpoint counts by `label=value` (e.g. `version=v2`), for subsets.
    #[serde(default)]
    pub subsets: BTreeMap<String, u32>,
    /// Present when the service is headless: its endpoints, named but without addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headless: Option<HeadlessExport>,
    /// When the owning cluster exported the service (unix ms), where it knows (Kubernetes:
    /// the ServiceExport's creation time). The oldest export wins a conflict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exported_at_ms: Option<u64>,
    /// Not part of the stored value: when the record's lease in the store lapsed (unix ms),
    /// filled in by the reader from the store's record.
    #[serde(skip)]
    pub lease_expired_at_ms: Option<u64>,
}

pub fn cluster_key(name: &str) -> String {
    format!("clusters/{name}")
}

pub fn export_key(namespace: &str, name: &str, cluster: &str) -> String {
    format!("exports/{namespace}/{name}/{cluster}")
}

pub const CLUSTERS_PREFIX: &str = "clusters/";
pub const EXPORTS_PREFIX: &str = "exports/";

/// The endpoints of an exported headless service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeadlessExport {
    pub endpoints: Vec<ExportedEndpoint>,
}

/// One endpoint of an exported headless service: enough for importers to give it a VIP and a
/// name, and to ask the owning gateway for it (subset `isthmus.io/endpoint=<id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportedEndpoint {
    /// The hostname, or `ep.<hex>` for an endpoint without one.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    pub ready: bool,
}
