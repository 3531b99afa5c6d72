//! The store's rules on apply (docs/security.md §7), across three members: a refused write
//! changes nothing on any replica, whichever member proposed it, and each replica counts it.

mod support;

use std::collections::BTreeMap;

use isthmus_core::keyspace::rules::Reason;
use isthmus_federation::{Store, StoreError};
use serde_json::json;
use support::*;

fn cluster(name: &str, td: &str, ca: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "name": name, "trustDomain": td, "gateway": null, "caBundlePem": ca,
    }))
    .expect("JSON")
}

fn refused(store: &Store, reason: Reason) -> u64 {
    store
        .entries_refused()
        .into_iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, n)| n)
}

/// Every record of a replica, revisions included.
fn contents(store: &Store) -> BTreeMap<String, (Vec<u8>, u64)> {
    store
        .list("")
        .into_iter()
        .map(|(k, r)| (k, (r.value, r.revision)))
        .collect()
}

async fn applied_everywhere(stores: &BTreeMap<u64, Store>, index: u64) {
    eventually(&format!("every member to apply index {index}"), || async {
        stores
            .values()
            .all(|s| *s.revision().borrow() >= index)
            .then_some(())
    })
    .await
}

#[tokio::test]
async fn every_replica_refuses_what_the_rules_refuse_and_keeps_its_state() {
    let stores = start_federation(3).await;
    let east_ca = isthmus_core::ca::CertificateAuthority::generate("east.local").expect("CA");
    let impostor = isthmus_core::ca::CertificateAuthority::generate("east.local").expect("CA");
    let central_ca = isthmus_core::ca::CertificateAuthority::generate("central.local").expect("CA");
    stores[&1]
        .put(
            "clusters/east",
            cluster("east", "east.local", east_ca.cert_pem()),
        )
        .await
        .expect("east's record");
    let last = stores[&1]
        .put(
            "clusters/central",
            cluster("central", "central.local", central_ca.cert_pem()),
        )
        .await
        .expect("central's record");
    applied_everywhere(&stores, last).await;
    let before: Vec<_> = stores.values().map(contents).collect();

    // From each member in turn (leader and followers alike): a cluster claiming east's trust
    // domain, an export with a foreign identity, a policy that does not validate.
    let export = serde_json::to_vec(&json!({
        "cluster": "central", "namespace": "default", "name": "ratings", "ports": [],
        "identities": ["spiffe://east.local/ns/default/sa/x"], "endpoints": 1,
        "healthyEndpoints": 1,
    }))
    .expect("JSON");
    for store in stores.values() {
        let err = store
            .put(
                "clusters/zzz",
                cluster("zzz", "east.local", impostor.cert_pem()),
            )
            .await
            .expect_err("a second claim on east.local");
        let StoreError::Refused(refusal) = &err else {
            panic!("not refused by the rules: {err}");
        };
        assert_eq!(refusal.reason, Reason::TrustDomainTaken);
        assert!(
            err.to_string()
                .contains("trust domain east.local belongs to cluster east; cluster zzz"),
            "{err}"
        );
        let err = store
            .put("exports/default/ratings/central", export.clone())
            .await
            .expect_err("a foreign identity");
        assert!(
            err.to_string()
                .contains("spiffe://east.local/ns/default/sa/x is not in central's"),
            "{err}"
        );
        let err = store
            .compare_and_set("policies/virtualservice/default/r", None, b"{}".to_vec())
            .await
            .expect_err("not a policy");
        assert!(matches!(err, StoreError::Refused(_)), "{err}");
    }

    // A later write still lands, and every replica has applied the refused entries by then.
    let after = stores[&2]
        .put("load/after", b"1".to_vec())
        .await
        .expect("an ordinary write");
    applied_everywhere(&stores, after).await;
    for (store, before) in stores.values().zip(&before) {
        let mut now = contents(store);
        assert_eq!(
            now.remove("load/after").map(|(v, _)| v),
            Some(b"1".to_vec())
        );
        assert_eq!(&now, before, "a refused entry changed a replica");
        assert_eq!(refused(store, Reason::TrustDomainTaken), 3);
        assert_eq!(refused(store, Reason::ForeignIdentity), 3);
        assert_eq!(refused(store, Reason::Malformed), 3);
    }
    shutdown_all(stores).await;
}

fn bound_cluster(name: &str, td: &str, ca: &str, member: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "name": name, "trustDomain": td, "gateway": null, "caBundlePem": ca, "memberId": member,
    }))
    .expect("JSON")
}

/// Ownership on apply (docs/security.md §7, "Writers"): once records bind east to member 1
/// and central to member 2, member 1 writes only east's records, whether it asks as its own
/// control plane or for an operator of another trust domain; every replica refuses the rest,
/// changes nothing and counts `not_owner`. A mesh admin vouched for by its own member writes
/// any record.
#[tokio::test]
async fn every_replica_refuses_a_write_its_writer_does_not_own() {
    use isthmus_core::identity::{OperatorId, Role};
    use isthmus_federation::Writer;

    let east_ca = isthmus_core::ca::CertificateAuthority::generate("east.local").expect("CA");
    let central_ca = isthmus_core::ca::CertificateAuthority::generate("central.local").expect("CA");
    let signers = [control_identity(&east_ca), control_identity(&central_ca)];
    let stores = start_federation_with(3, |id, peers| isthmus_federation::StoreOptions {
        signer: signers.get(id as usize - 1).cloned(),
        ..options(id, peers)
    })
    .await;
    // Each member binds itself first: its own record, with its own member id.
    stores[&1]
        .put(
            "clusters/east",
            bound_cluster("east", "east.local", east_ca.cert_pem(), 1),
        )
        .await
        .expect("east's record, by east's member");
    stores[&2]
        .put(
            "clusters/central",
            bound_cluster("central", "central.local", central_ca.cert_pem(), 2),
        )
        .await
        .expect("central's record, by central's member");
    let grant = serde_json::to_vec(&json!({
        "identity": "spiffe://east.local/operator/admin/ann"
    }))
    .expect("JSON");
    let last = stores[&1]
        .put("grants/mesh-admin/east.local/ann", grant)
        .await
        .expect("the first mesh-admin grant, of east's own trust domain");
    applied_everywhere(&stores, last).await;
    let before: Vec<_> = stores.values().map(contents).collect();

    let export = |cluster: &str| {
        serde_json::to_vec(&json!({
            "cluster": cluster, "namespace": "default", "name": "ratings", "ports": [],
            "identities": [], "endpoints": 1, "healthyEndpoints": 1,
        }))
        .expect("JSON")
    };
    let operator = |td: &str, role, name: &str| {
        Writer::Operator(OperatorId::new(td, role, name).expect("operator"))
    };
    let central_admin = stores[&1].acting_for(operator("central.local", Role::Admin, "eve"));
    let east_viewer = stores[&1].acting_for(operator("east.local", Role::Viewer, "vic"));
    let attempts: [(&Store, &str, Vec<u8>); 5] = [
        (
            &stores[&1],
            "clusters/central",
            bound_cluster("central", "central.local", east_ca.cert_pem(), 2),
        ),
        (
            &stores[&1],
            "exports/default/ratings/central",
            export("central"),
        ),
        (&stores[&3], "exports/default/ratings/east", export("east")),
        (
            &central_admin,
            "exports/default/ratings/central",
            export("central"),
        ),
        (&east_viewer, "exports/default/ratings/east", export("east")),
    ];
    for (store, key, value) in &attempts {
        let err = store
            .put(key, value.clone())
            .await
            .expect_err("not the writer's to write");
        let StoreError::Refused(refusal) = &err else {
            panic!("{key}: not refused by the rules: {err}");
        };
        assert_eq!(refusal.reason, Reason::NotOwner, "{key}: {err}");
    }
    let err = stores[&1]
        .delete("clusters/central")
        .await
        .expect_err("a member removes no cluster");
    assert!(err.to_string().contains("removed by a mesh admin"), "{err}");

    // Nothing changed anywhere; every replica counted every refusal.
    let probe = stores[&2]
        .put("load/after", b"1".to_vec())
        .await
        .expect("an ordinary write");
    applied_everywhere(&stores, probe).await;
    for (store, before) in stores.values().zip(&before) {
        let mut now = contents(store);
        now.remove("load/after");
        assert_eq!(&now, before, "a refused entry changed a replica");
        assert_eq!(refused(store, Reason::NotOwner), 6);
    }

    // The owner, and a mesh admin through its own member, do write.
    stores[&2]
        .put("exports/default/ratings/central", export("central"))
        .await
        .expect("central's member writes central's export");
    let mesh_admin = stores[&1].acting_for(operator("east.local", Role::Admin, "ann"));
    mesh_admin
        .delete("exports/default/ratings/central")
        .await
        .expect("a mesh admin deletes any export");
    let err = stores[&2]
        .acting_for(operator("east.local", Role::Admin, "ann"))
        .put("load/x", b"1".to_vec())
        .await
        .expect_err("central's member cannot vouch for east's mesh admin");
    assert!(err.to_string().contains("own trust domain"), "{err}");
    shutdown_all(stores).await;
}
