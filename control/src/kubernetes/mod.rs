//! Kubernetes discovery through kube-rs: the same [`Discovery`] model as the file, from the
//! API server's Services, EndpointSlices, Pods, Namespaces and the Multi-Cluster Services
//! API's ServiceExports; and, back into the cluster, a ServiceImport for every imported
//! service and the KEP-1645 conditions on this cluster's ServiceExports.
//!
//! Tasks (started by [`crate::start`] when the discovery source is Kubernetes):
//! - the watch loop: one kube-rs watcher + reflector per resource, merged; after the first
//!   complete list of all five it publishes a new [`Discovery`] whenever the objects change
//!   (events that arrive together are folded into one rebuild). kube-rs's watcher resumes
//!   from the last resource version after a dropped connection, relists after `410 Gone`,
//!   and moves its resource version forward on bookmarks; while a relist is under way the
//!   reflectors keep the previous objects, so nothing is withdrawn on a restart.
//! - the import writer ([`imports`]): applies a ServiceImport per imported service.
//! - the status writer ([`status`]): keeps `Valid` and `Conflict` on each ServiceExport.
//! - the policy writer ([`policies`]): Isthmus's and Istio's policy resources (the latter
//!   once their CRDs are installed) into the federation store's policies.
//!
//! The resource mapping is in [`mapping`] and docs/kubernetes.md.

pub mod conditions;
mod imports;
pub mod mapping;
pub mod policies;
pub mod publish;
pub mod resources;
mod status;
pub mod tokenreview;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use futures::FutureExt;
use isthmus_core::mesh::MeshConfig;
use isthmus_federation::Store;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store as Reflected};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::discovery::Discovery;
use mapping::Snapshot;
use resources::ServiceExport;

/// The sidecar's inbound port: what callers' sidecars dial on a pod's IP.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;

/// The field manager of everything the control plane writes by server-side apply.
pub(crate) const FIELD_MANAGER: &str = "isthmus-control";

/// Errors connecting to the Kubernetes API.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading the kubeconfig {path} failed")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("the in-cluster configuration (service account token, KUBERNETES_SERVICE_HOST) is not available")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("building the Kubernetes client failed")]
    Client(#[source] kube::Error),
}

/// How to reach the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    /// The pod's service account (`KUBERNETES_SERVICE_HOST`, the mounted token and CA).
    InCluster,
    /// A kubeconfig file, with its current context unless one is named.
    Kubeconfig {
        path: PathBuf,
        context: Option<String>,
    },
}

/// Builds a client for `connection` (TLS with rustls and ring).
pub async fn client(connection: &Connection) -> Result<kube::Client, KubeError> {
    let config = match connection {
        Connection::InCluster => kube::Config::incluster().map_err(KubeError::InCluster)?,
        Connection::Kubeconfig { path, context } => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                }
            })?;
            let options = kube::config::KubeConfigOptions {
                context: context.clone(),
                ..Default::default()
            };
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
    };
    kube::Client::try_from(config).map_err(KubeError::Client)
}

/// Kubernetes discovery, ready to start: a client and the mapping's settings.
#[derive(Clone)]
pub struct KubeSource {
    pub client: kube::Client,
    /// The sidecar's inbound port on each pod (default 15006).
    pub inbound_port: u16,
    /// How often the writers re-check what they wrote even when nothing changed, and how
    /// long they wait before retrying a failed write.
    pub resync: Duration,
    pub retry: Duration,
    /// How often API discovery is asked again about policy kinds it did not serve yet
    /// (CRDs not installed), so installing them later starts their watches.
    pub api_recheck: Duration,
}

impl KubeSource {
    pub fn new(client: kube::Client) -> Self {
        KubeSource {
            client,
            inbound_port: DEFAULT_INBOUND_PORT,
            resync: Duration::from_secs(30),
            retry: Duration::from_secs(1),
            api_recheck: Duration::from_secs(30),
        }
    }
}

/// The reflectors' read sides.
#[derive(Clone)]
struct Stores {
    namespaces: Reflected<Namespace>,
    services: Reflected<Service>,
    slices: Reflected<EndpointSlice>,
    pods: Reflected<Pod>,
    exports: Reflected<ServiceExport>,
}

impl Stores {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            namespaces: self.namespaces.state(),
            services: self.services.state(),
            slices: self.slices.state(),
            pods: self.pods.state(),
            exports: self.exports.state(),
        }
    }
}

/// Kubernetes discovery running: its output and its tasks.
pub(crate) struct Running {
    /// `None` until every resource has been listed once.
    pub discovery: watch::Receiver<Option<Discovery>>,
    pub tasks: Vec<JoinHandle<()>>,
    source: KubeSource,
    stores: Stores,
}

type Events = BoxStream<'static, (&'static str, Result<bool, watcher::Error>)>;

fn follow<K>(api: Api<K>, writer: reflector::store::Writer<K>, kind: &'static str) -> Events
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .map(move |e| (kind, e.map(|e| matches!(e, watcher::Event::InitDone))))
        .boxed()
}

/// Starts the watch loop.
pub(crate) fn start(source: KubeSource, stop: watch::Receiver<bool>) -> Running {
    let c = source.client.clone();
    let (namespaces, ns_w) = reflector::store();
    let (services, svc_w) = reflector::store();
    let (slices, slice_w) = reflector::store();
    let (pods, pod_w) = reflector::store();
    let (exports, export_w) = reflector::store();
    let streams = vec![
        follow(Api::<Namespace>::all(c.clone()), ns_w, "namespaces"),
        follow(Api::<Service>::all(c.clone()), svc_w, "services"),
        follow(
            Api::<EndpointSlice>::all(c.clone()),
            slice_w,
            "endpointslices",
        ),
        follow(Api::<Pod>::all(c.clone()), pod_w, "pods"),
        follow(Api::<ServiceExport>::all(c), export_w, "serviceexports"),
    ];
    let stores = Stores {
        namespaces,
        services,
        slices,
        pods,
        exports,
    };
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(watch_loop(
        streams,
        stores.clone(),
        source.inbound_port,
        tx,
        stop,
    ));
    Running {
        discovery: rx,
        tasks: vec![task],
        source,
        stores,
    }
}

impl Running {
    /// Starts the import, status and policy writers, which follow the merged configuration,
    /// the federation store and the cluster's policy resources.
    pub fn start_writers(
        &mut self,
        cluster: &str,
        config: watch::Receiver<Arc<MeshConfig>>,
        store: Store,
        stop: watch::Receiver<bool>,
    ) {
        self.tasks.push(tokio::spawn(imports::run(
            self.source.clone(),
            config,
            stop.clone(),
        )));
        self.tasks
            .push(tokio::spawn(status::run(status::StatusWriter {
                source: self.source.clone(),
                cluster: cluster.to_string(),
                store: store.clone(),
                discovery: self.discovery.clone(),
                exports: self.stores.exports.clone(),
                services: self.stores.services.clone(),
                stop: stop.clone(),
            })));
        self.tasks
            .push(tokio::spawn(policies::run(policies::PolicyWriter {
                source: self.source.clone(),
                cluster: cluster.to_string(),
                store,
                stop,
            })));
    }
}

/// `first` and every event of `events` that is ready now, to be handled as one batch.
pub(crate) fn with_ready<S: futures::Stream + Unpin>(
    first: S::Item,
    events: &mut S,
) -> Vec<S::Item> {
    let mut batch = vec![first];
    while let Some(Some(e)) = events.next().now_or_never() {
        batch.push(e);
    }
    batch
}

async fn watch_loop(
    streams: Vec<Events>,
    stores: Stores,
    inbound_port: u16,
    out: watch::Sender<Option<Discovery>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut events = futures::stream::select_all(streams);
    let mut synced: BTreeSet<&'static str> = BTreeSet::new();
    let mut reported: BTreeSet<String> = BTreeSet::new();
    let mut failing: BTreeSet<&'static str> = BTreeSet::new();
    loop {
        let first = tokio::select! {
            _ = stop.changed() => return,
            e = events.next() => e,
        };
        let Some(first) = first else { return };
        // Fold everything already waiting into this rebuild (a burst of pod churn).
        for (kind, result) in with_ready(first, &mut events) {
            match result {
                Ok(init_done) => {
                    if failing.remove(kind) {
                        tracing::info!(resource = kind, "Kubernetes watch recovered");
                    }
                    if init_done {
                        synced.insert(kind);
                    }
                }
                Err(e) => {
                    // kube-rs retries with backoff (and relists after 410 Gone); say it
                    // once per outage.
                    if failing.insert(kind) {
                        tracing::warn!(resource = kind, error = %e, "Kubernetes watch failed; retrying");
                    } else {
                        tracing::debug!(resource = kind, error = %e, "Kubernetes watch failed again");
                    }
                }
            }
        }
        if synced.len() < 5 {
            continue;
        }
        let (discovery, problems) = mapping::discovery(&stores.snapshot(), inbound_port);
        for p in problems {
            if reported.insert(p.clone()) {
                tracing::warn!("{p}");
            }
        }
        out.send_if_modified(|d| {
            if d.as_ref() == Some(&discovery) {
                false
            } else {
                *d = Some(discovery);
                true
            }
        });
    }
}
