//! The control plane's gRPC API to its cluster's data plane: the configuration stream and
//! certificate signing (see core/proto/mesh.proto).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use isthmus_core::ca::CertificateAuthority;
use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::MeshConfig;
use isthmus_core::policy::{Kind, Policy};
use isthmus_core::proto::mesh::certificate_service_server::CertificateService;
use isthmus_core::proto::mesh::mesh_config_service_server::MeshConfigService;
use isthmus_core::proto::mesh::policy_service_server::PolicyService;
use isthmus_core::proto::mesh::{
    ApplyRequest, ApplyResponse, ApplyResult, DeletePolicyRequest, DeletePolicyResponse,
    GetPoliciesRequest, GetPoliciesResponse, MeshConfigSnapshot, SignRequest, SignResponse,
    StreamConfigRequest, TrustBundle,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::tokens::TokenPolicy;

/// Serves the configuration stream from the catalog's watch channel.
pub struct ConfigApi {
    pub config: watch::Receiver<Arc<MeshConfig>>,
    pub stop: watch::Receiver<bool>,
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
}

/// Signs workload certificates for identities a bootstrap token allows.
pub struct CertificateApi {
    pub ca: Arc<CertificateAuthority>,
    pub tokens: TokenPolicy,
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
        if id.trust_domain() != self.ca.trust_domain() {
            return Err(Status::permission_denied(format!(
                "this control plane signs only for trust domain {}, not {}",
                self.ca.trust_domain(),
                id.trust_domain()
            )));
        }
        if !self.tokens.allows(&req.token, &id) {
            return Err(Status::permission_denied(format!(
                "the token does not allow identity {id}"
            )));
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
                ca_pem: self.ca.cert_pem().to_string(),
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

#[tonic::async_trait]
impl PolicyService for PolicyApi {
    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
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
                self.store.put(&key, value).await.map_err(|e| {
                    Status::unavailable(format!("storing {key} in the federation failed: {e}"))
                })?;
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
        self.store.delete(&key).await.map_err(|e| {
            Status::unavailable(format!("deleting {key} in the federation failed: {e}"))
        })?;
        Ok(Response::new(DeletePolicyResponse { deleted: true }))
    }
}
