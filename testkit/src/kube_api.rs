//! A small Kubernetes-API-compatible server for tests: list and watch with resource
//! versions, bookmarks and `410 Gone`, get, server-side apply / merge patch (objects and the
//! `status` subresource) and delete, for the resources Isthmus's discovery uses and the
//! policy kinds as custom resources; and API discovery (`/apis`, `/apis/<group>/<version>`)
//! saying which groups are served. Objects are JSON values kept in memory; every write moves
//! one global resource version, as etcd does.
//!
//! It serves exactly what kube-rs asks of a real API server over plain HTTP, so the
//! production code under test does not know it is not one. What it does not model: auth,
//! admission, field selectors and label selectors (the callers filter), pagination (every
//! list is one page), and server-side apply's field ownership (an apply is a merge).
//!
//! Test controls: [`KubeApi::put`] / [`KubeApi::remove`] change objects as a controller
//! would, [`KubeApi::bookmark`] sends a BOOKMARK on every open watch, [`KubeApi::compact`]
//! drops the event history and closes every watch (the clients' next watch gets a 410
//! ERROR event, so they relist), and [`KubeApi::stop`] / [`KubeApi::restart`] take the
//! server down and up on the same port with its objects kept (an API server restart), and
//! [`KubeApi::fail_lists`] makes one resource's lists fail.
//! Custom resources: Isthmus's `isthmus.io/v1alpha1` kinds are served from the start (the
//! chart installs their CRDs); Istio's groups only after [`KubeApi::install`] (installing
//! Istio's CRDs), at the version given.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

type Body = BoxBody<Bytes, Infallible>;

/// (resource plural, namespace, name); namespace is "" for cluster-scoped resources.
type Key = (String, String, String);

#[derive(Clone, Debug)]
enum Broadcast {
    Change(Change),
    Bookmark(u64),
    CloseAll,
}

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    resource: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    /// Watches from a resource version older than this get `410 Gone`.
    oldest: u64,
    lists: BTreeMap<String, usize>,
    watches: BTreeMap<String, usize>,
    bookmarks_sent: usize,
    gone_sent: usize,
    /// Custom resource groups served, with the version each is served at.
    installed: BTreeMap<String, String>,
    /// API discovery requests (`/apis`).
    discoveries: usize,
    /// Resources (plural) whose list requests fail with 500 for now.
    failing_lists: std::collections::BTreeSet<String>,
    /// Service-account tokens TokenReviews authenticate, with their user names.
    tokens: BTreeMap<String, String>,
    /// The TokenReview requests received.
    token_reviews: Vec<Value>,
}

struct Shared {
    state: Mutex<State>,
    events: broadcast::Sender<Broadcast>,
}

/// A running (or stopped) fake API server.
pub struct KubeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Option<JoinHandle<()>>,
}

/// The API path of each built-in resource the tests serve: (prefix, plural, kind,
/// namespaced).
const RESOURCES: &[(&str, &str, &str, bool)] = &[
    ("/api/v1", "namespaces", "Namespace", false),
    ("/api/v1", "services", "Service", true),
    ("/api/v1", "pods", "Pod", true),
    ("/api/v1", "configmaps", "ConfigMap", true),
    (
        "/apis/admissionregistration.k8s.io/v1",
        "mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration",
        false,
    ),
    (
        "/apis/discovery.k8s.io/v1",
        "endpointslices",
        "EndpointSlice",
        true,
    ),
    (
        "/apis/multicluster.x-k8s.io/v1alpha1",
        "serviceexports",
        "ServiceExport",
        true,
    ),
    (
        "/apis/multicluster.x-k8s.io/v1alpha1",
        "serviceimports",
        "ServiceImport",
        true,
    ),
];

/// Custom resources (namespaced, with a `status` subresource) served once their group is
/// installed: (group, plural, kind).
const CUSTOM: &[(&str, &str, &str)] = &[
    ("isthmus.io", "ratelimitpolicies", "RateLimitPolicy"),
    ("isthmus.io", "failoverpolicies", "FailoverPolicy"),
    ("networking.istio.io", "virtualservices", "VirtualService"),
    ("networking.istio.io", "destinationrules", "DestinationRule"),
    (
        "security.istio.io",
        "authorizationpolicies",
        "AuthorizationPolicy",
    ),
    (
        "security.istio.io",
        "peerauthentications",
        "PeerAuthentication",
    ),
    (
        "security.istio.io",
        "requestauthentications",
        "RequestAuthentication",
    ),
];

/// A resource being served.
#[derive(Clone)]
struct Resource {
    prefix: String,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    status: bool,
}

/// Every resource served now: the built-in ones and the installed custom ones.
fn served(state: &State) -> Vec<Resource> {
    let builtin = RESOURCES
        .iter()
        .map(|&(prefix, plural, kind, namespaced)| Resource {
            prefix: prefix.to_string(),
            plural,
            kind,
            namespaced,
            status: false,
        });
    let custom = CUSTOM.iter().filter_map(|&(group, plural, kind)| {
        let version = state.installed.get(group)?;
        Some(Resource {
            prefix: format!("/apis/{group}/{version}"),
            plural,
            kind,
            namespaced: true,
            status: true,
        })
    });
    builtin.chain(custom).collect()
}

fn resource_of_kind(state: &State, kind: &str) -> Option<Resource> {
    served(state).into_iter().find(|r| r.kind == kind)
}

impl KubeApi {
    /// Starts a server on a free loopback port.
    pub async fn start() -> KubeApi {
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                installed: BTreeMap::from([("isthmus.io".to_string(), "v1alpha1".to_string())]),
                ..State::default()
            }),
            events,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Some(tokio::spawn(serve(listener, shared.clone())));
        KubeApi {
            shared,
            addr,
            server,
        }
    }

    /// Makes TokenReviews authenticate `token` as `username` (e.g.
    /// `system:serviceaccount:<ns>:<sa>`), as the API server does for a pod's token.
    #[allow(dead_code)] // not every test binary that includes this server reviews tokens
    pub fn allow_token(&self, token: &str, username: &str) {
        let mut state = self.shared.state.lock().unwrap();
        state.tokens.insert(token.to_string(), username.to_string());
    }

    /// The TokenReview requests received so far.
    #[allow(dead_code)]
    pub fn token_reviews(&self) -> Vec<Value> {
        self.shared.state.lock().unwrap().token_reviews.clone()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube-rs client for this server, configured as for any API server URL.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// Takes the server down: the port closes and every connection (and watch) drops.
    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }

    /// Brings the server back on the same port, with the same objects and history.
    pub async fn restart(&mut self) {
        self.stop().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("rebinding {}: {e}", self.addr),
            }
        };
        self.server = Some(tokio::spawn(serve(listener, self.shared.clone())));
    }

    /// Creates or replaces an object (its `kind` and `metadata` say where it goes). A
    /// custom resource's group must be installed, as its CRD must be in a real cluster.
    pub fn put(&self, object: Value) {
        let kind = object["kind"].as_str().unwrap().to_string();
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let mut state = self.shared.state.lock().unwrap();
        let resource = resource_of_kind(&state, &kind)
            .unwrap_or_else(|| panic!("{kind} is not served (its CRD is not installed)"));
        let key = (resource.plural.to_string(), namespace, name);
        let mut object = object;
        // With a status subresource, writing the object leaves its status alone.
        if let Some(before) = state.objects.get(&key).filter(|_| resource.status) {
            object["status"] = before.get("status").cloned().unwrap_or(Value::Null);
            if object["status"].is_null() {
                object.as_object_mut().unwrap().remove("status");
            }
        }
        write(&self.shared, &mut state, key, object);
    }

    /// Deletes an object; false if there was none.
    pub fn remove(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let mut state = self.shared.state.lock().unwrap();
        let plural = resource_of_kind(&state, kind)
            .expect("a served kind")
            .plural;
        delete(
            &self.shared,
            &mut state,
            &(plural.to_string(), namespace.to_string(), name.to_string()),
        )
        .is_some()
    }

    /// The stored object, if any.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let state = self.shared.state.lock().unwrap();
        let plural = resource_of_kind(&state, kind)
            .expect("a served kind")
            .plural;
        state
            .objects
            .get(&(plural.to_string(), namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Installs the CRDs of a custom resource group (e.g. `networking.istio.io/v1beta1`):
    /// from now on API discovery lists the group at that version, and its kinds are served.
    pub fn install(&self, api_version: &str) {
        let (group, version) = api_version.split_once('/').expect("group/version");
        assert!(
            CUSTOM.iter().any(|c| c.0 == group),
            "no custom resources of {group}"
        );
        let mut state = self.shared.state.lock().unwrap();
        state
            .installed
            .insert(group.to_string(), version.to_string());
    }

    /// Makes list requests for a resource (plural) fail with `500` (`failing`), or work
    /// again: a client can then discover and start watching it but not finish its list.
    pub fn fail_lists(&self, plural: &str, failing: bool) {
        let mut state = self.shared.state.lock().unwrap();
        if failing {
            state.failing_lists.insert(plural.to_string());
        } else {
            state.failing_lists.remove(plural);
        }
    }

    /// How many API discovery requests (`/apis`) the server has had.
    pub fn discoveries(&self) -> usize {
        self.shared.state.lock().unwrap().discoveries
    }

    /// Sends a BOOKMARK with the current resource version on every open watch.
    pub fn bookmark(&self) {
        let rv = self.shared.state.lock().unwrap().rv;
        let _ = self.shared.events.send(Broadcast::Bookmark(rv));
    }

    /// Forgets the event history and closes every watch: a client resuming from any
    /// resource version it has gets `410 Gone` and must relist.
    pub fn compact(&self) {
        let mut state = self.shared.state.lock().unwrap();
        state.history.clear();
        state.oldest = state.rv + 1;
        let _ = self.shared.events.send(Broadcast::CloseAll);
    }

    /// How many list requests a resource (plural) has had.
    pub fn lists(&self, plural: &str) -> usize {
        self.shared
            .state
            .lock()
            .unwrap()
            .lists
            .get(plural)
            .copied()
            .unwrap_or(0)
    }

    /// How many watch requests a resource (plural) has had.
    pub fn watches(&self, plural: &str) -> usize {
        self.shared
            .state
            .lock()
            .unwrap()
            .watches
            .get(plural)
            .copied()
            .unwrap_or(0)
    }

    pub fn bookmarks_sent(&self) -> usize {
        self.shared.state.lock().unwrap().bookmarks_sent
    }

    pub fn gone_sent(&self) -> usize {
        self.shared.state.lock().unwrap().gone_sent
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    // Dropping the set (when this task is aborted) aborts every connection with it.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    full(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// What a request path names.
struct Target {
    prefix: String,
    plural: &'static str,
    kind: &'static str,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(shared: &Shared, path: &str) -> Option<Target> {
    let resources = served(&shared.state.lock().unwrap());
    // Namespaced paths first: /api/v1/namespaces/<ns>/configmaps/<name> is a ConfigMap, not
    // a subresource of Namespace <ns>.
    for namespaced in [true, false] {
        for r in &resources {
            let Some(rest) = path.strip_prefix(r.prefix.as_str()) else {
                continue;
            };
            if !rest.starts_with('/') {
                continue;
            }
            let parts: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
            let (namespace, tail) = match (namespaced, parts.as_slice()) {
                (true, ["namespaces", ns, p, tail @ ..]) if r.namespaced && *p == r.plural => {
                    (Some(ns.to_string()), tail)
                }
                (false, [p, tail @ ..]) if *p == r.plural => (None, tail),
                _ => continue,
            };
            return Some(Target {
                prefix: r.prefix.clone(),
                plural: r.plural,
                kind: r.kind,
                namespace,
                name: tail.first().map(|s| s.to_string()),
                subresource: tail.get(1).map(|s| s.to_string()),
            });
        }
    }
    None
}

/// API discovery: the groups served (`/apis`) and the resources of one group version
/// (`/apis/<group>/<version>`), as the API server's legacy (unaggregated) discovery answers.
fn discovery(shared: &Shared, path: &str) -> Option<Response<Body>> {
    let mut state = shared.state.lock().unwrap();
    let resources = served(&state);
    // group -> (version, resources at it)
    let mut groups: BTreeMap<String, (String, Vec<Resource>)> = BTreeMap::new();
    for r in resources {
        let Some(gv) = r.prefix.strip_prefix("/apis/") else {
            continue;
        };
        let (group, version) = gv.split_once('/').unwrap();
        groups
            .entry(group.to_string())
            .or_insert_with(|| (version.to_string(), Vec::new()))
            .1
            .push(r.clone());
    }
    if path == "/apis" || path == "/apis/" {
        state.discoveries += 1;
        let groups: Vec<Value> = groups
            .iter()
            .map(|(group, (version, _))| {
                let v = json!({"groupVersion": format!("{group}/{version}"), "version": version});
                json!({"name": group, "versions": [v.clone()], "preferredVersion": v})
            })
            .collect();
        return Some(full(
            StatusCode::OK,
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
        ));
    }
    let parts: Vec<&str> = path
        .strip_prefix("/apis/")?
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let [group, version] = parts.as_slice() else {
        return None;
    };
    let Some((served_version, resources)) = groups.get(*group).filter(|(v, _)| v == version) else {
        return Some(status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the server could not find the requested resource {path}"),
        ));
    };
    let verbs = json!(["create", "delete", "get", "list", "patch", "update", "watch"]);
    let mut list = Vec::new();
    for r in resources {
        list.push(
            json!({"name": r.plural, "singularName": "", "namespaced": r.namespaced,
                         "kind": r.kind, "verbs": verbs}),
        );
        if r.status {
            list.push(
                json!({"name": format!("{}/status", r.plural), "singularName": "",
                             "namespaced": r.namespaced, "kind": r.kind,
                             "verbs": ["get", "patch", "update"]}),
            );
        }
    }
    Some(full(
        StatusCode::OK,
        json!({"kind": "APIResourceList", "apiVersion": "v1",
               "groupVersion": format!("{group}/{served_version}"), "resources": list}),
    ))
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (!k.is_empty()).then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}

async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if req.method() == Method::POST && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        return token_review(shared, req).await;
    }
    if req.method() == Method::GET {
        if let Some(answer) = discovery(shared, &path) {
            return answer;
        }
    }
    let Some(t) = parse_path(shared, &path) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no resource at {path}"),
        );
    };
    let q = query(&req);
    let method = req.method().clone();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let ns = t.namespace.clone().unwrap_or_default();
    match (method, &t.name) {
        (Method::GET, None) if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) => {
            watch(shared, &t, &q)
        }
        (Method::GET, None) => list(shared, &t),
        (Method::GET, Some(name)) => {
            let state = shared.state.lock().unwrap();
            match state.objects.get(&(t.plural.to_string(), ns, name.clone())) {
                Some(o) => full(StatusCode::OK, o.clone()),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{} {name} not found", t.plural),
                ),
            }
        }
        (Method::PATCH, Some(name)) => {
            let patch: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
            };
            let key = (t.plural.to_string(), ns.clone(), name.clone());
            let mut state = shared.state.lock().unwrap();
            let existing = state.objects.get(&key).cloned();
            let next = match (existing, content_type.as_str(), t.subresource.as_deref()) {
                (Some(mut o), _, Some("status")) => {
                    merge(&mut o["status"], &patch["status"]);
                    o
                }
                (None, _, Some(_)) => {
                    return status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        format!("{} {name} not found", t.plural),
                    )
                }
                (Some(o), "application/json-patch+json", None) => {
                    // RFC 6902, `test` operations included: a failed test changes nothing.
                    let ops: json_patch::Patch = match serde_json::from_value(patch) {
                        Ok(ops) => ops,
                        Err(e) => {
                            return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string())
                        }
                    };
                    let mut next = o;
                    if let Err(e) = json_patch::patch(&mut next, &ops) {
                        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e.to_string());
                    }
                    next
                }
                (Some(mut o), _, _) => {
                    merge(&mut o, &patch);
                    o
                }
                (None, "application/apply-patch+yaml", None) => {
                    let mut o = patch;
                    o["metadata"]["namespace"] = json!(ns);
                    o
                }
                (None, _, _) => {
                    return status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        format!("{} {name} not found", t.plural),
                    )
                }
            };
            let written = write(shared, &mut state, key, next);
            full(StatusCode::OK, written)
        }
        (Method::DELETE, Some(name)) => {
            let mut state = shared.state.lock().unwrap();
            match delete(
                shared,
                &mut state,
                &(t.plural.to_string(), ns, name.clone()),
            ) {
                Some(o) => full(StatusCode::OK, o),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{} {name} not found", t.plural),
                ),
            }
        }
        (m, _) => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{m} {path} is not served by the test API server"),
        ),
    }
}

/// `POST tokenreviews`: authenticated with the user name when the token is one of
/// [`KubeApi::allow_token`]'s, echoing the requested audiences, as the API server answers.
async fn token_review(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let review: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let mut state = shared.state.lock().unwrap();
    state.token_reviews.push(review.clone());
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let answer = match state.tokens.get(token) {
        Some(user) => json!({"authenticated": true,
                             "user": {"username": user, "groups": ["system:serviceaccounts"]},
                             "audiences": review["spec"]["audiences"]}),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    full(
        StatusCode::CREATED,
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
               "metadata": {}, "spec": review["spec"], "status": answer}),
    )
}

fn api_version(prefix: &str) -> &str {
    prefix
        .trim_start_matches("/apis/")
        .trim_start_matches("/api/")
}

fn list(shared: &Shared, t: &Target) -> Response<Body> {
    let mut state = shared.state.lock().unwrap();
    *state.lists.entry(t.plural.to_string()).or_default() += 1;
    if state.failing_lists.contains(t.plural) {
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!("listing {} failed (test)", t.plural),
        );
    }
    let items: Vec<Value> = state
        .objects
        .iter()
        .filter(|((p, ns, _), _)| {
            p == t.plural && t.namespace.as_ref().is_none_or(|want| want == ns)
        })
        .map(|(_, o)| o.clone())
        .collect();
    full(
        StatusCode::OK,
        json!({"apiVersion": api_version(&t.prefix), "kind": format!("{}List", t.kind),
               "metadata": {"resourceVersion": state.rv.to_string()}, "items": items}),
    )
}

fn watch(shared: &Arc<Shared>, t: &Target, q: &BTreeMap<String, String>) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1024);
    let line = |v: Value| Ok(Frame::data(Bytes::from(format!("{v}\n"))));
    let mut state = shared.state.lock().unwrap();
    *state.watches.entry(t.plural.to_string()).or_default() += 1;
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .filter(|v| *v != 0)
        .unwrap_or(state.rv);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let response = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed())
        .unwrap();
    if from < state.oldest {
        // As the API server does: HTTP 200, one ERROR event with a 410 Status, then the end.
        state.gone_sent += 1;
        let _ = tx.try_send(line(json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {from} ({})", state.oldest),
            "reason": "Expired", "code": 410}})));
        return response;
    }
    let matches = {
        let plural = t.plural.to_string();
        let namespace = t.namespace.clone();
        move |c: &Change| {
            c.resource == plural && namespace.as_ref().is_none_or(|n| *n == c.namespace)
        }
    };
    for c in state.history.iter().filter(|c| c.rv > from && matches(c)) {
        let _ = tx.try_send(line(json!({"type": c.kind, "object": c.object})));
    }
    let mut live = shared.events.subscribe();
    drop(state);
    let (kind, version) = (t.kind, api_version(&t.prefix).to_string());
    let shared = shared.clone();
    tokio::spawn(async move {
        loop {
            let event = match live.recv().await {
                Ok(e) => e,
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let frame = match event {
                Broadcast::Change(c) if c.rv > from && matches(&c) => {
                    line(json!({"type": c.kind, "object": c.object}))
                }
                Broadcast::Change(_) => continue,
                Broadcast::Bookmark(rv) if bookmarks => {
                    shared.state.lock().unwrap().bookmarks_sent += 1;
                    line(
                        json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": version,
                        "metadata": {"resourceVersion": rv.to_string()}}}),
                    )
                }
                Broadcast::Bookmark(_) => continue,
                Broadcast::CloseAll => return,
            };
            if tx.send(frame).await.is_err() {
                return;
            }
        }
    });
    response
}

/// Stores an object with a new resource version (and, on creation, a uid and creation
/// time unless it has them), and tells the watches. Returns what was stored.
fn write(shared: &Shared, state: &mut State, key: Key, mut object: Value) -> Value {
    state.rv += 1;
    let before = state.objects.get(&key).cloned();
    let existed = before.is_some();
    // As the API server does: `generation` moves when the spec changes.
    if let Some(before) = &before {
        let generation = before["metadata"]["generation"].as_i64().unwrap_or(1);
        let changed = before.get("spec") != object.get("spec");
        object["metadata"]["generation"] = json!(generation + i64::from(changed));
    }
    let meta = &mut object["metadata"];
    meta["resourceVersion"] = json!(state.rv.to_string());
    if meta.get("uid").is_none() {
        meta["uid"] = json!(format!("uid-{}-{}", key.0, state.rv));
    }
    if meta.get("creationTimestamp").is_none() {
        meta["creationTimestamp"] = json!("2025-01-01T00:00:00Z");
    }
    if meta.get("generation").is_none() {
        meta["generation"] = json!(1);
    }
    state.objects.insert(key.clone(), object.clone());
    let change = Change {
        rv: state.rv,
        resource: key.0,
        namespace: key.1,
        kind: if existed { "MODIFIED" } else { "ADDED" },
        object: object.clone(),
    };
    state.history.push(change.clone());
    let _ = shared.events.send(Broadcast::Change(change));
    object
}

fn delete(shared: &Shared, state: &mut State, key: &Key) -> Option<Value> {
    let mut object = state.objects.remove(key)?;
    state.rv += 1;
    object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
    let change = Change {
        rv: state.rv,
        resource: key.0.clone(),
        namespace: key.1.clone(),
        kind: "DELETED",
        object: object.clone(),
    };
    state.history.push(change.clone());
    let _ = shared.events.send(Broadcast::Change(change));
    Some(object)
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let Value::Object(t) = target else { return };
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}
