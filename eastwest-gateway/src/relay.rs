//! Copying a tunnel's bytes between a TCP connection and the peer gateway's stream (a QUIC
//! stream, or a TLS-over-TCP connection), both ways, with half-close carried across: the end
//! of the TCP read side finishes the peer stream, and the end of the peer stream shuts down the
//! TCP write side. The bytes are the workloads' own TLS records; nothing here looks inside
//! them.
//!
//! Backpressure is the copy loop itself: each direction reads at most one buffer and writes it
//! out before reading more, so a receiver that stops reading stops the sender after the flow
//! control windows (QUIC) or socket buffers (TCP) in between have filled. Nothing else queues.
//! Towards QUIC the buffers are handed over whole (`write_chunk`), without a copy.

use std::io;

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::metrics::ByteCounters;
use crate::quic::codes;
use crate::GatewayError;

/// The most one direction of one tunnel reads before writing it out (two per tunnel).
pub(crate) const RELAY_BUFFER: usize = 64 * 1024;

/// Bytes carried in each direction by a finished relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Carried {
    /// From the TCP side to the peer gateway.
    pub sent: u64,
    /// From the peer gateway out to the TCP side.
    pub received: u64,
}

/// One half of a peer stream that can be torn down abruptly, so the far side learns the
/// tunnel broke rather than seeing a clean end.
pub(crate) trait Abort {
    fn abort(&mut self);
    /// Aborts because the caller's first bytes were not TLS, saying so where the transport
    /// can (a QUIC reset with [`codes::NOT_TLS`]).
    fn abort_not_tls(&mut self) {
        self.abort();
    }
}

/// The sending half of a peer stream, taking whole buffers (so QUIC can keep them without a
/// copy).
pub(crate) trait PeerWrite: Abort {
    async fn write_bytes(&mut self, bytes: Bytes) -> io::Result<()>;
    /// Ends the stream cleanly (QUIC FIN, TLS close_notify).
    async fn finish(&mut self) -> io::Result<()>;
}

/// The receiving half of a peer stream, yielding buffers; `None` at the end.
pub(crate) trait PeerRead: Abort {
    async fn read_bytes(&mut self, scratch: &mut BytesMut) -> io::Result<Option<Bytes>>;
}

impl Abort for SendStream {
    fn abort(&mut self) {
        let _ = self.reset(codes::STREAM_ABORTED);
    }
    fn abort_not_tls(&mut self) {
        let _ = self.reset(codes::NOT_TLS);
    }
}

impl PeerWrite for SendStream {
    async fn write_bytes(&mut self, bytes: Bytes) -> io::Result<()> {
        self.write_chunk(bytes).await.map_err(io::Error::from)
    }
    async fn finish(&mut self) -> io::Result<()> {
        SendStream::finish(self).map_err(io::Error::other)
    }
}

impl Abort for RecvStream {
    fn abort(&mut self) {
        let _ = self.stop(codes::STREAM_ABORTED);
    }
}

impl PeerRead for RecvStream {
    async fn read_bytes(&mut self, scratch: &mut BytesMut) -> io::Result<Option<Bytes>> {
        // Copying into one buffer gathers several received frames per TCP write; handing out
        // quinn's chunks one by one (`read_chunk`) costs a write per packet and is slower.
        read_into(self, scratch).await
    }
}

/// TLS over TCP has no per-stream reset: dropping the connection is the abort.
impl<T> Abort for tokio::io::WriteHalf<T> {
    fn abort(&mut self) {}
}

impl<T: AsyncWrite> PeerWrite for tokio::io::WriteHalf<T> {
    async fn write_bytes(&mut self, bytes: Bytes) -> io::Result<()> {
        self.write_all(&bytes).await
    }
    async fn finish(&mut self) -> io::Result<()> {
        self.shutdown().await
    }
}

impl<T> Abort for tokio::io::ReadHalf<T> {
    fn abort(&mut self) {}
}

impl<T: AsyncRead> PeerRead for tokio::io::ReadHalf<T> {
    async fn read_bytes(&mut self, scratch: &mut BytesMut) -> io::Result<Option<Bytes>> {
        read_into(self, scratch).await
    }
}

/// Reads what is available into `scratch` (refilled to [`RELAY_BUFFER`]) and splits it off.
async fn read_into<R: AsyncRead + Unpin>(
    r: &mut R,
    scratch: &mut BytesMut,
) -> io::Result<Option<Bytes>> {
    scratch.reserve(RELAY_BUFFER);
    match r.read_buf(scratch).await? {
        0 => Ok(None),
        _ => Ok(Some(scratch.split().freeze())),
    }
}

/// [`relay`], then logs (at debug) what it carried or why it aborted: the end of every
/// tunnel, on either role.
pub(crate) async fn relay_and_log<W, R>(
    tcp: TcpStream,
    to_peer: W,
    from_peer: R,
    counters: &ByteCounters,
) where
    W: PeerWrite + Unpin,
    R: PeerRead + Unpin,
{
    match relay(tcp, to_peer, from_peer, counters).await {
        Ok(carried) => tracing::debug!(
            sent = carried.sent,
            received = carried.received,
            "tunnel closed"
        ),
        Err(e) => tracing::debug!(error = %GatewayError::Relay(e).chain(), "tunnel aborted"),
    }
}

/// Relays until both directions have ended. The first error in either direction aborts both
/// (peer stream reset, TCP connection dropped).
pub(crate) async fn relay<W, R>(
    tcp: TcpStream,
    mut to_peer: W,
    mut from_peer: R,
    counters: &ByteCounters,
) -> io::Result<Carried>
where
    W: PeerWrite + Unpin,
    R: PeerRead + Unpin,
{
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let up = async {
        let mut scratch = BytesMut::new();
        let mut total = 0u64;
        while let Some(bytes) = read_into(&mut tcp_read, &mut scratch).await? {
            let n = bytes.len() as u64;
            to_peer.write_bytes(bytes).await?;
            counters.sent.inc_by(n);
            total += n;
        }
        to_peer.finish().await?;
        Ok::<u64, io::Error>(total)
    };
    let down = async {
        let mut scratch = BytesMut::new();
        let mut total = 0u64;
        while let Some(bytes) = from_peer.read_bytes(&mut scratch).await? {
            tcp_write.write_all(&bytes).await?;
            counters.received.inc_by(bytes.len() as u64);
            total += bytes.len() as u64;
        }
        tcp_write.shutdown().await?;
        Ok::<u64, io::Error>(total)
    };
    let result = tokio::try_join!(up, down);
    match result {
        Ok((sent, received)) => Ok(Carried { sent, received }),
        Err(e) => {
            to_peer.abort();
            from_peer.abort();
            Err(e)
        }
    }
}
