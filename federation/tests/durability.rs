//! Durable members: acknowledged writes survive restarts (clean and crash-like), lagging
//! members catch up from snapshots, a torn final record is cut at start, and a damaged log
//! stops a member from starting.

mod support;

use std::time::Duration;

use isthmus_federation::{StoreError, StoreOptions};
use support::*;

fn snapshot_often(opts: StoreOptions) -> StoreOptions {
    StoreOptions {
        snapshot_every: 20,
        snapshot_keep: 5,
        ..opts
    }
}

fn no_change(opts: StoreOptions) -> StoreOptions {
    opts
}

#[tokio::test]
async fn acknowledged_writes_survive_a_restart_of_every_member() {
    let mut fed = DurableFederation::start(3, no_change).await;
    agreed_leader(&fed.stores).await;
    let mut written = Vec::new();
    for i in 0..30 {
        let key = format!("c/c{i}");
        let revision = fed.stores[&(1 + i % 3)]
            .put(&key, format!("v{i}").into_bytes())
            .await
            .expect("put");
        written.push((key, revision));
    }
    let stores = std::mem::take(&mut fed.stores);
    shutdown_all(stores).await;

    for id in 1..=3 {
        fed.restart(id)
            .await
            .expect("restart on the same directory");
    }
    agreed_leader(&fed.stores).await;
    for (i, (key, revision)) in written.iter().enumerate() {
        for store in fed.stores.values() {
            let record = store
                .get(key)
                .expect("acknowledged write present after restart");
            assert_eq!(record.revision, *revision);
            assert_eq!(record.value, format!("v{i}").into_bytes());
        }
    }
    let after = fed.stores[&2]
        .put("c/after", b"x".to_vec())
        .await
        .expect("writes work after the restart");
    assert!(after > written.last().map(|w| w.1).unwrap_or(0));
    fed.shutdown().await;
}

#[tokio::test]
async fn leader_dropped_without_shutdown_rejoins_from_disk_with_every_acknowledged_write() {
    let mut fed = DurableFederation::start(3, snapshot_often).await;
    let leader = agreed_leader(&fed.stores).await;
    for i in 0..25 {
        fed.stores[&leader]
            .put(&format!("e/before/{i}"), b"1".to_vec())
            .await
            .expect("put");
    }
    // Crash-like: no shutdown, the handle is simply dropped.
    drop(fed.stores.remove(&leader));
    let survivor = *fed.stores.keys().next().expect("a survivor");
    for i in 0..40 {
        fed.stores[&survivor]
            .put(&format!("e/during/{i}"), b"2".to_vec())
            .await
            .expect("majority keeps writing");
    }
    fed.restart(leader)
        .await
        .expect("restart the crashed member");
    eventually("the restarted member to hold every write", || async {
        let store = &fed.stores[&leader];
        (store.list("e/before/").len() == 25 && store.list("e/during/").len() == 40).then_some(())
    })
    .await;
    fed.shutdown().await;
}

#[tokio::test]
async fn member_down_during_many_writes_catches_up_from_a_snapshot() {
    let mut fed = DurableFederation::start(3, snapshot_often).await;
    let leader = agreed_leader(&fed.stores).await;
    let lagging = if leader == 3 { 2 } else { 3 };
    fed.stores[&leader]
        .put("c/first", b"1".to_vec())
        .await
        .expect("put");
    visible_everywhere(&fed.stores, "c/first", b"1").await;
    let left_at = fed.stores[&lagging].status().applied_index;
    fed.stores
        .remove(&lagging)
        .expect("member")
        .shutdown()
        .await;

    let writer = fed.stores[&leader].clone();
    let mut last = 0;
    for i in 0..200 {
        last = writer
            .put(&format!("e/ns/svc{i}/east"), vec![b'x'; 64])
            .await
            .expect("put while a member is down");
    }
    // The leader compacted its log well past where the lagging member stopped, so only a
    // snapshot can bring it back.
    let leader_snapshot = fed.stores[&leader].status().snapshot_index;
    assert!(
        leader_snapshot > left_at + 20,
        "leader snapshot at {leader_snapshot}, member left at {left_at}"
    );

    fed.restart(lagging).await.expect("restart");
    eventually("the lagging member to catch up", || async {
        (*fed.stores[&lagging].revision().borrow() >= last).then_some(())
    })
    .await;
    assert_eq!(fed.stores[&lagging].list("e/").len(), 200);
    assert_eq!(
        fed.stores[&lagging].list(""),
        fed.stores[&leader].list(""),
        "replicas differ after catching up"
    );
    fed.shutdown().await;
}

#[tokio::test]
async fn damaged_log_is_refused_at_start_naming_the_file_and_offset() {
    let mut fed = DurableFederation::start(3, no_change).await;
    agreed_leader(&fed.stores).await;
    fed.stores[&1].put("c/x", b"1".to_vec()).await.expect("put");
    visible_everywhere(&fed.stores, "c/x", b"1").await;
    fed.stores.remove(&3).expect("member").shutdown().await;

    let raft_dir = fed.dir(3).join("raft");
    let segment = std::fs::read_dir(&raft_dir)
        .expect("list")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .expect("segment");
    // A flipped bit in the first record (the checkpoint), which a crash cannot cause.
    let mut bytes = std::fs::read(&segment).expect("read");
    let damaged = bytes.len();
    bytes[8 + 8 + 2] ^= 0x10;
    std::fs::write(&segment, &bytes).expect("write");

    match fed.restart(3).await {
        Err(StoreError::CorruptLog { file, offset, .. }) => {
            assert_eq!(file, segment);
            assert_eq!(offset, 8);
            let message = StoreError::CorruptLog {
                file: file.clone(),
                offset,
                reason: "x".into(),
            }
            .to_string();
            assert!(message.contains(&segment.display().to_string()));
        }
        Err(other) => panic!("expected CorruptLog, got {other}"),
        Ok(()) => panic!("a damaged log must not start"),
    }
    // The file is untouched: nothing was silently reset.
    assert_eq!(std::fs::read(&segment).expect("read"), bytes);
    assert_eq!(bytes.len(), damaged);
    let _ = Duration::ZERO;
    fed.shutdown().await;
}

#[tokio::test]
async fn a_torn_final_record_is_cut_at_start_and_the_member_catches_up() {
    let mut fed = DurableFederation::start(3, no_change).await;
    agreed_leader(&fed.stores).await;
    for i in 0..5 {
        fed.stores[&1]
            .put(&format!("c/t{i}"), b"1".to_vec())
            .await
            .expect("put");
    }
    visible_everywhere(&fed.stores, "c/t4", b"1").await;
    fed.stores.remove(&3).expect("member").shutdown().await;

    // A crash in the middle of writing the last record: its bytes stop short.
    let segment = std::fs::read_dir(fed.dir(3).join("raft"))
        .expect("list")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .expect("segment");
    let len = std::fs::metadata(&segment).expect("meta").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .and_then(|f| f.set_len(len - 3))
        .expect("truncate");

    fed.restart(3).await.expect("a torn tail is cut, not fatal");
    // What the cut took, the leader sends again; new writes reach it too.
    for i in 0..5 {
        visible_everywhere(&fed.stores, &format!("c/t{i}"), b"1").await;
    }
    fed.stores[&2]
        .put("c/after", b"2".to_vec())
        .await
        .expect("put");
    visible_everywhere(&fed.stores, "c/after", b"2").await;
    fed.shutdown().await;
}
