//! The route table: every VirtualService's http, tls and tcp routes and every
//! DestinationRule, by the service they govern, with Istio's precedence (the first
//! VirtualService for a host wins; a subset's port-level traffic policy over the subset's,
//! over the top level's port-level, over the top level's).

use super::*;

/// The traffic policy in force for one destination (service, subset, port), with Istio's
/// precedence: subset port-level > subset > top-level port-level > top-level.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EffectivePolicy {
    pub load_balancer: Option<net::LoadBalancerSettings>,
    pub connection_pool: Option<net::ConnectionPoolSettings>,
    pub outlier_detection: Option<net::OutlierDetection>,
}

impl EffectivePolicy {
    fn overlay(&mut self, tp: &TrafficPolicy, port: u16) {
        self.apply(
            tp.load_balancer.as_ref(),
            tp.connection_pool.as_ref(),
            tp.outlier_detection.as_ref(),
        );
        if let Some(p) = tp
            .port_level_settings
            .iter()
            .find(|p| p.port.number == u32::from(port))
        {
            self.apply(
                p.load_balancer.as_ref(),
                p.connection_pool.as_ref(),
                p.outlier_detection.as_ref(),
            );
        }
    }

    fn apply(
        &mut self,
        lb: Option<&net::LoadBalancerSettings>,
        pool: Option<&net::ConnectionPoolSettings>,
        outlier: Option<&net::OutlierDetection>,
    ) {
        if let Some(lb) = lb {
            self.load_balancer = Some(lb.clone());
        }
        if let Some(pool) = pool {
            self.connection_pool = Some(pool.clone());
        }
        if let Some(o) = outlier {
            self.outlier_detection = Some(o.clone());
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Rules {
    top: Option<TrafficPolicy>,
    subsets: BTreeMap<String, (BTreeMap<String, String>, Option<TrafficPolicy>)>,
}

/// A compiled tcp route: the port it applies to (every port when None) and its destinations.
type TcpRoute = (Option<u16>, Vec<WeightedDestination>);

/// A compiled `tls` route: its matches (port, if any, and server name patterns), and where
/// it sends a connection.
#[derive(Debug, Clone)]
struct TlsRoute {
    matches: Vec<(Option<u16>, Vec<String>)>,
    dests: Vec<WeightedDestination>,
}

/// Every route and destination rule in the mesh, by target service.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    http: BTreeMap<ServiceKey, Arc<Vec<HttpRoute>>>,
    tcp: BTreeMap<ServiceKey, Vec<TcpRoute>>,
    tls: BTreeMap<ServiceKey, Vec<TlsRoute>>,
    rules: BTreeMap<ServiceKey, Rules>,
}

impl RouteTable {
    /// Compiles the policies of a configuration snapshot. Policies were validated before they
    /// were stored; anything that still does not compile is skipped.
    pub fn build(config: &MeshConfig) -> RouteTable {
        let mut table = RouteTable::default();
        for policy in &config.policies {
            match &policy.spec {
                Spec::VirtualService(vs) => {
                    let ns = policy.namespace.as_str();
                    let routes: Vec<HttpRoute> =
                        vs.http.iter().map(|r| compile_http(r, ns)).collect();
                    let tcp: Vec<TcpRoute> = vs
                        .tcp
                        .iter()
                        .flat_map(|r| {
                            let dests: Vec<WeightedDestination> = r
                                .route
                                .iter()
                                .filter_map(|d| destination(&d.destination, ns, d.weight, None))
                                .collect();
                            let ports: Vec<Option<u16>> = if r.matches.is_empty() {
                                vec![None]
                            } else {
                                r.matches
                                    .iter()
                                    .map(|m| m.port.and_then(|p| u16::try_from(p).ok()))
                                    .collect()
                            };
                            ports.into_iter().map(move |p| (p, dests.clone()))
                        })
                        .collect();
                    let tls: Vec<TlsRoute> = vs
                        .tls
                        .iter()
                        .map(|r| TlsRoute {
                            matches: r
                                .matches
                                .iter()
                                .map(|m| {
                                    (
                                        m.port.and_then(|p| u16::try_from(p).ok()),
                                        m.sni_hosts.clone(),
                                    )
                                })
                                .collect(),
                            dests: r
                                .route
                                .iter()
                                .filter_map(|d| destination(&d.destination, ns, d.weight, None))
                                .collect(),
                        })
                        .collect();
                    let routes = Arc::new(routes);
                    for host in &vs.hosts {
                        let Some(key) = resolve_host(host, ns) else {
                            continue;
                        };
                        // The first VirtualService for a host wins (policies arrive sorted).
                        if !routes.is_empty() {
                            table
                                .http
                                .entry(key.clone())
                                .or_insert_with(|| routes.clone());
                        }
                        if !tls.is_empty() {
                            table.tls.entry(key.clone()).or_insert_with(|| tls.clone());
                        }
                        if !tcp.is_empty() {
                            table.tcp.entry(key).or_insert_with(|| tcp.clone());
                        }
                    }
                }
                Spec::DestinationRule(dr) => {
                    let Some(key) = resolve_host(&dr.host, &policy.namespace) else {
                        continue;
                    };
                    let rules = Rules {
                        top: dr.traffic_policy.clone(),
                        subsets: dr
                            .subsets
                            .iter()
                            .map(|s| (s.name.clone(), (s.labels.clone(), s.traffic_policy.clone())))
                            .collect(),
                    };
                    table.rules.entry(key).or_insert(rules);
                }
                _ => {}
            }
        }
        table
    }

    /// The first http route of `service` matching `req`, or the default route.
    pub fn http_route(&self, service: &ServiceKey, req: &RequestView<'_>) -> Option<HttpRoute> {
        match self.http.get(service) {
            Some(routes) => routes.iter().find(|r| r.matches(req)).cloned(),
            None => Some(HttpRoute::default_for(service.clone())),
        }
    }

    /// Whether a VirtualService governs `service`'s http traffic.
    pub fn has_http_routes(&self, service: &ServiceKey) -> bool {
        self.http.contains_key(service)
    }

    /// The tcp destinations of `service` on `port`, if a VirtualService routes its tcp traffic.
    pub fn tcp_route(&self, service: &ServiceKey, port: u16) -> Option<&[WeightedDestination]> {
        self.tcp
            .get(service)?
            .iter()
            .find(|(p, _)| p.is_none() || *p == Some(port))
            .map(|(_, d)| d.as_slice())
    }

    /// Whether a VirtualService routes `service`'s TLS by server name (so a connection's
    /// ClientHello is worth reading).
    pub fn has_tls_routes(&self, service: &ServiceKey) -> bool {
        self.tls.contains_key(service)
    }

    /// The destinations of the first `tls` route of `service` with a match for `port` and
    /// `server_name` (Istio's order: routes, then their matches, as written).
    pub fn tls_route(
        &self,
        service: &ServiceKey,
        port: u16,
        server_name: &str,
    ) -> Option<&[WeightedDestination]> {
        self.tls
            .get(service)?
            .iter()
            .find(|r| {
                r.matches.iter().any(|(p, hosts)| {
                    p.is_none_or(|p| p == port)
                        && hosts.iter().any(|h| crate::sni::matches(h, server_name))
                })
            })
            .map(|r| r.dests.as_slice())
    }

    /// The labels that select `subset` of `service`; None when no rule defines it.
    pub fn subset_labels(
        &self,
        service: &ServiceKey,
        subset: &str,
    ) -> Option<&BTreeMap<String, String>> {
        self.rules
            .get(service)?
            .subsets
            .get(subset)
            .map(|(labels, _)| labels)
    }

    /// The traffic policy for a destination, with Istio's precedence.
    pub fn policy(&self, service: &ServiceKey, subset: Option<&str>, port: u16) -> EffectivePolicy {
        let mut out = EffectivePolicy::default();
        let Some(rules) = self.rules.get(service) else {
            return out;
        };
        if let Some(tp) = &rules.top {
            out.overlay(tp, port);
        }
        if let Some((_, Some(tp))) = subset.and_then(|s| rules.subsets.get(s)) {
            out.overlay(tp, port);
        }
        out
    }
}
