//! isthmus-control: one cluster's control plane.
//!
//! It discovers the cluster's services (from a YAML file in local mode, or from the
//! Kubernetes API through kube-rs, see [`kubernetes`]), publishes this
//! cluster's membership record and exports to the federation store, imports the other
//! clusters' exports, and streams one merged [`MeshConfig`] over gRPC to the cluster's
//! sidecars, DNS proxies and gateway. It runs the cluster's certificate authority and signs
//! workload certificates for holders of a bootstrap token.
//!
//! Tasks: the catalog loop (polls discovery, follows the store's revision, rebuilds the
//! config), the publisher (writes this cluster's records to the store, retrying while the
//! store has no quorum, so local changes never wait on the federation), and the gRPC server;
//! in Kubernetes mode also the watch loop and the ServiceImport and ServiceExport-status
//! writers (see [`kubernetes`]).
//!
//! [`daemon::Daemon`] is the `isthmus control` daemon: [`config`] read from its file, its
//! federation member, the control plane, its admin server, and (when configured) the
//! sidecar-injection [`webhook`] and the Kubernetes CA-root and caBundle publisher.

// Code that ships: no unwrap on what input or the network can make fail, no silent lossy
// casts (see [workspace.lints] in the root Cargo.toml).
#![warn(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

pub mod api;
pub mod authz;
pub mod ca_rotation;
pub mod catalog;
pub mod config;
pub mod daemon;
pub mod discovery;
pub mod join;
pub mod kubernetes;
pub mod members;
pub mod records;
pub mod tokens;
pub mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use isthmus_core::ca::CertificateAuthority;
use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::MeshConfig;
use isthmus_core::policy::Policy;
use isthmus_core::proto::mesh::certificate_service_server::CertificateServiceServer;
use isthmus_core::proto::mesh::mesh_config_service_server::MeshConfigServiceServer;
use isthmus_core::proto::mesh::policy_service_server::PolicyServiceServer;
use isthmus_core::tls::Identity;
use isthmus_federation::Store;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::catalog::Catalog;
use crate::discovery::Discovery;
use crate::records::{ClusterRecord, ExportRecord};
use crate::tokens::TokenPolicy;

/// Errors starting or running the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("binding the gRPC listener on {addr} failed")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the discovery file is not valid")]
    Discovery(#[source] isthmus_core::config::ConfigError),
    #[error("loading or creating the cluster CA in {dir} failed: {reason}")]
    Ca { dir: PathBuf, reason: String },
    #[error("setting up TLS on the control-plane API failed: {0}")]
    Tls(String),
}

/// Everything a control plane needs, validated.
#[derive(Clone)]
pub struct ControlOptions {
    pub cluster: String,
    pub trust_domain: String,
    pub locality: Option<String>,
    /// gRPC API for the data plane (port 0 picks one).
    pub grpc_listen: SocketAddr,
    pub discovery: DiscoverySource,
    pub vip_range: Ipv4Net,
    /// The gateway's QUIC address as the other clusters reach it, when known at start.
    pub gateway_address: Option<SocketAddr>,
    pub tokens: TokenPolicy,
    pub cert_lifetime: Duration,
    pub ca: Arc<CertificateAuthority>,
    /// The lease on this cluster's exports in the federation store: renewed every third of
    /// it; if this control plane stops renewing (it is down, or cut off from the
    /// federation), the others see the lease lapse and apply their failover policies.
    pub export_lease: Duration,
    /// On the federation's first member: the operator name (`spiffe://<td>/operator/admin/
    /// <name>`) that is mesh admin while the store holds no mesh-admin grant, and to whom this
    /// control plane writes the first grant (docs/security.md §6).
    pub bootstrap_admin: Option<String>,
    /// How the federation member's peer port authenticates members, when it does: the
    /// control plane keeps it in step with the cluster records and presents its identity on
    /// the API too. `None`: the store was started without TLS (in-process tests).
    pub members: Option<members::MemberTrust>,
}

/// The name of the first mesh admin on a federation's first member.
pub const BOOTSTRAP_ADMIN: &str = "admin";

/// Where this cluster's services come from.
#[derive(Clone)]
pub enum DiscoverySource {
    /// A YAML file (see [`discovery`]), re-read every `poll`.
    File { path: PathBuf, poll: Duration },
    /// The Kubernetes API (see [`kubernetes`]).
    Kubernetes(kubernetes::KubeSource),
}

/// A running control plane.
pub struct ControlHandle {
    grpc_addr: SocketAddr,
    api_metrics: authz::ApiMetrics,
    /// The member bundles the API verifies client certificates against.
    api_clients: Arc<isthmus_core::tls::TrustBundles>,
    ca: Arc<CertificateAuthority>,
    ca_pem: String,
    config: watch::Receiver<Arc<MeshConfig>>,
    gateway: watch::Sender<Option<SocketAddr>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl ControlHandle {
    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The API's own metrics (refusals), for the admin server's registry.
    pub fn api_metrics(&self) -> &authz::ApiMetrics {
        &self.api_metrics
    }

    /// The member bundles the API verifies client certificates against (for
    /// [`isthmus_core::tls::TrustBundleMetrics`]).
    pub fn api_trust(&self) -> Arc<isthmus_core::tls::TrustBundles> {
        self.api_clients.clone()
    }

    /// The cluster CA (PEM): what clients of the API port trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A client of this control plane's API as this cluster's operator `admin` (a
    /// credential minted from its CA; a mesh admin on the federation's first member).
    pub fn client(&self) -> isthmus_core::client::ControlClient {
        self.operator_client(isthmus_core::identity::Role::Admin, BOOTSTRAP_ADMIN)
    }

    /// A client of this control plane's API as the operator `spiffe://<td>/operator/<role>/
    /// <name>`, with a credential minted from this cluster's CA.
    pub fn operator_client(
        &self,
        role: isthmus_core::identity::Role,
        name: &str,
    ) -> isthmus_core::client::ControlClient {
        let id = isthmus_core::identity::OperatorId::new(self.ca.trust_domain(), role, name)
            .expect("an operator name is a DNS label");
        let issued = self
            .ca
            .issue_operator(&id, Duration::from_secs(3600))
            .expect("the cluster CA issues operator credentials");
        let credential =
            isthmus_core::tls::StaticClientCert::from_pem(&issued.cert_chain_pem, &issued.key_pem)
                .expect("a freshly issued credential is usable");
        isthmus_core::client::ControlClient::authenticated(
            &self.grpc_addr.to_string(),
            &self.ca_pem,
            credential,
        )
        .expect("the control plane's own address and CA make a valid client")
    }

    /// An anonymous client of this control plane's API (it may call `Sign` only).
    pub fn anonymous_client(&self) -> isthmus_core::client::ControlClient {
        isthmus_core::client::ControlClient::new(&self.grpc_addr.to_string(), &self.ca_pem)
            .expect("the control plane's own address and CA make a valid client")
    }

    /// The merged configuration, as streamed to the data plane.
    pub fn config(&self) -> watch::Receiver<Arc<MeshConfig>> {
        self.config.clone()
    }

    /// Publishes (or changes) this cluster's gateway address in the federation.
    pub fn set_gateway(&self, addr: SocketAddr) {
        self.gateway.send_replace(Some(addr));
    }

    /// Stops every task and closes the gRPC port. The federation store is the caller's.
    pub async fn shutdown(mut self) {
        self.halt().await;
    }

    /// Like [`ControlHandle::shutdown`], keeping the handle (its config receiver goes on
    /// holding the last configuration). Calling it again does nothing.
    pub async fn halt(&mut self) {
        let _ = self.stop.send(true);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }
}

/// What the publisher should make true in the store.
#[derive(Debug, Clone, PartialEq)]
struct Desired {
    cluster: ClusterRecord,
    /// `None` while discovery has not listed the cluster once (Kubernetes): this cluster's
    /// exports in the store are then left as they are, never withdrawn for lack of news.
    exports: Option<Vec<ExportRecord>>,
}

/// Starts the control plane over an already running federation store member.
pub async fn start(opts: ControlOptions, store: Store) -> Result<ControlHandle, ControlError> {
    let (stop, stopped) = watch::channel(false);
    let (discovery, synced, file, mut kube) = match &opts.discovery {
        DiscoverySource::File { path, poll } => (
            discovery::load(path).map_err(ControlError::Discovery)?,
            true,
            Some((path.clone(), *poll)),
            None,
        ),
        DiscoverySource::Kubernetes(source) => (
            Discovery::default(),
            false,
            None,
            Some(kubernetes::start(source.clone(), stopped.clone())),
        ),
    };
    let listener = tokio::net::TcpListener::bind(opts.grpc_listen)
        .await
        .map_err(|source| ControlError::Bind {
            addr: opts.grpc_listen,
            source,
        })?;
    let grpc_addr = listener.local_addr().map_err(|source| ControlError::Bind {
        addr: opts.grpc_listen,
        source,
    })?;

    let mut catalog = Catalog::new(&opts.cluster, &opts.trust_domain, opts.vip_range);
    let (gateway_tx, gateway_rx) = watch::channel(opts.gateway_address);
    let cluster_record = ClusterRecord {
        name: opts.cluster.clone(),
        trust_domain: opts.trust_domain.clone(),
        gateway: opts.gateway_address,
        ca_bundle_pem: opts.ca.bundle_pem(),
        locality: opts.locality.clone(),
        // The member this control plane runs. Without `members` the store may be one that
        // several in-process control planes share (tests), so none claims its id: the store's
        // rules give a member id to one cluster only.
        member_id: opts.members.is_some().then(|| store.status().id),
        control: (!grpc_addr.ip().is_unspecified()).then_some(grpc_addr),
    };
    let desired0 = Desired {
        cluster: cluster_record.clone(),
        exports: synced.then(|| catalog.exports(&discovery)),
    };
    let (desired_tx, desired_rx) = watch::channel(desired0);
    rebuild(&mut catalog, &discovery, &store, &cluster_record);
    let (config_tx, config_rx) = watch::channel(catalog.current());

    let policy_store = store.clone();
    let store_for_members = store.clone();
    let api_metrics = authz::ApiMetrics::default();
    let authorizer = authz::Authorizer::new(
        &opts.cluster,
        &opts.trust_domain,
        store.clone(),
        opts.bootstrap_admin.clone(),
        api_metrics.clone(),
    );
    let kv = store.guarded_kv_service(authorizer.write_guard());
    let mut tasks = Vec::new();
    if let Some(name) = &opts.bootstrap_admin {
        tasks.push(tokio::spawn(bootstrap_grant(
            store.clone(),
            isthmus_core::identity::OperatorId::new(
                &opts.trust_domain,
                isthmus_core::identity::Role::Admin,
                name,
            )
            .map_err(|e| ControlError::Tls(format!("bootstrap admin: {e}")))?,
            stopped.clone(),
        )));
    }
    let kube_discovery = kube.as_ref().map(|k| k.discovery.clone());
    if let Some(k) = kube.as_mut() {
        k.start_writers(
            &opts.cluster,
            config_rx.clone(),
            store.clone(),
            stopped.clone(),
        );
        tasks.append(&mut k.tasks);
    }
    tasks.push(tokio::spawn(publisher(
        store.clone(),
        desired_rx,
        opts.export_lease,
        stopped.clone(),
    )));
    tasks.push(tokio::spawn(catalog_loop(CatalogLoop {
        catalog,
        discovery,
        synced,
        file,
        kube: kube_discovery,
        store,
        cluster_record,
        gateway: gateway_rx,
        desired: desired_tx,
        config: config_tx,
        stop: stopped.clone(),
    })));

    let api_identity = match opts.members {
        Some(trust) => {
            let identity = trust.identity();
            tasks.push(trust.follow(store_for_members, stopped.clone()));
            identity
        }
        None => {
            let (identity, rotation) =
                api_identity(opts.ca.clone(), opts.cert_lifetime, stopped.clone())?;
            tasks.push(rotation);
            identity
        }
    };
    let config_api = api::ConfigApi {
        config: config_rx.clone(),
        stop: stopped.clone(),
        cluster: opts.cluster.clone(),
        store: policy_store.clone(),
        reports: Default::default(),
        evicted: api_metrics.failover_reports_evicted(),
        identity: api_identity.clone(),
    };
    let cert_api = api::CertificateApi {
        ca: opts.ca.clone(),
        tokens: opts.tokens,
        reviewer: match &opts.discovery {
            DiscoverySource::Kubernetes(source) => Some(
                kubernetes::tokenreview::TokenReviewer::new(source.client.clone()),
            ),
            DiscoverySource::File { .. } => None,
        },
        lifetime: opts.cert_lifetime,
        config: config_rx.clone(),
    };
    let credential_api = api::CredentialApi {
        ca: opts.ca.clone(),
    };
    let policy_api = api::PolicyApi {
        store: policy_store,
    };
    // Client certificates verify against the member bundles as the catalog admits them
    // (this cluster's trust domain is always its own CA), starting with our own.
    let api_clients = isthmus_core::tls::TrustBundles::new();
    api_clients
        .replace([(opts.trust_domain.as_str(), opts.ca.bundle_pem().as_str())])
        .map_err(|e| ControlError::Tls(e.to_string()))?;
    tasks.push(isthmus_core::client::follow_trust_bundles(
        api_clients.clone(),
        config_rx.clone(),
    ));
    let tls = isthmus_core::api_tls::server_config(api_identity, api_clients.clone())
        .map_err(|e| ControlError::Tls(e.to_string()))?;
    let mut grpc_stop = stopped.clone();
    let (incoming, accepting) =
        isthmus_core::api_tls::incoming(listener, Arc::new(tls), stopped.clone());
    tasks.push(accepting);
    tasks.push(tokio::spawn(async move {
        // Bounds (docs/control-api.md): streams per connection, keep-alives that find dead
        // clients, and per-service message sizes sized to what each method carries.
        let result = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(isthmus_core::api_tls::MAX_STREAMS_PER_CONNECTION))
            .http2_keepalive_interval(Some(isthmus_core::api_tls::KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(isthmus_core::api_tls::KEEPALIVE_TIMEOUT))
            .layer(authz::AuthorizeLayer(authorizer))
            .add_service(
                MeshConfigServiceServer::new(config_api)
                    .max_decoding_message_size(api::MAX_CONFIG_REQUEST_BYTES)
                    .max_encoding_message_size(isthmus_core::api_tls::MAX_CLIENT_DECODE_BYTES),
            )
            .add_service(
                CertificateServiceServer::new(cert_api)
                    .max_decoding_message_size(api::MAX_SIGN_REQUEST_BYTES),
            )
            .add_service(
                PolicyServiceServer::new(policy_api)
                    .max_decoding_message_size(api::MAX_POLICY_REQUEST_BYTES),
            )
            .add_service(
                isthmus_core::proto::mesh::credential_service_server::CredentialServiceServer::new(
                    credential_api,
                )
                .max_decoding_message_size(api::MAX_SIGN_REQUEST_BYTES),
            )
            .add_service(kv)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = grpc_stop.changed().await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "control gRPC server failed");
        }
    }));
    tracing::info!(cluster = %opts.cluster, grpc = %grpc_addr, "control plane started");
    Ok(ControlHandle {
        grpc_addr,
        api_metrics,
        api_clients,
        ca: opts.ca.clone(),
        ca_pem: opts.ca.bundle_pem(),
        config: config_rx,
        gateway: gateway_tx,
        stop,
        tasks,
    })
}

/// The certificate the API port presents: the control plane's SPIFFE identity, issued by the
/// cluster CA for `lifetime` and re-issued at half of it until `stop`.
fn api_identity(
    ca: Arc<CertificateAuthority>,
    lifetime: Duration,
    mut stop: watch::Receiver<bool>,
) -> Result<(Arc<Identity>, JoinHandle<()>), ControlError> {
    let id = SpiffeId::control(ca.trust_domain());
    let issue_id = id.clone();
    let issue = move |ca: &CertificateAuthority| {
        let id = &issue_id;
        ca.issue(id, lifetime)
            .map_err(|e| ControlError::Tls(format!("issuing the API certificate for {id}: {e}")))
    };
    let first = issue(&ca)?;
    let identity = Identity::from_pem(id.clone(), &first.cert_chain_pem, &first.key_pem)
        .map_err(|e| ControlError::Tls(e.to_string()))?;
    let rotating = identity.clone();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(lifetime / 2) => {}
                _ = stop.changed() => return,
            }
            let rotated = issue(&ca).and_then(|c| {
                rotating
                    .rotate(&c.cert_chain_pem, &c.key_pem)
                    .map_err(|e| ControlError::Tls(e.to_string()))
            });
            if let Err(e) = rotated {
                tracing::warn!(error = %e, "API certificate rotation failed; keeping the current one");
            }
        }
    });
    Ok((identity, task))
}

/// On the federation's first member: writes the first mesh-admin grant, to `admin`, unless
/// some grant exists (retrying while the store has no quorum). Compare-and-set on an absent
/// key, so two writers cannot both win.
async fn bootstrap_grant(
    store: Store,
    admin: isthmus_core::identity::OperatorId,
    mut stop: watch::Receiver<bool>,
) {
    let key = records::mesh_admin_grant_key(admin.trust_domain(), admin.name());
    let record = records::GrantRecord {
        identity: admin.to_string(),
        granted_by: format!("member:{}", store.status().id),
        granted_at_ms: isthmus_core::clock::unix_ms(),
    };
    let Ok(value) = serde_json::to_vec(&record) else {
        return;
    };
    loop {
        // Read what is committed, not what this replica has applied so far: a restarted
        // member has not yet replayed its log, and a second "first" grant is refused.
        let granted = store
            .list_linearizable(records::MESH_ADMIN_GRANTS_PREFIX)
            .await
            .map(|grants| !grants.is_empty());
        match granted {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(error = %e, "reading the mesh-admin grants; will retry");
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                }
                continue;
            }
        }
        match store.compare_and_set(&key, None, value.clone()).await {
            Ok(_) => {
                tracing::info!(identity = %admin, "wrote the first mesh-admin grant");
                return;
            }
            Err(e) => tracing::debug!(error = %e, "writing the first mesh-admin grant; will retry"),
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
}

/// Reads the other clusters' records from the local replica and rebuilds the catalog.
fn rebuild(
    catalog: &mut Catalog,
    discovery: &Discovery,
    store: &Store,
    own: &ClusterRecord,
) -> Option<Arc<MeshConfig>> {
    let mut clusters = records::decode_clusters(store.list(records::CLUSTERS_PREFIX));
    // Our own record is known locally even before the store has it (no quorum yet).
    clusters.retain(|c| c.name != own.name);
    clusters.push(own.clone());
    let exports = records::decode_exports(store.list(records::EXPORTS_PREFIX));
    let policies: Vec<Policy> = store
        .list(isthmus_core::policy::STORE_PREFIX)
        .into_iter()
        .filter_map(|(key, record)| match Policy::from_json(&record.value) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(%key, error = %e, "skipping a stored policy that does not validate");
                None
            }
        })
        .collect();
    catalog.rebuild(discovery, &clusters, &exports, &policies)
}

struct CatalogLoop {
    catalog: Catalog,
    discovery: Discovery,
    /// Whether `discovery` is a complete listing (always, for a file).
    synced: bool,
    /// The discovery file and its poll interval (file mode).
    file: Option<(PathBuf, Duration)>,
    /// Kubernetes discovery's output (Kubernetes mode).
    kube: Option<watch::Receiver<Option<Discovery>>>,
    store: Store,
    cluster_record: ClusterRecord,
    gateway: watch::Receiver<Option<SocketAddr>>,
    desired: watch::Sender<Desired>,
    config: watch::Sender<Arc<MeshConfig>>,
    stop: watch::Receiver<bool>,
}

async fn catalog_loop(mut l: CatalogLoop) {
    let mut revision = l.store.revision();
    let period = l
        .file
        .as_ref()
        .map_or(Duration::from_secs(3600), |(_, p)| *p);
    let mut poll = tokio::time::interval(period);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = l.stop.changed() => return,
            changed = revision.changed() => if changed.is_err() { return },
            changed = l.gateway.changed() => if changed.is_err() { return },
            changed = kube_changed(&mut l.kube) => {
                if changed.is_err() { return }
                if let Some(d) = l.kube.as_mut().and_then(|k| k.borrow_and_update().clone()) {
                    l.discovery = d;
                    l.synced = true;
                }
            }
            _ = poll.tick(), if l.file.is_some() => {
                let Some((path, _)) = &l.file else { continue };
                match discovery::load(path) {
                    Ok(d) => { last_error = None; l.discovery = d; }
                    Err(e) => {
                        // Keep the last good discovery; say so once per distinct error.
                        let msg = e.to_string();
                        if last_error.as_deref() != Some(&msg) {
                            tracing::error!(error = %msg, "discovery file rejected; keeping the last good services");
                            last_error = Some(msg);
                        }
                    }
                }
            }
        }
        l.cluster_record.gateway = *l.gateway.borrow_and_update();
        l.desired.send_if_modified(|d| {
            let next = Desired {
                cluster: l.cluster_record.clone(),
                exports: l.synced.then(|| l.catalog.exports(&l.discovery)),
            };
            if *d == next {
                false
            } else {
                *d = next;
                true
            }
        });
        if let Some(config) = rebuild(&mut l.catalog, &l.discovery, &l.store, &l.cluster_record) {
            tracing::debug!(
                version = config.version,
                services = config.services.len(),
                "configuration changed"
            );
            l.config.send_replace(config);
        }
    }
}

/// Waits for Kubernetes discovery to change; never, in file mode.
async fn kube_changed(
    kube: &mut Option<watch::Receiver<Option<Discovery>>>,
) -> Result<(), watch::error::RecvError> {
    match kube {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

/// Makes the store hold exactly this cluster's desired records, retrying until it does, and
/// keeps the leases on its exports renewed.
async fn publisher(
    store: Store,
    mut desired: watch::Receiver<Desired>,
    lease: Duration,
    mut stop: watch::Receiver<bool>,
) {
    const RETRY: Duration = Duration::from_millis(300);
    let mut renew = tokio::time::interval((lease / 3).max(Duration::from_millis(10)));
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ok = false;
    let mut want = desired.borrow_and_update().clone();
    loop {
        if !ok {
            ok = publish(&store, &want, lease).await;
        }
        tokio::select! {
            _ = stop.changed() => return,
            changed = desired.changed() => {
                if changed.is_err() { return }
                want = desired.borrow_and_update().clone();
                ok = false;
            }
            _ = renew.tick() => {
                if !renew_exports(&store, &want).await {
                    ok = false;
                }
            }
            _ = tokio::time::sleep(RETRY), if !ok => {}
        }
    }
}

/// Renews the lease of every export of ours; false if one must be written again.
async fn renew_exports(store: &Store, want: &Desired) -> bool {
    let own = &want.cluster.name;
    let mut ok = true;
    for x in want.exports.iter().flatten() {
        let key = records::export_key(&x.namespace, &x.name, own);
        if let Err(e) = store.renew(&key).await {
            tracing::debug!(%key, error = %e, "renewing an export's lease failed");
            ok = false;
        }
    }
    ok
}

async fn publish(store: &Store, want: &Desired, lease: Duration) -> bool {
    let own = &want.cluster.name;
    let mut puts: Vec<(String, Vec<u8>)> = Vec::new();
    let cluster_key = records::cluster_key(own);
    if let Ok(bytes) = serde_json::to_vec(&want.cluster) {
        puts.push((cluster_key, bytes));
    }
    for x in want.exports.iter().flatten() {
        if let Ok(bytes) = serde_json::to_vec(x) {
            puts.push((records::export_key(&x.namespace, &x.name, own), bytes));
        }
    }
    let mut ok = true;
    for (key, value) in &puts {
        let leased = key.starts_with(records::EXPORTS_PREFIX);
        if store
            .get(key)
            .is_some_and(|r| &r.value == value && r.lease.is_some() == leased)
        {
            continue;
        }
        let written = if leased {
            store.put_with_lease(key, value.clone(), lease).await
        } else {
            store.put(key, value.clone()).await
        };
        if let Err(e) = written {
            tracing::debug!(%key, error = %e, "publishing to the federation failed; will retry");
            ok = false;
        }
    }
    // Withdraw exports of ours that are no longer desired (once discovery knows).
    if want.exports.is_none() {
        return ok;
    }
    for (key, _) in store.list(records::EXPORTS_PREFIX) {
        let ours = key.rsplit('/').next() == Some(own.as_str());
        if ours && !puts.iter().any(|(k, _)| *k == key) {
            if let Err(e) = store.delete(&key).await {
                tracing::debug!(%key, error = %e, "withdrawing an export failed; will retry");
                ok = false;
            }
        }
    }
    ok
}
