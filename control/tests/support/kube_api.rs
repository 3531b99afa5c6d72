//! A small Kubernetes-API-compatible server for tests: list and watch with resource
//! versions, bookmarks and `410 Gone`, get, server-side apply / merge patch (objects and the
//! `status` subresource) and delete, for the resources Isthmus's discovery uses. Objects are
//! JSON values kept in memory; every write moves one global resource version, as etcd does.
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
//! server down and up on the same port with its objects kept (an API server restart).

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

/// The API path of each resource the tests serve: (prefix, plural, kind, namespaced).
const RESOURCES: &[(&str, &str, &str, bool)] = &[
    ("/api/v1", "namespaces", "Namespace", false),
    ("/api/v1", "services", "Service", true),
    ("/api/v1", "pods", "Pod", true),
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

fn resource_of_kind(
    kind: &str,
) -> Option<&'static (&'static str, &'static str, &'static str, bool)> {
    RESOURCES.iter().find(|r| r.2 == kind)
}

impl KubeApi {
    /// Starts a server on a free loopback port.
    pub async fn start() -> KubeApi {
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
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

    /// Creates or replaces an object (its `kind` and `metadata` say where it goes).
    pub fn put(&self, object: Value) {
        let kind = object["kind"].as_str().unwrap().to_string();
        let (_, plural, _, _) = resource_of_kind(&kind).expect("a served kind");
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let mut state = self.shared.state.lock().unwrap();
        write(
            &self.shared,
            &mut state,
            (plural.to_string(), namespace, name),
            object,
        );
    }

    /// Deletes an object; false if there was none.
    pub fn remove(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let (_, plural, _, _) = resource_of_kind(kind).expect("a served kind");
        let mut state = self.shared.state.lock().unwrap();
        delete(
            &self.shared,
            &mut state,
            &(plural.to_string(), namespace.to_string(), name.to_string()),
        )
        .is_some()
    }

    /// The stored object, if any.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let (_, plural, _, _) = resource_of_kind(kind).expect("a served kind");
        let state = self.shared.state.lock().unwrap();
        state
            .objects
            .get(&(plural.to_string(), namespace.to_string(), name.to_string()))
            .cloned()
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
    prefix: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    for &(prefix, plural, kind, namespaced) in RESOURCES {
        let Some(rest) = path.strip_prefix(prefix) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let (namespace, tail) = match parts.as_slice() {
            ["namespaces", ns, p, tail @ ..] if namespaced && *p == plural => {
                (Some(ns.to_string()), tail)
            }
            [p, tail @ ..] if *p == plural => (None, tail),
            _ => continue,
        };
        return Some(Target {
            prefix,
            plural,
            kind,
            namespace,
            name: tail.first().map(|s| s.to_string()),
            subresource: tail.get(1).map(|s| s.to_string()),
        });
    }
    None
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
    let Some(t) = parse_path(&path) else {
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

fn api_version(prefix: &str) -> &str {
    prefix
        .trim_start_matches("/apis/")
        .trim_start_matches("/api/")
}

fn list(shared: &Shared, t: &Target) -> Response<Body> {
    let mut state = shared.state.lock().unwrap();
    *state.lists.entry(t.plural.to_string()).or_default() += 1;
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
        json!({"apiVersion": api_version(t.prefix), "kind": format!("{}List", t.kind),
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
    let (kind, version) = (t.kind, api_version(t.prefix).to_string());
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
    let existed = state.objects.contains_key(&key);
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
