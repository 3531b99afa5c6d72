//! `isthmus_cluster`: one cluster's membership of the federation, what `isthmus cluster
//! token` + `isthmus cluster join` do, and `isthmus cluster remove` on destroy.
//!
//! Create consumes a one-time join token (`join_token`, or one the provider mints through its
//! federation member) to add the cluster's federation member (`member_id` at
//! `peer_address`; its control plane runs with `federation.join: true`), then waits until
//! that control plane has published its `clusters/<name>` record. `locality` and
//! `gateway_address` come from the cluster's own control-plane configuration: given here,
//! they are what the record must show (create and update wait for it, e.g. while a Helm
//! upgrade rolls out); left out, they are read from it. A member removed outside Terraform
//! shows as gone (the plan creates it again). Import ID: the cluster name.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use isthmus_control::records::{cluster_key, ClusterRecord};
use isthmus_federation::{KvClient, RemoteStatus};

use crate::contract::{Conn, Failure, Planned, Resource};
use crate::cty::{Type, Value};
use crate::diag::{Diag, Diags};
use crate::resources::{changed, known_str};
use crate::schema::{Attr, Block};

pub struct ClusterResource;

/// How long a minted join token stays valid.
const TOKEN_TTL: Duration = Duration::from_secs(600);
/// How long create and update wait for the cluster to publish the expected record.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(90);

const COMPUTED: [&str; 2] = ["voter", "control_address"];

fn federation_error(what: &str, e: impl std::fmt::Display) -> Diags {
    vec![Diag::error(format!("{what} failed"), e.to_string())]
}

/// Checks the attributes that are known (offline).
fn check(config: &Value) -> Diags {
    let mut diags = Vec::new();
    if let Some(name) = known_str(config, "name") {
        if isthmus_core::identity::validate_label("name", name).is_err() {
            diags.push(
                Diag::error(
                    "Invalid name",
                    format!("{name:?} is not a cluster name (lowercase letters, digits and '-', at most 63)"),
                )
                .at("name"),
            );
        }
    }
    if let Some(id) = config.get("member_id").as_f64() {
        if id < 1.0 || id.fract() != 0.0 || id > 9.0e15 {
            diags.push(
                Diag::error(
                    "Invalid member_id",
                    format!("{id} is not a federation member id (a whole number from 1; the control plane's federation.nodeId)"),
                )
                .at("member_id"),
            );
        }
    }
    for attr in ["peer_address", "gateway_address"] {
        if let Some(addr) = known_str(config, attr) {
            if addr.parse::<SocketAddr>().is_err() {
                diags.push(
                    Diag::error(
                        format!("Invalid {attr}"),
                        format!("{addr:?} is not ip:port, e.g. 10.0.0.7:15017"),
                    )
                    .at(attr),
                );
            }
        }
    }
    if let Some(locality) = known_str(config, "locality") {
        let ok = match locality.split_once('/') {
            Some((region, zone)) => !region.is_empty() && !zone.is_empty() && !zone.contains('/'),
            None => !locality.is_empty(),
        };
        if !ok {
            diags.push(
                Diag::error(
                    "Invalid locality",
                    format!("{locality:?} is not region/zone, e.g. us-east-1/a"),
                )
                .at("locality"),
            );
        }
    }
    if let Some("") = known_str(config, "join_token") {
        diags.push(
            Diag::error(
                "Invalid join_token",
                "an empty join token: leave join_token out and the provider mints one",
            )
            .at("join_token"),
        );
    }
    diags
}

fn member_id(v: &Value) -> u64 {
    // Terraform numbers are f64; a member id is a whole number (anything else reads as 0,
    // which is no member).
    v.get("member_id")
        .as_f64()
        .filter(|n| n.fract() == 0.0 && (0.0..=9.0e15).contains(n))
        .map_or(0, |n| {
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "checked above: a whole number in [0, 2^53)"
            )]
            let id = n as u64;
            id
        })
}

async fn record(kv: &mut KvClient, name: &str) -> Result<Option<ClusterRecord>, Diags> {
    let found = kv
        .get(&cluster_key(name), false)
        .await
        .map_err(|e| federation_error("Reading the cluster record", e))?;
    Ok(found.and_then(|r| serde_json::from_slice(&r.value).ok()))
}

/// The state for member `id` of `status` and the cluster's record (if published yet).
fn state_of(base: &Value, status: &RemoteStatus, id: u64, rec: Option<&ClusterRecord>) -> Value {
    let mut v = base.clone();
    let name = base.get("name").as_str().unwrap_or_default().to_string();
    v.set("id", Value::str(name));
    v.set("member_id", Value::Number(id as f64));
    if let Some((_, addr)) = status.members.iter().find(|(m, _)| *m == id) {
        // Keep the configuration's spelling of the same address.
        let same = known_str(base, "peer_address")
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .is_some_and(|a| addr.parse::<SocketAddr>().ok() == Some(a));
        if !same {
            v.set("peer_address", Value::str(addr.clone()));
        }
    }
    v.set("voter", Value::Bool(!status.learners.contains(&id)));
    match rec {
        Some(r) => {
            v.set("locality", Value::opt_str(r.locality.clone()));
            v.set(
                "gateway_address",
                Value::opt_str(r.gateway.map(|g| g.to_string())),
            );
            v.set("trust_domain", Value::str(r.trust_domain.clone()));
            v.set("trust_bundle", Value::str(r.ca_bundle_pem.clone()));
            v.set(
                "control_address",
                Value::opt_str(r.control.map(|c| c.to_string())),
            );
        }
        None => {
            for attr in [
                "locality",
                "gateway_address",
                "trust_domain",
                "trust_bundle",
            ] {
                if v.get(attr).is_unknown() {
                    v.set(attr, Value::Null);
                }
            }
            for attr in COMPUTED {
                if v.get(attr).is_unknown() {
                    v.set(attr, Value::Null);
                }
            }
        }
    }
    if v.get("join_token").is_unknown() {
        v.set("join_token", Value::Null);
    }
    v
}

/// Why a record does not (yet) match what the configuration expects, by attribute.
fn mismatches(
    planned: &Value,
    id: u64,
    rec: Option<&ClusterRecord>,
) -> Vec<(&'static str, String)> {
    let name = planned.get("name").as_str().unwrap_or_default();
    let Some(rec) = rec else {
        return vec![(
            "name",
            format!(
                "cluster {name:?} has not published its record (clusters/{name}): is its control \
                 plane running, with cluster: {name}, federation.nodeId: {id} and federation.join: true?"
            ),
        )];
    };
    let mut out = Vec::new();
    if rec.member_id != Some(id) {
        out.push((
            "member_id",
            format!(
                "cluster {name:?} publishes member id {:?}, not {id}",
                rec.member_id
            ),
        ));
    }
    if let Some(want) = planned.get("locality").as_str() {
        if rec.locality.as_deref() != Some(want) {
            out.push((
                "locality",
                format!(
                    "cluster {name:?} publishes locality {:?}; this configuration expects {want:?}. \
                     The locality comes from the cluster's control-plane configuration (locality:)",
                    rec.locality
                ),
            ));
        }
    }
    if let Some(want) = planned.get("gateway_address").as_str() {
        let have = rec.gateway.map(|g| g.to_string());
        if have.as_deref() != Some(want) {
            out.push((
                "gateway_address",
                format!(
                    "cluster {name:?} publishes gateway address {have:?}; this configuration expects \
                     {want:?}. It comes from the cluster's control-plane configuration (gatewayAddress:)"
                ),
            ));
        }
    }
    out
}

/// Waits until the cluster's record matches `planned`; returns the final state either way.
async fn converge(kv: &mut KvClient, planned: &Value, id: u64) -> Result<Value, Failure> {
    let name = planned.get("name").as_str().unwrap_or_default().to_string();
    let deadline = tokio::time::Instant::now() + PUBLISH_TIMEOUT;
    loop {
        let rec = record(kv, &name).await?;
        let status = kv
            .status()
            .await
            .map_err(|e| federation_error("Reading the federation's members", e))?;
        let problems = mismatches(planned, id, rec.as_ref());
        let state = state_of(planned, &status, id, rec.as_ref());
        if problems.is_empty() {
            return Ok(state);
        }
        if tokio::time::Instant::now() >= deadline {
            let diags = problems
                .into_iter()
                .map(|(attr, detail)| {
                    Diag::error(
                        format!("The cluster did not converge within {PUBLISH_TIMEOUT:?}"),
                        detail,
                    )
                    .at(attr)
                })
                .collect();
            return Err(Failure {
                state: Some(state),
                diags,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tonic::async_trait]
impl Resource for ClusterResource {
    fn type_name(&self) -> &'static str {
        "isthmus_cluster"
    }

    fn schema(&self) -> Block {
        Block::new(
            "A cluster's membership of the federation (isthmus cluster join / remove).",
            vec![
                Attr::computed("id", Type::String, "The cluster name."),
                Attr::required("name", Type::String, "The cluster's name (its control plane's cluster:)."),
                Attr::required("member_id", Type::Number, "Its federation member id (federation.nodeId)."),
                Attr::required("peer_address", Type::String, "Where the other members reach its federation port, ip:port."),
                Attr::optional_computed("join_token", Type::String, "A one-time join token (isthmus cluster token); minted by the provider when left out.").sensitive(),
                Attr::optional_computed("locality", Type::String, "region/zone the cluster must publish; read from it when left out."),
                Attr::optional_computed("gateway_address", Type::String, "The east-west gateway address the cluster must publish; read from it when left out."),
                Attr::computed("voter", Type::Bool, "Whether its member votes (false: a learner)."),
                Attr::optional_computed("trust_domain", Type::String, "The cluster's SPIFFE trust domain (its control plane's trustDomain); recorded when it joins, so the members authenticate it. Read from the cluster when left out."),
                Attr::optional_computed("trust_bundle", Type::String, "The cluster CA's certificates, PEM (its control plane's <dataDir>/ca.pem); recorded with trust_domain when it joins. Read from the cluster when left out."),
                Attr::computed("control_address", Type::String, "Its control plane's gRPC address, when published."),
            ],
        )
    }

    fn validate(&self, config: &Value) -> Diags {
        check(config)
    }

    fn plan(&self, prior: Option<&Value>, mut proposed: Value) -> Result<Planned, Diags> {
        let diags = check(&proposed);
        if !diags.is_empty() {
            return Err(diags);
        }
        proposed.set("id", proposed.get("name").clone());
        let requires_replace = changed(prior, &proposed, &["name", "member_id", "peer_address"]);
        if prior.is_none() || !requires_replace.is_empty() {
            for attr in [
                "join_token",
                "locality",
                "gateway_address",
                "trust_domain",
                "trust_bundle",
            ] {
                if proposed.get(attr).is_null() {
                    proposed.set(attr, Value::Unknown);
                }
            }
            for attr in COMPUTED {
                proposed.set(attr, Value::Unknown);
            }
        }
        Ok(Planned {
            state: proposed,
            requires_replace,
        })
    }

    async fn create(&self, conn: &Conn, planned: &Value) -> Result<Value, Failure> {
        let mut kv = conn.kv().await?;
        let id = member_id(planned);
        let peer: SocketAddr = known_str(planned, "peer_address")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| Diag::error("Invalid peer_address", "not ip:port").at("peer_address"))?;
        let token = match known_str(planned, "join_token") {
            Some(t) => t.to_string(),
            None => kv
                .mint_join_token(TOKEN_TTL)
                .await
                .map_err(|e| federation_error("Minting a join token", e))?,
        };
        // A federation whose members authenticate each other admits a cluster with its
        // trust domain and CA bundle only.
        let cluster = match (
            known_str(planned, "trust_domain"),
            known_str(planned, "trust_bundle"),
        ) {
            (Some(trust_domain), Some(bundle)) => Some(isthmus_federation::ClusterClaim {
                name: known_str(planned, "name").unwrap_or_default().to_string(),
                trust_domain: trust_domain.to_string(),
                ca_bundle_pem: bundle.to_string(),
            }),
            _ => None,
        };
        let application = isthmus_federation::JoinApplication {
            id,
            peer_addr: peer,
            cluster,
        };
        kv.join(&token, &application).await.map_err(|e| {
            let d = Diag::error(
                "Joining the federation failed",
                format!("member {id} at {peer}: {e}"),
            );
            if e.to_string().contains("token") {
                d.at("join_token")
            } else {
                d
            }
        })?;
        let mut planned = planned.clone();
        planned.set("join_token", Value::str(token));
        converge(&mut kv, &planned, id).await
    }

    async fn update(&self, conn: &Conn, _prior: &Value, planned: &Value) -> Result<Value, Failure> {
        let mut kv = conn.kv().await?;
        converge(&mut kv, planned, member_id(planned)).await
    }

    async fn delete(&self, conn: &Conn, prior: &Value) -> Result<(), Diags> {
        let mut kv = conn.kv().await?;
        let id = member_id(prior);
        let status = kv
            .status()
            .await
            .map_err(|e| federation_error("Reading the federation's members", e))?;
        if !status.members.iter().any(|(m, _)| *m == id) {
            return Ok(());
        }
        kv.remove_member(id)
            .await
            .map_err(|e| federation_error(&format!("Removing member {id}"), e))?;
        Ok(())
    }

    async fn read(&self, conn: &Conn, state: &Value) -> Result<Option<Value>, Diags> {
        let mut kv = conn.kv().await?;
        let id = member_id(state);
        let status = kv
            .status()
            .await
            .map_err(|e| federation_error("Reading the federation's members", e))?;
        if !status.members.iter().any(|(m, _)| *m == id) {
            return Ok(None);
        }
        let name = state.get("name").as_str().unwrap_or_default().to_string();
        let rec = record(&mut kv, &name).await?;
        Ok(Some(state_of(state, &status, id, rec.as_ref())))
    }

    async fn import(&self, conn: &Conn, id: &str) -> Result<Value, Diags> {
        let mut kv = conn.kv().await?;
        let Some(rec) = record(&mut kv, id).await? else {
            return Err(vec![Diag::error(
                "Cannot import a cluster that has not joined",
                format!("the federation has no record clusters/{id}"),
            )]);
        };
        let Some(member) = rec.member_id else {
            return Err(vec![Diag::error(
                "Cannot import this cluster",
                format!("cluster {id:?} has not published its federation member id"),
            )]);
        };
        let status = kv
            .status()
            .await
            .map_err(|e| federation_error("Reading the federation's members", e))?;
        if !status.members.iter().any(|(m, _)| *m == member) {
            return Err(vec![Diag::error(
                "Cannot import a cluster that is not a member",
                format!(
                    "cluster {id:?} published member id {member}, which is not in the federation"
                ),
            )]);
        }
        let base = Value::Object(BTreeMap::from([("name".to_string(), Value::str(id))]));
        Ok(state_of(&base, &status, member, Some(&rec)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Value {
        let mut v = Value::Object(BTreeMap::new());
        v.set("name", Value::str("north"));
        v.set("member_id", Value::Number(4.0));
        v.set("peer_address", Value::str("127.0.0.1:7000"));
        v
    }

    #[test]
    fn bad_attributes_are_named() {
        let mut v = config();
        v.set("name", Value::str("North"));
        v.set("member_id", Value::Number(0.0));
        v.set("peer_address", Value::str("localhost"));
        v.set("locality", Value::str("us/east/1"));
        let paths: Vec<String> = check(&v).iter().map(Diag::path_string).collect();
        assert_eq!(paths, ["name", "member_id", "peer_address", "locality"]);
        assert!(check(&config()).is_empty());
    }

    #[test]
    fn a_create_leaves_what_the_cluster_publishes_unknown_and_a_move_replaces() {
        let planned = ClusterResource.plan(None, config()).unwrap().state;
        assert!(planned.get("locality").is_unknown());
        assert!(planned.get("join_token").is_unknown());
        assert_eq!(planned.get("id").as_str(), Some("north"));
        let mut prior = planned.clone();
        prior.set("locality", Value::str("us-east-1/a"));
        prior.set("gateway_address", Value::str("127.0.0.1:15443"));
        for attr in ["join_token"].into_iter().chain(COMPUTED) {
            prior.set(attr, Value::str("x"));
        }
        let mut moved = prior.clone();
        moved.set("peer_address", Value::str("127.0.0.1:7001"));
        let plan = ClusterResource.plan(Some(&prior), moved).unwrap();
        assert_eq!(plan.requires_replace, vec!["peer_address"]);
        let same = ClusterResource.plan(Some(&prior), prior.clone()).unwrap();
        assert_eq!(same.state, prior);
    }

    #[test]
    fn a_record_that_differs_from_the_configuration_is_explained_by_attribute() {
        let mut planned = config();
        planned.set("locality", Value::str("eu-west-1/a"));
        let rec = ClusterRecord {
            name: "north".into(),
            trust_domain: "north.isthmus.local".into(),
            gateway: None,
            ca_bundle_pem: String::new(),
            locality: Some("us-east-1/a".into()),
            member_id: Some(4),
            control: None,
        };
        let problems = mismatches(&planned, 4, Some(&rec));
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].0, "locality");
        assert!(problems[0].1.contains("us-east-1/a"));
        assert_eq!(mismatches(&planned, 4, None)[0].0, "name");
    }
}
