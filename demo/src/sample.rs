//! The demo's sample application: a tiny HTTP server standing in for Bookinfo's services.
//!
//! Every `GET` answers JSON naming the service, version and cluster that served it, and the
//! caller's SPIFFE ID as the workload's sidecar saw it (the `URI=` element of the
//! `x-forwarded-client-cert` header the inbound sidecar sets), and the HTTP version it was
//! spoken to in. It serves HTTP/1.1 and HTTP/2 (prior knowledge) on the same port.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What a sample endpoint is.
#[derive(Debug, Clone)]
pub struct SampleApp {
    pub service: String,
    pub version: String,
    pub cluster: String,
}

/// The JSON every sample endpoint answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleReply {
    pub service: String,
    pub version: String,
    pub cluster: String,
    /// The caller's SPIFFE ID, or "" when the request did not come through a sidecar.
    pub caller: String,
    pub path: String,
    /// The HTTP version the app was spoken to in (`HTTP/1.1`, `HTTP/2.0`).
    #[serde(default)]
    pub protocol: String,
}

/// The caller named in an `x-forwarded-client-cert` value (`By=...;URI=<caller>`).
pub fn caller_from_xfcc(xfcc: &str) -> Option<&str> {
    // Several elements may be chained with ','; the last one was added by the nearest proxy.
    let last = xfcc.rsplit(',').next()?;
    last.split(';')
        .find_map(|kv| kv.trim().strip_prefix("URI="))
}

/// A running sample app.
pub struct SampleHandle {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl SampleHandle {
    pub fn shutdown(self) {
        self.task.abort();
    }

    /// Stops serving (its port closes), leaving the handle: a container that crashed while
    /// its pod, and its sidecar, stay.
    pub fn stop(&self) {
        self.task.abort();
    }
}

/// Starts the app on `listen` (port 0 picks one).
pub async fn start(app: SampleApp, listen: SocketAddr) -> std::io::Result<SampleHandle> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let app = app.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let app = app.clone();
                    async move { Ok::<_, Infallible>(respond(&app, &req)) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
            while connections.try_join_next().is_some() {}
        }
    });
    Ok(SampleHandle { addr, task })
}

fn respond(app: &SampleApp, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let caller = req
        .headers()
        .get("x-forwarded-client-cert")
        .and_then(|v| v.to_str().ok())
        .and_then(caller_from_xfcc)
        .unwrap_or("")
        .to_string();
    let reply = SampleReply {
        service: app.service.clone(),
        version: app.version.clone(),
        cluster: app.cluster.clone(),
        caller,
        path: req.uri().path().to_string(),
        protocol: format!("{:?}", req.version()),
    };
    let body = serde_json::to_vec(&reply).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_is_read_from_the_nearest_xfcc_element() {
        assert_eq!(
            caller_from_xfcc(
                "By=spiffe://c/ns/default/sa/ratings;URI=spiffe://e/ns/default/sa/sleep"
            ),
            Some("spiffe://e/ns/default/sa/sleep")
        );
        assert_eq!(
            caller_from_xfcc("URI=spiffe://a/ns/x/sa/y,By=b;URI=spiffe://z/ns/x/sa/y"),
            Some("spiffe://z/ns/x/sa/y")
        );
        assert_eq!(caller_from_xfcc("By=x"), None);
    }
}
