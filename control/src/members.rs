//! Who the federation's members are, as this control plane's federation member authenticates
//! them on the peer port (docs/security.md §4).
//!
//! Two sources, merged by [`member_table`]:
//! - the **initial members** of the config (`federation.peers` entries with `trustDomain` and
//!   `caFile`, and this member itself): known before any record replicates, so the first raft
//!   messages can be authenticated. They are pinned: no record can move their trust domain to
//!   another member id.
//! - the replica's **`clusters/<name>` records** with a `memberId`: a cluster that joined is
//!   recorded there (with its trust domain and CA bundle) before its first raft message.
//!   A trust domain claimed by records of two different members is left out (logged), as the
//!   catalog leaves it out of every data plane.
//!
//! [`MemberTrust::follow`] keeps the peer port's bundles and directory in step with the
//! replica; a binding that disappears takes the member's rights away at its next request.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::ca::CertificateAuthority;
use isthmus_core::identity::SpiffeId;
use isthmus_core::keyspace::{ClusterRecord, CLUSTERS_PREFIX, REMOVED_MEMBERS_PREFIX};
use isthmus_core::tls::{Identity, TrustBundles};
use isthmus_federation::{MemberDirectory, PeerTls, Store};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::ControlError;

/// A member known from the config rather than the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialMember {
    pub id: u64,
    pub trust_domain: String,
    /// Its cluster CA's certificates, PEM.
    pub ca_pem: String,
}

/// What the peer port trusts: trust domain → (member id, CA bundle PEM).
pub type MemberTable = BTreeMap<String, (u64, String)>;

/// Merges the pinned initial members with the replica's cluster records, leaving out the
/// members the federation removed (`removed`, from `members/removed/<id>`): a removed member
/// loses its binding even where a config still pins it.
pub fn member_table(
    pinned: &[InitialMember],
    records: &[ClusterRecord],
    removed: &BTreeSet<u64>,
) -> MemberTable {
    let mut table = MemberTable::new();
    for m in pinned.iter().filter(|m| !removed.contains(&m.id)) {
        table.insert(
            m.trust_domain.to_ascii_lowercase(),
            (m.id, m.ca_pem.clone()),
        );
    }
    // A member id belongs to one trust domain: a record claiming a pinned member's id for
    // another trust domain, or an id that records of several trust domains claim, binds
    // nothing (else one cluster's control plane could act as another's member).
    let mut domains_of: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for (td, (id, _)) in &table {
        domains_of.entry(*id).or_default().insert(td.clone());
    }
    for r in records {
        if let Some(id) = r.member_id {
            domains_of
                .entry(id)
                .or_default()
                .insert(r.trust_domain.to_ascii_lowercase());
        }
    }
    let shared_id = |id: u64| domains_of.get(&id).is_some_and(|tds| tds.len() > 1);
    let mut claims: BTreeMap<String, Vec<&ClusterRecord>> = BTreeMap::new();
    for r in records {
        if r.member_id.is_some_and(|id| !removed.contains(&id)) {
            let id = r.member_id.unwrap_or_default();
            let pinned_here = table
                .get(&r.trust_domain.to_ascii_lowercase())
                .is_some_and(|(pinned, _)| *pinned == id);
            if shared_id(id) && !pinned_here {
                tracing::warn!(
                    cluster = %r.name,
                    trust_domain = %r.trust_domain,
                    member = id,
                    "a cluster record claims a member id another trust domain has; ignored"
                );
                continue;
            }
            claims
                .entry(r.trust_domain.to_ascii_lowercase())
                .or_default()
                .push(r);
        }
    }
    for (trust_domain, claimants) in claims {
        match table.get_mut(&trust_domain) {
            // A pinned member's own record may carry a newer bundle (a CA rotation).
            Some((id, pem)) => {
                if let Some(own) = claimants.iter().find(|r| r.member_id == Some(*id)) {
                    *pem = own.ca_bundle_pem.clone();
                }
                for other in claimants.iter().filter(|r| r.member_id != Some(*id)) {
                    tracing::warn!(
                        %trust_domain,
                        cluster = %other.name,
                        claimed_member = ?other.member_id,
                        pinned_member = *id,
                        "a cluster record claims a pinned member's trust domain; ignored"
                    );
                }
            }
            None => {
                let ids: std::collections::BTreeSet<u64> =
                    claimants.iter().filter_map(|r| r.member_id).collect();
                match (ids.len(), claimants.first()) {
                    (1, Some(r)) => {
                        let id = r.member_id.unwrap_or_default();
                        table.insert(trust_domain, (id, r.ca_bundle_pem.clone()));
                    }
                    _ => tracing::warn!(
                        %trust_domain,
                        clusters = ?claimants.iter().map(|r| &r.name).collect::<Vec<_>>(),
                        "several members claim one trust domain; none is authenticated by it"
                    ),
                }
            }
        }
    }
    table
}

/// The peer port's identity, bundles and directory, before and while the member runs.
#[derive(Clone)]
pub struct MemberTrust {
    pinned: Vec<InitialMember>,
    tls: PeerTls,
    ca: Arc<CertificateAuthority>,
    lifetime: Duration,
}

impl MemberTrust {
    /// This member (`own_id`, its CA) and the config's initial members. The certificate the
    /// peer port (and the control-plane API) presents is issued from `ca` for `lifetime`.
    pub fn new(
        ca: Arc<CertificateAuthority>,
        own_id: u64,
        initial: Vec<InitialMember>,
        lifetime: Duration,
    ) -> Result<Self, ControlError> {
        let mut pinned = vec![InitialMember {
            id: own_id,
            trust_domain: ca.trust_domain().to_string(),
            ca_pem: ca.bundle_pem(),
        }];
        for m in initial {
            if m.id != own_id {
                pinned.push(m);
            }
        }
        let identity = issue(&ca, lifetime)?;
        let bundles = TrustBundles::new();
        let directory = MemberDirectory::new(BTreeMap::new());
        let trust = MemberTrust {
            tls: PeerTls {
                identity,
                bundles,
                directory,
            },
            pinned,
            ca,
            lifetime,
        };
        trust.install(&member_table(&trust.pinned, &[], &BTreeSet::new()));
        Ok(trust)
    }

    /// What the federation member's peer port uses ([`isthmus_federation::Binding::with_tls`]).
    pub fn peer_tls(&self) -> PeerTls {
        self.tls.clone()
    }

    /// The control plane's identity (the peer port and the API present the same one).
    pub fn identity(&self) -> Arc<Identity> {
        self.tls.identity.clone()
    }

    fn install(&self, table: &MemberTable) {
        let bundles = table
            .iter()
            .map(|(td, (_, pem))| (td.as_str(), pem.as_str()));
        for (trust_domain, e) in self.tls.bundles.replace_each(bundles) {
            tracing::warn!(%trust_domain, error = %e, "leaving out a member's unusable trust bundle");
        }
        self.tls.directory.replace(
            table
                .iter()
                .map(|(td, (id, _))| (td.clone(), *id))
                .collect(),
        );
    }

    /// Keeps the bundles and directory in step with `store`'s cluster records, and re-issues
    /// the identity at half its lifetime, until `stop`.
    pub fn follow(self, store: Store, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut revision = store.revision();
            let mut installed = MemberTable::new();
            let rotate_every = self.lifetime / 2;
            let mut next_rotation = tokio::time::Instant::now() + rotate_every;
            loop {
                let records: Vec<ClusterRecord> = store
                    .list(CLUSTERS_PREFIX)
                    .into_iter()
                    .filter_map(|(_, r)| serde_json::from_slice(&r.value).ok())
                    .collect();
                let removed: BTreeSet<u64> = store
                    .list(REMOVED_MEMBERS_PREFIX)
                    .into_iter()
                    .filter_map(|(key, _)| key.strip_prefix(REMOVED_MEMBERS_PREFIX)?.parse().ok())
                    .collect();
                let table = member_table(&self.pinned, &records, &removed);
                if table != installed {
                    self.install(&table);
                    tracing::info!(
                        members = ?table.iter().map(|(td, (id, _))| (td.as_str(), *id)).collect::<Vec<_>>(),
                        "federation peers authenticated by trust domain"
                    );
                    installed = table;
                }
                tokio::select! {
                    changed = revision.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep_until(next_rotation) => {
                        next_rotation = tokio::time::Instant::now() + rotate_every;
                        let rotated = self.ca
                            .issue(&SpiffeId::control(self.ca.trust_domain()), self.lifetime)
                            .map_err(|e| e.to_string())
                            .and_then(|c| self.tls.identity.rotate(&c.cert_chain_pem, &c.key_pem).map_err(|e| e.to_string()));
                        if let Err(e) = rotated {
                            tracing::warn!(error = %e, "control-plane certificate rotation failed; keeping the current one");
                        }
                    }
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        })
    }
}

fn issue(ca: &CertificateAuthority, lifetime: Duration) -> Result<Arc<Identity>, ControlError> {
    let id = SpiffeId::control(ca.trust_domain());
    let issued = ca
        .issue(&id, lifetime)
        .map_err(|e| ControlError::Tls(format!("issuing the certificate of {id}: {e}")))?;
    Identity::from_pem(id, &issued.cert_chain_pem, &issued.key_pem)
        .map_err(|e| ControlError::Tls(e.to_string()))
}

/// The federation member's refusals on the control plane's `/metrics`, read from the store
/// at each scrape:
///
/// - `isthmus_control_federation_peer_refused_total{reason}`, the peer port's, with `reason`
///   one of `unauthenticated` (no certificate, a method other than `Kv.JoinInfo`/`Kv.Join`),
///   `not_a_member` (a certificate that is not a bound member control plane's),
///   `sender_mismatch` (a raft batch whose `from` is not the member the certificate is bound
///   to), and at the handshake `not_tls` (plaintext), `bad_certificate` (a chain that does
///   not verify against the members' bundles), `handshake_timeout`, and `anonymous_limit` (a
///   connection without a certificate beyond the port's 32);
/// - `isthmus_control_federation_entries_refused_total{reason}`, the entries this replica's
///   store rules refused on apply (`isthmus_core::keyspace::rules::Reason`'s labels);
/// - `isthmus_control_federation_snapshots_refused_total`, the leader's snapshots this
///   replica refused (`isthmus_core::keyspace::rules::snapshot`).
pub struct FederationMetrics(Store);

impl FederationMetrics {
    pub fn register(store: Store, registry: &mut prometheus_client::registry::Registry) {
        registry.register_collector(Box::new(FederationMetrics(store)));
    }
}

impl std::fmt::Debug for FederationMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FederationMetrics")
    }
}

impl prometheus_client::collector::Collector for FederationMetrics {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        let counts = self.0.peer_refusals();
        let mut family = encoder.encode_descriptor(
            "federation_peer_refused",
            "Requests refused on the federation peer port, by reason",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, n) in [
            ("unauthenticated", counts.unauthenticated),
            ("not_a_member", counts.not_a_member),
            ("sender_mismatch", counts.sender_mismatch),
            ("not_tls", counts.not_tls),
            ("bad_certificate", counts.bad_certificate),
            ("handshake_timeout", counts.handshake_timeout),
            ("anonymous_limit", counts.anonymous_limit),
        ] {
            ConstCounter::new(n).encode(family.encode_family(&[("reason", reason)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "federation_entries_refused",
            "Federation store entries this replica's rules refused on apply, by reason",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, n) in self.0.entries_refused() {
            ConstCounter::new(n).encode(family.encode_family(&[("reason", reason.label())])?)?;
        }
        let family = encoder.encode_descriptor(
            "federation_snapshots_refused",
            "Snapshots from a leader this replica refused: they would have replaced a trust \
             domain's CA or rebound a member id",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        ConstCounter::new(self.0.snapshots_refused()).encode(family)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pinned(id: u64, td: &str) -> InitialMember {
        InitialMember {
            id,
            trust_domain: td.into(),
            ca_pem: format!("PEM-{td}"),
        }
    }

    fn record(name: &str, td: &str, member: Option<u64>, pem: &str) -> ClusterRecord {
        ClusterRecord {
            name: name.into(),
            trust_domain: td.into(),
            gateway: None,
            ca_bundle_pem: pem.into(),
            locality: None,
            member_id: member,
            control: None,
        }
    }

    #[test]
    fn initial_members_are_pinned_and_joined_members_come_from_their_records() {
        let table = member_table(
            &[pinned(1, "east.local"), pinned(2, "west.local")],
            &[
                // East's own record carries a rotated bundle: taken.
                record("east", "east.local", Some(1), "PEM-east+new"),
                // Someone claims west's trust domain for member 9: ignored.
                record("zzz", "west.local", Some(9), "PEM-evil"),
                // A joined member.
                record("north", "north.local", Some(4), "PEM-north"),
                // No member id: not a member.
                record("south", "south.local", None, "PEM-south"),
            ],
            &BTreeSet::new(),
        );
        assert_eq!(
            table,
            MemberTable::from([
                ("east.local".into(), (1, "PEM-east+new".into())),
                ("west.local".into(), (2, "PEM-west.local".into())),
                ("north.local".into(), (4, "PEM-north".into())),
            ])
        );
    }

    #[test]
    fn a_trust_domain_two_members_claim_authenticates_neither() {
        let table = member_table(
            &[pinned(1, "east.local")],
            &[
                record("north", "north.local", Some(4), "PEM-a"),
                record("fake", "NORTH.local", Some(5), "PEM-b"),
            ],
            &BTreeSet::new(),
        );
        assert_eq!(table.len(), 1, "{table:?}");
    }

    #[test]
    fn a_member_id_belongs_to_one_trust_domain() {
        let table = member_table(
            &[pinned(1, "east.local")],
            &[
                record("east", "east.local", Some(1), "PEM-east.local"),
                // Claims east's member id for its own trust domain: it would act as east.
                record("zzz", "zzz.local", Some(1), "PEM-zzz"),
                // Two trust domains claim member 7: neither is bound.
                record("north", "north.local", Some(7), "PEM-north"),
                record("yyy", "yyy.local", Some(7), "PEM-yyy"),
                record("south", "south.local", Some(8), "PEM-south"),
            ],
            &BTreeSet::new(),
        );
        assert_eq!(
            table,
            MemberTable::from([
                ("east.local".into(), (1, "PEM-east.local".into())),
                ("south.local".into(), (8, "PEM-south".into())),
            ])
        );
    }

    #[test]
    fn removed_members_lose_their_binding_even_when_pinned() {
        let table = member_table(
            &[pinned(1, "east.local"), pinned(2, "west.local")],
            &[
                record("west", "west.local", Some(2), "PEM-west.local"),
                record("north", "north.local", Some(4), "PEM-north"),
            ],
            &BTreeSet::from([2, 4]),
        );
        assert_eq!(
            table,
            MemberTable::from([("east.local".into(), (1, "PEM-east.local".into()))])
        );
    }
}
