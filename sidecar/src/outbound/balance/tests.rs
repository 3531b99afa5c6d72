use super::*;

fn local(n: u16) -> Upstream {
    Upstream::Local(SocketAddr::from(([127, 0, 0, 1], n)))
}

fn outlier(n: u32) -> OutlierSettings {
    OutlierSettings {
        consecutive_5xx: Some(n),
        consecutive_gateway: None,
        base_ejection: Duration::from_secs(30),
        max_ejection_percent: 100,
    }
}

#[test]
fn round_robin_visits_every_upstream_evenly() {
    let mut b = Balancer::default();
    let pool = [local(1), local(2), local(3)];
    let now = Instant::now();
    let mut counts = HashMap::new();
    for _ in 0..300 {
        *counts
            .entry(
                b.pick(&pool, &Algorithm::RoundRobin, now, 0.5, None)
                    .unwrap(),
            )
            .or_insert(0) += 1;
    }
    assert!(counts.values().all(|c| *c == 100), "{counts:?}");
}

#[test]
fn least_request_prefers_the_idle_upstream() {
    let mut b = Balancer::default();
    let pool = [local(1), local(2)];
    for _ in 0..5 {
        b.started(&local(1));
    }
    let now = Instant::now();
    for i in 0..20 {
        assert_eq!(
            b.pick(
                &pool,
                &Algorithm::LeastRequest,
                now,
                (i as f64) / 20.0,
                None
            ),
            Some(local(2))
        );
    }
}

#[test]
fn consistent_hash_keeps_a_key_on_one_upstream() {
    let mut b = Balancer::default();
    let pool = [local(1), local(2), local(3), local(4)];
    let now = Instant::now();
    let first = b.pick(&pool, &Algorithm::ConsistentHash, now, 0.1, Some("user-42"));
    for i in 0..50 {
        assert_eq!(
            b.pick(
                &pool,
                &Algorithm::ConsistentHash,
                now,
                i as f64 / 50.0,
                Some("user-42")
            ),
            first
        );
    }
    let spread: std::collections::BTreeSet<_> = (0..200)
        .filter_map(|i| {
            b.pick(
                &pool,
                &Algorithm::ConsistentHash,
                now,
                0.0,
                Some(&format!("user-{i}")),
            )
        })
        .collect();
    assert_eq!(spread.len(), 4);
}

#[test]
fn consecutive_errors_eject_and_the_upstream_returns_after_the_ejection_time() {
    let mut b = Balancer::default();
    let pool = [local(1), local(2)];
    let t0 = Instant::now();
    for _ in 0..3 {
        b.started(&local(1));
        b.finished(&local(1), Outcome::Status(503), Some(&outlier(3)), 2, t0);
    }
    assert!(b.is_ejected(&local(1), t0));
    for _ in 0..10 {
        assert_eq!(
            b.pick(&pool, &Algorithm::RoundRobin, t0, 0.0, None),
            Some(local(2))
        );
    }
    let later = t0 + Duration::from_secs(31);
    assert!(!b.is_ejected(&local(1), later));
    // A second ejection lasts twice as long.
    for _ in 0..3 {
        b.finished(&local(1), Outcome::Failed, Some(&outlier(3)), 2, later);
    }
    assert!(b.is_ejected(&local(1), later + Duration::from_secs(59)));
    assert!(!b.is_ejected(&local(1), later + Duration::from_secs(61)));
}

#[test]
fn a_success_resets_the_error_streak() {
    let mut b = Balancer::default();
    let t0 = Instant::now();
    for status in [500, 500, 200, 500, 500] {
        b.finished(&local(1), Outcome::Status(status), Some(&outlier(3)), 1, t0);
    }
    assert!(!b.is_ejected(&local(1), t0));
}

#[test]
fn ejection_is_capped_and_all_ejected_means_all_used() {
    let mut b = Balancer::default();
    let pool = [local(1), local(2)];
    let t0 = Instant::now();
    let capped = OutlierSettings {
        max_ejection_percent: 10,
        ..outlier(1)
    };
    b.finished(&local(1), Outcome::Status(500), Some(&capped), 2, t0);
    b.finished(&local(2), Outcome::Status(500), Some(&capped), 2, t0);
    // 10% of 2 rounds to 0, but one ejection is always allowed; the second is not.
    assert!(b.is_ejected(&local(1), t0));
    assert!(!b.is_ejected(&local(2), t0));
    let mut all = Balancer::default();
    for u in &pool {
        all.finished(u, Outcome::Status(500), Some(&outlier(1)), 2, t0);
    }
    assert!(all
        .pick(&pool, &Algorithm::RoundRobin, t0, 0.0, None)
        .is_some());
}

#[test]
fn limits_follow_the_connection_pool_settings() {
    use isthmus_core::policy::networking::{HttpSettings, TcpSettings};
    let pool = ConnectionPoolSettings {
        tcp: Some(TcpSettings {
            max_connections: Some(1),
            connect_timeout: None,
        }),
        http: Some(HttpSettings {
            http1_max_pending_requests: Some(1),
            http2_max_requests: Some(10),
            max_requests_per_connection: None,
        }),
    };
    assert_eq!(
        Limits::from_policy(Some(&pool)),
        Limits {
            max_requests: 1,
            max_pending: 1
        }
    );
    assert_eq!(Limits::from_policy(None).max_requests, u32::MAX);
}

#[test]
fn algorithms_come_from_the_destination_rule() {
    let lb = |s: &str| LoadBalancerSettings {
        simple: Some(s.into()),
        ..Default::default()
    };
    assert_eq!(
        Algorithm::from_settings(Some(&lb("RANDOM"))),
        Algorithm::Random
    );
    assert_eq!(
        Algorithm::from_settings(Some(&lb("LEAST_REQUEST"))),
        Algorithm::LeastRequest
    );
    assert_eq!(Algorithm::from_settings(None), Algorithm::RoundRobin);
}
