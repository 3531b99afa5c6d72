//! The control plane's gRPC API to its cluster's data plane: the configuration stream and
//! certificate signing (see core/proto/mesh.proto).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use isthmus_core::ca::CertificateAuthority;
use isthmus_core::identity::{SpiffeId, SYSTEM_NAMESPACE};
use isthmus_core::mesh::MeshConfig;
use isthmus_core::policy::{Kind, Policy};
use isthmus_core::proto::mesh::certificate_service_server::CertificateService;
use isthmus_core::proto::mesh::mesh_config_service_server::MeshConfigService;
use isthmus_core::proto::mesh::policy_service_server::PolicyService;
use isthmus_core::proto::mesh::{
    ApplyRequest, ApplyResponse, ApplyResult, DeletePolicyRequest, DeletePolicyResponse,
    ExplainRequest, ExplainResponse, FailoverReport, FailoverReportAck, GetPoliciesRequest,
    GetPoliciesResponse, MeshConfigSnapshot, SidecarTable, SignRequest, SignResponse,
    StreamConfigRequest, TrustBundle,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::tokens::TokenPolicy;

/// Serves the configuration stream from the catalog's watch channel, and keeps the failover
/// tables the sidecars report for `isthmus explain`.
pub struct ConfigApi {
    pub config: watch::Receiver<Arc<MeshConfig>>,
    pub stop: watch::Receiver<bool>,
    pub cluster: String,
    pub store: isthmus_federation::Store,
    pub reports: Arc<std::sync::Mutex<Reports>>,
    /// `isthmus_control_failover_reports_evicted_total`.
    pub evicted: prometheus_client::metrics::counter::Counter,
    /// This control plane's own identity, presented when it asks another member's control
    /// plane (`explain --from`), which lets control planes of member clusters `Explain`.
    pub identity: Arc<isthmus_core::tls::Identity>,
}

/// Who reported: the caller's verified identity and the node id it gave.
pub type Reporter = (String, String);

/// The failover tables each sidecar reported last, by (caller identity, node id), with when.
/// Keyed by the identity too, so no workload can replace another's report by reusing its
/// node id.
pub type Reports = std::collections::HashMap<
    Reporter,
    (
        std::time::Instant,
        BTreeMap<String, isthmus_core::failover::Table>,
    ),
>;

/// Keeps `tables` as `reporter`'s latest report. One identity keeps at most
/// [`MAX_NODES_PER_IDENTITY`] node ids (its stalest goes first, so a flood from one workload
/// evicts only its own reports); at [`MAX_REPORTERS`] in all, reports that are no longer fresh
/// are dropped first, then the stalest. Returns how many reports were evicted.
pub fn remember_report(
    reports: &mut Reports,
    reporter: Reporter,
    tables: BTreeMap<String, isthmus_core::failover::Table>,
    now: std::time::Instant,
) -> usize {
    let mut evicted = 0;
    if !reports.contains_key(&reporter) {
        let own: Vec<(&Reporter, std::time::Instant)> = reports
            .iter()
            .filter(|((identity, _), _)| *identity == reporter.0)
            .map(|(k, (at, _))| (k, *at))
            .collect();
        if own.len() >= MAX_NODES_PER_IDENTITY {
            if let Some(stalest) = own
                .iter()
                .min_by_key(|(_, at)| *at)
                .map(|(k, _)| (*k).clone())
            {
                reports.remove(&stalest);
                evicted += 1;
            }
        }
    }
    if reports.len() >= MAX_REPORTERS && !reports.contains_key(&reporter) {
        let before = reports.len();
        reports.retain(|_, (at, _)| now.saturating_duration_since(*at) < REPORT_FRESH);
        evicted += before - reports.len();
        if reports.len() >= MAX_REPORTERS {
            if let Some(stalest) = reports
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone())
            {
                reports.remove(&stalest);
                evicted += 1;
            }
        }
    }
    reports.insert(reporter, (now, tables));
    evicted
}

/// Reports older than this are not shown (the sidecar is gone or cut off).
const REPORT_FRESH: Duration = Duration::from_secs(30);
/// Largest report accepted.
const MAX_REPORT_BYTES: usize = 1024 * 1024;
/// Largest request `MeshConfigService` decodes: a failover report and its envelope.
pub const MAX_CONFIG_REQUEST_BYTES: usize = MAX_REPORT_BYTES + 64 * 1024;
/// Largest `CertificateService.Sign` request: a CSR and a token are a few kilobytes.
pub const MAX_SIGN_REQUEST_BYTES: usize = 64 * 1024;
/// Largest `PolicyService` request: the documents of one `isthmus apply -f`.
pub const MAX_POLICY_REQUEST_BYTES: usize = 8 * 1024 * 1024;
/// Sidecars whose reports are kept at once; the stalest is dropped for a new one.
pub const MAX_REPORTERS: usize = 10_000;
/// Node ids one identity may report under at once (the replicas of one workload).
pub const MAX_NODES_PER_IDENTITY: usize = 1_000;

impl ConfigApi {
    /// The tables for `<svc>.<ns>` (and its subsets) from fresh reports, or, when no sidecar
    /// has reported one, the table the configuration alone gives (no passive health).
    fn local_tables(&self, service: &str, namespace: &str) -> Vec<SidecarTable> {
        let key = format!("{service}.{namespace}");
        let mut out = Vec::new();
        let reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        let mut nodes: Vec<_> = reports.iter().collect();
        nodes.sort_by(|a, b| a.0 .1.cmp(&b.0 .1).then(a.0 .0.cmp(&b.0 .0)));
        for ((_, node), (at, tables)) in nodes {
            let age = at.elapsed();
            if age > REPORT_FRESH {
                continue;
            }
            for (k, table) in tables {
                if *k == key || k.starts_with(&format!("{key}/")) {
                    out.push(SidecarTable {
                        node_id: node.clone(),
                        age_ms: isthmus_core::clock::millis(age),
                        table_json: serde_json::to_string(table).unwrap_or_default(),
                    });
                }
            }
        }
        drop(reports);
        if out.is_empty() {
            let config = self.config.borrow().clone();
            if let Some(s) = config.service(namespace, service) {
                use isthmus_core::failover::{health_from_config, plan, Hysteresis, Settings};
                let locality = config
                    .cluster_info(&config.cluster)
                    .and_then(|c| c.locality.clone());
                let settings =
                    Settings::resolve(&config.policies, namespace, service, locality.as_deref());
                let mut table = plan(
                    &s.key(),
                    &settings,
                    &config.cluster,
                    locality.as_deref(),
                    &health_from_config(&config, s, None),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(isthmus_core::clock::millis)
                        .unwrap_or(0),
                );
                Hysteresis::default().decide(
                    &mut table,
                    settings.hysteresis,
                    std::time::Instant::now(),
                );
                out.push(SidecarTable {
                    node_id: "control-plane (no sidecar has reported this service yet)".into(),
                    age_ms: 0,
                    table_json: serde_json::to_string(&table).unwrap_or_default(),
                });
            }
        }
        out
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<MeshConfigSnapshot, Status>> + Send>>;

#[tonic::async_trait]
impl MeshConfigService for ConfigApi {
    type StreamConfigStream = SnapshotStream;

    async fn stream_config(
        &self,
        request: Request<StreamConfigRequest>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let node = request.into_inner().node_id;
        tracing::debug!(%node, "config stream opened");
        let mut config = self.config.clone();
        let mut stop = self.stop.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let current = config.borrow_and_update().clone();
                // Version 0 is the empty catalog before the first build: never sent.
                if current.version > 0
                    && tx
                        .send(Ok(MeshConfigSnapshot::from(current.as_ref())))
                        .await
                        .is_err()
                {
                    break;
                }
                tokio::select! {
                    changed = config.changed() => if changed.is_err() { break },
                    _ = stop.changed() => break,
                    _ = tx.closed() => break,
                }
            }
            tracing::debug!(%node, "config stream closed");
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn report_failover(
        &self,
        request: Request<FailoverReport>,
    ) -> Result<Response<FailoverReportAck>, Status> {
        // The authorization layer let only this cluster's workloads through.
        let identity = request
            .extensions()
            .get::<isthmus_core::api_tls::ApiConnInfo>()
            .and_then(|info| info.caller.as_ref())
            .map(ToString::to_string)
            .ok_or_else(|| {
                Status::unauthenticated("a failover report needs the sidecar's certificate")
            })?;
        let report = request.into_inner();
        if report.node_id.is_empty() || report.node_id.len() > 253 {
            return Err(Status::invalid_argument(
                "node_id: required, at most 253 characters",
            ));
        }
        if report.tables_json.len() > MAX_REPORT_BYTES {
            return Err(Status::invalid_argument(format!(
                "tables_json: {} bytes, more than the {MAX_REPORT_BYTES} accepted",
                report.tables_json.len()
            )));
        }
        let tables: BTreeMap<String, isthmus_core::failover::Table> =
            serde_json::from_str(&report.tables_json).map_err(|e| {
                Status::invalid_argument(format!("tables_json: not a map of failover tables: {e}"))
            })?;
        let mut reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        let evicted = remember_report(
            &mut reports,
            (identity, report.node_id),
            tables,
            std::time::Instant::now(),
        );
        drop(reports);
        if evicted > 0 {
            self.evicted.inc_by(evicted as u64);
        }
        Ok(Response::new(FailoverReportAck {}))
    }

    async fn explain(
        &self,
        request: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        let req = request.into_inner();
        if req.service.is_empty() {
            return Err(Status::invalid_argument("service: required"));
        }
        let namespace = if req.namespace.is_empty() {
            "default".to_string()
        } else {
            req.namespace.clone()
        };
        if !req.from_cluster.is_empty() && req.from_cluster != self.cluster {
            // Another cluster's sidecars: ask its control plane.
            let record = self
                .store
                .get(&crate::records::cluster_key(&req.from_cluster))
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "from_cluster: no cluster named {:?} in the federation",
                        req.from_cluster
                    ))
                })?;
            let record: crate::records::ClusterRecord = serde_json::from_slice(&record.value)
                .map_err(|e| Status::internal(format!("cluster record: {e}")))?;
            let control = record.control.ok_or_else(|| {
                Status::failed_precondition(format!(
                    "cluster {} has not published a control-plane address; ask its control plane directly (--control)",
                    req.from_cluster
                ))
            })?;
            // Its API presents a certificate from its own CA, published with its record.
            let client = isthmus_core::client::ControlClient::authenticated(
                &control.to_string(),
                &record.ca_bundle_pem,
                isthmus_core::tls::identity_resolver(self.identity.clone()),
            )
            .map_err(|e| Status::internal(e.to_string()))?;
            let (cluster, tables) = client
                .explain_raw(&req.service, &namespace, &req.from_cluster)
                .await
                .map_err(|e| Status::unavailable(format!("asking {control}: {e}")))?;
            return Ok(Response::new(ExplainResponse { cluster, tables }));
        }
        Ok(Response::new(ExplainResponse {
            cluster: self.cluster.clone(),
            tables: self.local_tables(&req.service, &namespace),
        }))
    }
}

/// The longest operator credential `CredentialService.Issue` gives, and the default.
pub const MAX_CREDENTIAL_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
pub const DEFAULT_CREDENTIAL_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Issues operator credentials from this cluster's CA to this cluster's admins (the
/// authorization layer lets only them through).
pub struct CredentialApi {
    pub ca: Arc<CertificateAuthority>,
}

#[tonic::async_trait]
impl isthmus_core::proto::mesh::credential_service_server::CredentialService for CredentialApi {
    async fn issue(
        &self,
        request: Request<isthmus_core::proto::mesh::IssueCredentialRequest>,
    ) -> Result<Response<isthmus_core::proto::mesh::IssueCredentialResponse>, Status> {
        let req = request.into_inner();
        let role: isthmus_core::identity::Role = req.role.parse().map_err(|_| {
            Status::invalid_argument(format!("role: {:?} is not viewer or admin", req.role))
        })?;
        let id = isthmus_core::identity::OperatorId::new(self.ca.trust_domain(), role, &req.name)
            .map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        let ttl = match req.ttl_seconds {
            0 => DEFAULT_CREDENTIAL_TTL,
            s => Duration::from_secs(s),
        };
        if ttl > MAX_CREDENTIAL_TTL {
            return Err(Status::invalid_argument(format!(
                "ttl_seconds: {} is more than the {} (365 days) a credential may live",
                req.ttl_seconds,
                MAX_CREDENTIAL_TTL.as_secs()
            )));
        }
        let issued = self
            .ca
            .sign_operator_csr(&req.csr_pem, &id, ttl)
            .map_err(|e| Status::invalid_argument(format!("csr_pem: {e}")))?;
        tracing::info!(identity = %id, "issued an operator credential");
        Ok(Response::new(
            isthmus_core::proto::mesh::IssueCredentialResponse {
                cert_chain_pem: issued.cert_chain_pem,
                not_after_unix: issued.not_after_unix,
            },
        ))
    }
}

/// Signs workload certificates for identities a bootstrap token allows, or (Kubernetes) the
/// service account whose token the API server's TokenReview vouches for.
pub struct CertificateApi {
    pub ca: Arc<CertificateAuthority>,
    pub tokens: TokenPolicy,
    pub reviewer: Option<crate::kubernetes::tokenreview::TokenReviewer>,
    pub lifetime: Duration,
    pub config: watch::Receiver<Arc<MeshConfig>>,
}

#[tonic::async_trait]
impl CertificateService for CertificateApi {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let req = request.into_inner();
        let id: SpiffeId = req
            .identity
            .parse()
            .map_err(|e| Status::invalid_argument(format!("field identity: {e}")))?;
        id.check_kubernetes_names()
            .map_err(|e| Status::invalid_argument(format!("field identity: {e}")))?;
        if id.trust_domain() != self.ca.trust_domain() {
            return Err(Status::permission_denied(format!(
                "this control plane signs only for trust domain {}, not {}",
                self.ca.trust_domain(),
                id.trust_domain()
            )));
        }
        if id.is_control() {
            return Err(Status::permission_denied(format!(
                "{id} is a control plane's identity, which Sign never issues"
            )));
        }
        if !self.tokens.allows(&req.token, &id) {
            match &self.reviewer {
                // A service-account token never yields an isthmus-system identity.
                _ if id.namespace() == SYSTEM_NAMESPACE => {
                    return Err(Status::permission_denied(format!(
                        "the token does not allow identity {id} (isthmus-system identities \
                         need a bootstrap token that names them)"
                    )))
                }
                None => {
                    return Err(Status::permission_denied(format!(
                        "the token does not allow identity {id}"
                    )))
                }
                Some(reviewer) => reviewer.allows(&req.token, &id).await.map_err(|why| {
                    Status::permission_denied(format!(
                        "the token does not allow identity {id}: {why}"
                    ))
                })?,
            }
        }
        let issued = self
            .ca
            .sign_csr(&req.csr_pem, &id, self.lifetime)
            .map_err(|e| Status::invalid_argument(format!("field csr_pem: {e}")))?;
        let mut trust_bundles: Vec<TrustBundle> = self
            .config
            .borrow()
            .clusters
            .iter()
            .map(|c| TrustBundle {
                trust_domain: c.trust_domain.clone(),
                ca_pem: c.ca_bundle_pem.clone(),
            })
            .collect();
        if !trust_bundles
            .iter()
            .any(|b| b.trust_domain == self.ca.trust_domain())
        {
            trust_bundles.push(TrustBundle {
                trust_domain: self.ca.trust_domain().to_string(),
                ca_pem: self.ca.bundle_pem(),
            });
        }
        tracing::info!(identity = %id, "signed workload certificate");
        Ok(Response::new(SignResponse {
            cert_chain_pem: issued.cert_chain_pem,
            trust_bundles,
            not_after_unix: issued.not_after_unix,
        }))
    }
}

/// Stores, lists and deletes mesh-wide policies. Every document is validated here again,
/// whatever the client checked: an invalid one rejects the whole request and changes nothing.
pub struct PolicyApi {
    pub store: isthmus_federation::Store,
}

/// The status a failed store write answers with: the store's own mapping (a write the
/// replicas refused keeps its reason: `PERMISSION_DENIED` for a writer that may not write the
/// key), its message prefixed with what was being done.
fn store_status(err: isthmus_federation::StoreError, doing: &str) -> Status {
    let status = Status::from(err);
    Status::new(
        status.code(),
        format!("{doing} failed: {}", status.message()),
    )
}

impl PolicyApi {
    /// The store acting for the operator the API's authorization attached to `request` (the
    /// member itself for an in-process call), so the write names who made it.
    fn store_for<T>(&self, request: &Request<T>) -> isthmus_federation::Store {
        match request.extensions().get::<isthmus_federation::Writer>() {
            Some(writer) => self.store.acting_for(writer.clone()),
            None => self.store.clone(),
        }
    }
}

#[tonic::async_trait]
impl PolicyService for PolicyApi {
    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let store = self.store_for(&request);
        let req = request.into_inner();
        let mut policies = Vec::with_capacity(req.documents_json.len());
        for (i, json) in req.documents_json.iter().enumerate() {
            let policy = Policy::from_json_at("request", i + 1, json.as_bytes())
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            policies.push(policy);
        }
        let mut results = Vec::with_capacity(policies.len());
        let mut writes = Vec::new();
        for policy in &policies {
            let key = policy.store_key();
            let value = policy.to_json().to_string().into_bytes();
            let action = match self.store.get(&key) {
                None => "created",
                Some(r) if Policy::from_json(&r.value).ok().as_ref() == Some(policy) => "unchanged",
                Some(_) => "configured",
            };
            results.push(ApplyResult {
                resource: format!("{} {}/{}", policy.kind(), policy.namespace, policy.name),
                action: action.to_string(),
            });
            if action != "unchanged" {
                writes.push((key, value));
            }
        }
        if !req.dry_run {
            for (key, value) in writes {
                store
                    .put(&key, value)
                    .await
                    .map_err(|e| store_status(e, &format!("storing {key} in the federation")))?;
            }
        }
        Ok(Response::new(ApplyResponse { results }))
    }

    async fn get(
        &self,
        request: Request<GetPoliciesRequest>,
    ) -> Result<Response<GetPoliciesResponse>, Status> {
        let req = request.into_inner();
        let prefix = if req.kind.is_empty() {
            isthmus_core::policy::STORE_PREFIX.to_string()
        } else {
            let kind = Kind::parse(&req.kind).ok_or_else(|| {
                Status::invalid_argument(format!("field kind: unknown kind {:?}", req.kind))
            })?;
            format!(
                "{}{}/",
                isthmus_core::policy::STORE_PREFIX,
                kind.as_str().to_ascii_lowercase()
            )
        };
        let documents_json = self
            .store
            .list(&prefix)
            .into_iter()
            .filter_map(|(_, r)| Policy::from_json(&r.value).ok())
            .filter(|p| req.namespace.is_empty() || p.namespace == req.namespace)
            .filter(|p| req.name.is_empty() || p.name == req.name)
            .map(|p| p.to_json().to_string())
            .collect();
        Ok(Response::new(GetPoliciesResponse { documents_json }))
    }

    async fn delete(
        &self,
        request: Request<DeletePolicyRequest>,
    ) -> Result<Response<DeletePolicyResponse>, Status> {
        let store = self.store_for(&request);
        let req = request.into_inner();
        let kind = Kind::parse(&req.kind).ok_or_else(|| {
            Status::invalid_argument(format!("field kind: unknown kind {:?}", req.kind))
        })?;
        let namespace = if req.namespace.is_empty() {
            "default".to_string()
        } else {
            req.namespace
        };
        let key = isthmus_core::policy::store_key(kind, &namespace, &req.name);
        if self.store.get(&key).is_none() {
            return Ok(Response::new(DeletePolicyResponse { deleted: false }));
        }
        store
            .delete(&key)
            .await
            .map_err(|e| store_status(e, &format!("deleting {key} in the federation")))?;
        Ok(Response::new(DeletePolicyResponse { deleted: true }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reporter `n` of its own identity (so the per-identity cap does not apply).
    fn own(n: impl std::fmt::Display) -> Reporter {
        (format!("spiffe://east/ns/a/sa/s{n}"), format!("node-{n}"))
    }

    #[test]
    fn failover_reports_are_bounded_and_the_stale_go_first() {
        let mut reports = Reports::new();
        let start = std::time::Instant::now();
        for n in 0..MAX_REPORTERS {
            assert_eq!(
                remember_report(&mut reports, own(n), BTreeMap::new(), start),
                0
            );
        }
        // A node that reports again keeps its slot.
        let later = start + Duration::from_secs(1);
        remember_report(&mut reports, own(7), BTreeMap::new(), later);
        assert_eq!(reports.len(), MAX_REPORTERS);
        // A new node while all are fresh: the stalest one goes.
        assert_eq!(
            remember_report(&mut reports, own("new"), BTreeMap::new(), later),
            1
        );
        assert_eq!(reports.len(), MAX_REPORTERS);
        assert!(reports.contains_key(&own("new")) && reports.contains_key(&own(7)));
        // Once the old ones are no longer fresh, all of them go at once.
        let much_later = start + REPORT_FRESH + Duration::from_millis(500);
        remember_report(&mut reports, own("newer"), BTreeMap::new(), much_later);
        let mut left: Vec<&str> = reports.keys().map(|(_, n)| n.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["node-7", "node-new", "node-newer"]);
    }

    #[test]
    fn one_identity_cannot_replace_or_crowd_out_anothers_reports() {
        let mut reports = Reports::new();
        let start = std::time::Instant::now();
        let honest = (
            "spiffe://east/ns/a/sa/honest".to_string(),
            "node-1".to_string(),
        );
        remember_report(&mut reports, honest.clone(), BTreeMap::new(), start);
        // Mallory reuses the honest node id: a report of its own, next to the honest one.
        let mallory = |n: usize| {
            (
                "spiffe://east/ns/a/sa/mallory".to_string(),
                format!("node-{n}"),
            )
        };
        remember_report(&mut reports, mallory(1), BTreeMap::new(), start);
        assert_eq!(reports.len(), 2);
        // A flood of node ids from Mallory evicts only Mallory's own.
        for n in 0..3 * MAX_NODES_PER_IDENTITY {
            let at = start + Duration::from_millis(u64::try_from(n).unwrap());
            remember_report(&mut reports, mallory(n), BTreeMap::new(), at);
        }
        assert!(reports.contains_key(&honest));
        assert_eq!(reports.len(), MAX_NODES_PER_IDENTITY + 1);
    }
}
