//! The store API beyond put/get: compare-and-set, linearizable reads, watches from a
//! revision (across reconnects, and past compaction), and leases.

mod support;

use std::time::Duration;

use isthmus_federation::{Conflict, StoreError, StoreOptions, WatchEvent};
use support::*;

#[tokio::test]
async fn compare_and_set_succeeds_only_on_the_revision_the_caller_saw() {
    let stores = start_federation(3).await;
    agreed_leader(&stores).await;
    let (a, b) = (&stores[&1], &stores[&2]);

    let created = a
        .compare_and_set("p/route/ns/r", None, b"v1".to_vec())
        .await
        .expect("cas")
        .expect("created when absent");
    let again = b
        .compare_and_set("p/route/ns/r", None, b"other".to_vec())
        .await
        .expect("cas");
    assert_eq!(
        again,
        Err(Conflict {
            current_revision: Some(created)
        })
    );
    let updated = b
        .compare_and_set("p/route/ns/r", Some(created), b"v2".to_vec())
        .await
        .expect("cas")
        .expect("updated on the seen revision");
    let stale = a
        .compare_and_set("p/route/ns/r", Some(created), b"v3".to_vec())
        .await
        .expect("cas");
    assert_eq!(
        stale,
        Err(Conflict {
            current_revision: Some(updated)
        })
    );
    let missing = a
        .compare_and_set("p/none", Some(3), b"x".to_vec())
        .await
        .expect("cas");
    assert_eq!(
        missing,
        Err(Conflict {
            current_revision: None
        })
    );
    visible_everywhere(&stores, "p/route/ns/r", b"v2").await;
    shutdown_all(stores).await;
}

#[tokio::test]
async fn linearizable_read_on_a_follower_sees_a_write_just_made_elsewhere() {
    let stores = start_federation(3).await;
    let leader = agreed_leader(&stores).await;
    let followers: Vec<u64> = stores.keys().copied().filter(|&id| id != leader).collect();
    for i in 0..20 {
        let value = format!("v{i}").into_bytes();
        let revision = stores[&followers[0]]
            .put("c/east", value.clone())
            .await
            .expect("put");
        let record = stores[&followers[1]]
            .get_linearizable("c/east")
            .await
            .expect("linearizable read")
            .expect("present");
        assert!(record.revision >= revision);
        assert_eq!(record.value, value);
    }
    let listed = stores[&leader]
        .list_linearizable("c/")
        .await
        .expect("linearizable list");
    assert_eq!(listed.len(), 1);
    shutdown_all(stores).await;
}

#[tokio::test]
async fn linearizable_read_without_a_quorum_fails_with_a_clear_error() {
    let mut stores = start_federation_with(3, |id, peers| StoreOptions {
        proposal_timeout: Duration::from_millis(1200),
        ..options(id, peers)
    })
    .await;
    agreed_leader(&stores).await;
    for id in [2, 3] {
        stores.remove(&id).expect("member").shutdown().await;
    }
    let lonely = stores.remove(&1).expect("member");
    let result = lonely.get_linearizable("c/x").await;
    assert!(
        matches!(result, Err(StoreError::ReadTimeout { .. })),
        "{result:?}"
    );
    // The local read still answers (static stability).
    assert!(lonely.get("c/x").is_none());
    lonely.shutdown().await;
}

async fn next(watch: &mut isthmus_federation::Watch) -> WatchEvent {
    tokio::time::timeout(DEADLINE, watch.next())
        .await
        .expect("event in time")
        .expect("watch open")
}

#[tokio::test]
async fn watch_from_a_revision_replays_history_and_loses_nothing_across_a_reconnect() {
    let stores = start_federation(3).await;
    agreed_leader(&stores).await;
    let writer = &stores[&1];
    let first = writer.put("e/a", b"1".to_vec()).await.expect("put");
    writer.put("other/x", b"-".to_vec()).await.expect("put");
    let second = writer.put("e/b", b"2".to_vec()).await.expect("put");

    // A watcher on another member, starting in the past.
    let reader = &stores[&3];
    eventually("member 3 to apply", || async {
        (*reader.revision().borrow() >= second).then_some(())
    })
    .await;
    let mut watch = reader.watch("e/", first).expect("watch");
    assert_eq!(next(&mut watch).await.revision(), first);
    assert_eq!(next(&mut watch).await.revision(), second);

    // The client goes away; writes happen; it reconnects from where it was.
    let resume = watch.next_revision();
    drop(watch);
    let third = writer.delete("e/a").await.expect("delete");
    let fourth = writer.put("e/c", b"3".to_vec()).await.expect("put");
    let mut watch = reader.watch("e/", resume).expect("rewatch");
    assert_eq!(
        next(&mut watch).await,
        WatchEvent::Delete {
            key: "e/a".to_string(),
            revision: third
        }
    );
    assert_eq!(next(&mut watch).await.revision(), fourth);
    // And then live.
    let fifth = writer.put("e/d", b"4".to_vec()).await.expect("put");
    assert_eq!(next(&mut watch).await.revision(), fifth);
    shutdown_all(stores).await;
}

#[tokio::test]
async fn watch_older_than_the_snapshot_of_a_restarted_member_is_told_to_relist() {
    let mut fed = DurableFederation::start(3, |o| StoreOptions {
        snapshot_every: 10,
        snapshot_keep: 2,
        ..o
    })
    .await;
    agreed_leader(&fed.stores).await;
    for i in 0..30 {
        fed.stores[&1]
            .put(&format!("e/{i}"), b"v".to_vec())
            .await
            .expect("put");
    }
    let member = fed.stores.remove(&2).expect("member");
    member.shutdown().await;
    fed.restart(2).await.expect("restart");
    match fed.stores[&2].watch("e/", 2) {
        Err(StoreError::Compacted { requested, oldest }) => {
            assert_eq!(requested, 2);
            assert!(oldest > 2);
            // Watching from the oldest revision it names works.
            fed.stores[&2]
                .watch("e/", oldest)
                .expect("watch from the oldest revision");
        }
        Err(other) => panic!("expected Compacted, got {other}"),
        Ok(_) => panic!("expected Compacted"),
    }
    fed.shutdown().await;
}

#[tokio::test]
async fn lease_not_renewed_is_marked_expired_everywhere_and_renewal_clears_it() {
    let stores = start_federation(3).await;
    agreed_leader(&stores).await;
    let owner = &stores[&2];
    let revision = owner
        .put_with_lease("e/ns/svc/east", b"e".to_vec(), Duration::from_millis(300))
        .await
        .expect("put with lease");
    let lease = owner
        .get("e/ns/svc/east")
        .and_then(|r| r.lease)
        .expect("lease visible");
    assert!(!lease.expired);

    eventually("every member to see the lease expired", || async {
        stores
            .values()
            .all(|s| {
                s.get("e/ns/svc/east")
                    .and_then(|r| r.lease)
                    .is_some_and(|l| l.expired)
            })
            .then_some(())
    })
    .await;
    let record = owner.get("e/ns/svc/east").expect("record kept");
    assert_eq!(record.revision, revision, "expiry leaves the value alone");

    owner.renew("e/ns/svc/east").await.expect("renew");
    let lease = owner
        .get("e/ns/svc/east")
        .and_then(|r| r.lease)
        .expect("lease");
    assert!(!lease.expired, "renewal clears the flag");

    let missing = owner.renew("e/none").await;
    assert!(
        matches!(missing, Err(StoreError::NoLease { .. })),
        "{missing:?}"
    );
    shutdown_all(stores).await;
}

#[tokio::test]
async fn lease_renewed_in_time_never_expires() {
    let stores = start_federation(3).await;
    agreed_leader(&stores).await;
    let owner = &stores[&1];
    owner
        .put_with_lease("c/east", b"e".to_vec(), Duration::from_millis(600))
        .await
        .expect("put with lease");
    let started = tokio::time::Instant::now();
    // Renew at a third of the lease for a few lease periods.
    let mut renewals = tokio::time::interval(Duration::from_millis(200));
    while started.elapsed() < Duration::from_millis(1800) {
        renewals.tick().await;
        owner.renew("c/east").await.expect("renew");
        for store in stores.values() {
            let expired = store
                .get("c/east")
                .and_then(|r| r.lease)
                .is_some_and(|l| l.expired);
            assert!(!expired, "lease expired although renewed");
        }
    }
    shutdown_all(stores).await;
}
