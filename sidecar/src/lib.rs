//! isthmus-sidecar: the proxy beside each workload.
//!
//! - Outbound ([`outbound`]): a listener on every service's virtual IP and port (local mode);
//!   each accepted connection goes to a healthy local endpoint over mTLS straight to that
//!   endpoint's sidecar, or, when the service has no usable local endpoint, through this
//!   cluster's east-west gateway to a cluster that exports it. The mTLS session is this
//!   workload's own, end to end: gateways only carry its bytes.
//! - Inbound ([`inbound`]): terminates mTLS from other sidecars, learns the caller's SPIFFE ID
//!   from its certificate, and forwards to the local application; for HTTP it replaces any
//!   `x-forwarded-client-cert` header with one naming the verified caller.
//!
//! Every listener bounds what a client can hold ([`limits`]): connections at once, request
//! heads ([`protocol::server_builder`]), idle relayed connections.
//!
//! Tasks: one outbound reconciler (binds and unbinds VIP listeners as the config changes) with
//! one accept task per listener, one accept task per inbound port, and one task per connection.
//!
//! [`daemon::Daemon`] is the `isthmus sidecar` daemon: [`config`] read from its file (or from
//! its pod, when injected), attached to its control plane, its admin server, and the task that
//! reports its failover tables.

// Code that ships: no unwrap on what input or the network can make fail, no silent lossy
// casts (see [workspace.lints] in the root Cargo.toml).
#![warn(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

pub mod authn;
pub mod authz;
pub mod config;
pub mod daemon;
pub mod inbound;
pub mod limits;
pub mod metrics;
pub mod observe;
pub mod outbound;
pub mod protocol;
pub mod redirect;

// The outbound path's rooms, by their short names (they live in `outbound/`).
pub use outbound::{balance, cors, failover, proxy, ratelimit, routing, sni, upstream};
pub(crate) use outbound::{pool, replay};

use isthmus_core::http_path::PathNormalization;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::mesh::{MeshConfig, Protocol};
use isthmus_core::tls::{Identity, TrustBundles};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Errors starting the sidecar.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("binding the inbound listener on {addr} failed")]
    BindInbound {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("building the TLS configuration failed")]
    Tls(#[source] isthmus_core::tls::TlsError),
    #[error("opening the access log failed")]
    AccessLog(#[source] std::io::Error),
    #[error("redirected outbound traffic needs a sidecar started with outbound listeners")]
    NoOutbound,
}

/// One inbound port: mTLS accepted on `listen`, plaintext forwarded to the application.
#[derive(Debug, Clone)]
pub struct InboundPort {
    pub listen: SocketAddr,
    pub forward_to: SocketAddr,
    pub protocol: Protocol,
}

/// Everything a sidecar needs.
pub struct SidecarOptions {
    pub cluster: String,
    /// This workload's identity (rotated in place by its owner).
    pub identity: Arc<Identity>,
    /// Every member cluster's trust bundle (kept current by its owner).
    pub trust: Arc<TrustBundles>,
    /// The workload's labels (e.g. `app`, `version`), for policy selectors.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Bind outbound listeners on the services' virtual IPs.
    pub outbound: bool,
    pub inbound: Vec<InboundPort>,
    /// The local east-west gateway's address for sidecars, for services only elsewhere.
    pub gateway: Option<SocketAddr>,
    pub connect_timeout: Duration,
    /// Istio's request metrics; register them on the admin server with
    /// [`metrics::Metrics::register`].
    pub metrics: metrics::Metrics,
    /// JSON access logs of outbound HTTP requests.
    pub access_log: observe::AccessLogTarget,
    /// How request paths are normalized before authorization and routing see them (and
    /// the application is sent); Istio's `pathNormalization`.
    pub path_normalization: PathNormalization,
    /// Connections per listener and the idle timeout of relayed connections.
    pub limits: limits::Limits,
}

/// A running sidecar.
pub struct SidecarHandle {
    inbound: Vec<SocketAddr>,
    outbound: outbound::Listeners,
    /// What serves outbound connections (None when `outbound` was off).
    serving: Option<outbound::Outbound>,
    /// What inbound listeners need: TLS, identity, policy.
    inbound_ctx: (Arc<rustls::ServerConfig>, Arc<Identity>, inbound::Guard),
    health: Arc<failover::Health>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl SidecarHandle {
    /// The bound inbound addresses, in the order the ports were given.
    pub fn inbound_addrs(&self) -> &[SocketAddr] {
        &self.inbound
    }

    /// The VIP listeners bound right now.
    pub fn outbound_addrs(&self) -> Vec<SocketAddr> {
        self.outbound.bound()
    }

    /// The failover priority tables this sidecar used last, by `<svc>.<ns>[/subset]`.
    pub fn failover_tables(
        &self,
    ) -> std::collections::BTreeMap<String, isthmus_core::failover::Table> {
        self.health.tables()
    }

    /// This sidecar's view of upstream health and its failover tables (shared).
    pub fn failover_health(&self) -> Arc<failover::Health> {
        self.health.clone()
    }

    /// Serves connections redirected to `listener` (the outbound port, 15001 in Kubernetes;
    /// see [`redirect`]), each to its original destination; returns the bound address.
    /// Needs a sidecar started with `outbound`.
    pub fn serve_redirected(
        &mut self,
        listener: tokio::net::TcpListener,
    ) -> Result<SocketAddr, SidecarError> {
        let addr = listener
            .local_addr()
            .map_err(|source| SidecarError::BindInbound {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                source,
            })?;
        let serving = self.serving.clone().ok_or(SidecarError::NoOutbound)?;
        self.tasks.push(tokio::spawn(outbound::accept_redirected(
            listener,
            serving,
            self.stop.subscribe(),
        )));
        Ok(addr)
    }

    /// Serves connections redirected to `listener` (the inbound port, 15006 in Kubernetes):
    /// each is mTLS-terminated and authorized as on any inbound port, then forwarded to its
    /// original destination (the pod's IP and the port the caller dialled), its protocol
    /// detected. Returns the bound address.
    pub fn serve_redirected_inbound(
        &mut self,
        listener: tokio::net::TcpListener,
    ) -> Result<SocketAddr, SidecarError> {
        let addr = listener
            .local_addr()
            .map_err(|source| SidecarError::BindInbound {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                source,
            })?;
        let (tls, identity, guard) = self.inbound_ctx.clone();
        let port = InboundPort {
            listen: addr,
            forward_to: addr,
            protocol: Protocol::Auto,
        };
        self.tasks.push(tokio::spawn(inbound::serve(
            listener,
            port,
            inbound::Target::Redirected,
            tls,
            identity,
            guard,
            self.stop.subscribe(),
        )));
        Ok(addr)
    }

    /// Stops all listeners and connection tasks.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        self.outbound.close_all();
    }
}

/// Starts a sidecar following `config`.
pub async fn start(
    opts: SidecarOptions,
    config: watch::Receiver<Arc<MeshConfig>>,
) -> Result<SidecarHandle, SidecarError> {
    let (stop, stopped) = watch::channel(false);
    let upstream = Arc::new(upstream::Connector::new(
        opts.cluster.clone(),
        opts.identity.clone(),
        opts.trust.clone(),
        opts.gateway,
        opts.connect_timeout,
    ));
    let mut tasks = Vec::new();
    let mut inbound = Vec::new();
    let server_tls = Arc::new(
        isthmus_core::tls::server_config(
            opts.identity.clone(),
            opts.trust.clone(),
            isthmus_core::tls::accept_any_member(),
            // Offered by callers that proxy HTTP; opaque TCP offers none (`protocol`).
            &[protocol::ALPN_H2, protocol::ALPN_HTTP11],
        )
        .map_err(SidecarError::Tls)?,
    );
    let guard = inbound::Guard {
        config: config.clone(),
        workload: authz::Workload {
            namespace: opts.identity.id().namespace().to_string(),
            labels: opts.labels.clone(),
        },
        cluster: opts.cluster.clone(),
        metrics: opts.metrics.clone(),
        paths: opts.path_normalization,
        limits: opts.limits,
        authn: Arc::default(),
    };
    for port in &opts.inbound {
        let listener = tokio::net::TcpListener::bind(port.listen)
            .await
            .map_err(|source| SidecarError::BindInbound {
                addr: port.listen,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| SidecarError::BindInbound {
                addr: port.listen,
                source,
            })?;
        inbound.push(addr);
        tasks.push(tokio::spawn(inbound::serve(
            listener,
            port.clone(),
            inbound::Target::Declared,
            server_tls.clone(),
            opts.identity.clone(),
            guard.clone(),
            stopped.clone(),
        )));
    }
    let outbound = outbound::Listeners::default();
    let mut serving = None;
    let health = upstream.health().clone();
    if opts.outbound {
        tasks.push(tokio::spawn(failover::probe(
            health.clone(),
            upstream.clone(),
            stopped.clone(),
        )));
        let source = proxy::Source {
            cluster: opts.cluster.clone(),
            identity: opts.identity.id().clone(),
            workload: opts
                .labels
                .get("app")
                .cloned()
                .unwrap_or_else(|| opts.identity.id().service_account().to_string()),
            selector: routing::SourceWorkload {
                namespace: opts.identity.id().namespace().to_string(),
                labels: opts.labels.clone(),
            },
        };
        let access_log =
            observe::AccessLog::start(&opts.access_log).map_err(SidecarError::AccessLog)?;
        let proxy = Arc::new(proxy::HttpProxy::new(
            config.clone(),
            upstream.clone(),
            source,
            opts.metrics.clone(),
            access_log,
            opts.path_normalization,
            opts.limits.tcp_idle_timeout,
        ));
        let serves = outbound::Outbound {
            config,
            proxy,
            limits: opts.limits,
            metrics: opts.metrics.clone(),
        };
        tasks.push(tokio::spawn(outbound::reconcile(
            outbound.clone(),
            serves.clone(),
            stopped.clone(),
        )));
        serving = Some(serves);
    }
    Ok(SidecarHandle {
        inbound,
        outbound,
        serving,
        inbound_ctx: (server_tls, opts.identity.clone(), guard),
        health,
        stop,
        tasks,
    })
}
