//! Who may call what on the control-plane API (docs/security.md §6).
//!
//! The API's TLS layer verifies a client certificate when one is presented
//! ([`isthmus_core::api_tls`]) and attaches the caller's [`Principal`] to each request. Here
//! a pure decision ([`decide`]) maps (method, caller) to allow or refuse, and [`write_allowed`]
//! decides the store writes an operator may make, key by key. [`AuthorizeLayer`] applies
//! both to every request before any service sees it.
//!
//! Rights, in short: data-plane identities of this cluster stream their configuration (and
//! sidecars report failover); `viewer` operators of any member read; `admin` operators of
//! this cluster also write this cluster's own records; mesh admins (an `admin` with a grant
//! in the store) change policies, membership and any record. `Sign` and `Kv.Join` are
//! authorized by their token alone.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use isthmus_core::api_tls::ApiConnInfo;
use isthmus_core::identity::{OperatorId, Principal, Role};
use isthmus_federation::{KvWrite, Store, WriteGuard, Writer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tonic::{Code, Status};

use crate::records;

/// A method of the control-plane API, by what it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    StreamConfig,
    ReportFailover,
    Explain,
    Sign,
    PolicyGet,
    PolicyApply,
    PolicyDelete,
    /// `Kv.Get`, `List`, `Watch`, `Status`.
    KvRead,
    /// `Kv.Put`, `Delete`, `CompareAndSet`: which keys, [`write_allowed`] decides.
    KvWrite,
    KvMintJoinToken,
    KvRemoveMember,
    KvJoin,
    /// `Kv.JoinInfo`: the public bundle set a joiner checks its token against.
    KvJoinInfo,
    /// `CredentialService.Issue`: an admin of this cluster issues operator credentials.
    Issue,
    /// A path the API does not serve (answered UNIMPLEMENTED by the router).
    Unknown,
}

impl Method {
    /// The method a gRPC request path names.
    pub fn from_path(path: &str) -> Method {
        match path {
            "/isthmus.mesh.v1.MeshConfigService/StreamConfig" => Method::StreamConfig,
            "/isthmus.mesh.v1.MeshConfigService/ReportFailover" => Method::ReportFailover,
            "/isthmus.mesh.v1.MeshConfigService/Explain" => Method::Explain,
            "/isthmus.mesh.v1.CertificateService/Sign" => Method::Sign,
            "/isthmus.mesh.v1.PolicyService/Get" => Method::PolicyGet,
            "/isthmus.mesh.v1.PolicyService/Apply" => Method::PolicyApply,
            "/isthmus.mesh.v1.PolicyService/Delete" => Method::PolicyDelete,
            "/isthmus.federation.v1.Kv/Get"
            | "/isthmus.federation.v1.Kv/List"
            | "/isthmus.federation.v1.Kv/Watch"
            | "/isthmus.federation.v1.Kv/Status" => Method::KvRead,
            "/isthmus.federation.v1.Kv/Put"
            | "/isthmus.federation.v1.Kv/Delete"
            | "/isthmus.federation.v1.Kv/CompareAndSet" => Method::KvWrite,
            "/isthmus.federation.v1.Kv/MintJoinToken" => Method::KvMintJoinToken,
            "/isthmus.federation.v1.Kv/RemoveMember" => Method::KvRemoveMember,
            "/isthmus.federation.v1.Kv/Join" => Method::KvJoin,
            "/isthmus.federation.v1.Kv/JoinInfo" => Method::KvJoinInfo,
            "/isthmus.mesh.v1.CredentialService/Issue" => Method::Issue,
            _ => Method::Unknown,
        }
    }

    fn is_read(self) -> bool {
        matches!(self, Method::Explain | Method::PolicyGet | Method::KvRead)
    }

    fn needs_mesh_admin(self) -> bool {
        matches!(
            self,
            Method::PolicyApply
                | Method::PolicyDelete
                | Method::KvMintJoinToken
                | Method::KvRemoveMember
        )
    }
}

/// What this control plane knows when it decides.
pub struct Local<'a> {
    pub cluster: &'a str,
    pub trust_domain: &'a str,
    /// Whether an operator holds a mesh-admin grant.
    pub is_mesh_admin: &'a dyn Fn(&OperatorId) -> bool,
}

/// What an allowed request carries on to the services (in its extensions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// The method needs nothing more (or its token decides).
    Plain,
    /// An operator's store writes: [`write_allowed`] checks each key.
    Writer {
        operator: OperatorId,
        mesh_admin: bool,
    },
}

/// Decides one request. `Err` is the status the caller gets.
pub fn decide(
    local: &Local<'_>,
    method: Method,
    caller: Option<&Principal>,
) -> Result<Allowed, Status> {
    // Authorized by the request's own token (docs/security.md §3, §5), or public (the bundle
    // set a joiner checks).
    if matches!(
        method,
        Method::Sign | Method::KvJoin | Method::KvJoinInfo | Method::Unknown
    ) {
        return Ok(Allowed::Plain);
    }
    let Some(caller) = caller else {
        return Err(Status::unauthenticated(format!(
            "{}: this method needs a client certificate (an operator credential: `isthmus \
             credentials issue`; a data-plane daemon presents its own certificate)",
            name(method)
        )));
    };
    let ours = caller.trust_domain() == local.trust_domain;
    let refuse = |why: &str| {
        Err(Status::permission_denied(format!(
            "{caller} may not call {}: {why}",
            name(method)
        )))
    };
    match caller {
        Principal::Workload(id) if id.is_control() => match method {
            Method::Explain => Ok(Allowed::Plain),
            Method::PolicyGet | Method::KvRead if ours => Ok(Allowed::Plain),
            _ => refuse("a control plane writes its own records in-process"),
        },
        Principal::Workload(id) => {
            if !ours {
                return refuse(&format!(
                    "it belongs to another cluster's trust domain (this is {}'s control plane)",
                    local.cluster
                ));
            }
            match method {
                Method::StreamConfig => Ok(Allowed::Plain),
                Method::ReportFailover if !id.is_gateway() && !id.is_dns() => Ok(Allowed::Plain),
                _ => refuse(
                    "data-plane identities stream their configuration and report failover only",
                ),
            }
        }
        Principal::Operator(op) => {
            if method.is_read() || (method == Method::StreamConfig && ours) {
                return Ok(Allowed::Plain);
            }
            if matches!(method, Method::StreamConfig | Method::ReportFailover) {
                return refuse("this method is for this cluster's data plane");
            }
            if op.role() != Role::Admin {
                return refuse("the viewer role reads only");
            }
            if !ours {
                return refuse(&format!(
                    "writes go through your own cluster's control plane (this is {}'s, trust domain {})",
                    local.cluster, local.trust_domain
                ));
            }
            let mesh_admin = (local.is_mesh_admin)(op);
            if method.needs_mesh_admin() && !mesh_admin {
                return refuse(
                    "it needs a mesh-admin grant (grants/mesh-admin/<trust-domain>/<name>)",
                );
            }
            Ok(Allowed::Writer {
                operator: op.clone(),
                mesh_admin,
            })
        }
    }
}

/// Whether an allowed writer may make one store write: a mesh admin any key (but never the
/// last mesh-admin grant away), an admin of this cluster only this cluster's own records.
pub fn write_allowed(
    cluster: &str,
    writer: &Allowed,
    write: KvWrite<'_>,
    grants: &dyn Fn() -> Vec<String>,
) -> Result<(), Status> {
    let Allowed::Writer {
        operator,
        mesh_admin,
    } = writer
    else {
        return Err(Status::permission_denied(format!(
            "writing {:?} needs an admin operator credential",
            write.key
        )));
    };
    if *mesh_admin {
        if write.delete && write.key.starts_with(records::MESH_ADMIN_GRANTS_PREFIX) {
            let others = grants().into_iter().filter(|k| k != write.key).count();
            if others == 0 {
                return Err(Status::failed_precondition(format!(
                    "{:?} is the last mesh-admin grant; grant another mesh admin first",
                    write.key
                )));
            }
        }
        return Ok(());
    }
    if records::owned_by(write.key, cluster) {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "{operator} may write only cluster {cluster}'s own records (clusters/{cluster}, \
         exports/<ns>/<svc>/{cluster}); {:?} needs a mesh-admin grant",
        write.key
    )))
}

/// Labels of a refused call: the method and the gRPC code it got.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Refusal {
    method: String,
    code: String,
}

/// The API's refusals, counted by method and code
/// (`isthmus_control_api_refused_total{method,code}`): where someone without the right is
/// knocking.
#[derive(Debug, Clone, Default)]
pub struct ApiMetrics {
    refused: Family<Refusal, Counter>,
    /// Failover reports dropped to keep within their bounds
    /// (`isthmus_control_failover_reports_evicted_total`).
    failover_reports_evicted: Counter,
}

impl ApiMetrics {
    /// Adds the counter to the control plane's registry (`isthmus_control`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "api_refused",
            "Control-plane API calls refused by authorization, by method and gRPC code",
            self.refused.clone(),
        );
        registry.register(
            "failover_reports_evicted",
            "Failover reports dropped to stay within their bounds (per identity, then in all)",
            self.failover_reports_evicted.clone(),
        );
    }

    /// The counter the failover-report store adds its evictions to.
    pub fn failover_reports_evicted(&self) -> Counter {
        self.failover_reports_evicted.clone()
    }

    fn refuse(&self, method: Method, code: Code) {
        self.refused
            .get_or_create(&Refusal {
                method: name(method).to_string(),
                code: format!("{code:?}"),
            })
            .inc();
    }

    /// How many `method` calls got `code` (for tests and the demo).
    pub fn refused(&self, method: Method, code: Code) -> u64 {
        self.refused
            .get_or_create(&Refusal {
                method: name(method).to_string(),
                code: format!("{code:?}"),
            })
            .get()
    }
}

fn name(method: Method) -> &'static str {
    match method {
        Method::StreamConfig => "MeshConfigService.StreamConfig",
        Method::ReportFailover => "MeshConfigService.ReportFailover",
        Method::Explain => "MeshConfigService.Explain",
        Method::Sign => "CertificateService.Sign",
        Method::PolicyGet => "PolicyService.Get",
        Method::PolicyApply => "PolicyService.Apply",
        Method::PolicyDelete => "PolicyService.Delete",
        Method::KvRead => "Kv (read)",
        Method::KvWrite => "Kv (write)",
        Method::KvMintJoinToken => "Kv.MintJoinToken",
        Method::KvRemoveMember => "Kv.RemoveMember",
        Method::KvJoin => "Kv.Join",
        Method::KvJoinInfo => "Kv.JoinInfo",
        Method::Issue => "CredentialService.Issue",
        Method::Unknown => "an unknown method",
    }
}

/// The live inputs of [`decide`] for one control plane.
#[derive(Clone)]
pub struct Authorizer {
    cluster: String,
    trust_domain: String,
    store: Store,
    metrics: ApiMetrics,
    /// The operator who is a mesh admin while no grant exists (this federation's first
    /// member only): the name of `spiffe://<this td>/operator/admin/<name>`.
    bootstrap_admin: Option<String>,
}

impl Authorizer {
    pub fn new(
        cluster: &str,
        trust_domain: &str,
        store: Store,
        bootstrap_admin: Option<String>,
        metrics: ApiMetrics,
    ) -> Self {
        Authorizer {
            cluster: cluster.to_string(),
            trust_domain: trust_domain.to_string(),
            store,
            metrics,
            bootstrap_admin,
        }
    }

    /// Whether `op` holds a mesh-admin grant in this member's replica (or is the bootstrap
    /// admin while there is no grant at all).
    pub fn is_mesh_admin(&self, op: &OperatorId) -> bool {
        if op.role() != Role::Admin {
            return false;
        }
        let key = records::mesh_admin_grant_key(op.trust_domain(), op.name());
        if self.store.get(&key).is_some() {
            return true;
        }
        self.bootstrap_admin.as_deref() == Some(op.name())
            && op.trust_domain() == self.trust_domain
            && self
                .store
                .list(records::MESH_ADMIN_GRANTS_PREFIX)
                .is_empty()
    }

    fn decide(&self, method: Method, caller: Option<&Principal>) -> Result<Allowed, Status> {
        let is_mesh_admin = |op: &OperatorId| self.is_mesh_admin(op);
        decide(
            &Local {
                cluster: &self.cluster,
                trust_domain: &self.trust_domain,
                is_mesh_admin: &is_mesh_admin,
            },
            method,
            caller,
        )
    }

    /// The `Kv` service's per-key check, reading what [`AuthorizeLayer`] attached.
    pub fn write_guard(&self) -> WriteGuard {
        let this = self.clone();
        Arc::new(move |extensions: &tonic::Extensions, write: KvWrite<'_>| {
            let allowed = extensions.get::<Allowed>().ok_or_else(|| {
                Status::permission_denied("store writes need an admin operator credential")
            })?;
            let grants = || {
                this.store
                    .list(records::MESH_ADMIN_GRANTS_PREFIX)
                    .into_iter()
                    .map(|(k, _)| k)
                    .collect()
            };
            write_allowed(&this.cluster, allowed, write, &grants).inspect_err(|status| {
                this.metrics.refuse(Method::KvWrite, status.code());
            })
        })
    }
}

/// A tower layer applying an [`Authorizer`] to every request of the API server.
#[derive(Clone)]
pub struct AuthorizeLayer(pub Authorizer);

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authorize {
            inner,
            authorizer: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    authorizer: Authorizer,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let caller = request
            .extensions()
            .get::<ApiConnInfo>()
            .and_then(|info| info.caller.clone());
        let method = Method::from_path(request.uri().path());
        match self.authorizer.decide(method, caller.as_ref()) {
            Ok(allowed) => {
                // Writes the request makes are proposed for the operator, and every replica
                // checks what that operator may write (docs/security.md §7).
                if let Allowed::Writer { operator, .. } = &allowed {
                    request
                        .extensions_mut()
                        .insert(Writer::Operator(operator.clone()));
                }
                request.extensions_mut().insert(allowed);
                // The service that was polled ready serves this request; a fresh clone
                // takes its place for the next one.
                let clone = self.inner.clone();
                let mut ready = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move { ready.call(request).await })
            }
            Err(status) => {
                tracing::debug!(
                    path = %request.uri().path(),
                    caller = caller.as_ref().map(ToString::to_string).unwrap_or_else(|| "anonymous".into()),
                    code = ?status.code(),
                    "control API call refused"
                );
                self.authorizer.metrics.refuse(method, status.code());
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests;
