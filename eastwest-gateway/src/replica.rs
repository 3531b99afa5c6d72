//! Several gateway replicas per cluster behind one address.
//!
//! A cluster publishes one gateway address. Replicas share it: in Kubernetes they sit behind
//! one Service (the load balancer pins each UDP flow to a pod); on one host they bind the same
//! UDP (and TCP) ports with `SO_REUSEPORT`, and the kernel spreads flows over them. Either
//! way, a peer gateway's connection lands on one replica, and any replica serves any peer and
//! any local endpoint; local sidecars reach whichever replica accepts their TCP connection.
//!
//! What makes a replica's death cheap is a secret the replicas share ([`ReplicaSet`]). It
//! keys two things every replica derives the same way:
//!
//! - the **stateless reset key**: when a replica dies, its peers' packets reach a sibling,
//!   which does not know the connection and answers with a QUIC stateless reset that the peer
//!   accepts (the token was derived from the same key), so the peer learns at once, rather
//!   than after its idle timeout, that the connection is gone, and reconnects straight away
//!   (to a live replica behind the same address);
//! - the **connection ID signature** of the datagram screen, so siblings' connection IDs are
//!   recognised as the cluster's own and not counted as forged.
//!
//! Replicas dial peers from a private socket of their own (an ephemeral port), never from the
//! shared one: two replicas dialling the same peer from a shared port would share one UDP
//! 4-tuple, and the answers could reach the wrong replica.
//!
//! Without a [`ReplicaSet`] ([`crate::start`]) a gateway makes up a private secret and uses
//! one socket for both roles.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use ring::hmac;

use crate::GatewayError;

/// Length of a replica set's secret, in bytes.
pub const SECRET_LEN: usize = 32;

/// The secret the replicas of one cluster's gateway share. Give every replica the same one
/// (for example from one Kubernetes Secret) and start each with [`crate::start_replica`].
#[derive(Clone, PartialEq, Eq)]
pub struct ReplicaSet {
    secret: [u8; SECRET_LEN],
}

impl fmt::Debug for ReplicaSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReplicaSet { secret: <redacted> }")
    }
}

impl ReplicaSet {
    /// A new random secret.
    pub fn generate() -> Self {
        ReplicaSet {
            secret: rand::random(),
        }
    }

    /// The replica set with this secret, which must be exactly [`SECRET_LEN`] bytes.
    pub fn from_secret(secret: &[u8]) -> Result<Self, GatewayError> {
        let secret: [u8; SECRET_LEN] =
            secret
                .try_into()
                .map_err(|_| GatewayError::InvalidOptions {
                    field: "replica secret",
                    reason: format!("must be exactly {SECRET_LEN} bytes, got {}", secret.len()),
                })?;
        if secret.iter().all(|&b| b == 0) {
            return Err(GatewayError::InvalidOptions {
                field: "replica secret",
                reason: "must not be all zeros".into(),
            });
        }
        Ok(ReplicaSet { secret })
    }

    /// The secret, to hand to another replica.
    pub fn secret(&self) -> &[u8; SECRET_LEN] {
        &self.secret
    }

    /// An HMAC key for one purpose, derived from the secret (so the reset key and the
    /// connection ID key are independent).
    pub(crate) fn key(&self, purpose: &str) -> hmac::Key {
        let root = hmac::Key::new(hmac::HMAC_SHA256, &self.secret);
        let derived = hmac::sign(&root, purpose.as_bytes());
        hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref())
    }
}

/// The socket buffers asked for on the QUIC sockets. The kernel default (about 208 KiB) lets
/// a burst of datagrams overflow the receive queue before quinn drains it; every drop is a
/// loss to QUIC's congestion control, which then halves its window. The kernel caps what we
/// get at `net.core.rmem_max` / `wmem_max` (raise those on busy gateways).
pub(crate) const UDP_SOCKET_BUFFER: usize = 8 << 20;

/// A UDP socket on `addr` with large socket buffers; with `shared`, one that replicas can bind
/// together (`SO_REUSEPORT`).
pub(crate) fn bind_udp(addr: SocketAddr, shared: bool) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    // Best effort: a smaller buffer than asked for is slower, not wrong.
    let _ = socket.set_recv_buffer_size(UDP_SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_SOCKET_BUFFER);
    tracing::debug!(
        %addr,
        receive_buffer = socket.recv_buffer_size().unwrap_or(0),
        send_buffer = socket.send_buffer_size().unwrap_or(0),
        "udp socket buffers"
    );
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A listening TCP socket on `addr`; with `shared`, one that replicas can bind together
/// (`SO_REUSEPORT`: the kernel spreads new connections over the replicas).
pub(crate) fn bind_tcp(addr: SocketAddr, shared: bool) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_of_the_wrong_size_or_all_zeros_are_refused_by_name() {
        let e = ReplicaSet::from_secret(&[1u8; 16]).unwrap_err().to_string();
        assert!(e.contains("replica secret") && e.contains("got 16"), "{e}");
        let e = ReplicaSet::from_secret(&[0u8; 32]).unwrap_err().to_string();
        assert!(e.contains("all zeros"), "{e}");
        let set = ReplicaSet::from_secret(&[7u8; 32]).unwrap();
        assert_eq!(set.secret(), &[7u8; 32]);
        assert!(
            !format!("{set:?}").contains('7'),
            "the secret is not printed"
        );
    }

    #[test]
    fn replicas_with_one_secret_derive_the_same_keys_and_purposes_differ() {
        let a = ReplicaSet::from_secret(&[9u8; 32]).unwrap();
        let b = ReplicaSet::from_secret(a.secret()).unwrap();
        let tag =
            |set: &ReplicaSet, purpose| hmac::sign(&set.key(purpose), b"cid").as_ref().to_vec();
        assert_eq!(tag(&a, "reset"), tag(&b, "reset"));
        assert_ne!(tag(&a, "reset"), tag(&a, "cid"));
        assert_ne!(tag(&a, "reset"), tag(&ReplicaSet::generate(), "reset"));
    }

    #[test]
    fn replicas_share_ports_only_when_asked() {
        let first = bind_udp("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind_udp(addr, true).unwrap();
        assert_eq!(second.local_addr().unwrap(), addr);
        assert!(
            bind_udp(addr, false).is_err(),
            "a lone gateway does not join"
        );

        let first = bind_tcp("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = first.local_addr().unwrap();
        let _second = bind_tcp(addr, true).unwrap();
        assert!(
            bind_tcp(addr, false).is_err(),
            "a lone gateway does not join"
        );
    }
}
