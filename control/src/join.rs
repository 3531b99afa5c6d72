//! Joining a running federation (docs/security.md §5): the joiner's side, used by `isthmus
//! cluster join --via` and by a control plane whose config carries `federation.joinWith`
//! (it joins itself at start).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use isthmus_federation::KvClient;

/// A joiner's discovery (docs/security.md §5): asks `via` for the federation's bundle set
/// over a connection that trusts nothing yet, checks that the set hashes to the digest the
/// token carries, and only then returns a client of `via` that accepts nothing but a member
/// control plane's certificate from that set. A server that fails either check never sees
/// the token.
pub async fn verified_federation(via: &str, token: &str) -> anyhow::Result<KvClient> {
    use isthmus_core::api_tls;
    let expected = isthmus_federation::federation_digest(token).context(
        "--token carries no digest of the federation's bundle set (<id>.<secret>.<digest>): \
         mint one with `isthmus cluster token`, or join through --control with --ca-file",
    )?;
    let unverified = api_tls::discovery_client_config().context("a TLS client")?;
    let channel = api_tls::channel(via, std::sync::Arc::new(unverified))
        .map_err(|e| anyhow::anyhow!("--via: {e}"))?;
    let set = KvClient::from_channel(channel)
        .join_info()
        .await
        .with_context(|| format!("asking {via} for the federation's bundle set"))?;
    let found =
        isthmus_core::join::digest(&set).with_context(|| format!("the bundle set {via} sent"))?;
    if found != expected.to_ascii_lowercase() {
        bail!(
            "{via} is not the federation this token was minted for: its bundle set (clusters \
             {}) hashes to {found}, the token expects {expected}. The token was not sent. A \
             cluster that joined or rotated its CA since the token was minted changes the set: \
             mint a new token",
            set.iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let bundles = isthmus_core::tls::TrustBundles::new();
    bundles
        .replace(
            set.iter()
                .map(|e| (e.trust_domain.as_str(), e.ca_bundle_pem.as_str())),
        )
        .with_context(|| format!("the bundle set {via} sent"))?;
    let verified = api_tls::client_config_for_bundles(bundles).context("a TLS client")?;
    let channel = api_tls::channel(via, std::sync::Arc::new(verified))
        .map_err(|e| anyhow::anyhow!("--via: {e}"))?;
    Ok(KvClient::from_channel(channel))
}

/// What a control plane needs to join itself: `federation.joinWith` in its config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinWith {
    /// A file holding the one-time join token (`isthmus cluster token`), e.g. a mounted
    /// Secret; read at start.
    pub token_file: PathBuf,
    /// Any member's federation (peer) or control-plane address: the federation is verified
    /// against the token's digest before the token is sent.
    pub via: String,
}

/// How long a control plane keeps trying to reach the federation it joins.
const JOIN_PATIENCE: Duration = Duration::from_secs(60);

/// Joins this member to the federation `join` names, as `isthmus cluster join --via` would:
/// member `id`, reachable at `peer_addr`, cluster `claim`. A member that already belongs
/// (a restart after joining) is left as it is. Connection failures are retried for a minute;
/// a refusal (a used or expired token, a taken name, trust domain or id) is returned at once.
pub async fn join_self(
    join: &JoinWith,
    id: u64,
    peer_addr: SocketAddr,
    claim: isthmus_federation::ClusterClaim,
) -> anyhow::Result<JoinOutcome> {
    let token = std::fs::read_to_string(&join.token_file)
        .with_context(|| {
            format!(
                "federation.joinWith.tokenFile: reading {}",
                join.token_file.display()
            )
        })?
        .trim()
        .to_string();
    let application = isthmus_federation::JoinApplication {
        id,
        peer_addr,
        cluster: Some(claim),
    };
    let deadline = tokio::time::Instant::now() + JOIN_PATIENCE;
    let mut pause = Duration::from_millis(200);
    loop {
        let attempt = async {
            let mut client = verified_federation(&join.via, &token).await?;
            client
                .join(&token, &application)
                .await
                .map_err(anyhow::Error::from)
        };
        match attempt.await {
            Ok((revision, voter)) => return Ok(JoinOutcome::Joined { revision, voter }),
            Err(e) if format!("{e:#}").contains(&format!("member {id} already exists")) => {
                return Ok(JoinOutcome::AlreadyMember)
            }
            Err(e) if is_refusal(&e) || tokio::time::Instant::now() >= deadline => {
                return Err(e.context(format!(
                    "joining member {id} ({peer_addr}) through {} (federation.joinWith)",
                    join.via
                )))
            }
            Err(e) => {
                tracing::info!(error = %format!("{e:#}"), via = %join.via, "joining the federation; will retry");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// What [`join_self`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinOutcome {
    Joined { revision: u64, voter: bool },
    AlreadyMember,
}

/// Whether a failed join was refused (retrying cannot help) rather than not delivered.
fn is_refusal(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    [
        "PermissionDenied",
        "InvalidArgument",
        "FailedPrecondition",
        "not the federation",
        "no digest",
    ]
    .iter()
    .any(|s| text.contains(s))
}
