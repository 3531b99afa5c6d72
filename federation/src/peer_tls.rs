//! Members authenticate each other on the peer port (docs/security.md §4).
//!
//! With [`PeerTls`] the peer port serves TLS 1.3 only. Every member presents its control
//! plane's certificate (`spiffe://<td>/ns/isthmus-system/sa/control`, from its cluster CA),
//! as server and as client. A client certificate is asked for but not required: it must
//! chain to the bundle of the trust domain it names (the [`TrustBundles`] the member follows),
//! and be a control plane's whose trust domain is bound to a member id in the
//! [`MemberDirectory`], else the handshake fails. Every request is checked again against the
//! directory as it is now ([`PeerGuardLayer`]), so a trust domain that loses its member loses
//! every right at once:
//!
//! - `Kv.Join` needs no certificate (its join token authorizes it), nor does `Kv.JoinInfo`
//!   (the public bundle set a joiner checks against its token);
//! - every other method needs a member's certificate (`UNAUTHENTICATED` without one,
//!   `PERMISSION_DENIED` for a certificate that is not a member control plane's);
//! - `RaftPeer.Send` takes only batches whose `from` is the member the certificate is bound
//!   to (`server.rs`).
//!
//! The client side ([`connect`]) checks the same binding the other way: the member it dials
//! must present the certificate of the trust domain bound to the member id it means to reach.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use isthmus_core::api_tls::ApiConnInfo;
use isthmus_core::identity::Principal;
use isthmus_core::revocation::ConnectionRegistry;
use isthmus_core::tls::{self, Identity, TrustBundles};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Status;

/// Which member each trust domain belongs to, as this member knows it. Kept up to date by
/// its owner (the control plane: the initial members of its config and the `clusters/<name>`
/// records of the replica).
#[derive(Debug, Default)]
pub struct MemberDirectory {
    by_domain: RwLock<BTreeMap<String, u64>>,
    /// The peer port's open connections by trust domain.
    connections: Arc<ConnectionRegistry>,
}

impl MemberDirectory {
    pub fn new(entries: BTreeMap<String, u64>) -> Arc<Self> {
        Arc::new(MemberDirectory {
            by_domain: RwLock::new(lowercase(entries)),
            connections: ConnectionRegistry::new(),
        })
    }

    /// Replaces the whole table. A trust domain that loses its member (removed, or bound
    /// to another id) has its open connections to the peer port closed at once.
    pub fn replace(&self, entries: BTreeMap<String, u64>) {
        let entries = lowercase(entries);
        let previous = std::mem::replace(
            &mut *self.by_domain.write().unwrap_or_else(|e| e.into_inner()),
            entries.clone(),
        );
        for (trust_domain, id) in previous {
            if entries.get(&trust_domain) != Some(&id) {
                let closed = self.connections.close_domain(&trust_domain);
                tracing::info!(
                    %trust_domain,
                    member = id,
                    connections = closed,
                    "member unbound from its trust domain: its peer-port connections are closed"
                );
            }
        }
    }

    /// Where the peer port registers its connections, so [`MemberDirectory::replace`] can
    /// close those of a member that goes.
    pub fn connections(&self) -> Arc<ConnectionRegistry> {
        self.connections.clone()
    }

    /// The member id bound to `trust_domain`.
    pub fn member_of(&self, trust_domain: &str) -> Option<u64> {
        self.by_domain
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&trust_domain.to_ascii_lowercase())
            .copied()
    }

    /// Every binding, for status and logs.
    pub fn entries(&self) -> BTreeMap<String, u64> {
        self.by_domain
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn lowercase(entries: BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    entries
        .into_iter()
        .map(|(td, id)| (td.to_ascii_lowercase(), id))
        .collect()
}

/// How a member authenticates the others on the peer port.
#[derive(Clone)]
pub struct PeerTls {
    /// The certificate this member presents, as server and as client (rotatable).
    pub identity: Arc<Identity>,
    /// The member bundles, by trust domain: a peer's chain must verify against its own.
    pub bundles: Arc<TrustBundles>,
    /// Trust domain → member id.
    pub directory: Arc<MemberDirectory>,
}

/// Requests and batches the peer port refused, by reason, since start.
#[derive(Debug, Default)]
pub(crate) struct PeerRefusals {
    pub(crate) unauthenticated: AtomicU64,
    pub(crate) not_a_member: AtomicU64,
    pub(crate) sender_mismatch: AtomicU64,
    pub(crate) not_tls: AtomicU64,
    pub(crate) bad_certificate: AtomicU64,
    pub(crate) handshake_timeout: AtomicU64,
    pub(crate) anonymous_limit: AtomicU64,
}

/// [`PeerRefusals`] as read at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerRefusalCounts {
    /// Calls without a certificate to a method that needs a member's.
    pub unauthenticated: u64,
    /// Calls with a certificate that is not a member control plane's.
    pub not_a_member: u64,
    /// `RaftPeer.Send` batches whose `from` is not the member the certificate is bound to.
    pub sender_mismatch: u64,
    /// Connections whose first bytes were not TLS (plaintext gRPC, say).
    pub not_tls: u64,
    /// Handshakes whose client certificate did not verify against the members' bundles.
    pub bad_certificate: u64,
    /// Handshakes not finished within the port's time limit.
    pub handshake_timeout: u64,
    /// Connections without a certificate closed because the port held as many as it takes
    /// (`PEER_MAX_ANONYMOUS_CONNECTIONS`).
    pub anonymous_limit: u64,
}

impl PeerRefusals {
    pub(crate) fn counts(&self) -> PeerRefusalCounts {
        PeerRefusalCounts {
            unauthenticated: self.unauthenticated.load(Ordering::Relaxed),
            not_a_member: self.not_a_member.load(Ordering::Relaxed),
            sender_mismatch: self.sender_mismatch.load(Ordering::Relaxed),
            not_tls: self.not_tls.load(Ordering::Relaxed),
            bad_certificate: self.bad_certificate.load(Ordering::Relaxed),
            handshake_timeout: self.handshake_timeout.load(Ordering::Relaxed),
            anonymous_limit: self.anonymous_limit.load(Ordering::Relaxed),
        }
    }

    /// Counts a failed handshake (a member's own refusal is counted by [`accept_members`]).
    pub(crate) fn handshake_failed(&self, failure: isthmus_core::api_tls::HandshakeFailure) {
        use isthmus_core::api_tls::HandshakeFailure as F;
        let counter = match failure {
            F::NotTls => &self.not_tls,
            F::BadCertificate => &self.bad_certificate,
            F::Timeout => &self.handshake_timeout,
            F::AnonymousLimit => &self.anonymous_limit,
            F::Refused | F::Other => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The handshake's check of a client certificate that verified: a control plane whose trust
/// domain is bound to a member; anything else (a member cluster's workload, gateway or
/// operator certificate, a control plane of an unbound trust domain) fails the handshake,
/// counted as `not_a_member`. The per-request guard checks again, as the directory changes.
pub(crate) fn accept_members(
    directory: Arc<MemberDirectory>,
    refusals: Arc<PeerRefusals>,
) -> isthmus_core::tls::AcceptPrincipal {
    Arc::new(move |principal| {
        let member = bound_member(&directory, principal).is_some();
        if !member {
            refusals.not_a_member.fetch_add(1, Ordering::Relaxed);
        }
        member
    })
}

/// The member `principal` is: a control plane whose trust domain is bound to one.
fn bound_member(directory: &MemberDirectory, principal: &Principal) -> Option<PeerMember> {
    match principal {
        Principal::Workload(id) if id.is_control() => {
            directory.member_of(id.trust_domain()).map(PeerMember)
        }
        _ => None,
    }
}

/// The member a request on the peer port comes from, in the request's extensions when the
/// port serves TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerMember(pub(crate) u64);

/// The methods a client without a member certificate may call: a joiner's.
const JOIN_PATH: &str = "/isthmus.federation.v1.Kv/Join";
const JOIN_INFO_PATH: &str = "/isthmus.federation.v1.Kv/JoinInfo";

/// Who may call `path` with `caller`'s certificate: `Ok(Some(member))` for a member,
/// `Ok(None)` for an anonymous `Join` or `JoinInfo`.
pub(crate) fn authenticate(
    directory: &MemberDirectory,
    caller: Option<&Principal>,
    path: &str,
) -> Result<Option<PeerMember>, Refusal> {
    let member = caller.and_then(|p| bound_member(directory, p));
    if member.is_some() || path == JOIN_PATH || path == JOIN_INFO_PATH {
        return Ok(member);
    }
    Err(match caller {
        None => Refusal::Unauthenticated(format!(
            "{path} needs a federation member's certificate; the peer port serves only members \
             (and a joiner's Kv.JoinInfo and Kv.Join). Operators call a control plane's API \
             (port 15012)"
        )),
        Some(Principal::Workload(id)) if id.is_control() => Refusal::NotAMember(format!(
            "{path}: the trust domain {} is bound to no member of this federation",
            id.trust_domain()
        )),
        Some(other) => Refusal::NotAMember(format!(
            "{path}: {other} is not a federation member's identity (a member presents its \
             control plane's certificate)"
        )),
    })
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    Unauthenticated(String),
    NotAMember(String),
}

impl Refusal {
    fn status(&self) -> Status {
        match self {
            Refusal::Unauthenticated(m) => Status::unauthenticated(m.clone()),
            Refusal::NotAMember(m) => Status::permission_denied(m.clone()),
        }
    }
}

/// A tower layer applying [`authenticate`] to every request of the peer server.
#[derive(Clone)]
pub(crate) struct PeerGuardLayer {
    pub(crate) directory: Arc<MemberDirectory>,
    pub(crate) refusals: Arc<PeerRefusals>,
}

impl<S> tower::Layer<S> for PeerGuardLayer {
    type Service = PeerGuard<S>;
    fn layer(&self, inner: S) -> Self::Service {
        PeerGuard {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct PeerGuard<S> {
    inner: S,
    layer: PeerGuardLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for PeerGuard<S>
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
        let info = request.extensions().get::<ApiConnInfo>().cloned();
        let caller = info.as_ref().and_then(|i| i.caller.as_ref());
        match authenticate(&self.layer.directory, caller, request.uri().path()) {
            Ok(member) => {
                if let Some(member) = member {
                    request.extensions_mut().insert(member);
                }
                let clone = self.inner.clone();
                let mut ready = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move { ready.call(request).await })
            }
            Err(refusal) => {
                let counter = match refusal {
                    Refusal::Unauthenticated(_) => &self.layer.refusals.unauthenticated,
                    Refusal::NotAMember(_) => &self.layer.refusals.not_a_member,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    remote = ?info.as_ref().map(|i| i.remote),
                    path = %request.uri().path(),
                    "federation peer call refused: {refusal:?}"
                );
                Box::pin(std::future::ready(Ok(refusal.status().into_http())))
            }
        }
    }
}

/// Connects to member `to` at `addr` over TLS as this member, and checks that the server's
/// certificate is of the trust domain bound to `to`.
pub(crate) async fn connect(
    tls: &PeerTls,
    to: u64,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Channel, String> {
    let config =
        isthmus_core::api_tls::member_client_config(tls.identity.clone(), tls.bundles.clone())
            .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let uri: Uri = format!("https://{addr}")
        .parse()
        .map_err(|e| format!("{addr}: {e}"))?;
    let directory = tls.directory.clone();
    let endpoint = Endpoint::from(uri)
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let directory = directory.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(tls::mesh_server_name(), tcp).await?;
                let server = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .and_then(|leaf| tls::principal_in_der(leaf).ok());
                let bound = match &server {
                    Some(Principal::Workload(id)) => directory.member_of(id.trust_domain()),
                    _ => None,
                };
                if bound != Some(to) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        format!(
                            "{addr} presented {} which is not member {to}'s",
                            server
                                .map(|p| p.to_string())
                                .unwrap_or_else(|| "no identity".into())
                        ),
                    ));
                }
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| {
            use std::error::Error as _;
            match e.source() {
                Some(source) => format!("{e}: {source}"),
                None => e.to_string(),
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_core::identity::{OperatorId, Role, SpiffeId};

    fn directory() -> Arc<MemberDirectory> {
        MemberDirectory::new(BTreeMap::from([
            ("east.local".to_string(), 1),
            ("West.Local".to_string(), 2),
        ]))
    }

    #[test]
    fn the_handshake_accepts_only_bound_control_planes_and_counts_the_rest() {
        let refusals = Arc::new(PeerRefusals::default());
        let accept = accept_members(directory(), refusals.clone());
        assert!(accept(&Principal::Workload(SpiffeId::control(
            "east.local"
        ))));
        assert!(accept(&Principal::Workload(SpiffeId::control(
            "west.local"
        ))));
        let operator = isthmus_core::identity::OperatorId::new(
            "east.local",
            isthmus_core::identity::Role::Admin,
            "ann",
        )
        .expect("operator");
        for stranger in [
            Principal::Operator(operator),
            Principal::Workload(SpiffeId::gateway("east.local")),
            Principal::Workload(SpiffeId::control("north.local")),
        ] {
            assert!(!accept(&stranger), "{stranger}");
        }
        assert_eq!(refusals.counts().not_a_member, 3);
    }

    #[test]
    fn a_member_control_plane_is_its_member_and_may_call_anything() {
        let d = directory();
        let east = Principal::Workload(SpiffeId::control("east.local"));
        let west = Principal::Workload(SpiffeId::control("west.local"));
        assert_eq!(
            authenticate(&d, Some(&east), "/isthmus.federation.v1.RaftPeer/Send"),
            Ok(Some(PeerMember(1)))
        );
        assert_eq!(
            authenticate(&d, Some(&west), "/isthmus.federation.v1.Kv/Get"),
            Ok(Some(PeerMember(2)))
        );
        assert_eq!(
            authenticate(&d, Some(&west), JOIN_PATH),
            Ok(Some(PeerMember(2)))
        );
    }

    #[test]
    fn anonymous_callers_may_only_join() {
        let d = directory();
        assert_eq!(authenticate(&d, None, JOIN_PATH), Ok(None));
        assert_eq!(authenticate(&d, None, JOIN_INFO_PATH), Ok(None));
        for path in [
            "/isthmus.federation.v1.RaftPeer/Send",
            "/isthmus.federation.v1.Kv/Get",
            "/isthmus.federation.v1.Kv/Status",
            "/isthmus.federation.v1.Kv/Put",
        ] {
            match authenticate(&d, None, path) {
                Err(Refusal::Unauthenticated(m)) => assert!(m.contains(path), "{m}"),
                other => panic!("{path}: {other:?}"),
            }
        }
    }

    #[test]
    fn other_identities_and_unbound_trust_domains_are_not_members() {
        let d = directory();
        let refused = [
            Principal::Workload(SpiffeId::new("east.local", "default", "ratings")),
            Principal::Workload(SpiffeId::new(
                "east.local",
                "isthmus-system",
                "eastwest-gateway",
            )),
            Principal::Workload(SpiffeId::control("north.local")),
            Principal::Operator(OperatorId::new("east.local", Role::Admin, "admin").unwrap()),
        ];
        for caller in refused {
            match authenticate(&d, Some(&caller), "/isthmus.federation.v1.RaftPeer/Send") {
                Err(Refusal::NotAMember(m)) => assert!(m.contains("Send"), "{m}"),
                other => panic!("{caller}: {other:?}"),
            }
        }
        // Removing a binding takes the rights away at once.
        d.replace(BTreeMap::from([("west.local".to_string(), 2)]));
        let east = Principal::Workload(SpiffeId::control("east.local"));
        assert!(authenticate(&d, Some(&east), "/isthmus.federation.v1.Kv/Get").is_err());
    }

    #[test]
    fn a_trust_domain_that_loses_or_changes_its_member_has_its_connections_closed() {
        let d = directory();
        let connections = d.connections();
        let closed = |r: &mut isthmus_core::revocation::Registration| {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            r.poll_closed(&mut cx).is_ready()
        };
        let mut east = connections.register("east.local");
        let mut west = connections.register("west.local");
        let mut north = connections.register("north.local");

        // Same bindings (case aside), plus a new one: nothing closes.
        d.replace(BTreeMap::from([
            ("EAST.local".to_string(), 1),
            ("west.local".to_string(), 2),
            ("north.local".to_string(), 3),
        ]));
        assert!(!closed(&mut east) && !closed(&mut west) && !closed(&mut north));

        // East removed, west bound to another id: both cut off; north untouched.
        d.replace(BTreeMap::from([
            ("west.local".to_string(), 9),
            ("north.local".to_string(), 3),
        ]));
        assert!(closed(&mut east) && closed(&mut west));
        assert!(!closed(&mut north));
        assert_eq!(connections.open("north.local"), 1);
    }
}
