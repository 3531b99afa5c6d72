//! Copying a tunnel's bytes between a TCP connection and a QUIC stream, both ways, with
//! half-close carried across: the end of the TCP read side finishes the QUIC send stream, and
//! the end of the QUIC receive stream shuts down the TCP write side. The bytes are the
//! workloads' own TLS records; nothing here looks inside them.

use std::io;

use quinn::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::quic::codes;

/// Bytes carried in each direction by a finished relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Carried {
    /// From the TCP side into the QUIC stream.
    pub tcp_to_quic: u64,
    /// From the QUIC stream out to the TCP side.
    pub quic_to_tcp: u64,
}

/// Relays until both directions have ended. The first error in either direction aborts both:
/// the QUIC stream is reset (so the far side learns the tunnel broke rather than seeing a clean
/// end) and the TCP connection is dropped.
pub(crate) async fn relay(
    tcp: TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
) -> io::Result<Carried> {
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let result = {
        let up = async {
            let n = tokio::io::copy(&mut tcp_read, &mut send).await?;
            send.finish().map_err(io::Error::other)?;
            Ok::<u64, io::Error>(n)
        };
        let down = async {
            let n = tokio::io::copy(&mut recv, &mut tcp_write).await?;
            tcp_write.shutdown().await?;
            Ok::<u64, io::Error>(n)
        };
        tokio::try_join!(up, down)
    };
    match result {
        Ok((tcp_to_quic, quic_to_tcp)) => Ok(Carried {
            tcp_to_quic,
            quic_to_tcp,
        }),
        Err(e) => {
            let _ = send.reset(codes::STREAM_ABORTED);
            let _ = recv.stop(codes::STREAM_ABORTED);
            Err(e)
        }
    }
}
