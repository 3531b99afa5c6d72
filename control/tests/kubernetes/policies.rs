//! Policies as Kubernetes resources: Istio's and Isthmus's kinds in the test API server reach
//! the federation store and every cluster's configuration stream, follow updates and
//! deletions, keep their last valid version when made invalid, wait for their CRDs, and
//! never remove what the CLI (or another cluster's Kubernetes) wrote.

use super::*;

use isthmus_control::api::PolicyApi;
use isthmus_core::policy::{Kind, Policy};
use isthmus_core::proto::mesh::policy_service_server::PolicyService;
use isthmus_core::proto::mesh::{ApplyRequest, GetPoliciesRequest};

const REVIEWS_KEY: &str = "policies/virtualservice/default/reviews";

/// A VirtualService splitting `name` between subsets v1 and v2.
fn virtual_service(api_version: &str, name: &str, v1: u32, v2: u32) -> Value {
    json!({"apiVersion": api_version, "kind": "VirtualService",
           "metadata": {"name": name, "namespace": "default", "labels": {"team": "books"}},
           "spec": {"hosts": [name], "http": [{"route": [
               {"destination": {"host": name, "subset": "v1"}, "weight": v1},
               {"destination": {"host": name, "subset": "v2"}, "weight": v2}]}]}})
}

fn rate_limit(name: &str, max_tokens: u32) -> Value {
    json!({"apiVersion": "isthmus.io/v1alpha1", "kind": "RateLimitPolicy",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"host": name, "tokenBucket": {"maxTokens": max_tokens, "fillInterval": "1s"}}})
}

/// The stored policy at `key`, as a document.
fn stored(store: &isthmus_federation::Store, key: &str) -> Option<Value> {
    Some(Policy::from_json(&store.get(key)?.value).ok()?.to_json())
}

/// The weights of the first http route of VirtualService `name` in a cluster's streamed
/// configuration: what its sidecars route by.
fn weights(control: &isthmus_control::ControlHandle, name: &str) -> Option<(u64, u64)> {
    let config = control.config().borrow().clone();
    let p = config
        .policies
        .iter()
        .find(|p| p.kind() == Kind::VirtualService && p.name == name)?
        .to_json();
    let route = &p["spec"]["http"][0]["route"];
    Some((route[0]["weight"].as_u64()?, route[1]["weight"].as_u64()?))
}

/// What `isthmus apply -f` sends for `documents`, through the same PolicyService.
async fn cli_apply(store: &isthmus_federation::Store, documents: &[Value]) {
    let api = PolicyApi {
        store: store.clone(),
    };
    let documents_json = documents
        .iter()
        .map(|d| {
            let p = Policy::from_json_at("cli.yaml", 1, d.to_string().as_bytes()).unwrap();
            p.to_json().to_string()
        })
        .collect();
    api.apply(tonic::Request::new(ApplyRequest {
        documents_json,
        dry_run: false,
    }))
    .await
    .unwrap();
}

/// The Accepted condition of RateLimitPolicy `name`: (status, reason, message).
fn accepted(api: &KubeApi, name: &str) -> Option<(String, String, String)> {
    condition_of(api, "RateLimitPolicy", name, "Accepted")
}

#[tokio::test]
async fn a_virtual_service_in_kubernetes_routes_every_cluster_and_follows_updates_and_deletion() {
    let store = isthmus_testkit::store::one_member_store().await;
    let east = cluster("east", 1, &store).await;
    let west = cluster("west", 2, &store).await;
    east.api.install("networking.istio.io/v1");
    east.api
        .put(virtual_service("networking.istio.io/v1", "reviews", 80, 20));

    // Stored mesh-wide, exactly as `isthmus apply -f` of the same YAML stores it (labels
    // and what the API server adds are left out), and streamed to both clusters.
    let doc = eventually("the VirtualService stored", || stored(&store, REVIEWS_KEY)).await;
    let mut want = virtual_service("networking.istio.io/v1", "reviews", 80, 20);
    want["metadata"] = json!({"name": "reviews", "namespace": "default"});
    assert_eq!(doc, want);
    for c in [&east, &west] {
        eventually("80/20 in the config stream", || {
            (weights(&c.control, "reviews") == Some((80, 20))).then_some(())
        })
        .await;
    }
    // `isthmus get virtualservice reviews` shows it.
    let got = PolicyApi {
        store: store.clone(),
    }
    .get(tonic::Request::new(GetPoliciesRequest {
        kind: "virtualservice".into(),
        namespace: "default".into(),
        name: "reviews".into(),
    }))
    .await
    .unwrap()
    .into_inner();
    assert_eq!(got.documents_json.len(), 1);

    // Updated in Kubernetes: updated everywhere.
    east.api
        .put(virtual_service("networking.istio.io/v1", "reviews", 50, 50));
    eventually("50/50 in west's config stream", || {
        (weights(&west.control, "reviews") == Some((50, 50))).then_some(())
    })
    .await;

    // Made invalid (an unsupported field; weights not adding up): nothing stored changes.
    // A valid VirtualService created after it shows the invalid one has been seen.
    let mut invalid = virtual_service("networking.istio.io/v1", "reviews", 90, 20);
    invalid["spec"]["http"][0]["delegate"] = json!({"name": "reviews-routes"});
    east.api.put(invalid);
    east.api
        .put(virtual_service("networking.istio.io/v1", "ratings", 100, 0));
    eventually("ratings stored after the invalid reviews", || {
        stored(&store, "policies/virtualservice/default/ratings")
    })
    .await;
    assert_eq!(weights(&west.control, "reviews"), Some((50, 50)));
    assert_eq!(
        stored(&store, REVIEWS_KEY).unwrap()["spec"]["http"][0]["route"][0]["weight"],
        50
    );
    assert!(store
        .get("kubernetes-policies/east/virtualservice/default/reviews")
        .is_some());

    // Deleted in Kubernetes: withdrawn everywhere, with its record.
    assert!(east.api.remove("VirtualService", "default", "reviews"));
    eventually("reviews withdrawn from west", || {
        weights(&west.control, "reviews").is_none().then_some(())
    })
    .await;
    assert!(store.get(REVIEWS_KEY).is_none());
    assert!(store
        .get("kubernetes-policies/east/virtualservice/default/reviews")
        .is_none());
    assert!(stored(&store, "policies/virtualservice/default/ratings").is_some());
    east.control.shutdown().await;
    west.control.shutdown().await;
    store.shutdown().await;
}

#[tokio::test]
async fn istio_kinds_wait_for_their_crds_and_are_picked_up_once_installed() {
    let store = isthmus_testkit::store::one_member_store().await;
    let east = cluster("east", 1, &store).await;
    // Isthmus's own kinds are watched from the start; Istio's groups are not served, so
    // discovery is asked again and again, and nothing of Istio's is listed or watched.
    eventually("ratelimitpolicies watched", || {
        (east.api.watches("ratelimitpolicies") > 0).then_some(())
    })
    .await;
    let asked = east.api.discoveries();
    eventually("discovery asked again", || {
        (east.api.discoveries() >= asked + 2).then_some(())
    })
    .await;
    for plural in [
        "virtualservices",
        "destinationrules",
        "authorizationpolicies",
        "peerauthentications",
        "requestauthentications",
    ] {
        assert_eq!(east.api.lists(plural), 0, "{plural} listed");
        assert_eq!(east.api.watches(plural), 0, "{plural} watched");
    }

    // Istio's networking CRDs installed at v1beta1: picked up at that version.
    east.api.install("networking.istio.io/v1beta1");
    east.api.put(virtual_service(
        "networking.istio.io/v1beta1",
        "reviews",
        80,
        20,
    ));
    east.api.put(json!({
        "apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {"host": "reviews", "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}}]}}));
    let vs = eventually("the v1beta1 VirtualService stored", || {
        stored(&store, REVIEWS_KEY)
    })
    .await;
    assert_eq!(vs["apiVersion"], "networking.istio.io/v1beta1");
    eventually("the DestinationRule in the config stream", || {
        config(&east)
            .policies
            .iter()
            .any(|p| p.kind() == Kind::DestinationRule && p.name == "reviews")
            .then_some(())
    })
    .await;
    assert_eq!(east.api.watches("authorizationpolicies"), 0);

    // Then the security CRDs.
    east.api.install("security.istio.io/v1");
    east.api.put(json!({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "default"},
        "spec": {"mtls": {"mode": "STRICT"}}}));
    eventually("the PeerAuthentication stored", || {
        stored(&store, "policies/peerauthentication/default/default")
    })
    .await;
    east.control.shutdown().await;
    store.shutdown().await;
}

#[tokio::test]
async fn an_invalid_isthmus_policy_keeps_its_last_valid_version_and_says_why_on_its_status() {
    let store = isthmus_testkit::store::one_member_store().await;
    let east = cluster("east", 1, &store).await;
    let key = "policies/ratelimitpolicy/default/ratings";
    east.api.put(rate_limit("ratings", 100));
    eventually("the RateLimitPolicy stored", || stored(&store, key)).await;
    let ok = eventually("Accepted=True", || {
        accepted(&east.api, "ratings").filter(|c| c.0 == "True")
    })
    .await;
    assert_eq!(ok.1, "Accepted");

    // An unknown field: the stored policy stays at 100 tokens; the object says which field.
    let mut bad = rate_limit("ratings", 5);
    bad["spec"]["tokenBucket"]["burst"] = json!(10);
    east.api.put(bad);
    let rejected = eventually("Accepted=False", || {
        accepted(&east.api, "ratings").filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(rejected.1, "Invalid");
    assert!(
        rejected.2.contains("spec.tokenBucket.burst")
            && rejected.2.contains("last valid version stays"),
        "{}",
        rejected.2
    );
    assert_eq!(
        stored(&store, key).unwrap()["spec"]["tokenBucket"]["maxTokens"],
        100
    );
    let in_config = config(&east)
        .policies
        .iter()
        .find(|p| p.kind() == Kind::RateLimitPolicy)
        .map(|p| p.to_json()["spec"]["tokenBucket"]["maxTokens"].clone());
    assert_eq!(in_config, Some(json!(100)));

    // Fixed: stored, and accepted again.
    east.api.put(rate_limit("ratings", 5));
    eventually("5 tokens stored", || {
        (stored(&store, key)?["spec"]["tokenBucket"]["maxTokens"] == 5).then_some(())
    })
    .await;
    eventually("Accepted=True again", || {
        accepted(&east.api, "ratings").filter(|c| c.0 == "True")
    })
    .await;
    // Invalid from the start: nothing is stored, and the object says so.
    let mut never = rate_limit("details", 5);
    never["spec"]["tokenBucket"]["fillInterval"] = json!("soon");
    east.api.put(never);
    let c = eventually("Accepted=False on details", || {
        accepted(&east.api, "details").filter(|c| c.0 == "False")
    })
    .await;
    assert!(c.2.contains("nothing is stored"), "{}", c.2);
    assert!(store
        .get("policies/ratelimitpolicy/default/details")
        .is_none());
    east.control.shutdown().await;
    store.shutdown().await;
}

#[tokio::test]
async fn cli_applied_policies_survive_kubernetes_deletions_resyncs_and_restarts() {
    let store = isthmus_testkit::store::one_member_store().await;
    let api = KubeApi::start().await;
    api.put(namespace("default"));
    api.install("networking.istio.io/v1");
    // The CLI applies details; Kubernetes has ratings and, later, reviews.
    cli_apply(
        &store,
        &[virtual_service("networking.istio.io/v1", "details", 70, 30)],
    )
    .await;
    api.put(virtual_service("networking.istio.io/v1", "ratings", 100, 0));
    let east = control("east", 1, &store, &api).await;
    eventually("ratings stored", || {
        stored(&store, "policies/virtualservice/default/ratings")
    })
    .await;
    api.put(virtual_service("networking.istio.io/v1", "reviews", 80, 20));
    eventually("reviews stored", || stored(&store, REVIEWS_KEY)).await;

    // The CLI changes reviews: the last writer wins, and Kubernetes does not put its
    // version back on resync.
    cli_apply(
        &store,
        &[virtual_service("networking.istio.io/v1", "reviews", 10, 90)],
    )
    .await;
    let revision = store.get(REVIEWS_KEY).unwrap().revision;
    tokio::time::sleep(Duration::from_millis(2500)).await; // more than one resync
    assert_eq!(store.get(REVIEWS_KEY).unwrap().revision, revision);

    // Deleting reviews in Kubernetes leaves the CLI's version (it is not what Kubernetes
    // wrote); its record goes.
    assert!(api.remove("VirtualService", "default", "reviews"));
    eventually("east's record of reviews gone", || {
        store
            .get("kubernetes-policies/east/virtualservice/default/reviews")
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(weights(&east, "reviews"), Some((10, 90)));

    // The control plane goes down; ratings is deleted meanwhile. Restarted while the API
    // server is down too, then while VirtualServices cannot be listed (discovered and
    // watched, but never listed in full), it removes nothing; after the first full list it
    // withdraws the stale ratings.
    east.shutdown().await;
    let mut api = api;
    api.stop().await;
    assert!(api.remove("VirtualService", "default", "ratings"));
    let east = control("east", 1, &store, &api).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(stored(&store, "policies/virtualservice/default/ratings").is_some());
    api.fail_lists("virtualservices", true);
    let lists = api.lists("virtualservices");
    api.restart().await;
    eventually("a failed list of VirtualServices", || {
        (api.lists("virtualservices") > lists).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(stored(&store, "policies/virtualservice/default/ratings").is_some());
    api.fail_lists("virtualservices", false);
    eventually("the stale ratings withdrawn after the first list", || {
        weights(&east, "ratings").is_none().then_some(())
    })
    .await;
    assert!(store
        .get("policies/virtualservice/default/ratings")
        .is_none());
    // The CLI's policies are untouched throughout.
    assert_eq!(weights(&east, "details"), Some((70, 30)));
    assert_eq!(weights(&east, "reviews"), Some((10, 90)));
    east.shutdown().await;
    store.shutdown().await;
}

#[tokio::test]
async fn two_clusters_holding_the_same_policy_do_not_fight_and_it_lasts_while_either_holds_it() {
    let store = isthmus_testkit::store::one_member_store().await;
    let east = cluster("east", 1, &store).await;
    let west = cluster("west", 2, &store).await;
    for c in [&east, &west] {
        c.api.install("networking.istio.io/v1");
        c.api
            .put(virtual_service("networking.istio.io/v1", "reviews", 80, 20));
    }
    for cluster in ["east", "west"] {
        eventually("both clusters' records", || {
            store
                .get(&format!(
                    "kubernetes-policies/{cluster}/virtualservice/default/reviews"
                ))
                .map(|_| ())
        })
        .await;
    }
    // The same document from both: written once, and left alone on resyncs.
    let revision = store.get(REVIEWS_KEY).unwrap().revision;
    tokio::time::sleep(Duration::from_millis(2500)).await; // more than one resync
    assert_eq!(store.get(REVIEWS_KEY).unwrap().revision, revision);

    // East deletes its copy: west still holds it, so it stays.
    assert!(east.api.remove("VirtualService", "default", "reviews"));
    eventually("east's record gone", || {
        store
            .get("kubernetes-policies/east/virtualservice/default/reviews")
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(weights(&east.control, "reviews"), Some((80, 20)));

    // West changes it, then east creates it again differently: the last writer wins.
    west.api
        .put(virtual_service("networking.istio.io/v1", "reviews", 50, 50));
    eventually("west's 50/50", || {
        (weights(&east.control, "reviews") == Some((50, 50))).then_some(())
    })
    .await;
    east.api
        .put(virtual_service("networking.istio.io/v1", "reviews", 30, 70));
    eventually("east's 30/70", || {
        (weights(&west.control, "reviews") == Some((30, 70))).then_some(())
    })
    .await;

    // East, the last writer, deletes it: west's copy takes over rather than nothing.
    assert!(east.api.remove("VirtualService", "default", "reviews"));
    eventually("west's 50/50 back", || {
        (weights(&west.control, "reviews") == Some((50, 50))).then_some(())
    })
    .await;
    // West deletes it too: gone.
    assert!(west.api.remove("VirtualService", "default", "reviews"));
    eventually("reviews withdrawn", || {
        store.get(REVIEWS_KEY).is_none().then_some(())
    })
    .await;
    assert!(store.list("kubernetes-policies/").is_empty());
    east.control.shutdown().await;
    west.control.shutdown().await;
    store.shutdown().await;
}
