//! The server name (SNI) a TLS client asks for, read from its ClientHello as peeked bytes
//! (nothing consumed, nothing decrypted): what VirtualService `tls` routes match on.
//!
//! Only the first TLS record is read (at most [`MAX_HELLO`] bytes): a ClientHello split over
//! several records is taken as one without a server name. Every length is checked against
//! what encloses it; anything that does not add up is [`Hello::NotTls`], with the reason.

/// A TLS record header and the largest plaintext record (RFC 8446 §5.1).
pub const MAX_HELLO: usize = 5 + 16384;

/// What the first bytes of a connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A prefix of a ClientHello: read more (up to [`MAX_HELLO`] bytes).
    NeedMore,
    /// Not a ClientHello; why.
    NotTls(&'static str),
    /// A ClientHello, and the host name it asks for (lowercase), if any.
    ClientHello { server_name: Option<String> },
}

/// Reads a ClientHello's server name from `bytes`, the connection's first bytes.
pub fn server_name(bytes: &[u8]) -> Hello {
    // Record header: handshake (22), a legacy version 3.x, the record length.
    if bytes.first().is_some_and(|b| *b != 22) {
        return Hello::NotTls("not a TLS handshake record");
    }
    if bytes.get(1).is_some_and(|b| *b != 3) {
        return Hello::NotTls("not a TLS record version");
    }
    if bytes.len() < 5 {
        return Hello::NeedMore;
    }
    let record_len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
    if record_len == 0 || record_len > MAX_HELLO - 5 {
        return Hello::NotTls("the record length is out of range");
    }
    if bytes[5..].first().is_some_and(|b| *b != 1) {
        return Hello::NotTls("the first handshake message is not a ClientHello");
    }
    let Some(record) = bytes.get(5..5 + record_len) else {
        return Hello::NeedMore;
    };
    match client_hello(record) {
        Ok(server_name) => Hello::ClientHello { server_name },
        Err(reason) => Hello::NotTls(reason),
    }
}

/// A cursor over length-prefixed fields.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err(what);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8_prefixed(&mut self, what: &'static str) -> Result<&'a [u8], &'static str> {
        let n = usize::from(self.take(1, what)?[0]);
        self.take(n, what)
    }

    fn u16(&mut self, what: &'static str) -> Result<usize, &'static str> {
        let b = self.take(2, what)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn u16_prefixed(&mut self, what: &'static str) -> Result<&'a [u8], &'static str> {
        let n = self.u16(what)?;
        self.take(n, what)
    }
}

/// The server name in a handshake record that starts with a ClientHello (RFC 8446 §4.1.2,
/// RFC 6066 §3).
fn client_hello(record: &[u8]) -> Result<Option<String>, &'static str> {
    let mut r = Reader(record);
    r.take(1, "the handshake type is cut short")?;
    let len = r.take(3, "the handshake length is cut short")?;
    let len = usize::from(len[0]) << 16 | usize::from(len[1]) << 8 | usize::from(len[2]);
    let Ok(body) = r.take(len, "") else {
        // The ClientHello goes on in a later record: read no further.
        return Ok(None);
    };
    let mut r = Reader(body);
    r.take(2 + 32, "the ClientHello's version and random are cut short")?;
    let session = r.u8_prefixed("the session id is cut short")?;
    if session.len() > 32 {
        return Err("the session id is longer than 32 bytes");
    }
    let suites = r.u16_prefixed("the cipher suites are cut short")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err("the cipher suites list is empty or odd");
    }
    if r.u8_prefixed("the compression methods are cut short")?
        .is_empty()
    {
        return Err("no compression method is offered");
    }
    if r.0.is_empty() {
        // No extensions at all (TLS 1.2 and older allow it).
        return Ok(None);
    }
    let mut extensions = Reader(r.u16_prefixed("the extensions are cut short")?);
    if !r.0.is_empty() {
        return Err("bytes follow the extensions");
    }
    let mut found = None;
    while !extensions.0.is_empty() {
        let kind = extensions.u16("an extension type is cut short")?;
        let data = extensions.u16_prefixed("an extension is cut short")?;
        if kind != 0 {
            continue;
        }
        if found.is_some() {
            return Err("the server_name extension appears twice");
        }
        found = Some(host_name(data)?);
    }
    Ok(found.flatten())
}

/// The host name in a server_name extension's data.
fn host_name(data: &[u8]) -> Result<Option<String>, &'static str> {
    let mut r = Reader(data);
    let mut list = Reader(r.u16_prefixed("the server name list is cut short")?);
    if !r.0.is_empty() {
        return Err("bytes follow the server name list");
    }
    while !list.0.is_empty() {
        let kind = list.take(1, "a server name type is cut short")?[0];
        let name = list.u16_prefixed("a server name is cut short")?;
        if kind != 0 {
            continue;
        }
        let valid = !name.is_empty()
            && name.len() <= 253
            && name
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !valid {
            return Err("the server name is not a DNS name");
        }
        return Ok(Some(String::from_utf8_lossy(name).to_ascii_lowercase()));
    }
    Ok(None)
}

/// Whether `name` (lowercase) is matched by an SNI pattern: exact (any case), `*.suffix`
/// (any name ending in `.suffix`), or `*`.
pub fn matches(pattern: &str, name: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => {
            name.len() > suffix.len()
                && name
                    .get(name.len() - suffix.len()..)
                    .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
        }
        None => pattern.eq_ignore_ascii_case(name),
    }
}

#[cfg(test)]
mod tests;
