//! Membership over three (and more) in-process members: adding learners and voters, join
//! tokens, removing followers and the leader, the five-voter cap and learner promotion.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use isthmus_core::identity::{self, OperatorId};
use isthmus_federation::{
    ClusterClaim, JoinApplication, Role, Store, StoreError, StoreOptions, Writer,
};
use support::*;

/// Starts member `id` as a joiner that knows how to reach the existing `stores`.
async fn start_joiner(id: u64, stores: &BTreeMap<u64, Store>) -> Store {
    start_signing_joiner(id, stores, None).await
}

/// Like [`start_joiner`], signing its entries with `signer` (its control plane's identity).
async fn start_signing_joiner(
    id: u64,
    stores: &BTreeMap<u64, Store>,
    signer: Option<std::sync::Arc<isthmus_core::tls::Identity>>,
) -> Store {
    let binding = isthmus_federation::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let mut peers: BTreeMap<u64, SocketAddr> =
        stores.iter().map(|(&i, s)| (i, s.peer_addr())).collect();
    peers.insert(id, binding.local_addr());
    binding
        .start(StoreOptions {
            join: true,
            signer,
            ..options(id, &peers)
        })
        .await
        .expect("start joiner")
}

async fn wait_config(stores: &BTreeMap<u64, Store>, voters: &[u64], learners: &[u64]) {
    eventually(
        &format!("every member to see voters {voters:?} learners {learners:?}"),
        || async {
            stores
                .values()
                .all(|s| {
                    let st = s.status();
                    let mut v = st.voters.clone();
                    let mut l = st.learners.clone();
                    v.sort_unstable();
                    l.sort_unstable();
                    v == voters && l == learners
                })
                .then_some(())
        },
    )
    .await
}

#[tokio::test]
async fn fourth_member_added_as_learner_catches_up_and_replicates() {
    let mut stores = start_federation(3).await;
    agreed_leader(&stores).await;
    stores[&1]
        .put("c/before", b"1".to_vec())
        .await
        .expect("put");
    let joiner = start_joiner(4, &stores).await;
    stores[&2]
        .add_member(4, joiner.peer_addr(), false)
        .await
        .expect("add learner");
    stores.insert(4, joiner);
    wait_config(&stores, &[1, 2, 3], &[4]).await;
    visible_everywhere(&stores, "c/before", b"1").await;
    stores[&3].put("c/after", b"2".to_vec()).await.expect("put");
    visible_everywhere(&stores, "c/after", b"2").await;
    assert!(stores[&4].status().is_learner());
    assert_eq!(stores[&4].members().len(), 4);
    // A learner forwards writes too.
    stores[&4]
        .put("c/from-learner", b"3".to_vec())
        .await
        .expect("put through the learner");
    visible_everywhere(&stores, "c/from-learner", b"3").await;
    shutdown_all(stores).await;
}

#[tokio::test]
async fn join_token_admits_one_member_once_and_expires() {
    let mut stores = start_federation(3).await;
    agreed_leader(&stores).await;
    let token = stores[&2]
        .mint_join_token(Duration::from_secs(60))
        .await
        .expect("mint");
    let joiner = start_joiner(4, &stores).await;
    let ca = isthmus_core::ca::CertificateAuthority::generate("north.local").expect("a CA");
    let joiner_addr = joiner.peer_addr();
    let application = |id, name: &str, trust_domain: &str, pem: &str| JoinApplication {
        id,
        peer_addr: joiner_addr,
        cluster: Some(ClusterClaim {
            name: name.into(),
            trust_domain: trust_domain.into(),
            ca_bundle_pem: pem.into(),
        }),
    };
    // Refused before the token is touched: a bundle that does not parse, a bad name.
    for (bad, field) in [
        (
            application(4, "north", "north.local", "not PEM"),
            "ca_bundle_pem",
        ),
        (
            application(4, "North!", "north.local", ca.cert_pem()),
            "cluster",
        ),
        (application(0, "north", "north.local", ca.cert_pem()), "id"),
    ] {
        let refused = stores[&1].join_with_token(&token, bad).await;
        assert!(
            matches!(&refused, Err(e @ StoreError::InvalidJoin { .. }) if e.to_string().starts_with(field)),
            "{refused:?}"
        );
    }
    stores[&1]
        .join_with_token(
            &token,
            application(4, "north", "north.local", ca.cert_pem()),
        )
        .await
        .expect("join with a fresh token");
    stores.insert(4, joiner);
    wait_config(&stores, &[1, 2, 3, 4], &[]).await;
    // The cluster is recorded with its trust domain, bundle and member id on every replica.
    let record = stores[&3]
        .get_linearizable("clusters/north")
        .await
        .expect("read");
    let record: isthmus_federation::ClusterRecord =
        serde_json::from_slice(&record.expect("clusters/north").value).expect("JSON");
    assert_eq!(
        (
            record.trust_domain.as_str(),
            record.member_id,
            record.ca_bundle_pem.as_str()
        ),
        ("north.local", Some(4), ca.cert_pem())
    );
    // A second claim on the trust domain is refused naming both clusters; its token stays.
    let second = stores[&2]
        .mint_join_token(Duration::from_secs(60))
        .await
        .expect("mint");
    let other = isthmus_core::ca::CertificateAuthority::generate("north.local").expect("a CA");
    let mut stolen = application(5, "south", "north.local", other.cert_pem());
    stolen.peer_addr = "127.0.0.1:1".parse().expect("addr");
    let refused = stores[&1].join_with_token(&second, stolen).await;
    let message = refused.expect_err("a second claim").to_string();
    assert!(
        message.contains("north.local") && message.contains("north") && message.contains("south"),
        "{message}"
    );
    stores[&1]
        .consume_join_token(&second)
        .await
        .expect("the token was kept");

    let reused = stores[&3].consume_join_token(&token).await;
    assert!(matches!(reused, Err(StoreError::Token(_))), "{reused:?}");
    // A validity of zero, or above the maximum, is refused naming the limit.
    for ttl in [Duration::ZERO, Duration::from_secs(25 * 3600)] {
        let refused = stores[&3].mint_join_token(ttl).await;
        assert!(
            matches!(&refused, Err(e @ StoreError::TokenTtl { .. }) if e.to_string().contains("24h")
                || e.to_string().contains("86400")),
            "{refused:?}"
        );
    }
    let expired = stores[&3]
        .mint_join_token(Duration::from_millis(1))
        .await
        .expect("mint");
    // The wall clock the token is checked against moves past its expiry (at most 1 ms after
    // the mint returned).
    let minted = isthmus_core::clock::unix_ms();
    while isthmus_core::clock::unix_ms() <= minted + 1 {
        tokio::task::yield_now().await;
    }
    let late = stores[&1].consume_join_token(&expired).await;
    assert!(matches!(late, Err(StoreError::Token(_))), "{late:?}");
    let forged = format!("{}.{}", &token[..16], "00".repeat(16));
    assert!(matches!(
        stores[&1].consume_join_token(&forged).await,
        Err(StoreError::Token(_))
    ));
    assert!(matches!(
        stores[&1].consume_join_token("garbage").await,
        Err(StoreError::Token(_))
    ));
    shutdown_all(stores).await;
}

#[tokio::test]
async fn removing_a_cluster_removes_what_it_owned_unless_it_holds_every_mesh_admin_grant() {
    let mut stores = start_federation(3).await;
    let token = stores[&1]
        .mint_join_token(Duration::from_secs(60))
        .await
        .expect("mint");
    let ca = isthmus_core::ca::CertificateAuthority::generate("north.local").expect("a CA");
    let joiner = start_signing_joiner(4, &stores, Some(control_identity(&ca))).await;
    stores[&1]
        .join_with_token(
            &token,
            JoinApplication {
                id: 4,
                peer_addr: joiner.peer_addr(),
                cluster: Some(ClusterClaim {
                    name: "north".into(),
                    trust_domain: "north.local".into(),
                    ca_bundle_pem: ca.cert_pem().into(),
                }),
            },
        )
        .await
        .expect("join");
    stores.insert(4, joiner);
    wait_config(&stores, &[1, 2, 3, 4], &[]).await;
    let north_owned = [
        "exports/default/ratings/north",
        "kubernetes-policies/north/virtualservice/default/reviews",
        "grants/mesh-admin/north.local/ann",
    ];
    let others = [
        "clusters/east",
        "exports/default/ratings/east",
        "kubernetes-policies/east/virtualservice/default/reviews",
        "policies/virtualservice/default/reviews",
    ];
    let east_ca = isthmus_core::ca::CertificateAuthority::generate("east.local").expect("a CA");
    // North's member writes its own records (and the first mesh-admin grant, of its own
    // trust domain); member 2, which no record binds, the records of the unbound east.
    for (writer, keys) in [(&stores[&4], &north_owned[..]), (&stores[&2], &others[..])] {
        for key in keys {
            let value = valid_record(key, east_ca.cert_pem());
            writer.put(key, value).await.expect("put");
        }
    }

    // Every mesh-admin grant is of north's trust domain: refused, nothing changes.
    let refused = stores[&1].remove_member(4).await;
    let message = refused.expect_err("the last mesh admins").to_string();
    assert!(
        message.contains("north") && message.contains("mesh-admin grant"),
        "{message}"
    );
    assert_eq!(stores[&1].status().voters.len(), 4);
    assert!(stores[&1].get("clusters/north").is_some());

    // With a mesh admin elsewhere (granted by north's, through north's member), the removal,
    // made by that mesh admin, takes north's records with it.
    let operator = |td: &str, name: &str| {
        Writer::Operator(OperatorId::new(td, identity::Role::Admin, name).expect("an operator"))
    };
    stores[&4]
        .acting_for(operator("north.local", "ann"))
        .put(
            "grants/mesh-admin/east.local/bob",
            valid_record("grants/mesh-admin/east.local/bob", ""),
        )
        .await
        .expect("put");
    stores[&1]
        .acting_for(operator("east.local", "bob"))
        .remove_member(4)
        .await
        .expect("remove");
    let north = stores.remove(&4).expect("north");
    wait_config(&stores, &[1, 2, 3], &[]).await;
    for store in stores.values() {
        for key in north_owned.iter().chain(&["clusters/north"]) {
            assert!(
                store.get_linearizable(key).await.expect("read").is_none(),
                "{key} outlived its cluster"
            );
        }
        for key in others.iter().chain(&["grants/mesh-admin/east.local/bob"]) {
            assert!(
                store.get_linearizable(key).await.expect("read").is_some(),
                "{key} went with another cluster"
            );
        }
    }
    // North hears from no one now; it asks its old peers, learns it was removed, and stops
    // saying so (instead of campaigning for ever).
    let stopped = tokio::time::timeout(Duration::from_secs(30), north.stopped())
        .await
        .expect("the removed member stops on its own");
    let reason = stopped.expect("a failure, not a shutdown");
    assert!(
        reason.contains("member 4 was removed") && reason.contains("members/removed/4"),
        "{reason}"
    );
    north.shutdown().await;

    // Rejoining: not under the removed id; under a new one, with the same name and trust
    // domain (its record went with the removal).
    let token = stores[&1]
        .mint_join_token(Duration::from_secs(60))
        .await
        .expect("mint");
    let rejoiner = start_joiner(5, &stores).await;
    let application = |id| JoinApplication {
        id,
        peer_addr: rejoiner.peer_addr(),
        cluster: Some(ClusterClaim {
            name: "north".into(),
            trust_domain: "north.local".into(),
            ca_bundle_pem: ca.cert_pem().into(),
        }),
    };
    let reused = stores[&1].join_with_token(&token, application(4)).await;
    let message = reused.expect_err("a removed id").to_string();
    assert!(
        message.contains("member 4 was removed") && message.contains("new id"),
        "{message}"
    );
    stores[&1]
        .join_with_token(&token, application(5))
        .await
        .expect("rejoin under a new id, with the same token");
    stores.insert(5, rejoiner);
    wait_config(&stores, &[1, 2, 3, 5], &[]).await;
    shutdown_all(stores).await;
}

#[tokio::test]
async fn removing_a_voter_promotes_the_oldest_learner() {
    let mut stores = start_federation(3).await;
    let leader = agreed_leader(&stores).await;
    for id in [4, 5] {
        let joiner = start_joiner(id, &stores).await;
        stores[&leader]
            .add_member(id, joiner.peer_addr(), false)
            .await
            .expect("add learner");
        stores.insert(id, joiner);
    }
    wait_config(&stores, &[1, 2, 3], &[4, 5]).await;
    let removed = [1, 2, 3]
        .into_iter()
        .find(|&id| id != leader)
        .expect("a follower");
    stores[&leader]
        .remove_member(removed)
        .await
        .expect("remove");
    let gone = stores.remove(&removed).expect("member");
    let mut voters: Vec<u64> = [1, 2, 3, 4]
        .into_iter()
        .filter(|&id| id != removed)
        .collect();
    voters.sort_unstable();
    wait_config(&stores, &voters, &[5]).await;
    gone.shutdown().await;
    stores[&4]
        .put("c/after-removal", b"1".to_vec())
        .await
        .expect("put");
    visible_everywhere(&stores, "c/after-removal", b"1").await;
    shutdown_all(stores).await;
}

#[tokio::test]
async fn removing_the_leader_hands_over_and_writes_continue() {
    let mut stores = start_federation(3).await;
    let leader = agreed_leader(&stores).await;
    stores[&leader]
        .put("c/before", b"1".to_vec())
        .await
        .expect("put");
    let other = stores
        .keys()
        .copied()
        .find(|&id| id != leader)
        .expect("other");
    stores[&other]
        .remove_member(leader)
        .await
        .expect("remove the leader");
    let old = stores.remove(&leader).expect("leader");
    let new_leader = agreed_leader(&stores).await;
    assert_ne!(new_leader, leader);
    let remaining: Vec<u64> = stores.keys().copied().collect();
    wait_config(&stores, &remaining, &[]).await;
    old.shutdown().await;
    stores[&new_leader]
        .put("c/after", b"2".to_vec())
        .await
        .expect("write after the leader left");
    visible_everywhere(&stores, "c/after", b"2").await;
    assert_eq!(stores[&new_leader].status().role, Role::Leader);
    shutdown_all(stores).await;
}

#[tokio::test]
async fn at_most_five_members_vote_and_bad_changes_are_refused() {
    let mut stores = start_federation(3).await;
    let leader = agreed_leader(&stores).await;
    for id in [4, 5, 6] {
        let joiner = start_joiner(id, &stores).await;
        stores[&leader]
            .add_member(id, joiner.peer_addr(), true)
            .await
            .expect("add voter");
        stores.insert(id, joiner);
    }
    wait_config(&stores, &[1, 2, 3, 4, 5], &[6]).await;
    let addr = stores[&6].peer_addr();
    assert!(matches!(
        stores[&1].add_member(6, addr, true).await,
        Err(StoreError::Membership(_))
    ));
    assert!(matches!(
        stores[&1].remove_member(42).await,
        Err(StoreError::Membership(_))
    ));
    shutdown_all(stores).await;
}

/// A value the store's rules admit at `key` (the keys of the removal test; `east_ca` for
/// `clusters/east`).
fn valid_record(key: &str, east_ca: &str) -> Vec<u8> {
    let parts: Vec<&str> = key.split('/').collect();
    let value = match parts[..] {
        ["clusters", name] => serde_json::json!({
            "name": name, "trustDomain": "east.local", "gateway": null, "caBundlePem": east_ca,
        }),
        ["exports", namespace, name, cluster] => serde_json::json!({
            "cluster": cluster, "namespace": namespace, "name": name, "ports": [],
            "identities": [], "endpoints": 1, "healthyEndpoints": 1,
        }),
        ["grants", "mesh-admin", td, name] => serde_json::json!({
            "identity": format!("spiffe://{td}/operator/admin/{name}"),
            "grantedBy": "test", "grantedAtMs": 1,
        }),
        _ => serde_json::json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "reviews", "namespace": "default"},
            "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]},
        }),
    };
    serde_json::to_vec(&value).expect("JSON")
}
