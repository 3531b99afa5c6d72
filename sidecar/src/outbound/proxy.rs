//! The outbound HTTP proxy: one request at a time, through the mesh's routing and resilience.
//!
//! For each request, in this order: find the service by the VIP the app dialled; pick the
//! first matching route (404 when a VirtualService has none); apply fault injection (delay,
//! abort); answer redirects; rewrite; apply header operations; pick a destination by weight;
//! admit it through the circuit breaker (503 with `x-envoy-overloaded` when the pending queue
//! is full); then try up to `1 + retries` attempts, each to an upstream chosen by the
//! destination's load balancer among healthy, non-ejected endpoints of its subset (local
//! first, else a remote cluster through the gateway), each bounded by the per-try timeout and
//! all by the route timeout (504). Every attempt's outcome feeds outlier detection.
//!
//! The application may speak HTTP/1.1 or HTTP/2 (h2c); the hop to the next sidecar is HTTP/2
//! for `http2`/`grpc` ports and HTTP/2 callers, else HTTP/1.1 (`crate::protocol`). Bodies
//! stream both ways with their trailers (gRPC), and are buffered only when small and of known
//! length, for retries. An HTTP/1.1 upgrade (WebSocket) that the upstream accepts with 101
//! joins the two upgraded connections.
//!
//! `plan.rs` decides, without I/O, what to do with the request (route, CORS, rate limit,
//! fault, redirect or direct response, weighted pick, rewrite, headers); here: carrying out
//! the plan (the fault's delay, the body, the mirror, the route timeout, upgrades, response
//! headers); `attempts.rs`: admission, the attempts and the mirror's send; `report.rs`: the
//! request's metrics and access-log record once it is answered.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use isthmus_core::mesh::{MeshConfig, MeshService};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use crate::balance::{Algorithm, Balancer, Limits, Outcome, OutlierSettings, Upstream};
use crate::pool::{Conn, Pool};
use crate::protocol;
use crate::replay::{Replay, REPLAYABLE_BODY};
use crate::routing::{
    apply_header_ops, HttpRoute, RetryPolicy, RouteTable, ServiceKey, WeightedDestination,
};
use crate::upstream::Connector;

mod attempts;
mod plan;
mod report;

use report::Report;

/// Request and response bodies as the proxy passes them on.
pub type Body = BoxBody<Bytes, hyper::Error>;

pub(crate) type DestKey = (ServiceKey, Option<String>);

/// Who this proxy speaks for, for the metrics' source labels.
#[derive(Debug, Clone)]
pub struct Source {
    pub cluster: String,
    pub identity: isthmus_core::identity::SpiffeId,
    pub workload: String,
    /// Its namespace and labels, as routes' `sourceNamespace` and `sourceLabels` match them.
    pub selector: crate::routing::SourceWorkload,
}

struct Breaker {
    limits: Limits,
    permits: Arc<Semaphore>,
    pending: u32,
}

/// The outbound HTTP proxy of one sidecar.
pub struct HttpProxy {
    config: watch::Receiver<Arc<MeshConfig>>,
    connector: Arc<Connector>,
    routes: Mutex<(u64, Arc<RouteTable>)>,
    balancers: Mutex<HashMap<DestKey, Balancer>>,
    breakers: Mutex<HashMap<DestKey, Breaker>>,
    /// Open L4 connections per destination, bounded by `connectionPool.tcp.maxConnections`.
    tcp_breakers: Mutex<HashMap<DestKey, (u32, Arc<Semaphore>)>>,
    pool: Arc<Pool>,
    source: Source,
    metrics: crate::metrics::Metrics,
    /// Rate limit buckets, synced to the config version they were built from.
    limiter: Mutex<(u64, crate::ratelimit::Limiter)>,
    access_log: crate::observe::AccessLog,
    tcp: crate::metrics::TcpReporter,
    /// How request paths are normalized before routing (and forwarded so).
    paths: isthmus_core::http_path::PathNormalization,
    /// Upgraded connections with no bytes either way for this long are closed.
    idle: std::time::Duration,
    /// `source.identity` as the metrics' `source_principal` label writes it (formatted once).
    principal: String,
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let body = Full::new(Bytes::from(body.into()))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp
}

enum Attempt {
    Response(Response<Incoming>),
    Failed { connect: bool, reason: String },
}

impl HttpProxy {
    pub fn new(
        config: watch::Receiver<Arc<MeshConfig>>,
        connector: Arc<Connector>,
        source: Source,
        metrics: crate::metrics::Metrics,
        access_log: crate::observe::AccessLog,
        paths: isthmus_core::http_path::PathNormalization,
        idle: std::time::Duration,
    ) -> Self {
        let principal = source.identity.to_string();
        let tcp = crate::metrics::TcpReporter {
            metrics: metrics.clone(),
            reporter: "source",
            workload: source.workload.clone(),
            namespace: source.identity.namespace().to_string(),
            cluster: source.cluster.clone(),
        };
        HttpProxy {
            config,
            connector,
            routes: Mutex::new((0, Arc::new(RouteTable::default()))),
            balancers: Mutex::new(HashMap::new()),
            breakers: Mutex::new(HashMap::new()),
            tcp_breakers: Mutex::new(HashMap::new()),
            pool: {
                let pool = Arc::new(Pool::default());
                crate::pool::expire_idle(Arc::downgrade(&pool));
                pool
            },
            source,
            metrics,
            limiter: Mutex::new((0, crate::ratelimit::Limiter::default())),
            access_log,
            tcp,
            paths,
            idle,
            principal,
        }
    }

    /// Istio's TCP metrics, reported by this (source) side, for opaque connections.
    pub fn metrics(&self) -> &crate::metrics::TcpReporter {
        &self.tcp
    }

    /// Takes a token for a request to `service` on `route`, or names the policy refusing it.
    fn rate_limit(
        &self,
        config: &MeshConfig,
        service: &ServiceKey,
        route: Option<&str>,
    ) -> Result<(), String> {
        let mut guard = self.limiter.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if guard.0 != config.version {
            guard.1.sync(config, now);
            guard.0 = config.version;
        }
        guard.1.admit(service, route, now)
    }

    /// What dials the upstreams.
    pub(crate) fn connector(&self) -> &Arc<Connector> {
        &self.connector
    }

    /// Runs `f` on the balancing state of destination `key` (shared by HTTP and L4).
    pub(crate) fn with_balancer<T>(&self, key: &DestKey, f: impl FnOnce(&mut Balancer) -> T) -> T {
        let mut balancers = self.balancers.lock().unwrap_or_else(|e| e.into_inner());
        f(balancers.entry(key.clone()).or_default())
    }

    /// The picker HTTP attempts and L4 connections share: the destination's balancer picks
    /// one of `candidates` by `algorithm` (outliers ejected) and counts it as started.
    pub(crate) fn pick_upstream(
        &self,
        key: &DestKey,
        candidates: &[Upstream],
        algorithm: &Algorithm,
        hash_key: Option<&str>,
    ) -> Option<Upstream> {
        self.with_balancer(key, |b| {
            let u = b.pick(
                candidates,
                algorithm,
                Instant::now(),
                rand::random::<f64>(),
                hash_key,
            );
            if let Some(u) = &u {
                b.started(u);
            }
            u
        })
    }

    /// A slot for one more L4 connection to destination `key`, of at most `max` open at once
    /// (`None`: unbounded); `Err` when all are taken (Envoy's TCP proxy overflow: the
    /// connection is refused, never queued).
    pub(crate) fn admit_tcp(
        &self,
        key: &DestKey,
        max: u32,
    ) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, ()> {
        if max == u32::MAX {
            return Ok(None);
        }
        let permits = {
            let mut breakers = self.tcp_breakers.lock().unwrap_or_else(|e| e.into_inner());
            let slot = breakers
                .entry(key.clone())
                .or_insert_with(|| (max, Arc::new(Semaphore::new(max as usize))));
            if slot.0 != max {
                *slot = (max, Arc::new(Semaphore::new(max as usize)));
            }
            slot.1.clone()
        };
        permits.try_acquire_owned().map(Some).map_err(|_| ())
    }

    /// The route table of `config` (built once per config version).
    pub(crate) fn table(&self, config: &MeshConfig) -> Arc<RouteTable> {
        let mut cached = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if cached.0 != config.version {
            *cached = (config.version, Arc::new(RouteTable::build(config)));
        }
        cached.1.clone()
    }

    async fn route(
        &self,
        vip: SocketAddr,
        client: SocketAddr,
        mut req: Request<Incoming>,
        report: &mut Report,
    ) -> Response<Body> {
        // Taken before anything else: the upgraded connection is reachable only through it.
        let downstream_upgrade = protocol::is_upgrade(req.version(), req.headers())
            .then(|| hyper::upgrade::on(&mut req));
        let config = self.config.borrow().clone();
        let Some(service) = config.service_by_vip(vip.ip()) else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no service has VIP {}\n", vip.ip()),
            );
        };
        let key: ServiceKey = (service.name.clone(), service.namespace.clone());
        let table = self.table(&config);
        let (mut parts, body) = req.into_parts();
        let inbound = plan::Inbound {
            port: vip.port(),
            source: &self.source.selector,
            paths: self.paths,
        };
        let planned = plan::plan(
            &table,
            &key,
            &mut parts,
            &inbound,
            plan::Rolls::random(),
            |route| self.rate_limit(&config, &key, route),
        );
        let (route, dest, delay) = match planned {
            plan::Plan::Answer { answer, delay } => {
                if let Some(d) = delay {
                    tokio::time::sleep(d).await;
                }
                if let Some(flag) = answer.flag {
                    report.set(&key, flag);
                }
                let mut resp = text(answer.status, "");
                *resp.headers_mut() = answer.headers;
                *resp.body_mut() = Full::new(answer.body)
                    .map_err(|never| match never {})
                    .boxed();
                return resp;
            }
            plan::Plan::Forward {
                route,
                dest,
                delay,
                cors,
            } => {
                report.cors = cors;
                (route, dest, delay)
            }
        };
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let trace = crate::observe::propagate(&mut parts.headers);
        report.trace_id = trace.trace_id;
        report.request_id = parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let Some(target) = config.service(&dest.service.1, &dest.service.0).cloned() else {
            let resp = text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "unknown destination {}.{}\n",
                    dest.service.0, dest.service.1
                ),
            );
            report.set(&key, "NR");
            return resp;
        };
        let port = dest.port.unwrap_or(vip.port());
        let hash_key = hash_key(&table, &dest, port, &parts, client);
        // Only a body known to be small is read whole first: a streaming one (chunked, or
        // HTTP/2 without a length, as gRPC sends) goes through as it comes (`replay`).
        let replayable = hyper::body::Body::is_end_stream(&body)
            || parts
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|n| n <= REPLAYABLE_BODY);
        let declared = target
            .port(port)
            .or_else(|| service.port(vip.port()))
            .map_or(isthmus_core::mesh::Protocol::Auto, |p| p.protocol);
        let h2 = downstream_upgrade.is_none() && protocol::mesh_hop_is_h2(declared, parts.version);
        let authority = format!("{}.{}:{port}", target.name, target.namespace);
        protocol::for_version(
            &mut parts,
            if h2 {
                http::Version::HTTP_2
            } else {
                http::Version::HTTP_11
            },
            &authority,
        );
        let body = if replayable {
            match body.collect().await {
                Ok(b) => Replay::Buffered(b.to_bytes()),
                Err(e) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("reading the request body: {e}\n"),
                    )
                }
            }
        } else {
            Replay::teed(body, REPLAYABLE_BODY)
        };
        if let (Some((mkey, msubset, fraction)), Replay::Buffered(bytes)) = (&route.mirror, &body) {
            if rand::random::<f64>() < *fraction {
                self.mirror(&config, mkey, msubset.clone(), port, &parts, bytes.clone());
            }
        }
        report.set(&dest.service, "-");
        let work = self.attempts(
            &config, &table, &target, &dest, port, &route, parts, body, hash_key, report,
        );
        let finished = match route.timeout {
            Some(t) => tokio::time::timeout(t, work).await.ok(),
            None => Some(work.await),
        };
        let Some(mut resp) = finished else {
            report.set(&dest.service, "UT");
            return text(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n");
        };
        if let (Some(downstream), StatusCode::SWITCHING_PROTOCOLS) =
            (downstream_upgrade, resp.status())
        {
            crate::pool::join_upgrades(downstream, hyper::upgrade::on(&mut resp), self.idle);
        }
        for ops in [route.headers.as_ref(), dest.headers.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Some(r) = &ops.response {
                apply_header_ops(resp.headers_mut(), r);
            }
        }
        resp
    }
}

fn hash_key(
    table: &RouteTable,
    dest: &WeightedDestination,
    port: u16,
    parts: &http::request::Parts,
    client: SocketAddr,
) -> Option<String> {
    let policy = table.policy(&dest.service, dest.subset.as_deref(), port);
    let ch = policy.load_balancer?.consistent_hash?;
    if let Some(h) = ch.http_header_name {
        return parts
            .headers
            .get(h.as_str())
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
    }
    if let Some(cookie) = ch.http_cookie {
        return parts
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == cookie.name).then(|| v.to_string())
            });
    }
    ch.use_source_ip
        .filter(|x| *x)
        .map(|_| client.ip().to_string())
}
