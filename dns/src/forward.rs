//! Forwarding: relays questions outside the mesh to the upstream resolvers.
//!
//! The client's packet goes upstream unchanged (its EDNS options, DO bit and cookies
//! included) except for the message id, which is replaced by a fresh unpredictable one so that
//! an off-path host cannot guess it; the reply gets the client's id back before it is relayed.
//! Each exchange uses its own socket (a fresh ephemeral port per UDP question). Upstreams are
//! tried in order; each gets `timeout`, and the caller answers SERVFAIL when all fail.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{timeout_at, Instant};
use tracing::{debug, warn};

use crate::answer::Transport;

/// The largest DNS message (the TCP length prefix is 16 bits; EDNS caps UDP at the same).
pub(crate) const MAX_MESSAGE: usize = u16::MAX as usize;

/// Why one upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardError {
    #[error("no upstream resolver is configured")]
    NoUpstreams,
    #[error("the query is too short to carry a DNS header")]
    ShortQuery,
    #[error("exchanging with upstream {upstream} over {transport}")]
    Io {
        upstream: SocketAddr,
        transport: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream {upstream} did not answer over {transport} within {timeout:?}")]
    Timeout {
        upstream: SocketAddr,
        transport: &'static str,
        timeout: Duration,
    },
    #[error("upstream {upstream} sent a reply that does not match the query")]
    Mismatch { upstream: SocketAddr },
}

/// Relays raw DNS queries to a list of upstream resolvers.
#[derive(Debug, Clone)]
pub(crate) struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
}

impl Forwarder {
    pub(crate) fn new(upstreams: Vec<SocketAddr>, timeout: Duration) -> Forwarder {
        Forwarder { upstreams, timeout }
    }

    /// Sends `query` to each upstream in turn over `transport` until one answers; returns the
    /// reply with the id of `query`.
    pub(crate) async fn forward(
        &self,
        query: &[u8],
        transport: Transport,
    ) -> Result<Vec<u8>, ForwardError> {
        if query.len() < 12 {
            return Err(ForwardError::ShortQuery);
        }
        let client_id = [query[0], query[1]];
        let mut last = ForwardError::NoUpstreams;
        for &upstream in &self.upstreams {
            let mut relayed = query.to_vec();
            relayed[..2].copy_from_slice(&random_id().to_be_bytes());
            let deadline = Instant::now() + self.timeout;
            let result = match transport {
                Transport::Tcp => exchange_tcp(upstream, &relayed, deadline, self.timeout).await,
                Transport::Udp => exchange_udp(upstream, &relayed, deadline, self.timeout).await,
            };
            match result {
                Ok(mut reply) => {
                    reply[..2].copy_from_slice(&client_id);
                    return Ok(reply);
                }
                Err(error) => {
                    debug!(%upstream, %error, "upstream failed; trying the next");
                    last = error;
                }
            }
        }
        warn!(error = %last, upstreams = self.upstreams.len(), "no upstream answered");
        Err(last)
    }
}

async fn exchange_udp(
    upstream: SocketAddr,
    query: &[u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u8>, ForwardError> {
    let io = |source| ForwardError::Io {
        upstream,
        transport: "udp",
        source,
    };
    let local = match upstream {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = UdpSocket::bind(local).await.map_err(io)?;
    socket.connect(upstream).await.map_err(io)?;
    socket.send(query).await.map_err(io)?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let len = timeout_at(deadline, socket.recv(&mut buf))
            .await
            .map_err(|_| ForwardError::Timeout {
                upstream,
                transport: "udp",
                timeout,
            })?
            .map_err(io)?;
        let reply = &buf[..len];
        if is_reply_to(reply, query) {
            return Ok(reply.to_vec());
        }
        // A late reply to an earlier question or a stray datagram: keep waiting.
        debug!(%upstream, len, "ignoring a datagram that does not answer the query");
    }
}

async fn exchange_tcp(
    upstream: SocketAddr,
    query: &[u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u8>, ForwardError> {
    let exchange = async {
        let io = |source| ForwardError::Io {
            upstream,
            transport: "tcp",
            source,
        };
        let len = u16::try_from(query.len()).map_err(|_| ForwardError::ShortQuery)?;
        let mut stream = TcpStream::connect(upstream).await.map_err(io)?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(query);
        stream.write_all(&framed).await.map_err(io)?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.map_err(io)?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply).await.map_err(io)?;
        if is_reply_to(&reply, query) {
            Ok(reply)
        } else {
            Err(ForwardError::Mismatch { upstream })
        }
    };
    timeout_at(deadline, exchange)
        .await
        .map_err(|_| ForwardError::Timeout {
            upstream,
            transport: "tcp",
            timeout,
        })?
}

/// Whether `reply` is a response carrying the id of `query`.
fn is_reply_to(reply: &[u8], query: &[u8]) -> bool {
    reply.len() >= 12 && query.len() >= 2 && reply[..2] == query[..2] && reply[2] & 0x80 != 0
}

/// An unpredictable message id. `RandomState` is seeded from the OS once per thread and
/// stepped on every call, which is plenty for a 16-bit id.
fn random_id() -> u16 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u8(0);
    (hasher.finish() & 0xffff) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_must_carry_the_query_id_and_the_response_bit() {
        let query = [0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        let mut reply = query;
        reply[2] |= 0x80;
        assert!(is_reply_to(&reply, &query));
        assert!(!is_reply_to(&query, &query), "a query is not a reply");
        let mut other = reply;
        other[1] = 0x35;
        assert!(!is_reply_to(&other, &query));
        assert!(!is_reply_to(&reply[..11], &query));
    }

    #[test]
    fn random_ids_vary() {
        let ids: std::collections::HashSet<u16> = (0..64).map(|_| random_id()).collect();
        assert!(ids.len() > 32, "only {} distinct ids", ids.len());
    }

    #[tokio::test]
    async fn forwarding_without_upstreams_fails() {
        let forwarder = Forwarder::new(vec![], Duration::from_millis(10));
        let query = [0u8; 12];
        assert!(matches!(
            forwarder.forward(&query, Transport::Udp).await,
            Err(ForwardError::NoUpstreams)
        ));
    }

    #[tokio::test]
    async fn a_query_shorter_than_a_header_is_not_forwarded() {
        let forwarder = Forwarder::new(vec![], Duration::from_millis(10));
        assert!(matches!(
            forwarder.forward(&[1, 2, 3], Transport::Tcp).await,
            Err(ForwardError::ShortQuery)
        ));
    }
}
