//! A receiver that stops reading makes the sender wait, and the gateways' memory stays
//! bounded meanwhile. Alone in its test binary so that no other test moves the process's
//! resident memory.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_blocks_the_sender_and_gateway_memory_stays_bounded() {
    let mut c = TwoClusters::start().await;
    // An endpoint that accepts and never reads.
    let stalled = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stalled_addr = stalled.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = stalled.accept().await {
            held.push(tcp);
        }
    });
    c.publish(vec![service(
        "ratings",
        true,
        vec![endpoint(stalled_addr, "v1", true)],
    )]);
    let (mut tcp, resp) = open_to_sink(
        c.east.handle.local_addr(),
        &request("ratings.default", "west"),
    )
    .await;
    assert!(resp.is_ok(), "{resp:?}");

    let rss_before = rss_bytes();
    let chunk = vec![0xa5u8; MIB];
    let mut written = 0usize;
    let started = Instant::now();
    // Push up to 200 MiB; the sender must block long before that.
    let blocked = loop {
        assert!(
            written < 200 * MIB,
            "200 MiB went into a tunnel nobody reads: no backpressure"
        );
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "still writing after 8s ({} MiB)",
            written / MIB
        );
        match tokio::time::timeout(Duration::from_millis(500), tcp.write_all(&chunk)).await {
            Ok(Ok(())) => written += MIB,
            Ok(Err(e)) => panic!("the tunnel broke instead of pushing back: {e}"),
            Err(_) => break true,
        }
    };
    assert!(blocked);
    let grown = rss_bytes().saturating_sub(rss_before);
    eprintln!(
        "sender blocked after {} MiB; resident memory grew by {} MiB",
        written / MIB,
        grown / MIB as u64
    );
    assert!(
        grown < 64 * MIB as u64,
        "resident memory grew by {} MiB",
        grown / MIB as u64
    );
    // It stays blocked: nothing drains.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), tcp.write_all(&chunk))
            .await
            .is_err(),
        "the sender got going again though nothing reads"
    );
    holder.abort();
}
