//! A member the federation removed learns it and stops, saying so.
//!
//! Once removed, a member hears from no one: its peers stop replicating to it, and where the
//! peer port authenticates members its binding is gone, so their handshakes refuse it. Left
//! alone it would campaign for ever (and, restarted from its old log, do the same). So a
//! member that has known no leader for a while asks its peers' public `Kv.JoinInfo`, which
//! lists the removed member ids (`members/removed/<id>`); when one of them lists its own id,
//! it stops with a failure naming the peer that said so, which `isthmus control` prints as it
//! exits non-zero. Where members authenticate each other the question goes over TLS that
//! accepts only a member control plane's certificate, so only a member can say it (a member
//! that lies can make another stop: the same liveness a compromised voter already has,
//! docs/security.md §7).

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::peer_tls::PeerTls;
use crate::proto::v1 as pb;
use crate::{Inner, Store};

/// The shortest time without a leader before the peers are asked.
pub(crate) const MIN_PATIENCE: Duration = Duration::from_secs(3);
/// How long one peer has to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How this member watches for its own removal.
pub(crate) struct Watch {
    pub(crate) id: u64,
    pub(crate) tls: Option<PeerTls>,
    /// How often the leader is looked for.
    pub(crate) check_every: Duration,
    /// How long without a leader before the peers are asked.
    pub(crate) patience: Duration,
}

/// Runs until the member stops; stops it when a peer says it was removed.
pub(crate) async fn watch(store: Weak<Inner>, w: Watch, mut shutdown: watch::Receiver<bool>) {
    let mut leaderless_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stopped| *stopped) => return,
            _ = tokio::time::sleep(w.check_every) => {}
        }
        let Some(store) = Store::upgrade(&store) else {
            return;
        };
        if store.status().leader_id.is_some() {
            leaderless_since = None;
            continue;
        }
        let since = *leaderless_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() < w.patience {
            continue;
        }
        for (peer, addr) in store.members() {
            if peer == w.id {
                continue;
            }
            match removed_members(&addr, w.tls.as_ref()).await {
                Ok(removed) if removed.contains(&w.id) => {
                    let reason = format!(
                        "member {} was removed from this federation (member {peer} at {addr} \
                         records members/removed/{}); its id is not reused: to rejoin, empty \
                         this member's raft directory and join with a new id and a token",
                        w.id, w.id
                    );
                    tracing::error!(member = w.id, "{reason}");
                    store.inner.replica.set_failure(reason);
                    store.inner.shutdown.send_replace(true);
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(member = w.id, %peer, %addr, error = %e, "asking a peer whether this member was removed");
                }
            }
        }
        // Ask again after another stretch without a leader.
        leaderless_since = Some(tokio::time::Instant::now());
    }
}

/// The removed member ids `addr` reports.
async fn removed_members(addr: &str, tls: Option<&PeerTls>) -> Result<Vec<u64>, String> {
    let channel: Channel = match tls {
        Some(tls) => {
            let config = isthmus_core::api_tls::client_config_for_bundles(tls.bundles.clone())
                .map_err(|e| e.to_string())?;
            isthmus_core::api_tls::channel(addr, Arc::new(config))?
        }
        None => Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(PROBE_TIMEOUT)
            .connect_lazy(),
    };
    let mut client = pb::kv_client::KvClient::new(channel);
    let answer = tokio::time::timeout(PROBE_TIMEOUT, client.join_info(pb::JoinInfoRequest {}))
        .await
        .map_err(|_| format!("no answer within {PROBE_TIMEOUT:?}"))?
        .map_err(|s| s.to_string())?;
    Ok(answer.into_inner().removed_members)
}
