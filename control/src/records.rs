//! The control plane's records in the federation store (see docs/federation-store.md).
//!
//! - `clusters/<name>` → [`ClusterRecord`]: membership, trust bundle, gateway address.
//! - `exports/<ns>/<svc>/<cluster>` → [`ExportRecord`]: one cluster's export of one service.
//! - `grants/mesh-admin/<trust-domain>/<name>` → [`GrantRecord`]: the operator
//!   `spiffe://<trust-domain>/operator/admin/<name>` is a mesh admin (docs/security.md §6).
//!
//! Values are JSON. Each cluster writes only its own records.

use std::collections::BTreeMap;

use isthmus_core::keyspace;
use isthmus_core::mesh::ServicePort;
use serde::{Deserialize, Serialize};

pub use isthmus_core::keyspace::ClusterRecord;

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
    keyspace::cluster(name)
}

pub fn export_key(namespace: &str, name: &str, cluster: &str) -> String {
    keyspace::export(namespace, name, cluster)
}

pub const CLUSTERS_PREFIX: &str = keyspace::CLUSTERS_PREFIX;
/// Where mesh-admin grants live.
pub const MESH_ADMIN_GRANTS_PREFIX: &str = keyspace::MESH_ADMIN_GRANTS_PREFIX;

/// The key of the grant that makes `spiffe://<trust_domain>/operator/admin/<name>` a mesh
/// admin.
pub fn mesh_admin_grant_key(trust_domain: &str, name: &str) -> String {
    keyspace::mesh_admin_grant(trust_domain, name)
}

/// A mesh-admin grant: who holds it, who granted it, when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantRecord {
    pub identity: String,
    pub granted_by: String,
    pub granted_at_ms: u64,
}

/// Whether `key` is one of `cluster`'s own records (`clusters/<cluster>` or
/// `exports/<ns>/<svc>/<cluster>`), which that cluster's admins may write.
pub fn owned_by(key: &str, cluster: &str) -> bool {
    let key = keyspace::Key::parse(key);
    matches!(
        key,
        keyspace::Key::Cluster { .. } | keyspace::Key::Export { .. }
    ) && key.owner() == Some(cluster)
}
pub const EXPORTS_PREFIX: &str = keyspace::EXPORTS_PREFIX;

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

/// Decodes the records listed under [`CLUSTERS_PREFIX`], keeping those that decode and whose
/// value names the cluster of its key: `clusters/east` holding `"name": "west"` is refused,
/// so no record can pose as another cluster's (each refusal is logged).
pub fn decode_clusters(listed: Vec<(String, isthmus_federation::Record)>) -> Vec<ClusterRecord> {
    listed
        .into_iter()
        .filter_map(|(key, record)| {
            let c: ClusterRecord = decode_logged(&key, &record.value)?;
            keyed(&key, &cluster_key(&c.name)).then_some(c)
        })
        .collect()
}

/// Decodes the records listed under [`EXPORTS_PREFIX`] like [`decode_clusters`]: an export
/// counts only at its own key, `exports/<namespace>/<name>/<cluster>`; the lease state comes
/// from the store's record.
pub fn decode_exports(listed: Vec<(String, isthmus_federation::Record)>) -> Vec<ExportRecord> {
    listed
        .into_iter()
        .filter_map(|(key, record)| {
            let mut x: ExportRecord = decode_logged(&key, &record.value)?;
            if !keyed(&key, &export_key(&x.namespace, &x.name, &x.cluster)) {
                return None;
            }
            x.lease_expired_at_ms = record
                .lease
                .filter(|l| l.expired)
                .map(|l| l.expires_at_unix_ms);
            Some(x)
        })
        .collect()
}

fn decode_logged<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Option<T> {
    match serde_json::from_slice(value) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(%key, error = %e, "skipping a store record that does not decode");
            None
        }
    }
}

fn keyed(key: &str, expected: &str) -> bool {
    if key == expected {
        return true;
    }
    tracing::warn!(%key, names = %expected, "skipping a store record whose value names another key");
    false
}

#[cfg(test)]
mod keyed_tests {
    use super::*;

    fn record(value: serde_json::Value) -> isthmus_federation::Record {
        isthmus_federation::Record {
            value: serde_json::to_vec(&value).unwrap(),
            revision: 1,
            lease: None,
            writer: None,
        }
    }

    #[test]
    fn a_record_counts_only_at_the_key_its_value_names() {
        let export = |cluster: &str| {
            record(serde_json::json!({
                "cluster": cluster, "namespace": "default", "name": "ratings", "ports": [],
                "identities": [], "endpoints": 1, "healthyEndpoints": 1
            }))
        };
        let exports = decode_exports(vec![
            ("exports/default/ratings/central".into(), export("central")),
            // A record at another cluster's key claiming to be central's export.
            ("exports/default/ratings/zzz".into(), export("central")),
            ("exports/default/reviews/central".into(), export("central")),
            (
                "exports/default/ratings/west".into(),
                record(serde_json::json!("garbage")),
            ),
        ]);
        assert_eq!(exports.len(), 1);
        assert_eq!(
            export_key(&exports[0].namespace, &exports[0].name, &exports[0].cluster),
            "exports/default/ratings/central"
        );

        let cluster = |name: &str| {
            record(serde_json::json!({
                "name": name, "trustDomain": format!("{name}.isthmus.local"),
                "gateway": null, "caBundlePem": ""
            }))
        };
        let clusters = decode_clusters(vec![
            ("clusters/east".into(), cluster("east")),
            ("clusters/zzz".into(), cluster("west")),
        ]);
        assert_eq!(
            clusters.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            vec!["east"]
        );
    }
}
