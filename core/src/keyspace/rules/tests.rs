use std::collections::BTreeMap;

use serde_json::json;

use super::*;
use crate::ca::CertificateAuthority;

/// Records in memory (also the snapshot rules' tests' state).
#[derive(Default, Clone)]
pub(super) struct Map(pub(super) BTreeMap<String, Vec<u8>>);

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
    /// Applies the change if the rules admit it.
    fn apply(&mut self, key: &str, value: &serde_json::Value) -> Result<(), Refusal> {
        let bytes = serde_json::to_vec(value).unwrap();
        admit(self, key, Change::Write(&bytes))?;
        self.0.insert(key.into(), bytes);
        Ok(())
    }
}

pub(super) fn ca(td: &str) -> String {
    CertificateAuthority::generate(td)
        .unwrap()
        .cert_pem()
        .to_string()
}

pub(super) fn cluster(
    name: &str,
    td: &str,
    bundle: &str,
    member: Option<u64>,
) -> serde_json::Value {
    json!({"name": name, "trustDomain": td, "gateway": null, "caBundlePem": bundle,
           "memberId": member})
}

fn export(cluster: &str, identities: &[&str]) -> serde_json::Value {
    json!({"cluster": cluster, "namespace": "default", "name": "ratings", "ports": [],
           "identities": identities, "endpoints": 1, "healthyEndpoints": 1})
}

fn reason(r: Result<(), Refusal>) -> Reason {
    r.expect_err("refused").reason
}

/// east and central, each with its own CA.
fn federation() -> (Map, String, String) {
    let (east, central) = (ca("east.isthmus.local"), ca("central.isthmus.local"));
    let mut m = Map::default();
    m.apply(
        "clusters/east",
        &cluster("east", "east.isthmus.local", &east, Some(1)),
    )
    .unwrap();
    m.apply(
        "clusters/central",
        &cluster("central", "central.isthmus.local", &central, Some(2)),
    )
    .unwrap();
    (m, east, central)
}

#[test]
fn keys_are_bounded_printable_and_shaped_by_their_prefix() {
    let m = Map::default();
    let ok = |k: &str| admit(&m, k, Change::Write(b"x"));
    assert!(ok("load/00000001").is_ok());
    assert_eq!(reason(ok("")), Reason::BadKey);
    assert_eq!(reason(ok("a key")), Reason::BadKey);
    assert_eq!(reason(ok("caf\u{e9}")), Reason::BadKey);
    assert_eq!(reason(ok(&"k".repeat(513))), Reason::BadKey);
    assert!(ok(&"k".repeat(512)).is_ok());
    let e = ok("clusters/a/b").unwrap_err();
    assert_eq!(e.reason, Reason::BadKey);
    assert!(e.message.contains("clusters/<cluster>"), "{e}");
    assert_eq!(reason(ok("exports/default/east")), Reason::BadKey);
    assert_eq!(reason(ok("grants/mesh-admin/td")), Reason::BadKey);
    let big = vec![b'x'; MAX_VALUE_BYTES + 1];
    let e = admit(&m, "load/1", Change::Write(&big)).unwrap_err();
    assert_eq!(e.reason, Reason::TooLarge);
    assert!(e.message.contains("1048576"), "{e}");
}

#[test]
fn a_trust_domain_belongs_to_one_cluster_and_never_moves() {
    let (mut m, east, central) = federation();
    let before = m.0.clone();
    // zzz claims east's trust domain with another CA.
    let e = m
        .apply(
            "clusters/zzz",
            &cluster("zzz", "east.isthmus.local", &ca("east.isthmus.local"), None),
        )
        .unwrap_err();
    assert_eq!(e.reason, Reason::TrustDomainTaken);
    assert!(e.reason.is_precondition());
    assert!(
        e.message.contains("belongs to cluster east") && e.message.contains("cluster zzz"),
        "{e}"
    );
    // east moving to another trust domain.
    let e = m
        .apply(
            "clusters/east",
            &cluster("east", "elsewhere.local", &east, Some(1)),
        )
        .unwrap_err();
    assert_eq!(e.reason, Reason::Immutable);
    // east claiming central's member id, or changing its own.
    let e = m
        .apply(
            "clusters/east",
            &cluster("east", "east.isthmus.local", &east, Some(2)),
        )
        .unwrap_err();
    assert_eq!(e.reason, Reason::MemberIdTaken);
    assert_eq!(
        reason(m.apply(
            "clusters/east",
            &cluster("east", "east.isthmus.local", &east, Some(7))
        )),
        Reason::Immutable
    );
    // A record posing as another cluster's.
    assert_eq!(
        reason(m.apply(
            "clusters/zzz",
            &cluster("central", "zzz.local", &central, None)
        )),
        Reason::NotItsKey
    );
    // Bad trust domains and bundles.
    for (td, bundle) in [
        ("*", east.as_str()),
        ("East.Local", east.as_str()),
        ("zzz.local", ""),
        (
            "zzz.local",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ),
    ] {
        let e = m
            .apply("clusters/zzz", &cluster("zzz", td, bundle, None))
            .unwrap_err();
        assert_eq!(e.reason, Reason::Malformed, "{td} {bundle}: {e}");
    }
    assert_eq!(
        reason(m.apply("clusters/zzz", &json!("garbage"))),
        Reason::Malformed
    );
    assert_eq!(m.0, before, "nothing refused was written");
    // The same record again, and a new cluster of its own, are fine.
    m.apply(
        "clusters/east",
        &cluster("east", "east.isthmus.local", &east, Some(1)),
    )
    .unwrap();
    m.apply(
        "clusters/west",
        &cluster(
            "west",
            "west.isthmus.local",
            &ca("west.isthmus.local"),
            None,
        ),
    )
    .unwrap();
}

#[test]
fn a_ca_bundle_rotates_with_an_overlap_and_is_never_replaced_wholesale() {
    let (mut m, east, _) = federation();
    let next = ca("east.isthmus.local");
    let record = |bundle: &str| cluster("east", "east.isthmus.local", bundle, Some(1));
    let e = m.apply("clusters/east", &record(&next)).unwrap_err();
    assert_eq!(e.reason, Reason::CaReplaced);
    assert!(e.message.contains("rotation"), "{e}");
    // Old and new together, then new only.
    m.apply("clusters/east", &record(&format!("{east}{next}")))
        .unwrap();
    m.apply("clusters/east", &record(&next)).unwrap();
    assert_eq!(
        reason(m.apply("clusters/east", &record(&east))),
        Reason::CaReplaced
    );
}

#[test]
fn an_export_names_its_key_and_only_its_clusters_identities() {
    let (mut m, _, _) = federation();
    let key = "exports/default/ratings/central";
    m.apply(
        key,
        &export(
            "central",
            &["spiffe://central.isthmus.local/ns/default/sa/ratings"],
        ),
    )
    .unwrap();
    let e = m
        .apply(
            key,
            &export("central", &["spiffe://east.isthmus.local/ns/default/sa/x"]),
        )
        .unwrap_err();
    assert_eq!(e.reason, Reason::ForeignIdentity);
    assert!(!e.reason.is_precondition());
    assert!(
        e.message
            .contains("spiffe://east.isthmus.local/ns/default/sa/x is not in central's"),
        "{e}"
    );
    assert_eq!(
        reason(m.apply(key, &export("central", &["not-an-id"]))),
        Reason::Malformed
    );
    assert_eq!(
        reason(m.apply("exports/default/ratings/zzz", &export("central", &[]))),
        Reason::NotItsKey
    );
    assert_eq!(
        reason(m.apply("exports/default/ratings/west", &export("west", &[]))),
        Reason::UnknownCluster
    );
    assert_eq!(
        reason(m.apply("exports/Default/ratings/central", &export("central", &[]))),
        Reason::BadKey
    );
}

#[test]
fn policies_validate_at_their_own_key() {
    let m = Map::default();
    let doc = json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                     "metadata": {"name": "default", "namespace": "default"},
                     "spec": {"mtls": {"mode": "STRICT"}}});
    let bytes = serde_json::to_vec(&doc).unwrap();
    let write = |k: &str, v: &[u8]| admit(&m, k, Change::Write(v));
    write("policies/peerauthentication/default/default", &bytes).unwrap();
    write(
        "kubernetes-policies/east/peerauthentication/default/default",
        &bytes,
    )
    .unwrap();
    assert_eq!(
        reason(write("policies/peerauthentication/default/other", &bytes)),
        Reason::NotItsKey
    );
    assert_eq!(
        reason(write(
            "kubernetes-policies/east/peerauthentication/other/default",
            &bytes
        )),
        Reason::NotItsKey
    );
    let bad = serde_json::to_vec(&json!({"apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication", "metadata": {"name": "default", "namespace": "default"},
        "spec": {"mtls": {"mode": "LOOSE"}}}))
    .unwrap();
    let e = write("policies/peerauthentication/default/default", &bad).unwrap_err();
    assert_eq!(e.reason, Reason::Malformed);
    assert!(e.message.contains("spec.mtls.mode"), "{e}");
}

#[test]
fn grants_name_their_operator_and_the_last_one_stays() {
    let mut m = Map::default();
    let grant = |id: &str| json!({"identity": id, "grantedBy": "x", "grantedAtMs": 1});
    let key = "grants/mesh-admin/east.local/admin";
    m.apply(key, &grant("spiffe://east.local/operator/admin/admin"))
        .unwrap();
    assert_eq!(
        reason(m.apply(key, &grant("spiffe://west.local/operator/admin/admin"))),
        Reason::NotItsKey
    );
    assert_eq!(reason(m.apply(key, &json!({}))), Reason::Malformed);
    let e = admit(&m, key, Change::Delete).unwrap_err();
    assert_eq!(e.reason, Reason::LastGrant);
    let other = "grants/mesh-admin/east.local/bob";
    m.apply(other, &grant("spiffe://east.local/operator/admin/bob"))
        .unwrap();
    admit(&m, key, Change::Delete).unwrap();
    // Deleting anything else, existing or not, is not the rules' business.
    admit(&m, "clusters/nobody", Change::Delete).unwrap();
}

#[test]
fn a_policy_writer_grant_names_its_cluster() {
    let m = Map::default();
    let grant = |key: &str, value: serde_json::Value| {
        admit(&m, key, Change::Write(&serde_json::to_vec(&value).unwrap()))
    };
    assert!(grant("grants/policy-writer/west", json!({"cluster": "west"})).is_ok());
    assert_eq!(
        reason(grant(
            "grants/policy-writer/west",
            json!({"cluster": "east"})
        )),
        Reason::NotItsKey
    );
    assert_eq!(
        reason(grant("grants/policy-writer/west", json!({"name": "west"}))),
        Reason::Malformed
    );
    assert_eq!(
        reason(grant(
            "grants/policy-writer/West",
            json!({"cluster": "West"})
        )),
        Reason::BadKey
    );
    assert_eq!(
        reason(grant("grants/policy-writer/a/b", json!({"cluster": "a"}))),
        Reason::BadKey
    );
}
