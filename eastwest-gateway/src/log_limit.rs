//! Rate-limited logging of bad input: at most one line per peer (source address or cluster)
//! and kind of problem per interval, with the number of occurrences that were not logged.
//!
//! A flood of garbage datagrams or malformed headers must not become a flood of log lines:
//! every occurrence is counted in the metrics, but only the first one per key and interval is
//! logged. The table is bounded; when it is full, entries older than the interval are dropped,
//! and if none is, the new key is refused a line (the metric still counts it).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The default interval between two log lines for one key.
pub(crate) const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Keys remembered at once.
const MAX_KEYS: usize = 1024;

#[derive(Debug)]
pub(crate) struct LogLimiter {
    interval: Duration,
    entries: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    logged_at: Instant,
    suppressed: u64,
}

impl LogLimiter {
    pub(crate) fn new(interval: Duration) -> Self {
        LogLimiter {
            interval,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Whether to log an occurrence for `key` now. `Some(n)` means log it, mentioning that
    /// `n` earlier occurrences were not logged; `None` means stay quiet.
    pub(crate) fn admit(&self, key: &str) -> Option<u64> {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = entries.get_mut(key) {
            if now.duration_since(entry.logged_at) < self.interval {
                entry.suppressed += 1;
                return None;
            }
            let suppressed = entry.suppressed;
            *entry = Entry {
                logged_at: now,
                suppressed: 0,
            };
            return Some(suppressed);
        }
        if entries.len() >= MAX_KEYS {
            let interval = self.interval;
            entries.retain(|_, e| now.duration_since(e.logged_at) < interval);
            if entries.len() >= MAX_KEYS {
                return None;
            }
        }
        entries.insert(
            key.to_string(),
            Entry {
                logged_at: now,
                suppressed: 0,
            },
        );
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_line_per_key_and_interval_with_the_count_of_the_quiet_ones() {
        let limiter = LogLimiter::new(Duration::from_secs(10));
        assert_eq!(limiter.admit("a"), Some(0));
        assert_eq!(limiter.admit("a"), None);
        assert_eq!(limiter.admit("a"), None);
        assert_eq!(limiter.admit("b"), Some(0));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(limiter.admit("a"), Some(2));
        assert_eq!(limiter.admit("a"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_stays_bounded() {
        let limiter = LogLimiter::new(Duration::from_secs(10));
        for i in 0..MAX_KEYS {
            assert_eq!(limiter.admit(&i.to_string()), Some(0));
        }
        assert_eq!(limiter.admit("one too many"), None);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(limiter.admit("one too many"), Some(0));
        let len = limiter.entries.lock().unwrap().len();
        assert_eq!(len, 1);
    }
}
