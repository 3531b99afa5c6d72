//! What one client can hold of a sidecar: connections per listener, and how long a relayed
//! connection may sit idle.
//!
//! - [`Admission`]: each listener takes at most `max_connections_per_listener` connections at
//!   once; one more is closed as it is accepted and counted in
//!   `isthmus_sidecar_connections_refused_total{listener, reason="limit"}`.
//! - [`relay`]: copies bytes both ways (as `tokio::io::copy_bidirectional`) and gives up with
//!   `TimedOut` once neither side has sent anything for `tcp_idle_timeout` (Istio's default
//!   idle timeout for TCP is one hour, which is ours).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The sidecar's limits on what clients hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections one listener (an inbound port, a VIP port, the redirect port) holds at
    /// once; more are closed as accepted, and counted.
    pub max_connections_per_listener: usize,
    /// A relayed TCP connection (opaque, passthrough or upgraded) with no bytes either way
    /// for this long is closed.
    pub tcp_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections_per_listener: 4096,
            tcp_idle_timeout: Duration::from_secs(3600),
        }
    }
}

/// One listener's connection slots.
#[derive(Clone)]
pub(crate) struct Admission {
    slots: Arc<Semaphore>,
    refused: Counter,
}

impl Admission {
    pub(crate) fn new(limits: &Limits, refused: Counter) -> Self {
        Admission {
            slots: Arc::new(Semaphore::new(limits.max_connections_per_listener)),
            refused,
        }
    }

    /// A slot for one more connection, held until it closes; `None` (counted) when the
    /// listener is full: the caller closes the connection.
    pub(crate) fn admit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.slots.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.refused.inc();
        }
        permit
    }
}

/// A stream that records when it last moved a byte.
struct Watched<'a, S> {
    inner: &'a mut S,
    last: &'a AtomicU64,
    started: tokio::time::Instant,
}

impl<S> Watched<'_, S> {
    fn touch(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Relays `a` and `b` until both are done, or until neither has sent a byte for `idle`
/// (then `TimedOut`). Returns the bytes copied a→b and b→a.
pub(crate) async fn relay<A, B>(a: &mut A, b: &mut B, idle: Duration) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let last = AtomicU64::new(0);
    let started = tokio::time::Instant::now();
    let mut a = Watched {
        inner: a,
        last: &last,
        started,
    };
    let mut b = Watched {
        inner: b,
        last: &last,
        started,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    // Checked four times per idle period: a connection is closed between 1× and 1.25× idle.
    let check = (idle / 4).max(Duration::from_millis(1));
    loop {
        tokio::select! {
            copied = &mut copy => return copied,
            _ = tokio::time::sleep(check) => {
                let quiet_since = Duration::from_millis(last.load(Ordering::Relaxed));
                if started.elapsed().saturating_sub(quiet_since) >= idle {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no bytes either way for {idle:?}"),
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_quiet_relay_is_closed_and_a_busy_one_is_not() {
        let idle = Duration::from_millis(200);
        // Busy: a byte every 50 ms for 600 ms, then both sides close.
        let (mut a, mut a_peer) = tokio::io::duplex(64);
        let (mut b, mut b_peer) = tokio::io::duplex(64);
        let busy = tokio::spawn(async move { relay(&mut a, &mut b, idle).await });
        for _ in 0..12 {
            a_peer.write_all(b"x").await.unwrap();
            let mut byte = [0u8; 1];
            b_peer.read_exact(&mut byte).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop((a_peer, b_peer));
        assert_eq!(busy.await.unwrap().unwrap(), (12, 0));

        // Quiet: closed after the idle period, not before.
        let (mut a, _a_peer) = tokio::io::duplex(64);
        let (mut b, _b_peer) = tokio::io::duplex(64);
        let started = tokio::time::Instant::now();
        let err = relay(&mut a, &mut b, idle).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let took = started.elapsed();
        assert!(took >= idle && took < idle * 2, "{took:?}");
    }

    #[test]
    fn a_full_listener_refuses_and_counts_until_a_slot_frees() {
        let refused = Counter::default();
        let admission = Admission::new(
            &Limits {
                max_connections_per_listener: 2,
                ..Limits::default()
            },
            refused.clone(),
        );
        let first = admission.admit().unwrap();
        let _second = admission.admit().unwrap();
        assert!(admission.admit().is_none());
        assert_eq!(refused.get(), 1);
        drop(first);
        assert!(admission.admit().is_some());
        assert_eq!(refused.get(), 1);
    }
}
