//! The data plane's client of its control plane: the configuration stream and certificates.
//!
//! [`ControlClient::watch_config`] returns a watch channel holding the latest valid
//! [`MeshConfig`]; a background task keeps it current, reconnecting with backoff when the
//! control plane goes away, and *keeps the last snapshot* meanwhile (static stability: the
//! data plane never depends on the control plane being up). [`ControlClient::workload_identity`]
//! obtains a certificate by CSR and rotates it at half its lifetime.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::ca::generate_csr;
use crate::identity::SpiffeId;
use crate::mesh::MeshConfig;
use crate::policy::{Kind, Policy};
use crate::proto::mesh::certificate_service_client::CertificateServiceClient;
use crate::proto::mesh::mesh_config_service_client::MeshConfigServiceClient;
use crate::proto::mesh::policy_service_client::PolicyServiceClient;
use crate::proto::mesh::{
    ApplyRequest, DeletePolicyRequest, GetPoliciesRequest, SignRequest, StreamConfigRequest,
};
use crate::tls::{Identity, TrustBundles};

/// How long to wait between reconnection attempts, at most.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Errors talking to the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("control plane address {0}: not a valid address")]
    Address(String),
    #[error("the CA given to trust the control plane at {addr} is unusable: {reason}")]
    Ca { addr: String, reason: String },
    #[error("the control plane refused to sign a certificate for {identity}: {status}")]
    Sign { identity: String, status: String },
    #[error("no configuration arrived from the control plane at {addr} within {waited:?}")]
    NoConfig { addr: String, waited: Duration },
    #[error("the token for the certificate request: {0}")]
    Token(String),
    #[error("certificate handling failed: {0}")]
    Certificate(String),
    #[error("{operation} failed: {message}")]
    Policy {
        operation: &'static str,
        message: String,
    },
}

/// What a client presents to have a certificate signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// A bootstrap token from the control plane's config.
    Static(String),
    /// A file read afresh for every request: a Kubernetes service-account token, which the
    /// kubelet rotates (the control plane verifies it with a TokenReview).
    File(std::path::PathBuf),
}

impl Token {
    fn read(&self) -> Result<String, ClientError> {
        match self {
            Token::Static(t) => Ok(t.clone()),
            Token::File(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|e| ClientError::Token(format!("reading {}: {e}", path.display()))),
        }
    }
}

impl From<&str> for Token {
    fn from(t: &str) -> Self {
        Token::Static(t.to_string())
    }
}

/// A lazily connected client of one control plane's gRPC API, over TLS (see
/// [`crate::api_tls`]: the server must prove a control-plane identity under the given CA).
#[derive(Clone)]
pub struct ControlClient {
    addr: String,
    channel: Channel,
    /// What this client presents (`None`: anonymous), for [`ControlClient::elsewhere`].
    credential: Option<Arc<dyn rustls::client::ResolvesClientCert>>,
}

impl ControlClient {
    /// An anonymous client for the control plane at `addr` (`host:port`; an `https://`
    /// prefix is accepted), trusting the cluster CA `ca_pem`. Connects lazily. Anonymous
    /// callers reach `Sign` only (docs/security.md §6).
    pub fn new(addr: &str, ca_pem: &str) -> Result<Self, ClientError> {
        let config = crate::api_tls::client_config(ca_pem).map_err(|e| ClientError::Ca {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
        Self::with_tls(addr, Arc::new(config))
    }

    /// Like [`ControlClient::new`], presenting a client certificate: a daemon's own
    /// [`Identity`] (through [`crate::tls::identity_resolver`], so rotations apply to new
    /// connections) or an operator credential ([`crate::tls::StaticClientCert`]).
    pub fn authenticated(
        addr: &str,
        ca_pem: &str,
        credential: Arc<dyn rustls::client::ResolvesClientCert>,
    ) -> Result<Self, ClientError> {
        let config = crate::api_tls::client_config_as(ca_pem, credential.clone()).map_err(|e| {
            ClientError::Ca {
                addr: addr.to_string(),
                reason: e.to_string(),
            }
        })?;
        let mut client = Self::with_tls(addr, Arc::new(config))?;
        client.credential = Some(credential);
        Ok(client)
    }

    /// A client of the control plane at `addr` verifying it against `trust` as `trust`
    /// changes (see [`crate::api_tls::client_config_trusting`]), presenting `credential`
    /// if given.
    pub fn trusting(
        addr: &str,
        trust: Arc<TrustBundles>,
        credential: Option<Arc<dyn rustls::client::ResolvesClientCert>>,
    ) -> Result<Self, ClientError> {
        let config =
            crate::api_tls::client_config_trusting(trust, credential.clone()).map_err(|e| {
                ClientError::Ca {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                }
            })?;
        let mut client = Self::with_tls(addr, Arc::new(config))?;
        client.credential = credential;
        Ok(client)
    }

    /// A client of another control plane (`addr`, trusting `ca_pem`) presenting what this one
    /// presents: `isthmus status` asks every member's control plane as the same operator.
    pub fn elsewhere(&self, addr: &str, ca_pem: &str) -> Result<Self, ClientError> {
        match &self.credential {
            Some(credential) => Self::authenticated(addr, ca_pem, credential.clone()),
            None => Self::new(addr, ca_pem),
        }
    }

    /// Like [`ControlClient::new`], with a prepared TLS client configuration (to share one
    /// between many clients).
    pub fn with_tls(addr: &str, tls: Arc<rustls::ClientConfig>) -> Result<Self, ClientError> {
        let bare = addr.strip_prefix("https://").unwrap_or(addr);
        if bare.contains("://") {
            return Err(ClientError::Address(format!(
                "{addr} (the control-plane API is TLS only: give host:port or https://host:port)"
            )));
        }
        let channel = crate::api_tls::channel(bare, tls).map_err(ClientError::Address)?;
        Ok(ControlClient {
            addr: bare.to_string(),
            channel,
            credential: None,
        })
    }

    /// The control plane's address, `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The TLS channel, for other services the control plane serves on the same port (the
    /// federation store's `Kv` API).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Subscribes to the configuration stream. Waits up to `first_within` for the first
    /// snapshot, then keeps the returned channel current in the background (reconnecting as
    /// needed) until the returned task is aborted.
    pub async fn watch_config(
        &self,
        node_id: &str,
        first_within: Duration,
    ) -> Result<(watch::Receiver<Arc<MeshConfig>>, JoinHandle<()>), ClientError> {
        let (tx, mut rx) = watch::channel(Arc::new(MeshConfig::default()));
        let client = self.clone();
        let node_id = node_id.to_string();
        let task = tokio::spawn(async move { client.follow(node_id, tx).await });
        let arrived = tokio::time::timeout(first_within, async {
            while rx.borrow_and_update().version == 0 {
                if rx.changed().await.is_err() {
                    return false;
                }
            }
            true
        })
        .await;
        if arrived != Ok(true) {
            task.abort();
            return Err(ClientError::NoConfig {
                addr: self.addr.clone(),
                waited: first_within,
            });
        }
        Ok((rx, task))
    }

    async fn follow(self, node_id: String, tx: watch::Sender<Arc<MeshConfig>>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let mut client = MeshConfigServiceClient::new(self.channel.clone())
                .max_decoding_message_size(crate::api_tls::MAX_CLIENT_DECODE_BYTES);
            match client
                .stream_config(StreamConfigRequest {
                    node_id: node_id.clone(),
                })
                .await
            {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(snapshot)) => match MeshConfig::try_from(snapshot) {
                                Ok(config) => {
                                    backoff = Duration::from_millis(50);
                                    tx.send_replace(Arc::new(config));
                                }
                                Err(e) => tracing::warn!(
                                    control = %self.addr, error = %e,
                                    "refusing a malformed configuration snapshot; keeping the last good one"
                                ),
                            },
                            Ok(None) => break,
                            Err(status) => {
                                tracing::debug!(control = %self.addr, %status, "config stream ended");
                                break;
                            }
                        }
                    }
                }
                Err(status) => {
                    tracing::debug!(control = %self.addr, %status, "config stream unavailable");
                }
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Asks the control plane to sign a fresh key for `id`. Returns the identity and
    /// `(trust domain, CA PEM)` for every member cluster.
    pub async fn request_identity(
        &self,
        id: &SpiffeId,
        token: impl Into<Token>,
    ) -> Result<(Arc<Identity>, Vec<(String, String)>, i64), ClientError> {
        let (chain, key, bundles, not_after) = self.sign(id, &token.into()).await?;
        let identity = Identity::from_pem(id.clone(), &chain, &key)
            .map_err(|e| ClientError::Certificate(e.to_string()))?;
        Ok((identity, bundles, not_after))
    }

    async fn sign(
        &self,
        id: &SpiffeId,
        token: &Token,
    ) -> Result<(String, String, Vec<(String, String)>, i64), ClientError> {
        let token = token.read()?;
        let (csr_pem, key_pem) =
            generate_csr(id).map_err(|e| ClientError::Certificate(e.to_string()))?;
        let mut client = CertificateServiceClient::new(self.channel.clone());
        let response = client
            .sign(SignRequest {
                csr_pem,
                identity: id.to_string(),
                token,
            })
            .await
            .map_err(|status| ClientError::Sign {
                identity: id.to_string(),
                status: format!("{}: {}", status.code(), status.message()),
            })?
            .into_inner();
        let bundles = response
            .trust_bundles
            .into_iter()
            .map(|b| (b.trust_domain, b.ca_pem))
            .collect();
        Ok((
            response.cert_chain_pem,
            key_pem,
            bundles,
            response.not_after_unix,
        ))
    }

    /// Obtains a certificate for `id`, installs the returned bundles into `trust`, and keeps
    /// the certificate rotated at half its remaining lifetime until the task is aborted.
    pub async fn workload_identity(
        &self,
        id: &SpiffeId,
        token: impl Into<Token>,
        trust: Arc<TrustBundles>,
    ) -> Result<(Arc<Identity>, JoinHandle<()>), ClientError> {
        let token = token.into();
        let (identity, bundles, not_after) = self.request_identity(id, token.clone()).await?;
        install_bundles(&trust, &bundles);
        let client = self.clone();
        let rotating = identity.clone();
        let id = id.clone();
        let task = tokio::spawn(async move {
            let mut not_after = not_after;
            loop {
                tokio::time::sleep(half_life(not_after)).await;
                match client.sign(&id, &token).await {
                    Ok((chain, key, bundles, next)) => match rotating.rotate(&chain, &key) {
                        Ok(()) => {
                            install_bundles(&trust, &bundles);
                            not_after = next;
                            tracing::debug!(identity = %id, "certificate rotated");
                        }
                        Err(e) => {
                            tracing::warn!(identity = %id, error = %e, "rotated certificate unusable")
                        }
                    },
                    Err(e) => {
                        tracing::warn!(identity = %id, error = %e, "certificate rotation failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok((identity, task))
    }
}

impl ControlClient {
    /// Asks the control plane (as one of its cluster's admins) for an operator credential:
    /// a fresh key made here, and the certificate for
    /// `spiffe://<its trust domain>/operator/<role>/<name>`. Returns (chain PEM, key PEM).
    pub async fn issue_credential(
        &self,
        name: &str,
        role: crate::identity::Role,
        ttl: Duration,
    ) -> Result<(String, String), ClientError> {
        let (csr_pem, key_pem) = crate::ca::csr_for(&format!("spiffe://operator/{name}"))
            .map_err(|e| ClientError::Certificate(e.to_string()))?;
        let mut client =
            crate::proto::mesh::credential_service_client::CredentialServiceClient::new(
                self.channel.clone(),
            );
        let response = client
            .issue(crate::proto::mesh::IssueCredentialRequest {
                name: name.to_string(),
                role: role.as_str().to_string(),
                csr_pem,
                ttl_seconds: ttl.as_secs(),
            })
            .await
            .map_err(|status| policy_error("issue", &status))?
            .into_inner();
        Ok((response.cert_chain_pem, key_pem))
    }

    /// Applies `policies` mesh-wide (or, with `dry_run`, only reports what would change).
    /// Returns `(resource, action)` per document, action being created/configured/unchanged.
    pub async fn apply(
        &self,
        policies: &[Policy],
        dry_run: bool,
    ) -> Result<Vec<(String, String)>, ClientError> {
        let mut client = PolicyServiceClient::new(self.channel.clone());
        let documents_json = policies.iter().map(|p| p.to_json().to_string()).collect();
        let response = client
            .apply(ApplyRequest {
                documents_json,
                dry_run,
            })
            .await
            .map_err(|s| policy_error("apply", &s))?
            .into_inner();
        Ok(response
            .results
            .into_iter()
            .map(|r| (r.resource, r.action))
            .collect())
    }

    /// Lists stored policies, optionally filtered by kind, namespace and name.
    pub async fn get_policies(
        &self,
        kind: Option<Kind>,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Result<Vec<Policy>, ClientError> {
        let mut client = PolicyServiceClient::new(self.channel.clone());
        let response = client
            .get(GetPoliciesRequest {
                kind: kind.map(|k| k.as_str().to_string()).unwrap_or_default(),
                namespace: namespace.unwrap_or_default().to_string(),
                name: name.unwrap_or_default().to_string(),
            })
            .await
            .map_err(|s| policy_error("get", &s))?
            .into_inner();
        response
            .documents_json
            .iter()
            .map(|j| {
                Policy::from_json(j.as_bytes()).map_err(|e| ClientError::Policy {
                    operation: "get",
                    message: format!("the control plane sent an invalid policy: {e}"),
                })
            })
            .collect()
    }

    /// Deletes one policy; false when it did not exist.
    pub async fn delete_policy(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
    ) -> Result<bool, ClientError> {
        let mut client = PolicyServiceClient::new(self.channel.clone());
        let response = client
            .delete(DeletePolicyRequest {
                kind: kind.as_str().to_string(),
                namespace: namespace.to_string(),
                name: name.to_string(),
            })
            .await
            .map_err(|s| policy_error("delete", &s))?
            .into_inner();
        Ok(response.deleted)
    }
}

impl ControlClient {
    /// Reports this sidecar's failover tables (JSON map, see `failover::Table`).
    pub async fn report_failover(
        &self,
        node: &str,
        tables_json: String,
    ) -> Result<(), ClientError> {
        let mut client = MeshConfigServiceClient::new(self.channel.clone())
            .max_decoding_message_size(crate::api_tls::MAX_CLIENT_DECODE_BYTES);
        client
            .report_failover(crate::proto::mesh::FailoverReport {
                node_id: node.to_string(),
                tables_json,
            })
            .await
            .map_err(|s| policy_error("report failover", &s))?;
        Ok(())
    }

    /// The failover tables of `from_cluster`'s sidecars (empty: this control plane's
    /// cluster) for `service` in `namespace`, as sent: the cluster and one entry per table.
    pub async fn explain_raw(
        &self,
        service: &str,
        namespace: &str,
        from_cluster: &str,
    ) -> Result<(String, Vec<crate::proto::mesh::SidecarTable>), ClientError> {
        let mut client = MeshConfigServiceClient::new(self.channel.clone())
            .max_decoding_message_size(crate::api_tls::MAX_CLIENT_DECODE_BYTES);
        let r = client
            .explain(crate::proto::mesh::ExplainRequest {
                service: service.to_string(),
                namespace: namespace.to_string(),
                from_cluster: from_cluster.to_string(),
            })
            .await
            .map_err(|s| policy_error("explain", &s))?
            .into_inner();
        Ok((r.cluster, r.tables))
    }

    /// Like [`ControlClient::explain_raw`], with the tables decoded: (node, age, table).
    pub async fn explain(
        &self,
        service: &str,
        namespace: &str,
        from_cluster: &str,
    ) -> Result<(String, Vec<(String, Duration, crate::failover::Table)>), ClientError> {
        let (cluster, raw) = self.explain_raw(service, namespace, from_cluster).await?;
        let mut out = Vec::new();
        for t in raw {
            let table = serde_json::from_str(&t.table_json).map_err(|e| ClientError::Policy {
                operation: "explain",
                message: format!("a table from {} does not decode: {e}", t.node_id),
            })?;
            out.push((t.node_id, Duration::from_millis(t.age_ms), table));
        }
        Ok((cluster, out))
    }
}

fn policy_error(operation: &'static str, status: &tonic::Status) -> ClientError {
    ClientError::Policy {
        operation,
        message: format!("{}: {}", status.code(), status.message()),
    }
}

fn install_bundles(trust: &TrustBundles, bundles: &[(String, String)]) {
    let bundles = bundles.iter().map(|(td, pem)| (td.as_str(), pem.as_str()));
    for (trust_domain, e) in trust.replace_each(bundles) {
        tracing::warn!(%trust_domain, error = %e, "leaving out an unusable trust bundle");
    }
}

/// How long until a certificate expiring at `not_after_unix` should be renewed: half of the
/// remaining lifetime, at least one second.
fn half_life(not_after_unix: i64) -> Duration {
    let now = i64::try_from(crate::clock::unix_ms() / 1000).unwrap_or(i64::MAX);
    let remaining = not_after_unix.saturating_sub(now).max(2).unsigned_abs();
    Duration::from_secs(remaining / 2)
}

/// Keeps the bundle of the snapshot's own cluster (`MeshConfig::cluster`) in `trust`, beside
/// its pinned [`TrustBundles::any_domain`] anchors: what a daemon's control-plane client
/// trusts, so the control plane's certificate from a rotated CA (published in the cluster's
/// bundle before it signs) verifies.
pub fn follow_own_bundle(
    trust: Arc<TrustBundles>,
    mut config: watch::Receiver<Arc<MeshConfig>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let snapshot = config.borrow_and_update().clone();
            if let Some(own) = snapshot
                .clusters
                .iter()
                .find(|c| c.name == snapshot.cluster)
            {
                let bundle = [(own.trust_domain.as_str(), own.ca_bundle_pem.as_str())];
                for (trust_domain, e) in trust.replace_each(bundle) {
                    tracing::warn!(%trust_domain, error = %e, "leaving out this cluster's unusable trust bundle");
                }
            }
            if config.changed().await.is_err() {
                return;
            }
        }
    })
}

/// Keeps `trust` equal to the bundles of the member clusters in every new snapshot.
pub fn follow_trust_bundles(
    trust: Arc<TrustBundles>,
    mut config: watch::Receiver<Arc<MeshConfig>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let snapshot = config.borrow_and_update().clone();
            if !snapshot.clusters.is_empty() {
                let bundles = snapshot
                    .clusters
                    .iter()
                    .map(|c| (c.trust_domain.as_str(), c.ca_bundle_pem.as_str()));
                // One unusable bundle leaves out only its own trust domain.
                for (trust_domain, e) in trust.replace_each(bundles) {
                    tracing::warn!(%trust_domain, error = %e, "leaving out an unusable trust bundle");
                }
            }
            if config.changed().await.is_err() {
                return;
            }
        }
    })
}
