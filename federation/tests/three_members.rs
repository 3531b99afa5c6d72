//! A three-member federation in one process over real gRPC: election, replication of puts
//! and deletes from any member, watches, leader loss, and a member's behaviour on bad input.

mod support;

use std::time::Duration;

use isthmus_federation::{Role, StoreError, WatchEvent};
use support::*;

#[tokio::test]
async fn three_members_elect_exactly_one_leader() {
    let stores = start_federation(3).await;
    let leader = agreed_leader(&stores).await;
    let leaders = stores
        .values()
        .filter(|s| s.status().role == Role::Leader)
        .count();
    assert_eq!(leaders, 1);
    let term = stores[&leader].status().term;
    assert!(term >= 1, "leader term {term}");
    for (id, store) in &stores {
        assert_eq!(store.status().id, *id);
    }
    shutdown_all(stores).await;
}

#[tokio::test]
async fn put_on_a_follower_is_visible_on_every_member() {
    let stores = start_federation(3).await;
    let leader = agreed_leader(&stores).await;
    let follower = stores
        .iter()
        .find(|(&id, _)| id != leader)
        .map(|(_, s)| s.clone())
        .expect("a follower");

    let revision = follower
        .put("c/east", b"region=eu".to_vec())
        .await
        .expect("put on follower");

    // The proposer has applied it when put returns.
    assert!(*follower.revision().borrow() >= revision);
    let record = follower.get("c/east").expect("applied on proposer");
    assert_eq!(record.value, b"region=eu");
    assert_eq!(record.revision, revision);

    visible_everywhere(&stores, "c/east", b"region=eu").await;
    for store in stores.values() {
        assert_eq!(store.get("c/east").map(|r| r.revision), Some(revision));
    }
    shutdown_all(stores).await;
}

#[tokio::test]
async fn writes_made_before_any_leader_exists_succeed_once_one_is_elected() {
    let stores = start_federation(3).await;
    // No waiting for the election: the proposal is retried until a leader exists.
    let revision = stores[&2]
        .put("c/early", b"1".to_vec())
        .await
        .expect("put before election");
    assert!(revision >= 1);
    visible_everywhere(&stores, "c/early", b"1").await;
    shutdown_all(stores).await;
}

#[tokio::test]
async fn list_returns_the_prefix_sorted_and_revisions_grow_with_each_write() {
    let stores = start_federation(3).await;
    agreed_leader(&stores).await;
    let store = &stores[&3];
    let r1 = store.put("e/ns/b/east", b"b".to_vec()).await.expect("put");
    let r2 = store.put("e/ns/a/east", b"a".to_vec()).await.expect("put");
    let r3 = store.put("p/x", b"p".to_vec()).await.expect("put");
    assert!(r1 < r2 && r2 < r3, "revisions {r1} {r2} {r3}");
    visible_everywhere(&stores, "p/x", b"p").await;
    for store in stores.values() {
        let listed: Vec<(String, u64)> = store
            .list("e/")
            .into_iter()
            .map(|(k, r)| (k, r.revision))
            .collect();
        assert_eq!(
            listed,
            vec![
                ("e/ns/a/east".to_string(), r2),
                ("e/ns/b/east".to_string(), r1)
            ]
        );
    }
    shutdown_all(stores).await;
}

#[tokio::test]
async fn delete_removes_the_key_on_every_member() {
    let stores = start_federation(3).await;
    agreed_leader(&stores).await;
    let put_revision = stores[&1]
        .put("e/ns/svc/east", b"ports".to_vec())
        .await
        .expect("put");
    visible_everywhere(&stores, "e/ns/svc/east", b"ports").await;

    let delete_revision = stores[&2].delete("e/ns/svc/east").await.expect("delete");
    assert!(delete_revision > put_revision);
    eventually("the key to be gone everywhere", || async {
        stores
            .values()
            .all(|s| s.get("e/ns/svc/east").is_none())
            .then_some(())
    })
    .await;

    // Deleting a missing key succeeds and changes nothing.
    stores[&3]
        .delete("e/ns/svc/east")
        .await
        .expect("delete of a missing key");
    shutdown_all(stores).await;
}

#[tokio::test]
async fn revision_watch_and_change_broadcast_fire_on_every_member() {
    let stores = start_federation(3).await;
    agreed_leader(&stores).await;
    let mut revisions: Vec<_> = stores.values().map(|s| s.revision()).collect();
    let mut events: Vec<_> = stores.values().map(|s| s.subscribe()).collect();

    let put_revision = stores[&1]
        .put("p/route/ns/r", b"v1".to_vec())
        .await
        .expect("put");
    let delete_revision = stores[&1].delete("p/route/ns/r").await.expect("delete");

    for revision in &mut revisions {
        tokio::time::timeout(
            DEADLINE,
            revision.wait_for(|applied| *applied >= delete_revision),
        )
        .await
        .expect("revision watch reached the delete in time")
        .expect("revision watch open");
    }
    for receiver in &mut events {
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let event = tokio::time::timeout(DEADLINE, receiver.recv())
                .await
                .expect("event in time")
                .expect("broadcast open");
            if event.key() == "p/route/ns/r" {
                seen.push(event);
            }
        }
        assert_eq!(
            seen,
            vec![
                WatchEvent::Put {
                    key: "p/route/ns/r".to_string(),
                    value: b"v1".to_vec(),
                    revision: put_revision,
                },
                WatchEvent::Delete {
                    key: "p/route/ns/r".to_string(),
                    revision: delete_revision,
                },
            ]
        );
    }
    shutdown_all(stores).await;
}

#[tokio::test]
async fn remaining_members_elect_a_new_leader_and_accept_writes_after_the_leader_stops() {
    let mut stores = start_federation(3).await;
    let old_leader = agreed_leader(&stores).await;
    stores[&old_leader]
        .put("c/before", b"1".to_vec())
        .await
        .expect("put before failover");
    visible_everywhere(&stores, "c/before", b"1").await;
    let old_term = stores[&old_leader].status().term;

    let stopped = stores.remove(&old_leader).expect("leader handle");
    stopped.shutdown().await;

    // A few election timeouts: 250–500ms each with the test timing.
    let failover_started = tokio::time::Instant::now();
    let new_leader = agreed_leader(&stores).await;
    assert_ne!(new_leader, old_leader);
    assert!(stores[&new_leader].status().term > old_term);

    let survivor = stores
        .values()
        .find(|s| s.status().role != Role::Leader)
        .expect("a follower")
        .clone();
    survivor
        .put("c/after", b"2".to_vec())
        .await
        .expect("put after failover");
    let failover = failover_started.elapsed();
    assert!(
        failover < support::TICK * (support::ELECTION_TICKS as u32) * 12,
        "failover took {failover:?}"
    );
    visible_everywhere(&stores, "c/after", b"2").await;
    visible_everywhere(&stores, "c/before", b"1").await;
    shutdown_all(stores).await;
}

#[tokio::test]
async fn write_without_a_quorum_times_out() {
    let mut stores = start_federation_with(3, |id, peers| isthmus_federation::StoreOptions {
        proposal_timeout: Duration::from_millis(1500),
        ..options(id, peers)
    })
    .await;
    agreed_leader(&stores).await;
    for id in [2, 3] {
        stores.remove(&id).expect("member").shutdown().await;
    }
    let lonely = stores.remove(&1).expect("member 1");
    let result = lonely.put("c/lost", b"x".to_vec()).await;
    assert!(
        matches!(result, Err(StoreError::ProposalTimeout { .. })),
        "{result:?}"
    );
    assert!(lonely.get("c/lost").is_none());
    lonely.shutdown().await;
}

#[tokio::test]
async fn writes_after_shutdown_fail_with_stopped_and_the_peer_port_is_closed() {
    let stores = start_federation(3).await;
    agreed_leader(&stores).await;
    let handle = stores[&1].clone();
    let addr = handle.peer_addr();
    let mut stores = stores;
    stores.remove(&1).expect("member 1").shutdown().await;

    assert!(matches!(
        handle.put("c/x", b"x".to_vec()).await,
        Err(StoreError::Stopped)
    ));
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "peer port {addr} still accepts connections"
    );
    shutdown_all(stores).await;
}

#[tokio::test]
async fn empty_key_is_refused_before_anything_is_proposed() {
    let stores = start_federation(3).await;
    let result = stores[&1].put("", b"x".to_vec()).await;
    assert!(
        matches!(result, Err(StoreError::InvalidKey { .. })),
        "{result:?}"
    );
    shutdown_all(stores).await;
}

#[tokio::test]
async fn options_that_raft_cannot_run_are_refused_at_start() {
    init_tracing();
    let binding = isthmus_federation::bind("127.0.0.1:0".parse().expect("address"))
        .await
        .expect("bind");
    let peers = [(1, binding.local_addr())].into_iter().collect();
    let bad = isthmus_federation::StoreOptions {
        election_ticks: 2,
        heartbeat_ticks: 2,
        ..isthmus_federation::StoreOptions::new(1, peers)
    };
    let result = binding.start(bad).await;
    assert!(
        matches!(
            result,
            Err(StoreError::InvalidOptions {
                field: "election_ticks",
                ..
            })
        ),
        "{:?}",
        result.err()
    );

    let binding = isthmus_federation::bind("127.0.0.1:0".parse().expect("address"))
        .await
        .expect("bind");
    let peers = [(2, binding.local_addr())].into_iter().collect();
    let result = binding
        .start(isthmus_federation::StoreOptions::new(1, peers))
        .await;
    assert!(
        matches!(
            result,
            Err(StoreError::InvalidOptions { field: "peers", .. })
        ),
        "{:?}",
        result.err()
    );
}
