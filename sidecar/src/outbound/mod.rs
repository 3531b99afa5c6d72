//! Outbound: what an application's connection to a mesh service goes through, from the
//! listener on the service's virtual IP to a session with a chosen endpoint.
//!
//! Here, the listeners, kept in step with the configuration: ports declared `http`, `http2`
//! or `grpc` go through the L7 proxy (the application may speak HTTP/1.1 or HTTP/2 with prior
//! knowledge on any of them); `tcp` ports are relayed as opaque bytes; undeclared (`auto`)
//! ports are sniffed per connection ([`crate::protocol`]).
//!
//! The rooms, in the order a request meets them:
//! - L7: [`proxy`] carries out what `proxy/plan.rs` (pure) decides from [`routing`]'s
//!   compiled VirtualServices and DestinationRules (with [`cors`] and [`ratelimit`]), then
//!   `proxy/attempts.rs` runs the attempts (retries, timeouts, circuit breaker, mirror;
//!   small bodies kept for retries by `replay.rs`), and `proxy/report.rs` records the
//!   answered request's metrics and access log.
//! - L4: `l4.rs` routes opaque TCP (`tls` routes by the server name [`sni`] reads, else `tcp`
//!   routes).
//! - Both then pick alike: [`failover`] (the priority table: which clusters and localities)
//!   and [`balance`] (the DestinationRule's balancer, outlier detection, circuit breaking).
//! - And dial alike: [`upstream`] (mTLS to a local endpoint, or through the gateway to a
//!   remote cluster), with `pool.rs` keeping upstream connections.

pub mod balance;
pub mod cors;
pub mod failover;
pub(crate) mod l4;
pub(crate) mod pool;
pub mod proxy;
pub mod ratelimit;
pub(crate) mod replay;
pub mod routing;
pub mod sni;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use isthmus_core::mesh::{MeshConfig, Protocol};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Duration;

use crate::protocol::{sniff, Sniffed};

use crate::proxy::HttpProxy;

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
    outbound: Outbound,
    mut stop: watch::Receiver<bool>,
) {
    let mut config = outbound.config.clone();
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
            .chain(endpoint_listeners(&current))
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
                    let task = tokio::spawn(accept(listener, addr, protocol, outbound.clone()));
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

/// How long an undeclared port waits for the application's first bytes before relaying the
/// connection as opaque TCP (server-first protocols send nothing until the server speaks).
pub const DETECTION_TIMEOUT: Duration = Duration::from_millis(100);

/// What serving an outbound connection needs.
#[derive(Clone)]
pub(crate) struct Outbound {
    pub config: watch::Receiver<Arc<MeshConfig>>,
    pub proxy: Arc<HttpProxy>,
    pub limits: crate::limits::Limits,
    pub metrics: crate::metrics::Metrics,
}

impl Outbound {
    /// Serves one application connection meant for `vip` (a service's VIP and port) by the
    /// port's declared protocol.
    async fn serve(&self, app: TcpStream, vip: SocketAddr, client: SocketAddr, protocol: Protocol) {
        let http = match protocol {
            Protocol::Auto => detect_http(&app).await,
            p => p.is_http(),
        };
        if http {
            serve_http(app, vip, client, self.proxy.clone()).await;
        } else if let Err(e) = forward(
            app,
            (vip, client),
            &self.config,
            &self.proxy,
            self.limits.tcp_idle_timeout,
        )
        .await
        {
            if matches!(
                e.downcast_ref::<crate::upstream::UpstreamError>(),
                Some(crate::upstream::UpstreamError::Overflow { .. })
            ) {
                self.metrics.refused("outbound", "overflow").inc();
            }
            tracing::warn!(%vip, %client, error = %e, "outbound connection failed");
        }
    }
}

async fn accept(listener: TcpListener, vip: SocketAddr, protocol: Protocol, outbound: Outbound) {
    let admission = crate::limits::Admission::new(
        &outbound.limits,
        outbound.metrics.refused("outbound", "limit"),
    );
    loop {
        let Ok((app, client)) = listener.accept().await else {
            continue;
        };
        let Some(slot) = admission.admit() else {
            tracing::debug!(%vip, %client, "outbound listener at its connection limit; closed");
            continue;
        };
        let _ = app.set_nodelay(true);
        let outbound = outbound.clone();
        tokio::spawn(async move {
            let _slot = slot;
            outbound.serve(app, vip, client, protocol).await
        });
    }
}

/// Serves connections redirected to the outbound port (Kubernetes mode, `crate::redirect`):
/// each goes where the application sent it — a mesh service's VIP (or ClusterIP) and port
/// through the mesh, anything else straight to its original destination (passthrough).
pub(crate) async fn accept_redirected(
    listener: TcpListener,
    outbound: Outbound,
    mut stop: watch::Receiver<bool>,
) {
    let admission = crate::limits::Admission::new(
        &outbound.limits,
        outbound.metrics.refused("redirect", "limit"),
    );
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((app, client)) = accepted else {
            continue;
        };
        let Some(slot) = admission.admit() else {
            tracing::debug!(%client, "redirect port at its connection limit; closed");
            continue;
        };
        let _ = app.set_nodelay(true);
        let outbound = outbound.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let dst = match crate::redirect::original_destination(&app) {
                Ok(dst) => dst,
                Err(e) => {
                    tracing::info!(%client, error = %e, "connection to the outbound port was not redirected; closed");
                    return;
                }
            };
            // A connection made straight to the outbound port keeps its destination: it
            // was not redirected, and relaying it would dial the listener itself.
            if app.local_addr().is_ok_and(|local| local == dst) {
                tracing::info!(%client, %dst, "connection made straight to the outbound port, not redirected; closed");
                outbound.metrics.refused("redirect", "not_redirected").inc();
                return;
            }
            let protocol = mesh_protocol(&outbound.config.borrow(), dst);
            match protocol {
                Some(protocol) => outbound.serve(app, dst, client, protocol).await,
                None => passthrough(app, dst, outbound.limits.tcp_idle_timeout).await,
            }
        });
    }
}

/// Relays a connection to a destination outside the mesh, untouched.
async fn passthrough(mut app: TcpStream, dst: SocketAddr, idle: Duration) {
    match TcpStream::connect(dst).await {
        Ok(mut out) => {
            let _ = out.set_nodelay(true);
            let _ = crate::limits::relay(&mut app, &mut out, idle).await;
        }
        Err(e) => tracing::debug!(%dst, error = %e, "passthrough connection failed"),
    }
}

/// How long a connection to a service with `tls` routes waits for its ClientHello.
pub const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(1);

/// Peeks at the application's first bytes for a TLS ClientHello (at most
/// [`crate::sni::MAX_HELLO`] bytes, for at most [`CLIENT_HELLO_TIMEOUT`]) and returns the
/// server name it asks for: `None` when it asks for none, is not TLS, or is not whole in time
/// (the connection then follows the `tcp` routes).
async fn read_server_name(app: &TcpStream) -> Option<String> {
    use crate::sni::{server_name, Hello, MAX_HELLO};
    let deadline = tokio::time::Instant::now() + CLIENT_HELLO_TIMEOUT;
    let mut buf = vec![0u8; MAX_HELLO];
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, app.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return None,
        };
        match server_name(&buf[..n]) {
            Hello::ClientHello { server_name } => return server_name,
            Hello::NotTls(reason) => {
                tracing::debug!(reason, "no ClientHello: routed as TCP");
                return None;
            }
            Hello::NeedMore if n == buf.len() => return None,
            Hello::NeedMore => {
                if n == seen {
                    if tokio::time::Instant::now() >= deadline {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                seen = n;
            }
        }
    }
}

/// Peeks at the application's first bytes until they tell HTTP from anything else, or the
/// detection timeout passes.
pub(crate) async fn detect_http(app: &TcpStream) -> bool {
    let deadline = tokio::time::Instant::now() + DETECTION_TIMEOUT;
    let mut buf = [0u8; 32];
    let mut seen = 0;
    loop {
        let peeked = tokio::time::timeout_at(deadline, app.peek(&mut buf)).await;
        let n = match peeked {
            Ok(Ok(n)) if n > 0 => n,
            // Closed, failed or silent: nothing says HTTP.
            _ => return false,
        };
        match sniff(&buf[..n]) {
            Sniffed::Http1 | Sniffed::Http2 => return true,
            Sniffed::Opaque => return false,
            Sniffed::NeedMore if n == buf.len() => return false,
            Sniffed::NeedMore => {
                if n == seen {
                    // peek returns at once while the same bytes wait: give the rest a moment.
                    if tokio::time::Instant::now() >= deadline {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                seen = n;
            }
        }
    }
}

/// HTTP/1.1 or HTTP/2 (prior knowledge) from the application: every request goes through
/// the L7 proxy; HTTP/1.1 upgrades are allowed.
async fn serve_http(app: TcpStream, vip: SocketAddr, client: SocketAddr, proxy: Arc<HttpProxy>) {
    let service = hyper::service::service_fn(move |req| {
        let proxy = proxy.clone();
        async move { Ok::<_, std::convert::Infallible>(proxy.handle(vip, client, req).await) }
    });
    if let Err(e) = crate::protocol::server_builder()
        .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(app), service)
        .await
    {
        tracing::debug!(%vip, %client, error = %e, "outbound HTTP connection ended with an error");
    }
}

/// Relays one opaque TCP connection to the service, recording Istio's TCP metrics: to the
/// endpoint a headless VIP names, or to a service VIP's destination as [`l4`] picks it.
async fn forward(
    mut app: TcpStream,
    (vip, client): (SocketAddr, SocketAddr),
    config: &watch::Receiver<Arc<MeshConfig>>,
    proxy: &HttpProxy,
    idle: Duration,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let current = config.borrow().clone();
    let metrics = proxy.metrics();
    let (service, mut tls, route, picked) = match current.endpoint_by_vip(vip.ip()) {
        Some((service, endpoint)) => {
            let (tls, route) = proxy
                .connector()
                .connect_endpoint(&current, service, endpoint, vip.port())
                .await?;
            (service.clone(), tls, route, None)
        }
        None => {
            let service = current
                .service_by_vip(vip.ip())
                .ok_or_else(|| format!("no service has VIP {}", vip.ip()))?;
            let key = (service.name.clone(), service.namespace.clone());
            let server_name = if proxy.table(&current).has_tls_routes(&key) {
                read_server_name(&app).await
            } else {
                None
            };
            let (tls, route, service, lease) = proxy
                .connect_tcp(
                    &current,
                    service,
                    (vip.port(), server_name.as_deref()),
                    client,
                )
                .await?;
            (service, tls, route, Some(lease))
        }
    };
    tracing::debug!(service = %service.key(), ?route, "outbound connection routed");
    let destination_cluster = match &route {
        crate::upstream::Route::Local(_) => current.cluster.clone(),
        crate::upstream::Route::Remote(c) => c.clone(),
    };
    let labels = metrics.labels((&service.name, &service.namespace), destination_cluster);
    metrics.opened(&labels);
    let copied = crate::limits::relay(&mut app, &mut tls, idle).await;
    if let Some(lease) = &picked {
        proxy.tcp_closed(lease);
    }
    // Istio counts request bytes (from the app) as received, response bytes as sent.
    let (received, sent) = copied.as_ref().map_or((0, 0), |c| *c);
    metrics.closed(&labels, sent, received);
    copied?;
    Ok(())
}

/// How a redirected connection to `dst` is served: by its port's protocol when `dst` is a
/// service VIP and port, as TCP when it is a headless endpoint's VIP and one of its service's
/// ports (exactly that endpoint, as its listener does), `None` outside the mesh.
fn mesh_protocol(config: &MeshConfig, dst: SocketAddr) -> Option<Protocol> {
    match config.endpoint_by_vip(dst.ip()) {
        Some((service, _)) => service.port(dst.port()).map(|_| Protocol::Tcp),
        None => config
            .service_by_vip(dst.ip())
            .and_then(|s| s.port(dst.port()))
            .map(|p| p.protocol),
    }
}

/// A listener for every headless endpoint's VIP on each of its service's ports. Always relayed
/// as TCP: the application chose one endpoint, so there is nothing to route at L7, and the
/// destination sidecar serves HTTP ports as HTTP all the same (docs/dns.md).
fn endpoint_listeners(config: &MeshConfig) -> Vec<(SocketAddr, Protocol)> {
    config
        .services
        .iter()
        .filter_map(|s| Some((s, s.headless.as_ref()?)))
        .flat_map(|(s, headless)| {
            headless.endpoints.iter().flat_map(move |e| {
                s.ports
                    .iter()
                    .map(move |p| (SocketAddr::new(e.vip, p.port), Protocol::Tcp))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use isthmus_core::mesh::{Headless, HeadlessEndpoint, MeshService, ServicePort};

    use super::*;

    fn config() -> MeshConfig {
        let web = MeshService {
            name: "web".into(),
            namespace: "default".into(),
            vip: "127.10.0.1".parse().unwrap(),
            ports: vec![ServicePort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Http,
            }],
            identities: Vec::new(),
            local_endpoints: Vec::new(),
            remote: Vec::new(),
            exported: false,
            headless: Some(Headless {
                endpoints: vec![HeadlessEndpoint {
                    cluster: "west".into(),
                    id: "web-0".into(),
                    hostname: Some("web-0".into()),
                    vip: "127.10.0.2".parse().unwrap(),
                    ready: true,
                }],
            }),
        };
        MeshConfig {
            cluster: "east".into(),
            services: vec![web],
            ..MeshConfig::default()
        }
    }

    #[test]
    fn headless_endpoint_vips_get_a_tcp_listener_per_service_port() {
        assert_eq!(
            endpoint_listeners(&config()),
            [("127.10.0.2:8080".parse().unwrap(), Protocol::Tcp)]
        );
    }

    #[test]
    fn redirected_connections_to_an_endpoint_vip_are_relayed_as_tcp_and_others_by_port() {
        let c = config();
        let at = |s: &str| mesh_protocol(&c, s.parse().unwrap());
        assert_eq!(at("127.10.0.2:8080"), Some(Protocol::Tcp));
        assert_eq!(at("127.10.0.1:8080"), Some(Protocol::Http));
        assert_eq!(at("127.10.0.2:9999"), None);
        assert_eq!(at("192.0.2.1:8080"), None);
    }
}
