use super::*;

fn resource(api_version: &str, kind: &str, plural: &str) -> ApiResource {
    let (group, version) = api_version.split_once('/').unwrap();
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: api_version.into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn vs_resource() -> ApiResource {
    resource(
        "networking.istio.io/v1",
        "VirtualService",
        "virtualservices",
    )
}

fn object(v: Value) -> DynamicObject {
    serde_json::from_value(v).unwrap()
}

/// A VirtualService object as the API server returns it, with what it adds.
fn reviews(weight_v1: u32) -> DynamicObject {
    object(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "reviews", "namespace": "default", "uid": "u-1",
                     "resourceVersion": "7", "generation": 3,
                     "labels": {"team": "books"},
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                     "managedFields": [{"manager": "kubectl"}]},
        "spec": {"hosts": ["reviews"], "http": [{"route": [
            {"destination": {"host": "reviews", "subset": "v1"}, "weight": weight_v1},
            {"destination": {"host": "reviews", "subset": "v2"}, "weight": 100 - weight_v1}]}]},
        "status": {"validationMessages": []}
    }))
}

fn policy_of(text: &str) -> Policy {
    isthmus_core::policy::parse_documents("test.yaml", text)
        .unwrap()
        .remove(0)
}

const CLI_REVIEWS: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
    - route:
        - destination: {host: reviews, subset: v1}
          weight: 80
        - destination: {host: reviews, subset: v2}
          weight: 20
";

#[test]
fn an_object_becomes_the_document_the_cli_applies() {
    let doc = document(&vs_resource(), &reviews(80));
    assert_eq!(
        doc,
        json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
               "metadata": {"name": "reviews", "namespace": "default"},
               "spec": reviews(80).data["spec"]})
    );
    // The same as `isthmus apply -f` of the YAML a user writes.
    assert_eq!(
        parse(&vs_resource(), &reviews(80)).unwrap(),
        policy_of(CLI_REVIEWS)
    );
}

#[test]
fn the_watched_version_is_the_documents_api_version() {
    let beta = resource(
        "networking.istio.io/v1beta1",
        "VirtualService",
        "virtualservices",
    );
    let p = parse(&beta, &reviews(50)).unwrap();
    assert_eq!(p.api_version, "networking.istio.io/v1beta1");
    assert_eq!(p.store_key(), "policies/virtualservice/default/reviews");
}

#[test]
fn an_invalid_object_is_rejected_naming_the_field() {
    let mut o = reviews(80);
    o.data["spec"]["http"][0]["delegate"] = json!({"name": "reviews-routes"});
    let e = parse(&vs_resource(), &o).unwrap_err();
    assert_eq!(e.field, "spec.http[0].delegate");
    assert!(e.message.contains("unknown field"), "{}", e.message);

    let mut o = reviews(70);
    o.data["spec"]["http"][0]["route"][1]["weight"] = json!(20);
    let e = parse(&vs_resource(), &o).unwrap_err();
    assert!(e.field.starts_with("spec.http[0].route"), "{}", e.field);
    assert!(e.message.contains("100"), "{}", e.message);

    let mut o = reviews(80);
    o.data.as_object_mut().unwrap().remove("spec");
    let e = parse(&vs_resource(), &o).unwrap_err();
    assert!(e.message.contains("spec"), "{e}");
}

#[test]
fn every_kind_has_a_group_and_versions_preferred_first() {
    assert_eq!(
        group_and_versions(Kind::VirtualService),
        ("networking.istio.io", vec!["v1", "v1beta1", "v1alpha3"])
    );
    assert_eq!(
        group_and_versions(Kind::PeerAuthentication),
        ("security.istio.io", vec!["v1", "v1beta1"])
    );
    assert_eq!(
        group_and_versions(Kind::FailoverPolicy),
        ("isthmus.io", vec!["v1alpha1"])
    );
}

#[test]
fn origin_keys_name_the_cluster_and_the_policy() {
    let k = origin_key("east", "policies/virtualservice/default/reviews");
    assert_eq!(k, "kubernetes-policies/east/virtualservice/default/reviews");
    assert_eq!(
        parse_origin_key(&k),
        Some((
            "east",
            "policies/virtualservice/default/reviews".to_string()
        ))
    );
    assert_eq!(parse_origin_key("policies/virtualservice/default/x"), None);
    // Records are never read as policies.
    assert!(!ORIGIN_PREFIX.starts_with(isthmus_core::policy::STORE_PREFIX));
}

#[test]
fn plan_writes_what_changed_in_kubernetes_and_withdraws_what_went() {
    let a = policy_of(CLI_REVIEWS);
    let mut b = parse(&vs_resource(), &reviews(50)).unwrap();
    b.name = "ratings".into();
    let key_a = a.store_key();
    let key_b = b.store_key();
    let held = BTreeMap::from([(key_a.clone(), Some(a.clone()))]);
    // New: written.
    assert_eq!(plan(&held, &BTreeMap::new()), vec![Step::Write(a.clone())]);
    // Unchanged since this cluster wrote it: nothing, whatever the store holds now.
    let wrote = BTreeMap::from([(key_a.clone(), Some(a.clone()))]);
    assert_eq!(plan(&held, &wrote), vec![]);
    // Changed in Kubernetes: written.
    let mut a2 = a.clone();
    a2.api_version = "networking.istio.io/v1beta1".into();
    let held2 = BTreeMap::from([(key_a.clone(), Some(a2.clone()))]);
    assert_eq!(plan(&held2, &wrote), vec![Step::Write(a2)]);
    // Now invalid: nothing changes.
    let invalid = BTreeMap::from([(key_a.clone(), None)]);
    assert_eq!(plan(&invalid, &wrote), vec![]);
    // Gone: withdrawn; a record that does not decode is withdrawn too.
    let wrote2 = BTreeMap::from([(key_a.clone(), Some(a.clone())), (key_b.clone(), None)]);
    assert_eq!(
        plan(&BTreeMap::new(), &wrote2),
        vec![
            Step::Withdraw {
                key: key_b.clone(),
                wrote: None
            },
            Step::Withdraw {
                key: key_a,
                wrote: Some(a)
            },
        ]
    );
}

#[tokio::test]
async fn withdrawing_leaves_a_replaced_policy_and_hands_over_to_another_holder() {
    let store = isthmus_testkit::store::one_member_store().await;
    let a = policy_of(CLI_REVIEWS);
    let key = a.store_key();
    let withdraw = |wrote: &Policy| Step::Withdraw {
        key: key.clone(),
        wrote: Some(wrote.clone()),
    };

    // Written and recorded; withdrawn when it goes.
    execute(&store, "east", &Step::Write(a.clone()))
        .await
        .unwrap();
    assert_eq!(stored(&store, &key), Some(a.clone()));
    assert!(store.get(&origin_key("east", &key)).is_some());
    execute(&store, "east", &withdraw(&a)).await.unwrap();
    assert_eq!(stored(&store, &key), None);
    assert!(store.get(&origin_key("east", &key)).is_none());

    // Replaced since by the CLI: left as the CLI wrote it.
    execute(&store, "east", &Step::Write(a.clone()))
        .await
        .unwrap();
    let mut cli = a.clone();
    cli.api_version = "networking.istio.io/v1beta1".into();
    store
        .put(&key, cli.to_json().to_string().into_bytes())
        .await
        .unwrap();
    execute(&store, "east", &withdraw(&a)).await.unwrap();
    assert_eq!(stored(&store, &key), Some(cli.clone()));
    assert!(store.get(&origin_key("east", &key)).is_none());
    store.delete(&key).await.unwrap();

    // Held by two clusters: the one that goes hands over to the other's document.
    execute(&store, "west", &Step::Write(cli.clone()))
        .await
        .unwrap();
    execute(&store, "east", &Step::Write(a.clone()))
        .await
        .unwrap();
    assert_eq!(stored(&store, &key), Some(a.clone()), "last writer wins");
    execute(&store, "east", &withdraw(&a)).await.unwrap();
    assert_eq!(stored(&store, &key), Some(cli.clone()));
    execute(&store, "west", &withdraw(&cli)).await.unwrap();
    assert_eq!(stored(&store, &key), None);
    assert!(store.list(ORIGIN_PREFIX).is_empty());
    store.shutdown().await;
}
