//! Screening the datagrams that reach the QUIC port: anything that cannot be QUIC for this
//! gateway is counted and logged (rate-limited, per source address), without costing the
//! packets that are.
//!
//! quinn silently drops what it cannot parse, so this layer sits between quinn and the UDP
//! socket ([`ScreenedSocket`] wraps quinn's own tokio socket and changes nothing it sends or
//! receives) and classifies each received datagram cheaply, before quinn looks at it:
//!
//! - too short, or the QUIC fixed bit (0x40) clear: **garbage** (the endpoint does not accept
//!   greased fixed bits, so a gateway never sends such packets to us);
//! - a long header of a version other than 1 (or 0, version negotiation): **unknown version**;
//! - a short header whose destination connection ID this gateway did not issue:
//!   **unknown connection ID**. Our connection IDs carry a keyed hash of their random part
//!   ([`SignedCidGenerator`]), so forged or random ones are recognised without any state.
//!
//! Counting happens per datagram (GRO batches are split at their stride). Dropping is left to
//! quinn, which drops all three kinds anyway.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, ConnectionId, ConnectionIdGenerator, UdpPoller};
use ring::hmac;
use tracing::warn;

use crate::log_limit::LogLimiter;
use crate::metrics::{Metrics, Rejection, Source};

/// The QUIC versions this endpoint accepts (0 is version negotiation).
pub(crate) const QUIC_VERSIONS: [u32; 2] = [0, 1];
/// Length of the connection IDs this gateway issues.
const CID_LEN: usize = 8;
const NONCE_LEN: usize = 4;

/// Issues 8-byte connection IDs: 4 random bytes and 4 bytes of a keyed hash (HMAC-SHA256) of
/// them, so the screen can tell our IDs from forged ones. Shares its key with the [`Screen`],
/// and with the other replicas of the gateway (see `replica.rs`), whose IDs thus pass too.
#[derive(Clone)]
pub(crate) struct SignedCidGenerator {
    key: hmac::Key,
}

impl SignedCidGenerator {
    pub(crate) fn new(key: hmac::Key) -> Self {
        SignedCidGenerator { key }
    }

    fn signature(&self, nonce: &[u8]) -> [u8; CID_LEN - NONCE_LEN] {
        let tag = hmac::sign(&self.key, nonce);
        let tag = tag.as_ref();
        [tag[0], tag[1], tag[2], tag[3]]
    }

    /// Whether `cid` was issued by a generator with this key.
    pub(crate) fn is_ours(&self, cid: &[u8]) -> bool {
        cid.len() == CID_LEN && cid[NONCE_LEN..] == self.signature(&cid[..NONCE_LEN])
    }
}

impl fmt::Debug for SignedCidGenerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SignedCidGenerator")
    }
}

impl ConnectionIdGenerator for SignedCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut cid = [0u8; CID_LEN];
        cid[..NONCE_LEN].copy_from_slice(&nonce);
        cid[NONCE_LEN..].copy_from_slice(&self.signature(&nonce));
        ConnectionId::new(&cid)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// What a received datagram looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Plausible,
    Bad(Rejection),
}

/// Classifies one datagram (pure; see the module docs for the rules).
pub(crate) fn classify(datagram: &[u8], cids: &SignedCidGenerator) -> Verdict {
    let Some(&first) = datagram.first() else {
        return Verdict::Bad(Rejection::GarbageDatagram);
    };
    if first & 0x80 != 0 {
        // Long header: flags, version (4), DCID length, DCID, ...
        let Some(version) = datagram.get(1..5) else {
            return Verdict::Bad(Rejection::GarbageDatagram);
        };
        let version = u32::from_be_bytes([version[0], version[1], version[2], version[3]]);
        if version == 0 {
            // Version negotiation ignores the fixed bit.
            return Verdict::Plausible;
        }
        if first & 0x40 == 0 {
            return Verdict::Bad(Rejection::GarbageDatagram);
        }
        if !QUIC_VERSIONS.contains(&version) {
            return Verdict::Bad(Rejection::UnknownQuicVersion);
        }
        return Verdict::Plausible;
    }
    if first & 0x40 == 0 {
        return Verdict::Bad(Rejection::GarbageDatagram);
    }
    match datagram.get(1..1 + CID_LEN) {
        Some(cid) if cids.is_ours(cid) => Verdict::Plausible,
        Some(_) => Verdict::Bad(Rejection::UnknownConnectionId),
        None => Verdict::Bad(Rejection::GarbageDatagram),
    }
}

/// Counts and logs what [`classify`] rejects.
#[derive(Debug)]
pub(crate) struct Screen {
    pub cids: SignedCidGenerator,
    pub metrics: Arc<Metrics>,
    pub log: Arc<LogLimiter>,
}

impl Screen {
    fn inspect(&self, from: SocketAddr, datagram: &[u8]) {
        let Verdict::Bad(reason) = classify(datagram, &self.cids) else {
            return;
        };
        self.metrics.reject(Source::Peer, reason);
        let key = format!("udp {} {}", from.ip(), reason.as_str());
        if let Some(suppressed) = self.log.admit(&key) {
            warn!(%from, reason = reason.as_str(), len = datagram.len(), suppressed,
                "dropping a datagram that is not QUIC for this gateway");
        }
    }
}

/// quinn's tokio UDP socket with a [`Screen`] looking at what it receives.
#[derive(Debug)]
pub(crate) struct ScreenedSocket {
    pub inner: Arc<dyn AsyncUdpSocket>,
    pub screen: Screen,
}

impl AsyncUdpSocket for ScreenedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let polled = self.inner.poll_recv(cx, bufs, meta);
        if let Poll::Ready(Ok(count)) = &polled {
            for (buf, meta) in bufs.iter().zip(meta.iter()).take(*count) {
                let filled = buf.get(..meta.len).unwrap_or(&buf[..]);
                let stride = meta.stride.max(1);
                for datagram in filled.chunks(stride) {
                    self.screen.inspect(meta.addr, datagram);
                }
            }
        }
        polled
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generator() -> SignedCidGenerator {
        SignedCidGenerator::new(crate::replica::ReplicaSet::generate().key("cid"))
    }

    fn short_header(cid: &[u8]) -> Vec<u8> {
        let mut d = vec![0x40];
        d.extend_from_slice(cid);
        d.extend_from_slice(&[0u8; 20]);
        d
    }

    #[test]
    fn our_connection_ids_pass_and_forged_ones_do_not() {
        let mut gen = generator();
        let other = generator();
        let set = crate::replica::ReplicaSet::generate();
        let mut replica = SignedCidGenerator::new(set.key("cid"));
        let sibling = SignedCidGenerator::new(set.key("cid"));
        for _ in 0..100 {
            let cid = replica.generate_cid();
            assert_eq!(classify(&short_header(&cid), &sibling), Verdict::Plausible);
        }
        for _ in 0..100 {
            let cid = gen.generate_cid();
            assert_eq!(classify(&short_header(&cid), &gen), Verdict::Plausible);
            assert_eq!(
                classify(&short_header(&cid), &other),
                Verdict::Bad(Rejection::UnknownConnectionId)
            );
        }
        assert_eq!(
            classify(&short_header(&[7u8; 8]), &gen),
            Verdict::Bad(Rejection::UnknownConnectionId)
        );
    }

    #[test]
    fn datagrams_are_classified_by_their_first_bytes() {
        let gen = generator();
        let bad = |r| Verdict::Bad(r);
        assert_eq!(classify(&[], &gen), bad(Rejection::GarbageDatagram));
        // A TLS record over UDP: fixed bit clear.
        assert_eq!(
            classify(b"\x16\x03\x01\x00\xa5", &gen),
            bad(Rejection::GarbageDatagram)
        );
        // Text happens to have the fixed bit set, but no connection ID of ours.
        assert_eq!(
            classify(b"GET / HTTP/1.1", &gen),
            bad(Rejection::UnknownConnectionId)
        );
        assert_eq!(
            classify(&[0xc0, 0, 0], &gen),
            bad(Rejection::GarbageDatagram)
        );
        assert_eq!(
            classify(&[0x40, 1, 2], &gen),
            bad(Rejection::GarbageDatagram)
        );
        assert_eq!(
            classify(&[0xc0, 0, 0, 0, 1, 8], &gen),
            Verdict::Plausible,
            "a version 1 long header"
        );
        assert_eq!(
            classify(&[0xc0, 0xff, 0, 0, 0x1d, 8], &gen),
            bad(Rejection::UnknownQuicVersion)
        );
        assert_eq!(
            classify(&[0x80, 0, 0, 0, 0, 8], &gen),
            Verdict::Plausible,
            "version negotiation"
        );
        assert_eq!(
            classify(&[0x80, 0, 0, 0, 1, 8], &gen),
            bad(Rejection::GarbageDatagram),
            "fixed bit clear"
        );
    }
}
