//! `isthmus status` and `isthmus cluster token|join|remove`: the federation store's members,
//! through the `Kv` API every member serves on its federation (peer) port, or (with
//! `--control`) on its control plane's TLS API port (docs/control-api.md). The status report
//! itself is `isthmus_federation::status`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use isthmus_federation::status::{gather_status_via, render_table, Via};

/// The federation member the CLI talks to when `--federation` is not given.
pub const DEFAULT_FEDERATION: &str = "127.0.0.1:15017";

/// `--control` (with its CA) when given, else the federation peer address.
pub fn via(
    federation: Option<String>,
    control: &crate::policy_cmd::ControlArgs,
) -> anyhow::Result<Via> {
    if control.control.is_some() || control.context.is_some() {
        if federation.is_some() {
            bail!("give --control (or --context) or --federation, not both");
        }
        return Ok(Via::Control(control.client()?));
    }
    if federation.is_some() || std::env::var_os("ISTHMUS_FEDERATION").is_some() {
        return Ok(Via::Peer(federation_addr(federation)?));
    }
    // No address given: the environment's control plane, or the current context's.
    if control.target()?.is_some() {
        return Ok(Via::Control(control.client()?));
    }
    Ok(Via::Peer(federation_addr(None)?))
}

/// `--federation`, else `$ISTHMUS_FEDERATION`, else the default.
pub fn federation_addr(flag: Option<String>) -> anyhow::Result<SocketAddr> {
    let addr = flag
        .or_else(|| std::env::var("ISTHMUS_FEDERATION").ok())
        .unwrap_or_else(|| DEFAULT_FEDERATION.to_string());
    addr.parse().with_context(|| {
        format!("--federation: {addr:?} is not an address such as 127.0.0.1:15017")
    })
}

/// Output formats of `isthmus status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusOutput {
    Table,
    Json,
}

/// `isthmus status [-o table|json]`.
pub async fn status(via: &Via, output: StatusOutput) -> anyhow::Result<()> {
    let report = gather_status_via(via).await?;
    match output {
        StatusOutput::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        StatusOutput::Table => print!("{}", render_table(&report)),
    }
    Ok(())
}

/// `isthmus cluster token [--ttl D]`: prints a one-time join token.
pub async fn token(via: &Via, ttl: Duration) -> anyhow::Result<()> {
    if ttl.is_zero() {
        bail!("--ttl: a join token must be valid for longer than zero");
    }
    let token = via
        .kv()
        .await?
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

/// `isthmus cluster join --token T --id N --peer-addr A --cluster C --trust-domain TD
/// --bundle-file CA`: admits a cluster and adds its member (start its control plane with
/// `federation.join: true` first; it catches up from the leader). The federation records the
/// cluster's trust domain and CA bundle, by which its members authenticate the new one.
pub async fn join(
    via: &Via,
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
    let (revision, voter) = via
        .kv()
        .await?
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
pub async fn remove(via: &Via, name: &str) -> anyhow::Result<()> {
    let mut client = via.kv().await?;
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
