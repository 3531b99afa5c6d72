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
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::balance::Upstream;
use crate::proxy::Body;
use crate::routing::ServiceKey;

/// Idle HTTP/1.1 connections kept per key.
const MAX_IDLE: usize = 32;
/// Connections kept in one pool at once (HTTP/1.1 idle ones and shared HTTP/2 ones): past
/// it, the least recently used are closed, so memory does not grow with every service ever
/// called. Each costs about 46 KB (mostly TLS buffers); between sidecars every request to
/// one destination shares one HTTP/2 connection, so 64 covers 64 busy destinations.
const MAX_POOLED: usize = 64;
/// A kept connection unused for this long is closed.
const IDLE_EXPIRY: Duration = Duration::from_secs(60);

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
/// [`Pool::take`] and [`Pool::put`] says which kind the key is for. Bounded: at most
/// [`MAX_POOLED`] connections, none unused for longer than [`IDLE_EXPIRY`] (dropping the
/// last handle on a connection closes it).
pub(crate) struct Pool<K = Key> {
    kept: Mutex<Kept<K>>,
}

struct Kept<K> {
    h1: HashMap<K, Vec<(hyper::client::conn::http1::SendRequest<Body>, Instant)>>,
    h2: HashMap<K, (hyper::client::conn::http2::SendRequest<Body>, Instant)>,
}

impl<K> Default for Pool<K> {
    fn default() -> Self {
        Pool {
            kept: Mutex::new(Kept {
                h1: HashMap::new(),
                h2: HashMap::new(),
            }),
        }
    }
}

impl<K: Hash + Eq> Pool<K> {
    /// A connection ready for a request, if one is kept.
    pub(crate) fn take(&self, key: &K, h2: bool) -> Option<Conn> {
        self.take_at(key, h2, Instant::now())
    }

    /// Keeps `conn` for the next request (HTTP/2: shares it from now on).
    pub(crate) fn put(&self, key: K, conn: Conn) {
        self.put_at(key, conn, Instant::now());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept<K>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_at(&self, key: &K, h2: bool, now: Instant) -> Option<Conn> {
        let mut kept = self.lock();
        if h2 {
            let (sender, used) = kept.h2.get_mut(key)?;
            let conn = Conn::H2(sender.clone());
            if conn.usable() {
                *used = now;
                return Some(conn);
            }
            kept.h2.remove(key);
            return None;
        }
        let list = kept.h1.get_mut(key)?;
        list.retain(|(s, _)| !s.is_closed());
        let found = list.iter().position(|(s, _)| s.is_ready());
        let taken = found.map(|i| list.swap_remove(i).0);
        if list.is_empty() {
            kept.h1.remove(key);
        }
        taken.map(Conn::H1)
    }

    fn put_at(&self, key: K, conn: Conn, now: Instant) {
        let mut kept = self.lock();
        match conn {
            Conn::H2(s) => {
                if s.is_closed() {
                    return;
                }
                kept.h2.insert(key, (s, now));
            }
            Conn::H1(s) => {
                if s.is_closed() {
                    return;
                }
                let list = kept.h1.entry(key).or_default();
                if list.len() >= MAX_IDLE {
                    return;
                }
                list.push((s, now));
            }
        }
        if kept.count() > MAX_POOLED {
            kept.evict(now);
        }
    }

    /// Closes the connections unused for [`IDLE_EXPIRY`]; returns how many are kept.
    pub(crate) fn expire(&self, now: Instant) -> usize {
        let mut kept = self.lock();
        kept.retain(|used| now.saturating_duration_since(used) < IDLE_EXPIRY);
        kept.count()
    }
}

impl<K: Hash + Eq> Kept<K> {
    /// Connections kept (at most [`MAX_POOLED`] + 1 at once, so counting is cheap).
    fn count(&self) -> usize {
        self.h2.len() + self.h1.values().map(Vec::len).sum::<usize>()
    }

    /// Keeps the connections `keep` says yes to (by when each was last used).
    fn retain(&mut self, keep: impl Fn(Instant) -> bool) {
        self.h2.retain(|_, (_, used)| keep(*used));
        for list in self.h1.values_mut() {
            list.retain(|(_, used)| keep(*used));
        }
        self.h1.retain(|_, list| !list.is_empty());
    }

    /// Back to [`MAX_POOLED`]: the expired first, then the least recently used.
    fn evict(&mut self, now: Instant) {
        self.retain(|used| now.saturating_duration_since(used) < IDLE_EXPIRY);
        if self.count() <= MAX_POOLED {
            return;
        }
        let mut uses: Vec<Instant> = self
            .h2
            .values()
            .map(|(_, used)| *used)
            .chain(self.h1.values().flatten().map(|(_, used)| *used))
            .collect();
        uses.sort_unstable();
        // Keep the MAX_POOLED most recent (ties at the cut may keep a few more).
        let cut = uses[uses.len() - MAX_POOLED];
        self.retain(|used| used >= cut);
    }
}

/// Closes a pool's expired connections every quarter of [`IDLE_EXPIRY`], for as long as the
/// pool is in use elsewhere.
pub(crate) fn expire_idle<K: Hash + Eq + Send + 'static>(pool: std::sync::Weak<Pool<K>>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(IDLE_EXPIRY / 4).await;
            let Some(pool) = pool.upgrade() else { return };
            pool.expire(Instant::now());
        }
    });
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// An HTTP/1.1 connection to a server on the other end of an in-memory pipe; `closed`
    /// counts the server connections that have ended.
    async fn connection(closed: Arc<AtomicUsize>) -> Conn {
        let (client, server) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                    bytes::Bytes,
                >::new()))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), service)
                .await;
            closed.fetch_add(1, Ordering::SeqCst);
        });
        Conn::handshake(client, false).await.expect("handshake")
    }

    #[tokio::test]
    async fn the_pool_is_bounded_by_recent_use_and_unused_connections_expire() {
        let closed = Arc::new(AtomicUsize::new(0));
        let pool: Pool<u32> = Pool::default();
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let total = u32::try_from(MAX_POOLED).unwrap() + 44;
        for key in 0..total {
            pool.put_at(key, connection(closed.clone()).await, at(u64::from(key)));
        }
        // The oldest 44 went; the most recent MAX_POOLED stay.
        assert_eq!(pool.expire(at(u64::from(total))), MAX_POOLED);
        {
            let kept = pool.lock();
            assert!(!kept.h1.contains_key(&0) && !kept.h1.contains_key(&43));
            assert!(kept.h1.contains_key(&44));
        }
        // Kept, and ready for a request once its connection task has run.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let kept = loop {
            if let Some(conn) = pool.take_at(&44, false, at(400)) {
                break conn;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "a recent one is kept"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        pool.put_at(44, kept, at(60_000));

        // A minute unused closes everything but the one used since.
        assert_eq!(pool.expire(at(60_000) + Duration::from_secs(1)), 1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while closed.load(Ordering::SeqCst) < usize::try_from(total).unwrap() - 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "evicted connections were not closed: {} of {}",
                closed.load(Ordering::SeqCst),
                total - 1
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(pool.take_at(&44, false, at(61_000)).is_some());
    }
}
