//! The rules a replica checks before it adopts a whole state from its leader (a raft
//! snapshot), docs/security.md §7 "Snapshots".
//!
//! A snapshot replaces the replica's records without the entries that made them, so the
//! per-entry checks (writer, signature, value rules) never see it. What a lying leader could
//! gain from a forged one is trust: another cluster's CA for a trust domain, or a member id
//! bound to its own trust domain so it can speak as that member. Those are the bindings a
//! replica already holds, and a snapshot must keep them:
//!
//! | what this replica holds | the snapshot must |
//! |---|---|
//! | trust domain T with CA bundle S (that parses) | give T, under whatever cluster holds it, a bundle that keeps at least one CA of S (as an update must, so rotations pass) |
//! | member id M bound to trust domain T | bind M to T, if it names M at all |
//!
//! Removing a cluster is allowed (its trust goes with it). A cluster removed and joined
//! again under a new CA, while this replica lagged past the log, is refused here too: the
//! replica cannot tell that from a takeover, says so, and is restored from a healthy member.
//! Records the snapshot adds for trust domains and member ids this replica does not know are
//! not checked here; the readers still leave out duplicate trust domains and foreign export
//! identities (docs/security.md §7, "Readers exclude bad records").

use std::collections::BTreeMap;

use super::{bundle_cas, refuse, Reason, Records, Refusal};
use crate::keyspace::{ClusterRecord, CLUSTERS_PREFIX};

/// One cluster record's trust bindings.
struct Binding {
    key: String,
    trust_domain: String,
    member_id: Option<u64>,
    /// The bundle's CAs, DER; `None` when the bundle does not parse.
    cas: Option<Vec<Vec<u8>>>,
}

fn bindings(records: &impl Records) -> Vec<Binding> {
    records
        .values(CLUSTERS_PREFIX)
        .into_iter()
        .filter_map(|(key, value)| {
            let record = serde_json::from_slice::<ClusterRecord>(value).ok()?;
            Some(Binding {
                key: key.to_string(),
                cas: bundle_cas(&record.trust_domain, &record.ca_bundle_pem).ok(),
                trust_domain: record.trust_domain,
                member_id: record.member_id,
            })
        })
        .collect()
}

/// Whether this replica (holding `current`) may adopt `incoming` as its whole state: every
/// trust binding it holds is kept (the module's table). `Err` names the first one broken.
pub fn admit_snapshot(current: &impl Records, incoming: &impl Records) -> Result<(), Refusal> {
    let held = bindings(current);
    let offered = bindings(incoming);
    let cas_by_domain: BTreeMap<&str, &Vec<Vec<u8>>> = held
        .iter()
        .filter_map(|b| Some((b.trust_domain.as_str(), b.cas.as_ref()?)))
        .collect();
    let domain_by_member: BTreeMap<u64, &str> = held
        .iter()
        .filter_map(|b| Some((b.member_id?, b.trust_domain.as_str())))
        .collect();
    for binding in &offered {
        if let Some(&held_cas) = cas_by_domain.get(binding.trust_domain.as_str()) {
            let kept = binding
                .cas
                .as_ref()
                .is_some_and(|cas| cas.iter().any(|ca| held_cas.contains(ca)));
            if !kept {
                return Err(refuse(
                    Reason::CaReplaced,
                    &binding.key,
                    format!(
                        "the leader's snapshot gives trust domain {} a CA bundle that keeps \
                         none of the CAs this member holds for it: a snapshot cannot replace a \
                         trust domain's CA",
                        binding.trust_domain
                    ),
                ));
            }
        }
        if let Some(&held_domain) = binding.member_id.and_then(|m| domain_by_member.get(&m)) {
            if held_domain != binding.trust_domain {
                return Err(refuse(
                    Reason::Immutable,
                    &binding.key,
                    format!(
                        "the leader's snapshot binds member id {} to trust domain {}; this \
                         member holds it bound to {held_domain}",
                        binding.member_id.unwrap_or_default(),
                        binding.trust_domain
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyspace::rules::tests::{ca, cluster, Map};

    impl Map {
        fn cluster(mut self, name: &str, td: &str, member: u64, bundle: &str) -> Map {
            let record = cluster(name, td, bundle, Some(member));
            self.0.insert(
                format!("clusters/{name}"),
                serde_json::to_vec(&record).unwrap(),
            );
            self
        }
        fn without(mut self, key: &str) -> Map {
            self.0.remove(key);
            self
        }
    }

    fn held() -> (Map, String, String) {
        let (east, west) = (ca("east.local"), ca("west.local"));
        let map = Map::default()
            .cluster("east", "east.local", 1, &east)
            .cluster("west", "west.local", 2, &west);
        (map, east, west)
    }

    #[test]
    fn a_snapshot_that_keeps_every_binding_is_admitted() {
        let (current, east, _) = held();
        let next = ca("east.local");
        let rotated = format!("{east}{next}");
        let incoming = current
            .clone()
            .cluster("east", "east.local", 1, &rotated)
            .cluster("north", "north.local", 3, &ca("north.local"));
        admit_snapshot(&current, &incoming).unwrap();
        // A removed cluster and an empty replica (nothing held yet) pass too.
        admit_snapshot(&current, &current.clone().without("clusters/west")).unwrap();
        admit_snapshot(&Map::default(), &incoming).unwrap();
    }

    #[test]
    fn a_snapshot_replacing_a_held_ca_is_refused_under_any_name() {
        let (current, _, _) = held();
        let forged = ca("east.local");
        for incoming in [
            current.clone().cluster("east", "east.local", 1, &forged),
            current
                .clone()
                .without("clusters/east")
                .cluster("zzz", "east.local", 9, &forged),
            current
                .clone()
                .cluster("east", "east.local", 1, "not a pem"),
        ] {
            let refusal = admit_snapshot(&current, &incoming).unwrap_err();
            assert_eq!(refusal.reason, Reason::CaReplaced, "{refusal}");
            assert!(refusal.message.contains("east.local"), "{refusal}");
        }
    }

    #[test]
    fn a_snapshot_rebinding_a_held_member_id_is_refused() {
        let (current, east, west) = held();
        // Member 1 (east's) moved to west's trust domain, west's record naming it.
        let incoming = current
            .clone()
            .cluster("east", "east.local", 7, &east)
            .cluster("west", "west.local", 1, &west);
        let refusal = admit_snapshot(&current, &incoming).unwrap_err();
        assert_eq!(refusal.reason, Reason::Immutable, "{refusal}");
        assert!(
            refusal.message.contains("member id 1") && refusal.message.contains("east.local"),
            "{refusal}"
        );
    }
}
