//! Automatic sidecar injection: the mutating admission webhook the control plane serves.
//!
//! The API server sends an `AdmissionReview` (admission.k8s.io/v1) for every Pod created in a
//! namespace labelled `isthmus-injection=enabled` (the MutatingWebhookConfiguration's
//! namespaceSelector, see deploy/). [`review`] answers it (pure, no I/O): allowed, with a
//! JSONPatch (RFC 6902) that adds
//! - the init container `isthmus-init` (`isthmus sidecar init`, NET_ADMIN and NET_RAW, run
//!   as root once), which redirects the pod's TCP to the sidecar;
//! - the sidecar container `isthmus-proxy` (`isthmus sidecar`, user and group 1337, the
//!   user the redirect exempts), told its pod's identity through the downward API;
//! - the annotation `sidecar.isthmus.io/status: injected`.
//!
//! Pods that opt out (`sidecar.isthmus.io/inject: "false"`), use the host's network, or
//! already carry `isthmus-proxy` are allowed unchanged. A review that cannot be read is
//! rejected with an error naming the field ([`WebhookError`]); [`handle`] turns that into an
//! HTTP 400 with the reason, never a crash.

use base64::Engine;
use rustls::pki_types::pem::PemObject;
use serde_json::{json, Value};

/// The sidecar container's name, which also marks a pod as injected.
pub const PROXY_CONTAINER: &str = "isthmus-proxy";
pub const INIT_CONTAINER: &str = "isthmus-init";
/// Set to `"false"` on a pod to keep it out of the mesh.
pub const INJECT_ANNOTATION: &str = "sidecar.isthmus.io/inject";
pub const STATUS_ANNOTATION: &str = "sidecar.isthmus.io/status";
/// The user (and group) the sidecar runs as, exempt from the redirect.
pub const PROXY_UID: u32 = 1337;
/// The audience of the service-account token the sidecar presents for its certificate.
pub const TOKEN_AUDIENCE: &str = "isthmus";
pub use isthmus_core::attach::{PODINFO_DIR, TOKEN_DIR};
const TOKEN_VOLUME: &str = "isthmus-token";
const PODINFO_VOLUME: &str = "isthmus-podinfo";

/// What injected containers are made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// The image carrying the `isthmus` binary.
    pub image: String,
    /// This cluster's name and trust domain.
    pub cluster: String,
    pub trust_domain: String,
    /// The control plane's gRPC address as pods reach it (its Service).
    pub control: String,
    /// The east-west gateway's address for sidecars.
    pub gateway: String,
    /// The cluster CA's certificate (PEM), which the control plane's API certificate chains
    /// to: injected as `ISTHMUS_CONTROL_CA`.
    pub ca_pem: String,
}

/// Why an admission review was not answered with a patch.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    #[error("the request body is not JSON: {0}")]
    NotJson(String),
    #[error("{field}: {reason}")]
    Field { field: String, reason: String },
}

fn field(field: &str, reason: impl Into<String>) -> WebhookError {
    WebhookError::Field {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// Answers one `AdmissionReview` request (the whole JSON document).
pub fn review(body: &[u8], config: &InjectConfig) -> Result<Value, WebhookError> {
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| WebhookError::NotJson(e.to_string()))?;
    match (
        doc.get("apiVersion").and_then(Value::as_str),
        doc.get("kind").and_then(Value::as_str),
    ) {
        (Some("admission.k8s.io/v1"), Some("AdmissionReview")) => {}
        (api, kind) => {
            return Err(field(
                "apiVersion/kind",
                format!(
                    "expected admission.k8s.io/v1 AdmissionReview, got {} {}",
                    api.unwrap_or("(none)"),
                    kind.unwrap_or("(none)")
                ),
            ))
        }
    }
    let request = doc
        .get("request")
        .filter(|r| r.is_object())
        .ok_or_else(|| field("request", "missing"))?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| field("request.uid", "missing or not a string"))?;
    let pod = request
        .get("object")
        .filter(|o| o.is_object())
        .ok_or_else(|| field("request.object", "missing"))?;
    if pod
        .get("kind")
        .and_then(Value::as_str)
        .is_some_and(|k| k != "Pod")
    {
        return Err(field("request.object.kind", "only Pods are injected"));
    }
    let namespace = request
        .get("namespace")
        .and_then(Value::as_str)
        .or_else(|| pod.pointer("/metadata/namespace").and_then(Value::as_str))
        .ok_or_else(|| field("request.namespace", "missing"))?;
    let mut response = json!({"uid": uid, "allowed": true});
    if let Some(patch) = patch(pod, namespace, config)? {
        let encoded = base64::engine::general_purpose::STANDARD.encode(patch.to_string());
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(encoded);
    }
    Ok(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
}

/// The JSONPatch injecting `pod`, or `None` when it stays as it is.
pub fn patch(
    pod: &Value,
    namespace: &str,
    config: &InjectConfig,
) -> Result<Option<Value>, WebhookError> {
    let spec = pod
        .get("spec")
        .filter(|s| s.is_object())
        .ok_or_else(|| field("request.object.spec", "missing"))?;
    let containers = spec
        .get("containers")
        .and_then(Value::as_array)
        .ok_or_else(|| field("request.object.spec.containers", "missing or not a list"))?;
    let annotations = pod.pointer("/metadata/annotations");
    let opted_out = annotations
        .and_then(|a| a.get(INJECT_ANNOTATION))
        .and_then(Value::as_str)
        .is_some_and(|v| v.eq_ignore_ascii_case("false"));
    let injected = containers
        .iter()
        .any(|c| c.get("name").and_then(Value::as_str) == Some(PROXY_CONTAINER));
    let host_network = spec.get("hostNetwork").and_then(Value::as_bool) == Some(true);
    if opted_out || injected || host_network {
        return Ok(None);
    }
    // Ports the application declares are excluded from nothing: every inbound port goes
    // through the sidecar, which serves it by the port's protocol.
    let mut ops = Vec::new();
    let init = init_container(config);
    if spec
        .get("initContainers")
        .and_then(Value::as_array)
        .is_some()
    {
        ops.push(json!({"op": "add", "path": "/spec/initContainers/-", "value": init}));
    } else {
        ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [init]}));
    }
    ops.push(json!({"op": "add", "path": "/spec/containers/-", "value": proxy_container(namespace, config)}));
    let volumes = proxy_volumes();
    if spec.get("volumes").and_then(Value::as_array).is_some() {
        for volume in volumes {
            ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume}));
        }
    } else {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": volumes}));
    }
    if annotations.is_some_and(Value::is_object) {
        // '/' in a key is written '~1' in a JSON pointer (RFC 6901).
        ops.push(json!({"op": "add", "path": "/metadata/annotations/sidecar.isthmus.io~1status", "value": "injected"}));
    } else {
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {STATUS_ANNOTATION: "injected"}}));
    }
    Ok(Some(Value::Array(ops)))
}

fn init_container(config: &InjectConfig) -> Value {
    json!({
        "name": INIT_CONTAINER,
        "image": config.image,
        "args": ["sidecar", "init", "--proxy-uid", PROXY_UID.to_string(), "--proxy-gid", PROXY_UID.to_string()],
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    })
}

fn proxy_container(namespace: &str, config: &InjectConfig) -> Value {
    let env = |name: &str, value: &str| json!({"name": name, "value": value});
    let from_field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    json!({
        "name": PROXY_CONTAINER,
        "image": config.image,
        "args": ["sidecar", "--kubernetes"],
        "env": [
            env("ISTHMUS_CLUSTER", &config.cluster),
            env("ISTHMUS_TRUST_DOMAIN", &config.trust_domain),
            env("ISTHMUS_CONTROL", &config.control),
            env("ISTHMUS_CONTROL_CA", &config.ca_pem),
            env("ISTHMUS_GATEWAY", &config.gateway),
            env("POD_NAMESPACE", namespace),
            from_field("POD_NAME", "metadata.name"),
            from_field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            from_field("POD_IP", "status.podIP"),
        ],
        "ports": [
            {"name": "isthmus-admin", "containerPort": 15020, "protocol": "TCP"},
        ],
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true},
            {"name": PODINFO_VOLUME, "mountPath": PODINFO_DIR, "readOnly": true},
        ],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 15020}, "periodSeconds": 2},
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
    })
}

/// The sidecar's volumes: a service-account token for the audience `isthmus` (the kubelet
/// rotates it; the control plane verifies it with a TokenReview) and the pod's labels.
fn proxy_volumes() -> Vec<Value> {
    vec![
        json!({"name": TOKEN_VOLUME, "projected": {"sources": [
            {"serviceAccountToken": {"audience": TOKEN_AUDIENCE, "expirationSeconds": 3600, "path": "token"}},
        ]}}),
        json!({"name": PODINFO_VOLUME, "downwardAPI": {"items": [
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
        ]}}),
    ]
}

/// The webhook's HTTP answer to a POSTed body: 200 with the AdmissionReview response, or 400
/// with `{"error": ...}` naming what was wrong.
pub fn handle(body: &[u8], config: &InjectConfig) -> (u16, Vec<u8>) {
    match review(body, config) {
        Ok(answer) => (200, answer.to_string().into_bytes()),
        Err(e) => (
            400,
            json!({"error": e.to_string()}).to_string().into_bytes(),
        ),
    }
}

/// Connections the webhook holds at once; more are closed as they are accepted (the API server
/// needs a few; any pod can reach the port).
pub const MAX_CONNECTIONS: usize = 256;
/// How long a client has to send a request's headers.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the webhook over HTTPS on `listener` until `stop` fires: `POST /inject` answers
/// reviews; `GET /ready` says it is up; anything else is 404. At most [`MAX_CONNECTIONS`]
/// at once, a TLS handshake within 5 s and request headers within [`HEADER_TIMEOUT`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: std::sync::Arc<rustls::ServerConfig>,
    config: InjectConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use http_body_util::{BodyExt, Full};
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let config = std::sync::Arc::new(config);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((tcp, peer)) = accepted else { continue };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "webhook at its connection limit; closing");
            continue;
        };
        let (acceptor, config) = (acceptor.clone(), config.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let handshake =
                tokio::time::timeout(std::time::Duration::from_secs(5), acceptor.accept(tcp));
            let Ok(Ok(tls)) = handshake.await else {
                tracing::info!(%peer, "webhook TLS handshake failed");
                return;
            };
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let config = config.clone();
                    async move {
                        let (status, body) = match (req.method().as_str(), req.uri().path()) {
                            ("POST", "/inject") => {
                                match http_body_util::Limited::new(req.into_body(), MAX_REVIEW)
                                    .collect()
                                    .await
                                {
                                    Ok(body) => handle(&body.to_bytes(), &config),
                                    Err(e) => (
                                        413,
                                        json!({"error": format!("reading the review: {e}")})
                                            .to_string()
                                            .into_bytes(),
                                    ),
                                }
                            }
                            ("GET", "/ready") => (200, b"ready\n".to_vec()),
                            _ => (
                                404,
                                json!({"error": "POST /inject"}).to_string().into_bytes(),
                            ),
                        };
                        let mut resp = http::Response::new(Full::new(bytes::Bytes::from(body)));
                        *resp.status_mut() = http::StatusCode::from_u16(status)
                            .unwrap_or(http::StatusCode::BAD_REQUEST);
                        resp.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "webhook connection ended with an error");
            }
        });
    }
}

/// The webhook's serving certificate, re-issued from the cluster CA at half its lifetime:
/// handshakes from then on present the new one (the `caBundle` is the CA, which does not
/// change, so nothing needs re-patching).
pub struct RotatingCert {
    current: std::sync::RwLock<std::sync::Arc<rustls::sign::CertifiedKey>>,
}

impl std::fmt::Debug for RotatingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RotatingCert")
    }
}

impl RotatingCert {
    /// Issues the first certificate for `dns_names` and keeps re-issuing it at half of
    /// `lifetime` until `stop` fires (a failed issue is retried a minute later).
    pub fn start(
        ca: std::sync::Arc<isthmus_core::ca::CertificateAuthority>,
        dns_names: Vec<String>,
        lifetime: std::time::Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(std::sync::Arc<Self>, tokio::task::JoinHandle<()>), String> {
        let issue = move || -> Result<rustls::sign::CertifiedKey, String> {
            let cert = ca
                .issue_server(&dns_names, lifetime)
                .map_err(|e| format!("issuing the webhook certificate: {e}"))?;
            certified_key(&cert.cert_chain_pem, &cert.key_pem)
        };
        let this = std::sync::Arc::new(RotatingCert {
            current: std::sync::RwLock::new(std::sync::Arc::new(issue()?)),
        });
        let rotating = this.clone();
        let task = tokio::spawn(async move {
            let mut wait = lifetime / 2;
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                match issue() {
                    Ok(key) => {
                        *rotating.current.write().unwrap_or_else(|e| e.into_inner()) =
                            std::sync::Arc::new(key);
                        tracing::info!("webhook certificate rotated");
                        wait = lifetime / 2;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook certificate rotation failed; retrying");
                        wait = std::time::Duration::from_secs(60).min(lifetime / 4);
                    }
                }
            }
        });
        Ok((this, task))
    }

    /// The DER of the leaf presented now.
    pub fn leaf_der(&self) -> Vec<u8> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current.cert.first().map(|c| c.to_vec()).unwrap_or_default()
    }

    /// A TLS configuration presenting the current certificate.
    pub fn tls_config(self: &std::sync::Arc<Self>) -> Result<rustls::ServerConfig, String> {
        let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl rustls::server::ResolvesServerCert for RotatingCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

fn certified_key(chain_pem: &str, key_pem: &str) -> Result<rustls::sign::CertifiedKey, String> {
    let certs = isthmus_core::tls::certs_from_pem("webhook certificate", chain_pem)
        .map_err(|e| e.to_string())?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("webhook key: {e}"))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("webhook key: {e}"))?;
    Ok(rustls::sign::CertifiedKey::new(certs, signing))
}

/// The largest review read (the API server's own request limit is 3 MiB).
const MAX_REVIEW: usize = 3 * 1024 * 1024;

#[cfg(test)]
mod tests;
