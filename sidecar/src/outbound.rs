//! Outbound: listeners on the services' virtual IPs, kept in step with the configuration.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use isthmus_core::mesh::{MeshConfig, Protocol};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::proxy::HttpProxy;
use crate::upstream::Connector;

/// The VIP listeners currently bound, by address.
#[derive(Clone, Default)]
pub struct Listeners {
    bound: Arc<Mutex<HashMap<SocketAddr, JoinHandle<()>>>>,
}

impl Listeners {
    /// Addresses bound right now, sorted.
    pub fn bound(&self) -> Vec<SocketAddr> {
        let mut addrs: Vec<SocketAddr> = self.lock().keys().copied().collect();
        addrs.sort();
        addrs
    }

    pub(crate) fn close_all(&self) {
        for (_, task) in self.lock().drain() {
            task.abort();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, JoinHandle<()>>> {
        self.bound.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Binds a listener for every (VIP, port) in the config and drops the ones that left.
pub(crate) async fn reconcile(
    listeners: Listeners,
    mut config: watch::Receiver<Arc<MeshConfig>>,
    upstream: Arc<Connector>,
    proxy: Arc<HttpProxy>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let current = config.borrow_and_update().clone();
        let wanted: Vec<(SocketAddr, Protocol)> = current
            .services
            .iter()
            .flat_map(|s| {
                s.ports
                    .iter()
                    .map(move |p| (SocketAddr::new(s.vip, p.port), p.protocol))
            })
            .collect();
        {
            let mut bound = listeners.lock();
            bound.retain(|addr, task| {
                let keep = wanted.iter().any(|(a, _)| a == addr);
                if !keep {
                    task.abort();
                    tracing::info!(%addr, "outbound listener closed");
                }
                keep
            });
        }
        for (addr, protocol) in wanted {
            if listeners.lock().contains_key(&addr) {
                continue;
            }
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    let task = match protocol {
                        Protocol::Http => tokio::spawn(accept_http(listener, addr, proxy.clone())),
                        _ => tokio::spawn(accept(listener, addr, config.clone(), upstream.clone())),
                    };
                    listeners.lock().insert(addr, task);
                    tracing::debug!(%addr, "outbound listener bound");
                }
                Err(e) => tracing::warn!(%addr, error = %e, "cannot bind outbound listener"),
            }
        }
        tokio::select! {
            changed = config.changed() => if changed.is_err() { break },
            _ = stop.changed() => break,
        }
    }
    listeners.close_all();
}

/// HTTP/1.1 from the application: every request goes through the L7 proxy.
async fn accept_http(listener: TcpListener, vip: SocketAddr, proxy: Arc<HttpProxy>) {
    loop {
        let Ok((app, client)) = listener.accept().await else {
            continue;
        };
        let _ = app.set_nodelay(true);
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, std::convert::Infallible>(proxy.handle(vip, client, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(app), service)
                .with_upgrades()
                .await
            {
                tracing::debug!(%vip, %client, error = %e, "outbound HTTP connection ended with an error");
            }
        });
    }
}

async fn accept(
    listener: TcpListener,
    addr: SocketAddr,
    config: watch::Receiver<Arc<MeshConfig>>,
    upstream: Arc<Connector>,
) {
    loop {
        let Ok((app, peer)) = listener.accept().await else {
            continue;
        };
        let config = config.clone();
        let upstream = upstream.clone();
        tokio::spawn(async move {
            if let Err(e) = forward(app, addr, &config, &upstream).await {
                tracing::warn!(vip = %addr, client = %peer, error = %e, "outbound connection failed");
            }
        });
    }
}

async fn forward(
    mut app: TcpStream,
    vip: SocketAddr,
    config: &watch::Receiver<Arc<MeshConfig>>,
    upstream: &Connector,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let _ = app.set_nodelay(true);
    let current = config.borrow().clone();
    let service = current
        .service_by_vip(vip.ip())
        .cloned()
        .ok_or_else(|| format!("no service has VIP {}", vip.ip()))?;
    let (mut tls, route) = upstream.connect(&current, &service, vip.port()).await?;
    tracing::debug!(service = %service.key(), ?route, "outbound connection routed");
    tokio::io::copy_bidirectional(&mut app, &mut tls).await?;
    Ok(())
}
