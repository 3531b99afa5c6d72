//! Who may write which key, checked by every replica when it applies an entry
//! (docs/security.md §7, "Writers").
//!
//! Every entry names the member that proposed it (its proposal id) and the [`Writer`] it acted
//! for: the member's own control plane, or an operator whose request that member's API
//! authenticated. [`Proposer::may_write`] decides from the replica's state alone, so every replica
//! decides alike:
//!
//! - A member is **bound** to the cluster whose record names its member id. A bound member
//!   writes, as its control plane, only its cluster's own records (`clusters/<C>`,
//!   `exports/*/*/<C>`, `kubernetes-policies/<C>/…`), `policies/` only with a
//!   `grants/policy-writer/<C>` grant, and the first mesh-admin grant of its own trust domain
//!   while there is none. It never deletes a cluster record or a grant.
//! - A member no record binds (an initial member before its control plane wrote its record;
//!   control planes run without member ids) writes the records of clusters no member is bound
//!   to, and `policies/`.
//! - An operator counts only when it lies in the trust domain of the member that vouched
//!   for it (a member vouches for its own operators only). A viewer writes nothing; an admin
//!   its own cluster's records; an admin with a `grants/mesh-admin/<td>/<name>` grant any key
//!   (the value rules of [`super::rules`] still apply).
//! - Keys outside the governed prefixes belong to no cluster: any writer but a viewer.
//!
//! The ownership check runs before the value rules; a refusal is [`Reason::NotOwner`].

use std::cell::OnceCell;
use std::fmt;

use super::rules::{Change, Reason, Records, Refusal};
use super::{policy_writer_grant, ClusterRecord, Key, CLUSTERS_PREFIX, MESH_ADMIN_GRANTS_PREFIX};
use crate::identity::{OperatorId, Principal, Role};

/// On whose behalf a member proposed a write.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Writer {
    /// The proposing member's own control plane (its publisher, its Kubernetes policies, its
    /// leases).
    Member,
    /// An operator the proposing member's API authenticated.
    Operator(OperatorId),
}

impl Writer {
    /// How an entry carries it: `member`, or the operator's SPIFFE ID.
    pub fn encode(&self) -> String {
        match self {
            Writer::Member => "member".to_string(),
            Writer::Operator(op) => op.to_string(),
        }
    }

    /// Reads back what [`Writer::encode`] wrote; an empty string (entries written before
    /// writers were recorded) is the member.
    pub fn decode(s: &str) -> Result<Writer, String> {
        match s {
            "" | "member" => Ok(Writer::Member),
            _ => match s.parse::<Principal>() {
                Ok(Principal::Operator(op)) => Ok(Writer::Operator(op)),
                Ok(Principal::Workload(id)) => Err(format!("{id} is not an operator")),
                Err(e) => Err(format!("writer {s:?}: {e}")),
            },
        }
    }
}

impl fmt::Display for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Writer::Member => f.write_str("the member's control plane"),
            Writer::Operator(op) => op.fmt(f),
        }
    }
}

/// Whether an entry writing `key` for `writer` must carry its proposer's signature (when the
/// proposer is bound, [`Proposer::signer`]): writes that need an owner, i.e. of a governed key
/// or for an operator. Writes of unowned keys by a member, token and lease-expiry entries need
/// none: anyone may make them, so a forged proposer gains nothing.
pub fn needs_signature(writer: &Writer, key: &str) -> bool {
    matches!(writer, Writer::Operator(_)) || governed(key)
}

/// Whether a key falls under a prefix whose records have owners.
fn governed(key: &str) -> bool {
    Key::parse(key) != Key::Other || key.starts_with("grants/")
}

/// A cluster record as far as ownership needs it.
struct Cluster {
    name: String,
    /// As the record spells it (a signer's identity is built from it).
    trust_domain: String,
    /// Lowercased, for comparing with an operator's.
    trust_domain_key: String,
    member_id: Option<u64>,
    ca_bundle_pem: String,
}

/// The member that proposed an entry, judged against one replica's state: its cluster
/// records are read at most once per entry, however many checks the entry needs.
pub struct Proposer<'r, R: Records> {
    records: &'r R,
    id: u64,
    clusters: OnceCell<Vec<Cluster>>,
}

impl<'r, R: Records> Proposer<'r, R> {
    pub fn new(records: &'r R, id: u64) -> Self {
        Proposer {
            records,
            id,
            clusters: OnceCell::new(),
        }
    }

    /// The member's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The state it is judged against.
    pub fn records(&self) -> &'r R {
        self.records
    }

    fn clusters(&self) -> &[Cluster] {
        self.clusters.get_or_init(|| {
            self.records
                .values(CLUSTERS_PREFIX)
                .into_iter()
                .filter_map(|(_, v)| serde_json::from_slice::<ClusterRecord>(v).ok())
                .map(|r| Cluster {
                    name: r.name,
                    trust_domain_key: r.trust_domain.to_ascii_lowercase(),
                    trust_domain: r.trust_domain,
                    member_id: r.member_id,
                    ca_bundle_pem: r.ca_bundle_pem,
                })
                .collect()
        })
    }

    /// The cluster this member is bound to.
    fn bound(&self) -> Option<&Cluster> {
        self.clusters()
            .iter()
            .find(|c| c.member_id == Some(self.id))
    }

    /// Whether cluster `name` is bound to a member.
    fn is_bound(&self, name: &str) -> bool {
        self.clusters()
            .iter()
            .any(|c| c.name == name && c.member_id.is_some())
    }

    /// Whether this member vouches for identities of trust domain `td` (lowercase): a bound
    /// member for its own; a member no record binds, for those no bound member holds.
    fn vouches_for(&self, td: &str) -> bool {
        match self.bound() {
            Some(b) => b.trust_domain_key == td,
            None => !self
                .clusters()
                .iter()
                .any(|c| c.member_id.is_some() && c.trust_domain_key == td),
        }
    }

    /// The trust domain and CA bundle of the cluster this member is bound to: whose control
    /// plane must have signed its entries that need a signature.
    pub fn signer(&self) -> Option<(&str, &str)> {
        self.bound()
            .map(|c| (c.trust_domain.as_str(), c.ca_bundle_pem.as_str()))
    }

    /// Whether `writer`, through this member, may mint a join token: a bound member mints
    /// only for a mesh admin of its own trust domain (what `Kv.MintJoinToken` on its API is
    /// authorized for); a member no record binds, for anyone (as it writes unbound clusters'
    /// records).
    pub fn may_mint(&self, writer: &Writer) -> Result<(), Refusal> {
        if self.bound().is_none() {
            return Ok(());
        }
        let proposer = self.id;
        let refuse = |why: &str| {
            Err(Refusal {
                reason: Reason::NotOwner,
                message: format!(
                    "join token: {writer} (through member {proposer}) may not mint one: {why}"
                ),
            })
        };
        match writer {
            Writer::Member => refuse("join tokens are minted for a mesh admin"),
            Writer::Operator(op) if !self.vouches_for(op.trust_domain()) => {
                refuse("a member vouches only for operators of its own trust domain")
            }
            Writer::Operator(op) if is_mesh_admin(self.records, op) => Ok(()),
            Writer::Operator(_) => refuse("it needs a mesh-admin grant"),
        }
    }

    /// Whether `writer`, vouched for by this member, may make `change` to `key`
    /// (a lease renewal counts as a write).
    pub fn may_write(&self, writer: &Writer, key: &str, change: Change<'_>) -> Result<(), Refusal> {
        let parsed = Key::parse(key);
        let governed = governed(key);
        match writer {
            Writer::Member if !governed => Ok(()),
            Writer::Member => self.member_may_write(key, parsed, change),
            Writer::Operator(op) => self.operator_may_write(op, key, (parsed, governed), change),
        }
    }

    fn not_owner(&self, key: &str, writer: &Writer, why: impl fmt::Display) -> Refusal {
        Refusal {
            reason: Reason::NotOwner,
            message: format!(
                "{key}: {writer} (through member {}) may not write it: {why}",
                self.id
            ),
        }
    }

    fn member_may_write(
        &self,
        key: &str,
        parsed: Key<'_>,
        change: Change<'_>,
    ) -> Result<(), Refusal> {
        let proposer = self.id;
        let refuse = |why: String| Err(self.not_owner(key, &Writer::Member, why));
        let bound = self.bound();
        let cluster_of =
            || bound.map_or("no cluster".to_string(), |b| format!("cluster {}", b.name));
        match parsed {
            Key::Cluster { name } => {
                let Change::Write(value) = change else {
                    return refuse("a cluster's record is removed by a mesh admin".into());
                };
                // A record the value rules will refuse anyway is theirs to name.
                let member_id = serde_json::from_slice::<ClusterRecord>(value)
                    .ok()
                    .and_then(|r| r.member_id);
                match bound {
                    Some(b) if b.name == name && member_id == Some(proposer) => Ok(()),
                    Some(b) if b.name == name => refuse(format!(
                        "cluster {name}'s record keeps member id {proposer}"
                    )),
                    None if !self.is_bound(name) && member_id.is_none_or(|id| id == proposer) => {
                        Ok(())
                    }
                    None if member_id.is_some_and(|id| id != proposer) => refuse(format!(
                        "a member binds its own id only, not {}",
                        member_id.unwrap_or_default()
                    )),
                    _ => refuse(format!(
                        "it is bound to {}; cluster {name}'s record is written by its own member",
                        cluster_of()
                    )),
                }
            }
            Key::Export { cluster, .. } | Key::KubernetesPolicy { cluster, .. } => match bound {
                Some(b) if b.name == cluster => Ok(()),
                None if !self.is_bound(cluster) => Ok(()),
                _ => refuse(format!(
                    "it is bound to {}; cluster {cluster}'s records are written by its own member",
                    cluster_of()
                )),
            },
            Key::Policy { .. } => match bound {
                None => Ok(()),
                Some(b) if self.records.value(&policy_writer_grant(&b.name)).is_some() => Ok(()),
                Some(b) => refuse(format!(
                    "mesh-wide policies from cluster {}'s Kubernetes need a mesh admin's grant \
                     ({})",
                    b.name,
                    policy_writer_grant(&b.name)
                )),
            },
            Key::MeshAdminGrant { trust_domain, .. } => {
                let first = self.records.values(MESH_ADMIN_GRANTS_PREFIX).is_empty();
                let own = self.vouches_for(&trust_domain.to_ascii_lowercase());
                if matches!(change, Change::Write(_)) && first && own {
                    Ok(())
                } else {
                    refuse("grants are written by mesh admins (a member writes only the first, of its own trust domain)".into())
                }
            }
            Key::PolicyWriterGrant { .. } | Key::Other => {
                refuse("grants are written by mesh admins".into())
            }
        }
    }

    fn operator_may_write(
        &self,
        op: &OperatorId,
        key: &str,
        (parsed, governed): (Key<'_>, bool),
        change: Change<'_>,
    ) -> Result<(), Refusal> {
        let writer = &Writer::Operator(op.clone());
        let refuse = |why: String| Err(self.not_owner(key, writer, why));
        let td = op.trust_domain();
        if !self.vouches_for(td) {
            return refuse(format!(
                "a member vouches only for operators of its own trust domain ({})",
                self.bound()
                    .map_or("none bound", |b| b.trust_domain_key.as_str())
            ));
        }
        if op.role() == Role::Viewer {
            return refuse("the viewer role reads only".into());
        }
        if !governed {
            return Ok(());
        }
        if is_mesh_admin(self.records, op) {
            return match (&parsed, change) {
                (Key::Cluster { name }, Change::Write(value)) => {
                    self.keeps_foreign_bundle(name, td, value).or_else(refuse)
                }
                _ => Ok(()),
            };
        }
        let own_cluster = self
            .clusters()
            .iter()
            .find(|c| c.trust_domain_key == td)
            .map(|c| c.name.as_str());
        let owner = parsed.owner();
        let creating_own = match (&parsed, change) {
            (Key::Cluster { .. }, Change::Write(value)) if own_cluster.is_none() => {
                serde_json::from_slice::<ClusterRecord>(value)
                    .is_ok_and(|r| r.trust_domain.eq_ignore_ascii_case(td))
            }
            _ => false,
        };
        let own_key = matches!(parsed, Key::Cluster { .. } | Key::Export { .. })
            && owner.is_some()
            && owner == own_cluster;
        if own_key || creating_own {
            return Ok(());
        }
        refuse(format!(
            "an admin writes only its own cluster's records ({}); this needs a mesh-admin grant",
            own_cluster.map_or("none".to_string(), |c| format!(
                "clusters/{c}, exports/*/*/{c}"
            ))
        ))
    }
}

impl<R: Records> Proposer<'_, R> {
    /// A mesh admin of trust domain `td` writing `clusters/<name>`: another cluster's CA
    /// bundle stays as it is (only that cluster rotates its CA: docs/security.md §5), so a
    /// stolen mesh-admin credential cannot add a CA to another cluster's trust. A record
    /// that does not parse is the value rules' to refuse.
    fn keeps_foreign_bundle(&self, name: &str, td: &str, value: &[u8]) -> Result<(), String> {
        let Some(current) = self.clusters().iter().find(|c| c.name == name) else {
            return Ok(());
        };
        let Ok(next) = serde_json::from_slice::<ClusterRecord>(value) else {
            return Ok(());
        };
        let cas = |pem: &str| {
            crate::tls::certs_from_pem("caBundlePem", pem)
                .map(|certs| {
                    certs
                        .into_iter()
                        .map(|c| c.to_vec())
                        .collect::<std::collections::BTreeSet<_>>()
                })
                .ok()
        };
        let same = match (cas(&current.ca_bundle_pem), cas(&next.ca_bundle_pem)) {
            (Some(a), Some(b)) => a == b,
            _ => current.ca_bundle_pem == next.ca_bundle_pem,
        };
        if same || current.trust_domain_key.eq_ignore_ascii_case(td) {
            return Ok(());
        }
        Err(format!(
            "cluster {name}'s caBundlePem is changed only by cluster {name} itself (its member \
             or its admins: `isthmus ca rotate` on its control plane)"
        ))
    }
}

/// Whether operator `op` is an admin holding a mesh-admin grant.
fn is_mesh_admin(records: &impl Records, op: &OperatorId) -> bool {
    op.role() == Role::Admin
        && records
            .value(&super::mesh_admin_grant(op.trust_domain(), op.name()))
            .is_some()
}

#[cfg(test)]
mod tests;
