//! Trace context propagation (W3C `traceparent` and Zipkin B3) and JSON access logs.
//!
//! The outbound sidecar is a hop in the trace, as Envoy is in Istio: it keeps the caller's
//! trace id (from `traceparent`, else from `x-b3-traceid`), starts a span of its own, and
//! sends both header families on, so applications using either see one trace. A request
//! without trace context starts a new trace. `x-request-id` is set when absent.
//!
//! Access logs are one JSON object per line, with Envoy's field names, written by a
//! background task so that a slow disk never holds a request; lines that do not fit the
//! queue are dropped and counted.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http::{HeaderMap, HeaderValue};
use serde::Serialize;
use tokio::sync::mpsc;

/// Random hex of `bytes` bytes (at most 16), never all zeros (an invalid id in both
/// formats). On every request's path (trace, span and request ids): one RNG fill and one
/// allocation.
fn random_hex(bytes: usize) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut raw = [0u8; 16];
    let raw = &mut raw[..bytes.min(16)];
    loop {
        rand::Rng::fill(&mut rand::rng(), &mut *raw);
        if raw.iter().any(|b| *b != 0) {
            break;
        }
    }
    let mut hex = String::with_capacity(raw.len() * 2);
    for b in raw.iter() {
        hex.push(char::from(DIGITS[usize::from(b >> 4)]));
        hex.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    hex
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()) && s.bytes().any(|b| b != b'0')
}

/// The trace context of one request as this hop sends it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: String,
    /// This hop's span.
    pub span_id: String,
    /// The caller's span, when it had one.
    pub parent_id: Option<String>,
    pub sampled: bool,
}

/// Reads the caller's context (traceparent first, then B3; malformed headers are ignored as
/// the W3C spec requires), starts this hop's span, and rewrites both header families.
pub fn propagate(headers: &mut HeaderMap) -> TraceContext {
    let from_w3c = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let parts: Vec<&str> = v.trim().split('-').collect();
            let [version, trace, parent, flags] = parts.as_slice() else {
                return None;
            };
            let version_ok = version.len() == 2
                && version.bytes().all(|b| b.is_ascii_hexdigit())
                && !version.eq_ignore_ascii_case("ff");
            if !(version_ok && is_hex(trace, 32) && is_hex(parent, 16) && flags.len() == 2) {
                return None;
            }
            let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
            Some((
                trace.to_ascii_lowercase(),
                parent.to_ascii_lowercase(),
                sampled,
            ))
        });
    let from_b3 = || {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let trace = get("x-b3-traceid")?;
        let span = get("x-b3-spanid")?;
        if !(is_hex(trace, 32) || is_hex(trace, 16)) || !is_hex(span, 16) {
            return None;
        }
        // A 64-bit B3 trace id is left-padded to 128 bits.
        let trace = format!("{:0>32}", trace.to_ascii_lowercase());
        let sampled = get("x-b3-sampled") != Some("0");
        Some((trace, span.to_ascii_lowercase(), sampled))
    };
    let (trace_id, parent_id, sampled) = match from_w3c.or_else(from_b3) {
        Some((t, p, s)) => (t, Some(p), s),
        None => (random_hex(16), None, true),
    };
    let ctx = TraceContext {
        trace_id,
        span_id: random_hex(8),
        parent_id,
        sampled,
    };
    let flags = if ctx.sampled { "01" } else { "00" };
    fn set(headers: &mut HeaderMap, name: &'static str, value: String) {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
    set(
        headers,
        "traceparent",
        format!("00-{}-{}-{flags}", ctx.trace_id, ctx.span_id),
    );
    set(headers, "x-b3-traceid", ctx.trace_id.clone());
    set(headers, "x-b3-spanid", ctx.span_id.clone());
    set(
        headers,
        "x-b3-sampled",
        if ctx.sampled { "1" } else { "0" }.into(),
    );
    match &ctx.parent_id {
        Some(p) => set(headers, "x-b3-parentspanid", p.clone()),
        None => {
            headers.remove("x-b3-parentspanid");
        }
    }
    if !headers.contains_key("x-request-id") {
        set(headers, "x-request-id", random_hex(16));
    }
    ctx
}

/// One access log line (Envoy's JSON field names).
#[derive(Debug, Clone, Serialize)]
pub struct AccessRecord {
    pub start_time: String,
    pub method: String,
    pub path: String,
    pub protocol: String,
    pub response_code: u16,
    pub response_flags: String,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: u64,
    pub authority: String,
    pub downstream_remote_address: String,
    pub upstream_service: String,
    pub upstream_cluster: String,
    pub x_request_id: String,
    pub trace_id: String,
    pub source_principal: String,
}

/// `time` as RFC 3339 in UTC with milliseconds, e.g. `2026-11-22T03:04:05.678Z`.
pub fn rfc3339(time: std::time::SystemTime) -> String {
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(i64::MAX / 2) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Where access logs go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AccessLogTarget {
    #[default]
    Off,
    Stdout,
    File(PathBuf),
}

/// Lines waiting for the writer before new ones are dropped.
const QUEUE: usize = 4096;

/// A handle that queues access log lines for the writer task.
#[derive(Clone, Default)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<String>>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// Starts the writer for `target` (nothing for `Off`). A file is opened for appending
    /// now, so a bad path is an error at start.
    pub fn start(target: &AccessLogTarget) -> std::io::Result<AccessLog> {
        let mut out: Box<dyn Write + Send> = match target {
            AccessLogTarget::Off => return Ok(AccessLog::default()),
            AccessLogTarget::Stdout => Box::new(std::io::stdout()),
            AccessLogTarget::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                    })?,
            ),
        };
        let (tx, mut rx) = mpsc::channel::<String>(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                while let Some(line) = rx.blocking_recv() {
                    if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                        break;
                    }
                }
            })?;
        Ok(AccessLog {
            tx: Some(tx),
            dropped: Arc::default(),
        })
    }

    /// Queues one record; drops it (and counts) when the writer is behind.
    pub fn log(&self, record: &AccessRecord) {
        let Some(tx) = &self.tx else { return };
        let Ok(line) = serde_json::to_string(record) else {
            return;
        };
        if tx.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines dropped because the writer was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_795_835_045_678);
        assert_eq!(rfc3339(t), "2026-11-28T03:04:05.678Z");
        assert_eq!(rfc3339(std::time::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = std::time::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn random_ids_are_lowercase_hex_of_their_length_and_differ() {
        let ids: std::collections::BTreeSet<String> = (0..1000).map(|_| random_hex(16)).collect();
        assert_eq!(ids.len(), 1000, "random ids repeat");
        for id in &ids {
            assert!(is_hex(id, 32), "{id}");
            assert_eq!(id.to_lowercase(), *id);
        }
        assert!(is_hex(&random_hex(8), 16));
        // Every digit appears somewhere: both nibbles are encoded.
        let digits: std::collections::BTreeSet<char> = ids.iter().flat_map(|s| s.chars()).collect();
        assert_eq!(digits.len(), 16, "{digits:?}");
    }

    #[test]
    fn a_request_without_context_starts_a_trace_in_both_formats() {
        let mut h = HeaderMap::new();
        let ctx = propagate(&mut h);
        assert!(ctx.parent_id.is_none());
        let tp = h["traceparent"].to_str().unwrap();
        assert_eq!(tp, format!("00-{}-{}-01", ctx.trace_id, ctx.span_id));
        assert_eq!(h["x-b3-traceid"], ctx.trace_id.as_str());
        assert_eq!(h["x-b3-spanid"], ctx.span_id.as_str());
        assert!(h.get("x-b3-parentspanid").is_none());
        assert_eq!(h["x-request-id"].len(), 32);
    }

    #[test]
    fn the_callers_trace_continues_with_a_new_span() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
        );
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        let ctx = propagate(&mut h);
        assert_eq!(ctx.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.parent_id.as_deref(), Some("00f067aa0ba902b7"));
        assert!(!ctx.sampled);
        assert_ne!(ctx.span_id, "00f067aa0ba902b7");
        assert!(h["traceparent"].to_str().unwrap().ends_with("-00"));
        assert_eq!(h["x-b3-parentspanid"], "00f067aa0ba902b7");
        assert_eq!(h["x-b3-sampled"], "0");
        assert_eq!(h["x-request-id"], "abc");
    }

    #[test]
    fn b3_alone_is_understood_and_64_bit_ids_are_padded() {
        let mut h = HeaderMap::new();
        h.insert("x-b3-traceid", HeaderValue::from_static("a3ce929d0e0e4736"));
        h.insert("x-b3-spanid", HeaderValue::from_static("00f067aa0ba902b7"));
        let ctx = propagate(&mut h);
        assert_eq!(ctx.trace_id, "0000000000000000a3ce929d0e0e4736");
        assert_eq!(ctx.parent_id.as_deref(), Some("00f067aa0ba902b7"));
    }

    #[test]
    fn malformed_context_is_ignored_and_a_new_trace_starts() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            let mut h = HeaderMap::new();
            h.insert("traceparent", HeaderValue::from_static(bad));
            let ctx = propagate(&mut h);
            assert!(ctx.parent_id.is_none(), "{bad}");
            assert_ne!(ctx.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        }
    }
}
