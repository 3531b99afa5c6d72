//! `data "isthmus_federation"`: the federation's members (as `isthmus status` shows them)
//! and every member cluster's published record, with the mesh-wide trust bundle.

use std::collections::BTreeMap;

use isthmus_control::records::{decode_clusters, ClusterRecord, CLUSTERS_PREFIX};

use crate::contract::{Conn, DataSource};
use crate::cty::{Type, Value};
use crate::diag::{Diag, Diags};
use crate::schema::{Attr, Block};

pub struct FederationData;

fn member_type() -> Type {
    Type::object([
        ("id", Type::Number),
        ("peer_address", Type::String),
        ("voter", Type::Bool),
        ("cluster", Type::String),
    ])
}

fn cluster_type() -> Type {
    Type::object([
        ("name", Type::String),
        ("member_id", Type::Number),
        ("trust_domain", Type::String),
        ("locality", Type::String),
        ("gateway_address", Type::String),
        ("control_address", Type::String),
        ("trust_bundle", Type::String),
    ])
}

fn cluster_value(r: &ClusterRecord) -> Value {
    Value::Object(BTreeMap::from([
        ("name".to_string(), Value::str(r.name.clone())),
        (
            "member_id".to_string(),
            r.member_id.map_or(Value::Null, |m| Value::Number(m as f64)),
        ),
        (
            "trust_domain".to_string(),
            Value::str(r.trust_domain.clone()),
        ),
        ("locality".to_string(), Value::opt_str(r.locality.clone())),
        (
            "gateway_address".to_string(),
            Value::opt_str(r.gateway.map(|g| g.to_string())),
        ),
        (
            "control_address".to_string(),
            Value::opt_str(r.control.map(|c| c.to_string())),
        ),
        (
            "trust_bundle".to_string(),
            Value::str(r.ca_bundle_pem.clone()),
        ),
    ]))
}

/// The PEM bundles of every cluster, in name order, each ending in a newline.
pub fn mesh_bundle(records: &[ClusterRecord]) -> String {
    let mut out = String::new();
    for r in records {
        out.push_str(r.ca_bundle_pem.trim_end());
        out.push('\n');
    }
    out
}

#[tonic::async_trait]
impl DataSource for FederationData {
    fn type_name(&self) -> &'static str {
        "isthmus_federation"
    }

    fn schema(&self) -> Block {
        Block::new(
            "The federation: members, leader and the member clusters' records.",
            vec![
                Attr::optional(
                    "linearizable",
                    Type::Bool,
                    "Read through the leader (default false: the member's replica).",
                ),
                Attr::computed(
                    "leader_id",
                    Type::Number,
                    "The leader's member id, when there is one.",
                ),
                Attr::computed("term", Type::Number, "The raft term."),
                Attr::computed(
                    "members",
                    Type::list(member_type()),
                    "Every member: id, peer_address, voter, cluster.",
                ),
                Attr::computed(
                    "clusters",
                    Type::list(cluster_type()),
                    "Every cluster's published record, by name.",
                ),
                Attr::computed(
                    "trust_bundle",
                    Type::String,
                    "Every member cluster's CA certificates, PEM, in name order.",
                ),
            ],
        )
    }

    fn validate(&self, _config: &Value) -> Diags {
        Vec::new()
    }

    async fn read(&self, conn: &Conn, config: &Value) -> Result<Value, Diags> {
        let mut kv = conn.kv().await?;
        let linearizable = config.get("linearizable").as_bool().unwrap_or(false);
        let fail = |what: &str, e: isthmus_federation::StoreError| {
            vec![Diag::error(format!("{what} failed"), e.to_string())]
        };
        let status = kv
            .status()
            .await
            .map_err(|e| fail("Reading the federation's status", e))?;
        let (_, records) = kv
            .list(CLUSTERS_PREFIX, linearizable)
            .await
            .map_err(|e| fail("Listing the cluster records", e))?;
        let clusters: Vec<ClusterRecord> = decode_clusters(records);
        let members = status
            .members
            .iter()
            .map(|(id, peer)| {
                let cluster = clusters
                    .iter()
                    .find(|c| c.member_id == Some(*id))
                    .map(|c| c.name.clone());
                Value::Object(BTreeMap::from([
                    ("id".to_string(), Value::Number(*id as f64)),
                    ("peer_address".to_string(), Value::str(peer.clone())),
                    (
                        "voter".to_string(),
                        Value::Bool(!status.learners.contains(id)),
                    ),
                    ("cluster".to_string(), Value::opt_str(cluster)),
                ]))
            })
            .collect();
        let mut state = config.clone();
        state.set(
            "leader_id",
            status
                .leader_id
                .map_or(Value::Null, |l| Value::Number(l as f64)),
        );
        state.set("term", Value::Number(status.term as f64));
        state.set("members", Value::List(members));
        state.set(
            "clusters",
            Value::List(clusters.iter().map(cluster_value).collect()),
        );
        state.set("trust_bundle", Value::str(mesh_bundle(&clusters)));
        Ok(state)
    }
}
