//! A component's admin server with the metrics every component shares: the configuration
//! version and service count it is running with, and readiness once the first configuration
//! has arrived.

use std::net::SocketAddr;
use std::sync::Arc;

use super::{AdminHandle, AdminState};
use crate::mesh::MeshConfig;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running admin server plus the task that keeps its gauges current.
pub struct ComponentAdmin {
    handle: AdminHandle,
    follower: JoinHandle<()>,
}

impl ComponentAdmin {
    /// Serves `/metrics`, `/ready` and `/debug/config` for `component` on `listen`.
    pub async fn start(
        component: &str,
        listen: SocketAddr,
        config: watch::Receiver<Arc<MeshConfig>>,
    ) -> std::io::Result<Self> {
        Self::start_with(component, listen, config, |_| {}).await
    }

    /// Like [`ComponentAdmin::start`], and lets the component add its own metrics to the
    /// `isthmus_<component>` registry first.
    pub async fn start_with(
        component: &str,
        listen: SocketAddr,
        config: watch::Receiver<Arc<MeshConfig>>,
        register: impl FnOnce(&mut Registry),
    ) -> std::io::Result<Self> {
        Self::start_full(component, listen, config, register, |_| {}).await
    }

    /// Like [`ComponentAdmin::start_with`], and also lets the component register metrics at
    /// the root, unprefixed (the sidecar's `istio_*` metrics keep Istio's exact names).
    pub async fn start_full(
        component: &str,
        listen: SocketAddr,
        config: watch::Receiver<Arc<MeshConfig>>,
        register: impl FnOnce(&mut Registry),
        register_root: impl FnOnce(&mut Registry),
    ) -> std::io::Result<Self> {
        let mut root = Registry::default();
        register_root(&mut root);
        let registry = root.sub_registry_with_prefix(format!("isthmus_{component}"));
        register(registry);
        let version = Gauge::<i64>::default();
        let services = Gauge::<i64>::default();
        let clusters = Gauge::<i64>::default();
        registry.register(
            "config_version",
            "Version of the configuration in use",
            version.clone(),
        );
        registry.register(
            "config_services",
            "Services in the configuration in use",
            services.clone(),
        );
        registry.register(
            "config_clusters",
            "Member clusters in the configuration in use",
            clusters.clone(),
        );
        let (ready_tx, ready) = watch::channel(false);
        let debug_config = {
            let config = config.clone();
            Arc::new(move || {
                serde_json::to_string_pretty(config.borrow().as_ref()).unwrap_or_default()
            })
        };
        let mut follow = config.clone();
        let follower = tokio::spawn(async move {
            loop {
                let current = follow.borrow_and_update().clone();
                version.set(i64::try_from(current.version).unwrap_or(i64::MAX));
                services.set(i64::try_from(current.services.len()).unwrap_or(i64::MAX));
                clusters.set(i64::try_from(current.clusters.len()).unwrap_or(i64::MAX));
                ready_tx.send_replace(current.version > 0);
                if follow.changed().await.is_err() {
                    return;
                }
            }
        });
        let handle = super::serve(
            listen,
            AdminState {
                registry: Arc::new(root),
                ready,
                debug_config,
            },
        )
        .await?;
        Ok(ComponentAdmin { handle, follower })
    }

    pub fn addr(&self) -> SocketAddr {
        self.handle.addr()
    }

    pub async fn shutdown(self) {
        self.follower.abort();
        self.handle.shutdown().await;
    }
}
