//! What one outbound request reports when it is done: Istio's request metrics (as the
//! `source` reporter) and, when enabled, its access-log record.

use std::net::SocketAddr;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::{Body, HttpProxy};
use crate::protocol;
use crate::routing::ServiceKey;

/// What one request's metrics need to know, filled in along the way.
pub(super) struct Report {
    pub(super) service: ServiceKey,
    pub(super) flags: &'static str,
    /// The cluster that served the request (this one for local endpoints).
    pub(super) cluster: String,
    /// The trace this request belongs to and its request id, once known.
    pub(super) trace_id: String,
    pub(super) request_id: String,
    /// CORS headers the matched route adds to whatever response the request gets.
    pub(super) cors: Option<http::HeaderMap>,
}

impl Report {
    pub(super) fn set(&mut self, service: &ServiceKey, flags: &'static str) {
        self.service = service.clone();
        self.flags = flags;
    }
}

impl HttpProxy {
    /// Handles one request the application sent to `vip`, and records its metrics.
    pub async fn handle(
        &self,
        vip: SocketAddr,
        client: SocketAddr,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let started = Instant::now();
        let wall = std::time::SystemTime::now();
        let request_bytes = protocol::content_length(req.headers());
        let request_protocol = if protocol::is_grpc(req.headers()) {
            "grpc"
        } else {
            "http"
        };
        let logged = self.access_log.enabled().then(|| {
            (
                req.method().to_string(),
                req.uri()
                    .path_and_query()
                    .map_or_else(|| "/".to_string(), |p| p.to_string()),
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or("")
                    .to_string(),
                format!("{:?}", req.version()),
            )
        });
        let mut report = Report {
            service: (String::new(), String::new()),
            flags: "-",
            cluster: self.source.cluster.clone(),
            trace_id: String::new(),
            request_id: String::new(),
            cors: None,
        };
        let mut resp = self.route(vip, client, req, &mut report).await;
        if let Some(cors) = report.cors.take() {
            resp.headers_mut().extend(cors);
        }
        let (name, namespace) = &report.service;
        let labels = crate::metrics::RequestLabels {
            reporter: "source".into(),
            source_workload: self.source.workload.clone(),
            source_workload_namespace: self.tcp.namespace.clone(),
            source_principal: self.principal.clone(),
            source_cluster: self.source.cluster.clone(),
            destination_service: format!("{name}.{namespace}.svc.cluster.local"),
            destination_service_name: name.clone(),
            destination_service_namespace: namespace.clone(),
            destination_cluster: report.cluster.clone(),
            request_protocol: request_protocol.into(),
            response_code: resp.status().as_u16().to_string(),
            response_flags: report.flags.to_string(),
            connection_security_policy: "mutual_tls".into(),
        };
        let elapsed = started.elapsed();
        let millis = elapsed.as_secs_f64() * 1000.0;
        self.metrics.request(
            &labels,
            millis,
            request_bytes,
            protocol::content_length(resp.headers()),
        );
        if let Some((method, path, authority, protocol)) = logged {
            self.access_log.log(&crate::observe::AccessRecord {
                start_time: crate::observe::rfc3339(wall),
                method,
                path,
                protocol,
                response_code: resp.status().as_u16(),
                response_flags: report.flags.to_string(),
                bytes_received: request_bytes,
                bytes_sent: protocol::content_length(resp.headers()),
                duration: isthmus_core::clock::millis(elapsed),
                authority,
                downstream_remote_address: client.to_string(),
                upstream_service: labels.destination_service.clone(),
                upstream_cluster: report.cluster.clone(),
                x_request_id: report.request_id.clone(),
                trace_id: report.trace_id.clone(),
                source_principal: labels.source_principal.clone(),
            });
        }
        resp
    }
}
