//! Tunnels to a service with several endpoints in the remote cluster spread over all of them:
//! the inbound gateway picks the least-loaded endpoint, round-robin among equals.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use support::*;

/// Each endpoint's share must be within ±10% of an even split.
fn assert_even(counts: &[usize], total: usize) {
    let even = total as f64 / counts.len() as f64;
    for (i, &n) in counts.iter().enumerate() {
        let off = (n as f64 - even).abs() / even;
        assert!(
            off <= 0.10,
            "endpoint {i} got {n} of {total} tunnels ({counts:?}): {:.0}% off an even split",
            off * 100.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_within_ten_percent_over_three_remote_endpoints() {
    let mut c = TwoClusters::start().await;
    let second = echo_server().await;
    let third = echo_server().await;
    c.publish(vec![service(
        "ratings",
        true,
        vec![
            endpoint(c.echo.addr, "v1", true),
            endpoint(second.addr, "v1", true),
            endpoint(third.addr, "v1", true),
        ],
    )]);
    let local = c.east.handle.local_addr();
    let counts = || [&c.echo, &second, &third].map(|e| e.accepted.load(Ordering::SeqCst));

    // One caller, one request after another (each tunnel closed before the next opens).
    const SEQUENTIAL: usize = 300;
    for i in 0..SEQUENTIAL {
        let (mut tcp, resp) = open(local, &request("ratings.default", "west")).await;
        assert!(resp.is_ok(), "request {i}: {resp:?}");
        assert_eq!(echo_round_trip(&mut tcp, b"ping").await, b"ping");
    }
    assert_even(&counts(), SEQUENTIAL);

    // Many callers at once, 24 tunnels in flight at any time.
    const CONCURRENT: usize = 600;
    let before = counts();
    let gate = Arc::new(tokio::sync::Semaphore::new(24));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CONCURRENT {
        let permit = gate.clone().acquire_owned().await.unwrap();
        tasks.spawn(async move {
            let (mut tcp, resp) = open(local, &request("ratings.default", "west")).await;
            assert!(resp.is_ok(), "request {i}: {resp:?}");
            let data = vec![(i % 251) as u8; 4096];
            assert_eq!(echo_round_trip(&mut tcp, &data).await, data);
            drop(permit);
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let after = counts();
    let delta: Vec<usize> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    assert_even(&delta, CONCURRENT);
}
