//! The outbound proxy's connections to upstream sidecars, kept for reuse.
//!
//! HTTP/1.1 connections carry one request at a time: an idle one is taken for a request and
//! put back when its response headers arrive (hyper queues the next request until the body
//! is done). HTTP/2 connections multiplex: one per key is shared by every request until it
//! closes. Keys are (upstream, service, subset, version), because a remote upstream's
//! connection was opened through the gateway for exactly that service and subset.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::balance::Upstream;
use crate::proxy::Body;
use crate::routing::ServiceKey;

/// Idle HTTP/1.1 connections kept per key.
const MAX_IDLE: usize = 32;

/// What a pooled connection is for.
pub(crate) type Key = (Upstream, ServiceKey, Option<String>, bool);

/// One connection to an upstream sidecar.
pub(crate) enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

impl Conn {
    /// Performs the HTTP handshake over an established (mTLS) stream and spawns the task
    /// driving the connection. HTTP/1.1 connections accept protocol upgrades.
    pub(crate) async fn handshake<S>(io: S, h2: bool) -> Result<Conn, hyper::Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if h2 {
            let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .adaptive_window(true)
                .handshake(TokioIo::new(io))
                .await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            Ok(Conn::H2(sender))
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
                }
            });
            Ok(Conn::H1(sender))
        }
    }

    /// Sends one request (its version must match the connection's; see
    /// [`crate::protocol::for_version`]).
    pub(crate) async fn send(
        &mut self,
        req: http::Request<Body>,
    ) -> Result<http::Response<Incoming>, hyper::Error> {
        match self {
            Conn::H1(s) => s.send_request(req).await,
            Conn::H2(s) => s.send_request(req).await,
        }
    }

    fn usable(&self) -> bool {
        match self {
            Conn::H1(s) => s.is_ready(),
            Conn::H2(s) => !s.is_closed() && s.is_ready(),
        }
    }
}

/// Connections kept for reuse, by key (the outbound proxy's is [`Key`]); `h2` in
/// [`Pool::take`] and [`Pool::put`] says which kind the key is for.
pub(crate) struct Pool<K = Key> {
    h1: Mutex<HashMap<K, Vec<hyper::client::conn::http1::SendRequest<Body>>>>,
    h2: Mutex<HashMap<K, hyper::client::conn::http2::SendRequest<Body>>>,
}

impl<K> Default for Pool<K> {
    fn default() -> Self {
        Pool {
            h1: Mutex::new(HashMap::new()),
            h2: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq> Pool<K> {
    /// A connection ready for a request, if one is kept.
    pub(crate) fn take(&self, key: &K, h2: bool) -> Option<Conn> {
        if h2 {
            let mut shared = self.h2.lock().unwrap_or_else(|e| e.into_inner());
            let conn = Conn::H2(shared.get(key)?.clone());
            if conn.usable() {
                return Some(conn);
            }
            shared.remove(key);
            return None;
        }
        let mut idle = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(key)?;
        list.retain(|s| !s.is_closed());
        let i = list.iter().position(|s| s.is_ready())?;
        Some(Conn::H1(list.swap_remove(i)))
    }

    /// Keeps `conn` for the next request (HTTP/2: shares it from now on).
    pub(crate) fn put(&self, key: K, conn: Conn) {
        match conn {
            Conn::H2(s) => {
                if !s.is_closed() {
                    self.h2
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key, s);
                }
            }
            Conn::H1(s) => {
                let mut idle = self.h1.lock().unwrap_or_else(|e| e.into_inner());
                let list = idle.entry(key).or_default();
                if list.len() < MAX_IDLE && !s.is_closed() {
                    list.push(s);
                }
            }
        }
    }
}

/// Relays bytes between two upgraded connections (an HTTP/1.1 `101 Switching Protocols`,
/// WebSocket for one) once both upgrades complete.
pub(crate) fn join_upgrades(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    idle: std::time::Duration,
) {
    tokio::spawn(async move {
        match tokio::try_join!(downstream, upstream) {
            Ok((down, up)) => {
                let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                if let Err(e) = crate::limits::relay(&mut down, &mut up, idle).await {
                    tracing::debug!(error = %e, "upgraded connection ended");
                }
            }
            Err(e) => tracing::debug!(error = %e, "protocol upgrade failed"),
        }
    });
}
