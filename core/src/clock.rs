//! Wall-clock time as the federation store and the data plane record it: milliseconds since
//! the Unix epoch (lease expiries, token expiries, report times). Durations and timers use
//! `tokio::time` instead, so tests can pause and advance them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; 0 for a clock set before 1970.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Whole milliseconds in `d`, saturating at `u64::MAX` (half a billion years).
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
