//! Only TLS crosses clusters: the outbound role carries a tunnel only once the caller's first
//! bytes are a TLS ClientHello, so plaintext never leaves the cluster, not even towards a
//! PERMISSIVE workload (docs/security.md); the inbound role checks again before it writes a
//! byte to the endpoint, as it does not trust another cluster's gateway to. The check reads the first record header and the
//! handshake type and forwards those bytes ahead of the relay; nothing else is inspected, and
//! the rest of the handshake stays end to end between the workloads.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes read to recognise a ClientHello: the 5-byte TLS record header and the handshake
/// message type.
pub(crate) const PREFIX_LEN: usize = 6;
/// [`PREFIX_LEN`], for byte counters.
pub(crate) const PREFIX_LEN_U8: u8 = 6;

/// Whether `prefix` starts a TLS ClientHello: a handshake record (content type 22) of a TLS
/// record version (3.0 to 3.4), a plausible length, whose message is a ClientHello (type 1).
/// `Err` says what it is instead (pure).
pub(crate) fn client_hello(prefix: &[u8; PREFIX_LEN]) -> Result<(), String> {
    const HANDSHAKE: u8 = 22;
    const CLIENT_HELLO: u8 = 1;
    const MAX_RECORD: usize = 16_384 + 2_048;
    if prefix[0] != HANDSHAKE {
        return Err(format!(
            "the first byte is {:#04x}, not a TLS handshake record (0x16)",
            prefix[0]
        ));
    }
    if prefix[1] != 3 || prefix[2] > 4 {
        return Err(format!(
            "record version {}.{} is not TLS",
            prefix[1], prefix[2]
        ));
    }
    let len = usize::from(u16::from_be_bytes([prefix[3], prefix[4]]));
    if !(4..=MAX_RECORD).contains(&len) {
        return Err(format!("record length {len} is not a handshake's"));
    }
    if prefix[5] != CLIENT_HELLO {
        return Err(format!(
            "handshake message type {} is not a ClientHello (1)",
            prefix[5]
        ));
    }
    Ok(())
}

/// Reads the first [`PREFIX_LEN`] bytes of a tunnel's payload (the caller's TCP connection,
/// or the peer stream) within `within`, and checks them.
pub(crate) async fn read_client_hello<R: AsyncRead + Unpin>(
    from: &mut R,
    within: Duration,
) -> Result<[u8; PREFIX_LEN], NoClientHello> {
    let mut prefix = [0u8; PREFIX_LEN];
    match tokio::time::timeout(within, from.read_exact(&mut prefix)).await {
        Err(_) => {
            return Err(NoClientHello::NotTls(format!(
                "no TLS ClientHello within {within:?}"
            )))
        }
        Ok(Err(e)) if reset_as_not_tls(&e) => {
            return Err(NoClientHello::NotTls(
                "the caller's gateway refused it: its first bytes were not a TLS ClientHello"
                    .into(),
            ))
        }
        Ok(Err(e)) => {
            return Err(NoClientHello::Ended(format!(
                "the connection ended before a ClientHello: {e}"
            )))
        }
        Ok(Ok(_)) => {}
    }
    client_hello(&prefix)
        .map(|()| prefix)
        .map_err(NoClientHello::NotTls)
}

/// Why a tunnel carries nothing: its first bytes are not TLS (counted as `not_tls`), or it
/// ended before sending any (the caller gave up, its gateway aborted for another reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NoClientHello {
    NotTls(String),
    Ended(String),
}

impl std::fmt::Display for NoClientHello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoClientHello::NotTls(why) | NoClientHello::Ended(why) => f.write_str(why),
        }
    }
}

/// Whether a read failed because the peer stream was reset with `codes::NOT_TLS`.
fn reset_as_not_tls(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|inner| inner.downcast_ref::<quinn::ReadError>()),
        Some(quinn::ReadError::Reset(code)) if *code == crate::quic::codes::NOT_TLS
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_hello_is_recognised_and_anything_else_is_named() {
        // TLS 1.2 record layer (what TLS 1.3 clients send), 512 bytes, ClientHello.
        assert_eq!(client_hello(&[22, 3, 1, 2, 0, 1]), Ok(()));
        assert_eq!(client_hello(&[22, 3, 3, 0, 200, 1]), Ok(()));
        for (bytes, says) in [
            (*b"GET / ", "not a TLS handshake record"),
            (*b"PRI * ", "not a TLS handshake record"),
            ([23, 3, 3, 0, 10, 1], "not a TLS handshake record"),
            ([22, 2, 0, 0, 10, 1], "is not TLS"),
            ([22, 3, 9, 0, 10, 1], "is not TLS"),
            ([22, 3, 1, 0, 0, 1], "not a handshake's"),
            ([22, 3, 1, 0xff, 0xff, 1], "not a handshake's"),
            ([22, 3, 3, 0, 10, 2], "not a ClientHello"),
        ] {
            let e = client_hello(&bytes).unwrap_err();
            assert!(e.contains(says), "{bytes:?}: {e}");
        }
    }
}
