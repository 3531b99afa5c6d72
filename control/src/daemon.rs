//! The control plane as the `isthmus control` daemon runs it: its federation member, the
//! control plane itself, its admin server, and — when configured — the sidecar-injection
//! webhook and the Kubernetes publisher of the CA root and the webhook's caBundle.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use isthmus_core::admin::ComponentAdmin;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{load_ca, ControlConfig, DiscoveryConfig};

/// How long the webhook's serving certificate is valid.
const WEBHOOK_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long a restarted member with `federation.joinWith` waits for its replica, restored
/// from disk, to show it is a member already (then it does not join again).
const JOINED_BEFORE_PATIENCE: Duration = Duration::from_secs(3);

/// A running control-plane daemon.
pub struct Daemon {
    cluster: String,
    member: u64,
    federation: std::net::SocketAddr,
    store: isthmus_federation::Store,
    control: crate::ControlHandle,
    admin: ComponentAdmin,
    webhook_addr: Option<std::net::SocketAddr>,
    /// Stops the webhook and the publisher.
    stop: watch::Sender<bool>,
    webhook: Option<JoinHandle<()>>,
    /// Re-issues the webhook's serving certificate at half its lifetime.
    webhook_rotation: Option<JoinHandle<()>>,
    publishing: Option<JoinHandle<()>>,
    /// Turns `/ready` false if the federation member stops on its own.
    unready_on_store_failure: JoinHandle<()>,
    /// Held while the daemon runs (`<dataDir>/LOCK`).
    _data_dir_lock: isthmus_federation::DataDirLock,
}

impl Daemon {
    /// Loads the config at `path` and starts the daemon.
    pub async fn start_from_file(path: &Path) -> anyhow::Result<Self> {
        Self::start(ControlConfig::load(path)?).await
    }

    /// Starts the federation member (on `<dataDir>/raft/`), the control plane, its admin
    /// server, and the webhook and publisher its config asks for.
    pub async fn start(config: ControlConfig) -> anyhow::Result<Self> {
        // The data directory first: a second process on it is refused before it reads or
        // creates the CA there.
        let data_dir_lock = isthmus_federation::lock_data_dir(&config.data_dir)?;
        let ca = load_ca(&config)?;

        // Members authenticate each other on the peer port: the initial members named in the
        // config (with their CAs) and, later, the clusters recorded in the replica.
        let mut initial = Vec::new();
        for m in &config.peer_members {
            let ca_pem = std::fs::read_to_string(&m.ca_file).with_context(|| {
                format!(
                    "federation.peers.{}.caFile: reading {}",
                    m.id,
                    m.ca_file.display()
                )
            })?;
            initial.push(crate::members::InitialMember {
                id: m.id,
                trust_domain: m.trust_domain.clone(),
                ca_pem,
            });
        }
        let members = crate::members::MemberTrust::new(
            ca.clone(),
            config.node_id,
            initial,
            config.cert_lifetime,
        )?;
        // Operators write through the authenticated API port, never the peer port.
        let binding = isthmus_federation::bind(config.peer_listen)
            .await?
            .refuse_client_writes()
            .with_tls(members.peer_tls());
        let federation = binding.local_addr();
        let mut options =
            isthmus_federation::StoreOptions::new(config.node_id, config.peers.clone());
        // The raft log, hard state and snapshots live beside the CA, under <dataDir>/raft/.
        options.data_dir = Some(config.data_dir.clone());
        options.join = config.join;
        if let Some(tick) = config.tick {
            options.tick = tick;
        }
        // A member that ran before restores its membership from <dataDir>/raft/.
        let ran_before = config.data_dir.join("raft").exists();
        let store = binding.start(options).await?;
        if let Some(join) = &config.join_with {
            // Validated with the config: a member that joins itself names its own address.
            let peer_addr = config.peers[&config.node_id];
            let claim = isthmus_federation::ClusterClaim {
                name: config.cluster.clone(),
                trust_domain: config.trust_domain.clone(),
                ca_bundle_pem: ca.bundle_pem(),
            };
            let joined_before = ran_before && {
                let deadline = tokio::time::Instant::now() + JOINED_BEFORE_PATIENCE;
                while !store.members().contains_key(&config.node_id)
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                store.members().contains_key(&config.node_id)
            };
            let outcome = if joined_before {
                crate::join::JoinOutcome::AlreadyMember
            } else {
                crate::join::join_self(join, config.node_id, peer_addr, claim).await?
            };
            match outcome {
                crate::join::JoinOutcome::Joined { revision, voter } => tracing::info!(
                    member = config.node_id,
                    via = %join.via,
                    revision,
                    voter,
                    "joined the federation"
                ),
                crate::join::JoinOutcome::AlreadyMember => tracing::info!(
                    member = config.node_id,
                    "already a member of the federation: not joining again"
                ),
            }
        }
        let (stop, stopped) = watch::channel(false);
        let mut publishing = None;
        let discovery = match &config.discovery {
            DiscoveryConfig::File { path, poll } => crate::DiscoverySource::File {
                path: path.clone(),
                poll: *poll,
            },
            DiscoveryConfig::Kubernetes {
                connection,
                inbound_port,
            } => {
                let client = crate::kubernetes::client(connection)
                    .await
                    .context("connecting to the Kubernetes API")?;
                let mut source = crate::kubernetes::KubeSource::new(client);
                source.inbound_port = *inbound_port;
                let publish = crate::kubernetes::publish::Publish {
                    ca_root: config
                        .ca_root
                        .as_ref()
                        .map(|r| (r.namespace.clone(), r.config_map.clone())),
                    webhook_configuration: config
                        .webhook
                        .as_ref()
                        .and_then(|w| w.configuration.clone()),
                    ca_pem: ca.bundle_pem(),
                };
                if publish.ca_root.is_some() || publish.webhook_configuration.is_some() {
                    publishing = Some(tokio::spawn(crate::kubernetes::publish::run(
                        source.clone(),
                        publish,
                        stopped.clone(),
                    )));
                }
                crate::DiscoverySource::Kubernetes(source)
            }
        };
        let control = crate::start(
            crate::ControlOptions {
                cluster: config.cluster.clone(),
                trust_domain: config.trust_domain.clone(),
                locality: config.locality.clone(),
                grpc_listen: config.grpc_listen,
                discovery,
                vip_range: config.vip_range,
                gateway_address: config.gateway_address,
                tokens: config.tokens.clone(),
                cert_lifetime: config.cert_lifetime,
                export_lease: config.export_lease,
                ca: ca.clone(),
                bootstrap_admin: config
                    .is_first_member()
                    .then(|| crate::BOOTSTRAP_ADMIN.to_string()),
                members: Some(members),
            },
            store.clone(),
        )
        .await?;
        let api_metrics = control.api_metrics().clone();
        let api_trust = control.api_trust();
        let admin = ComponentAdmin::start_with(
            "control",
            config.admin_listen,
            control.config(),
            |registry| {
                api_metrics.register(registry);
                isthmus_core::tls::TrustBundleMetrics::register(api_trust, registry);
                crate::members::FederationMetrics::register(store.clone(), registry);
            },
        )
        .await
        .with_context(|| format!("binding admin {}", config.admin_listen.addr))?;
        // A member whose log cannot be written makes the control plane unready at once
        // (the process exits too, through store_failure; in-process users see /ready).
        let unready_on_store_failure = {
            let (failing, store) = (admin.failing(), store.clone());
            tokio::spawn(async move {
                if store.stopped().await.is_some() {
                    failing.fail();
                }
            })
        };
        let mut webhook = None;
        let mut webhook_addr = None;
        let mut webhook_rotation = None;
        if let Some(w) = &config.webhook {
            // The webhook's serving certificate, for its Service's DNS names, from the
            // cluster CA, re-issued at half its lifetime.
            let (cert, rotation) = crate::webhook::RotatingCert::start(
                ca.clone(),
                w.dns_names.clone(),
                WEBHOOK_CERT_LIFETIME,
                stopped.clone(),
            )
            .map_err(|e| anyhow::anyhow!("the webhook's certificate: {e}"))?;
            webhook_rotation = Some(rotation);
            let tls = cert
                .tls_config()
                .map_err(|e| anyhow::anyhow!("the webhook's TLS configuration: {e}"))?;
            let listener = tokio::net::TcpListener::bind(w.listen)
                .await
                .with_context(|| format!("binding webhook.listen {}", w.listen))?;
            webhook_addr = Some(listener.local_addr()?);
            // Injected sidecars are given the CA that the API's certificate chains to.
            let inject = crate::webhook::InjectConfig {
                ca_pem: ca.bundle_pem(),
                ..w.inject.clone()
            };
            webhook = Some(tokio::spawn(crate::webhook::serve(
                listener,
                Arc::new(tls),
                inject,
                stopped,
            )));
        }
        Ok(Daemon {
            cluster: config.cluster,
            member: config.node_id,
            federation,
            store,
            control,
            admin,
            webhook_addr,
            webhook_rotation,
            _data_dir_lock: data_dir_lock,
            unready_on_store_failure,
            stop,
            webhook,
            publishing,
        })
    }

    /// The addresses it serves, as the daemon's `ready` line prints them.
    pub fn ready(&self) -> serde_json::Value {
        serde_json::json!({
            "cluster": self.cluster,
            "grpc": self.control.grpc_addr().to_string(),
            "federation": self.federation.to_string(),
            "member": self.member,
            "admin": self.admin.addr().to_string(),
            "webhook": self.webhook_addr.map(|a| a.to_string()),
        })
    }

    /// Resolves only if the federation member stops on its own because its log could not be
    /// written or fsynced (a full disk, a failing device), with the reason naming the file.
    /// The daemon must then exit: it can no longer promise durability.
    pub async fn store_failure(&self) -> String {
        match self.store.stopped().await {
            Some(reason) => reason,
            None => std::future::pending().await,
        }
    }

    /// Stops everything it started and closes every port.
    pub async fn shutdown(self) {
        self.unready_on_store_failure.abort();
        let _ = self.stop.send(true);
        for task in [self.publishing, self.webhook, self.webhook_rotation]
            .into_iter()
            .flatten()
        {
            let _ = task.await;
        }
        self.control.shutdown().await;
        self.admin.shutdown().await;
        self.store.shutdown().await;
    }
}
