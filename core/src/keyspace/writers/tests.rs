use std::collections::BTreeMap;

use serde_json::json;

use super::*;
use crate::ca::CertificateAuthority;

#[derive(Default)]
struct Map(BTreeMap<String, Vec<u8>>);

impl Records for Map {
    fn value(&self, key: &str) -> Option<&[u8]> {
        self.0.get(key).map(Vec::as_slice)
    }
    fn values<'a>(&'a self, prefix: &str) -> Vec<(&'a str, &'a [u8])> {
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect()
    }
}

impl Map {
    fn set(&mut self, key: &str, value: serde_json::Value) {
        self.0
            .insert(key.into(), serde_json::to_vec(&value).unwrap());
    }
}

fn cluster(name: &str, member: Option<u64>) -> serde_json::Value {
    let td = format!("{name}.isthmus.local");
    let ca = CertificateAuthority::generate(&td).unwrap();
    json!({"name": name, "trustDomain": td, "gateway": null,
           "caBundlePem": ca.cert_pem(), "memberId": member})
}

fn export(cluster: &str) -> serde_json::Value {
    json!({"cluster": cluster, "namespace": "default", "name": "ratings", "identities": []})
}

/// east is member 1, west member 2; east's `admin` is a mesh admin.
fn federation() -> Map {
    let mut m = Map::default();
    m.set("clusters/east", cluster("east", Some(1)));
    m.set("clusters/west", cluster("west", Some(2)));
    m.set(
        "grants/mesh-admin/east.isthmus.local/admin",
        json!({"identity": "spiffe://east.isthmus.local/operator/admin/admin"}),
    );
    m
}

fn operator(td: &str, role: Role, name: &str) -> Writer {
    Writer::Operator(OperatorId::new(td, role, name).unwrap())
}

fn write(
    m: &Map,
    proposer: u64,
    writer: &Writer,
    key: &str,
    value: &serde_json::Value,
) -> Result<(), Refusal> {
    let bytes = serde_json::to_vec(value).unwrap();
    Proposer::new(m, proposer).may_write(writer, key, Change::Write(&bytes))
}

fn refused(r: Result<(), Refusal>) -> String {
    let refusal = r.expect_err("refused");
    assert_eq!(refusal.reason, Reason::NotOwner, "{refusal}");
    refusal.message
}

#[test]
fn a_member_writes_its_own_cluster_records_only() {
    let m = federation();
    let me = &Writer::Member;
    let mut east = cluster("east", Some(1));
    assert!(write(&m, 1, me, "clusters/east", &east).is_ok());
    assert!(write(&m, 1, me, "exports/default/ratings/east", &export("east")).is_ok());
    assert!(Proposer::new(&m, 1)
        .may_write(me, "exports/default/ratings/east", Change::Delete)
        .is_ok());
    assert!(write(
        &m,
        1,
        me,
        "kubernetes-policies/east/x/default/a",
        &json!({})
    )
    .is_ok());
    let message = refused(write(&m, 1, me, "clusters/west", &cluster("west", Some(2))));
    assert!(
        message.contains("clusters/west") && message.contains("member 1"),
        "{message}"
    );
    refused(write(
        &m,
        1,
        me,
        "exports/default/ratings/west",
        &export("west"),
    ));
    refused(Proposer::new(&m, 1).may_write(me, "exports/default/ratings/west", Change::Delete));
    refused(write(
        &m,
        1,
        me,
        "kubernetes-policies/west/x/default/a",
        &json!({}),
    ));
    // Its own record keeps its own member id, and is never deleted by the member.
    east["memberId"] = json!(7);
    refused(write(&m, 1, me, "clusters/east", &east));
    refused(Proposer::new(&m, 1).may_write(me, "clusters/east", Change::Delete));
    // Unowned keys are anyone's.
    assert!(write(&m, 1, me, "load/1", &json!(1)).is_ok());
}

#[test]
fn grants_are_a_mesh_admins_but_the_first_one() {
    let m = federation();
    let me = &Writer::Member;
    let grant = json!({"identity": "spiffe://east.isthmus.local/operator/admin/bob"});
    refused(write(
        &m,
        1,
        me,
        "grants/mesh-admin/east.isthmus.local/bob",
        &grant,
    ));
    refused(write(&m, 2, me, "grants/policy-writer/west", &json!({})));
    refused(Proposer::new(&m, 1).may_write(
        me,
        "grants/mesh-admin/east.isthmus.local/admin",
        Change::Delete,
    ));
    // With no grant yet, a member writes the first, of its own trust domain only.
    let mut fresh = federation();
    fresh.0.retain(|k, _| !k.starts_with("grants/"));
    assert!(write(
        &fresh,
        1,
        me,
        "grants/mesh-admin/east.isthmus.local/bob",
        &grant
    )
    .is_ok());
    refused(write(
        &fresh,
        2,
        me,
        "grants/mesh-admin/east.isthmus.local/bob",
        &grant,
    ));
}

#[test]
fn mesh_wide_policies_from_a_member_need_its_policy_writer_grant() {
    let mut m = federation();
    let me = &Writer::Member;
    let key = "policies/virtualservice/default/reviews";
    let message = refused(write(&m, 2, me, key, &json!({})));
    assert!(message.contains("grants/policy-writer/west"), "{message}");
    m.set("grants/policy-writer/west", json!({"cluster": "west"}));
    assert!(write(&m, 2, me, key, &json!({})).is_ok());
    refused(write(&m, 1, me, key, &json!({})));
}

#[test]
fn an_unbound_member_writes_only_what_no_member_is_bound_to() {
    let mut m = federation();
    m.set("clusters/south", cluster("south", None));
    let me = &Writer::Member;
    // Member 3 has no record: it may create its own, bound to itself (or to none).
    assert!(write(&m, 3, me, "clusters/north", &cluster("north", Some(3))).is_ok());
    assert!(write(&m, 3, me, "clusters/north", &cluster("north", None)).is_ok());
    refused(write(
        &m,
        3,
        me,
        "clusters/north",
        &cluster("north", Some(2)),
    ));
    assert!(write(&m, 3, me, "clusters/south", &cluster("south", None)).is_ok());
    assert!(write(&m, 3, me, "exports/default/ratings/south", &export("south")).is_ok());
    refused(write(&m, 3, me, "clusters/east", &cluster("east", Some(1))));
    refused(write(
        &m,
        3,
        me,
        "exports/default/ratings/east",
        &export("east"),
    ));
}

#[test]
fn operators_count_only_through_their_own_member_and_by_role() {
    let m = federation();
    let mesh_admin = operator("east.isthmus.local", Role::Admin, "admin");
    let west_admin = operator("west.isthmus.local", Role::Admin, "ops");
    let viewer = operator("west.isthmus.local", Role::Viewer, "v");
    // A mesh admin writes any record, through its own member (another cluster's CA bundle
    // staying as it is).
    let mut west: serde_json::Value =
        serde_json::from_slice(m.value("clusters/west").unwrap()).unwrap();
    west["gateway"] = json!("127.0.0.1:15443");
    assert!(write(&m, 1, &mesh_admin, "clusters/west", &west).is_ok());
    assert!(Proposer::new(&m, 1)
        .may_write(&mesh_admin, "clusters/west", Change::Delete)
        .is_ok());
    assert!(write(&m, 1, &mesh_admin, "grants/policy-writer/west", &json!({})).is_ok());
    // ... but west's member cannot vouch for an east operator.
    let message = refused(write(
        &m,
        2,
        &mesh_admin,
        "clusters/west",
        &cluster("west", Some(2)),
    ));
    assert!(message.contains("west.isthmus.local"), "{message}");
    // An admin without a grant writes its own cluster's records only.
    assert!(write(
        &m,
        2,
        &west_admin,
        "exports/default/ratings/west",
        &export("west")
    )
    .is_ok());
    refused(write(
        &m,
        2,
        &west_admin,
        "exports/default/ratings/east",
        &export("east"),
    ));
    refused(write(
        &m,
        2,
        &west_admin,
        "policies/virtualservice/default/r",
        &json!({}),
    ));
    // A viewer writes nothing, not even unowned keys.
    refused(write(&m, 2, &viewer, "load/1", &json!(1)));
    refused(write(
        &m,
        2,
        &viewer,
        "exports/default/ratings/west",
        &export("west"),
    ));
}

#[test]
fn writers_travel_as_text_and_unknown_text_is_an_error() {
    for writer in [
        Writer::Member,
        operator("east.isthmus.local", Role::Admin, "admin"),
    ] {
        assert_eq!(Writer::decode(&writer.encode()).unwrap(), writer);
    }
    assert_eq!(Writer::decode("").unwrap(), Writer::Member);
    assert!(Writer::decode("spiffe://east/ns/a/sa/b").is_err());
    assert!(Writer::decode("root").is_err());
}

#[test]
fn a_bound_member_mints_join_tokens_only_for_its_own_mesh_admins() {
    let m = federation();
    let minted = |proposer, writer: &Writer| Proposer::new(&m, proposer).may_mint(writer);
    assert!(minted(1, &operator("east.isthmus.local", Role::Admin, "admin")).is_ok());
    for (proposer, writer) in [
        (1, Writer::Member),
        (1, operator("east.isthmus.local", Role::Admin, "bob")),
        (1, operator("east.isthmus.local", Role::Viewer, "admin")),
        (2, operator("east.isthmus.local", Role::Admin, "admin")),
    ] {
        let refusal = minted(proposer, &writer).expect_err("not a mesh admin of its own");
        assert_eq!(refusal.reason, Reason::NotOwner, "{refusal}");
    }
    // A member no record binds mints as it writes: for anyone.
    assert!(minted(3, &Writer::Member).is_ok());
}

#[test]
fn a_mesh_admin_leaves_another_clusters_ca_bundle_as_it_is() {
    let m = federation();
    let admin = &operator("east.isthmus.local", Role::Admin, "admin");
    let stored: serde_json::Value =
        serde_json::from_slice(m.value("clusters/west").unwrap()).unwrap();
    let extra = CertificateAuthority::generate("west.isthmus.local").unwrap();
    let mut added = stored.clone();
    added["caBundlePem"] = json!(format!(
        "{}{}",
        stored["caBundlePem"].as_str().unwrap(),
        extra.cert_pem()
    ));
    let message = refused(write(&m, 1, admin, "clusters/west", &added));
    assert!(
        message.contains("cluster west's caBundlePem is changed only by cluster west itself"),
        "{message}"
    );
    // Other fields are the mesh admin's to edit, and the bundle as stored (respelled) too.
    let mut moved = stored.clone();
    moved["gateway"] = json!("127.0.0.1:15443");
    moved["caBundlePem"] = json!(format!("\n{}", stored["caBundlePem"].as_str().unwrap()));
    assert!(write(&m, 1, admin, "clusters/west", &moved).is_ok());
    // Its own cluster's bundle, a new cluster's record and a removal are too.
    let east: serde_json::Value =
        serde_json::from_slice(m.value("clusters/east").unwrap()).unwrap();
    let mut rotated = east.clone();
    let next = CertificateAuthority::generate("east.isthmus.local").unwrap();
    rotated["caBundlePem"] = json!(format!(
        "{}{}",
        east["caBundlePem"].as_str().unwrap(),
        next.cert_pem()
    ));
    assert!(write(&m, 1, admin, "clusters/east", &rotated).is_ok());
    assert!(write(&m, 1, admin, "clusters/north", &cluster("north", None)).is_ok());
    assert!(Proposer::new(&m, 1)
        .may_write(admin, "clusters/west", Change::Delete)
        .is_ok());
}
