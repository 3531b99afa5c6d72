//! A component's admin server with the metrics every component shares: the configuration
//! version and service count it is running with, and readiness once the first configuration
//! has arrived.

use std::net::SocketAddr;
use std::sync::Arc;

use super::{AdminHandle, AdminListen, AdminState};
use crate::mesh::MeshConfig;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running admin server plus the task that keeps its gauges current.
pub struct ComponentAdmin {
    handle: AdminHandle,
    follower: JoinHandle<()>,
    failing: Failing,
}

/// Turns a component's `/ready` false for good: for a part that failed in a way the
/// component cannot serve through (a federation member whose log cannot be written).
#[derive(Clone)]
pub struct Failing {
    failed: Arc<std::sync::atomic::AtomicBool>,
    ready: Arc<watch::Sender<bool>>,
}

impl Failing {
    pub fn fail(&self) {
        self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.ready.send_replace(false);
    }
}

impl ComponentAdmin {
    /// Serves `/metrics`, `/ready` and `/debug/config` for `component` on `listen`.
    pub async fn start(
        component: &str,
        listen: impl Into<AdminListen>,
        config: watch::Receiver<Arc<MeshConfig>>,
    ) -> std::io::Result<Self> {
        Self::start_with(component, listen, config, |_| {}).await
    }

    /// Like [`ComponentAdmin::start`], and lets the component add its own metrics to the
    /// `isthmus_<component>` registry first.
    pub async fn start_with(
        component: &str,
        listen: impl Into<AdminListen>,
        config: watch::Receiver<Arc<MeshConfig>>,
        register: impl FnOnce(&mut Registry),
    ) -> std::io::Result<Self> {
        Self::start_full(component, listen, config, register, |_| {}).await
    }

    /// Like [`ComponentAdmin::start_with`], and also lets the component register metrics at
    /// the root, unprefixed (the sidecar's `istio_*` metrics keep Istio's exact names).
    pub async fn start_full(
        component: &str,
        listen: impl Into<AdminListen>,
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
        let failing = Failing {
            failed: Arc::default(),
            ready: Arc::new(ready_tx),
        };
        let debug_config = {
            let config = config.clone();
            Arc::new(move || {
                serde_json::to_string_pretty(config.borrow().as_ref()).unwrap_or_default()
            })
        };
        let mut follow = config.clone();
        let ready_tx = failing.clone();
        let follower = tokio::spawn(async move {
            loop {
                let current = follow.borrow_and_update().clone();
                version.set(i64::try_from(current.version).unwrap_or(i64::MAX));
                services.set(i64::try_from(current.services.len()).unwrap_or(i64::MAX));
                clusters.set(i64::try_from(current.clusters.len()).unwrap_or(i64::MAX));
                let failed = ready_tx.failed.load(std::sync::atomic::Ordering::SeqCst);
                ready_tx.ready.send_replace(current.version > 0 && !failed);
                if follow.changed().await.is_err() {
                    return;
                }
            }
        });
        let listen: AdminListen = listen.into();
        let handle = super::serve(
            listen.addr,
            AdminState {
                registry: Arc::new(root),
                ready,
                debug_config,
                expose_debug: listen.expose_debug,
            },
        )
        .await?;
        Ok(ComponentAdmin {
            handle,
            follower,
            failing,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.handle.addr()
    }

    /// What turns `/ready` false for good.
    pub fn failing(&self) -> Failing {
        self.failing.clone()
    }

    pub async fn shutdown(self) {
        self.follower.abort();
        self.handle.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn status_of_ready(addr: SocketAddr) -> String {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        out.split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string()
    }

    #[tokio::test]
    async fn a_failed_component_stays_unready_whatever_config_arrives() {
        let (tx, rx) = watch::channel(Arc::new(MeshConfig::default()));
        let admin = ComponentAdmin::start("test", "127.0.0.1:0".parse::<SocketAddr>().unwrap(), rx)
            .await
            .unwrap();
        let addr = admin.addr();
        assert_eq!(status_of_ready(addr).await, "503");
        let config = |version| {
            Arc::new(MeshConfig {
                version,
                ..MeshConfig::default()
            })
        };
        tx.send_replace(config(1));
        tokio::time::timeout(Duration::from_secs(5), async {
            while status_of_ready(addr).await != "200" {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("ready once a config arrives");
        admin.failing().fail();
        assert_eq!(status_of_ready(addr).await, "503");
        tx.send_replace(config(2));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(status_of_ready(addr).await, "503");
        admin.shutdown().await;
    }
}
