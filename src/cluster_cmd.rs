//! `isthmus status`, `isthmus records` and `isthmus cluster
//! token|join|remove|grant-policies|revoke-policies`: the federation store's members, its
//! records and who wrote them, and what members may write,
//! through the `Kv` API a member serves on its control plane's TLS API port (`--control` or a
//! context; docs/control-api.md). A member's federation (peer) port serves only the other
//! members. The status report itself is `isthmus_federation::status`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use isthmus_core::client::ControlClient;
use isthmus_federation::status::{gather_status, render_table};
use isthmus_federation::KvClient;

/// The `Kv` API of the member hosted by the control plane `control`.
fn kv(control: &ControlClient) -> KvClient {
    KvClient::from_channel(control.channel())
}

/// Output formats of `isthmus status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusOutput {
    Table,
    Json,
}

/// `isthmus status [-o table|json]`.
pub async fn status(control: &ControlClient, output: StatusOutput) -> anyhow::Result<()> {
    let report = gather_status(control).await?;
    match output {
        StatusOutput::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        StatusOutput::Table => print!("{}", render_table(&report)),
    }
    Ok(())
}

/// `isthmus cluster token [--ttl D]`: prints a one-time join token.
pub async fn token(control: &ControlClient, ttl: Duration) -> anyhow::Result<()> {
    if ttl.is_zero() {
        bail!("--ttl: a join token must be valid for longer than zero");
    }
    let token = kv(control)
        .mint_join_token(ttl)
        .await
        .context("minting a join token")?;
    println!("{token}");
    eprintln!(
        "one-time join token, valid for {}; give it to `isthmus cluster join --token ...`",
        humanize(ttl)
    );
    Ok(())
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{d:?}")
    }
}

/// The joining cluster's `--cluster`, `--trust-domain` and `--bundle-file` (clap makes sure
/// they come together).
pub fn claim(
    cluster: Option<String>,
    trust_domain: Option<String>,
    bundle_file: Option<std::path::PathBuf>,
) -> anyhow::Result<Option<isthmus_federation::ClusterClaim>> {
    let (Some(name), Some(trust_domain), Some(file)) = (cluster, trust_domain, bundle_file) else {
        return Ok(None);
    };
    let ca_bundle_pem = std::fs::read_to_string(&file)
        .with_context(|| format!("--bundle-file: reading {}", file.display()))?;
    Ok(Some(isthmus_federation::ClusterClaim {
        name,
        trust_domain,
        ca_bundle_pem,
    }))
}

/// Where `isthmus cluster join` sends the token.
pub enum JoinThrough {
    /// A control plane's API, trusted through `--ca-file` (or a context).
    Control(ControlClient),
    /// `--via ADDR`: any member's peer port or control plane, verified against the token's
    /// digest first (`isthmus_control::join::verified_federation`).
    Via(String),
}

/// `isthmus cluster join --token T --id N --peer-addr A --cluster C --trust-domain TD
/// --bundle-file CA (--via ADDR | --control ADDR --ca-file F)`: admits a cluster and adds its
/// member (start its control plane with `federation.join: true` first; it catches up from the
/// leader). The federation records the cluster's trust domain and CA bundle, by which its
/// members authenticate the new one.
pub async fn join(
    through: &JoinThrough,
    token: &str,
    id: u64,
    peer: SocketAddr,
    cluster: Option<isthmus_federation::ClusterClaim>,
) -> anyhow::Result<()> {
    if id == 0 {
        bail!("--id: 0 is not a valid member id (ids start at 1)");
    }
    let application = isthmus_federation::JoinApplication {
        id,
        peer_addr: peer,
        cluster,
    };
    let mut client = match through {
        JoinThrough::Control(control) => kv(control),
        JoinThrough::Via(via) => isthmus_control::join::verified_federation(via, token).await?,
    };
    let (revision, voter) = client
        .join(token, &application)
        .await
        .with_context(|| format!("joining member {id} ({peer})"))?;
    let role = if voter {
        "a voter"
    } else {
        "a learner (five members already vote; it is promoted when a voter leaves)"
    };
    println!("member {id} ({peer}) joined as {role} at revision {revision}");
    Ok(())
}

/// `isthmus cluster remove NAME`: NAME is a cluster name (found through its published
/// record) or a member id.
pub async fn remove(control: &ControlClient, name: &str) -> anyhow::Result<()> {
    let mut client = kv(control);
    let id = match name.parse::<u64>() {
        Ok(id) => id,
        Err(_) => {
            let key = isthmus_core::keyspace::cluster(name);
            let record = client
                .get(&key, true)
                .await
                .with_context(|| format!("looking up cluster {name}"))?
                .with_context(|| format!("no cluster named {name:?} in the federation"))?;
            serde_json::from_slice::<serde_json::Value>(&record.value)
                .ok()
                .and_then(|v| v.get("memberId").and_then(|m| m.as_u64()))
                .with_context(|| {
                    format!("cluster {name:?} has not published its member id; remove it by id")
                })?
        }
    };
    let revision = client
        .remove_member(id)
        .await
        .with_context(|| format!("removing member {id}"))?;
    println!("member {id} ({name}) removed at revision {revision}");
    Ok(())
}

/// `isthmus cluster grant-policies NAME`: lets cluster NAME's control plane write mesh-wide
/// policies from its Kubernetes resources (`grants/policy-writer/NAME`; a mesh admin's
/// write, checked again on apply by every replica). `revoke` removes the grant: the policies
/// already written stay until deleted.
pub async fn policy_writer(control: &ControlClient, name: &str, grant: bool) -> anyhow::Result<()> {
    isthmus_core::identity::validate_label("cluster", name)?;
    let mut client = kv(control);
    let key = isthmus_core::keyspace::policy_writer_grant(name);
    if grant {
        client
            .get(&isthmus_core::keyspace::cluster(name), true)
            .await
            .with_context(|| format!("looking up cluster {name}"))?
            .with_context(|| format!("no cluster named {name:?} in the federation"))?;
        let value = serde_json::json!({
            "cluster": name,
            "grantedAtMs": isthmus_core::clock::unix_ms(),
        });
        let revision = client
            .put(&key, value.to_string().into_bytes())
            .await
            .with_context(|| format!("granting {name} the policy writer's right ({key})"))?;
        println!("cluster {name} may now write mesh-wide policies from its Kubernetes (revision {revision})");
    } else {
        let revision = client
            .delete(&key)
            .await
            .with_context(|| format!("revoking {name}'s policy writer's right ({key})"))?;
        println!("cluster {name} may no longer write mesh-wide policies (revision {revision}); those it wrote stay until deleted");
    }
    Ok(())
}

/// `isthmus records [PREFIX] [--values]`: every record under PREFIX, linearizable, with its
/// revision and who wrote it.
pub async fn records(control: &ControlClient, prefix: &str, values: bool) -> anyhow::Result<()> {
    let (revision, records) = kv(control)
        .list(prefix, true)
        .await
        .with_context(|| format!("listing the records under {prefix:?}"))?;
    let width = records
        .iter()
        .map(|(k, _)| k.len())
        .max()
        .unwrap_or(3)
        .max(3);
    println!("{:<width$}  {:>8}  WRITTEN BY", "KEY", "REVISION");
    for (key, record) in &records {
        let writer = record
            .writer
            .as_ref()
            .map_or("(not recorded)".to_string(), ToString::to_string);
        println!("{key:<width$}  {:>8}  {writer}", record.revision);
        if values {
            println!("    {}", String::from_utf8_lossy(&record.value));
        }
    }
    eprintln!("{} records at revision {revision}", records.len());
    Ok(())
}
