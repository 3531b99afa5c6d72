//! Opaque TCP destinations, picked as HTTP requests are: a connection to a service's VIP
//! follows the VirtualService `tls` route matching the server name of its ClientHello
//! ([`crate::sni`]), else the `tcp` route for its port (weighted destinations, subsets,
//! another port), then the failover table's active priority, then the DestinationRule's
//! load balancer and outlier detection, with the same per-destination state as the HTTP
//! path ([`HttpProxy`]'s balancers). A failed connect ejects by the outlier rules, tells the
//! failover table, and moves on to the next candidate. `connectionPool.tcp.maxConnections`
//! bounds the open connections per destination: one more is refused at once (closed), as
//! Envoy's TCP proxy does.

use std::net::SocketAddr;

use isthmus_core::mesh::{MeshConfig, MeshService};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

use crate::balance::{Algorithm, Outcome, OutlierSettings, Upstream};
use crate::proxy::{DestKey, HttpProxy};
use crate::routing::{RouteTable, ServiceKey, WeightedDestination};
use crate::upstream::{Route, UpstreamError};

/// An open L4 connection: the session, where it goes, the destination service (a `tcp`
/// route may name another than the VIP's), and what its balancer is told when it closes.
pub(crate) type L4Connection = (TlsStream<TcpStream>, Route, MeshService, L4Lease);

/// An upstream's share of an open L4 connection ([`HttpProxy::tcp_closed`]).
pub(crate) struct L4Lease {
    key: DestKey,
    upstream: Upstream,
    outlier: Option<OutlierSettings>,
    pool: usize,
    /// Its place under `connectionPool.tcp.maxConnections`, held while it is open.
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// The destinations a connection to `service` on `port` is routed among: the first `tls`
/// route matching the server name its ClientHello asked for, if any, else its `tcp` route.
pub(crate) fn routes<'t>(
    table: &'t RouteTable,
    service: &ServiceKey,
    port: u16,
    server_name: Option<&str>,
) -> Option<&'t [WeightedDestination]> {
    server_name
        .and_then(|name| table.tls_route(service, port, name))
        .or_else(|| table.tcp_route(service, port))
}

/// The destination of a connection to `service` on `port`: its route's pick by weight
/// (`roll` in [0, 1)), else the service itself on that port.
pub(crate) fn destination(
    routes: Option<&[WeightedDestination]>,
    service: &ServiceKey,
    port: u16,
    roll: f64,
) -> WeightedDestination {
    routes
        .and_then(|dests| crate::routing::pick_weighted(dests, roll))
        .cloned()
        .unwrap_or_else(|| WeightedDestination {
            service: service.clone(),
            subset: None,
            port: Some(port),
            weight: 100,
            headers: None,
        })
}

impl HttpProxy {
    /// Opens an mTLS session for a connection the application made to `service` on `port`
    /// (from `client`; its ClientHello asked for `server_name`, if it sent one), as the
    /// module docs say.
    pub(crate) async fn connect_tcp(
        &self,
        config: &MeshConfig,
        service: &MeshService,
        (port, server_name): (u16, Option<&str>),
        client: SocketAddr,
    ) -> Result<L4Connection, UpstreamError> {
        let table = self.table(config);
        let key = (service.name.clone(), service.namespace.clone());
        let routes = routes(&table, &key, port, server_name);
        let dest = destination(routes, &key, port, rand::random());
        let port = dest.port.unwrap_or(port);
        let target = config
            .service(&dest.service.1, &dest.service.0)
            .cloned()
            .ok_or_else(|| {
                UpstreamError::NoRoute(format!("{}.{}", dest.service.0, dest.service.1))
            })?;
        let labels =
            match &dest.subset {
                Some(s) => Some(table.subset_labels(&dest.service, s).cloned().ok_or_else(
                    || {
                        UpstreamError::NoRoute(format!(
                            "{} (no DestinationRule defines subset {s})",
                            target.key()
                        ))
                    },
                )?),
                None => None,
            };
        let subset_arg = labels.as_ref().map(isthmus_core::tunnel::subset_selector);
        let policy = table.policy(&dest.service, dest.subset.as_deref(), port);
        let algorithm = Algorithm::from_settings(policy.load_balancer.as_ref());
        let hash_key = policy
            .load_balancer
            .as_ref()
            .and_then(|lb| lb.consistent_hash.as_ref())
            .filter(|ch| ch.use_source_ip == Some(true))
            .map(|_| client.ip().to_string());
        let outlier = policy
            .outlier_detection
            .as_ref()
            .map(OutlierSettings::from_policy);
        let dkey: DestKey = (dest.service.clone(), dest.subset.clone());
        let max = policy
            .connection_pool
            .as_ref()
            .and_then(|p| p.tcp.as_ref())
            .and_then(|t| t.max_connections)
            .unwrap_or(u32::MAX);
        let slot = self
            .admit_tcp(&dkey, max)
            .map_err(|()| UpstreamError::Overflow {
                service: target.key(),
                max,
            })?;
        let connector = self.connector();
        let mut last_error = None;
        // Every failure ejects an upstream or takes it out of the failover table, so this ends.
        let bound = target.local_endpoints.len() + target.remote.len() + 1;
        for _ in 0..bound {
            let candidates = connector.health().candidates(
                config,
                &target,
                labels.as_ref(),
                dest.subset.as_deref(),
                connector.has_gateway(),
            );
            let Some(upstream) =
                self.pick_upstream(&dkey, &candidates, &algorithm, hash_key.as_deref())
            else {
                break;
            };
            match connector
                .connect_to(&target, port, &upstream, subset_arg.clone(), None)
                .await
            {
                Ok(tls) => {
                    let route = match &upstream {
                        Upstream::Local(a) => Route::Local(*a),
                        Upstream::Remote(c) => Route::Remote(c.clone()),
                    };
                    let lease = L4Lease {
                        key: dkey,
                        upstream,
                        outlier,
                        pool: candidates.len(),
                        _slot: slot,
                    };
                    return Ok((tls, route, target, lease));
                }
                Err(e) => {
                    tracing::debug!(?upstream, error = %e, "upstream failed");
                    self.with_balancer(&dkey, |b| {
                        b.finished(
                            &upstream,
                            Outcome::Failed,
                            outlier.as_ref(),
                            candidates.len(),
                            Instant::now(),
                        )
                    });
                    connector.record_failure(&target, port, &upstream, &e);
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| UpstreamError::NoRoute(target.key())))
    }

    /// Tells the destination's balancer that an L4 connection ended (least-request counts
    /// open connections; a connection that was served counts as a success).
    pub(crate) fn tcp_closed(&self, lease: &L4Lease) {
        self.with_balancer(&lease.key, |b| {
            b.finished(
                &lease.upstream,
                Outcome::Status(200),
                lease.outlier.as_ref(),
                lease.pool,
                Instant::now(),
            )
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(name: &str, subset: Option<&str>, weight: u32) -> WeightedDestination {
        WeightedDestination {
            service: (name.into(), "default".into()),
            subset: subset.map(str::to_string),
            port: None,
            weight,
            headers: None,
        }
    }

    #[test]
    fn a_tcp_route_picks_its_destination_by_weight_and_none_means_the_service() {
        let routes = [dest("db", Some("v1"), 80), dest("db", Some("v2"), 20)];
        let db = ("db".to_string(), "default".to_string());
        assert_eq!(
            destination(Some(&routes), &db, 5432, 0.1).subset.as_deref(),
            Some("v1")
        );
        assert_eq!(
            destination(Some(&routes), &db, 5432, 0.85)
                .subset
                .as_deref(),
            Some("v2")
        );
        let plain = destination(None, &db, 5432, 0.5);
        assert_eq!(plain.service, ("db".to_string(), "default".to_string()));
        assert_eq!((plain.subset, plain.port), (None, Some(5432)));
    }
}
