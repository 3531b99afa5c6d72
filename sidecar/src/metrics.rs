//! Istio's standard request metrics, with Istio's names and label names, plus the source and
//! destination clusters, so existing dashboards and tools read them unchanged.
//!
//! - `istio_requests_total` (counter)
//! - `istio_request_duration_milliseconds` (histogram)
//! - `istio_request_bytes`, `istio_response_bytes` (histograms, from content-length)
//! - `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//!   `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total` (counters)
//! - `isthmus_sidecar_connections_refused_total{listener, reason}` (counter, Isthmus's own)
//! - `isthmus_sidecar_jwt_refused_total{reason}` (counter: end-user tokens answered 401)
//!
//! Registered at the root of the admin registry (no prefix), as Istio's proxies expose them.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Istio's request labels (a subset Isthmus can fill in honestly) plus clusters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `source` (the caller's sidecar) or `destination` (the server's).
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_code: String,
    /// Envoy's flags: `-` (none), `NR` no route, `UH` no healthy upstream, `UO` overflow,
    /// `UT` upstream timeout, `FI` fault injected, `DENY` (RBAC).
    pub response_flags: String,
    pub connection_security_policy: String,
}

/// Why something was refused.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// Which listener refused a connection, and why.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `inbound`, `outbound` (a VIP port) or `redirect` (the redirected outbound port).
    pub listener: String,
    /// `limit` (the listener held as many connections as it takes) or `not_redirected` (a
    /// connection made straight to the redirect port).
    pub reason: String,
}

/// Istio's TCP labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_cluster: String,
}

fn duration_buckets() -> Histogram {
    // Istio's default buckets for request durations (ms).
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0,
    ])
}

fn size_buckets() -> Histogram {
    Histogram::new([
        1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0,
    ])
}

/// One label set's four request series: handles that share their values with the families,
/// so a finished request looks its labels up once rather than once per family.
#[derive(Clone)]
struct RequestSeries {
    requests: Counter,
    duration_ms: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// The sidecar's metrics.
#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration_ms: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub request_bytes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub response_bytes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_sent: Family<TcpLabels, Counter>,
    pub tcp_received: Family<TcpLabels, Counter>,
    /// `isthmus_sidecar_connections_refused_total`.
    pub connections_refused: Family<RefusedLabels, Counter>,
    /// `isthmus_sidecar_jwt_refused_total`.
    pub jwt_refused: Family<ReasonLabels, Counter>,
    /// The request series of every label set seen (as many as the families hold).
    series: Arc<RwLock<HashMap<RequestLabels, RequestSeries>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::default(),
            duration_ms: Family::new_with_constructor(duration_buckets),
            request_bytes: Family::new_with_constructor(size_buckets),
            response_bytes: Family::new_with_constructor(size_buckets),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            connections_refused: Family::default(),
            jwt_refused: Family::default(),
            series: Arc::default(),
        }
    }
}

impl Metrics {
    /// Registers every metric at the root of `registry` with Istio's names.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "istio_requests",
            "Requests, by source and destination",
            self.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration",
            self.duration_ms.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            self.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            self.response_bytes.clone(),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            self.tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            self.tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the peer",
            self.tcp_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the peer",
            self.tcp_received.clone(),
        );
        registry.register(
            "isthmus_sidecar_connections_refused",
            "Connections closed as accepted, by listener and reason",
            self.connections_refused.clone(),
        );
        registry.register(
            "isthmus_sidecar_jwt_refused",
            "End-user tokens refused with 401, by reason",
            self.jwt_refused.clone(),
        );
    }

    /// The counter of tokens refused for `reason` ([`isthmus_core::jwt::Refusal::reason`]).
    pub(crate) fn jwt_refused(&self, reason: &str) -> Counter {
        self.jwt_refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .clone()
    }

    /// The refusal counter of one listener kind and reason.
    pub(crate) fn refused(&self, listener: &str, reason: &str) -> Counter {
        self.connections_refused
            .get_or_create(&RefusedLabels {
                listener: listener.to_string(),
                reason: reason.to_string(),
            })
            .clone()
    }

    /// Records one finished request.
    pub fn request(
        &self,
        labels: &RequestLabels,
        millis: f64,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        let series = self.series_of(labels);
        series.requests.inc();
        series.duration_ms.observe(millis);
        series.request_bytes.observe(request_bytes as f64);
        series.response_bytes.observe(response_bytes as f64);
    }

    fn series_of(&self, labels: &RequestLabels) -> RequestSeries {
        let known = self
            .series
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(labels)
            .cloned();
        if let Some(series) = known {
            return series;
        }
        let series = RequestSeries {
            requests: self.requests.get_or_create(labels).clone(),
            duration_ms: self.duration_ms.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        };
        self.series
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(labels.clone(), series.clone());
        series
    }
}

/// Records Istio's TCP metrics for opaque connections, on behalf of one side.
#[derive(Clone)]
pub struct TcpReporter {
    pub metrics: Metrics,
    /// `source` (outbound) or `destination` (inbound).
    pub reporter: &'static str,
    pub workload: String,
    pub namespace: String,
    pub cluster: String,
}

impl TcpReporter {
    /// The labels of a connection to `service` (name, namespace) served by
    /// `destination_cluster`.
    pub fn labels(&self, service: (&str, &str), destination_cluster: String) -> TcpLabels {
        TcpLabels {
            reporter: self.reporter.to_string(),
            source_workload: self.workload.clone(),
            source_workload_namespace: self.namespace.clone(),
            source_cluster: self.cluster.clone(),
            destination_service: format!("{}.{}.svc.cluster.local", service.0, service.1),
            destination_cluster,
        }
    }

    pub fn opened(&self, labels: &TcpLabels) {
        self.metrics.tcp_opened.get_or_create(labels).inc();
    }

    /// A connection closed: `received` request bytes (client to server) and `sent` response
    /// bytes (server to client), as Istio counts them.
    pub fn closed(&self, labels: &TcpLabels, sent: u64, received: u64) {
        self.metrics.tcp_closed.get_or_create(labels).inc();
        self.metrics.tcp_sent.get_or_create(labels).inc_by(sent);
        self.metrics
            .tcp_received
            .get_or_create(labels)
            .inc_by(received);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_exposed_with_istios_names_and_labels() {
        let m = Metrics::default();
        let mut registry = Registry::default();
        m.register(&mut registry);
        let labels = RequestLabels {
            reporter: "source".into(),
            source_workload: "sleep".into(),
            source_workload_namespace: "default".into(),
            source_principal: "spiffe://east.isthmus.local/ns/default/sa/sleep".into(),
            source_cluster: "east".into(),
            destination_service: "ratings.default.svc.cluster.local".into(),
            destination_service_name: "ratings".into(),
            destination_service_namespace: "default".into(),
            destination_cluster: "central".into(),
            request_protocol: "http".into(),
            response_code: "200".into(),
            response_flags: "-".into(),
            connection_security_policy: "mutual_tls".into(),
        };
        m.request(&labels, 3.0, 0, 120);
        // A second request with the same labels counts in the same series.
        m.clone().request(&labels, 7.0, 10, 120);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(
            out.contains("istio_requests_total{reporter=\"source\""),
            "{out}"
        );
        assert!(out.contains("destination_cluster=\"central\""), "{out}");
        let count = |name: &str| {
            out.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_string)
        };
        assert_eq!(
            count("istio_requests_total{").as_deref(),
            Some("2"),
            "{out}"
        );
        assert_eq!(
            count("istio_request_duration_milliseconds_count{").as_deref(),
            Some("2"),
            "{out}"
        );
        assert_eq!(
            count("istio_request_bytes_sum{").as_deref(),
            Some("10.0"),
            "{out}"
        );
        assert!(
            out.contains("istio_request_duration_milliseconds_bucket"),
            "{out}"
        );
    }
}
