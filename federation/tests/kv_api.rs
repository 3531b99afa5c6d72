//! The `Kv` gRPC client API, through [`KvClient`], against every member of a federation.

mod support;

use isthmus_federation::{Conflict, KvClient, StoreError, WatchEvent};
use support::*;

async fn client(store: &isthmus_federation::Store) -> KvClient {
    KvClient::connect(store.peer_addr()).await.expect("connect")
}

#[tokio::test]
async fn writes_through_any_member_and_reads_from_any_other() {
    let stores = start_federation(3).await;
    let leader = agreed_leader(&stores).await;
    let follower = stores
        .keys()
        .copied()
        .find(|&id| id != leader)
        .expect("follower");
    let other = stores
        .keys()
        .copied()
        .find(|&id| id != leader && id != follower)
        .expect("another follower");
    let mut writer = client(&stores[&follower]).await;
    let mut reader = client(&stores[&other]).await;

    let revision = writer
        .put("c/east", b"e".to_vec())
        .await
        .expect("put on a follower is forwarded");
    let record = reader
        .get("c/east", true)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(
        (record.value.as_slice(), record.revision),
        (&b"e"[..], revision)
    );

    let conflict = reader
        .compare_and_set("c/east", Some(revision - 1), b"x".to_vec())
        .await
        .expect("cas");
    assert_eq!(
        conflict,
        Err(Conflict {
            current_revision: Some(revision)
        })
    );
    let updated = reader
        .compare_and_set("c/east", Some(revision), b"e2".to_vec())
        .await
        .expect("cas")
        .expect("applied");
    writer.put("c/west", b"w".to_vec()).await.expect("put");
    let (list_revision, listed) = reader.list("c/", true).await.expect("list");
    assert!(list_revision > updated);
    let keys: Vec<&str> = listed.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["c/east", "c/west"]);
    let deleted = writer.delete("c/west").await.expect("delete");
    assert!(deleted > updated);
    assert!(reader.get("c/west", true).await.expect("get").is_none());

    let status = reader.status().await.expect("status");
    assert_eq!(status.id, other);
    assert_eq!(status.leader_id, Some(leader));
    assert_eq!(status.voters, vec![1, 2, 3]);
    assert_eq!(status.members.len(), 3);
    shutdown_all(stores).await;
}

#[tokio::test]
async fn watch_over_grpc_resumes_after_a_reconnect_and_old_revisions_are_refused() {
    let stores = start_federation(3).await;
    agreed_leader(&stores).await;
    let mut kv = client(&stores[&2]).await;
    let first = kv.put("e/a", b"1".to_vec()).await.expect("put");
    let mut watch = kv.watch("e/", first).await.expect("watch");
    let event = tokio::time::timeout(DEADLINE, watch.next())
        .await
        .expect("in time")
        .expect("ok")
        .expect("open");
    assert_eq!(event.revision(), first);
    let resume = watch.next_revision();
    drop(watch);

    let second = kv.put("e/b", b"2".to_vec()).await.expect("put");
    let mut watch = kv.watch("e/", resume).await.expect("rewatch");
    let event = tokio::time::timeout(DEADLINE, watch.next())
        .await
        .expect("in time")
        .expect("ok")
        .expect("open");
    assert_eq!(
        event,
        WatchEvent::Put {
            key: "e/b".to_string(),
            value: b"2".to_vec(),
            revision: second
        }
    );

    // Revision 1 is the bootstrap snapshot: nothing before it can be replayed.
    let refused = match kv.watch("e/", 1).await {
        Err(err) => err,
        Ok(_) => panic!("expected compacted"),
    };
    assert!(
        matches!(
            refused,
            StoreError::Compacted {
                requested: 1,
                oldest: 2
            }
        ),
        "{refused}"
    );
    shutdown_all(stores).await;
}

#[tokio::test]
async fn an_oversized_value_is_refused_naming_the_limit_and_nothing_changes() {
    let stores = start_federation(1).await;
    agreed_leader(&stores).await;
    let mut c = client(&stores[&1]).await;
    c.put("c/east", b"small".to_vec()).await.expect("put");
    let before = c.list("", true).await.expect("list");

    let too_big = vec![b'x'; isthmus_federation::MAX_VALUE_BYTES + 1];
    for refused in [
        c.put("c/east", too_big.clone()).await.map(|_| ()),
        c.compare_and_set("c/east", None, too_big.clone())
            .await
            .map(|_| ()),
    ] {
        let message = refused.expect_err("refused").to_string();
        assert!(
            message.contains("InvalidArgument")
                && message.contains(&isthmus_federation::MAX_VALUE_BYTES.to_string()),
            "{message}"
        );
    }
    // Exactly the limit is fine, on another key; the refused key is untouched.
    let limit = vec![b'y'; isthmus_federation::MAX_VALUE_BYTES];
    c.put("c/big", limit).await.expect("at the limit");
    let after = c.list("", true).await.expect("list");
    assert_eq!(
        after.1.iter().find(|(k, _)| k == "c/east"),
        before.1.iter().find(|(k, _)| k == "c/east")
    );
}
