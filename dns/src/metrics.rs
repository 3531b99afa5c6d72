//! The proxy's Prometheus metrics (prometheus-client).
//!
//! [`Metrics`] is created by [`start`](crate::start) and reachable through
//! [`DnsHandle::metrics`](crate::DnsHandle::metrics); [`Metrics::register`] adds it to a
//! registry (the daemon passes its admin server's `isthmus_dns` registry). Counting a query is
//! one atomic add: the counter for each (type, result, source) is looked up in the family once
//! and kept in a fixed slot.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Question types with their own label value; every other type is `other`.
const QTYPES: [(u16, &str); 12] = [
    (1, "A"),
    (28, "AAAA"),
    (33, "SRV"),
    (12, "PTR"),
    (16, "TXT"),
    (6, "SOA"),
    (255, "ANY"),
    (5, "CNAME"),
    (15, "MX"),
    (2, "NS"),
    (65, "HTTPS"),
    (64, "SVCB"),
];
const QTYPE_LABELS: usize = QTYPES.len() + 1;

/// Response codes with their own label value (indexed by code); others are `other`.
const RCODES: [&str; 6] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED",
];
const RCODE_OTHER: usize = RCODES.len();
const RCODE_DROPPED: usize = RCODES.len() + 1;
const RCODE_LABELS: usize = RCODES.len() + 2;

/// Who produced an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The mesh table (or the memo of its answers).
    Mesh,
    /// The reply cache.
    Cache,
    /// An upstream resolver, directly or through an identical question in flight.
    Upstream,
    /// The proxy itself, for a request it could not serve (malformed, no upstream answered).
    Error,
}

impl Source {
    const ALL: [Source; 4] = [Source::Mesh, Source::Cache, Source::Upstream, Source::Error];

    fn label(self) -> &'static str {
        match self {
            Source::Mesh => "mesh",
            Source::Cache => "cache",
            Source::Upstream => "upstream",
            Source::Error => "error",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const SLOTS: usize = QTYPE_LABELS * RCODE_LABELS * Source::ALL.len();

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueryLabels {
    qtype: &'static str,
    rcode: &'static str,
    source: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    result: &'static str,
}

fn upstream_histogram() -> Histogram {
    // 100 µs to about 3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

#[derive(Debug)]
struct Inner {
    queries: Family<QueryLabels, Counter>,
    slots: Vec<OnceLock<Counter>>,
    cache_hits: Counter,
    cache_misses: Counter,
    deduplicated: Counter,
    upstream: Family<UpstreamLabels, Histogram, fn() -> Histogram>,
}

/// The DNS proxy's metrics. Cloning shares them.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Fresh metrics, not yet in any registry.
    pub fn new() -> Metrics {
        Metrics {
            inner: Arc::new(Inner {
                queries: Family::default(),
                slots: (0..SLOTS).map(|_| OnceLock::new()).collect(),
                cache_hits: Counter::default(),
                cache_misses: Counter::default(),
                deduplicated: Counter::default(),
                upstream: Family::new_with_constructor(upstream_histogram as fn() -> Histogram),
            }),
        }
    }

    /// Adds every metric to `registry` under its own name (`queries`, `cache_hits`,
    /// `cache_misses`, `cache_deduplicated`, `upstream_duration_seconds`); give it a registry
    /// with the component's prefix.
    pub fn register(&self, registry: &mut Registry) {
        let inner = &self.inner;
        registry.register(
            "queries",
            "DNS questions answered, by question type, response code and source",
            inner.queries.clone(),
        );
        registry.register(
            "cache_hits",
            "Forwarded questions answered from the reply cache",
            inner.cache_hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Cacheable forwarded questions not in the reply cache",
            inner.cache_misses.clone(),
        );
        registry.register(
            "cache_deduplicated",
            "Forwarded questions that waited for an identical one already in flight upstream",
            inner.deduplicated.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Time to get a reply (or give up) from the upstream resolvers",
            inner.upstream.clone(),
        );
    }

    /// Counts one question of type `qtype` (`None` when unreadable) answered with `rcode`
    /// (`None`: dropped without an answer) by `source`.
    pub fn query(&self, qtype: Option<u16>, rcode: Option<u16>, source: Source) {
        let qtype_index = qtype
            .and_then(|t| QTYPES.iter().position(|(code, _)| *code == t))
            .unwrap_or(QTYPES.len());
        let rcode_index = match rcode {
            None => RCODE_DROPPED,
            Some(code) => usize::from(code).min(RCODE_OTHER),
        };
        let slot = (qtype_index * RCODE_LABELS + rcode_index) * Source::ALL.len() + source.index();
        let Some(cell) = self.inner.slots.get(slot) else {
            return;
        };
        cell.get_or_init(|| {
            let labels = QueryLabels {
                qtype: QTYPES.get(qtype_index).map_or("other", |(_, name)| name),
                rcode: RCODES.get(rcode_index).copied().unwrap_or(
                    if rcode_index == RCODE_DROPPED {
                        "dropped"
                    } else {
                        "other"
                    },
                ),
                source: source.label(),
            };
            self.inner.queries.get_or_create(&labels).clone()
        })
        .inc();
    }

    /// Counts a cache hit.
    pub fn cache_hit(&self) {
        self.inner.cache_hits.inc();
    }

    /// Counts a cache miss.
    pub fn cache_miss(&self) {
        self.inner.cache_misses.inc();
    }

    /// Counts a question that waited for an identical one in flight.
    pub fn deduplicated(&self) {
        self.inner.deduplicated.inc();
    }

    /// Records how long an upstream exchange took and whether it got a reply.
    pub fn upstream(&self, elapsed: Duration, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.inner
            .upstream
            .get_or_create(&UpstreamLabels { result })
            .observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    fn exposition(metrics: &Metrics) -> String {
        let mut registry = Registry::with_prefix("isthmus_dns");
        metrics.register(&mut registry);
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn queries_are_counted_by_type_result_and_source() {
        let metrics = Metrics::new();
        metrics.query(Some(1), Some(0), Source::Mesh);
        metrics.query(Some(1), Some(0), Source::Mesh);
        metrics.query(Some(28), Some(3), Source::Cache);
        metrics.query(Some(999), Some(2), Source::Upstream);
        metrics.query(None, None, Source::Error);
        metrics.query(Some(1), Some(11), Source::Upstream);
        let text = exposition(&metrics);
        for line in [
            r#"isthmus_dns_queries_total{qtype="A",rcode="NOERROR",source="mesh"} 2"#,
            r#"isthmus_dns_queries_total{qtype="AAAA",rcode="NXDOMAIN",source="cache"} 1"#,
            r#"isthmus_dns_queries_total{qtype="other",rcode="SERVFAIL",source="upstream"} 1"#,
            r#"isthmus_dns_queries_total{qtype="other",rcode="dropped",source="error"} 1"#,
            r#"isthmus_dns_queries_total{qtype="A",rcode="other",source="upstream"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn cache_and_upstream_metrics_are_exposed() {
        let metrics = Metrics::new();
        metrics.cache_hit();
        metrics.cache_hit();
        metrics.cache_miss();
        metrics.deduplicated();
        metrics.upstream(Duration::from_micros(300), true);
        let text = exposition(&metrics);
        assert!(text.contains("isthmus_dns_cache_hits_total 2"), "{text}");
        assert!(text.contains("isthmus_dns_cache_misses_total 1"), "{text}");
        assert!(
            text.contains("isthmus_dns_cache_deduplicated_total 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"isthmus_dns_upstream_duration_seconds_count{result="ok"} 1"#),
            "{text}"
        );
    }
}
