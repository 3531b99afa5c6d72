//! The federation's status report (`isthmus status`): the member it is pointed at is asked
//! for the member table, then every member for its own view, so one unreachable member shows
//! up as such instead of failing the report. Lag is how far a member's applied index trails
//! the leader's commit index. The `Kv` API is reached through a control plane's TLS API port
//! (a member's peer port serves only the other members).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use isthmus_core::client::ControlClient;

use crate::{KvClient, RemoteStatus};

/// How long one member may take to answer.
const MEMBER_TIMEOUT: Duration = Duration::from_secs(3);

/// One member's row of `isthmus status`.
#[derive(Debug, Serialize)]
pub struct MemberRow {
    pub id: u64,
    /// The cluster whose control plane hosts it, when it has published its record.
    pub cluster: Option<String>,
    pub peer_addr: String,
    /// `voter` or `learner`.
    pub membership: &'static str,
    /// Its raft role, or `unreachable`.
    pub role: String,
    pub term: Option<u64>,
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    /// Leader's commit index minus this member's applied index.
    pub lag: Option<u64>,
    /// Why it could not be asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One leased record of `isthmus status`.
#[derive(Debug, Serialize)]
pub struct LeaseRow {
    pub key: String,
    pub expired: bool,
    pub expires_at_unix_ms: u64,
    /// Milliseconds until expiry (negative: since expiry), as of this command.
    pub remaining_ms: i64,
}

/// What `isthmus status` reports.
#[derive(Debug, Serialize)]
pub struct FederationStatus {
    pub leader: Option<u64>,
    pub term: u64,
    pub members: Vec<MemberRow>,
    pub leases: Vec<LeaseRow>,
}

/// Gathers the federation's status through the control plane `control` (the `Kv` API of its
/// member), then each other member through the control-plane API and CA its cluster
/// publishes, as the same operator.
pub async fn gather_status(control: &ControlClient) -> anyhow::Result<FederationStatus> {
    let addr = format!("the control plane at {}", control.addr());
    let mut client = KvClient::from_channel(control.channel());
    let own = client
        .status()
        .await
        .with_context(|| format!("asking {addr} for its status"))?;
    let (_, records) = client
        .list("", false)
        .await
        .with_context(|| format!("listing the records of {addr}"))?;
    let mut names = BTreeMap::new();
    // Member id -> its cluster's control-plane API and CA, as published.
    let mut controls: BTreeMap<u64, (String, String)> = BTreeMap::new();
    let mut leases = Vec::new();
    let now_ms = isthmus_core::clock::unix_ms();
    for (key, record) in &records {
        if let isthmus_core::keyspace::Key::Cluster { name } =
            isthmus_core::keyspace::Key::parse(key)
        {
            let value = serde_json::from_slice::<serde_json::Value>(&record.value).ok();
            let member = value
                .as_ref()
                .and_then(|v| v.get("memberId").and_then(|m| m.as_u64()));
            if let Some(id) = member {
                names.insert(id, name.to_string());
                let control = value.as_ref().and_then(|v| {
                    Some((
                        v.get("control")?.as_str()?.to_string(),
                        v.get("caBundlePem")?.as_str()?.to_string(),
                    ))
                });
                if let Some(c) = control {
                    controls.insert(id, c);
                }
            }
        }
        if let Some(lease) = &record.lease {
            leases.push(LeaseRow {
                key: key.clone(),
                expired: lease.expired,
                expires_at_unix_ms: lease.expires_at_unix_ms,
                remaining_ms: i64::try_from(lease.expires_at_unix_ms).unwrap_or(i64::MAX)
                    - i64::try_from(now_ms).unwrap_or(i64::MAX),
            });
        }
    }

    let asks = own.members.iter().map(|(id, peer)| {
        let (id, peer) = (*id, peer.clone());
        let own = own.clone();
        let published = controls.get(&id).cloned();
        async move {
            if id == own.id {
                return (id, peer, Ok(own));
            }
            let asked = async {
                let (addr, ca) = published.with_context(|| {
                    format!("member {id}'s cluster has not published its control plane")
                })?;
                // As the same operator (reads are allowed at every member's API).
                let mut c = KvClient::from_channel(control.elsewhere(&addr, &ca)?.channel());
                c.status().await.map_err(anyhow::Error::from)
            };
            let result = match tokio::time::timeout(MEMBER_TIMEOUT, asked).await {
                Ok(r) => r,
                Err(_) => Err(anyhow::anyhow!("no answer within {MEMBER_TIMEOUT:?}")),
            };
            (id, peer, result)
        }
    });
    let answers = futures::future::join_all(asks).await;
    Ok(assemble(&own, answers, &names, leases))
}

/// Builds the report from every member's answer (pure, for tests).
fn assemble(
    own: &RemoteStatus,
    answers: Vec<(u64, String, anyhow::Result<RemoteStatus>)>,
    names: &BTreeMap<u64, String>,
    leases: Vec<LeaseRow>,
) -> FederationStatus {
    let leader_status = answers
        .iter()
        .filter_map(|(_, _, r)| r.as_ref().ok())
        .filter(|s| s.role == "leader")
        .max_by_key(|s| s.term);
    let leader = leader_status.map(|s| s.id).or(own.leader_id);
    let leader_commit = leader_status.map(|s| s.commit_index);
    let term = answers
        .iter()
        .filter_map(|(_, _, r)| r.as_ref().ok().map(|s| s.term))
        .max()
        .unwrap_or(own.term);
    let members = answers
        .into_iter()
        .map(|(id, peer_addr, result)| {
            let membership = if own.learners.contains(&id) {
                "learner"
            } else {
                "voter"
            };
            let cluster = names.get(&id).cloned();
            match result {
                Ok(s) => MemberRow {
                    id,
                    cluster,
                    peer_addr,
                    membership,
                    role: s.role.clone(),
                    term: Some(s.term),
                    commit_index: Some(s.commit_index),
                    applied_index: Some(s.applied_index),
                    snapshot_index: Some(s.snapshot_index),
                    lag: leader_commit.map(|c| c.saturating_sub(s.applied_index)),
                    error: None,
                },
                Err(e) => MemberRow {
                    id,
                    cluster,
                    peer_addr,
                    membership,
                    role: "unreachable".to_string(),
                    term: None,
                    commit_index: None,
                    applied_index: None,
                    snapshot_index: None,
                    lag: None,
                    error: Some(format!("{e:#}")),
                },
            }
        })
        .collect();
    FederationStatus {
        leader,
        term,
        members,
        leases,
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// Renders the report as the table `isthmus status` prints.
pub fn render_table(s: &FederationStatus) -> String {
    let mut out = format!(
        "leader: {}   term: {}\n\n",
        s.leader
            .map_or_else(|| "none".to_string(), |l| l.to_string()),
        s.term
    );
    let mut rows = vec![[
        "ID".to_string(),
        "CLUSTER".to_string(),
        "PEER".to_string(),
        "VOTES".to_string(),
        "ROLE".to_string(),
        "TERM".to_string(),
        "COMMIT".to_string(),
        "APPLIED".to_string(),
        "SNAPSHOT".to_string(),
        "LAG".to_string(),
    ]];
    for m in &s.members {
        rows.push([
            m.id.to_string(),
            m.cluster.clone().unwrap_or_else(|| "-".to_string()),
            m.peer_addr.clone(),
            m.membership.to_string(),
            m.role.clone(),
            opt(m.term),
            opt(m.commit_index),
            opt(m.applied_index),
            opt(m.snapshot_index),
            opt(m.lag),
        ]);
    }
    out.push_str(&columns(&rows));
    for m in &s.members {
        if let Some(e) = &m.error {
            out.push_str(&format!("member {}: {e}\n", m.id));
        }
    }
    if s.leases.is_empty() {
        out.push_str("\nleases: none\n");
    } else {
        out.push_str("\nleases:\n");
        let mut rows = vec![[
            "KEY".to_string(),
            "STATE".to_string(),
            "EXPIRES".to_string(),
        ]];
        for l in &s.leases {
            let state = if l.expired { "expired" } else { "live" };
            let when = if l.remaining_ms >= 0 {
                format!("in {} ms", l.remaining_ms)
            } else {
                format!("{} ms ago", -l.remaining_ms)
            };
            rows.push([l.key.clone(), state.to_string(), when]);
        }
        out.push_str(&columns(&rows));
    }
    out
}

fn columns<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, role: &str, term: u64, commit: u64, applied: u64) -> RemoteStatus {
        RemoteStatus {
            id,
            role: role.to_string(),
            leader_id: Some(1),
            term,
            commit_index: commit,
            applied_index: applied,
            members: vec![],
            voters: vec![1, 2, 3],
            learners: vec![4],
            rejected_peer_batches: 0,
            snapshot_index: 0,
        }
    }

    #[test]
    fn lag_is_measured_against_the_leaders_commit_and_unreachable_members_are_shown() {
        let own = member(2, "follower", 5, 100, 98);
        let answers = vec![
            (1, "a:1".to_string(), Ok(member(1, "leader", 5, 100, 100))),
            (2, "a:2".to_string(), Ok(own.clone())),
            (3, "a:3".to_string(), Err(anyhow::anyhow!("refused"))),
            (4, "a:4".to_string(), Ok(member(4, "follower", 5, 90, 90))),
        ];
        let names = BTreeMap::from([(1, "east".to_string())]);
        let report = assemble(&own, answers, &names, vec![]);
        assert_eq!(report.leader, Some(1));
        assert_eq!(report.term, 5);
        let lags: Vec<Option<u64>> = report.members.iter().map(|m| m.lag).collect();
        assert_eq!(lags, vec![Some(0), Some(2), None, Some(10)]);
        assert_eq!(report.members[2].role, "unreachable");
        assert_eq!(report.members[3].membership, "learner");
        assert_eq!(report.members[0].cluster.as_deref(), Some("east"));
        let table = render_table(&report);
        assert!(table.contains("leader: 1   term: 5"), "{table}");
        assert!(table.contains("member 3: refused"), "{table}");
    }
}
