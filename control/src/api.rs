//! The control plane's gRPC API to its cluster's data plane: the configuration stream and
//! certificate signing (see core/proto/mesh.proto).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use isthmus_core::ca::CertificateAuthority;
use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::MeshConfig;
use isthmus_core::proto::mesh::certificate_service_server::CertificateService;
use isthmus_core::proto::mesh::mesh_config_service_server::MeshConfigService;
use isthmus_core::proto::mesh::{
    MeshConfigSnapshot, SignRequest, SignResponse, StreamConfigRequest, TrustBundle,
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
